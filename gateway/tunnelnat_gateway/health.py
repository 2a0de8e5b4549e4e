#!/usr/bin/env python3
"""The gateway's health agent: is each tunnel really up, and what goes through it?

Run from a systemd timer (InstallHealthAgent installs it; docs/health.md): ``health once --help``.
Namespace ``tunnelnat/<deployment>``. Per tunnel: ``TunnelUp`` 1 when the NAT table has been
synced since boot (several partners' tunnels: that partner's maps, ``applied_<name>``), an IKE SA
of the tunnel's connection is ESTABLISHED with an INSTALLED CHILD_SA of each of its names and
the probe (if any; one tunnel only) is answered, else 0 (a dead or hung charon reads as 0, never
as nothing).
``TunnelEstablished``: up at least once since ConfigureGateway last changed the tunnel (its
``<tunnel>.config-id`` token). ``TunnelDataIn``/``Out`` (bytes since the previous run),
``SecondsSinceInbound``, ``ChildSaRekeys``/``ChildSaRekeyFailures`` (since the previous run,
from charon's log), summed over the tunnel's CHILD_SAs. Per deployment ``NatMappings``; per
gateway ``NatTablePresent`` and the guard's drops (``DroppedCleartext``, ``DroppedUnenrolled``,
``DroppedInbound``).

In a gateway pair, the standby (``--role-file``, the pair agent's) publishes no tunnel metric.
Prints one JSON line; exits 0 when published, 2 when publishing failed. The line's ``software``
says which gateway software runs this agent and, with ``--software-parameter`` (the stack's
``/tunnelnat/<deployment>/gateway-software``), whether it is the one the stack deployed.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from tunnelnat_gateway import software

# + deployment: only this deployment's gateway role may publish there (issue 21, 3).
NAMESPACE = "tunnelnat/"
NAMESPACE_RE = re.compile(r"^tunnelnat/[A-Za-z0-9_.:-]{1,64}$")
METRIC = "TunnelUp"
NFT_TABLE = "tunnelnat"
COUNTER_METRICS = {
    "dropped_cleartext": "DroppedCleartext",
    "dropped_unenrolled": "DroppedUnenrolled",
    "dropped_inbound": "DroppedInbound",
}
ESTABLISHED_METRIC = "TunnelEstablished"
STATE_FILE = Path("/var/lib/tunnelnat/health-counters.json")
ESTABLISHED_FILE = Path("/var/lib/tunnelnat/health-established.json")
CONFIG_DIR = Path("/etc/tunnelnat/tunnels")
CONFIG_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
TUNNEL_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")
GATEWAY_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
SWANCTL_TIMEOUT = 8.0
IMDS = "http://169.254.169.254/latest"
ROLE_FILE = Path("/run/tunnelnat/pair-role")  # tunnelnat_pair.py's: active|standby; none: single

Runner = Callable[..., subprocess.CompletedProcess]


# -- swanctl --list-sas --raw ------------------------------------------------------------------


class ParseError(ValueError):
    """swanctl printed something this parser does not understand."""


@dataclass(frozen=True)
class ChildSa:
    name: str
    state: str
    info: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)  # vici's keys

    def number(self, key: str) -> int | None:
        """One of vici's counters (``bytes-in``, ``use-in``, ...); None when charon left it out."""
        value = self.info.get(key)
        return int(value) if isinstance(value, str) and value.isdigit() else None


@dataclass(frozen=True)
class IkeSa:
    name: str
    state: str
    children: tuple[ChildSa, ...] = ()
    info: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class SaReading:
    """What charon said: its SAs, or why it could not say (then every tunnel reads as down)."""

    sas: tuple[IkeSa, ...] = ()
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


_TOKEN = re.compile(
    r"""\s*(?:
        (?P<close>\})
      | (?P<section>[^\s={}\[\]]+)\s\{
      | (?P<lkey>[^\s={}\[\]]+)=\[(?P<list>[^\]]*)\]
      | (?P<key>[^\s={}\[\]]+)=(?P<value>[^\s{}]*)
    )""",
    re.VERBOSE,
)


def parse_vici_raw(body: str) -> dict[str, Any]:
    """One vici message as swanctl --raw prints it (``k=v``, ``k=[a b]``, ``name {...}``)."""
    root: dict[str, Any] = {}
    stack = [root]
    pos = 0
    body = body.strip()
    while pos < len(body):
        m = _TOKEN.match(body, pos)
        if not m or m.end() == pos:
            raise ParseError(f"unexpected text at {pos}: {body[pos : pos + 40]!r}")
        pos = m.end()
        if m["close"]:
            if len(stack) == 1:
                raise ParseError("unbalanced '}'")
            stack.pop()
        elif m["section"]:
            child: dict[str, Any] = {}
            stack[-1][m["section"]] = child
            stack.append(child)
        elif m["lkey"]:
            stack[-1][m["lkey"]] = m["list"].split()
        else:
            stack[-1][m["key"]] = m["value"]
        while pos < len(body) and body[pos].isspace():
            pos += 1
    if len(stack) != 1:
        raise ParseError("unbalanced '{'")
    return root


