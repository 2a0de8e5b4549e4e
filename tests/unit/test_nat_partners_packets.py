"""The several-partner NAT table with real nft and real packets, in private namespaces.

Five namespaces, ``tnp-<pid>-<role>``: an instance (10.1.0.10 and 10.1.0.11), a gateway running
``render_partners_table``'s ruleset, and three partners. Partner A's app server is 10.0.0.5
(reached directly); partner C's app server is ALSO 10.0.0.5 (its real network overlaps A's) and
is reached through C's alias 100.64.1.0/24; partner B (172.20.0.0/24, shared-S mode) has only
10.1.0.10 enrolled. Plain routing over veth pairs stands in for the IPsec tunnels (one veth per
partner, as route-based XFRM interfaces would be; no strongSwan here): the gateway picks the
partner's routing table by the packet mark the ruleset sets. Inbound, the ruleset tells
partners apart by ``ip daddr . ip saddr`` (the S and the real network), so between the two
overlapping partners a veth cannot stand in for the IPsec policy that, on a real gateway, only
lets C's SA deliver to C's S. ``one_interface``: the production shape instead, every partner's
packets through ONE interface both ways (kernel policy-based ESP's outer interface, libipsec's
ipsec0), the tunnel chosen after SNAT by the source S and the destination (as the IPsec policies
S -> real network choose the SA; a router namespace's ``ip rule from S`` stands in for them, as
this kernel has no ESP transform to test real policies with). Each server records the peer
address it sees. Everything created is removed, also on
failure; the root namespace's addresses and routes are never touched.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tunnelnat.core.nat import (
    MultiPartnerBase,
    NatTable,
    PartnerNat,
    out_mark,
    render_partner_delta,
    render_partners_table,
)

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("nft") or not shutil.which("ip"),
    reason="needs root, nft and ip for private network namespaces",
)

N = ipaddress.IPv4Network
S_A, S_C, S_B = "203.0.113.10", "203.0.113.11", "203.0.113.30"
APP = "10.0.0.5"
PORT = 8080

# A tiny TCP server: for each connection, append the peer address to a file and answer with
# the partner's name; and a client printing the answer and exiting non-zero on failure.
SERVER = f"""
import socket, sys
name, out = sys.argv[1], sys.argv[2]
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", {PORT})); s.listen(8)
open(out + ".ready", "w").close()
while True:
    c, peer = s.accept()
    with open(out, "a") as f:
        f.write(peer[0] + "\\n")
    c.sendall(name.encode()); c.close()
"""
CLIENT = f"""
import socket, sys
s = socket.socket(); s.settimeout(float(sys.argv[3]))
if sys.argv[1] != "-":
    s.bind((sys.argv[1], 0))
