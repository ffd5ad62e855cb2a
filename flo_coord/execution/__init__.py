"""Execution: running requests against backends on top of the store.

Backend adapters and their ending model (``backends``, ``capabilities``), model groups and
routing (``groups``), the circuit breaker (``breaker``), the ``Coordinator``
(``coordinator``), delivery to followers (``delivery``), the submission queue (``queue``)
and the worker loop (``worker``).
"""
