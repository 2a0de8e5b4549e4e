from __future__ import annotations

import ipaddress
import shutil
import subprocess

import pytest

from tunnelnat.core.nat import (
    GatewayBase,
    NatMapping,
    NatTable,
    NatTableError,
    ipv4_int,
    render_map_update,
    render_nat_table,
)

PARTNER = (ipaddress.IPv4Network("192.0.2.0/24"),)


def mappings(n: int) -> tuple[NatMapping, ...]:
    private = ipaddress.IPv4Network("10.10.0.0/16")
    public = ipaddress.IPv4Network("100.64.0.0/16")  # large enough for 10,000 distinct S
    return tuple(NatMapping(private[i + 10], public[i + 10]) for i in range(n))


def base(**overrides) -> GatewayBase:
    return GatewayBase(partner_networks=PARTNER, **overrides)


GUARD_KERNEL = "ip daddr @partner_nets rt ipsec missing counter name dropped_cleartext drop"
ONLY_ENROLLED = "ip daddr @partner_nets ip saddr != @enrolled counter name dropped_unenrolled drop"


@pytest.mark.parametrize("n", [0, 1, 10_000])
def test_full_table_uses_maps_and_keeps_the_guards(n):
    text = render_nat_table(base(), NatTable(7, mappings(n)))
    assert "snat to ip saddr map @snat_map" in text
    assert "dnat to ip daddr map @dnat_map" in text
    assert GUARD_KERNEL in text
    assert ONLY_ENROLLED in text
    assert "tcp option maxseg size set 1360" in text
    # One rule per purpose whatever the size: per-packet cost does not grow with the table.
    assert text.count("snat to") == 1
    assert text.count(" : ") == 2 * n + 2  # two maps' elements + the two map type lines
    assert text.startswith("table ip tunnelnat\ndelete table ip tunnelnat\n")


@pytest.mark.parametrize("n", [0, 1, 10_000])
def test_map_update_replaces_contents_and_never_the_chains(n):
    text = render_map_update(NatTable(8, mappings(n)))
    assert "chain" not in text
    assert "delete" not in text
    assert "flush map ip tunnelnat snat_map" in text
    assert "flush set ip tunnelnat enrolled" in text
    assert "add element ip tunnelnat applied_generation {\n      8\n}" in text
    assert text.count(" : ") == 2 * n


def test_lab_guard_matches_the_tunnel_device():
    text = render_nat_table(base(tunnel_interface="ipsec0"), NatTable(1, mappings(1)))
    assert 'ip daddr @partner_nets oifname != "ipsec0" counter name dropped_cleartext drop' in text
    assert "rt ipsec" not in text


def test_shared_mode_snats_enrolled_sources_to_one_address_without_dnat():
    shared = ipaddress.IPv4Address("203.0.113.100")
    two = tuple(NatMapping(m.private_ip, shared) for m in mappings(2))
    text = render_nat_table(
        base(nat_mode="shared", shared_address=shared), NatTable(1, two, "shared")
    )
    assert "ip daddr @partner_nets ip saddr @enrolled snat to 203.0.113.100" in text
    dnat_block = text.split("map dnat_map {")[1].split("}")[0]
    assert "elements" not in dnat_block


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([("10.0.0.1", "203.0.113.1"), ("10.0.0.1", "203.0.113.2")], "private address 10.0.0.1"),
        ([("10.0.0.1", "203.0.113.1"), ("10.0.0.2", "203.0.113.1")], "public address 203.0.113.1"),
    ],
)
def test_duplicate_addresses_are_refused(rows, message):
    with pytest.raises(NatTableError, match=message):
        NatTable(1, tuple(NatMapping.parse(p, s) for p, s in rows))


def test_identical_rows_collapse_and_order_is_stable():
    row = NatMapping.parse("10.0.0.2", "203.0.113.2")
    other = NatMapping.parse("10.0.0.1", "203.0.113.1")
    table = NatTable(1, (row, other, row))
    assert table.mappings == (other, row)


def test_malformed_addresses_never_reach_a_ruleset():
    for bad in ("10.0.0.1; flush ruleset", "10.0.0.256", "", "10.0.0.1 }"):
        with pytest.raises(ValueError):
            NatMapping.parse(bad, "203.0.113.1")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"nat_mode": "cheap"}, "nat_mode"),
        ({"nat_mode": "shared"}, "shared_address"),
        ({"tunnel_interface": 'ipsec0"; drop'}, "interface"),
        ({"mss": 20}, "mss"),
    ],
)
def test_gateway_base_validation(overrides, message):
    with pytest.raises(NatTableError, match=message):
        base(**overrides)


def test_gateway_base_round_trips_through_json():
    original = base(nat_mode="shared", shared_address=ipaddress.IPv4Address("203.0.113.100"))
    assert GatewayBase.from_json(original.to_json()) == original


def test_mode_mismatch_is_refused():
    with pytest.raises(NatTableError, match="mode"):
        render_nat_table(base(), NatTable(1, (), "shared"))