s.connect((sys.argv[2], {PORT}))
print(s.recv(100).decode())
"""


def run(*argv: str, check: bool = True, input: str | None = None) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, input=input, timeout=30)
    if check and proc.returncode:
        raise AssertionError(f"{' '.join(argv)}: {proc.stderr.strip()}")
    return proc.stdout


class Lab:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.prefix = f"tnp-{os.getpid()}-"
        self.made: list[str] = []
        self.procs: list[subprocess.Popen[bytes]] = []

    def ns(self, role: str) -> str:
        return self.prefix + role

    def sh(self, role: str, *argv: str, check: bool = True, input: str | None = None) -> str:
        return run("ip", "netns", "exec", self.ns(role), *argv, check=check, input=input)

    def add(self, role: str) -> None:
        run("ip", "netns", "add", self.ns(role))
        self.made.append(self.ns(role))
        self.sh(role, "ip", "link", "set", "lo", "up")

    def link(self, a: str, a_if: str, b: str, b_if: str) -> None:
        # Both ends are created inside their namespaces: no name ever exists in the root one.
        run("ip", "link", "add", a_if, "netns", self.ns(a), "type", "veth",
            "peer", "name", b_if, "netns", self.ns(b))  # fmt: skip
        self.sh(a, "ip", "link", "set", a_if, "up")
        self.sh(b, "ip", "link", "set", b_if, "up")

    def serve(self, role: str, name: str) -> Path:
        out = self.tmp / f"{role}.peers"
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns(role), sys.executable, "-c", SERVER, name, str(out)]
        )
        self.procs.append(proc)
        deadline = time.monotonic() + 10
        while not Path(str(out) + ".ready").exists():
            assert time.monotonic() < deadline, f"server in {role} did not start"
            time.sleep(0.02)
        return out

    def connect(self, role: str, src: str, dst: str, timeout: float = 2.0) -> str | None:
        proc = subprocess.run(
            ["ip", "netns", "exec", self.ns(role), sys.executable, "-c", CLIENT, src, dst,
             str(timeout)],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        return proc.stdout.strip() if proc.returncode == 0 else None

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()
        for ns in self.made:
            # Killing the namespace's processes first (the servers' children, if any).
            pids = run("ip", "netns", "pids", ns, check=False).split()
            for pid in pids:
                subprocess.run(["kill", "-9", pid], check=False)
            run("ip", "netns", "del", ns, check=False)


def state(table: NatTable) -> tuple[int, int, int]:
    return (table.generation, table.checksum, len(table))


def partners_base(shared_s: bool = False) -> MultiPartnerBase:
    a = ipaddress.IPv4Address
    bee = (
        PartnerNat("bee", (N("172.20.0.0/24"),), public_addresses=(a(S_A),))
        if shared_s
        else PartnerNat("bee", (N("172.20.0.0/24"),), "shared", a(S_B))
    )
    return MultiPartnerBase(
        (
            PartnerNat("bank-a", (N("10.0.0.0/24"),), public_addresses=(a(S_A), a("203.0.113.12"))),
            bee,
            PartnerNat(
                "clear",
                (N("10.0.0.0/24"),),
                aliases=(N("100.64.1.0/24"),),
                public_addresses=(a(S_C), a("203.0.113.13"), a("203.0.113.14")),
            ),
        ),
        tunnel_interfaces=("ga", "gb", "gc"),
    )


def partner_tables(shared_s: bool = False) -> dict[str, NatTable]:
    if shared_s:
        # 10.1.0.10 appears to A and to B as the same S (each partner whitelists only its own).
        return {
            "bank-a": NatTable.from_rows(1, [("10.1.0.10", S_A)]),
            "bee": NatTable.from_rows(1, [("10.1.0.10", S_A)]),
            "clear": NatTable.from_rows(1, [("10.1.0.10", S_C)]),
        }
    return {
        "bank-a": NatTable.from_rows(1, [("10.1.0.10", S_A), ("10.1.0.11", "203.0.113.12")]),
        "bee": NatTable.from_rows(1, [("10.1.0.10", S_B)], "shared"),
        "clear": NatTable.from_rows(1, [("10.1.0.10", S_C), ("10.1.0.11", "203.0.113.13")]),
    }


@pytest.fixture
def lab(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Lab]:
    shared_s = getattr(request, "param", "") == "shared-s"
    lab = Lab(tmp_path)
    try:
        for role in ("inst", "gw", "pa", "pb", "pc"):
            lab.add(role)
        lab.link("inst", "i0", "gw", "gi")
        lab.sh("inst", "ip", "addr", "add", "10.1.0.10/24", "dev", "i0")
        lab.sh("inst", "ip", "addr", "add", "10.1.0.11/24", "dev", "i0")
        lab.sh("inst", "ip", "route", "add", "default", "via", "10.1.0.1")
        lab.sh("gw", "ip", "addr", "add", "10.1.0.1/24", "dev", "gi")
        # The VPC router stands at .254 (never answers): a packet no rule takes goes there,
        # so a refused inbound flow is dropped by the forward chain, not unroutable.
        lab.sh("gw", "ip", "route", "add", "default", "via", "10.1.0.254")
        for sysctl in ("net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0",
                       "net.ipv4.conf.default.rp_filter=0"):  # fmt: skip
            lab.sh("gw", "sysctl", "-qw", sysctl)
        base = partners_base(shared_s)
        # One /30 per stand-in tunnel (TEST-NET-1), the partner's network behind it.
        for i, (role, gif, pif, net, app) in enumerate(
            (
                ("pa", "ga", "a0", "10.0.0.0/24", APP),
                ("pb", "gb", "b0", "172.20.0.0/24", "172.20.0.5"),
                ("pc", "gc", "c0", "10.0.0.0/24", APP),
            )
        ):
            lab.link("gw", gif, role, pif)
            lab.sh("gw", "ip", "addr", "add", f"192.0.2.{4 * i + 1}/30", "dev", gif)
            lab.sh(role, "ip", "addr", "add", f"192.0.2.{4 * i + 2}/30", "dev", pif)
            lab.sh(role, "ip", "addr", "add", f"{app}/24", "dev", pif)
            lab.sh(role, "ip", "route", "add", "default", "via", f"192.0.2.{4 * i + 1}")
            # The partner's tunnel is chosen by the mark (two partners share 10.0.0.0/24).
            index = base.index({"pa": "bank-a", "pb": "bee", "pc": "clear"}[role])
            table = str(100 + index)
            lab.sh("gw", "ip", "route", "add", net, "via", f"192.0.2.{4 * i + 2}",
                   "table", table)  # fmt: skip
            lab.sh("gw", "ip", "rule", "add", "fwmark", hex(out_mark(index)), "table", table)
        ruleset = render_partners_table(base, partner_tables(shared_s))
        lab.sh("gw", "nft", "-f", "-", input=ruleset)
        yield lab
    finally:
        lab.close()


def counter(lab: Lab, name: str) -> int:
    text = lab.sh("gw", "nft", "list", "counter", "ip", "tunnelnat", name)
    return int(text.split("packets")[1].split()[0])


def test_overlapping_partners_each_see_their_own_s(lab: Lab) -> None:
    seen_a, seen_c = lab.serve("pa", "A"), lab.serve("pc", "C")
    seen_b = lab.serve("pb", "B")
    # The same real address behind two tunnels: A directly, C through its alias.
    assert lab.connect("inst", "10.1.0.10", APP) == "A"
    assert lab.connect("inst", "10.1.0.10", "100.64.1.5") == "C"
    assert lab.connect("inst", "10.1.0.11", APP) == "A"
    assert lab.connect("inst", "10.1.0.11", "100.64.1.5") == "C"
    assert lab.connect("inst", "10.1.0.10", "172.20.0.5") == "B"
    assert seen_a.read_text().split() == [S_A, "203.0.113.12"]
    assert seen_c.read_text().split() == [S_C, "203.0.113.13"]
    assert seen_b.read_text().split() == [S_B]
    # Not in B's map: dropped at the gateway, never reaches B.
    assert lab.connect("inst", "10.1.0.11", "172.20.0.5", timeout=1.0) is None
    assert seen_b.read_text().split() == [S_B]
    assert counter(lab, "dropped_unenrolled_bee") >= 1
    # Nothing partner-bound left outside the stand-in tunnels.
    assert counter(lab, "dropped_cleartext") == 0


def test_partner_initiated_reaches_the_instance_from_the_alias(lab: Lab) -> None:
    seen = lab.serve("inst", "I")
    # C's server (10.0.0.5, the same address as A's) connects to its S for 10.1.0.10.
    assert lab.connect("pc", APP, S_C) == "I"
    # The instance sees C's alias address, never C's real (overlapping) one.
    assert seen.read_text().split() == ["100.64.1.5"]
    # A's server connects to A's S: the instance sees A's real address (no alias).
    assert lab.connect("pa", APP, S_A) == "I"
    assert seen.read_text().split() == ["100.64.1.5", APP]
    # C to an S of its own that no instance holds: C's dnat map has none -> dropped inbound.
    assert lab.connect("pc", APP, "203.0.113.14", timeout=1.0) is None
    assert counter(lab, "dropped_inbound_clear") >= 1
    # C to B's S: no partner sends from C's network to it -> unclassified, dropped.
    assert lab.connect("pc", APP, S_B, timeout=1.0) is None
    assert counter(lab, "dropped_unclassified") >= 1
    # Shared-S partner B has no partner-initiated path.
    assert lab.connect("pb", "172.20.0.5", S_B, timeout=1.0) is None
    assert seen.read_text().split() == ["100.64.1.5", APP]


def test_a_delta_for_one_partner_changes_only_its_flows(lab: Lab) -> None:
    seen_a, seen_c = lab.serve("pa", "A"), lab.serve("pc", "C")
    tables = partner_tables()
    before = tables["clear"]
    after = NatTable.from_rows(2, [*before.rows[:1], ("10.1.0.11", "203.0.113.14")])
    delta = render_partner_delta(
        "clear", [("10.1.0.11", "203.0.113.13")], [("10.1.0.11", "203.0.113.14")], state(after)
    )
    assert "bank_a" not in delta and "bee" not in delta
    lab.sh("gw", "nft", "-f", "-", input=delta)
    assert lab.connect("inst", "10.1.0.11", "100.64.1.5") == "C"
    assert lab.connect("inst", "10.1.0.11", APP) == "A"
    assert seen_c.read_text().split() == ["203.0.113.14"]
    assert seen_a.read_text().split() == ["203.0.113.12"]


@pytest.mark.parametrize("lab", ["shared-s"], indirect=True)
def test_one_s_shared_by_two_partners(lab: Lab) -> None:
    """A and B both know 10.1.0.10 as 203.0.113.10. Return traffic is told apart by conntrack;
    a partner-initiated flow by its source network (their networks do not overlap), which
    selects that partner's own dnat map."""
    seen_a, seen_b = lab.serve("pa", "A"), lab.serve("pb", "B")
    assert lab.connect("inst", "10.1.0.10", APP) == "A"
    assert lab.connect("inst", "10.1.0.10", "172.20.0.5") == "B"
    assert seen_a.read_text().split() == [S_A] and seen_b.read_text().split() == [S_A]
    seen = lab.serve("inst", "I")
    assert lab.connect("pa", APP, S_A) == "I"
    assert lab.connect("pb", "172.20.0.5", S_A) == "I"
    assert seen.read_text().split() == [APP, "172.20.0.5"]


