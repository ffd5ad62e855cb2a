"""The reference tables of docs/CLI.md, generated from the code so they cannot drift.

* every subcommand's flags come from the argparse parser (``build_parser``);
* every ``FLO_*`` environment variable comes from the registries that read them (``settings.ENVIRONMENT``,
  ``settings.CONFIG_ENV``, ``settings.CLI_ENVIRONMENT``, ``embedded.REDIS_SERVER_ENV``/``REDIS_CLI_ENV``), with
  the flags that set the same thing found in the parser's help texts;
* the fake LLM's fault grammar comes from ``flo_coord.testing.fakellm``'s module docstring, the one place it is written.

``scripts/gen_cli_docs.py`` rewrites the marked sections of docs/CLI.md with :func:`rewrite`;
tests/test_cli_docs.py fails when the file differs from what this module produces.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator

BEGIN = "<!-- BEGIN GENERATED: {name} (scripts/gen_cli_docs.py; do not edit by hand) -->"
END = "<!-- END GENERATED: {name} -->"

#: What each environment variable means (the flag, TOML key and default are found elsewhere).
ENV_MEANING = {
    "FLO_CONFIG": "the TOML settings file, when no `--config` is given",
    "FLO_REDIS_URL": "Redis URL (default `redis://localhost:6379/0`); also the default of the Python API",
    "FLO_NAMESPACE": "key prefix that isolates deployments (default `flo`)",
    "FLO_DURABILITY": "write durability: `primary` (default), or wait for replicas/AOF (see `flo_coord/settings.py`)",
    "FLO_LEASE_TTL": "lease of a request in seconds (default 5)",
    "FLO_WORKER_ID": "unique id of a worker replica (default `<host>-<pid>-<random>`)",
    "FLO_CONCURRENCY": "requests a worker runs at once (default 64)",
    "FLO_METRICS_PORT": "port of a worker's Prometheus `/metrics` (default off)",
    "FLO_LOG_FORMAT": "`kv` (default) or `json` log lines",
    "FLO_LOG_LEVEL": "`debug`, `info`, `warning`, `error` (default `info` for a worker, `warning` otherwise)",
    "FLO_REDIS_SERVER": "the `redis-server` binary (path or name) the demo, benchmark and tests start; "
    "default: `redis-server` on `PATH`; when none exists, the demo uses the in-process fake Redis",
    "FLO_REDIS_CLI": "the `redis-cli` binary (path or name; default: on `PATH`, else beside `redis-server`)",
    "FLO_GATEWAY_HOST": "address `flo-coord serve` listens on (default `127.0.0.1`)",
    "FLO_GATEWAY_PORT": "port `flo-coord serve` listens on (default 8080)",
}


def environment() -> dict[str, str]:
    """Every ``FLO_*`` variable the code reads -> where it lands (a TOML key, or what reads it)."""
    from flo_coord import settings
    from flo_coord.testing import embedded

    out = {settings.CONFIG_ENV: "-"}
    out.update({name: f"`[{section}] {key}`" for name, (section, key) in settings.ENVIRONMENT.items()})
    out.update({name: "-" for name in settings.CLI_ENVIRONMENT.values()})
    out.update({embedded.REDIS_SERVER_ENV: "-", embedded.REDIS_CLI_ENV: "-"})
    # a variable read elsewhere (e.g. by a newer command) is listed once it is described in ENV_MEANING
    out.update({name: "-" for name in ENV_MEANING if name not in out})
    return out


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _flag_name(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.metavar or action.dest}`"
    names = ", ".join(action.option_strings)
    if action.nargs == 0:
        return f"`{names}`"
    metavar = action.metavar or (
        "{" + ",".join(map(str, action.choices)) + "}" if action.choices else action.dest.upper()
    )
    return f"`{names} {metavar}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _default(action: argparse.Action) -> str:
    if not action.option_strings or action.nargs == 0 or action.default in (None, [], argparse.SUPPRESS):
        return ""
    return f"`{action.default:g}`" if isinstance(action.default, float) else f"`{action.default}`"


def _actions(parser: argparse.ArgumentParser) -> Iterator[argparse.Action]:
    for action in parser._actions:
        if (
            not isinstance(action, argparse._HelpAction | argparse._SubParsersAction)
            and action.help != argparse.SUPPRESS
        ):
            yield action


def flags_section(parser: argparse.ArgumentParser) -> str:
    """One table of arguments per subcommand, in the parser's order (``--help`` and ``--version`` first)."""
    lines = [
        "Every command also takes `-h, --help`. `flo-coord --version` prints the version.",
    ]
    for name, sub in _subparsers(parser).items():
        lines += ["", f"### `flo-coord {name}`", "", _cell(sub.description or ""), ""]
        rows = [(_flag_name(a), _default(a), _cell(a.help or "")) for a in _actions(sub)]
        if not rows:
            lines.append("No arguments.")
            continue
        lines += ["| Argument | Default | Meaning |", "| --- | --- | --- |"]
        lines += [f"| {flag} | {default} | {meaning} |" for flag, default, meaning in rows]
    return "\n".join(lines)


