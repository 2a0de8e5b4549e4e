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


def _mss_clamp(mss: int) -> list[str]:
    """The forward chain's clamp of both directions' SYNs to the partners' networks, so the ESP
    overhead never forces fragmentation (one partner's table and several partners' alike)."""
    # The SYN test first: most packets are not SYNs and skip the set lookup.
    return [
        f"    tcp flags syn ip {side} @partner_nets tcp option maxseg size > {mss} "
        f"tcp option maxseg size set {mss}"
        for side in ("daddr", "saddr")
    ]


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
        *_mss_clamp(base.mss),
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


# --- Several partners (issue 23): a separate renderer; the single-partner functions above are
# unchanged byte for byte and still what a deployment without a partners file applies.
#
# Every packet is classified once, at prerouting priority mangle (before any NAT), into a
# partner and a direction, by two interval maps (one lookup each, whatever the number of
# partners): toward a partner by the address the instance used (``ip daddr``: the partner's
# real network, or its alias), from a partner by ``ip daddr . ip saddr``: the S it is sent to
# and its real network. Two partners whose real networks overlap never share an S (the
# partners file refuses it, and so does MultiPartnerBase), so the pair tells them apart even
# when all their packets come through one interface (kernel policy-based ESP, the outer
# interface; the lab's libipsec, ipsec0): no XFRM interface per partner is needed. A partner
# whose real networks overlap no other's is classified by its source alone (``0.0.0.0/0 . net``:
# one element per network, however many S it has). The class is the packet mark; every later
# chain dispatches on it with a verdict map, so a new flow walks one jump per hook, never a list
# of partners.
#
# Outbound, which tunnel carries a packet is decided by the kernel's IPsec policies, after NAT:
# a forwarded packet's policy lookup (before the forward hook) sees the instance's P, which no
# policy names; once SNAT has rewritten the source to the partner's S, nf_nat re-looks-up the
# route and its transform (``nf_xfrm_me_harder``, net/netfilter/nf_nat_proto.c, called from
# ``nf_nat_ipv4_out`` when the NAT changed an address), and the policy S -> real network picks
# the partner's tunnel. Two partners behind the same real address are two policies with two
# sources. Route-based tunnels (an XFRM interface per partner) would instead route by the mark
# (``ip rule fwmark out_mark(i)``).
#
# Aliases (a partner whose networks overlap another's or our VPC): instances address the alias;
# on the way out ``dnat ip prefix to`` maps alias -> real network keeping the host bits, on
# partner-initiated flows ``snat ip prefix to`` maps the partner's real source -> alias, so an
# instance never sees a partner's real (overlapping) address. Prefix NAT (``dnat ip prefix to
# ip daddr map { 100.64.1.0/24 : 10.0.0.0/24 }``: iptables' NETMAP) is not described by nft(8) of
# Debian 12's nft 1.0.6 (its NAT statements list no ``prefix``), but that nft parses it and the
# kernel keeps the host bits: tests/unit/test_nat_partners.py loads it (nft -c and nft -f) and
# test_nat_partners_packets.py sends real packets through it (100.64.1.5 <-> 10.0.0.5).
#
# Return traffic needs no partner rule: conntrack undoes the NAT of the flow it belongs to.
# Partner-initiated flows are DNATed through that partner's own S -> P map, so an S shared by
# partners whose networks do not overlap (each partner whitelists only its own) is fine.

OUT_MARK_BASE = 0x7E000000  # toward partner i: OUT_MARK_BASE + i; from it: IN_MARK_BASE + i
IN_MARK_BASE = 0x7F000000
MARK_CLASS = 0xFF000000  # the bits saying toward (OUT_MARK_BASE) or from (IN_MARK_BASE)
PARTNER_NAME_MAX = 24


