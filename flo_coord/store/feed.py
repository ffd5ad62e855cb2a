"""The follower's wait: block on a request's notification feed until the next commit.

The feed (``RequestKeys.feed``) is a stream in the request's hash slot that every commit
and the end marker add to; FOLLOW_READ (store/core.py, ``FailoverCore.follow_read``)
returns its last id atomically with the text, so a commit that lands between the read
and this wait is never missed. One plain XREAD BLOCK: a read, no script.
"""

from __future__ import annotations

from flo_coord.store.core import Cmd, Operation, ok


def wait_feed(feed: str, last_id: str, block_ms: int) -> Operation[None]:
    """Block up to ``block_ms`` ms until ``feed`` has an entry after ``last_id``."""
    (reply,) = yield [Cmd(("XREAD", "BLOCK", block_ms, "COUNT", 1, "STREAMS", feed, last_id))]
    ok(reply)
