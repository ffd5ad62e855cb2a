"""Operator setup: ``flo-coord install-functions`` loads the Redis Functions library."""

from __future__ import annotations

import json
from typing import Any

from flo_coord.cli.common import check_redis, load


def cmd_install_functions(args: Any) -> int:
    """Load flo_coord's Functions library (every primary of a Cluster) with an admin credential.

    Workers with the least-privilege ACL may only FCALL it (docs/OPERATING.md). Prints the
    library loaded, with --prune the libraries of other versions deleted, and the
    ``+fcall|<function>`` rules of the client ACL for this version.
    """
    from flo_coord.store import client_fcall_rules, connect, install_functions

    settings = load(args)
    check_redis(settings.redis.url)
    client = connect(settings.redis.url)
    try:
        name, removed = install_functions(client, prune=args.prune)
    finally:
        client.close()
    rules = " ".join(client_fcall_rules())
    if args.json:
        print(json.dumps({"library": name, "removed": removed, "client_fcall_rules": rules}))
    else:
        print(f"loaded Redis Functions library {name}" + (f"; removed {', '.join(removed)}" if removed else ""))
        print(f"FCALL rules of the submit-and-follow client ACL (docs/OPERATING.md): {rules}")
    return 0
