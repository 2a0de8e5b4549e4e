"""Shared by every suite: a valid configuration to start from."""

from __future__ import annotations

import pytest

VALID_CONFIG = {
    "partner_endpoint": "198.51.100.40",
    "partner_networks": ["192.0.2.0/24"],
    "nat_mode": "dedicated",
    "address_pool": ["203.0.113.10", "203.0.113.11", "203.0.113.12"],
    "enrolment_tag_key": "tunnelnat",
    "enrolment_tag_value": "enabled",
    "gateway_private_ip": "10.10.1.5",
    "gateway_subnet_cidr": "10.10.1.0/24",
}


@pytest.fixture
def config_values() -> dict:
    return {k: (list(v) if isinstance(v, list) else v) for k, v in VALID_CONFIG.items()}
