"""cleanup() removes what a crashed run left behind: namespaces, their processes, /run/tn-lab."""

from __future__ import annotations

import subprocess
import time

import pytest

from lab import topology as topo

pytestmark = pytest.mark.lab


def test_cleanup_after_a_crashed_run():
    with topo.lab_lock():
        crash_and_clean()


def crash_and_clean():
    topo.cleanup()
    topo.RUN.mkdir(parents=True, exist_ok=True)
    subprocess.run(["ip", "netns", "add", "tn-crashed"], check=True)
    # A process left running in the namespace, as after a kill -9 of the lab.
    subprocess.Popen(["ip", "netns", "exec", "tn-crashed", "sleep", "300"], start_new_session=True)
    time.sleep(0.2)
    assert "tn-crashed" in topo.lab_namespaces()
    topo.cleanup()
    assert topo.lab_namespaces() == []
    assert not topo.RUN.exists()
    topo.cleanup()  # idempotent