def _flags_for(parser: argparse.ArgumentParser, variable: str) -> list[str]:
    """``command --flag`` for every flag whose help names ``variable`` (e.g. "env FLO_LEASE_TTL")."""
    pattern = re.compile(rf"\b{re.escape(variable)}\b")
    found: dict[str, list[str]] = {}
    for name, sub in _subparsers(parser).items():
        for action in _actions(sub):
            if action.option_strings and pattern.search(action.help or ""):
                found.setdefault(action.option_strings[-1], []).append(name)
    return [f"`{flag}` ({', '.join(commands)})" for flag, commands in found.items()]


def environment_section(parser: argparse.ArgumentParser) -> str:
    """The table of every ``FLO_*`` variable: the flags that override it, its TOML key, what it means."""
    lines = ["| Variable | Overridden by | TOML | Meaning |", "| --- | --- | --- | --- |"]
    for variable, toml in environment().items():
        flags = "; ".join(_flags_for(parser, variable)) or "-"
        lines.append(f"| `{variable}` | {flags} | {toml} | {ENV_MEANING.get(variable, 'UNDOCUMENTED')} |")
    return "\n".join(lines)


def fault_grammar() -> list[tuple[str, str]]:
    """``(SPEC, meaning)`` for every fault the fake LLM documents in its module docstring (the one source)."""
    from flo_coord.testing import fakellm
    doc = fakellm.__doc__ or ""
    block = doc.split("Fault syntax", 1)[1] if "Fault syntax" in doc else ""
    out: list[tuple[str, str]] = []
    for line in block.splitlines():
        if line.startswith("    ") and line.strip():
            spec, _, meaning = line.strip().partition("  ")
            if meaning.strip():
                out.append((spec, meaning.strip()))
            elif out:  # a continuation line
                out[-1] = (out[-1][0], f"{out[-1][1]} {spec}")
        elif line.strip() and out:
            break  # the paragraph after the list
    return out


def fault_intro() -> str:
    """The sentence(s) of the docstring that introduce the grammar (``kind[:args][*times]`` ...)."""
    from flo_coord.testing import fakellm
    doc = fakellm.__doc__ or ""
    block = doc.split("Fault syntax", 1)[1] if "Fault syntax" in doc else ""
    return _cell("Fault syntax" + block.split("\n\n", 1)[0]).replace("``", "`") if block else ""


def fault_section() -> str:
    """The fault grammar as a table (from ``flo_coord.testing.fakellm``'s docstring)."""
    lines = [
        "`serve-fake-llm --fault MODEL=SPEC` (repeatable; `MODEL` may be `*`); the same SPECs work at runtime with "
        "`POST /_faults` and per request with the `X-Fake-Fault` header. " + fault_intro(),
        "",
        "| SPEC | What the fake LLM does |",
        "| --- | --- |",
    ]
    lines += [f"| `{spec}` | {_cell(meaning).replace('``', '`')} |" for spec, meaning in fault_grammar()]
    return "\n".join(lines)


def sections() -> dict[str, str]:
    from flo_coord.cli.parser import build_parser

    parser = build_parser()
    return {"flags": flags_section(parser), "environment": environment_section(parser), "faults": fault_section()}


def rewrite(text: str) -> str:
    """``text`` (docs/CLI.md) with every marked section replaced by what the code produces now.

    Raises ValueError when a section's markers are missing.
    """
    for name, body in sections().items():
        begin, end = BEGIN.format(name=name), END.format(name=name)
        start, stop = text.find(begin), text.find(end)
        if start < 0 or stop < start:
            raise ValueError(f"docs/CLI.md lacks the markers of section {name!r}: {begin} ... {end}")
        text = text[: start + len(begin)] + "\n" + body + "\n" + text[stop:]
    return text
