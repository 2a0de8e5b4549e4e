#!/usr/bin/env python3
"""The gateway's IPsec SAs as charon lists them, for ``tunnelnat tunnels`` (ShowTunnels).

    tunnelnat-gateway show [--tunnel NAME] [--swanctl-uri URI] [--config-dir D]

Read-only: ``swanctl --list-sas --raw`` (parsed by the health agent's parser) and charon's log
(ConfigureGateway's ``<tunnel>.json`` names it). Prints one JSON line per IKE SA
(``"kind": "ike"``), per CHILD_SA (``"child"``) and per configured tunnel
(``"tunnel"``: its CHILD_SA names, the last rekey of each and why it is down, from charon's log),
or an ``"error"`` line when charon does not answer. One line per SA, so that SSM's 24,000-character
cut of a command's output loses whole SAs, never the meaning of the others. Times are seconds,
counted on the gateway (``time`` on every tunnel line): no clock skew between it and the
operator's machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from tunnelnat_gateway import health as agent  # noqa: E402

DOCUMENT = "ShowTunnels"  # the document that runs this verb, the prefix of its errors
# charon's line for a finished rekey (both sides): the new SA's outbound half is installed.
_REKEYED = re.compile(
    r"^(\d+) \d+\[\w+\] <([^|>]*)\|?\d*> outbound CHILD_SA (\S+?)\{\d+\} established", re.M
)


def _number(info: dict[str, Any], key: str) -> int | None:
    value = info.get(key)
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value):
        return int(value)
    return None


def proposal(info: dict[str, Any]) -> str:
    """``AES_CBC-256/HMAC_SHA2_256_128/PRF_HMAC_SHA2_256/MODP_2048`` from vici's keys (an ESP
    proposal has no PRF; a DH group only with PFS)."""
    encr = info.get("encr-alg", "?")
    if info.get("encr-keysize"):
        encr += f"-{info['encr-keysize']}"
    parts = [encr] + [str(info[k]) for k in ("integ-alg", "prf-alg", "dh-group") if info.get(k)]
    return "/".join(parts)


def ike_line(ike: agent.IkeSa) -> dict[str, Any]:
    info = ike.info
    return {
        "kind": "ike",
        "ike": ike.name,
        "id": info.get("uniqueid"),
        "state": ike.state,
        "local": info.get("local-host"),
        "remote": info.get("remote-host"),
        "remote_id": info.get("remote-id"),
        "proposal": proposal(info),
        "established": _number(info, "established"),
        "rekey_in": _number(info, "rekey-time"),
    }


def child_line(ike: agent.IkeSa, child: agent.ChildSa) -> dict[str, Any]:
    info = child.info
    return {
        "kind": "child",
        "ike": ike.name,
        "child": child.name,
        "id": info.get("uniqueid"),
        "state": child.state,
        "proposal": proposal(info),
        "local_ts": info.get("local-ts", []),
        "remote_ts": info.get("remote-ts", []),
        "age": _number(info, "install-time"),
        "rekey_in": _number(info, "rekey-time"),
        "expires_in": _number(info, "life-time"),
        "bytes_in": _number(info, "bytes-in"),
        "bytes_out": _number(info, "bytes-out"),
        "packets_in": _number(info, "packets-in"),
        "packets_out": _number(info, "packets-out"),
        "idle_in": _number(info, "use-in"),
    }


def tunnel_line(tunnel: str, facts: dict[str, Any], now: float) -> dict[str, Any]:
    """The tunnel's CHILD_SA names and, from the tail of charon's log, the last rekey of each and
    the health agent's one-line diagnosis (None: no failure since the last success)."""
    log = agent.read_log_tail(facts.get("log"), size=1 << 20)
    last: dict[str, int] = {}
    for m in _REKEYED.finditer(log):
        if m[2] == tunnel:
            last[m[3]] = int(m[1])
    done, failed = agent.rekey_counts(log).get(tunnel, [0, 0])
    return {
        "kind": "tunnel",
        "tunnel": tunnel,
        "time": round(now, 3),
        "children": [str(c) for c in facts.get("children", [])] or [tunnel],
        "last_rekey_ago": {child: max(0, int(now - at)) for child, at in sorted(last.items())},
        "rekeys_in_log": done,
        "failed_rekeys_in_log": failed,
        "log": facts.get("log"),
        "diagnosis": agent.diagnose(log, tunnel, facts, now),
    }


def listing(
    reading: agent.SaReading, tunnels: dict[str, dict[str, Any]], now: float
) -> list[dict[str, Any]]:
    """Every line ShowTunnels prints, for ``tunnels`` (name -> ConfigureGateway's facts)."""
    lines = [tunnel_line(name, facts, now) for name, facts in sorted(tunnels.items())]
    if not reading.ok:
        return [*lines, {"kind": "error", "error": f"charon: {reading.error}"}]
    for ike in reading.sas:
        # A tunnel's SAs are its connection's IKE SAs (vici names them after it): never another
        # connection's CHILD_SA that happens to share a name with one of ours (tunnel x-2's
        # child x-2 beside tunnel x's per-pair x-2, issue 23).
        if tunnels and ike.name not in tunnels:
            continue
        lines.append(ike_line(ike))
        lines.extend(child_line(ike, c) for c in ike.children)
    return lines


def configured_tunnels(config_dir: Path, only: str | None) -> dict[str, dict[str, Any]]:
    """ConfigureGateway's ``<tunnel>.json`` files (every tunnel, or ``only``)."""
    found = {}
    for path in sorted(config_dir.glob("*.json")):
        if agent.TUNNEL_NAME.fullmatch(path.stem) and only in (None, path.stem):
            found[path.stem] = agent.read_tunnel_facts(config_dir, path.stem)
    if only and only not in found:
        found[only] = {}
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tunnel", help="only this tunnel (default: every tunnel)")
    parser.add_argument("--swanctl-uri", help="charon's vici socket (default: swanctl's)")
    parser.add_argument(
        "--config-dir",
        type=Path,
        default=Path(os.environ.get("TUNNELNAT_TUNNELS_DIR") or agent.CONFIG_DIR),
        help="ConfigureGateway's <tunnel>.json files",
    )
    args = parser.parse_args(argv)
    if args.tunnel is not None and not agent.TUNNEL_NAME.fullmatch(args.tunnel):
        parser.error(f"invalid tunnel name {args.tunnel!r}")
    # What ShowTunnels said before the listing: without swanctl there is nothing to ask.
    if shutil.which("swanctl") is None:
        print(f"{DOCUMENT}: swanctl is not installed", file=sys.stderr)
        return 1
    now = time.time()
    try:
        reading = agent.read_sas(uri=args.swanctl_uri)
        lines = listing(reading, configured_tunnels(args.config_dir, args.tunnel), now)
    except Exception as exc:  # noqa: BLE001 - one line saying why, not a traceback
        print(f"{DOCUMENT}: the listing failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    for line in lines:
        print(json.dumps(line, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
