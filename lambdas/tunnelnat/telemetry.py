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
    # Route-table mode: a route that tunnelnat did not create for, inside or around a partner
    # network.
    "route-conflict",
    # A tagged instance outside the allow-list of subnets / groups (someone tagged it who
    # should not have: worth a look).
    "not-allowed",
    # Route-table mode: the instance's route table is not opted in for this deployment.
    "route-table-not-opted-in",
)
# Every metric the controller publishes carries this dimension (the deployment's name), so two
# deployments in one account never page each other's on-call (issue 21, finding 4).
DEPLOYMENT_DIMENSION = "Deployment"


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
