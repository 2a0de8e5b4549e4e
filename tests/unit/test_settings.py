"""The controller's settings (settings.py): issue 21's per-deployment enrolment key, allow-lists
and route-table opt-in list, read from the Lambda's environment. No AWS."""

from __future__ import annotations

import json

import pytest

from tests.conftest import VALID_CONFIG
from tunnelnat.core.config import ConfigError, TunnelnatConfig, default_enrolment_tag_key
from tunnelnat.core.enrolment import AllowList
from tunnelnat.settings import ControllerSettings


def env(deployment: str | None = None, config: dict | None = None, **extra: str) -> dict:
    values = {
        "TUNNELNAT_CONFIG": json.dumps(config if config is not None else VALID_CONFIG),
        "TUNNELNAT_TABLE_NAME": "tunnelnat-test",
        "AWS_REGION": "eu-west-1",
        **extra,
    }
    if deployment is not None:
        values["TUNNELNAT_DEPLOYMENT"] = deployment
    return values


def without_key() -> dict:
    return {k: v for k, v in VALID_CONFIG.items() if k != "enrolment_tag_key"}


def test_the_default_enrolment_key_is_the_deployments_own():
    """Issue 21, finding 4: every deployment defaulted to ``tunnelnat``, so one instance tagged
    once was enrolled by both (two addresses, two routes, two gateways)."""
    assert ControllerSettings.from_environ(env(config=without_key())).config.enrolment_tag_key == (
        "tunnelnat"
    ), "the default deployment keeps the key every earlier version used"
    a = ControllerSettings.from_environ(env("acme", without_key())).config.enrolment_tag_key
    b = ControllerSettings.from_environ(env("acme-2", without_key())).config.enrolment_tag_key
    assert (a, b) == ("tunnelnat:acme", "tunnelnat:acme-2")
    assert default_enrolment_tag_key("acme") == a
    explicit = ControllerSettings.from_environ(env("acme", VALID_CONFIG)).config
    assert explicit.enrolment_tag_key == "tunnelnat", "an explicit key is never changed"


def test_allow_lists_and_route_tables_are_comma_separated_and_empty_means_none():
    settings = ControllerSettings.from_environ(
        env(
            "acme",
            TUNNELNAT_ALLOWED_SUBNETS=" subnet-0123456789abcdef0, subnet-11111111 ,",
            TUNNELNAT_ALLOWED_GROUPS="web-asg,batch workers",
            TUNNELNAT_ROUTE_TABLES="rtb-0aaaaaaaaaaaaaaaa",
        )
    )
    assert settings.allow_list == AllowList(
        frozenset({"subnet-0123456789abcdef0", "subnet-11111111"}),
        frozenset({"web-asg", "batch workers"}),
    )
    assert settings.route_tables == ("rtb-0aaaaaaaaaaaaaaaa",)
    open_ = ControllerSettings.from_environ(env("acme", TUNNELNAT_ALLOWED_SUBNETS=""))
    assert open_.allow_list == AllowList() and open_.route_tables == ()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("TUNNELNAT_ALLOWED_SUBNETS", "subnet-1,sub net"),
        ("TUNNELNAT_ALLOWED_GROUPS", "web;rm -rf"),
        ("TUNNELNAT_ROUTE_TABLES", "rtb-0aaaaaaaaaaaaaaaa,igw-12345678"),
    ],
)
def test_a_malformed_entry_fails_rather_than_widening_the_list(name, value):
    with pytest.raises(ConfigError, match=name):
        ControllerSettings.from_environ(env("acme", **{name: value}))


@pytest.mark.parametrize("deployment", ["..", "a/b", "Acme", "x", "acme."])
def test_a_deployment_name_that_could_climb_out_of_routes_d_is_refused(deployment):
    with pytest.raises(ValueError, match="deployment"):
        ControllerSettings.from_environ(env(deployment))


def test_a_default_route_as_partner_network_is_refused_by_name():
    """Issue 21, finding 7: route-table mode may change any route, 0.0.0.0/0 included."""
    with pytest.raises(ConfigError, match="0.0.0.0/0 is the default route"):
        TunnelnatConfig.from_mapping({**VALID_CONFIG, "partner_networks": ["0.0.0.0/0"]})
