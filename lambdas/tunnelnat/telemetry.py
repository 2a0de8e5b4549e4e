"""What the controller reports as metrics, as a port: Powertools in the Lambda, nothing in tests."""

from __future__ import annotations

from typing import Protocol

FAILURE_REASONS = (
    "agent-not-ready",
    "command-failed",
    "store-conflict",
    "pool-exhausted",
    "unsupported-subnet",
    "gateway-sync",
    "dead-lettered",
    # An instance whose private address another instance's mapping holds (a human must look).
    "conflict",
    # Rows the gateway refused to apply (it applied every other one).
    "invalid-mapping",
    # More than one instance claims to be the gateway: no sync until a human settles it.
    "gateway-ambiguous",
    # Route-table mode: a route for a partner network that tunnelnat did not create.
    "route-conflict",
)


class Telemetry(Protocol):
    def count(self, name: str, value: float = 1) -> None: ...

    def measure(self, name: str, value: float, unit: str) -> None:
        """One datapoint in ``unit`` (``Seconds``, ``Milliseconds``, ``Count``)."""
        ...

    def failure(self, reason: str) -> None:
        """One failure, by reason (one of FAILURE_REASONS)."""
        ...


class NoTelemetry:
    def count(self, name: str, value: float = 1) -> None:
        return None

    def measure(self, name: str, value: float, unit: str) -> None:
        return None

    def failure(self, reason: str) -> None:
        return None
