"""A daemon thread that calls ``sync`` every ``interval`` seconds: how the lab's stand-ins for
AWS's own machinery (the VPC router, EC2's ENI attachment) follow moto's state."""

from __future__ import annotations

import threading
from collections.abc import Callable


class Poller:
    """``sync()`` every ``interval`` seconds until ``stop()``. An exception is kept, handed to
    ``report`` (None after a good poll), and the next poll tries again."""

    def __init__(
        self,
        name: str,
        interval: float,
        sync: Callable[[], object],
        report: Callable[[str | None], None],
    ) -> None:
        self.name, self.interval, self.sync, self.report = name, interval, sync, report
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._poll, name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sync()
                self.report(None)
            except Exception as exc:  # noqa: BLE001 - kept and shown; the next poll tries again
                self.report(f"{type(exc).__name__}: {exc}")