def parse_list_sas_raw(text: str) -> tuple[IkeSa, ...]:
    """Every IKE SA (with its child SAs) in ``swanctl --list-sas --raw`` output."""
    sas: list[IkeSa] = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("list-sas reply"):
            continue
        prefix = "list-sa event "
        if not line.startswith(prefix):
            raise ParseError(f"unexpected line: {line[:60]!r}")
        body = line[len(prefix) :].strip()
        if not (body.startswith("{") and body.endswith("}")):
            raise ParseError(f"list-sa event without a message: {line[:60]!r}")
        for ike_name, ike in parse_vici_raw(body[1:-1]).items():
            if not isinstance(ike, dict):
                raise ParseError(f"IKE SA {ike_name} is not a section")
            children = []
            child_sas = ike.get("child-sas", {})
            if not isinstance(child_sas, dict):
                raise ParseError(f"IKE SA {ike_name}: child-sas is not a section")
            for key, child in child_sas.items():
                if not isinstance(child, dict):
                    raise ParseError(f"child SA {key} is not a section")
                name, state = str(child.get("name", key)), str(child.get("state", ""))
                children.append(ChildSa(name, state, child))
            sas.append(IkeSa(ike_name, str(ike.get("state", "")), tuple(children), ike))
    return tuple(sas)


def read_sas(
    *, uri: str | None = None, run: Runner = subprocess.run, timeout: float = SWANCTL_TIMEOUT
) -> SaReading:
    """Ask charon for its SAs. Never raises: a failure is a reading with ``error`` set."""
    argv = ["swanctl", "--list-sas", "--raw", "--noblock"]
    if uri:
        argv += ["--uri", uri]
    try:
        proc = run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError:
        return SaReading(error="swanctl is not installed")
    except subprocess.TimeoutExpired:
        return SaReading(error=f"swanctl did not answer within {timeout:.0f}s (charon hung?)")
    except OSError as exc:
        return SaReading(error=f"cannot run swanctl: {exc}")
    if proc.returncode != 0:
        return SaReading(error=f"swanctl exited {proc.returncode}: {_last_line(proc.stderr)}")
    try:
        return SaReading(sas=parse_list_sas_raw(proc.stdout))
    except ParseError as exc:
        return SaReading(error=f"unreadable swanctl output: {exc}")


def _last_line(text: str) -> str:
    # swanctl prints plugin noise first and its usage after the reason: pick the "Error:" line.
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    for line in lines:
        if line.startswith("Error:"):
            return line
    return lines[-1] if lines else "no message"


# -- the verdict -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    host: ipaddress.IPv4Address
    port: int
    source: ipaddress.IPv4Address | None = None

    @classmethod
    def parse(cls, spec: str, source: str | None = None) -> Probe:
        host, sep, port = spec.rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"probe must be ADDRESS:PORT, not {spec!r}")
        return cls(
            ipaddress.IPv4Address(host),
            int(port),
            ipaddress.IPv4Address(source) if source else None,
        )


@dataclass(frozen=True)
class TunnelStatus:
    tunnel: str
    up: bool
    reason: str
    installed: int = 0
    probe_ok: bool | None = None
    established: bool = False  # up at least once since the tunnel's configuration last changed
    diagnosis: str | None = None  # why it is down, in charon's own words (diagnose())
    stats: TunnelStats | None = None


def sa_status(tunnel: str, reading: SaReading, children: Sequence[str] = ()) -> TunnelStatus:
    """IKE SA ESTABLISHED and at least one INSTALLED child SA of each name in ``children``
    (ConfigureGateway's list: ``tunnel`` itself, or ``tunnel-1..N`` with SelectorLayout
    per-pair, where a missing pair is a partner refusing some of our traffic).

    Only the tunnel's own IKE SAs count (vici names an IKE SA after its connection, the
    tunnel): a CHILD_SA's name is unique only within its connection, and with several partners
    tunnel ``x-2``'s child ``x-2`` is another tunnel's than tunnel ``x``'s per-pair ``x-2``."""
    if not reading.ok:
        return TunnelStatus(tunnel, False, f"charon: {reading.error}")
    per_child = dict.fromkeys(children or [tunnel], 0)
    ike_states = []
    for ike in reading.sas:
        if ike.name != tunnel:
            continue
        if ike.state == "ESTABLISHED":
            for c in ike.children:
                if c.name in per_child:
                    per_child[c.name] += c.state == "INSTALLED"
        ike_states.append(ike.state)
    installed = sum(per_child.values())
    missing = [name for name, count in per_child.items() if not count]
    if installed and not missing:
        return TunnelStatus(tunnel, True, "established, child SA installed", installed)
    if installed:
        detail = f"{len(per_child) - len(missing)} of {len(per_child)} child SAs installed"
        return TunnelStatus(
            tunnel, False, f"{detail} (missing {', '.join(missing[:5])})", installed
        )
    if not ike_states:
        return TunnelStatus(tunnel, False, "no IKE SA")
    if "ESTABLISHED" in ike_states:
        return TunnelStatus(tunnel, False, "IKE SA established, no INSTALLED child SA")
    return TunnelStatus(tunnel, False, f"IKE SA {'/'.join(sorted(set(ike_states)))}")


