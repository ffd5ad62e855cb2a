"""``python -m flo_coord``: the flo-coord command."""

from flo_coord.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
