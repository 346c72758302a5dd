"""Engine processes and how the frontend talks to them.

``messages``: the typed messages and their msgpack wire format. ``engine_process``: the loop in the
spawned process that drives one ``EngineCore``. ``engine_client``: the frontend's asyncio handle on
one such process (one replica). ``request_stream``: one request's deltas. ``router``: picks the
least-loaded replica and bounds each replica's outstanding requests.
"""
