"""Redis Functions: the library is the scripts registry, loaded once, with a fallback.

- The library holds one function per script of ``scripts.registry()``, including a script
  defined after import (as another module would add one), and a call of it runs through
  the shell unchanged.
- A worker loads a missing library when allowed, and only FCALLs afterwards.
- Where Redis has no FCALL (here: a real redis-server with ``FCALL`` and ``FUNCTION``
  renamed away, as on Redis < 7), the shell falls back to EVALSHA and everything works.
"""

from __future__ import annotations

import uuid

import pytest
from conftest import require_redis_server

from flo_coord import FailoverManager
from flo_coord.store import functions, scripts
from flo_coord.store.core import Eval
from flo_coord.testing.embedded import RedisServer

pytestmark = pytest.mark.timeout(120)


def test_every_registered_script_is_a_function_of_the_library() -> None:
    name, code = functions.library()
    assert name.startswith(functions.LIBRARY_PREFIX) and code.startswith(f"#!lua name={name}\n")
    for script in scripts.registry():
        assert f"redis.register_function('{functions.function_name(script)}'" in code
    assert set(scripts.ALL) <= set(scripts.registry())


def test_a_script_added_later_joins_the_library_and_runs(fresh_redis_server: RedisServer) -> None:
    before, _ = functions.library()
    extra = scripts.Script(f"extra_{uuid.uuid4().hex[:6]}", "return {KEYS[1], ARGV[1]}")
    try:
        after, code = functions.library()
        assert after != before and functions.function_name(extra) in code  # a new version, loaded beside the old
        with FailoverManager(url=fresh_redis_server.url, namespace="fx") as manager:
            reply = manager.shell.run(_one(Eval(extra, ("fx:k",), ("v",))), "extra")
            assert reply == [b"fx:k", b"v"]
            stats = fresh_redis_server.client().info("commandstats")
            assert "cmdstat_fcall" in stats and "cmdstat_evalsha" not in stats
    finally:  # other tests of this process expect the release's library
        scripts._REGISTERED.pop(extra.name)
    assert functions.library()[0] == before


def _one(call: Eval):  # type: ignore[no-untyped-def]
    (reply,) = yield [call]
    return reply


def test_without_functions_the_shell_falls_back_to_evalsha(caplog: pytest.LogCaptureFixture) -> None:
    require_redis_server()
    args = ["--rename-command", "FCALL", "", "--rename-command", "FUNCTION", ""]
    with RedisServer(extra_args=args) as server, FailoverManager(url=server.url, namespace="old") as manager:
        manager.start_tracking("r1", "prompt")
        manager.append_tokens("r1", "works ")
        manager.append_tokens("r1", "anyway")
        assert manager.get_context("r1").generated_prefix == "works anyway"  # type: ignore[union-attr]
        assert manager.complete("r1")
        stats = server.client().info("commandstats")
        assert "cmdstat_evalsha" in stats and "cmdstat_fcall" not in stats
        assert any("EVALSHA instead" in r.getMessage() for r in caplog.records)
