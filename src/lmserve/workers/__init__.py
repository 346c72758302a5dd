"""Engine processes, how the frontend talks to them, and how a model's replicas are run.

``messages``: the typed messages, which are their own wire format (msgspec structs).
``engine_process``: the loop in the spawned process that drives one ``EngineCore``.
``engine_client``: the frontend's asyncio handle on one such process. ``request_stream``: one
request's deltas. ``placement``: which devices, cores and threads each replica gets.
``replica_state``: the states a replica goes through. ``replica``: one supervised replica slot.
``launcher``: starts a model's replicas, restarts those that die, scales them. ``router``: picks
the least-loaded replica, bounds each replica's outstanding requests, and drains.
"""
