"""The drive core: one real-time thread from camera to actuators, with its safety supervisor.

Nothing here imports asyncio or touches the network; other threads talk to the core through
bounded, lock-free handoffs (``CommandQueue`` in, ``EventQueue`` and ``LoopMetrics`` out).
"""
