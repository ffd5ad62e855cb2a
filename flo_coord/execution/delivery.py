"""Resumable delivery: any replica can serve ``follow(request_id, offset)``.

The committed answer is the request's text key; a follower reads it from its offset
(``manager.follow_read``), then blocks on the request's notification feed (a stream in
the same hash slot; ``manager.wait_feed``, store/feed.py) until the next commit or the
end marker. FOLLOW_READ returns the feed's last id atomically with the text, so a
commit that lands between the read and the wait is never missed.
Followers see only committed text: exactly what Redis acknowledged, once, in order.

Cancellation: a Redis call can return normally although the task awaiting it was
cancelled meanwhile (the CancelledError is absorbed on its way through the client), so
the loop checks ``cancel_point()`` after every awaited call and stops at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Callable
from typing import TYPE_CHECKING

from flo_coord import defaults
from flo_coord.errors import CorruptStateError, RequestCancelledError, RequestFailedError, UnknownRequestError
from flo_coord.store import validation

if TYPE_CHECKING:
    from flo_coord.models import RequestOutcome
    from flo_coord.store import AsyncFailoverManager


def cancel_point() -> None:
    """Raise CancelledError if this task was asked to stop (checked after each awaited call)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def follow(
    manager: AsyncFailoverManager,
    request_id: str,
    offset: int = 0,
    *,
    wait: float = 0.0,
    poll: float = defaults.FOLLOW_POLL,
    on_outcome: Callable[[RequestOutcome], None] | None = None,
) -> AsyncGenerator[str, None]:
    """Yield the answer from character ``offset`` on, as it is committed, until it ends.

    ``offset``: characters to skip; ``wait``: seconds (finite, >= 0) to wait for a submitted
    request to be taken by a worker; ``poll``: seconds (0.001 or more) each feed read blocks;
    ``on_outcome`` gets the RequestOutcome read together with the end of the text
    (finish_reason, usage). Raises ValidationError for bad arguments (before any Redis
    call), UnknownRequestError for a request that does not exist (after ``wait``),
    RequestFailedError (with the worker's reason) when the request ended in failure,
    CorruptStateError when its stored text is not UTF-8. Stops promptly when its task is
    cancelled.
    """
    rid = validation.request_id(request_id, manager.limits)
    skip = validation.offset(offset)
    wait = validation.seconds("wait", wait)
    poll = validation.positive_seconds("poll", poll)
    position = 0  # bytes of committed text already read (always at a chunk boundary)
    block_ms = max(1, int(poll * 1000))
    give_up_at = time.monotonic() + wait
    while True:
        read = await manager.follow_read(rid, position)
        cancel_point()
        if read is None:
            if time.monotonic() < give_up_at:
                await asyncio.sleep(0.05)
                continue
            raise UnknownRequestError(rid)
        last_id, data, outcome = read
        position += len(data)
        try:
            chunk = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CorruptStateError(rid, f"committed text is not UTF-8 ({exc})") from None
        if skip:
            chunk, skip = chunk[skip:], max(0, skip - len(chunk))
        if chunk:
            yield chunk
        if outcome is not None:
            if on_outcome is not None:
                on_outcome(outcome)
            if outcome.state == "Failed":
                failed = RequestCancelledError if outcome.error_kind == "Cancelled" else RequestFailedError
                raise failed(rid, f"request {rid!r} failed: {outcome.error}")
            return
        await manager.wait_feed(rid, last_id, block_ms)
        cancel_point()
