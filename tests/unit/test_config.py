from __future__ import annotations

import json

import pytest

from tunnelnat.core.config import ConfigError, NatMode, TunnelnatConfig
from tunnelnat.settings import ControllerSettings


def test_valid_config_parses(config_values):
    config = TunnelnatConfig.from_mapping(config_values)
    assert config.nat_mode is NatMode.DEDICATED
    assert [str(a) for a in config.public_addresses] == config_values["address_pool"]


def test_comma_separated_lists_are_accepted(config_values):
    config_values["partner_networks"] = "192.0.2.0/24, 198.51.100.128/25"
    config_values["address_pool"] = "203.0.113.10,203.0.113.11"
    config = TunnelnatConfig.from_mapping(config_values)
    assert len(config.partner_networks) == 2
    assert len(config.address_pool) == 2


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("partner_endpoint", "198.51.100.400", "partner_endpoint"),
        ("partner_endpoint", "1.2.3.4; rm -rf /", "partner_endpoint"),
        ("partner_networks", [], "partner_networks"),
        ("partner_networks", ["192.0.2.0/33"], "partner_networks"),
        ("nat_mode", "cheap", "nat_mode"),
        ("enrolment_tag_key", "tunnel$(id)", "enrolment_tag_key"),
        ("enrolment_tag_value", "yes\nno", "enrolment_tag_value"),
        ("enrolment_tag_key", "aws:reserved", "enrolment_tag_key"),
        ("gateway_private_ip", "10.10.2.5", "outside gateway_subnet_cidr"),
        ("address_pool", ["203.0.113.10", "203.0.113.10"], "twice"),
        ("address_pool", ["192.0.2.9"], "inside partner_networks"),
        ("address_pool", [], "needs address_pool"),
        ("tunnel_mss", 20000, "tunnel_mss"),
        ("surprise", 1, "surprise"),
    ],
)
def test_bad_values_are_reported_by_name(config_values, key, value, expected):
    config_values[key] = value
    with pytest.raises(ConfigError) as err:
        TunnelnatConfig.from_mapping(config_values, source="CDK context")
    assert "invalid CDK context" in str(err.value)
    assert expected in str(err.value)


def test_missing_key_is_named(config_values):
    del config_values["partner_endpoint"]
    with pytest.raises(ConfigError, match="partner_endpoint: Field required"):
        TunnelnatConfig.from_mapping(config_values)


def test_shared_mode_needs_its_address(config_values):
    config_values.update(nat_mode="shared", address_pool=[])
    with pytest.raises(ConfigError, match="shared_address"):
        TunnelnatConfig.from_mapping(config_values)
    config_values["shared_address"] = "203.0.113.100"
    config = TunnelnatConfig.from_mapping(config_values)
    assert [str(a) for a in config.public_addresses] == ["203.0.113.100"]


def test_partner_network_may_not_overlap_the_vpc(config_values):
    config_values["partner_networks"] = ["10.10.0.0/16"]
    with pytest.raises(ConfigError, match="overlaps"):
        TunnelnatConfig.from_mapping(config_values)