@dataclass(frozen=True)
class PartnerNat:
    """One partner's part of the NAT table: its real networks, their aliases (same order and
    prefix length, or none), its NAT mode and the public addresses S it may see (its pool, or
    its shared address: what its packets to us are sent to)."""

    name: str
    networks: tuple[IPv4Network, ...]
    nat_mode: str = "dedicated"
    shared_address: IPv4Address | None = None
    aliases: tuple[IPv4Network, ...] = ()
    # Empty: not declared (then the partner's networks must overlap no other partner's).
    public_addresses: tuple[IPv4Address, ...] = ()

    def __post_init__(self) -> None:
        if not _is_partner_name(self.name):
            raise NatTableError(f"invalid partner name {self.name!r}")
        where = f"partner {self.name}"
        if self.nat_mode not in MODES:
            raise NatTableError(f"{where}: nat_mode must be one of {', '.join(MODES)}")
        if not self.networks:
            raise NatTableError(f"{where}: networks must not be empty")
        if self.nat_mode == "shared" and self.shared_address is None:
            raise NatTableError(f"{where}: nat_mode 'shared' needs shared_address")
        if self.aliases:
            if len(self.aliases) != len(self.networks):
                raise NatTableError(f"{where}: one alias per network")
            for real, alias in zip(self.networks, self.aliases, strict=True):
                if real.prefixlen != alias.prefixlen:
                    # Prefix NAT keeps the host bits: a 1:1 map needs equal prefix lengths.
                    raise NatTableError(f"{where}: alias {alias} is not the size of {real}")

    @property
    def addressed(self) -> tuple[IPv4Network, ...]:
        """What instances address: the aliases, or the real networks."""
        return self.aliases or self.networks

    @property
    def faces(self) -> tuple[IPv4Address, ...]:
        """Every S this partner may send to: the declared ones, else the shared address."""
        if self.public_addresses:
            return self.public_addresses
        return (self.shared_address,) if self.shared_address is not None else ()

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "networks": [str(n) for n in self.networks],
            "nat_mode": self.nat_mode,
            "shared_address": str(self.shared_address) if self.shared_address else None,
            "aliases": [str(n) for n in self.aliases],
            "public_addresses": [str(a) for a in self.public_addresses],
        }

    @classmethod
    def from_json(cls, data: dict) -> PartnerNat:
        shared = data.get("shared_address")
        return cls(
            name=str(data["name"]),
            networks=tuple(ipaddress.IPv4Network(n) for n in data["networks"]),
            nat_mode=str(data.get("nat_mode", "dedicated")),
            shared_address=ipaddress.IPv4Address(shared) if shared else None,
            aliases=tuple(ipaddress.IPv4Network(n) for n in data.get("aliases") or ()),
            public_addresses=tuple(
                ipaddress.IPv4Address(a) for a in data.get("public_addresses") or ()
            ),
        )


