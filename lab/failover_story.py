"""The gateway pair's failover (issue 15), with real packets: the demo's step and tests/lab's.

An enrolled instance sends numbered UDP datagrams to A every 50 ms (``lab.seq_probe``; A logs each
with its arrival time). The active gateway (the one EC2 says holds G's ENI) is powered off: its
links down, its processes frozen. Nothing else is done by the lab: the standby's pair agent
misses the heartbeats, force-detaches and attaches the ENI against moto, the ENI mirror (EC2's
hypervisor) moves the ENI's link and E's link to it, the agent puts G on the link it finds by
the ENI's MAC and initiates the tunnel (INITIAL_CONTACT: the partner drops the dead SAs).

Observed: the failover time at A (last datagram through the old active -> first through the new),
the datagrams lost, clear-text partner-bound packets on the Internet link (tcpdump, must be 0), the
ESP SPIs before and after (a new SA: the new active's), E and G where they were (the same
addresses, G on the link with the ENI's MAC), and no re-enrolment (no command to any instance,
the mapping records and generation unchanged).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

from lab import topology as topo
from lab.seq_probe import read_log

PROBE_PORT = 9  # discard: A's app server is not involved, A's receiver logs the datagrams
SEND_INTERVAL = 0.05
FAILOVER_TARGET = 5.0  # issue 15: in the lab, detection included
WAIT_FOR_TRAFFIC = 25.0  # how long after the power-off the step waits for A to hear again
SPI = re.compile(r"ESP\(spi=(0x[0-9a-f]+)")


@dataclass
class FailoverReport:
    active_before: str  # namespace
    active_after: str | None
    holder_after: str | None  # instance ID
    standby_id: str
    standby_built_seconds: float | None  # when the step built the standby itself
    standby_synced_by: str  # "already current" or "the lab" (SyncNatTable before the failover)
    heartbeats_heard: int  # the active's heartbeats at the standby before the power-off
    powered_off_at: float
    sent: int
    received: int
    lost: int
    last_old: float | None  # arrival at A of the last datagram through the old active
    first_new: float | None  # ... and of the first through the new one
    clear: list[str]
    spis_before: list[str]
    spis_after: list[str]
    eni_moved_after: float | None  # power-off -> the mirror had moved the links
    takeover: dict[str, Any]  # the agent's takeover event
    tunnel_up: dict[str, Any]  # the agent's tunnel_up event
    pair_record: dict[str, Any]  # DynamoDB meta/pair
    e_and_g: dict[str, Any]
    commands_after: list[str]  # documents run after the power-off (must be none)
    mappings_unchanged: bool
    generation_before: int
    generation_after: int
    host_route_unchanged: bool
    errors: list[str] = field(default_factory=list)
    # The strict fakes' attach/detach seconds when the failover ran with AWS-like delays.
    aws_like: dict[str, float] = field(default_factory=dict)
    target: float = FAILOVER_TARGET  # seconds the failover may take (AWS-like delays: AWS's)
    standby_heard_after: float | None = None  # seconds the lab waited for the standby to hear

    @property
    def failover_seconds(self) -> float | None:
        if self.last_old is None or self.first_new is None:
            return None
        return self.first_new - self.last_old

    @property
    def ok(self) -> bool:
        seconds = self.failover_seconds
        return (
            not self.errors
            and self.active_after not in (None, self.active_before)
            and seconds is not None
            and seconds <= self.target
            and not self.clear
            and self.e_and_g.get("unchanged") is True
            and not self.commands_after
            and self.mappings_unchanged
            and self.generation_before == self.generation_after
            and self.host_route_unchanged
            and bool(set(self.spis_after) - set(self.spis_before))
        )


def _generation(lab: topo.Lab) -> int:
    item = lab.aws.meta_item("generation")
    return int(item["generation"]["N"]) if item else 0


def _pair_record(lab: topo.Lab) -> dict[str, Any]:
    item = lab.aws.meta_item("pair")
    return _plain(item) if item else {}


def _plain(value: Any) -> Any:
    """A DynamoDB item (or attribute value) as plain JSON."""
    if isinstance(value, dict) and len(value) == 1:
        (kind, inner), *_ = value.items()
        if kind == "S":
            return inner
        if kind == "N":
            return float(inner)
        if kind == "M":
            return {k: _plain(v) for k, v in inner.items()}
        if kind == "L":
            return [_plain(v) for v in inner]
        if kind == "BOOL":
            return inner
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def agent_events(ns: str, name: str) -> list[dict[str, Any]]:
    """The pair agent's machine-readable lines (``tunnelnat-pair: <name> {json}``) on ``ns``."""
    path = topo.LOGS / f"pair-{ns.removeprefix(topo.PREFIX)}.log"
    if not path.exists():
        return []
    found = []
    for line in path.read_text(errors="replace").splitlines():
        marker = f"tunnelnat-pair: {name} "
        if line.startswith(marker):
            try:
                found.append(json.loads(line[len(marker) :]))
            except ValueError:
                continue
    return found


