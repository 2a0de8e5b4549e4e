"""The namespace lab: needs root, iproute2, nftables, strongSwan, tcpdump, curl, socat.

Each module builds at most one lab (module-scoped fixtures); every lab is removed afterwards,
also when a test fails. Skipped, with the reason, where the machine cannot run it.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
import traceback
import warnings

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


SLOW_SETUP_SECONDS = 90


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item: pytest.Item):
    """A lab test's set-up that runs past SLOW_SETUP_SECONDS (a lab build takes ~10 s) leaves a
    warning with where it was waiting, so CI's summary says why a run was slow."""
    main = threading.get_ident()
    seen: list[str] = []

    def look() -> None:
        frame = sys._current_frames().get(main)
        if frame is not None:
            seen.append("".join(traceback.format_stack(frame, limit=12)))

    timer = threading.Timer(SLOW_SETUP_SECONDS, look)
    timer.daemon = True
    started = time.monotonic()
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
    if seen:
        took = time.monotonic() - started
        warnings.warn(
            f"{item.nodeid}: set-up took {took:.0f}s; at {SLOW_SETUP_SECONDS}s it was in:\n"
            + seen[0],
            stacklevel=1,
        )


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