@dataclass(frozen=True)
class MultiPartnerBase:
    """The parts of the several-partner ruleset that change only on (re)configuration.

    ``tunnel_interfaces``: None for kernel ESP (the guard asks the route for an IPsec transform,
    as today's), else the interfaces partner-bound packets may leave by (libipsec's TUN device;
    route-based XFRM interfaces; the tests' stand-in veths)."""

    partners: tuple[PartnerNat, ...]
    mss: int = 1360
    tunnel_interfaces: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not self.partners:
            raise NatTableError("partners must not be empty")
        names = [p.name for p in self.partners]
        if len(set(names)) != len(names):
            raise NatTableError("duplicate partner names")
        if not 536 <= int(self.mss) <= 1460:
            raise NatTableError(f"mss must be between 536 and 1460, not {self.mss}")
        if self.tunnel_interfaces is not None:
            if not self.tunnel_interfaces or not all(map(_is_ifname, self.tunnel_interfaces)):
                raise NatTableError("invalid tunnel interfaces")
        # The two classifying maps must be unambiguous: what instances address is unique
        # across partners, and so is (S, real source network).
        _refuse_overlap(((p.name, str(n)), n) for p in self.partners for n in p.addressed)
        for i, p in enumerate(self.partners):
            for q in self.partners[:i]:
                clash = next((n for n in p.networks for m in q.networks if n.overlaps(m)), None)
                if clash is None:
                    continue
                where = f"partner {p.name}'s {clash} overlaps partner {q.name}'s networks"
                if not p.faces or not q.faces:
                    raise NatTableError(
                        f"{where}: both need their public addresses declared (their S tell "
                        "them apart)"
                    )
                shared = sorted(set(p.faces) & set(q.faces))
                if shared:
                    raise NatTableError(
                        f"{where} and both have {shared[0]}: their IPsec policies would be the "
                        "same; give one of them its own S"
                    )

    def index(self, name: str) -> int:
        """The partner's number (1-based, in declaration order): its marks."""
        for i, partner in enumerate(self.partners, 1):
            if partner.name == name:
                return i
        raise NatTableError(f"no partner {name!r}")

    def partner(self, name: str) -> PartnerNat:
        return self.partners[self.index(name) - 1]

    def overlapping(self, name: str) -> bool:
        """Whether the partner's real networks overlap another partner's (its classifier then
        needs its S)."""
        p = self.partner(name)
        return any(
            q.name != name and n.overlaps(m)
            for q in self.partners
            for n in p.networks
            for m in q.networks
        )

    def to_json(self) -> dict:
        return {
            "partners": [p.to_json() for p in self.partners],
            "mss": self.mss,
            "tunnel_interfaces": (
                None if self.tunnel_interfaces is None else list(self.tunnel_interfaces)
            ),
        }

    @classmethod
    def from_json(cls, data: dict) -> MultiPartnerBase:
        interfaces = data.get("tunnel_interfaces")
        return cls(
            partners=tuple(PartnerNat.from_json(p) for p in data["partners"]),
            mss=int(data.get("mss", 1360)),
            tunnel_interfaces=None if interfaces is None else tuple(map(str, interfaces)),
        )


def out_mark(index: int) -> int:
    return OUT_MARK_BASE + index


def in_mark(index: int) -> int:
    return IN_MARK_BASE + index