def applied_generation(ns: str) -> int | None:
    """The generation the gateway's NAT table holds (its applied_generation set)."""
    out = topo.sh(
        topo.machine_argv(ns, ["nft", "list", "set", "ip", "tunnelnat", "applied_generation"]),
        check=False,
    ).stdout
    match = re.search(r"elements = \{\s*([0-9a-fx]+)", out)
    return int(match.group(1), 0) if match else None


def eni_and_public(lab: topo.Lab, ns: str) -> dict[str, Any]:
    """G and E as machine ``ns`` and EC2 have them."""
    links = json.loads(topo.in_ns(ns, ["ip", "-j", "addr", "show"]))
    by_name = {link["ifname"]: link for link in links}
    eni = by_name.get(topo.ENI_LINK, {})
    public = by_name.get(topo.PUBLIC_LINK, {})

    def inet(link: dict[str, Any]) -> list[str]:
        return [a["local"] for a in link.get("addr_info", []) if a.get("family") == "inet"]

    described = lab.aws.client("ec2").describe_network_interfaces(
        NetworkInterfaceIds=[lab.aws.eni_id]
    )["NetworkInterfaces"][0]
    return {
        "g_on_eni_link": inet(eni),
        "eni_link_mac": eni.get("address"),
        "eni_link_up": "UP" in eni.get("flags", []),
        "e_on_public_link": inet(public),
        "ec2_eni_address": described.get("PrivateIpAddress"),
        "ec2_eni_mac": described.get("MacAddress", "").lower(),
    }


def _same_e_and_g(seen: dict[str, Any]) -> bool:
    return (
        seen["g_on_eni_link"] == [topo.GW_ENI]
        and seen["eni_link_up"]
        and seen["eni_link_mac"] == seen["ec2_eni_mac"]
        and seen["e_on_public_link"] == [topo.GW_PUBLIC]
        and seen["ec2_eni_address"] == topo.GW_ENI
    )


def heartbeats_heard(lab: topo.Lab, at_ns: str, from_ip: str, seconds: float = 1.2) -> int:
    """The other gateway's heartbeats arriving at ``at_ns`` within ``seconds``."""
    bpf = f"udp dst port {topo.HEARTBEAT_PORT} and src host {from_ip}"
    # Every link: the lab's VPC is one bridge, and a gateway holding G's ENI has two links on it
    # (eth0 and the ENI's), both answering ARP for either address (Linux's default; the VPC's
    # own ARP never does that): a peer may reach it on either.
    with lab.capture(at_ns, "any", bpf) as seen:
        time.sleep(seconds)
    return len([line for line in seen if line.strip()])


