"""The store: the only way to Redis.

Key schema (``keys``), Lua scripts and the Redis Functions library (``scripts``,
``functions``), codecs (``codec``), input bounds (``validation``), the sans-I/O protocol
core (``core``), the I/O shell with its retry and connection rules (``shell``, ``retry``,
``connection``), the append batcher (``batching``) and the public facades
(``facade``: ``FailoverManager``, ``AsyncFailoverManager``).
"""
