"""docs/CLI.md cannot drift: its flag, environment and fault tables are what the code produces now."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from flo_coord.cli import main
from flo_coord.cli.reference import ENV_MEANING, environment, fault_grammar, rewrite
from flo_coord.testing import fakellm

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "CLI.md"


def test_docs_cli_md_is_what_the_generator_produces() -> None:
    text = DOC.read_text(encoding="utf-8")
    assert rewrite(text) == text, "docs/CLI.md is out of date: run python scripts/gen_cli_docs.py"


def test_the_generator_script_checks_and_rewrites() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_cli_docs.py"), "--check"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0 and "up to date" in done.stdout, done.stderr


def test_a_changed_flag_makes_the_docs_out_of_date() -> None:
    text = DOC.read_text(encoding="utf-8")
    tampered = text.replace("`--keep-logs`", "`--keep-the-logs`", 1)
    assert tampered != text and rewrite(tampered) == text  # regenerating undoes a hand edit of a generated table


def test_flags_the_old_docs_missed_are_documented() -> None:
    text = DOC.read_text(encoding="utf-8")
    sections = dict(re.findall(r"### `flo-coord ([\w-]+)`\n(.*?)(?=\n### |\n<!-- END)", text, re.S))
    missed = {
        "demo": ["--timeout S", "--keep-logs", "--namespace NS"],
        "worker": ["--metrics-addr ADDR", "--exit-with-parent"],
        "submit": ["--wait S", "--timeout S", "--message ROLE=TEXT", "--messages-file FILE"],
        "follow": ["--wait S", "--timeout S", "--offset N"],
        "inspect": ["--full", "--json"],
        "top": ["--interval S", "--limit N", "--json"],
        "reap": ["--worker-id ID", "--lease-ttl S", "--limit N", "--json"],
        "serve-fake-llm": ["--model-delay MODEL=S"],
    }
    for command, flags in missed.items():
        for flag in flags:
            assert f"`{flag}`" in sections[command], (command, flag)
    assert "--version" in text and "<host>-<pid>-<random>" in sections["worker"]


def _code_env_vars() -> set[str]:
    names: set[str] = set()
    for path in (ROOT / "flo_coord").rglob("*.py"):
        names.update(re.findall(r"""["'](FLO_[A-Z][A-Z0-9_]*)["']""", path.read_text(encoding="utf-8")))
    return names


def test_every_environment_variable_the_code_reads_is_documented() -> None:
    documented = environment()
    code = _code_env_vars()
    assert {"FLO_REDIS_SERVER", "FLO_REDIS_CLI", "FLO_REDIS_URL", "FLO_CONFIG"} <= code
    missing = code - set(documented)
    assert not missing, f"add these to flo_coord.cli.reference.ENV_MEANING (and regenerate): {missing}"
    assert set(documented) <= set(ENV_MEANING), "every variable needs a meaning"
    text = DOC.read_text(encoding="utf-8")
    assert all(f"| `{name}` |" in text for name in documented)


def _example(spec: str) -> str:
    """A concrete SPEC for a documented grammar line: optional parts kept, placeholders filled in."""
    concrete = spec.replace("[", "").replace("]", "")
    words = (("REASON", "abort"), ("DIALECT", "event"), ("KIND", "server"))  # before K and N, which they contain
    for placeholder, value in (*words, ("SECONDS", "0.5"), ("STATUS", "502"), ("K", "3"), ("N", "2")):
        concrete = concrete.replace(placeholder, value)
    return concrete


def test_every_documented_fault_parses_and_every_fault_kind_is_documented() -> None:
    grammar = fault_grammar()
    assert len(grammar) >= 13
    for spec, _ in grammar:
        bare = re.split(r"[:\[]", spec, maxsplit=1)[0]
        all_optional = spec.startswith(f"{bare}[")  # every argument optional: the bare kind parses too
        assert fakellm.parse_fault(bare if all_optional else _example(spec)).kind == bare
        assert fakellm.parse_fault(_example(spec)).kind == bare, spec
    documented = {re.split(r"[:\[]", spec, maxsplit=1)[0] for spec, _ in grammar}
    kinds = set(fakellm.KINDS)  # each kind a row of its own (a merged row would hide one)
    assert kinds <= documented, kinds - documented
    text = DOC.read_text(encoding="utf-8")
    assert all(f"| `{spec}` |" in text for spec, _ in grammar)


@pytest.mark.parametrize("value", ["m=explode", "m=cut", "m=stall:3"])
def test_a_bad_fault_lists_every_valid_spec(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve-fake-llm", "--fault", value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "flo-coord serve-fake-llm: error:" in err[0]
    assert all(spec in err[0] for spec, _ in fault_grammar()), err[0]
