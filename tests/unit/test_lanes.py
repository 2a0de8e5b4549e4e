"""core/lanes.py: one partner as every part of a deployment sees it, and its names."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Network

import pytest

from tunnelnat.core.lanes import (
    Lane,
    LaneError,
    load_lanes,
    parameter_name,
    partner_status_tag,
    partner_table,
    route_scope,
)
from tunnelnat.core.partners import Partners

FILE = {
    "alias_block": "100.64.0.0/10",
    "partners": [
        {
            "name": "card",
            "endpoint": "198.51.100.10",
            "networks": ["10.0.0.0/24"],
            "auth": {"psk_secret": "tunnelnat/card-psk"},
            "nat": {"mode": "dedicated", "pool": ["203.0.113.10", "203.0.113.11"]},
        },
        {
            "name": "bank",
            "endpoint": "198.51.100.20",
            "networks": ["172.20.0.0/24"],
            "ike_version": 1,
            "auth": {"psk_secret": "tunnelnat/bank-psk"},
            "nat": {"mode": "shared", "address": "203.0.113.20"},
        },
        {
            "name": "clearing",
            "endpoint": "192.0.2.30",
            "networks": ["10.0.0.0/24"],
            "auth": {"psk_secret": "tunnelnat/clearing-psk"},
            "nat": {"mode": "dedicated", "pool": ["203.0.113.30"]},
        },
    ],
}


def lanes() -> tuple[Lane, ...]:
    partners = Partners.from_mapping(FILE, vpc_cidr="10.80.0.0/16", gateway_subnet="10.80.0.0/24")
    return partners.lanes("prod", "tunnelnat")


def test_names_are_derived_in_one_place() -> None:
    assert partner_table("prod", "bank") == "prod-bank"
    assert partner_status_tag("prod", "bank") == "tunnelnat:status:prod:bank"
    assert route_scope("prod", "bank") == "prod.bank"
    assert parameter_name("prod", "bank") == "/tunnelnat/prod/partners/bank"
    with pytest.raises(LaneError):
        partner_table("prod", "Bank_1")
    with pytest.raises(LaneError):
        route_scope("prod.x", "bank")


def test_partners_file_becomes_lanes_in_file_order() -> None:
    card, bank, clearing = lanes()
    assert [card.index, bank.index, clearing.index] == [1, 2, 3]
    assert card.tag_key == "tunnelnat:partner:card" and card.table == "prod-card"
    assert bank.ike_version == 1 and bank.public_addresses == (IPv4Address("203.0.113.20"),)
    # The overlapping partner is addressed through an alias chosen from alias_block; its
    # selectors keep the real network.
    assert clearing.networks == (IPv4Network("10.0.0.0/24"),)
    assert clearing.local_networks == (IPv4Network("100.64.0.0/24"),)
    assert card.local_networks == card.networks and card.aliases == ()


def test_json_round_trip_is_byte_stable() -> None:
    for lane in lanes():
        text = lane.to_json()
        assert Lane.from_json(text) == lane
        assert Lane.from_json(text).to_json() == text
        assert len(text.encode()) < 4096  # one standard SSM parameter


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"name": "Bank"}, "not a partner name"),
        ({"index": 0}, "outside 1-65535"),
        ({"index": True}, "not an integer"),
        ({"aliases": ["100.64.0.0/25"]}, "not the size"),
        ({"nat_mode": "shared"}, "takes shared_address"),
        ({"tag_key": "aws:x"}, "tag_key"),
        ({"networks": ["10.0.0.1/24"]}, "bad or missing"),
        ({"version": 2}, "version"),
        ({"endpoint": "1.2.3.4; rm -rf /"}, "bad or missing"),
    ],
)
def test_a_bad_lane_is_refused(change: dict, message: str) -> None:
    data = {**lanes()[0].as_dict(), **change}
    with pytest.raises(LaneError, match=message):
        Lane.from_json(json.dumps(data))


def test_a_contradictory_set_is_refused() -> None:
    card, bank, _ = lanes()
    twin = {**bank.as_dict(), "index": card.index}
    with pytest.raises(LaneError, match="share the index"):
        load_lanes([card.to_json(), json.dumps(twin)])
    assert [x.name for x in load_lanes([bank.to_json(), card.to_json()])] == ["card", "bank"]
