"""``flo-coord import-litellm``: print the flo_coord TOML equivalent of a LiteLLM config.yaml."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path
from typing import Any

from flo_coord.cli.common import UsageError


def cmd_import_litellm(args: Any) -> int:
    """Translate ``args.config_yaml``; the TOML goes to stdout, each untranslated key to stderr.

    The TOML is loaded back (flo_coord's own validation) before it is printed, so what is
    printed always loads. Exit 0 (2 for an unreadable file, a non-LiteLLM file, missing PyYAML).
    """
    try:
        import yaml
    except ImportError:
        raise UsageError("import-litellm needs PyYAML: pip install 'flo-coord[litellm]' (or pyyaml)") from None
    import msgspec

    from flo_coord.cli.litellm_import import translate
    from flo_coord.settings import Settings

    path = Path(args.config_yaml)
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise UsageError(f"{path} is not readable YAML: {exc}") from None
    result = translate(config)
    try:
        msgspec.convert(tomllib.loads(result.toml), Settings, strict=False)
    except (msgspec.ValidationError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"the translation of {path} does not load ({exc}); fix the LiteLLM entries named") from None
    sys.stdout.write(result.toml)
    for item in result.skipped:
        print(f"flo-coord import-litellm: not translated: {item}", file=sys.stderr)
    return 0