def test_nothing_partner_bound_leaves_outside_a_tunnel(lab: Lab) -> None:
    """B's route moved off its tunnel (onto the instance side): the guard drops, never sends."""
    lab.serve("pb", "B")
    table = str(100 + partners_base().index("bee"))
    lab.sh("gw", "ip", "route", "replace", "172.20.0.0/24", "via", "10.1.0.254", "table", table)
    lab.sh("gw", "ip", "route", "replace", "172.20.0.0/24", "via", "10.1.0.254")
    assert lab.connect("inst", "10.1.0.10", "172.20.0.5", timeout=1.0) is None
    assert counter(lab, "dropped_cleartext") >= 1


@pytest.fixture
def one_interface(tmp_path: Path) -> Iterator[Lab]:
    """inst -- gw -(t0)- sel -- pa / pb / pc: the gateway has one route per real network, all
    through t0, and no mark-based routing; ``sel`` picks the partner by the packet's source S
    (A's pool, C's pool) after the gateway's SNAT, as the IPsec policies would."""
    lab = Lab(tmp_path)
    try:
        for role in ("inst", "gw", "sel", "pa", "pb", "pc"):
            lab.add(role)
        lab.link("inst", "i0", "gw", "gi")
        lab.sh("inst", "ip", "addr", "add", "10.1.0.10/24", "dev", "i0")
        lab.sh("inst", "ip", "addr", "add", "10.1.0.11/24", "dev", "i0")
        lab.sh("inst", "ip", "route", "add", "default", "via", "10.1.0.1")
        lab.sh("gw", "ip", "addr", "add", "10.1.0.1/24", "dev", "gi")
        lab.sh("gw", "ip", "route", "add", "default", "via", "10.1.0.254")
        lab.link("gw", "t0", "sel", "s0")
        lab.sh("gw", "ip", "addr", "add", "192.0.2.1/30", "dev", "t0")
        lab.sh("sel", "ip", "addr", "add", "192.0.2.2/30", "dev", "s0")
        for net in ("10.0.0.0/24", "172.20.0.0/24"):
            lab.sh("gw", "ip", "route", "add", net, "via", "192.0.2.2")
        lab.sh("sel", "ip", "route", "add", "203.0.113.0/24", "via", "192.0.2.1")
        for ns in ("gw", "sel"):
            for sysctl in ("net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0",
                           "net.ipv4.conf.default.rp_filter=0"):  # fmt: skip
                lab.sh(ns, "sysctl", "-qw", sysctl)
        sources = {"pa": ("203.0.113.10", "203.0.113.12"), "pc": ("203.0.113.11", "203.0.113.13")}
        for i, (role, pif, net, app) in enumerate(
            (
                ("pa", "a0", "10.0.0.0/24", APP),
                ("pb", "b0", "172.20.0.0/24", "172.20.0.5"),
                ("pc", "c0", "10.0.0.0/24", APP),
            )
        ):
            lab.link("sel", f"s{i + 1}", role, pif)
            lab.sh("sel", "ip", "addr", "add", f"198.51.100.{4 * i + 1}/30", "dev", f"s{i + 1}")
            lab.sh(role, "ip", "addr", "add", f"198.51.100.{4 * i + 2}/30", "dev", pif)
            lab.sh(role, "ip", "addr", "add", f"{app}/24", "dev", pif)
            lab.sh(role, "ip", "route", "add", "default", "via", f"198.51.100.{4 * i + 1}")
            via = f"198.51.100.{4 * i + 2}"
            if role == "pb":
                lab.sh("sel", "ip", "route", "add", net, "via", via)
                continue
            table = str(100 + i)
            lab.sh("sel", "ip", "route", "add", net, "via", via, "table", table)
            for s in sources[role]:
                lab.sh("sel", "ip", "rule", "add", "from", s, "table", table)
        base = partners_base()
        base = MultiPartnerBase(base.partners, tunnel_interfaces=("t0",))
        lab.sh("gw", "nft", "-f", "-", input=render_partners_table(base, partner_tables()))
        yield lab
    finally:
        lab.close()


