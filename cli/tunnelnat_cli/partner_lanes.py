"""A several-partner deployment's lanes as ``tunnelnat status``/``doctor``/``tunnels`` show them.

The stack publishes one SSM parameter per partner under ``/tunnelnat/<deployment>/partners``
(core/lanes.py); a deployment without a partners file has none, and every command prints what
it printed before. Per partner: its tunnel (the lane's name), what instances address (aliases
or the real networks) and the real networks (the tunnel's selectors), its S, and its own
DynamoDB table of mappings (``<deployment>-<partner>``), read as the deployment's table is.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from tunnelnat.core.lanes import Lane, LaneError, load_lanes, parameter_path
from tunnelnat_cli.aws import error_code
from tunnelnat_cli.table import Snapshot, TableReader
from tunnelnat_cli.tunnels import TunnelState

ENROLLED = "enrolled"


@dataclass(frozen=True)
class Lanes:
    """The deployment's lanes (empty: one partner, today's deployment) or why they are unknown."""

    lanes: tuple[Lane, ...] = ()
    path: str | None = None
    problem: str | None = None


def read_lanes(ssm: Any, deployment: str) -> Lanes:
    """GetParametersByPath of the deployment's partners path; never raises."""
    try:
        path = parameter_path(deployment)
    except LaneError:
        return Lanes()  # a name no lane can carry: a deployment from before partners files
    values: list[str] = []
    try:
        for page in ssm.get_paginator("get_parameters_by_path").paginate(Path=path):
            values += [p["Value"] for p in page.get("Parameters", [])]
    except ClientError as exc:
        return Lanes(path=path, problem=f"{exc.operation_name} failed ({error_code(exc)})")
    except BotoCoreError as exc:
        return Lanes(path=path, problem=str(exc))
    if not values:
        return Lanes(path=path)
    try:
        return Lanes(load_lanes(values), path)
    except LaneError as exc:
        return Lanes(path=path, problem=f"the lanes under {path} contradict: {exc}")


def table_snapshot(dynamodb: Any, lane: Lane) -> tuple[Snapshot | None, str | None]:
    """The lane's table, or why it cannot be read (a missing table is the lane's problem only)."""
    try:
        return TableReader(dynamodb, lane.table).snapshot(), None
    except ClientError as exc:
        return None, f"table {lane.table}: {exc.operation_name} failed ({error_code(exc)})"


def tunnel_of(lane: Lane, states: Iterable[TunnelState]) -> TunnelState | None:
    """The lane's TunnelUp (its tunnel is named after it): the worst of its gateways' series."""
    mine = [s for s in states if s.tunnel == lane.name]
    order = {"down": 0, "unknown": 1, "up": 2}
    return min(mine, key=lambda s: order.get(s.state, 1)) if mine else None


def addresses(items: Iterable[object]) -> str:
    return ",".join(str(i) for i in items)


def lane_doc(
    lane: Lane, snapshot: Snapshot | None, problem: str | None, tunnel: TunnelState | None
) -> dict[str, Any]:
    """One partner in ``tunnelnat status --json``'s ``partners`` list."""
    records = snapshot.records if snapshot else {}
    enrolled = sum(1 for r in records.values() if r.status == ENROLLED)
    return {
        "partner": lane.name,
        "index": lane.index,
        "tunnel": lane.name,
        "ike_version": lane.ike_version,
        "endpoint": str(lane.endpoint),
        "networks": [str(n) for n in lane.networks],
        "aliases": [str(n) for n in lane.aliases],
        "local_networks": [str(n) for n in lane.local_networks],
        "nat_mode": lane.nat_mode,
        "public_addresses": [str(a) for a in lane.public_addresses],
        "tag_key": lane.tag_key,
        "table": lane.table,
        "tunnel_state": tunnel.state if tunnel else "unknown",
        "enrolled": enrolled if snapshot else None,
        "pending": len(records) - enrolled if snapshot else None,
        "mapped": len(snapshot.mappings) if snapshot else None,
        "desired_generation": snapshot.desired_generation if snapshot else None,
        "applied_generation": snapshot.applied_generation if snapshot else None,
        "problem": problem,
    }


def network_text(doc: dict[str, Any]) -> str:
    """``100.64.1.0/24 -> 10.0.0.0/24`` (alias -> real) or ``10.1.0.0/24`` (real)."""
    if doc["aliases"]:
        return " ".join(f"{a}->{n}" for a, n in zip(doc["aliases"], doc["networks"], strict=True))
    return " ".join(doc["networks"])