# -- why a tunnel is down, from charon's own log (ConfigureGateway's CharonLog) --------------

# charon's messages (strongSwan 5.9, level 1), newest deciding; {offer} is what we offer.
_CAUSES = (
    (r"received AUTHENTICATION_FAILED notify", "authentication failed: the partner refused our "
     "pre-shared key (the PSK does not match theirs, or their ID for us is not {local_id})"),
    (r"tried \d+ shared keys? for .* but MAC mismatched", "authentication failed: the partner's "
     "pre-shared key does not match ours"),
    (r"received NO_PROPOSAL_CHOSEN notify, no CHILD_SA built", "no common ESP proposal: the "
     "partner accepts none of ours (we offer {esp}){theirs}; a policy-based peer also says this "
     "for selectors it refuses (SelectorLayout per-pair)"),
    (r"received NO_PROPOSAL_CHOSEN notify error", "no common IKE proposal: the partner accepts "
     "none of ours (we offer {ike}){theirs}"),
    (r"received TS_UNACCEPTABLE notify", "traffic selectors unacceptable: the partner refused "
     "{child}'s selectors (our PublicAddresses to its networks): compare its encryption domain"),
    (r"(retransmit \d+ of request with message ID 0|peer not responding)",
     "partner not answering (retransmits to {partner}{since})"),
)  # fmt: skip
_LINE = re.compile(r"^(?P<time>\d+) \d+\[\w+\] <(?P<ike>[^|>]*)\|?(?P<id>\d*)> (?P<text>.*)$")


def diagnose(log_text: str, tunnel: str, facts: dict[str, Any], now: float) -> str | None:
    """The newest failure charon logged for ``tunnel`` since its last success, as one line;
    None when there is none. ``log_text`` is the tail of the log (``time_format = %s``)."""
    last, first_retransmit, theirs, child, partner = None, None, "", tunnel, facts.get("partner")
    # A line of an IKE SA before it has a connection (``<5>``, the responder's first messages)
    # is the tunnel's unless that IKE SA's unique id is another tunnel's elsewhere in the log
    # (``<other|5>``): several partners share charon's log.
    owner: dict[str, str] = {}
    for line in log_text.splitlines():
        m = _LINE.match(line)
        if m and m["id"]:
            owner[m["id"]] = m["ike"]
    for line in log_text.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        if m["ike"] != tunnel and not (
            m["ike"].isdigit() and owner.get(m["ike"], tunnel) == tunnel
        ):
            continue
        text = m["text"]
        if re.search(r"(CHILD_SA \S+ established with SPIs|IKE_SA \S+ established between)", text):
            last, first_retransmit, theirs = None, None, ""
            continue
        if found := re.search(r"initiating IKE_SA \S+ to (\S+)", text):
            partner = found[1]
        if found := re.search(r"establishing CHILD_SA (\S+?)\{", text):
            child = found[1]
        if found := re.search(r"received proposals: (.*)", text):
            theirs = f"; the partner offers {found[1].strip()}"
        for pattern, cause in _CAUSES:
            if re.search(pattern, text):
                last = (int(m["time"]), cause)
                if "retransmit" in cause and first_retransmit is None:
                    first_retransmit = int(m["time"])
                break
    if last is None:
        return None
    since = f" for {int(now - first_retransmit)} s" if first_retransmit else ""
    values = {"ike": facts.get("ike", "?"), "esp": facts.get("esp", "?"), "theirs": theirs}
    values |= {"child": child, "partner": partner or "the partner", "since": since}
    values["local_id"] = facts.get("local_id", "our LocalId")
    line = last[1].format(**values)
    return f"{line} [charon, {int(now - last[0])} s ago]"


def read_log_tail(path: str | None, size: int = 65536) -> str:
    if not path:
        return ""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - size))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def read_tunnel_facts(config_dir: Path, tunnel: str) -> dict[str, Any]:
    """What ConfigureGateway wrote for the tunnel (children, offer, charon's log); {} if none."""
    return _load_json(config_dir / f"{tunnel}.json")