def test_overlapping_partners_through_one_interface(one_interface: Lab) -> None:
    """A and C both behind 10.0.0.5, every packet of both through t0 both ways: out by the
    destination the instance used (C's alias), in by (S, source network)."""
    lab = one_interface
    seen_a, seen_c, seen_b = lab.serve("pa", "A"), lab.serve("pc", "C"), lab.serve("pb", "B")
    assert lab.connect("inst", "10.1.0.10", APP) == "A"
    assert lab.connect("inst", "10.1.0.10", "100.64.1.5") == "C"
    assert lab.connect("inst", "10.1.0.11", "100.64.1.5") == "C"
    assert lab.connect("inst", "10.1.0.10", "172.20.0.5") == "B"
    assert seen_a.read_text().split() == [S_A]
    assert seen_c.read_text().split() == [S_C, "203.0.113.13"]
    assert seen_b.read_text().split() == [S_B]
    seen = lab.serve("inst", "I")
    assert lab.connect("pc", APP, S_C) == "I"
    assert lab.connect("pa", APP, "203.0.113.12") == "I"
    # The instance sees C through its alias and A as itself: same source, told apart by S.
    assert seen.read_text().split() == ["100.64.1.5", APP]
    assert counter(lab, "dropped_cleartext") == 0
    routes = lab.sh("gw", "ip", "route", "show", "table", "all")
    assert "10.0.0.0/24 via 192.0.2.2 dev t0" in routes and "table 10" not in routes


