"""The drive core: one real-time thread from camera to actuators, with its fault monitor.

Nothing here imports asyncio or touches the network; other threads talk to the core through
bounded, lock-free handoffs: the ``StopBoard`` and per-source ``CommandLane``s in, the
``DriveStatus`` snapshot, ``EventQueue`` and ``LoopMetrics`` out.
"""