# -- addresses that cannot work (issue 14, finding 8); the base: T 198.51.100.40, A 192.0.2.0/24,
#    S 203.0.113.10-12, G 10.10.1.5 in 10.10.1.0/24 -----------------------------------------------
IMPOSSIBLE = [
    ({"partner_endpoint": "0.0.0.0"}, "partner_endpoint 0.0.0.0 is in 0.0.0.0/8"),
    ({"partner_endpoint": "127.0.0.1"}, "partner_endpoint 127.0.0.1 is in 127.0.0.0/8, loopback"),
    ({"partner_endpoint": "169.254.1.1"}, "partner_endpoint 169.254.1.1 is in 169.254.0.0/16"),
    ({"partner_endpoint": "239.0.0.1"}, "partner_endpoint 239.0.0.1 is in 224.0.0.0/4, multicast"),
    ({"partner_endpoint": "255.255.255.255"}, "partner_endpoint 255.255.255.255 is in 240.0.0.0/4"),
    ({"partner_endpoint": "10.10.1.77"}, "partner_endpoint 10.10.1.77 lies inside gateway_subnet"),
    ({"address_pool": ["198.51.100.40"]}, "address_pool 198.51.100.40 is partner_endpoint"),
    ({"address_pool": ["10.10.1.5"]}, "address_pool 10.10.1.5 is gateway_private_ip"),
    ({"address_pool": ["10.10.1.6"]}, "address_pool 10.10.1.6 lies inside gateway_subnet_cidr"),
    ({"address_pool": ["10.1.2.3"]}, "address_pool 10.1.2.3 is in 10.0.0.0/8, private (RFC 1918)"),
    ({"address_pool": ["172.16.0.1"]}, "address_pool 172.16.0.1 is in 172.16.0.0/12, private"),
    ({"address_pool": ["192.168.0.1"]}, "address_pool 192.168.0.1 is in 192.168.0.0/16, private"),
    ({"address_pool": ["100.127.0.1"]}, "is in 100.64.0.0/10, shared address space for carrier"),
    ({"address_pool": ["127.0.0.2"]}, "address_pool 127.0.0.2 is in 127.0.0.0/8, loopback"),
    ({"address_pool": ["169.254.169.254"]}, "is in 169.254.0.0/16, link-local"),
    ({"address_pool": ["0.0.0.0"]}, "address_pool 0.0.0.0 is in 0.0.0.0/8"),
    ({"address_pool": ["224.0.0.1"]}, "address_pool 224.0.0.1 is in 224.0.0.0/4, multicast"),
    ({"address_pool": ["192.0.0.8"]}, "is in 192.0.0.0/24, IETF protocol assignments"),
    ({"address_pool": ["198.18.0.1"]}, "is in 198.18.0.0/15, benchmarking"),
    (
        {"nat_mode": "shared", "address_pool": [], "shared_address": "10.0.0.9"},
        "shared_address 10.0.0.9 is in 10.0.0.0/8",
    ),
    (
        {"nat_mode": "shared", "address_pool": [], "shared_address": "198.51.100.40"},
        "shared_address 198.51.100.40 is partner_endpoint",
    ),
    ({"partner_networks": ["0.0.0.0/0"]}, "partner_networks 0.0.0.0/0 overlaps 169.254.0.0/16"),
    ({"partner_networks": ["169.254.169.254/32"]}, "overlaps 169.254.0.0/16, link-local"),
    ({"partner_networks": ["127.0.0.0/16"]}, "partner_networks 127.0.0.0/16 overlaps 127.0.0.0/8"),
    ({"partner_networks": ["224.0.0.0/24"]}, "overlaps 224.0.0.0/4, multicast"),
]


@pytest.mark.parametrize(("values", "expected"), IMPOSSIBLE, ids=[m for _, m in IMPOSSIBLE])
def test_addresses_that_cannot_work_are_refused_by_name(config_values, values, expected):
    config_values.update(values)
    with pytest.raises(ConfigError) as err:
        TunnelnatConfig.from_mapping(config_values, source="CDK context")
    assert expected in str(err.value)


def test_every_problem_is_one_line_naming_its_keys(config_values):
    config_values.update(partner_endpoint="0.0.0.0", address_pool=["10.10.1.5", "100.64.0.1"])
    with pytest.raises(ConfigError) as err:
        TunnelnatConfig.from_mapping(config_values, source="TUNNELNAT_CONFIG")
    lines = str(err.value).splitlines()
    assert lines[0] == "invalid TUNNELNAT_CONFIG:"
    assert [line.split()[0] for line in lines[1:]] == [
        "partner_endpoint",
        "address_pool",
        "address_pool",
    ]
    assert "(model)" not in str(err.value) and "Value error" not in str(err.value)


@pytest.mark.parametrize(
    "pool",
    [
        ["192.0.2.10"],  # RFC 5737's documentation ranges: the lab, the tests, the examples
        ["198.51.100.77"],
        ["203.0.113.250"],
        ["52.95.110.1", "3.5.140.2"],  # real public addresses
    ],
)
def test_public_and_documentation_addresses_are_accepted(config_values, pool):
    config_values.update(partner_networks=["198.51.100.0/28"], partner_endpoint="203.0.113.1")
    config_values["address_pool"] = pool
    assert [str(a) for a in TunnelnatConfig.from_mapping(config_values).address_pool] == pool


def test_a_private_partner_endpoint_outside_our_subnet_is_accepted(config_values):
    # A partner reached over private connectivity (Direct Connect, a transit gateway).
    config_values["partner_endpoint"] = "172.20.0.1"
    assert str(TunnelnatConfig.from_mapping(config_values).partner_endpoint) == "172.20.0.1"


def test_settings_from_environment(config_values):
    env = {
        "TUNNELNAT_CONFIG": json.dumps(config_values),
        "TUNNELNAT_TABLE_NAME": "tunnelnat-table",
        "AWS_REGION": "eu-west-1",
    }
    settings = ControllerSettings.from_environ(env)
    assert settings.region == "eu-west-1"
    assert settings.document_prefix == "tunnelnat-"
    with pytest.raises(ConfigError, match="TUNNELNAT_TABLE_NAME"):
        ControllerSettings.from_environ({"TUNNELNAT_CONFIG": "{}"})
    with pytest.raises(ConfigError, match="not JSON"):
        ControllerSettings.from_environ({**env, "TUNNELNAT_CONFIG": "{"})