def test_the_boot_ruleset_forwards_nothing_for_any_partner(lab: Lab) -> None:
    """What the restore unit loads at boot (nat_sync.render_partners_boot): every chain and the
    guard, no partner's mappings, nothing applied. Until a sync, no instance reaches a partner
    and no partner reaches an instance: fail closed, per partner."""
    from tunnelnat_gateway.nat_sync import render_partners_boot

    lab.sh("gw", "nft", "-f", "-", input=render_partners_boot(partners_base()))
    seen_a, seen_c = lab.serve("pa", "A"), lab.serve("pc", "C")
    assert lab.connect("inst", "10.1.0.10", APP, timeout=1.0) is None
    assert lab.connect("inst", "10.1.0.10", "100.64.1.5", timeout=1.0) is None
    assert not seen_a.exists() and not seen_c.exists()  # no connection ever reached them
    assert counter(lab, "dropped_unenrolled_bank_a") >= 1
    assert counter(lab, "dropped_unenrolled_clear") >= 1
    lab.serve("inst", "I")
    assert lab.connect("pa", APP, S_A, timeout=1.0) is None
    assert counter(lab, "dropped_inbound_bank_a") >= 1
    applied = lab.sh("gw", "nft", "list", "set", "ip", "tunnelnat", "applied_bank_a")
    assert "elements" not in applied


