"""A headless digital twin that speaks the Donkey simulator protocol.

The twin is a deterministic world (tracks, a kinematic bicycle model, a numpy camera
renderer) that can be driven in-process (``simulator.world.TwinCar``) or over TCP
(``donkey-sim``), so the agent, the tests and training-data generation all run without a car.
"""
