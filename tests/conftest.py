"""Shared by every suite: a valid configuration to start from, and how tests share workers."""

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


# Under pytest-xdist (`make test` runs `-n 2 --dist loadgroup --no-loadscope-reorder`): the
# namespace suites share one worker (one lab per machine, and the benchmark's namespaces wait for
# it), every other file keeps its tests on one worker (its module fixtures, e.g. a CDK synthesis,
# are built once), and tests marked `spread` go wherever a worker is free. The longest units go
# first (the spread halves of the property test, then the namespace suites), so neither worker is
# left with a long one at the end.
NAMESPACE_SUITES = ("tests/lab/", "tests/bench/")


# tryfirst: xdist's own hook turns xdist_group markers into the "@group" its scheduler reads;
# run after it, this hook's markers came too late and every test was scheduled on its own: a lab
# module split over both workers, two labs waiting minutes for each other's lock. (pytest is
# also kept below 9, whose node ids xdist 3.8 cannot suffix: requirements-dev.txt.)
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        if item.get_closest_marker("spread"):
            return 0
        return 1 if item.nodeid.startswith(NAMESPACE_SUITES) else 2

    items.sort(key=rank)  # stable: files keep their order within a rank
    for item in items:
        if item.get_closest_marker("spread") or item.get_closest_marker("xdist_group"):
            continue
        path = item.nodeid.split("::", 1)[0]
        group = "namespaces" if path.startswith(NAMESPACE_SUITES) else path
        item.add_marker(pytest.mark.xdist_group(group))
