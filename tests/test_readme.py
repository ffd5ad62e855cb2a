"""Every ```python block of README.md runs as-is, on the demo's embedded setup, and prints what it says.

A line ``print(...)  # -> TEXT`` in an example promises that this print writes ``TEXT`` (or a line starting with
it, when the comment goes on after a colon); the test checks every promise, in order, with a real redis-server and
again with the in-process fake Redis that the quick start uses when there is no binary.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require_redis_server

ROOT = Path(__file__).resolve().parent.parent
BLOCKS = re.findall(r"^```python\n(.*?)^```$", (ROOT / "README.md").read_text(encoding="utf-8"), re.S | re.M)
PROMISE = re.compile(r"print\(.*#\s*->\s*(?P<text>.+?)(?::\s.*)?$")


def promises(code: str) -> list[str]:
    return [m["text"].strip() for line in code.splitlines() if (m := PROMISE.search(line))]


def test_readme_has_examples_that_promise_output() -> None:
    assert len(BLOCKS) >= 2
    assert all(promises(code) for code in BLOCKS), "every example prints something a reader can check"


@pytest.mark.parametrize("redis", ["redis-server", "fakeredis"])
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs_and_prints_what_it_promises(index: int, redis: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLO_")}
    if redis == "redis-server":
        require_redis_server()
    else:
        env["FLO_REDIS_SERVER"] = str(tmp_path / "no-redis-server")  # as on a machine without the binary
    code = BLOCKS[index]
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=90
    )
    assert done.returncode == 0, f"README example {index + 1} failed:\n{done.stdout}\n{done.stderr}"
    lines = done.stdout.splitlines()
    expected = promises(code)
    assert len(lines) == len(expected), (lines, expected)
    for line, promise in zip(lines, expected, strict=True):
        assert line.startswith(promise), (line, promise)
