"""The lab's poller (lab/poller.py), behind the VPC router's and the ENI's mirrors."""

from __future__ import annotations

import threading

from lab.poller import Poller


def test_polls_until_stopped_and_reports_errors_then_recovery() -> None:
    calls: list[int] = []
    reports: list[str | None] = []
    recovered = threading.Event()

    def sync() -> None:
        calls.append(len(calls))
        if len(calls) == 2:
            raise ValueError("moto unreachable")
        if len(calls) >= 3:
            recovered.set()

    def report(error: str | None) -> None:
        reports.append(error)

    poller = Poller("test-poller", 0.01, sync, report)
    poller.start()
    poller.start()  # a second start keeps the one thread
    assert recovered.wait(5)
    poller.stop()
    after = len(calls)
    assert reports[:3] == [None, "ValueError: moto unreachable", None]
    threading.Event().wait(0.05)
    assert len(calls) == after  # stopped: no more polls
    assert not [t for t in threading.enumerate() if t.name == "test-poller"]
