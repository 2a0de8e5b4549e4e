"""``tunnelnat-gateway VERB [ARGS]``: the one entry point of the gateway's software.

Each verb names the module and function that runs it, so starting one imports only its own
modules. Every module a verb needs is imported before it does any work: an upgrade that replaces
the archive under a running verb cannot hand it a half-read module (docs/gateway-software.md).
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Callable, Sequence

# verb -> (module, function, leading arguments). The function takes an argv list.
VERBS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "boot": ("boot", "main", ("attach",)),
    "restore": ("boot", "main", ("restore-lo",)),
    "sync": ("nat_sync", "main", ("sync",)),
    "configure-gateway": ("configure_gateway", "main", ()),
    "configure-tunnel": ("tunnel", "configure_main", ()),
    "restart-tunnel": ("tunnel", "restart_main", ()),
    "remove-tunnel": ("tunnel", "remove_main", ()),
    "install-health": ("health_install", "main", ()),
    "health": ("health", "main", ()),
    "show": ("sas", "main", ()),
    "pair": ("pair", "main", ()),
    "switchover": ("switchover", "main", ()),
    "version": ("software", "main", ()),
    "activate": ("activate", "main", ()),
}

USAGE = "usage: tunnelnat-gateway {" + ",".join(VERBS) + "} [ARGS]"


def resolve(verb: str) -> Callable[[list[str]], int]:
    module, function, lead = VERBS[verb]
    target = getattr(importlib.import_module(f"tunnelnat_gateway.{module}"), function)
    return lambda argv: target([*lead, *argv])


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    verb, rest = args[0], args[1:]
    if verb not in VERBS:
        print(json.dumps({"error": f"unknown verb {verb!r}"}), file=sys.stderr)
        print(USAGE, file=sys.stderr)
        return 2
    return int(resolve(verb)(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
