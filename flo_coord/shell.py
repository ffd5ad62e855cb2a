"""Thin I/O shells that execute the core's batches on a sync or asyncio redis client.

Both shells share everything but the ``await``: batch queuing, NOSCRIPT reload, the
transient-fault classification and the retry policy. A batch is one pipeline
(``transaction=False``), so one round trip on a single Redis; on a Cluster the client
splits it by node. Scripts are loaded once per server, and again on NOSCRIPT (after
SCRIPT FLUSH, a restart or a failover to a replica).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import redis.exceptions as rex
from tenacity import AsyncRetrying, Retrying

from flo_coord.core import Call, Cmd, Eval, Operation
from flo_coord.errors import CoordinatorUnavailableError
from flo_coord.retry import RetryPolicy, is_transient, no_client_retries
from flo_coord.scripts import APPEND, FINISH, START

T = TypeVar("T")

# Writes that a ``durability="replica"`` shell confirms with WAIT before reporting them.
_DURABLE_SCRIPTS = frozenset({APPEND.sha, FINISH.sha, START.sha})


def _args(call: Call) -> tuple[Any, ...]:
    if isinstance(call, Eval):
        return ("EVALSHA", call.script.sha, len(call.keys), *call.keys, *call.args)
    return call.args


def _retry_safe(batch: list[Call]) -> bool:
    """History entries (XADD to the history stream) are the only calls not safe to repeat."""
    return not any(isinstance(c, Cmd) and c.args[0] == "XADD" for c in batch)


def _needs_wait(batch: list[Call]) -> bool:
    return any(isinstance(c, Eval) and c.script.sha in _DURABLE_SCRIPTS for c in batch)


def _first_transient(replies: list[Any]) -> BaseException | None:
    return next((r for r in replies if isinstance(r, BaseException) and is_transient(r)), None)


def _missing_scripts(batch: list[Call], replies: list[Any]) -> list[int]:
    return [i for i, r in enumerate(replies) if isinstance(r, rex.NoScriptError) and isinstance(batch[i], Eval)]


class _ShellBase:
    def __init__(self, client: Any, policy: RetryPolicy | None, durability: str, wait_timeout_ms: int) -> None:
        if durability not in ("primary", "replica"):
            raise ValueError("durability must be 'primary' or 'replica'")
        self.client = client
        self.policy = policy or RetryPolicy()
        self.durability = durability
        self.wait_timeout_ms = wait_timeout_ms
        # One retry layer: switch off the client's own retries (redis-py retries by default).
        if hasattr(client, "set_retry") and not _is_cluster(client):
            client.set_retry(no_client_retries())

    def _with_wait(self, batch: list[Call]) -> list[Call]:
        if self.durability == "replica" and _needs_wait(batch):
            return [*batch, Cmd(("WAIT", 1, self.wait_timeout_ms))]
        return batch

    def _check_wait(self, batch: list[Call], replies: list[Any]) -> list[Any]:
        if len(replies) > len(batch):
            acked = replies[-1]
            if isinstance(acked, BaseException) or int(acked) < 1:
                # Not on a replica yet: retry (the writes are idempotent) until the deadline.
                raise rex.TimeoutError(f"WAIT: no replica acknowledged the write ({acked!r})")
            return replies[:-1]
        return replies

    def _unavailable(self, exc: BaseException, operation: str, request_id: str | None) -> CoordinatorUnavailableError:
        return CoordinatorUnavailableError(operation, request_id, exc)


def _is_cluster(client: Any) -> bool:
    return type(client).__name__ == "RedisCluster"


class SyncShell(_ShellBase):
    def __init__(
        self, client: Any, policy: RetryPolicy | None = None, *, durability: str = "primary", wait_timeout_ms: int = 1000
    ) -> None:
        super().__init__(client, policy, durability, wait_timeout_ms)

    def _send(self, batch: list[Call]) -> list[Any]:
        pipe = self.client.pipeline(transaction=False)
        for call in batch:
            pipe.execute_command(*_args(call))
        return list(pipe.execute(raise_on_error=False))

    def _load(self, batch: list[Call], indexes: list[int]) -> None:
        for source in {batch[i].script.source for i in indexes}:  # type: ignore[union-attr]
            self.client.script_load(source)

    def execute(self, batch: list[Call]) -> list[Any]:
        full = self._with_wait(batch)
        replies = self._send(full)
        missing = _missing_scripts(full, replies)
        if missing:
            self._load(full, missing)
            for i, reply in zip(missing, self._send([full[i] for i in missing]), strict=True):
                replies[i] = reply
            if len(full) > len(batch):  # WAIT must follow the re-sent writes
                replies[-1] = self._send([full[-1]])[0]
        transient = _first_transient(replies)
        if transient is not None:
            raise transient
        return self._check_wait(batch, replies)

    def _execute_retrying(self, batch: list[Call]) -> list[Any]:
        if not _retry_safe(batch):
            return self.execute(batch)
        for attempt in Retrying(**self.policy.tenacity_kwargs()):
            with attempt:
                return self.execute(batch)
        raise AssertionError("unreachable")  # pragma: no cover

    def run(self, op: Operation[T], operation: str, request_id: str | None = None) -> T:
        try:
            return drive(op, self._execute_retrying)
        except Exception as exc:
            if is_transient(exc):
                raise self._unavailable(exc, operation, request_id) from exc
            raise


class AsyncShell(_ShellBase):
    def __init__(
        self, client: Any, policy: RetryPolicy | None = None, *, durability: str = "primary", wait_timeout_ms: int = 1000
    ) -> None:
        super().__init__(client, policy, durability, wait_timeout_ms)

    async def _send(self, batch: list[Call]) -> list[Any]:
        if len(batch) == 1:  # the hot path: skip the pipeline object
            try:
                return [await self.client.execute_command(*_args(batch[0]))]
            except rex.ResponseError as exc:
                return [exc]
        pipe = self.client.pipeline(transaction=False)
        for call in batch:
            pipe.execute_command(*_args(call))
        return list(await pipe.execute(raise_on_error=False))

    async def _load(self, batch: list[Call], indexes: list[int]) -> None:
        for source in {batch[i].script.source for i in indexes}:  # type: ignore[union-attr]
            await self.client.script_load(source)

    async def execute(self, batch: list[Call]) -> list[Any]:
        full = self._with_wait(batch)
        replies = await self._send(full)
        missing = _missing_scripts(full, replies)
        if missing:
            await self._load(full, missing)
            for i, reply in zip(missing, await self._send([full[i] for i in missing]), strict=True):
                replies[i] = reply
            if len(full) > len(batch):
                replies[-1] = (await self._send([full[-1]]))[0]
        transient = _first_transient(replies)
        if transient is not None:
            raise transient
        return self._check_wait(batch, replies)

    async def _execute_retrying(self, batch: list[Call]) -> list[Any]:
        if not _retry_safe(batch):
            return await self.execute(batch)
        async for attempt in AsyncRetrying(**self.policy.tenacity_kwargs()):
            with attempt:
                return await self.execute(batch)
        raise AssertionError("unreachable")  # pragma: no cover

    async def run(self, op: Operation[T], operation: str, request_id: str | None = None) -> T:
        try:
            return await adrive(op, self._execute_retrying)
        except Exception as exc:
            if is_transient(exc):
                raise self._unavailable(exc, operation, request_id) from exc
            raise

    async def run_batch(self, batch: list[Call], operation: str = "append") -> list[Any]:
        """Execute one batch with retries (for callers that multiplex operations)."""
        try:
            return await self._execute_retrying(batch)
        except Exception as exc:
            if is_transient(exc):
                raise self._unavailable(exc, operation, None) from exc
            raise


def drive(op: Operation[T], execute: Callable[[list[Call]], list[Any]]) -> T:
    """Run an operation to its end; I/O errors are thrown into it so it may handle them."""
    try:
        batch = next(op)
        while True:
            try:
                replies = execute(batch)
            except Exception as exc:
                batch = op.throw(exc)
            else:
                batch = op.send(replies)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]


async def adrive(op: Operation[T], execute: Callable[[list[Call]], Any]) -> T:
    try:
        batch = next(op)
        while True:
            try:
                replies = await execute(batch)
            except Exception as exc:
                batch = op.throw(exc)
            else:
                batch = op.send(replies)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
