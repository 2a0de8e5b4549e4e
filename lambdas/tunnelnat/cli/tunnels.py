"""Tunnel state from the gateway's health agent: CloudWatch metric ``TunnelUp`` (namespace
``tunnelnat``). The agent publishes two series per tunnel: ``(Tunnel, Gateway=<instance ID>)`` and
``(Deployment, Tunnel)`` (the one the alarm watches). The current gateway's own series is shown;
a tunnel with only the deployment's series (the gateway publishes nothing) shows that one.

The newest datapoint within the last 5 minutes decides: its 1-minute Minimum >= 1 is ``up``,
below 1 is ``down``; no datapoint is ``unknown`` (the alarm treats that as breaching, too)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

NAMESPACE, METRIC = "tunnelnat", "TunnelUp"
WINDOW = timedelta(minutes=5)
QUERIES_MAX = 500  # GetMetricData's limit per call


@dataclass(frozen=True)
class TunnelState:
    tunnel: str
    gateway: str | None  # None: the deployment's series (no gateway publishes its own)
    state: str  # up | down | unknown
    value: float | None = None
    timestamp: float | None = None


def tunnel_states(
    cloudwatch: Any, *, gateway_ids: set[str], deployment: str, now: float
) -> list[TunnelState]:
    """Every tunnel of the deployment: the series of ``gateway_ids``, else the deployment's."""
    by_gateway: dict[tuple[str, str], dict] = {}
    by_deployment: dict[str, dict] = {}
    for page in cloudwatch.get_paginator("list_metrics").paginate(
        Namespace=NAMESPACE, MetricName=METRIC
    ):
        for metric in page.get("Metrics", []):  # moto lists a metric once per datapoint
            dims = {d["Name"]: d["Value"] for d in metric.get("Dimensions", [])}
            if set(dims) == {"Tunnel", "Gateway"} and dims["Gateway"] in gateway_ids:
                by_gateway[(dims["Tunnel"], dims["Gateway"])] = metric
            elif set(dims) == {"Tunnel", "Deployment"} and dims["Deployment"] == deployment:
                by_deployment[dims["Tunnel"]] = metric
    covered = {tunnel for tunnel, _ in by_gateway}
    metrics: list[tuple[str, str | None, dict]] = [
        (tunnel, gateway, metric) for (tunnel, gateway), metric in by_gateway.items()
    ]
    metrics += [(t, None, m) for t, m in by_deployment.items() if t not in covered]
    end = datetime.fromtimestamp(now, UTC)
    states = []
    for start in range(0, len(metrics), QUERIES_MAX):
        chunk = metrics[start : start + QUERIES_MAX]
        queries = [
            {
                "Id": f"m{i}",
                "MetricStat": {
                    "Metric": {
                        "Namespace": NAMESPACE,
                        "MetricName": METRIC,
                        "Dimensions": metric["Dimensions"],
                    },
                    "Period": 60,
                    "Stat": "Minimum",
                },
                "ReturnData": True,
            }
            for i, (_, _, metric) in enumerate(chunk)
        ]
        latest: dict[str, tuple[float, float]] = {}
        pages = cloudwatch.get_paginator("get_metric_data").paginate(
            MetricDataQueries=queries, StartTime=end - WINDOW, EndTime=end
        )
        for page in pages:
            for result in page.get("MetricDataResults", []):
                for stamp, value in zip(
                    result.get("Timestamps", []), result.get("Values", []), strict=False
                ):
                    seen = latest.get(result["Id"])
                    if seen is None or stamp.timestamp() > seen[0]:
                        latest[result["Id"]] = (stamp.timestamp(), value)
        for i, (tunnel, gateway, _) in enumerate(chunk):
            point = latest.get(f"m{i}")
            if point is None:
                states.append(TunnelState(tunnel, gateway, "unknown"))
            else:
                state = "up" if point[1] >= 1 else "down"
                states.append(TunnelState(tunnel, gateway, state, point[1], point[0]))
    return sorted(states, key=lambda s: (s.gateway or "", s.tunnel))