@pytest.mark.skipif(
    shutil.which("nft") is None or shutil.which("unshare") is None, reason="needs nft and unshare"
)
@pytest.mark.parametrize("n", [0, 1, 10_000])
def test_kernel_accepts_full_table_then_update(n, tmp_path):
    """nft itself parses and commits both renderings (in a throwaway network namespace)."""
    full = tmp_path / "full.nft"
    update = tmp_path / "update.nft"
    full.write_text(render_nat_table(base(tunnel_interface="ipsec0"), NatTable(1, mappings(n))))
    update.write_text(render_map_update(NatTable(2, mappings(n)[: n // 2])))
    script = f"nft -f {full} && nft -f {update} && nft list set ip tunnelnat applied_generation"
    proc = subprocess.run(["unshare", "-n", "sh", "-c", script], capture_output=True, text=True)
    if proc.returncode != 0 and "Operation not permitted" in proc.stderr:
        pytest.skip("needs root for a network namespace")
    assert proc.returncode == 0, proc.stderr
    assert "0x00000002" in proc.stdout or "2" in proc.stdout.split("elements = {")[1]


# -- the gateway's fast path: text rows, validated without ipaddress objects ------------------


@pytest.mark.parametrize(
    "bad",
    [
        "10.0.0.01",  # leading zero: not canonical (and octal to some parsers)
        "10.1",  # inet_aton would take it
        "10.0.0.256",
        " 10.0.0.1",
        "10.0.0.1\n",
        "10.0.0.1; flush ruleset",
        "10.0.0.1 }",
        "",
        "::1",
        "0x0a.0.0.1",
        "10.0.0.1\x00",
        None,
        167772161,
    ],
)
def test_ipv4_int_takes_only_canonical_dotted_quads(bad):
    with pytest.raises(ValueError):
        ipv4_int(bad)


def test_ipv4_int_matches_ipaddress():
    for text in ("0.0.0.0", "10.0.0.1", "203.0.113.255", "255.255.255.255"):
        assert ipv4_int(text) == int(ipaddress.IPv4Address(text))


def test_from_rows_equals_the_mapping_constructor_and_sorts_numerically():
    rows = [
        ("10.0.0.10", "203.0.113.10"),
        ("10.0.0.9", "203.0.113.9"),
        ("10.0.0.10", "203.0.113.10"),
    ]
    table = NatTable.from_rows(3, rows)
    assert table.rows == (("10.0.0.9", "203.0.113.9"), ("10.0.0.10", "203.0.113.10"))
    assert table == NatTable(3, tuple(NatMapping.parse(p, s) for p, s in rows))
    assert len(table) == 2
    assert [str(m.private_ip) for m in table.mappings] == ["10.0.0.9", "10.0.0.10"]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([("10.0.0.1", "203.0.113.2"), ("10.0.0.1", "203.0.113.1")], "private address 10.0.0.1"),
        ([("10.0.0.2", "203.0.113.1"), ("10.0.0.1", "203.0.113.1")], "public address 203.0.113.1"),
    ],
)
def test_from_rows_leaves_out_and_reports_both_sides_of_a_duplicate(rows, message):
    """Issue 14, finding 1: one duplicate used to refuse the whole table, so no sync applied
    anything any more; now the colliding rows are left out, reported, and the rest applied."""
    good = ("10.0.0.9", "203.0.113.9")
    table = NatTable.from_rows(1, [good, *rows])
    assert table.rows == (good,)
    assert {(p, s) for p, s, _ in table.rejected} == set(rows)
    assert all(message in reason for _, _, reason in table.rejected)
    with pytest.raises(NatTableError, match=message):  # the constructor stays strict
        NatTable(1, tuple(NatMapping.parse(p, s) for p, s in [good, *rows]))


def test_from_rows_reports_a_malformed_address_anywhere_and_applies_the_rest():
    rows = [
        (f"10.0.{i // 250}.{i % 250 + 1}", f"100.64.{i // 250}.{i % 250 + 1}") for i in range(500)
    ]
    rows[321] = ("10.0.1.72", "100.64.1.72 } ; flush ruleset")
    rows[400] = (None, "100.64.1.151")  # a row without a private address
    table = NatTable.from_rows(1, rows)
    assert len(table) == 498
    assert [(p, r.split(":")[0]) for p, _, r in table.rejected] == [
        ("10.0.1.72", "not an IPv4 address"),
        ("None", "not an IPv4 address"),
    ]
    assert "flush ruleset" not in render_map_update(table)
    with pytest.raises(NatTableError, match="negative"):
        NatTable.from_rows(-1, [])


def test_shared_mode_rows_may_share_the_public_address():
    table = NatTable.from_rows(
        1, [("10.0.0.1", "203.0.113.100"), ("10.0.0.2", "203.0.113.100")], "shared"
    )
    text = render_map_update(table)
    assert "10.0.0.1,\n      10.0.0.2" in text and " : " not in text


def test_rendering_from_rows_is_the_rendering_from_mappings():
    maps = mappings(300)
    fast = NatTable.from_rows(4, [(str(m.private_ip), str(m.public_ip)) for m in reversed(maps)])
    assert render_nat_table(base(), fast) == render_nat_table(base(), NatTable(4, maps))
    assert render_map_update(fast) == render_map_update(NatTable(4, maps))


def test_mss_is_clamped_in_both_directions():
    """Towards the partner (SYN to A) and from it (SYN from A to an instance): deleting either
    rule fails here."""
    text = render_nat_table(base(mss=1300), NatTable(1, mappings(1)))
    rules = [" ".join(line.split()) for line in text.splitlines() if "maxseg" in line]
    clamp = "tcp option maxseg size > 1300 tcp option maxseg size set 1300"
    assert rules == [
        f"tcp flags syn ip daddr @partner_nets {clamp}",
        f"tcp flags syn ip saddr @partner_nets {clamp}",
    ]
