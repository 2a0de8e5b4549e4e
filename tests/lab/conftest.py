"""The namespace lab: needs root, iproute2, nftables, strongSwan, tcpdump, curl, socat.

Each module builds at most one lab (module-scoped fixtures); every lab is removed afterwards,
also when a test fails. Skipped, with the reason, where the machine cannot run it.
"""

from __future__ import annotations

import logging
import signal
import threading

import pytest

from lab import topology as topo
from lab.demo import missing_requirements

pytestmark = pytest.mark.lab


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    problems = missing_requirements()
    for item in items:
        if "tests/lab/" in str(item.fspath):
            item.add_marker(pytest.mark.lab)
            if problems:
                item.add_marker(pytest.mark.skip(reason="lab needs: " + "; ".join(problems)))


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    # A TERM (a CI timeout) unwinds like Ctrl-C: pytest then tears the lab fixture down, and the
    # lab removes its namespaces, instead of dying with them in place.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)


@pytest.fixture(scope="module")
def lab():
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    with topo.Lab(instances_count=2) as built:
        yield built
    # Checked by the lab's cleanup under its lock: a look now could see the next run's lab.
    assert built.cleaned, "the lab left namespaces behind"


@pytest.fixture(scope="module")
def configured_lab(lab):
    result = lab.configure_gateway()
    assert result.ok, f"ConfigureGateway {result.status}: {result.stderr[-1500:]}"
    return lab