def render_partners_table(
    base: MultiPartnerBase, tables: dict[str, NatTable], table_name: str = TABLE
) -> str:
    """The whole several-partner table as one ``nft -f`` transaction replacing any old one.
    ``tables``: each partner's mappings (a partner without an entry has none yet)."""
    unknown = set(tables) - {p.name for p in base.partners}
    if unknown:
        raise NatTableError(f"mappings for undeclared partners: {', '.join(sorted(unknown))}")
    t = table_name
    real_nets = _collapse(n for p in base.partners for n in p.networks)
    out = [
        f"table ip {t}",
        f"delete table ip {t}",
        f"table ip {t} {LB}",
        *_declare_interval("set", "partner_nets", "ipv4_addr", real_nets),
        *_declare_interval(
            "map",
            "out_class",
            "ipv4_addr : mark",
            [f"{n} : {out_mark(i)}" for i, p in enumerate(base.partners, 1) for n in p.addressed],
        ),
        *_declare_interval(
            "map",
            "in_class",
            "ipv4_addr . ipv4_addr : mark",
            [
                f"{s} . {n} : {in_mark(i)}"
                for i, p in enumerate(base.partners, 1)
                for s in (p.faces if base.overlapping(p.name) else ("0.0.0.0/0",))
                for n in p.networks
            ],
        ),
    ]
    # Every partner's applied, as a whole: EMPTY means nothing applied since boot (the boot
    # ruleset; the health and pair agents read it as today's). Its value once set: the sum of
    # the partners' generations then (each partner's own state is applied_<name>).
    total = sum(x.generation for x in tables.values())
    out += _declare("set", "applied_generation", "mark", [str(total)])
    dispatch: dict[str, list[str]] = {"pre": [], "fwd": [], "post": []}
    chains: list[str] = []
    for i, p in enumerate(base.partners, 1):
        table = tables.get(p.name)
        if table is None:  # not `or`: an empty NatTable is falsy (len 0)
            table = NatTable(0, nat_mode=p.nat_mode)
        if table.nat_mode != p.nat_mode:
            raise NatTableError(
                f"partner {p.name}: table is for mode {table.nat_mode!r}, not {p.nat_mode!r}"
            )
        n = _ident(p.name)
        out += [
            *_declare("set", f"enrolled_{n}", "ipv4_addr", _elements_enrolled(table)),
            *_declare("map", f"snat_{n}", "ipv4_addr : ipv4_addr", _elements_snat(table)),
            *_declare("map", f"dnat_{n}", "ipv4_addr : ipv4_addr", _elements_dnat(table)),
            *_declare("set", f"applied_{n}", "mark . mark . mark", [state_element(table)]),
            f"  counter dropped_unenrolled_{n} {LB} {RB}",
            f"  counter dropped_inbound_{n} {LB} {RB}",
        ]
        om, im = out_mark(i), in_mark(i)
        if p.aliases:
            pairs = ", ".join(f"{a} : {r}" for r, a in zip(p.networks, p.aliases, strict=True))
            back = ", ".join(f"{r} : {a}" for r, a in zip(p.networks, p.aliases, strict=True))
            dispatch["pre"].append(f"{om} : jump pre_out_{n}")
            chains += _chain(f"pre_out_{n}", [f"dnat ip prefix to ip daddr map {LB} {pairs} {RB}"])
            dispatch["post"].append(f"{im} : jump post_in_{n}")
            chains += _chain(f"post_in_{n}", [f"snat ip prefix to ip saddr map {LB} {back} {RB}"])
        if p.nat_mode != "shared":
            # Partner-initiated: only to an S this partner has, to that S's one instance.
            dispatch["pre"].append(f"{im} : jump pre_in_{n}")
            chains += _chain(f"pre_in_{n}", [f"dnat to ip daddr map @dnat_{n}"])
        dispatch["post"].append(f"{om} : jump post_out_{n}")
        if p.nat_mode == "shared":
            snat = f"ip saddr @enrolled_{n} snat to {p.shared_address}"
        else:
            snat = f"snat to ip saddr map @snat_{n}"
        chains += _chain(f"post_out_{n}", [snat])
        dispatch["fwd"] += [f"{om} : jump fwd_out_{n}", f"{im} : jump fwd_in_{n}"]
        chains += _chain(
            f"fwd_out_{n}",
            [f"ip saddr != @enrolled_{n} counter name dropped_unenrolled_{n} drop", "accept"],
        )
        chains += _chain(
            f"fwd_in_{n}",
            [
                "ct state established,related accept",
                "ct status dnat accept",
                f"counter name dropped_inbound_{n} drop",
            ],
        )
    out += [
        *_declare("map", "pre_dispatch", "mark : verdict", dispatch["pre"]),
        *_declare("map", "fwd_dispatch", "mark : verdict", dispatch["fwd"]),
        *_declare("map", "post_dispatch", "mark : verdict", dispatch["post"]),
        "  counter dropped_cleartext { }",
        "  counter dropped_unclassified { }",
        *chains,
        "  chain classify {",
        "    type filter hook prerouting priority mangle; policy accept;",
        # Toward a partner first, and it wins: an instance's packet may come from a partner's
        # real network (ours overlaps it: that partner is reached through its alias), while a
        # partner's packet never goes to an address instances use for a partner (its
        # destination is an S, never inside a partner's network or alias). accept ends only
        # this chain; an outbound packet so costs one lookup, not two (the concatenated
        # in_class grows with the partners). Without a match, a map statement leaves the mark
        # as it is and ends its rule.
        "    meta mark set ip daddr map @out_class accept",
        "    meta mark set ip daddr . ip saddr map @in_class",
        "  }",
        "  chain prerouting {",
        "    type nat hook prerouting priority dstnat; policy accept;",
        "    meta mark vmap @pre_dispatch",
        "  }",
        "  chain postrouting {",
        "    type nat hook postrouting priority srcnat; policy accept;",
        "    meta mark vmap @post_dispatch",
        "  }",
        "  chain forward {",
        "    type filter hook forward priority filter; policy accept;",
        *_mss_clamp(base.mss),
        "    meta mark vmap @fwd_dispatch",
        # What no partner claims is never forwarded: a partner's real network addressed directly
        # when that partner is reached through its alias only; from a partner's network to none
        # of that partner's S (overlapping partners are told apart by S); and traffic for a
        # partner removed by redeploy, which its instances' host routes still send to G until
        # they are untagged (no lane reconciles them any more) and which no set names now.
        "    counter name dropped_unclassified drop",
        "  }",
        "  chain guard {",
        "    type filter hook postrouting priority 110; policy accept;",
        # Classified as coming from a partner (the forward chain let only its replies and its
        # DNATed flows through): toward our instances, which may lie inside a partner's real
        # network when that partner is reached through its alias. Everything else for a
        # partner's real network leaves inside a tunnel or not at all.
        f"    meta mark & {MARK_CLASS:#x} == {IN_MARK_BASE:#x} accept",
        _partners_guard_rule(base),
        "  }",
        "}",
    ]
    return "\n".join(out) + "\n"


