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
    subprocess.run(["ip", "netns", "add", "tn-web-200"], check=True)
    # A process left running in the namespace, as after a kill -9 of the lab.
    subprocess.Popen(["ip", "netns", "exec", "tn-web-200", "sleep", "300"], start_new_session=True)
    time.sleep(0.2)
    assert "tn-web-200" in topo.lab_namespaces()
    topo.cleanup()
    assert topo.lab_namespaces() == []
    assert not topo.RUN.exists()
    topo.cleanup()  # idempotent


def test_cleanup_leaves_other_tools_namespaces_alone():
    assert not topo.is_lab_namespace("tn-bench-1234-apply")
    assert topo.is_lab_namespace("tn-gw") and topo.is_lab_namespace("tn-web-25")
