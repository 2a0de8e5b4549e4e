"""The partners file (issue 23): every validation rule, the alias choice, the shorthand for
today's single-partner keys, and errors that name ``partners[i] (name).key``, all at once."""

from __future__ import annotations

import copy
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from tests.conftest import VALID_CONFIG
from tunnelnat.core.config import ConfigError, TunnelnatConfig
from tunnelnat.core.partners import Partners, partner_tag_key

VPC = "10.80.0.0/16"
SUBNET = "10.80.0.0/24"
DOC = Path(__file__).resolve().parents[2] / "docs" / "partners.md"

# The three partners of docs/partners.md: an AWS-like IKEv2 peer, a legacy IKEv1 appliance,
# and a third whose network is the first's.
THREE = {
    "alias_block": "100.64.0.0/10",
    "partners": [
        {
            "name": "aws-peer",
            "endpoint": "198.51.100.10",
            "networks": ["10.0.0.0/24"],
            "auth": {"psk_secret": "tunnelnat/aws-peer-psk"},
            "nat": {"mode": "dedicated", "pool": ["203.0.113.10", "203.0.113.11"]},
        },
        {
            "name": "bank",
            "endpoint": "198.51.100.20",
            "networks": ["172.20.0.0/24", "172.20.5.0/28"],
            "ike_version": 1,
            "auth": {"psk_secret": "tunnelnat/bank-psk"},
            "nat": {"mode": "shared", "address": "203.0.113.20"},
        },
        {
            "name": "clearing",
            "endpoint": "192.0.2.30",
            "networks": ["10.0.0.0/24"],
            "auth": {"certificate": {"secret": "tunnelnat/our-cert", "ca": "tunnelnat/ca"}},
            "nat": {"mode": "dedicated", "pool": ["203.0.113.30"]},
        },
    ],
}


@pytest.fixture
def doc() -> dict:
    return copy.deepcopy(THREE)


def load(values: dict, **kwargs) -> Partners:
    kwargs.setdefault("vpc_cidr", VPC)
    kwargs.setdefault("gateway_subnet", SUBNET)
    return Partners.from_mapping(values, **kwargs)


def problems(values: dict, **kwargs) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(values, **kwargs)
    head, *lines = str(caught.value).splitlines()
    assert head.startswith("invalid partners file")
    assert all(line.startswith("  ") for line in lines)
    return [line.strip() for line in lines]


def one(values: dict, fragment: str, **kwargs) -> str:
    """The one problem containing ``fragment`` (and that there is exactly one such)."""
    found = [p for p in problems(values, **kwargs) if fragment in p]
    assert len(found) == 1, (fragment, problems(values, **kwargs))
    return found[0]


# -- a valid file and its plan --------------------------------------------------------------


def test_three_partners_resolve(doc):
    plan = load(doc).resolved()
    assert [r.name for r in plan] == ["aws-peer", "bank", "clearing"]
    aws, bank, clearing = plan
    assert aws.local_networks == aws.real_networks == (IPv4Network("10.0.0.0/24"),)
    assert bank.partner.ike_version == 1 and bank.partner.layout == "per-pair"
    assert aws.partner.layout == "single"
    # The first to claim 10.0.0.0/24 keeps it; the overlapping third gets the first free /24.
    assert clearing.real_networks == (IPv4Network("10.0.0.0/24"),)
    assert clearing.local_networks == (IPv4Network("100.64.0.0/24"),)
    assert clearing.networks[0].alias == "chosen"
    assert clearing.partner.auth.kind == "certificate"
    assert bank.partner.nat.addresses == (IPv4Address("203.0.113.20"),)


def test_defaults_are_todays(doc):
    p = load(doc).resolved()[0].partner
    assert p.proposals.ike == ("aes256-sha256-modp2048",)
    assert p.lifetimes.ike == (28_260, 540, 540) and p.lifetimes.child == (3_060, 3_600, 540)
    assert (p.dpd.delay, p.dpd.timeout) == (10, 30)
    assert p.start_action == "start" and p.local_id is None and p.remote_id is None