def tcp_probe(probe: Probe, *, timeout: float = 3.0) -> tuple[bool, str]:
    """Open a TCP connection from S to the target. An answer of any kind (accept or reset)
    crossed the tunnel both ways; silence or an unreachable error did not."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        if probe.source is not None:
            sock.bind((str(probe.source), 0))
        code = sock.connect_ex((str(probe.host), probe.port))
    except OSError as exc:
        return False, f"probe {probe.host}:{probe.port}: {exc}"
    finally:
        sock.close()
    if code in (0, errno.ECONNREFUSED):
        return True, "probe answered"
    return False, f"probe {probe.host}:{probe.port}: {errno.errorcode.get(code, code)}"


def tunnel_status(
    tunnel: str,
    reading: SaReading,
    probe: Probe | None = None,
    prober: Callable[[Probe], tuple[bool, str]] = tcp_probe,
    table: TableReading | None = None,
    children: Sequence[str] = (),
) -> TunnelStatus:
    status = sa_status(tunnel, reading, children)
    if table is not None and not table.applied:
        # Whatever strongSwan says: without the synced table there is no NAT (a boot-time copy
        # may be stale), so nothing enrolled is served as it should be.
        installed = status.installed
        return TunnelStatus(
            tunnel, False, f"{table.reason}; strongSwan: {status.reason}", installed
        )
    if probe is None or not status.up:
        return status
    ok, detail = prober(probe)
    if ok:
        return TunnelStatus(tunnel, True, status.reason + ", " + detail, status.installed, True)
    return TunnelStatus(tunnel, False, detail, status.installed, False)


# -- nftables: the applied generation and the counters --------------------------------------


@dataclass(frozen=True)
class TableReading:
    """The generation the NAT table was last synced to, or why there is none."""

    generation: int | None
    reason: str = ""

    @property
    def applied(self) -> bool:
        return self.generation is not None


def parse_applied_generation(text: str) -> int | None:
    """``nft -j list set ip tunnelnat applied_generation``: its one element, None when empty."""
    data = json.loads(text)
    for entry in data.get("nftables", []):
        found = entry.get("set") if isinstance(entry, dict) else None
        if isinstance(found, dict) and found.get("name") == "applied_generation":
            elements = found.get("elem") or []
            return max(int(e) for e in elements) if elements else None
    raise ValueError("no applied_generation set in nft's answer")


def read_applied_generation(run: Runner = subprocess.run) -> TableReading:
    """Never raises: a missing table, an empty set or an unreadable answer is a reason."""
    argv = ["nft", "-j", "list", "set", "ip", NFT_TABLE, "applied_generation"]
    try:
        proc = run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return TableReading(None, f"NAT table not readable: {exc}")
    if proc.returncode != 0:
        return TableReading(None, f"NAT table ip {NFT_TABLE} missing: {_last_line(proc.stderr)}")
    try:
        generation = parse_applied_generation(proc.stdout)
    except (ValueError, KeyError, TypeError) as exc:
        return TableReading(None, f"NAT table's applied_generation unreadable: {exc}")
    if generation is None:
        return TableReading(None, "NAT table not synced since boot (applied_generation is empty)")
    return TableReading(generation)


# Several partners (issue 23, core/nat.py render_partners_table): each partner's applied state is
# the set applied_<name> (``-`` as ``_``; elements generation . checksum . count, the highest
# generation is the state, empty: that partner not applied since boot); applied_generation is
# every partner's at once (empty until all were applied). A tunnel is a partner of that name.


def nft_ident(tunnel: str) -> str:
    """A partner's name in its nft set and map names (core/nat.py's ``_ident``)."""
    return tunnel.replace("-", "_")


def read_partner_applied(tunnel: str, run: Runner = subprocess.run) -> TableReading | None:
    """The partner's own applied state (``applied_<name>``), or None when the table has no such
    set (one partner's table: applied_generation decides, as before)."""
    name = f"applied_{nft_ident(tunnel)}"
    argv = ["nft", "-j", "list", "set", "ip", NFT_TABLE, name]
    try:
        proc = run(argv, capture_output=True, text=True, timeout=10, check=False)
        if proc.returncode != 0:
            return None
        for entry in json.loads(proc.stdout).get("nftables", []):
            found = entry.get("set") if isinstance(entry, dict) else None
            if isinstance(found, dict) and found.get("name") == name:
                gens = []
                for e in found.get("elem") or []:
                    concat = e.get("concat") if isinstance(e, dict) else None
                    if isinstance(concat, list) and concat and isinstance(concat[0], int):
                        gens.append(concat[0])
                if not gens:
                    return TableReading(
                        None, f"partner {tunnel}'s NAT maps not synced since boot ({name} is empty)"
                    )
                return TableReading(max(gens))
    except (OSError, subprocess.TimeoutExpired, ValueError, TypeError, AttributeError):
        return None
    return None


def read_partner_mappings(tunnels: Sequence[str], run: Runner = subprocess.run) -> int | None:
    """Mappings of every partner's table (its ``enrolled_<name>`` set: one element per
    mapping in every NAT mode); None when no partner has one (one partner's table)."""
    total, found = 0, False
    for tunnel in tunnels:
        name = f"enrolled_{nft_ident(tunnel)}"
        argv = ["nft", "-j", "list", "set", "ip", NFT_TABLE, name]
        try:
            proc = run(argv, capture_output=True, text=True, timeout=10, check=False)
            if proc.returncode != 0:
                continue
            for entry in json.loads(proc.stdout).get("nftables", []):
                got = entry.get("set") if isinstance(entry, dict) else None
                if isinstance(got, dict) and got.get("name") == name:
                    total, found = total + len(got.get("elem") or []), True
        except (OSError, subprocess.TimeoutExpired, ValueError, TypeError, AttributeError):
            continue
    return total if found else None


def fold_counters(deltas: dict[str, int]) -> dict[str, int]:
    """The several-partner table's counters folded into the gateway's three (the alarms'):
    ``dropped_unenrolled_<name>`` and ``dropped_inbound_<name>`` summed, ``dropped_unclassified``
    (from a partner network, no partner's: today's dropped_inbound) counted as inbound. One
    partner's table has only the three: unchanged."""
    out = dict(deltas)
    for base in ("dropped_unenrolled", "dropped_inbound"):
        parts = [v for k, v in deltas.items() if k.startswith(f"{base}_")]
        if parts:
            out[base] = out.get(base, 0) + sum(parts)
    if "dropped_unclassified" in deltas:
        out["dropped_inbound"] = out.get("dropped_inbound", 0) + deltas["dropped_unclassified"]
    return out


def parse_nft_counters(text: str) -> dict[str, int]:
    """``nft -j list counters table ip tunnelnat``: counter name -> packets."""
    data = json.loads(text)
    out: dict[str, int] = {}
    for entry in data.get("nftables", []):
        counter = entry.get("counter") if isinstance(entry, dict) else None
        if isinstance(counter, dict) and counter.get("table") == NFT_TABLE:
            out[str(counter["name"])] = int(counter.get("packets", 0))
    return out


def read_counters(run: Runner = subprocess.run) -> dict[str, int] | None:
    """The guard's counters, or None when the table is missing (or nft fails)."""
    argv = ["nft", "-j", "list", "counters", "table", "ip", NFT_TABLE]
    try:
        proc = run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    try:
        return parse_nft_counters(proc.stdout)
    except (ValueError, KeyError, TypeError):
        return None


def counter_deltas(current: dict[str, int], previous: dict[str, int]) -> dict[str, int]:
    """Packets since the previous run; a counter that went backwards was reset (table reload)."""
    out = {}
    for name, value in current.items():
        before = previous.get(name)
        out[name] = value if before is None or value < before else value - before
    return out


# -- inside the tunnel: traffic, rekeys, the NAT map's size ------------------------------------


@dataclass(frozen=True)
class TunnelStats:
    """Summed over the tunnel's CHILD_SAs, since the previous run; None: unknown, unpublished."""

    bytes_in: int | None = None
    bytes_out: int | None = None
    idle_in: float | None = None
    rekeys: int | None = None
    rekey_failures: int | None = None


def tunnel_children(reading: SaReading, tunnel: str, children: Sequence[str] = ()) -> list[ChildSa]:
    """The tunnel's CHILD_SAs of those names, within its own IKE SAs only (``sa_status``)."""
    names = set(children or [tunnel])
    return [c for ike in reading.sas if ike.name == tunnel for c in ike.children if c.name in names]


def traffic(
    sas: Sequence[ChildSa], previous: dict[str, Any], last_in: float | None, now: float
) -> tuple[int, int, float | None, dict[str, list[int]]]:
    """Bytes in and out since ``previous`` (SPI -> [in, out]; a new SA counts all it has), the
    newest inbound packet's time (vici's ``use-in``, else ``last_in``), the SAs' counters."""
    seen: dict[str, list[int]] = {}
    total_in = total_out = 0
    for sa in sas:
        spi, now_in, now_out = sa.info.get("spi-in"), sa.number("bytes-in"), sa.number("bytes-out")
        if not isinstance(spi, str) or now_in is None or now_out is None:
            continue
        before = previous.get(spi)
        b_in, b_out = before if isinstance(before, list) and len(before) == 2 else (0, 0)
        if now_in < b_in or now_out < b_out:  # went backwards: not the SA we counted
            b_in = b_out = 0
        total_in, total_out = total_in + now_in - b_in, total_out + now_out - b_out
        seen[spi] = [now_in, now_out]
        use_in = sa.number("use-in")
        if use_in is not None and (last_in is None or now - use_in > last_in):
            last_in = now - use_in
    return total_in, total_out, last_in, seen


# A rekey done logs the new SA's "outbound CHILD_SA x{n} established" on both sides (a first
# CHILD_SA logs "CHILD_SA x{n} established"); a refused one "CHILD_SA rekeying failed, trying
# again in N seconds" (strongSwan's child_rekey.c, child_delete.c).
_REKEY = re.compile(
    r"^\d+ \d+\[\w+\] <([^|>]*)\|?\d*> "
    r"(?:(outbound) CHILD_SA \S+ established|CHILD_SA rekeying failed)",
    re.MULTILINE,
)


def rekey_counts(log_text: str) -> dict[str, list[int]]:
    """IKE SA name (the tunnel) -> [rekeys done, rekeys failed] in charon's log lines."""
    counts: dict[str, list[int]] = {}
    for m in _REKEY.finditer(log_text):
        counts.setdefault(m[1], [0, 0])[0 if m[2] else 1] += 1
    return counts


def read_log_since(path: str, mark: Any, limit: int = 1 << 20) -> tuple[str, dict[str, int]]:
    """Lines ``path`` gained since ``mark`` ({"ino", "offset"}; none: a baseline), the new mark."""
    try:
        with open(path, "rb") as f:
            stat = os.fstat(f.fileno())
            here = {"ino": stat.st_ino, "offset": stat.st_size}
            if not isinstance(mark, dict):
                return "", here
            start = mark.get("offset", 0)
            if mark.get("ino") != stat.st_ino or not isinstance(start, int) or start > stat.st_size:
                start = 0
            f.seek(max(start, stat.st_size - limit))
            data = f.read(stat.st_size - f.tell())
    except OSError:
        return "", mark if isinstance(mark, dict) else {}
    cut = data.rfind(b"\n") + 1  # a line still being written is read next time
    here["offset"] += cut - len(data)
    return data[:cut].decode(errors="replace"), here


def read_map_size(run: Runner = subprocess.run) -> int | None:
    """Mappings in the NAT table's ``snat_map``; None when unreadable."""
    argv = ["nft", "-j", "list", "map", "ip", NFT_TABLE, "snat_map"]
    try:
        proc = run(argv, capture_output=True, text=True, timeout=10, check=False)
        for entry in json.loads(proc.stdout).get("nftables", []) if proc.returncode == 0 else []:
            found = entry.get("map") if isinstance(entry, dict) else None
            if isinstance(found, dict) and found.get("name") == "snat_map":
                return len(found.get("elem") or [])
    except (OSError, subprocess.TimeoutExpired, ValueError, AttributeError):
        pass
    return None


def _section(data: Any, key: str) -> dict[str, Any]:
    found = data.get(key) if isinstance(data, dict) else None
    return found if isinstance(found, dict) else {}


def tunnel_stats(
    tunnel: str,
    reading: SaReading,
    facts: dict[str, Any],
    before: dict[str, Any],
    after: dict[str, Any],
    now: float,
    logs: dict[str, str],
    children: Sequence[str] = (),
) -> TunnelStats:
    """Against the previous run's ``before``; writes the tunnel's part of ``after``."""
    last_in = _section(before, "inbound").get(tunnel)
    last_in = float(last_in) if isinstance(last_in, (int, float)) else None
    bytes_in = bytes_out = None
    if reading.ok:
        sas = tunnel_children(reading, tunnel, children)
        counted = _section(_section(before, "bytes"), tunnel)
        bytes_in, bytes_out, last_in, after["bytes"][tunnel] = traffic(sas, counted, last_in, now)
    if last_in is not None:
        after["inbound"][tunnel] = round(last_in, 3)
    rekeys = failures = None
    path = facts.get("log")
    if isinstance(path, str) and path:
        if path not in logs:
            mark = _section(before, "logs").get(path)
            logs[path], after["logs"][path] = read_log_since(path, mark)
        rekeys, failures = rekey_counts(logs[path]).get(tunnel, [0, 0])
    idle = None if last_in is None else round(max(0.0, now - last_in), 1)
    return TunnelStats(bytes_in, bytes_out, idle, rekeys, failures)


def stats_file(state_file: Path) -> Path:
    return state_file.with_name(f"{state_file.stem}-tunnels.json")


# -- publishing --------------------------------------------------------------------------------


@dataclass
class Report:
    gateway: str
    deployment: str
    tunnels: list[TunnelStatus] = field(default_factory=list)
    counters: dict[str, int] | None = None  # packets since the previous run
    storage_resolution: int = 60
    table: TableReading | None = None
    nat_mappings: int | None = None


def metric_data(report: Report, *, now: float) -> list[dict[str, Any]]:
    """PutMetricData entries. TunnelUp goes out twice: per gateway (Tunnel, Gateway), and per
    deployment (Deployment, Tunnel), the series the alarm watches, which a replaced gateway
    keeps feeding."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))

    def datum(name: str, value: float, dims: dict[str, str], unit: str = "Count") -> dict[str, Any]:
        return {
            "MetricName": name,
            "Dimensions": [{"Name": k, "Value": v} for k, v in dims.items()],
            "Timestamp": stamp,
            "Value": value,
            "Unit": unit,
            "StorageResolution": report.storage_resolution,
        }

    data = []
    for status in report.tunnels:
        value = 1.0 if status.up else 0.0
        data.append(datum(METRIC, value, {"Tunnel": status.tunnel, "Gateway": report.gateway}))
        data.append(
            datum(METRIC, value, {"Deployment": report.deployment, "Tunnel": status.tunnel})
        )
        data.append(
            datum(
                ESTABLISHED_METRIC,
                1.0 if status.established else 0.0,
                {"Deployment": report.deployment, "Tunnel": status.tunnel},
            )
        )
        stats = status.stats or TunnelStats()
        for name, number, unit in (
            ("TunnelDataIn", stats.bytes_in, "Bytes"),
            ("TunnelDataOut", stats.bytes_out, "Bytes"),
            ("SecondsSinceInbound", stats.idle_in, "Seconds"),
            ("ChildSaRekeys", stats.rekeys, "Count"),
            ("ChildSaRekeyFailures", stats.rekey_failures, "Count"),
        ):
            if number is not None:
                dims = {"Deployment": report.deployment, "Tunnel": status.tunnel}
                data.append(datum(name, float(number), dims, unit))
    if report.nat_mappings is not None:
        deployment = {"Deployment": report.deployment}
        data.append(datum("NatMappings", float(report.nat_mappings), deployment))
    gw = {"Gateway": report.gateway}
    data.append(datum("NatTablePresent", 0.0 if report.counters is None else 1.0, gw))
    for counter, metric in COUNTER_METRICS.items():
        if report.counters is not None and counter in report.counters:
            data.append(datum(metric, float(report.counters[counter]), gw))
    return data


def publish(client: Any, data: list[dict[str, Any]], namespace: str) -> None:
    # PutMetricData takes at most 1000 entries a call; a gateway has a handful.
    for i in range(0, len(data), 500):
        client.put_metric_data(Namespace=namespace, MetricData=data[i : i + 500])


def gateway_id_from_imds(timeout: float = 2.0) -> str:
    token_req = urllib.request.Request(  # noqa: S310 - a fixed http URL
        f"{IMDS}/api/token",
        method="PUT",
        headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"},
    )
    with urllib.request.urlopen(token_req, timeout=timeout) as r:  # noqa: S310 - fixed IMDS URL
        token = r.read().decode()
    req = urllib.request.Request(  # noqa: S310 - a fixed http URL
        f"{IMDS}/meta-data/instance-id", headers={"X-aws-ec2-metadata-token": token}
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 - fixed IMDS URL
        return r.read().decode().strip()


def _warn(message: str) -> None:
    print(f"tunnelnat-health: {message}", file=sys.stderr)


def _load_state(path: Path) -> dict[str, int]:
    try:
        data = json.loads(path.read_text())
        return {str(k): int(v) for k, v in data.items()}
    except (OSError, ValueError, AttributeError):
        return {}


def _save_state(path: Path, counters: dict[str, int]) -> None:
    _save_json(path, counters)


def _save_json(path: Path, data: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, sort_keys=True))
        tmp.replace(path)
    except OSError as exc:
        print(f"tunnelnat-health: cannot save {path}: {exc}", file=sys.stderr)


# -- "has it been up since it was configured?" -------------------------------------------------


def read_config_id(config_dir: Path, tunnel: str) -> str | None:
    """The token ConfigureGateway wrote for ``tunnel``; None before it ever finished."""
    try:
        token = (config_dir / f"{tunnel}.config-id").read_text().strip()
    except OSError:
        return None
    return token if CONFIG_ID.fullmatch(token) else None


def established_update(
    previous: dict[str, Any], tunnel: str, config_id: str | None, up: bool, now: float
) -> dict[str, Any] | None:
    """The tunnel's new record ``{"config": token, "since": first up or None}``; None (nothing
    to keep) while the tunnel has no configuration. A new token starts over: not established."""
    if config_id is None:
        return None
    entry = previous.get(tunnel)
    if not isinstance(entry, dict) or entry.get("config") != config_id:
        entry = {"config": config_id, "since": None}
    since = entry.get("since")
    if since is None and up:
        since = round(now, 3)
    return {"config": config_id, "since": since}


def _load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def collect(
    tunnels: Sequence[str],
    *,
    gateway: str,
    deployment: str,
    probe: Probe | None = None,
    uri: str | None = None,
    high_resolution: bool = False,
    state_file: Path = STATE_FILE,
    established_file: Path = ESTABLISHED_FILE,
    config_dir: Path = CONFIG_DIR,
    now: float | None = None,
    run: Runner = subprocess.run,
    prober: Callable[[Probe], tuple[bool, str]] = tcp_probe,
) -> Report:
    now = time.time() if now is None else now
    reading = read_sas(uri=uri, run=run)
    table = read_applied_generation(run)
    report = Report(
        gateway, deployment, storage_resolution=1 if high_resolution else 60, table=table
    )
    previous = _load_json(established_file)
    kept: dict[str, Any] = {}
    before = _load_json(stats_file(state_file))
    after: dict[str, Any] = {"bytes": {}, "inbound": {}, "logs": {}}
    logs: dict[str, str] = {}
    for tunnel in tunnels:
        facts = read_tunnel_facts(config_dir, tunnel)
        children = [c for c in facts.get("children", []) if TUNNEL_NAME.fullmatch(str(c))]
        # Several partners: the tunnel's own partner's maps decide (one partner's table not
        # read yet never reads as every partner's tunnel down); else the table's, as before.
        own = read_partner_applied(tunnel, run) if len(tunnels) > 1 else None
        status = tunnel_status(tunnel, reading, probe, prober, own or table, children)
        if not status.up:
            log = read_log_tail(facts.get("log"))
            status = replace(status, diagnosis=diagnose(log, tunnel, facts, now))
        stats = tunnel_stats(tunnel, reading, facts, before, after, now, logs, children)
        status = replace(status, stats=stats)
        entry = established_update(
            previous, tunnel, read_config_id(config_dir, tunnel), status.up, now
        )
        if entry is not None:
            kept[tunnel] = entry
        established = entry is not None and entry["since"] is not None
        report.tunnels.append(replace(status, established=established))
    if kept != previous:
        _save_json(established_file, kept)
    _save_json(stats_file(state_file), after)
    report.nat_mappings = read_map_size(run)
    if report.nat_mappings is None and len(tunnels) > 1:
        report.nat_mappings = read_partner_mappings(tunnels, run)
    current = read_counters(run)
    if current is not None:
        report.counters = fold_counters(counter_deltas(current, _load_state(state_file)))
        _save_state(state_file, current)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    once = sub.add_parser("once", help="read every tunnel once, publish, print a JSON line")
    once.add_argument("--tunnels", required=True, help="comma-separated tunnel (connection) names")
    once.add_argument("--gateway-id", required=True, help="this instance's id, or 'auto' (IMDS)")
    once.add_argument("--deployment", default="tunnelnat")
    once.add_argument("--namespace", help="default: tunnelnat/<deployment>")
    once.add_argument("--region", required=True)
    once.add_argument("--probe", help="ADDRESS:PORT behind the tunnel to open a TCP connection to")
    once.add_argument("--probe-source", help="S: the source address of the probe")
    once.add_argument("--high-resolution", action="store_true", help="1-second storage")
    once.add_argument("--swanctl-uri", help="charon's vici socket (default: swanctl's)")
    once.add_argument("--state-file", type=Path, default=STATE_FILE)
    once.add_argument("--established-file", type=Path, default=ESTABLISHED_FILE)
    once.add_argument(
        "--config-dir", type=Path, default=CONFIG_DIR, help="ConfigureGateway's <tunnel>.config-id"
    )
    once.add_argument("--role-file", type=Path, default=ROLE_FILE)
    once.add_argument("--dry-run", action="store_true", help="print, do not publish")
    once.add_argument(
        "--software-parameter",
        help="SSM parameter naming the deployed gateway software (/tunnelnat/<d>/gateway-software)",
    )
    args = parser.parse_args(argv)

    tunnels = [t for t in args.tunnels.split(",") if t]
    bad = [t for t in tunnels if not TUNNEL_NAME.fullmatch(t)]
    if not tunnels or bad:
        parser.error(f"invalid tunnel name(s): {bad or args.tunnels!r}")
    if not re.fullmatch(r"^[A-Za-z0-9_.:-]{1,64}$", args.deployment):
        parser.error(f"invalid deployment {args.deployment!r}")
    namespace = args.namespace or NAMESPACE + args.deployment
    if not NAMESPACE_RE.fullmatch(namespace):
        parser.error(f"invalid namespace {namespace!r}")
    try:
        probe = Probe.parse(args.probe, args.probe_source) if args.probe else None
    except ValueError as exc:
        parser.error(str(exc))
    if probe is not None and len(tunnels) > 1:
        # A probe crosses one partner's tunnel: applied to every tunnel, one partner's silence
        # would read as every partner's tunnel down (issue 23: never blamed on another).
        parser.error("--probe goes with one tunnel; with several --tunnels give none")
    gateway = args.gateway_id
    if gateway == "auto":
        try:
            gateway = gateway_id_from_imds()
        except OSError as exc:
            print(f"tunnelnat-health: cannot read instance id from IMDS: {exc}", file=sys.stderr)
            return 2
    if not GATEWAY_ID.fullmatch(gateway):
        parser.error(f"invalid gateway id {gateway!r}")
    if args.software_parameter and not software.PARAMETER_NAME.fullmatch(args.software_parameter):
        parser.error(f"invalid software parameter {args.software_parameter!r}")

    now = time.time()
    report = collect(
        tunnels,
        gateway=gateway,
        deployment=args.deployment,
        probe=probe,
        uri=args.swanctl_uri,
        high_resolution=args.high_resolution,
        state_file=args.state_file,
        established_file=args.established_file,
        config_dir=args.config_dir,
        now=now,
    )
    try:
        role = args.role_file.read_text().strip()
    except OSError:
        role = None
    # The standby holds no SA by design: its 0 must not reach the active's series (the alarm).
    data = metric_data(replace(report, tunnels=[]) if role == "standby" else report, now=now)
    table = report.table or TableReading(None, "not read")
    line: dict[str, Any] = {
        "gateway": gateway,
        "deployment": args.deployment,
        "namespace": namespace,
        "time": round(now, 3),
        "tunnels": [asdict(t) for t in report.tunnels],
        "table": {"applied_generation": table.generation, "reason": table.reason or None},
        "counters": report.counters,
        "metrics": len(data),
        "published": False,
        "role": role,
        "software": software.report(
            software.identity(),
            software.read_deployed(args.software_parameter, args.region, log=_warn)
            if args.software_parameter
            else None,
        ),
    }
    code = 0
    if not args.dry_run:
        try:
            import boto3
            from botocore.config import Config

            client = boto3.client(
                "cloudwatch",
                region_name=args.region,
                config=Config(connect_timeout=5, read_timeout=10, retries={"max_attempts": 3}),
            )
            publish(client, data, namespace)
            line["published"] = True
        except Exception as exc:  # noqa: BLE001 - any failure: say so, exit non-zero
            line["error"] = f"{type(exc).__name__}: {exc}"
            code = 2
    print(json.dumps(line, sort_keys=True))
    return code


if __name__ == "__main__":
    sys.exit(main())
