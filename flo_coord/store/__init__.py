"""The store: the only way to Redis.

Key schema (``keys``), Lua scripts and the Redis Functions library (``scripts``,
``functions``), codecs (``codec``), input bounds (``validation``), the sans-I/O protocol
core (``core``), the I/O shell with its retry and connection rules (``shell``, ``retry``,
``connection``), the append batcher (``batching``), the optional observer hooks
(``observer``) and the public facades (``facade``: ``AsyncFailoverManager``, written
once, and ``FailoverManager``, generated from it into ``facade_sync`` by
``scripts/unasync.py``).
"""
