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
