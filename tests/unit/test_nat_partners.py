"""The several-partner NAT rendering: what it refuses, that nft accepts it (``nft -c`` and a load in
a private namespace), that a new flow's path does not grow with the number of partners, and
that one partner's delta names only its own maps and lands on what a full render would hold."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess

import pytest

from tunnelnat.core.nat import (
    MultiPartnerBase,
    NatTable,
    NatTableError,
    PartnerNat,
    render_partner_delta,
    render_partners_table,
)

N = ipaddress.IPv4Network
A = ipaddress.IPv4Address

needs_nft = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("nft") or not shutil.which("unshare"),
    reason="needs root, nft and unshare for a private network namespace",
)


def state(table: NatTable) -> tuple[int, int, int]:
    return (table.generation, table.checksum, len(table))


def partners(count: int, tunnel_interfaces: tuple[str, ...] | None = None) -> MultiPartnerBase:
    return MultiPartnerBase(
        tuple(
            PartnerNat(f"p{i:02d}", (N(f"172.{16 + i // 256}.{i % 256}.0/24"),))
            for i in range(count)
        ),
        tunnel_interfaces=tunnel_interfaces,
    )


def rows(count: int, offset: int = 0) -> list[tuple[str, str]]:
    return [
        (str(A("10.8.0.0") + offset + i), str(A("198.18.0.0") + offset + i)) for i in range(count)
    ]


def overlap_base() -> MultiPartnerBase:
    return MultiPartnerBase(
        (
            PartnerNat("bank-a", (N("10.0.0.0/24"),), public_addresses=(A("203.0.113.10"),)),
            PartnerNat(
                "clear",
                (N("10.0.0.0/24"),),
                aliases=(N("100.64.1.0/24"),),
                public_addresses=(A("203.0.113.11"), A("203.0.113.12")),
            ),
            PartnerNat("bee", (N("172.20.0.0/24"),), "shared", A("203.0.113.30")),
        ),
        tunnel_interfaces=("ipsec0",),
    )


def nft_in_namespace(script: str) -> subprocess.CompletedProcess[str]:
    """Run a shell script with nft in a throwaway network namespace (unshare -n)."""
    return subprocess.run(
        ["unshare", "-n", "sh", "-ec", script], capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda: MultiPartnerBase(
                (
                    PartnerNat("a1", (N("10.0.0.0/24"),)),
                    PartnerNat("c1", (N("10.0.0.0/25"),)),
                )
            ),
            "overlaps partner a1's 10.0.0.0/24",
        ),
        (
            lambda: MultiPartnerBase(
                (
                    PartnerNat("a1", (N("10.0.0.0/24"),)),
                    PartnerNat("c1", (N("10.0.0.0/24"),), aliases=(N("100.64.1.0/24"),)),
                )
            ),
            "both need their public addresses declared",
        ),
        (
            lambda: MultiPartnerBase(
                (
                    PartnerNat("a1", (N("10.0.0.0/24"),), public_addresses=(A("203.0.113.1"),)),
                    PartnerNat(
                        "c1",
                        (N("10.0.0.0/16"),),
                        aliases=(N("100.64.0.0/16"),),
                        public_addresses=(A("203.0.113.2"), A("203.0.113.1")),
                    ),
                )
            ),
            "both have 203.0.113.1: their IPsec policies would be the same",
        ),
        (
            lambda: PartnerNat("c1", (N("10.0.0.0/24"),), aliases=(N("100.64.1.0/25"),)),
            "not the size of",
        ),
        (lambda: PartnerNat("Bank", (N("10.0.0.0/24"),)), "invalid partner name"),
        (lambda: PartnerNat("bank-", (N("10.0.0.0/24"),)), "invalid partner name"),
        (lambda: PartnerNat("b_k", (N("10.0.0.0/24"),)), "invalid partner name"),
        (lambda: PartnerNat("bank", (N("10.0.0.0/24"),), "shared"), "needs shared_address"),
        (
            lambda: MultiPartnerBase(
                (PartnerNat("bank", (N("10.0.0.0/24"),)),), tunnel_interfaces=("bad if",)
            ),
            "invalid tunnel interfaces",
        ),
        (
            lambda: MultiPartnerBase(
                (
                    PartnerNat("a1", (N("10.0.0.0/24"),)),
                    PartnerNat("a1", (N("10.1.0.0/24"),)),
                )
            ),
            "duplicate partner names",
        ),
    ],
)
def test_refuses_ambiguous_partners(make, message: str) -> None:
    with pytest.raises(NatTableError, match=message):
        make()


def test_refuses_tables_of_undeclared_partners_or_another_mode() -> None:
    base = overlap_base()
    with pytest.raises(NatTableError, match="undeclared partners: nobody"):
        render_partners_table(base, {"nobody": NatTable(1)})
    with pytest.raises(NatTableError, match="partner bee: table is for mode"):
        render_partners_table(base, {"bee": NatTable(1)})


def test_a_new_flow_walks_the_same_rules_whatever_the_number_of_partners() -> None:
    """The hooked chains hold the same rules for 1 and 50 partners: dispatch is a map lookup."""

    def hooked(text: str) -> dict[str, list[str]]:
        chains, name = {}, None
        for line in text.splitlines():
            if line.startswith("  chain "):
                name, chains[line.split()[1]] = line.split()[1], []
            elif name and line.startswith("    ") and "hook" not in line:
                chains[name].append(line.strip())
        return {k: v for k, v in chains.items() if "_" not in k}

    one = hooked(render_partners_table(partners(1), {"p00": NatTable.from_rows(1, rows(10))}))
    fifty = hooked(render_partners_table(partners(50), {"p00": NatTable.from_rows(1, rows(10))}))
    assert one == fifty
    assert set(one) == {"classify", "prerouting", "postrouting", "forward", "guard"}


def test_alias_partner_renders_prefix_nat_both_ways() -> None:
    text = render_partners_table(overlap_base(), {})
    assert "dnat ip prefix to ip daddr map { 100.64.1.0/24 : 10.0.0.0/24 }" in text
    assert "snat ip prefix to ip saddr map { 10.0.0.0/24 : 100.64.1.0/24 }" in text
    # The overlapping real network appears once in the guard's set; in the classifier, once per
    # S of each overlapping partner; a partner overlapping nobody by its source alone.
    assert text.count("      10.0.0.0/24,") + text.count("      10.0.0.0/24\n") == 1
    assert "203.0.113.10 . 10.0.0.0/24 : 2130706433" in text  # in_mark(1)
    assert "203.0.113.11 . 10.0.0.0/24 : 2130706434" in text  # in_mark(2)
    assert "203.0.113.12 . 10.0.0.0/24 : 2130706434" in text
    assert "0.0.0.0/0 . 172.20.0.0/24 : 2130706435" in text
    classify = text[text.index("chain classify") :].splitlines()[2:4]
    assert [line.strip() for line in classify] == [
        "meta mark set ip daddr map @out_class accept",  # outbound: one lookup
        "meta mark set ip daddr . ip saddr map @in_class",
    ]
    assert 'oifname != { "ipsec0" }' in text
    # Shared S: no partner-initiated path, SNAT of enrolled sources only.
    assert "ip saddr @enrolled_bee snat to 203.0.113.30" in text
    assert "pre_in_bee" not in text


def test_kernel_backend_guard_is_todays() -> None:
    text = render_partners_table(partners(2), {})
    assert "rt ipsec missing ip daddr @partner_nets counter name dropped_cleartext drop" in text


def test_delta_names_only_the_partners_own_maps() -> None:
    after = NatTable.from_rows(2, [("10.8.0.1", "198.18.0.9")])
    delta = render_partner_delta(
        "p-07", [("10.8.0.1", "198.18.0.1")], [("10.8.0.1", "198.18.0.9")], state(after)
    )
    assert delta.splitlines() == [
        "delete element ip tunnelnat enrolled_p_07 { 10.8.0.1 }",
        "delete element ip tunnelnat snat_p_07 { 10.8.0.1 }",
        "delete element ip tunnelnat dnat_p_07 { 198.18.0.1 }",
        "create element ip tunnelnat enrolled_p_07 { 10.8.0.1 }",
        "create element ip tunnelnat snat_p_07 { 10.8.0.1 : 198.18.0.9 }",
        "create element ip tunnelnat dnat_p_07 { 198.18.0.9 : 10.8.0.1 }",
        f"add element ip tunnelnat applied_p_07 {{ 2 . {after.checksum} . 1 }}",
    ]
    retired = render_partner_delta("p-07", [], [], (3, 5, 1), retire=[(1, 7, 1), (2, 9, 1)])
    assert retired.splitlines() == [
        "add element ip tunnelnat applied_p_07 { 3 . 5 . 1 }",
        "delete element ip tunnelnat applied_p_07 { 1 . 7 . 1, 2 . 9 . 1 }",
    ]
    shared = render_partner_delta("bee", [], [("10.8.0.1", "203.0.113.30")], state(after), "shared")
    assert "snat_" not in shared and "dnat_" not in shared
    with pytest.raises(ValueError):
        render_partner_delta("bee", [], [("10.8.0.01", "203.0.113.30")], (2, 0, 1))


@needs_nft
@pytest.mark.parametrize("interfaces", [None, ("ipsec0",)])
def test_nft_accepts_the_table(tmp_path, interfaces) -> None:
    base = partners(50, interfaces)
    tables = {p.name: NatTable.from_rows(1, rows(20, 20 * i)) for i, p in enumerate(base.partners)}
    (tmp_path / "t.nft").write_text(render_partners_table(base, tables))
    (tmp_path / "o.nft").write_text(render_partners_table(overlap_base(), {}))
    proc = nft_in_namespace(f"nft -c -f {tmp_path}/t.nft; nft -c -f {tmp_path}/o.nft")
    assert proc.returncode == 0, proc.stderr


@needs_nft
def test_delta_lands_where_a_full_render_would(tmp_path) -> None:
    """50 partners loaded; p07 changes (one mapping moved, one removed, one added): the live
    maps are then those of a full render of the new state, other partners' untouched; the same
    delta applied twice is refused whole."""
    base = partners(50)
    old = {p.name: NatTable.from_rows(1, rows(30, 30 * i)) for i, p in enumerate(base.partners)}
    b_rows = list(old["p07"].rows)
    removes = [b_rows[0], b_rows[1]]
    adds = [(b_rows[0][0], "198.18.200.1"), ("10.8.200.2", "198.18.200.2")]
    after_rows = [*adds, *b_rows[2:]]
    new = {**old, "p07": NatTable.from_rows(2, after_rows)}
    (tmp_path / "old.nft").write_text(render_partners_table(base, old))
    (tmp_path / "new.nft").write_text(render_partners_table(base, new))
    (tmp_path / "delta.nft").write_text(
        render_partner_delta("p07", removes, adds, state(new["p07"]), retire=[state(old["p07"])])
    )
    dump = "nft -j list table ip tunnelnat"
    proc = nft_in_namespace(
        f"nft -f {tmp_path}/old.nft; {dump} > {tmp_path}/before.json;"
        f"nft -f {tmp_path}/delta.nft; {dump} > {tmp_path}/delta.json;"
        f"if nft -f {tmp_path}/delta.nft 2>/dev/null; then echo APPLIED-TWICE; fi;"
        f"{dump} > {tmp_path}/again.json;"
        f"nft -f {tmp_path}/new.nft; {dump} > {tmp_path}/full.json"
    )
    assert proc.returncode == 0, proc.stderr
    assert "APPLIED-TWICE" not in proc.stdout

    def elements(name: str) -> dict[str, list]:
        out = {}
        for item in json.loads((tmp_path / name).read_text())["nftables"]:
            obj = item.get("set") or item.get("map")
            if obj:
                out[obj["name"]] = sorted(
                    json.dumps(e, sort_keys=True) for e in obj.get("elem", [])
                )
        return out

    before, delta, again, full = (
        elements(f"{n}.json") for n in ("before", "delta", "again", "full")
    )
    # applied_generation says "applied since boot" (set by a full render, then left alone):
    # a full render of the new state counts one more generation, a delta does not touch it.
    assert (
        delta.pop("applied_generation")
        == again.pop("applied_generation")
        == before["applied_generation"]
    )
    full.pop("applied_generation")
    assert delta == full == again
    changed = {k for k in full if full[k] != before[k]}
    assert changed == {"enrolled_p07", "snat_p07", "dnat_p07", "applied_p07"}
