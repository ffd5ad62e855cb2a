"""Configuration files are strict everywhere, and flags combine with them (README "Configuration").

A typo in any section (``max_retris`` under ``[failover]``, ``cooldwn`` under ``[breaker]``,
``wieght`` in a ``[[backends]]`` entry) is a ConfigError naming the key, as an unknown
section already was: a misspelt retry or breaker setting silently left at its default is
the mistake a user most needs to hear about. Deployments given as ``--backend`` flags
replace the file's ``[[backends]]`` before the file's ``[[models]]`` are checked.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from flo_coord.errors import ConfigError
from flo_coord.settings import load_settings

BACKEND = """
[[backends]]
name = "vllm-a"
provider = "Vllm"
base_url = "http://127.0.0.1:9"
model = "m"
"""


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ("[failover]\nmax_retris = 3\n", "max_retris"),
        ("[breaker]\ncooldwn = 3\n", "cooldwn"),
        ("[executor]\nfoo = 1\n", "foo"),
        (BACKEND + "wieght = 3\n", "wieght"),
        ("[gatway]\nport = 1\n", "gatway"),
    ],
)
def test_an_unknown_key_in_any_section_is_a_config_error_naming_it(tmp_path: Path, toml: str, key: str) -> None:
    path = tmp_path / "flo.toml"
    path.write_text(toml, encoding="utf-8")
    with pytest.raises(ConfigError, match=key):
        load_settings(path, environ={})
    done = subprocess.run(
        [sys.executable, "-m", "flo_coord", "stats", "--config", str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2 and key in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_the_files_model_groups_may_name_deployments_given_as_flags(tmp_path: Path) -> None:
    from flo_coord.cli.common import load
    from flo_coord.cli.parser import build_parser

    path = tmp_path / "flo.toml"
    path.write_text('[[models]]\nname = "llama"\ndeployments = ["vllm-a", "vllm-b"]\n', encoding="utf-8")
    args = build_parser().parse_args(
        ["worker", "--config", str(path), "--backend", "vllm-a=http://127.0.0.1:9,m,,Vllm",
         "--backend", "vllm-b=http://127.0.0.1:10,m,,Vllm"]
    )  # fmt: skip
    settings = load(args)
    assert [s.name for s in settings.backends] == ["vllm-a", "vllm-b"]
    assert [e.name for e in settings.models[0].entries] == ["vllm-a", "vllm-b"]
    # a group naming a deployment that neither the file nor the flags define is still refused
    path.write_text('[[models]]\nname = "llama"\ndeployments = ["vllm-c"]\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="vllm-c"):
        load(build_parser().parse_args(["worker", "--config", str(path), "--backend", "vllm-a=http://h:1,m,,Vllm"]))


def test_the_files_backends_are_checked_even_when_flags_replace_them(tmp_path: Path) -> None:
    from flo_coord.cli.common import load
    from flo_coord.cli.parser import build_parser

    path = tmp_path / "flo.toml"
    path.write_text(BACKEND + 'modle = "typo"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="modle"):
        load(build_parser().parse_args(["worker", "--config", str(path), "--backend", "Vllm=http://h:1,m"]))