def test_from_file_reads_yaml(tmp_path, doc):
    import yaml

    path = tmp_path / "partners.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert Partners.from_file(path, vpc_cidr=VPC, gateway_subnet=SUBNET).resolved() == (
        load(doc).resolved()
    )


def test_the_documented_example_is_valid(tmp_path):
    """docs/partners.md's example (its first yaml block) and the plan it shows."""
    text = DOC.read_text()
    example = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "partners.yaml"
    path.write_text(example)
    plan = Partners.from_file(path, vpc_cidr=VPC, gateway_subnet=SUBNET)
    assert [r.name for r in plan.resolved()] == ["card-processor", "bank", "clearing-house"]
    assert plan["bank"].partner.ike_version == 1 and plan["bank"].partner.layout == "per-pair"
    assert plan["clearing-house"].local_networks == (IPv4Network("100.64.0.0/24"),)
    assert plan["clearing-house"].partner.auth.kind == "certificate"
    # The shown output's rows are what the command prints for it.
    assert "100.64.0.0/24 (chosen alias)" in text


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: no such file"):
        Partners.from_file(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("partners:\n  - name: a\n    networks: [10.0.0.0/24\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML at line \d+, column \d+"):
        Partners.from_file(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match="must be a mapping with 'partners:'"):
        Partners.from_file(empty)


def test_no_partners_and_unknown_keys(doc):
    assert problems({"partners": []}) == ["partners: lists no partner (got [])"]
    doc["partner"] = []
    doc["partners"][1]["psk"] = "x"
    found = problems(doc)
    assert any(p.startswith("partner: Extra inputs are not permitted") for p in found)
    assert any(p.startswith("partners[1] (bank).psk: Extra inputs") for p in found)


# -- names and endpoints --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["Bank", "b", "bank-", "1bank", "bank.prod", "a" * 25, "bank_1"])
def test_bad_names(doc, name):
    doc["partners"][1]["name"] = name
    assert one(doc, ".name:").startswith(f"partners[1] ({name}).name: must be 2-24 characters")


def test_duplicate_names_and_endpoints(doc):
    doc["partners"][2]["name"] = "bank"
    doc["partners"][2]["endpoint"] = "198.51.100.10"
    assert one(doc, ".name:") == (
        "partners[2] (bank).name: 'bank' is also partners[1]'s: a name is a tunnel and a tag "
        "key, one partner each"
    )
    assert one(doc, ".endpoint:").startswith(
        "partners[2] (bank).endpoint: 198.51.100.10 is also partners[0] (aws-peer)'s"
    )


def test_child_sa_names_never_clash(doc):
    # bank is per-pair with 2 pairs: its CHILD_SAs are bank-1 and bank-2.
    doc["partners"][2]["name"] = "bank-2"
    assert one(doc, "CHILD_SA") == (
        "partners[2] (bank-2).name: its CHILD_SA 'bank-2' is also one of partners[1] (bank)'s "
        "(per-pair children are <name>-1, <name>-2 ...): choose another name"
    )
    doc["partners"][2]["name"] = "bank-3"
    load(doc)


@pytest.mark.parametrize(
    ("endpoint", "fragment"),
    [
        ("169.254.169.254", "is in 169.254.0.0/16, link-local"),
        ("224.0.0.5", "multicast"),
        ("10.80.3.4", "lies inside our VPC 10.80.0.0/16"),
        ("172.20.0.9", "lies inside networks[0] 172.20.0.0/24"),
        ("10.0.0.7", "lies inside partners[0] (aws-peer)'s network 10.0.0.0/24"),
    ],
)
def test_endpoint_placement(doc, endpoint, fragment):
    doc["partners"][1]["endpoint"] = endpoint
    assert fragment in one(doc, fragment)
    assert one(doc, fragment).startswith("partners[1] (bank).endpoint: ")


# -- networks -------------------------------------------------------------------------------


def test_empty_networks(doc):
    doc["partners"][0]["networks"] = []
    assert one(doc, "networks").startswith("partners[0] (aws-peer).networks: lists no network")


def test_default_route_special_ranges_and_self_overlap(doc):
    doc["partners"][1]["networks"] = [
        "0.0.0.0/0",
        "169.254.0.0/24",
        "172.20.0.0/16",
        "172.20.1.0/24",
    ]
    found = problems(doc)
    default = "partners[1] (bank).networks[0]: 0.0.0.0/0 is the default route"
    assert f"{default}: list the partner's networks" in found
    assert any(
        p.startswith(
            "partners[1] (bank).networks[1]: 169.254.0.0/24 overlaps 169.254.0.0/16, link-local"
        )
        for p in found
    )
    assert (
        "partners[1] (bank).networks[3]: 172.20.1.0/24 overlaps networks[2] 172.20.0.0/16" in found
    )


def test_bad_network_text_names_its_index(doc):
    doc["partners"][1]["networks"] = ["172.20.0.0/24", "172.20.0.1/24"]
    assert one(doc, "networks[1]").startswith(
        "partners[1] (bank).networks[1]: Input is not a valid IPv4 network"
    )


# -- overlaps and aliases -------------------------------------------------------------------


def test_overlap_without_alias_or_block(doc):
    del doc["alias_block"]
    assert problems(doc) == [
        "partners[2] (clearing).networks[0]: 10.0.0.0/24 overlaps partners[0] (aws-peer)'s "
        "network 10.0.0.0/24: declare alias (a free range of the same size instances address "
        "this partner by) or set alias_block to choose one from"
    ]


@pytest.mark.parametrize(
    ("network", "what"),
    [("10.80.7.0/24", "our VPC 10.80.0.0/16"), ("10.80.0.0/25", "our VPC 10.80.0.0/16")],
)
def test_overlap_with_our_vpc_needs_alias(doc, network, what):
    del doc["alias_block"]
    doc["partners"][1]["networks"] = [network]
    assert one(doc, "(bank).networks[0]").startswith(
        f"partners[1] (bank).networks[0]: {network} overlaps {what}: declare alias"
    )


def test_overlap_with_gateway_subnet_without_vpc_given(doc):
    del doc["alias_block"]
    doc["partners"][1]["networks"] = ["10.80.0.128/25"]
    line = one(doc, "(bank).networks[0]", vpc_cidr=None)
    assert "overlaps the gateway's subnet 10.80.0.0/24" in line


def test_overlap_with_vpc_takes_an_alias_from_the_block(doc):
    doc["partners"][1]["networks"] = ["10.80.7.0/24", "172.20.5.0/28"]
    bank = load(doc)["bank"]
    assert bank.local_networks == (IPv4Network("100.64.0.0/24"), IPv4Network("172.20.5.0/28"))
    # ... and the later overlapping partner takes the next free /24.
    assert load(doc)["clearing"].local_networks == (IPv4Network("100.64.1.0/24"),)


def test_declared_alias_is_used_and_avoided_by_the_choice(doc):
    doc["partners"][0]["networks"] = ["10.0.0.0/24", "10.9.0.0/23"]
    doc["partners"][0]["alias"] = ["100.64.0.0/24", "100.64.4.0/23"]
    doc["partners"][1]["networks"] = ["10.80.8.0/23"]  # overlaps the VPC: needs a /23
    plan = load(doc)
    assert plan["aws-peer"].local_networks == (
        IPv4Network("100.64.0.0/24"),
        IPv4Network("100.64.4.0/23"),
    )
    assert [n.alias for n in plan["aws-peer"].networks] == ["declared", "declared"]
    # bank: the first aligned free /23 (100.64.0.0/23 holds aws-peer's /24);
    # clearing: its /24 now overlaps nothing instances use (aws-peer is aliased) and keeps it.
    assert plan["bank"].local_networks == (IPv4Network("100.64.2.0/23"),)
    assert plan["clearing"].local_networks == (IPv4Network("10.0.0.0/24"),)
    assert plan["clearing"].networks[0].alias is None


def test_alias_choice_is_deterministic_in_partner_order(doc):
    for k, name in enumerate(["d", "e", "f"]):
        doc["partners"].append(
            {
                "name": f"overlap-{name}",
                "endpoint": f"192.0.2.{40 + k}",
                "networks": ["10.0.0.0/25" if k == 1 else "10.0.0.0/24"],
                "auth": {"psk_secret": "s"},
                "nat": {"mode": "dedicated", "pool": [f"203.0.113.{40 + k}"]},
            }
        )
    first = [r.local_networks for r in load(doc).resolved()]
    assert first == [r.local_networks for r in load(copy.deepcopy(doc)).resolved()]
    assert [str(n[0]) for n in first[2:]] == [
        "100.64.0.0/24",  # clearing
        "100.64.1.0/24",  # overlap-d
        "100.64.2.0/25",  # overlap-e: a /25, first free aligned
        "100.64.3.0/24",  # overlap-f: 100.64.2.0/24 is half taken
    ]


def test_alias_block_exhausted_or_too_small(doc):
    doc["alias_block"] = "100.64.0.0/25"
    assert "alias_block 100.64.0.0/25 has no free /24 left" in one(doc, "alias_block")
    doc["alias_block"] = "100.64.0.0/24"
    doc["partners"][1]["networks"] = ["10.0.0.0/24"]
    line = one(doc, "partners[2]")
    assert line.startswith("partners[2] (clearing).networks[0]: 10.0.0.0/24 overlaps")
    assert "has no free /24 left" in line


def test_alias_search_jumps_past_obstacles(doc):
    # 300 /32 networks overlapping our VPC, each aliased from a /10: fast and in order.
    doc["partners"][1]["ike_version"] = 2  # one CHILD_SA for them all
    doc["partners"][1]["networks"] = [f"10.80.{k // 250 + 1}.{k % 250 + 1}/32" for k in range(300)]
    bank = load(doc)["bank"]
    assert bank.local_networks[0] == IPv4Network("100.64.0.0/32")
    assert bank.local_networks[-1] == IPv4Network("100.64.1.43/32")


@pytest.mark.parametrize(
    ("alias", "fragment"),
    [
        ("10.80.5.0/24", "overlaps our VPC 10.80.0.0/16"),
        ("10.80.0.0/24", "overlaps the gateway's subnet 10.80.0.0/24"),
        ("10.0.0.0/24", "overlaps partners[0] (aws-peer)'s network 10.0.0.0/24"),
        ("172.20.0.0/24", "overlaps partners[1] (bank)'s network 172.20.0.0/24"),
        ("169.254.1.0/24", "overlaps 169.254.0.0/16, link-local"),
        ("127.0.1.0/24", "overlaps 127.0.0.0/8, loopback"),
    ],
)
def test_declared_alias_collisions(doc, alias, fragment):
    doc["partners"][2]["alias"] = alias
    assert one(doc, fragment).startswith(f"partners[2] (clearing).alias[0]: {alias} ")


def test_alias_colliding_with_another_alias(doc):
    doc["partners"][0]["alias"] = "100.64.9.0/24"
    doc["partners"][2]["alias"] = ["100.64.9.0/24"]
    assert one(doc, "alias") == (
        "partners[2] (clearing).alias[0]: 100.64.9.0/24 overlaps partners[0] (aws-peer).alias[0] "
        "100.64.9.0/24"
    )


def test_alias_size_and_count(doc):
    doc["partners"][2]["alias"] = "100.64.0.0/16"
    assert one(doc, "alias") == (
        "partners[2] (clearing).alias[0]: 100.64.0.0/16 is a /16, networks[0] 10.0.0.0/24 a "
        "/24: an alias maps its network 1:1, so it has the same size"
    )
    doc["partners"][2]["alias"] = ["100.64.0.0/24", "100.64.1.0/24"]
    assert one(doc, "alias") == (
        "partners[2] (clearing).alias: 2 given for 1 networks: one alias per network, in the "
        "networks' order"
    )


# -- our public addresses S -----------------------------------------------------------------


def test_pool_address_in_two_partners(doc):
    doc["partners"][2]["nat"]["pool"] = ["203.0.113.11"]
    assert one(doc, "nat.pool") == (
        "partners[2] (clearing).nat.pool: 203.0.113.11 is also in partners[0] (aws-peer)'s nat: "
        "a dedicated pool address belongs to one partner (each partner whitelists its own S)"
    )


def test_shared_address_in_two_partners(doc):
    doc["partners"][2]["nat"] = {"mode": "shared", "address": "203.0.113.20"}
    load(doc)  # bank's and clearing's networks are disjoint: one S may face both
    doc["partners"][2]["networks"] = ["172.20.0.0/24"]
    doc["partners"][2]["alias"] = "100.64.7.0/24"
    assert "their IPsec policies would be the same" in one(doc, "nat.address")


@pytest.mark.parametrize(
    ("address", "fragment"),
    [
        ("10.0.0.9", "lies inside partners[0] (aws-peer)'s network 10.0.0.0/24"),
        ("172.20.5.3", "lies inside partners[1] (bank)'s network 172.20.5.0/28"),
        ("198.51.100.20", "is partners[1] (bank)'s endpoint"),
        ("10.80.9.9", "lies inside our VPC 10.80.0.0/16"),
        ("192.168.1.1", "private (RFC 1918)"),
        ("100.64.3.3", "carrier-grade NAT"),
        ("127.0.0.1", "loopback"),
    ],
)
def test_public_address_placement(doc, address, fragment):
    doc["partners"][2]["nat"]["pool"] = [address]
    assert one(doc, fragment).startswith(f"partners[2] (clearing).nat.pool: {address} ")


@pytest.mark.parametrize(
    ("nat", "fragment"),
    [
        ({"mode": "dedicated"}, "mode 'dedicated' needs pool"),
        ({"mode": "shared"}, "mode 'shared' needs address"),
        ({"mode": "shared", "address": "203.0.113.9", "pool": ["203.0.113.8"]}, "takes address"),
        ({"mode": "dedicated", "pool": ["203.0.113.8", "203.0.113.8"]}, "lists an address twice"),
        ({"mode": "nat44", "pool": ["203.0.113.8"]}, "nat.mode: Input should be"),
    ],
)
def test_nat_shapes(doc, nat, fragment):
    doc["partners"][2]["nat"] = nat
    assert one(doc, fragment).startswith("partners[2] (clearing).nat")


# -- the tunnel: IKE version, proposals, lifetimes, DPD, IDs, auth --------------------------


def test_ikev1_needs_per_pair(doc):
    doc["partners"][1]["selector_layout"] = "single"
    assert one(doc, "selector_layout") == (
        "partners[1] (bank).selector_layout: 'single' with ike_version 1 and 2 selector pairs: "
        "IKEv1 carries one selector pair per SA (strongSwan uses only the first), use 'per-pair'"
    )
    doc["partners"][1]["networks"] = ["172.20.0.0/24"]  # one S x one network: one pair
    assert load(doc)["bank"].partner.layout == "single"
    doc["partners"][1]["ike_version"] = 3
    assert one(doc, "ike_version").startswith(
        "partners[1] (bank).ike_version: Input should be 1 or 2"
    )


def test_per_pair_has_a_ceiling(doc):
    doc["partners"][0]["selector_layout"] = "per-pair"
    doc["partners"][0]["networks"] = [f"10.{k}.0.0/24" for k in range(129)]
    assert one(doc, "selector_layout") == (
        "partners[0] (aws-peer).selector_layout: 'per-pair' with 258 selector pairs "
        "(S x networks): at most 256 CHILD_SAs a tunnel (core/swanctl.py refuses more)"
    )


@pytest.mark.parametrize(
    ("proposals", "fragment"),
    [
        (
            {"ike": ["aes128-sha1-modp1024"]},
            "proposals.ike: aes128-sha1-modp1024: modp1024 is too weak",
        ),
        ({"esp": ["aes256-sha256"]}, "proposals.esp: aes256-sha256: needs a DH group for PFS"),
        ({"ike": ["3des-md5-modp2048"]}, "3des is too weak"),
        ({"ike": []}, "proposals.ike: Tuple should have at least 1 item"),
        ({"esp": "aes256gcm16-ecp384, aes128-sha256-modp1536"}, "modp1536 is too weak"),
    ],
)
def test_proposal_policy(doc, proposals, fragment):
    doc["partners"][0]["proposals"] = proposals
    assert one(doc, fragment).startswith("partners[0] (aws-peer).proposals.")


@pytest.mark.parametrize(
    ("lifetimes", "fragment"),
    [
        ({"child": [3600, 3000, 540]}, "CHILD life_time 3000 must exceed rekey_time 3600"),
        ({"ike": [28260, 540, 30000]}, "IKE rand_time 30000 must be below rekey_time 28260"),
        ({"ike": "20,540,5"}, "IKE rekey_time 20 s is too short"),
        ({"child": [3060, 3600]}, "lifetimes.child"),
    ],
)
def test_lifetime_order(doc, lifetimes, fragment):
    doc["partners"][0]["lifetimes"] = lifetimes
    assert one(doc, fragment).startswith("partners[0] (aws-peer).lifetimes.")


def test_dpd_ids_start_action(doc):
    doc["partners"][0]["dpd"] = {"delay": 30, "timeout": 30}
    doc["partners"][0]["local_id"] = "vpn example"
    doc["partners"][0]["remote_id"] = "@vpn.partner.example"
    doc["partners"][0]["start_action"] = "trap"
    found = problems(doc)
    assert "partners[0] (aws-peer).dpd: timeout 30 must exceed delay 30" in found
    assert any(
        p.startswith("partners[0] (aws-peer).local_id: must be an IPv4 address") for p in found
    )
    assert any(p.startswith("partners[0] (aws-peer).start_action: Input should be") for p in found)
    assert not any("remote_id" in p for p in found)


@pytest.mark.parametrize(
    ("auth", "fragment"),
    [
        ({}, "auth: give exactly one of psk_secret or certificate"),
        ({"psk_secret": "a", "certificate": {"secret": "b", "ca": "c"}}, "give exactly one"),
        ({"psk_secret": "a b"}, "auth.psk_secret: must be a Secrets Manager secret name or ARN"),
        (
            {"certificate": {"ca": "c"}},
            "give exactly one of secret (our key and certificate) or acm_pca_arn",
        ),
        ({"certificate": {"secret": "b"}}, "auth.certificate.ca: Field required"),
        (
            {"certificate": {"acm_pca_arn": "arn:aws:acm:us-east-1:1:x", "ca": "c"}},
            "must be an ACM Private CA ARN",
        ),
    ],
)
def test_auth(doc, auth, fragment):
    doc["partners"][1]["auth"] = auth
    assert one(doc, fragment).startswith("partners[1] (bank).auth")


def test_certificate_from_acm_private_ca(doc):
    arn = (
        "arn:aws:acm-pca:us-east-1:123456789012:certificate-authority/"
        + "0" * 8
        + "-1111-2222-3333-"
        + "4" * 12
    )
    doc["partners"][2]["auth"] = {
        "certificate": {"acm_pca_arn": arn, "ca": "tunnelnat/clearing-ca"}
    }
    assert load(doc)["clearing"].partner.auth.certificate.acm_pca_arn == arn


# -- every problem at once ------------------------------------------------------------------


def test_every_problem_at_once_each_naming_its_key(doc):
    del doc["alias_block"]
    doc["partners"][0]["proposals"] = {"esp": ["aes256-sha256"]}  # bad optional key ...
    doc["partners"][0]["nat"]["pool"] = ["203.0.113.30", "10.80.1.1"]  # ... cross checks still run
    doc["partners"][1]["name"] = "aws-peer"
    doc["partners"][1]["selector_layout"] = "single"
    doc["partners"][2]["alias"] = "10.80.4.0/24"
    doc["partners"].append({"name": "x"})
    found = problems(doc)
    expected = [
        "partners[0] (aws-peer).proposals.esp: aes256-sha256: needs a DH group for PFS",
        "partners[0] (aws-peer).nat.pool: 10.80.1.1 lies inside our VPC 10.80.0.0/16",
        "partners[1] (aws-peer).selector_layout: 'single' with ike_version 1",
        "partners[1] (aws-peer).name: 'aws-peer' is also partners[0]'s",
        "partners[2] (clearing).nat.pool: 203.0.113.30 is also in partners[0] (aws-peer)'s nat",
        "partners[2] (clearing).alias[0]: 10.80.4.0/24 overlaps our VPC 10.80.0.0/16",
        "partners[3] (x).name: must be 2-24 characters",
        "partners[3] (x).endpoint: Field required",
        "partners[3] (x).networks: Field required",
        "partners[3] (x).auth: Field required",
        "partners[3] (x).nat: Field required",
    ]
    for start in expected:
        assert sum(p.startswith(start) for p in found) == 1, (start, found)
    assert len(found) == len(expected), found


# -- the shorthand: today's single-partner keys ---------------------------------------------


def test_from_single_equals_the_file_form():
    config = TunnelnatConfig.from_mapping(dict(VALID_CONFIG))
    shorthand = Partners.from_single(config, "partner", "tunnelnat/psk")
    written = Partners.from_mapping(
        {
            "partners": [
                {
                    "name": "partner",
                    "endpoint": VALID_CONFIG["partner_endpoint"],
                    "networks": VALID_CONFIG["partner_networks"],
                    "auth": {"psk_secret": "tunnelnat/psk"},
                    "nat": {"mode": "dedicated", "pool": VALID_CONFIG["address_pool"]},
                }
            ]
        },
        gateway_subnet=VALID_CONFIG["gateway_subnet_cidr"],
    )
    assert shorthand.resolved() == written.resolved()
    (one_partner,) = shorthand.resolved()
    assert one_partner.real_networks == one_partner.local_networks == config.partner_networks
    assert one_partner.partner.endpoint == config.partner_endpoint
    assert one_partner.partner.nat.addresses == config.public_addresses


def test_from_single_maps_the_tunnel_keys():
    values = dict(VALID_CONFIG, nat_mode="shared", shared_address="203.0.113.50", address_pool=[])
    config = TunnelnatConfig.from_mapping(values)
    partner = (
        Partners.from_single(
            config,
            "bank",
            "tunnelnat/psk",
            vpc_cidr="10.10.0.0/16",
            ike_proposals=["aes256gcm16-prfsha384-ecp384"],
            esp_proposals=["aes256gcm16-ecp384"],
            ike_lifetimes=(14_000, 540, 540),
            child_lifetimes=(3_000, 3_600, 300),
            dpd_delay_seconds=15,
            dpd_timeout_seconds=60,
            local_id="vpn.example.com",
            remote_id=None,
            selector_layout="per-pair",
            start_action="none",
        )
        .resolved()[0]
        .partner
    )
    assert partner.nat.mode.value == "shared" and str(partner.nat.address) == "203.0.113.50"
    assert partner.proposals.ike == ("aes256gcm16-prfsha384-ecp384",)
    assert partner.lifetimes.child == (3_000, 3_600, 300)
    assert (partner.dpd.delay, partner.dpd.timeout) == (15, 60)
    assert partner.local_id == "vpn.example.com" and partner.remote_id is None
    assert partner.layout == "per-pair" and partner.start_action == "none"


def test_from_single_names_the_tunnel_name():
    config = TunnelnatConfig.from_mapping(dict(VALID_CONFIG))
    with pytest.raises(ConfigError) as caught:
        Partners.from_single(config, "Partner_1", "s")
    assert "tunnel_name is the partner's name" in str(caught.value)
    assert "partners[0] (Partner_1).name: must be 2-24 characters" in str(caught.value)
    with pytest.raises(TypeError, match="unknown tunnel keys"):
        Partners.from_single(config, "partner", "s", keyingtries=3)


def test_partner_tag_key():
    assert partner_tag_key("tunnelnat", "bank") == "tunnelnat:partner:bank"
    assert partner_tag_key("tunnelnat:prod", "aws-peer") == "tunnelnat:prod:partner:aws-peer"


def test_first_free_agrees_with_a_plain_search():
    import random

    from tunnelnat.core.partners import _first_free

    block = IPv4Network("100.64.0.0/22")
    rng = random.Random(23)
    for _ in range(300):
        avoid = [
            IPv4Network((int(block.network_address) + rng.randrange(1024), 32)).supernet(
                new_prefix=rng.choice([24, 26, 28, 30, 32])
            )
            for _ in range(rng.randrange(8))
        ]
        prefix = rng.choice([23, 24, 25, 27, 30, 32])
        plain = next(
            (n for n in block.subnets(new_prefix=prefix) if not any(n.overlaps(a) for a in avoid)),
            None,
        )
        assert _first_free(block, prefix, avoid) == plain, (prefix, avoid)