def _wait(check: Any, timeout: float, every: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(every)
    return check()


def run_failover(lab: topo.Lab, name: str, public: str) -> FailoverReport:
    """Power off the active gateway while ``name`` (enrolled as ``public``) sends to A."""
    built: float | None = None
    if not lab.standby_id:
        started = time.monotonic()
        lab.add_standby_gateway()
        built = time.monotonic() - started
    errors: list[str] = []
    namespaces = lab.gateway_namespaces()
    active = lab.eni_holder_ns()
    if active is None:
        raise topo.LabError("no gateway holds G's ENI before the failover")
    standby = next(ns for ns in namespaces.values() if ns != active)
    # The standby's table as current as the active's: the controller's SyncNatTable reaches
    # every running gateway; a standby that missed one is synced here (and said so).
    synced_by = "already current"
    if applied_generation(standby) != _generation(lab):
        result = lab.commands.run(
            next(i for i, ns in namespaces.items() if ns == standby),
            "SyncNatTable",
            {"TableName": topo.TABLE, "Region": topo.REGION},
        )
        synced_by = "the lab (SyncNatTable)" if result.ok else f"FAILED ({result.status})"
        if not result.ok:
            errors.append(f"SyncNatTable on the standby: {result.stderr[-300:]}")
    if not _wait(lambda: lab.child_sas_installed(active) >= 1, 20, 0.2):
        errors.append(f"no CHILD_SA on the active {active} before the power-off")
    # The pair settled first: the standby hears the active (after a replacement the active
    # counts a new standby as a member at its next discovery: up to check_seconds), the ENI is
    # past the hold-down and the agents past their startup grace.
    listening = time.monotonic()
    primary = lab.gateway_primary[active]
    _wait(lambda: heartbeats_heard(lab, standby, primary, 0.6) > 0, 45, 0.1)
    heard_after = round(time.monotonic() - listening, 1)
    wait_past_hold_down(lab)
    heard = heartbeats_heard(lab, standby, primary)
    if not heard:
        errors.append(f"the standby {standby} hears no heartbeat from {active}")

    inst = lab.instance(name)
    mappings_before = lab.aws.mappings()
    generation_before = _generation(lab)
    route_before = [r for r in lab.routes(inst.ns) if r.startswith(topo.PARTNER_NET)]
    commands_before = len(lab.commands.history)
    moves_before = len(lab.eni_mirror.moves)
    takeovers_before = len(agent_events(standby, "takeover"))
    stamp = time.monotonic_ns()
    sent_log = topo.LOGS / f"failover-sent-{stamp}.log"
    at_a_log = topo.LOGS / f"failover-at-a-{stamp}.log"
    py = str(topo.REPO / ".venv" / "bin" / "python")
    receiver = lab.spawn(
        f"failover-receiver-{stamp}",
        "tn-app",
        [py, "-m", "lab.seq_probe", "receive", "--port", str(PROBE_PORT), "--log", str(at_a_log)],
    )
    _wait(
        lambda: bool(
            topo.sh(
                ["ip", "netns", "exec", "tn-app", "ss", "-Hlun", f"sport = :{PROBE_PORT}"]
            ).stdout.strip()
        ),
        5,
    )
    sender_argv = [py, "-m", "lab.seq_probe", "send", "--to", topo.APP]
    sender_argv += ["--port", str(PROBE_PORT), "--interval", str(SEND_INTERVAL)]
    sender_argv += ["--log", str(sent_log)]
    partner_net = f"net {topo.PARTNER_NET}"
    with (
        lab.capture("tn-inet", "to-gw", partner_net) as clear,
        lab.capture("tn-inet", "to-gw", "udp port 4500", epoch=True) as esp,
    ):
        sender = lab.spawn(f"failover-sender-{stamp}", inst.ns, sender_argv)
        try:
            flowing = _wait(lambda: len(read_log(at_a_log)) >= 10, 5)
            if not flowing:
                errors.append("nothing reached A before the power-off")
            powered_off = lab.power_off(active)

            def back() -> bool:
                arrived = read_log(at_a_log)
                return bool(arrived) and arrived[-1][0] > powered_off + 0.2

            resumed = _wait(back, WAIT_FOR_TRAFFIC)
            if not resumed:
                errors.append(f"A heard nothing for {WAIT_FOR_TRAFFIC:.0f}s after the power-off")
            time.sleep(1.0)  # traffic through the new active for a while
        finally:
            topo.stop_group(sender)
            time.sleep(0.3)  # the last datagrams in flight
            topo.stop_group(receiver)
    sent = read_log(sent_log)
    arrived = read_log(at_a_log)
    received_seqs = {n for _, n in arrived}
    lost = len([n for _, n in sent if n not in received_seqs])
    last_old, first_new = switch_gap(sorted(t for t, _ in arrived), powered_off)
    outbound = [line for line in esp if f"{topo.GW_PUBLIC}.4500 > " in line]

    def spis(lines: list[str]) -> list[str]:
        return sorted({m.group(1) for line in lines if (m := SPI.search(line))})

    cut = first_new if first_new is not None else powered_off
    spis_before = spis([line for line in outbound if float(line.split()[0]) <= powered_off])
    spis_after = spis([line for line in outbound if float(line.split()[0]) >= cut])
    moves = lab.eni_mirror.moves[moves_before:]
    into_standby = [m for m in moves if m.target == standby]
    holder = lab.eni_holder()
    active_after = lab.gateway_namespaces().get(holder) if holder else None
    seen = eni_and_public(lab, active_after) if active_after else {}
    seen["unchanged"] = bool(seen) and _same_e_and_g(seen)
    takeovers = agent_events(standby, "takeover")[takeovers_before:]
    ups = agent_events(standby, "tunnel_up")
    route_after = [r for r in lab.routes(inst.ns) if r.startswith(topo.PARTNER_NET)]
    return FailoverReport(
        active_before=active,
        active_after=active_after,
        holder_after=holder,
        standby_id=lab.standby_id,
        standby_built_seconds=built,
        standby_synced_by=synced_by,
        heartbeats_heard=heard,
        powered_off_at=powered_off,
        sent=len(sent),
        received=len(received_seqs),
        lost=lost,
        last_old=last_old,
        first_new=first_new,
        clear=clear[:20],
        spis_before=spis_before,
        spis_after=spis_after,
        eni_moved_after=into_standby[0].at - powered_off if into_standby else None,
        takeover=takeovers[-1] if takeovers else {},
        tunnel_up=ups[-1] if ups else {},
        pair_record=_pair_record(lab),
        e_and_g=seen,
        commands_after=[r.document for r in lab.commands.history[commands_before:]],
        mappings_unchanged=lab.aws.mappings() == mappings_before,
        generation_before=generation_before,
        generation_after=_generation(lab),
        host_route_unchanged=route_after == route_before and bool(route_before),
        errors=errors,
        standby_heard_after=heard_after,
    )


def switch_gap(times: list[float], powered_off: float) -> tuple[float | None, float | None]:
    """(last arrival through the old active, first through the new): the widest silence at A
    that ends after the power-off (a datagram already past the old active's links when they
    went down may still arrive a moment after it)."""
    window = [t for t in times if t > powered_off - 1.0]
    best: tuple[float | None, float | None] = (None, None)
    widest = -1.0
    for before, after in zip(window, window[1:], strict=False):
        if after > powered_off and after - before > widest:
            widest, best = after - before, (before, after)
    return best


def figure(report: FailoverReport) -> str:
    """The step's one line: the figures issue 15 asks the demo to print."""
    seconds = report.failover_seconds
    takeover = report.takeover
    parts = []
    if takeover:
        parts.append(f"detected after {takeover.get('detected_seconds')}s silence")
        parts.append(f"ENI detached+attached {takeover.get('attach_seconds')}s")
    if report.eni_moved_after is not None:
        parts.append(f"links moved at +{report.eni_moved_after:.2f}s")
    if report.tunnel_up:
        parts.append(f"tunnel up {report.tunnel_up.get('seconds')}s after the decision")
    e_g = report.e_and_g
    return (
        f"power-off of the active ({report.active_before}) while its instance sends to A every "
        f"{SEND_INTERVAL * 1000:.0f} ms: G's ENI now on "
        f"{report.active_after or 'NOBODY'}; failover (last packet through the old active -> "
        f"first through the new) "
        + (f"{seconds:.2f}s" if seconds is not None else "NEVER")
        + f" ({'; '.join(parts) or 'no takeover event'}); {report.sent} sent, {report.lost} lost;"
        f" {len(report.clear)} clear-text packets on the internet link; ESP SPI "
        f"{','.join(report.spis_before) or '-'} -> {','.join(report.spis_after) or '-'}; "
        f"E={','.join(e_g.get('e_on_public_link', [])) or '?'} and "
        f"G={','.join(e_g.get('g_on_eni_link', [])) or '?'} "
        f"{'unchanged' if e_g.get('unchanged') else 'CHANGED'}; re-enrolment: "
        f"{len(report.commands_after)} commands, generation {report.generation_before} -> "
        f"{report.generation_after}, mappings "
        f"{'unchanged' if report.mappings_unchanged else 'CHANGED'}; the standby's table before: "
        f"{report.standby_synced_by}"
        + (
            f" (it heard the active {report.standby_heard_after:.0f}s after the lab listened)"
            if report.standby_heard_after and report.standby_heard_after >= 1
            else ""
        )
        + (f"; problems: {'; '.join(report.errors)}" if report.errors else "")
    )


def wait_past_hold_down(lab: topo.Lab) -> float:
    """Wait until a standby would take G's ENI from a silent active: the ENI attached longer
    ago than the agents' hold-down (no flapping) and every agent past its startup grace (an
    agent that just started listens before it judges). The seconds waited."""
    config = lab.pair_config()
    hold = float(config["hold_down_seconds"])
    grace = float(config.get("startup_grace_seconds", 10))
    reply = lab.aws.client("ec2").describe_network_interfaces(NetworkInterfaceIds=[lab.aws.eni_id])
    attached = (reply["NetworkInterfaces"][0].get("Attachment") or {}).get("AttachTime")
    until = attached.timestamp() + hold if attached is not None else 0.0
    for ns in lab.gateway_primaries():
        until = max(until, lab.agent_started.get(ns, 0.0) + grace)
    wait = max(0.0, until + 0.5 - time.time())
    time.sleep(wait)
    return wait
