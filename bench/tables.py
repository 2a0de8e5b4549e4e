"""Synthetic NAT tables of any size, rendered the tunnelnat way and the seed's way.

Addresses: the partner network A is 192.0.2.0/24 and the public addresses S of the sources the
new-connection test sends from are in 203.0.113.0/24 (documentation ranges). 10,000 distinct
public addresses do not fit in the three documentation /24s, so the *filler* mappings (present in
the table, never in a packet) take theirs from 198.18.0.0/15, the range RFC 2544 reserves for
benchmarking. Private addresses are 10.20.1.0/24 (measured sources) and 10.100.0.0/16 (fillers).

Order matters for linear rules: the measured sources come LAST, so a packet from them walks every
other rule first (the seed's worst case; nftables maps do not care).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv4Network

from tunnelnat.core.nat import GatewayBase, NatMapping, NatTable, render_nat_table

PARTNER_NET = IPv4Network("192.0.2.0/24")
APP = IPv4Address("192.0.2.80")
GW_PARTNER_SIDE = IPv4Address("192.0.2.1")
CLIENT_NET = "10.20.0.0/16"
GW_CLIENT_SIDE = IPv4Address("10.20.0.1")
MEASURED_MAX = 254
_FILLER_PRIVATE = int(IPv4Address("10.100.0.0"))
_FILLER_PUBLIC = int(IPv4Address("198.18.0.0"))
# A spare public address for one-mapping changes (also RFC 2544 space, never used by a filler).
SPARE_PUBLIC = (IPv4Address("198.19.255.1"), IPv4Address("198.19.255.2"))


def measured_mappings(count: int) -> list[NatMapping]:
    """The sources the load generator sends from: 10.20.1.k -> 203.0.113.k, k = 1..count."""
    if not 0 <= count <= MEASURED_MAX:
        raise ValueError(f"at most {MEASURED_MAX} measured sources")
    return [
        NatMapping(IPv4Address(f"10.20.1.{k}"), IPv4Address(f"203.0.113.{k}"))
        for k in range(1, count + 1)
    ]


def filler_mappings(count: int) -> list[NatMapping]:
    if not 0 <= count <= 65_000:
        raise ValueError("at most 65,000 filler mappings")
    return [
        NatMapping(IPv4Address(_FILLER_PRIVATE + i), IPv4Address(_FILLER_PUBLIC + i))
        for i in range(count)
    ]


def mappings(total: int, measured: int = MEASURED_MAX) -> list[NatMapping]:
    """``total`` mappings, fillers first and the (at most ``measured``) measured sources last."""
    measured = min(measured, total)
    return filler_mappings(total - measured) + measured_mappings(measured)


def gateway_base(tunnel_interface: str | None = "eth1") -> GatewayBase:
    """The gateway's base with the guard on ``tunnel_interface``: in the benchmark the egress
    device to the partner plays the tunnel, so the guard passes what it should."""
    return GatewayBase(partner_networks=(PARTNER_NET,), tunnel_interface=tunnel_interface)


def nat_table(maps: Sequence[NatMapping], generation: int = 1) -> NatTable:
    return NatTable(generation=generation, mappings=tuple(maps))


def render_nft(maps: Sequence[NatMapping], generation: int = 1, tunnel: str = "eth1") -> str:
    return render_nat_table(gateway_base(tunnel), nat_table(maps, generation))


def snat_spec(m: NatMapping) -> list[str]:
    return ["-s", f"{m.private_ip}/32", "-d", str(PARTNER_NET), "-j", "SNAT",
            "--to-source", str(m.public_ip)]  # fmt: skip


def dnat_spec(m: NatMapping) -> list[str]:
    return ["-s", str(PARTNER_NET), "-d", f"{m.public_ip}/32", "-j", "DNAT",
            "--to-destination", str(m.private_ip)]  # fmt: skip


def linear_rules(maps: Sequence[NatMapping]) -> list[tuple[str, list[str]]]:
    """The seed's rules, corrected (``-A``, ``--to-source``): one SNAT and one DNAT per mapping,
    in the order given. Each item is (chain, rule spec)."""
    rules: list[tuple[str, list[str]]] = []
    for m in maps:
        rules.append(("POSTROUTING", snat_spec(m)))
        rules.append(("PREROUTING", dnat_spec(m)))
    return rules


def iptables_restore_text(rules: Sequence[tuple[str, list[str]]]) -> str:
    """The same linear rules as one ``iptables-restore`` file (replaces the nat table)."""
    lines = [
        "*nat",
        ":PREROUTING ACCEPT [0:0]",
        ":INPUT ACCEPT [0:0]",
        ":OUTPUT ACCEPT [0:0]",
        ":POSTROUTING ACCEPT [0:0]",
    ]
    lines += [f"-A {chain} {' '.join(spec)}" for chain, spec in rules]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def seed_script(rules: Sequence[tuple[str, list[str]]]) -> str:
    """The seed's way: a shell script with one ``iptables -t nat -A`` process per rule."""
    lines = ["set -e"]
    lines += [f"iptables -t nat -A {chain} {' '.join(spec)}" for chain, spec in rules]
    return "\n".join(lines) + "\n"


def parse_ip(text: str) -> IPv4Address:
    return ipaddress.IPv4Address(text)
