"""The gateway's NAT table: the desired mappings and their nftables rendering.

Standard library only: embedded in the gateway's documents (``make documents``), so the code the
unit tests exercise is the code that programs the kernel.

One nftables table ``ip tunnelnat``; lookups go through maps and sets (one hash lookup whatever
the number of enrolments); a sync changes the maps in one atomic ``nft -f`` transaction, never
the chains (so never the guard rules). ``applied_state`` holds generation . checksum . mappings:
the checksum is the sum of ``mapping_digest`` over the rows, mod 2**32 (the store's likewise).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from socket import AF_INET
from socket import inet_ntop as _ntop
from socket import inet_pton as _pton

TABLE = "tunnelnat"
# Braces come from these names, never as doubled f-string braces: the documents that embed this
# file would read a double brace as an SSM parameter reference.
LB, RB = "{", "}"
MODES = ("dedicated", "instance", "shared")
APPLIED_SETS = ("applied_generation", "applied_state")
ELEMENT_INDENT = "      "
M32, M64 = 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF
_from_bytes = int.from_bytes


class NatTableError(ValueError):
    """The desired table is inconsistent (e.g. one public address mapped twice)."""


@dataclass(frozen=True, order=True)
class NatMapping:
    """One enrolled instance: its private address P and the public address S it appears as."""

    private_ip: IPv4Address
    public_ip: IPv4Address

    @classmethod
    def parse(cls, private_ip: str, public_ip: str) -> NatMapping:
        return cls(ipaddress.IPv4Address(private_ip), ipaddress.IPv4Address(public_ip))


@dataclass(frozen=True)
class GatewayBase:
    """The parts of the ruleset that change only when the gateway is (re)configured."""

    partner_networks: tuple[IPv4Network, ...]
    nat_mode: str = "dedicated"
    shared_address: IPv4Address | None = None
    mss: int = 1360
    # None: kernel ESP (production), guard on the IPsec policy; a name: userspace ESP through that
    # TUN device (the lab's kernel-libipsec), guard on the output interface.
    tunnel_interface: str | None = None

    def __post_init__(self) -> None:
        if self.nat_mode not in MODES:
            raise NatTableError(
                f"nat_mode must be one of {', '.join(MODES)}, not {self.nat_mode!r}"
            )
        if not self.partner_networks:
            raise NatTableError("partner_networks must not be empty")
        if self.nat_mode == "shared" and self.shared_address is None:
            raise NatTableError("nat_mode 'shared' needs shared_address")
        if self.tunnel_interface is not None and not _is_ifname(self.tunnel_interface):
            raise NatTableError(f"invalid tunnel interface name {self.tunnel_interface!r}")
        if not 536 <= int(self.mss) <= 1460:
            raise NatTableError(f"mss must be between 536 and 1460, not {self.mss}")

    def to_json(self) -> dict:
        return {
            "partner_networks": [str(n) for n in self.partner_networks],
            "nat_mode": self.nat_mode,
            "shared_address": str(self.shared_address) if self.shared_address else None,
            "mss": self.mss,
            "tunnel_interface": self.tunnel_interface,
        }

    @classmethod
    def from_json(cls, data: dict) -> GatewayBase:
        shared = data.get("shared_address")
        return cls(
            partner_networks=tuple(ipaddress.IPv4Network(n) for n in data["partner_networks"]),
            nat_mode=data.get("nat_mode", "dedicated"),
            shared_address=ipaddress.IPv4Address(shared) if shared else None,
            mss=int(data.get("mss", 1360)),
            tunnel_interface=data.get("tunnel_interface"),
        )


def ipv4_int(text: object) -> int:
    """The address as an integer, for a canonical dotted quad only (never ``10.0.0.01``,
    ``10.1``, a name, spaces or punctuation); ValueError else. The gateway's hot loop: done in C,
    and the round trip proves the text is the canonical form nft will be given."""
    try:
        packed = _pton(AF_INET, text)  # type: ignore[arg-type]
        if _ntop(AF_INET, packed) == text:
            return _from_bytes(packed, "big")
    except (OSError, TypeError, ValueError):
        pass
    raise ValueError(f"not an IPv4 address: {str(text)[:60]!r}")


def mapping_digest(private: int, public: int) -> int:
    """32 bits of a mapping: splitmix64's finalizer (swapping two rows' S moves the sum)."""
    x = (private << 32) | public
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return (x ^ (x >> 31)) & M32


class NatTable:
    """The desired mappings at one generation. The constructor refuses an ambiguous table;
    ``from_rows`` (the gateway's reader) leaves the rows out and lists them in ``rejected``.
    Rows are validated canonical text ``(private, public)`` sorted by address (no ``ipaddress``
    object per address on the gateway); ``mappings``: as ``NatMapping`` objects."""

    __slots__ = ("generation", "nat_mode", "rows", "rejected", "checksum", "_mappings")

    def __init__(
        self,
        generation: int,
        mappings: Iterable[NatMapping] = (),
        nat_mode: str = "dedicated",
    ) -> None:
        self._build(generation, ((str(m.private_ip), str(m.public_ip)) for m in mappings), nat_mode)
        if self.rejected:
            raise NatTableError(self.rejected[0][2])

    @classmethod
    def from_rows(
        cls, generation: int, rows: Iterable[tuple[str, str]], nat_mode: str = "dedicated"
    ) -> NatTable:
        """From ``(private, public)`` text pairs (the gateway's path). A row that cannot be
        applied (a malformed address, a P mapped to two S, an S from two P outside shared mode)
        is left out with every row it collides with and listed in ``rejected`` as ``(private,
        public, reason)``: never the whole table refused for one row."""
        table = cls.__new__(cls)
        table._build(generation, rows, nat_mode)
        return table

    def _build(self, generation: int, rows: Iterable[tuple[str, str]], nat_mode: str) -> None:
        if generation < 0:
            raise NatTableError("generation must not be negative")
        by_private: dict[int, tuple[int, str, str]] = {}
        get = by_private.get
        rejected: list[tuple[str, str, str]] = []
        ambiguous: dict[int, set[int]] = {}  # private -> every public it was mapped to
        for private, public in rows:
            try:
                p, s = ipv4_int(private), ipv4_int(public)
            except ValueError as exc:
                rejected.append((str(private)[:60], str(public)[:60], str(exc)))
                continue
            seen = get(p)
            if seen is None:
                by_private[p] = (s, private, public)
            elif seen[0] != s:
                ambiguous.setdefault(p, {seen[0]}).add(s)
        for p, publics in ambiguous.items():
            # Which one is meant cannot be known here: neither is applied.
            del by_private[p]
            a, b = sorted(publics)[:2]
            reason = f"private address {_dotted(p)} is mapped to both {_dotted(a)} and {_dotted(b)}"
            rejected.extend((_dotted(p), _dotted(s), reason) for s in sorted(publics))
        # In shared mode every instance has the same S on purpose (ports tell them apart).
        if nat_mode != "shared" and len({v[0] for v in by_private.values()}) != len(by_private):
            owners: dict[int, list[int]] = {}
            for p in sorted(by_private):
                owners.setdefault(by_private[p][0], []).append(p)
            for s, privates in owners.items():
                if len(privates) > 1:
                    reason = (
                        f"public address {_dotted(s)} is mapped from both "
                        f"{_dotted(privates[0])} and {_dotted(privates[1])}"
                    )
                    for p in privates:
                        del by_private[p]
                        rejected.append((_dotted(p), _dotted(s), reason))
        self.generation = generation
        self.nat_mode = nat_mode
        # Sorted by the private address as a number: a stable order for diffs and tests.
        self.rows: tuple[tuple[str, str], ...] = tuple(
            by_private[p][1:] for p in sorted(by_private)
        )
        self.rejected: tuple[tuple[str, str, str], ...] = tuple(rejected)
        self.checksum = sum(mapping_digest(p, v[0]) for p, v in by_private.items()) & M32
        self._mappings: tuple[NatMapping, ...] | None = None

    @property
    def mappings(self) -> tuple[NatMapping, ...]:
        if self._mappings is None:
            self._mappings = tuple(NatMapping.parse(p, s) for p, s in self.rows)
        return self._mappings

    @property
    def dnat_mappings(self) -> tuple[NatMapping, ...]:
        # Shared mode has no DNAT: one S cannot say which instance a new inbound flow is for.
        return () if self.nat_mode == "shared" else self.mappings

    def __len__(self) -> int:
        return len(self.rows)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, NatTable):
            return NotImplemented
        return (self.generation, self.nat_mode, self.rows) == (
            other.generation,
            other.nat_mode,
            other.rows,
        )

    def __hash__(self) -> int:
        return hash((self.generation, self.nat_mode, self.rows))

    def __repr__(self) -> str:
        return (
            f"NatTable(generation={self.generation}, mappings={len(self.rows)}, "
            f"nat_mode={self.nat_mode!r})"
        )


def render_nat_table(base: GatewayBase, table: NatTable) -> str:
    """The whole ``ip tunnelnat`` table as one ``nft -f`` transaction that replaces any old one."""
    if base.nat_mode != table.nat_mode:
        raise NatTableError(f"table is for mode {table.nat_mode!r}, gateway is {base.nat_mode!r}")
    nets = ", ".join(str(n) for n in base.partner_networks)
    out = [
        # Declaring the table first makes the delete succeed when it does not exist yet.
        f"table ip {TABLE}",
        f"delete table ip {TABLE}",
        f"table ip {TABLE} {LB}",
        "  set partner_nets {",
        "    type ipv4_addr; flags interval;",
        f"    elements = {LB} {nets} {RB}",
        "  }",
        *_declare("set", "enrolled", "ipv4_addr", _elements_enrolled(table)),
        *_declare("map", "snat_map", "ipv4_addr : ipv4_addr", _elements_snat(table)),
        *_declare("map", "dnat_map", "ipv4_addr : ipv4_addr", _elements_dnat(table)),
        *_declare("set", "applied_generation", "mark", [str(table.generation)]),
        *_declare("set", "applied_state", "mark . mark . mark", [state_element(table)]),
        "  counter dropped_unenrolled { }",
        "  counter dropped_inbound { }",
        "  counter dropped_cleartext { }",
        "  chain prerouting {",
        "    type nat hook prerouting priority dstnat; policy accept;",
        "    ip saddr @partner_nets dnat to ip daddr map @dnat_map",
        "  }",
        "  chain postrouting {",
        "    type nat hook postrouting priority srcnat; policy accept;",
        *_snat_rules(base),
        "  }",
        "  chain forward {",
        "    type filter hook forward priority filter; policy accept;",
        # Clamp both directions' SYNs so the ESP overhead never forces fragmentation.
        f"    ip daddr @partner_nets tcp flags syn tcp option maxseg size > {base.mss} "
        f"tcp option maxseg size set {base.mss}",
        f"    ip saddr @partner_nets tcp flags syn tcp option maxseg size > {base.mss} "
        f"tcp option maxseg size set {base.mss}",
        # Only enrolled instances may reach the partner, host route or not.
        "    ip daddr @partner_nets ip saddr != @enrolled counter name dropped_unenrolled drop",
        # From the partner: replies, and new flows DNATed to the one instance mapped to S.
        "    ip saddr @partner_nets ct state established,related accept",
        "    ip saddr @partner_nets ct status dnat accept",
        "    ip saddr @partner_nets counter name dropped_inbound drop",
        "  }",
        # After SNAT (priority srcnat + 10): a packet for the partner leaves inside the tunnel
        # or not at all, whatever state the IKE daemon is in.
        "  chain guard {",
        "    type filter hook postrouting priority 110; policy accept;",
        _guard_rule(base),
        "  }",
        "}",
    ]
    return "\n".join(out) + "\n"


def render_map_update(table: NatTable) -> str:
    """Replace the maps' contents (never the chains) in one atomic ``nft -f`` transaction."""
    out = [
        f"flush set ip {TABLE} enrolled",
        f"flush map ip {TABLE} snat_map",
        f"flush map ip {TABLE} dnat_map",
        *(f"flush set ip {TABLE} {name}" for name in APPLIED_SETS),
    ]
    for name, elements in (
        ("enrolled", _elements_enrolled(table)),
        ("snat_map", _elements_snat(table)),
        ("dnat_map", _elements_dnat(table)),
        ("applied_generation", [str(table.generation)]),
        ("applied_state", [state_element(table)]),
    ):
        if elements:
            out.append(f"add element ip {TABLE} {name} {LB}")
            out.append(_element_block(elements))
            out.append(RB)
    return "\n".join(out) + "\n"


def state_element(table: NatTable) -> str:
    return f"{table.generation} . {table.checksum} . {len(table.rows)}"


def _snat_rules(base: GatewayBase) -> list[str]:
    if base.nat_mode == "shared":
        return [f"    ip daddr @partner_nets ip saddr @enrolled snat to {base.shared_address}"]
    return ["    ip daddr @partner_nets snat to ip saddr map @snat_map"]


def _guard_rule(base: GatewayBase) -> str:
    if base.tunnel_interface is None:
        # Kernel ESP: after SNAT the route is re-looked-up against the IPsec policies; a packet
        # whose route carries no transform would leave in clear text.
        return "    ip daddr @partner_nets rt ipsec missing counter name dropped_cleartext drop"
    return (
        f'    ip daddr @partner_nets oifname != "{base.tunnel_interface}" '
        "counter name dropped_cleartext drop"
    )


def _declare(kind: str, name: str, type_: str, elements: list[str]) -> list[str]:
    lines = [f"  {kind} {name} {LB}", f"    type {type_};"]
    if elements:
        lines += ["    elements = {", _element_block(elements), "    }"]
    lines.append("  }")
    return lines


def _element_block(elements: list[str]) -> str:
    # One join for the whole block: no per-element formatting in Python.
    return ELEMENT_INDENT + (",\n" + ELEMENT_INDENT).join(elements)


def _elements_enrolled(table: NatTable) -> list[str]:
    return [p for p, _ in table.rows]


def _elements_snat(table: NatTable) -> list[str]:
    if table.nat_mode == "shared":
        return []
    return list(map(" : ".join, table.rows))


def _elements_dnat(table: NatTable) -> list[str]:
    if table.nat_mode == "shared":
        return []
    return [f"{s} : {p}" for p, s in table.rows]


def _dotted(value: int) -> str:
    return _ntop(AF_INET, value.to_bytes(4, "big"))


def _is_ifname(name: str) -> bool:
    return 0 < len(name) < 16 and all(c.isalnum() or c in "-_." for c in name)