def test_instances_inside_a_partners_real_network_still_reach_the_others(lab: Lab) -> None:
    """A partner whose real network is our instances' own subnet (10.1.0.0/24, reached through
    its alias): an instance's packet to A comes FROM that network. It is classified toward A by
    its destination, never as coming from that partner."""
    a = ipaddress.IPv4Address
    base = MultiPartnerBase(
        (
            PartnerNat("bank-a", (N("10.0.0.0/24"),), public_addresses=(a(S_A), a("203.0.113.12"))),
            PartnerNat(
                "twin",
                (N("10.1.0.0/24"),),
                aliases=(N("100.64.9.0/24"),),
                public_addresses=(a("203.0.113.40"),),
            ),
        ),
        tunnel_interfaces=("ga", "gb", "gc"),
    )
    tables = {"bank-a": partner_tables()["bank-a"], "twin": NatTable.from_rows(1, [])}
    lab.sh("gw", "nft", "-f", "-", input=render_partners_table(base, tables))
    seen_a = lab.serve("pa", "A")
    assert lab.connect("inst", "10.1.0.10", APP) == "A"
    assert seen_a.read_text().split() == [S_A]
    assert counter(lab, "dropped_inbound_twin") == 0


def test_a_removed_partners_traffic_is_never_forwarded(lab: Lab) -> None:
    """bee removed by redeploy: the table is rebuilt without it, but its instances' host routes
    still send 172.20.0.0/24 to G until they are untagged. Even with a route there that would
    deliver it (the main table, standing in for G's way to the internet), nothing is forwarded."""
    seen_b = lab.serve("pb", "B")
    lab.sh("gw", "ip", "route", "replace", "172.20.0.0/24", "via", "192.0.2.6")
    base = partners_base()
    kept = MultiPartnerBase(
        tuple(p for p in base.partners if p.name != "bee"), tunnel_interfaces=("ga", "gc")
    )
    tables = {k: v for k, v in partner_tables().items() if k != "bee"}
    lab.sh("gw", "nft", "-f", "-", input=render_partners_table(kept, tables))
    before = counter(lab, "dropped_unclassified")
    assert lab.connect("inst", "10.1.0.10", "172.20.0.5", timeout=1.0) is None
    assert not seen_b.exists() or seen_b.read_text().split() == []
    assert counter(lab, "dropped_unclassified") > before
    # The partners kept are served as before.
    lab.serve("pa", "A")
    assert lab.connect("inst", "10.1.0.10", APP) == "A"
