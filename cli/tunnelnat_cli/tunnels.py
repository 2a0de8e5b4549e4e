"""Tunnels: their state from the health agent's metrics, and ``tunnelnat tunnels``, the SAs.

Tunnel state from the gateway's health agent: CloudWatch metric ``TunnelUp`` (namespace
``tunnelnat/<deployment>``). The agent publishes two series per tunnel: ``(Tunnel,
Gateway=<instance ID>)`` and ``(Deployment, Tunnel)`` (the one the alarm watches). The current
gateway's own series is shown; a tunnel with only the deployment's series (the gateway publishes
nothing) shows that one.

The newest datapoint within the last 5 minutes decides: its 1-minute Minimum >= 1 is ``up``,
below 1 is ``down``; no datapoint is ``unknown`` (the alarm treats that as breaching, too)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from botocore.exceptions import ClientError

from tunnelnat.adapters.commands import CommandError, SsmCommands
from tunnelnat.adapters.ec2 import Ec2Instances, GatewayNotFound
from tunnelnat_cli.aws import EXIT_FINDINGS, EXIT_OK, CliError
from tunnelnat_cli.context import Ctx
from tunnelnat_cli.fleet import gateway_group, load_config
from tunnelnat_cli.render import dump_json, table

# The gateways publish to tunnelnat/<deployment>, the only namespace their role may write and
# the one the alarms watch (issue 21): the shared "tunnelnat" is anyone's, never read here.
NAMESPACE_PREFIX, METRIC = "tunnelnat/", "TunnelUp"
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
    namespace = NAMESPACE_PREFIX + deployment
    by_gateway: dict[tuple[str, str], dict] = {}
    by_deployment: dict[str, dict] = {}
    for page in cloudwatch.get_paginator("list_metrics").paginate(
        Namespace=namespace, MetricName=METRIC
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
                        "Namespace": namespace,
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


# -- ``tunnelnat tunnels``: the SAs on the gateway ----------------------------------------------
#
# The gateway runs the read-only ShowTunnels document (SSM Run Command, as the controller runs
# its documents): charon's own listing, live, with nothing to install or open. Its output is one
# JSON line per SA (gateway/tunnelnat_sas.py); SSM keeps the first 24,000 characters of it.

SCHEMA = "tunnelnat.tunnels/v1"
DOCUMENT = "ShowTunnels"
SSM_OUTPUT_LIMIT = 24_000


class ShowTunnelsCommand(SsmCommands):
    """SSM Run Command for ShowTunnels, which only operators send (not among the controller's
    DOCUMENTS, nor in its role's permissions)."""

    def document_name(self, document: str) -> str:
        if document != DOCUMENT:
            raise ValueError(f"unknown document {document!r}")
        return f"{self._prefix}{document}"


def find_gateway(ctx: Ctx) -> str:
    """The gateway as the controller finds it: the member of the gateway's Auto Scaling group
    holding G (G from the controller's configuration; the group's newest member when that is
    not readable)."""
    config = load_config(
        ctx.aws.client("lambda"), ctx.reader, function_name=f"{ctx.deployment}-controller"
    )
    try:
        return Ec2Instances(
            ctx.aws.client("ec2"),
            gateway_ip=config.gateway_ip,
            gateway_group=gateway_group(ctx.deployment),
        ).find_gateway(ctx.deployment)
    except GatewayNotFound as exc:
        raise CliError(f"{exc} (is the gateway running? `tunnelnat doctor` says more)") from None


def parse_listing(stdout: str) -> tuple[dict[str, list[dict[str, Any]]], int, bool]:
    """ShowTunnels' lines by kind; how many lines were unreadable; whether SSM cut the output."""
    kinds: dict[str, list[dict[str, Any]]] = {"ike": [], "child": [], "tunnel": [], "error": []}
    unreadable = 0
    cut = len(stdout) >= SSM_OUTPUT_LIMIT or "--output truncated--" in stdout
    for line in stdout.splitlines():
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError:
            unreadable += 1
            continue
        if isinstance(item, dict) and item.get("kind") in kinds:
            kinds[item["kind"]].append(item)
        else:
            unreadable += 1
    return kinds, unreadable, cut


def show_tunnels(
    ctx: Ctx, gateway: str, tunnel: str | None, *, timeout: float
) -> tuple[dict[str, Any], int]:
    """ShowTunnels run on ``gateway`` (one tunnel, or every one): the ``tunnelnat tunnels``
    document and how many lines were unreadable. A failure is a one-line CliError."""
    port = ctx.runtime.commands or ShowTunnelsCommand(
        ctx.aws.client("ssm"),
        document_prefix=f"{ctx.deployment}-",
        timeout_seconds=timeout,
        poll_seconds=1.0,
        sleep=ctx.runtime.sleep,
    )
    try:
        result = port.run(gateway, DOCUMENT, {"TunnelName": tunnel or ""})
    except (CommandError, ClientError) as exc:
        raise CliError(f"{DOCUMENT} on gateway {gateway}: {exc}") from None
    if not result.ok:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise CliError(
            f"{DOCUMENT} {result.status} on gateway {gateway}: "
            f"{detail[-1] if detail else 'no output'} (is the {ctx.deployment}-{DOCUMENT} "
            "document deployed, and the caller allowed ssm:SendCommand with it?)"
        )
    kinds, unreadable, cut = parse_listing(result.stdout)
    doc = {
        "schema": SCHEMA,
        "deployment": ctx.deployment,
        "gateway": gateway,
        "tunnels": kinds["tunnel"],
        "ike_sas": kinds["ike"],
        "child_sas": kinds["child"],
        "errors": [e.get("error") for e in kinds["error"]],
        "truncated": cut or unreadable > 0,
    }
    return doc, unreadable


def run(ctx: Ctx) -> int:
    gateway = find_gateway(ctx)
    doc, unreadable = show_tunnels(ctx, gateway, ctx.args.tunnel, timeout=ctx.args.timeout)
    if ctx.args.json:
        dump_json(doc, ctx.out)
        return EXIT_FINDINGS if doc["errors"] else EXIT_OK
    # Several partners (issue 23): the listing per partner, each tunnel's SAs under it.
    from tunnelnat_cli.partner_lanes import read_lanes

    lanes = read_lanes(ctx.aws.client("ssm"), ctx.deployment)
    if lanes.problem:
        ctx.err.write(f"tunnelnat: partners unknown: {lanes.problem}\n")
    if lanes.lanes:
        render_partners(ctx, doc, unreadable, lanes.lanes)
    else:
        render(ctx, doc, unreadable)
    return EXIT_FINDINGS if doc["errors"] else EXIT_OK


def partner_doc(doc: dict[str, Any], tunnel: str) -> dict[str, Any]:
    """The listing of one tunnel: its line, its IKE SAs and their CHILD_SAs (a CHILD_SA's name is
    unique only within its connection, the IKE SA's name)."""
    return doc | {
        "tunnels": [t for t in doc["tunnels"] if t.get("tunnel") == tunnel],
        "ike_sas": [i for i in doc["ike_sas"] if i.get("ike") == tunnel],
        "child_sas": [c for c in doc["child_sas"] if c.get("ike") == tunnel],
        "errors": [],
    }


def render_partners(ctx: Ctx, doc: dict[str, Any], unreadable: int, lanes: Any) -> None:
    """Per partner: what it is (IKE version, endpoint, what instances address, its S), then its
    tunnel's SAs as ``render`` shows them; charon's errors once, at the end."""
    from tunnelnat_cli.partner_lanes import addresses

    out = ctx.out
    out.write(f"gateway {doc['gateway']}  deployment {doc['deployment']}\n")
    only = ctx.args.tunnel
    for lane in lanes:
        if only and lane.name != only:
            continue
        if lane.aliases:
            pairs = zip(lane.aliases, lane.networks, strict=True)
            where = " ".join(f"{a} (alias of {n})" for a, n in pairs)
        else:
            where = addresses(lane.networks)
        out.write(
            f"\n== partner {lane.name}: IKEv{lane.ike_version} to {lane.endpoint}; instances "
            f"address {where}; S {addresses(lane.public_addresses)}\n"
        )
        _render_body(ctx, partner_doc(doc, lane.name), unreadable=0, per_partner=True)
    for error in doc["errors"]:
        out.write(f"{error}\n")
    _truncated(ctx, doc, unreadable)


def _seconds(value: Any) -> str:
    if not isinstance(value, int):
        return "-"
    if value < 0:
        return f"overdue {-value}s"
    if value < 120:
        return f"{value}s"
    if value < 7200:
        return f"{value // 60}m"
    return f"{value // 3600}h{(value % 3600) // 60:02d}m"


def _ago(value: Any) -> str:
    return f"{_seconds(value)} ago" if isinstance(value, int) else "-"


def render(ctx: Ctx, doc: dict[str, Any], unreadable: int) -> None:
    ctx.out.write(f"gateway {doc['gateway']}  deployment {doc['deployment']}\n")
    _render_body(ctx, doc, unreadable)


def _render_body(
    ctx: Ctx, doc: dict[str, Any], unreadable: int, *, per_partner: bool = False
) -> None:
    out = ctx.out
    # The last rekey of each CHILD_SA, by (tunnel, child): a child's name is unique only
    # within its connection.
    last: dict[tuple[str, str], int] = {}
    for t in doc["tunnels"]:
        for child, ago_ in (t.get("last_rekey_ago") or {}).items():
            last[(t.get("tunnel"), child)] = ago_
        out.write(
            f"tunnel {t['tunnel']}: {len(t.get('children') or [])} CHILD_SA name(s); charon's "
            f"log holds {t.get('rekeys_in_log', 0)} rekey(s), "
            f"{t.get('failed_rekeys_in_log', 0)} failed\n"
        )
        if t.get("diagnosis"):
            out.write(f"tunnel {t['tunnel']}: charon's last failure: {t['diagnosis']}\n")
    for error in doc["errors"]:
        out.write(f"{error}\n")
    if doc["ike_sas"]:
        out.write("\n")
        out.write(
            table(
                ["IKE SA", "ID", "STATE", "REMOTE", "REMOTE ID", "PROPOSAL", "UP", "REKEY IN"],
                [
                    [
                        i["ike"],
                        i.get("id"),
                        i["state"],
                        i.get("remote"),
                        i.get("remote_id"),
                        i.get("proposal"),
                        _seconds(i.get("established")),
                        _seconds(i.get("rekey_in")),
                    ]
                    for i in doc["ike_sas"]
                ],
            )
            + "\n"
        )
    if doc["child_sas"]:
        out.write("\n")
        out.write(
            table(
                [
                    "CHILD SA",
                    "ID",
                    "STATE",
                    "LOCAL",
                    "REMOTE",
                    "PROPOSAL",
                    "AGE",
                    "LAST REKEY",
                    "REKEY IN",
                    "BYTES IN/OUT",
                    "LAST IN",
                ],
                [
                    [
                        c["child"],
                        c.get("id"),
                        c["state"],
                        ",".join(c.get("local_ts") or []),
                        ",".join(c.get("remote_ts") or []),
                        c.get("proposal"),
                        _seconds(c.get("age")),
                        _ago(last.get((c.get("ike"), c["child"]))),
                        _seconds(c.get("rekey_in")),
                        f"{c.get('bytes_in')}/{c.get('bytes_out')}",
                        _ago(c.get("idle_in")),
                    ]
                    for c in doc["child_sas"]
                ],
            )
            + "\n"
        )
    elif per_partner:
        out.write("no SA: this partner's tunnel is down (`tunnelnat doctor` says why)\n")
    elif not doc["errors"]:
        out.write("no SA on the gateway: the tunnel is down (`tunnelnat doctor` says why)\n")
    if not per_partner:
        _truncated(ctx, doc, unreadable)


def _truncated(ctx: Ctx, doc: dict[str, Any], unreadable: int) -> None:
    if doc["truncated"]:
        ctx.err.write(
            f"tunnelnat: SSM kept only the first {SSM_OUTPUT_LIMIT:,} characters of the listing"
            f"{f' ({unreadable} line(s) cut)' if unreadable else ''}: pass --tunnel NAME\n"
        )
