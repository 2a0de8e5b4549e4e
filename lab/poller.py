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


class Polled:
    """``start()``/``stop()`` for a mirror with ``interval``, ``sync()`` and ``last_error``: a
    Poller named ``poller_name`` behind them."""

    poller_name = "mirror"
    interval: float
    last_error: str | None
    _poller: Poller | None

    def sync(self) -> object:
        raise NotImplementedError

    def start(self) -> None:
        if self._poller is None:
            self._poller = Poller(self.poller_name, self.interval, self.sync, self._report)
        self._poller.start()

    def stop(self) -> None:
        if self._poller is not None:
            self._poller.stop()

    def _report(self, error: str | None) -> None:
        self.last_error = error