def render_partner_delta(
    name: str,
    removes: Iterable[tuple[str, str]],
    adds: Iterable[tuple[str, str]],
    state: tuple[int, int, int],
    nat_mode: str = "dedicated",
    table_name: str = TABLE,
    retire: Iterable[tuple[int, int, int]] = (),
) -> str:
    """One partner's change as element deletions and creations in one ``nft -f`` transaction:
    only ``enrolled_<name>``, ``snat_<name>``, ``dnat_<name>`` and ``applied_<name>`` are
    named (``-`` in the name reads ``_``), never another partner's. ``removes``/``adds``:
    ``(private, public)`` rows; ``state``: the partner's generation . checksum . count once
    applied (``NatDelta.state_after``: no walk over the partner's other mappings), ADDED to
    ``applied_<name>``: the element with the highest generation is the partner's state. Not
    flushed each time: deleting an element costs the kernel's commit ~10 ms more than adding
    one (measured here: bench/partners.py; 50 x 1,000, a one-element delete ~15 ms vs an add
    ~5 ms), which would triple a one-mapping change. ``retire``: earlier states to delete in the
    same transaction (the caller's batch, e.g. every 64 generations; a full render leaves one).
    ``create`` refuses an element that exists and ``delete`` one that does not, so a delta that
    does not fit is refused whole."""
    if not _is_partner_name(name):
        raise NatTableError(f"invalid partner name {name!r}")
    t, n = table_name, _ident(name)
    shared = nat_mode == "shared"
    removes, adds = list(removes), list(adds)
    for p, s in (*removes, *adds):
        ipv4_int(p), ipv4_int(s)
    out: list[str] = []
    for verb, rows in (("delete", removes), ("create", adds)):
        if not rows:
            continue
        enrolled = ", ".join(p for p, _ in rows)
        out.append(f"{verb} element ip {t} enrolled_{n} {LB} {enrolled} {RB}")
        if not shared:
            snat = ", ".join(f"{p} : {s}" for p, s in rows)
            dnat = ", ".join(f"{s} : {p}" for p, s in rows)
            if verb == "delete":
                # Deleting a map element names its key only.
                snat = ", ".join(p for p, _ in rows)
                dnat = ", ".join(s for _, s in rows)
            out.append(f"{verb} element ip {t} snat_{n} {LB} {snat} {RB}")
            out.append(f"{verb} element ip {t} dnat_{n} {LB} {dnat} {RB}")
    out.append(f"add element ip {t} applied_{n} {LB} {' . '.join(map(str, state))} {RB}")
    old = ", ".join(" . ".join(map(str, r)) for r in retire)
    if old:
        out.append(f"delete element ip {t} applied_{n} {LB} {old} {RB}")
    return "\n".join(out) + "\n"


