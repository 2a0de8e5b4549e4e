"""The partner's crypto, identities and selector layout: context keys -> ConfigureTunnel's
association, refused at synthesis when a strict peer would refuse them (docs/stack.md, Partner
worksheet)."""

from __future__ import annotations

import re

import pytest

from stacks.documents import MAX_DOCUMENT_BYTES
from stacks.settings import load_settings
from tests.infra.conftest import example_context, synthesize
from tunnelnat.core.config import ConfigError

PARTNER = {
    "ike_proposals": "aes256gcm16-prfsha384-ecp384,aes256-sha256-modp2048",
    "esp_proposals": "aes256gcm16-ecp384",
    "ike_lifetimes": "28260,540,540",
    "child_lifetimes": "3060,3600,540",
    "dpd_delay_seconds": "10",
    "dpd_timeout_seconds": "30",
    "local_id": "gw.example.com",
    "remote_id": "@#0a1b2c3d",
    "selector_layout": "per-pair",
    "keyingtries": "0",
    "start_action": "start",
}


@pytest.fixture(scope="module")
def s(tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp("cdk.out"), PARTNER, nag=False)


def test_association_passes_every_partner_setting(s):
    association = s.resources("AWS::SSM::Association")[
        s.logical_id(s.stack.gateway.tunnel_association)
    ]
    params = {k: v[0] for k, v in association["Properties"]["Parameters"].items()}
    assert {k: params[k] for k in params if k in EXPECTED} == EXPECTED
    content = s.stack.documents.contents["ConfigureTunnel"]["parameters"]
    for key, value in EXPECTED.items():
        assert re.fullmatch(content[key]["allowedPattern"], value), key
    assert s.stack.documents.sizes["ConfigureTunnel"] <= MAX_DOCUMENT_BYTES


EXPECTED = {
    "IkeProposals": "aes256gcm16-prfsha384-ecp384,aes256-sha256-modp2048",
    "EspProposals": "aes256gcm16-ecp384",
    "IkeLifetimes": "28260,540,540",
    "ChildLifetimes": "3060,3600,540",
    "Dpd": "10,30",
    "LocalId": "gw.example.com",
    "RemoteId": "@#0a1b2c3d",
    "SelectorLayout": "per-pair",
    "KeyingTries": "0",
    "StartAction": "start",
}


def test_defaults_are_what_a_strict_peer_accepts():
    stack = load_settings(example_context()).stack
    assert stack.ike_proposals == ["aes256-sha256-modp2048"]
    assert stack.esp_proposals == ["aes256-sha256-modp2048"]  # PFS: a DH group on the CHILD_SA
    assert stack.ike_lifetimes == (28260, 540, 540)  # 8 h hard, as AWS's phase 1
    assert stack.child_lifetimes == (3060, 3600, 540)  # 1 h hard, as AWS's phase 2
    assert (stack.keyingtries, stack.start_action, stack.selector_layout) == (0, "start", "single")
    assert (stack.dpd_delay_seconds, stack.dpd_timeout_seconds) == (10, 30)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"esp_proposals": "aes256-sha256"}, "esp_proposals.*PFS"),
        ({"ike_proposals": "aes128-sha1-modp1024"}, "ike_proposals.*modp1024 is too weak"),
        ({"ike_proposals": "aes256;reboot"}, "ike_proposals.*not a proposal"),
        ({"remote_id": "partner id"}, "remote_id"),
        ({"local_id": "300.1.1.1"}, "local_id"),
        ({"child_lifetimes": "3600,3600,60"}, "life_time"),
        ({"ike_lifetimes": "600,60,600"}, "rand_time"),
        ({"selector_layout": "pairs"}, "selector_layout"),
        ({"start_action": "trap"}, "start_action"),
        ({"dpd_timeout_seconds": "5"}, "dpd_timeout_seconds"),
    ],
)
def test_refused_at_synthesis_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_settings(example_context(overrides))
