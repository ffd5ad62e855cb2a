#!/usr/bin/env python
"""Rewrite the generated sections of docs/CLI.md from the code (flags, environment variables, fault grammar).

    python scripts/gen_cli_docs.py          # rewrite docs/CLI.md in place
    python scripts/gen_cli_docs.py --check  # exit 1 (and say so) when docs/CLI.md is out of date

The sections are marked ``<!-- BEGIN GENERATED: NAME ... -->`` / ``<!-- END GENERATED: NAME -->``; everything
outside them is hand-written. tests/test_cli_docs.py runs the check; re-run this after adding a flag, a command or
an environment variable (the latter also needs a line in ``flo_coord.cli.reference.ENV_MEANING``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flo_coord.cli.reference import rewrite

DOC = Path(__file__).resolve().parent.parent / "docs" / "CLI.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="only check; exit 1 when the file is out of date")
    args = parser.parse_args(argv)
    current = DOC.read_text(encoding="utf-8")
    wanted = rewrite(current)
    if current == wanted:
        print(f"{DOC.name} is up to date")
        return 0
    if args.check:
        print(f"{DOC.name} is out of date: run python scripts/gen_cli_docs.py", file=sys.stderr)
        return 1
    DOC.write_text(wanted, encoding="utf-8")
    print(f"rewrote the generated sections of {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