def render_partner_map_update(name: str, table: NatTable, table_name: str = TABLE) -> str:
    """Replace one partner's sets and maps (never the chains, never another partner's) in one
    atomic ``nft -f`` transaction: its full rebuild after a gap or drift, or at boot. Its
    ``applied_<name>`` is left with the one state of ``table``."""
    if not _is_partner_name(name):
        raise NatTableError(f"invalid partner name {name!r}")
    t, n = table_name, _ident(name)
    out = [
        f"flush set ip {t} enrolled_{n}",
        f"flush map ip {t} snat_{n}",
        f"flush map ip {t} dnat_{n}",
        f"flush set ip {t} applied_{n}",
    ]
    for kind, elements in (
        (f"enrolled_{n}", _elements_enrolled(table)),
        (f"snat_{n}", _elements_snat(table)),
        (f"dnat_{n}", _elements_dnat(table)),
        (f"applied_{n}", [state_element(table)]),
    ):
        if elements:
            out += [f"add element ip {t} {kind} {LB}", _element_block(elements), RB]
    return "\n".join(out) + "\n"


def partner_set_names(name: str) -> tuple[str, str, str, str]:
    """The partner's ``enrolled``, ``snat``, ``dnat`` and ``applied`` set and map names."""
    n = _ident(name)
    return f"enrolled_{n}", f"snat_{n}", f"dnat_{n}", f"applied_{n}"


def _partners_guard_rule(base: MultiPartnerBase) -> str:
    # Every partner's real networks, after SNAT: inside a tunnel or not at all (today's guard,
    # for all partners at once: one set lookup).
    # The per-packet test first, the set lookup only for what would leave outside a tunnel:
    # every partner-bound packet that does leave inside one skips it.
    if base.tunnel_interfaces is None:
        return "    rt ipsec missing ip daddr @partner_nets counter name dropped_cleartext drop"
    ifs = ", ".join(f'"{i}"' for i in base.tunnel_interfaces)
    return (
        f"    oifname != {LB} {ifs} {RB} ip daddr @partner_nets counter name dropped_cleartext drop"
    )


def _declare_interval(kind: str, name: str, type_: str, elements: list[str]) -> list[str]:
    lines = [f"  {kind} {name} {LB}", f"    type {type_}; flags interval;"]
    if elements:
        lines += ["    elements = {", _element_block(elements), "    }"]
    lines.append("  }")
    return lines


def _chain(name: str, rules: list[str]) -> list[str]:
    return [f"  chain {name} {LB}", *(f"    {r}" for r in rules), "  }"]


def _collapse(networks: Iterable[IPv4Network]) -> list[str]:
    # Two partners may share a real network: an interval set refuses the same range twice.
    return [str(n) for n in ipaddress.collapse_addresses(networks)]


def _refuse_overlap(items: Iterable[tuple[tuple[str, str], IPv4Network]], where: str = "") -> None:
    seen: list[tuple[tuple[str, str], IPv4Network]] = []
    for label, net in items:
        for other, other_net in seen:
            if other[0] != label[0] and net.overlaps(other_net):
                raise NatTableError(
                    f"partner {label[0]}'s {label[1]} overlaps partner {other[0]}'s "
                    f"{other[1]}{where}: give one of them an alias"
                )
        seen.append((label, net))


def _ident(name: str) -> str:
    # nft identifiers take no '-'; partner names take no '_': the mapping is one to one.
    return name.replace("-", "_")


def _is_partner_name(name: str) -> bool:
    # ^[a-z][a-z0-9-]{0,22}[a-z0-9]$ (the plan's contract), without re (import cost on the gateway)
    return (
        2 <= len(name) <= PARTNER_NAME_MAX
        and name[0].isascii()
        and name[0].islower()
        and name[-1] != "-"
        and all(c.isascii() and (c.islower() or c.isdigit() or c == "-") for c in name)
    )
