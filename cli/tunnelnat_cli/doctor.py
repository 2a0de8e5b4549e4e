"""``tunnelnat doctor``: check a deployment; every finding names what is wrong and the fix.

Statuses: ``ok``; ``fail`` (a finding: exit 1); ``unknown`` (could not be checked, e.g. an API
the caller may not use or that moto does not implement; exit 0 unless ``--strict``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from ipaddress import IPv4Address, IPv4Network, ip_address
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from tunnelnat.adapters.ec2 import DEPLOYMENT_TAG
from tunnelnat.core.enrolment import GATEWAY_ROLE_TAG
from tunnelnat.core.lanes import partner_status_prefix
from tunnelnat.healer import latest_established
from tunnelnat_cli.aws import EXIT_FINDINGS, EXIT_OK, CliError, error_code
from tunnelnat_cli.context import Ctx
from tunnelnat_cli.enrol import fix_for, is_failure
from tunnelnat_cli.fleet import (
    DeploymentConfig,
    Instance,
    describe_instances,
    gateways,
    instances_by_id,
    load_config,
    tagged_instances,
)
from tunnelnat_cli.pair import (
    READINESS_STALE_SECONDS,
    PairState,
    deployed_software,
    gateway_software,
    pair_state,
    short,
)
from tunnelnat_cli.partner_lanes import read_lanes, table_snapshot, tunnel_of
from tunnelnat_cli.render import ago, dump_json
from tunnelnat_cli.table import Snapshot
from tunnelnat_cli.tunnels import show_tunnels, tunnel_states

SCHEMA = "tunnelnat.doctor/v1"
OK, FAIL, UNKNOWN = "ok", "fail", "unknown"
SSM_IDS_MAX = 50
PENDING_SSM_GRACE = 600  # seconds an instance may wait for its SSM agent before it is a finding
# How old the newest TunnelEstablished may be (the healer's default lookback).
ESTABLISHED_LOOKBACK = 900
# How long doctor waits for ShowTunnels (charon's log, read on the gateway) for a tunnel not up.
SHOW_TUNNELS_TIMEOUT = 30.0
# Statuses the controller gives an instance it skipped so that the rest converge (issue 14):
# each is its own finding, named by the status, with the controller's reason.
ISOLATION_STATUSES = ("conflict", "other-vpc", "route-conflict")
REJECTED_SHOWN = 10  # rows of the gateway's last sync report shown in one finding


@dataclass(frozen=True)
class Finding:
    check: str
    status: str
    summary: str
    fix: str | None = None
    resource: str | None = None


@dataclass
class Facts:
    """What the checks share, gathered once."""

    snapshot: Snapshot
    config: DeploymentConfig
    gateways: list[Instance]
    tag_key: str
    tag_value: str
    pair: PairState | None = None  # None: a single gateway

    @property
    def gateway(self) -> Instance | None:
        """The gateway the checks look at: of a pair, the active (G's ENI holder)."""
        if self.pair is not None:
            return next((g for g in self.gateways if g.instance_id == self.pair.active), None)
        return self.gateways[-1] if self.gateways else None


def run(ctx: Ctx) -> int:
    findings = diagnose(ctx)
    failed = [f for f in findings if f.status == FAIL]
    unknown = [f for f in findings if f.status == UNKNOWN]
    healthy = not failed and not (ctx.args.strict and unknown)
    if ctx.args.json:
        dump_json(
            {
                "schema": SCHEMA,
                "deployment": ctx.deployment,
                "region": ctx.aws.region,
                "healthy": healthy,
                "counts": {
                    OK: sum(1 for f in findings if f.status == OK),
                    FAIL: len(failed),
                    UNKNOWN: len(unknown),
                },
                "findings": [asdict(f) for f in findings],
            },
            ctx.out,
        )
    else:
        marks = {OK: "[ok]  ", FAIL: "[FAIL]", UNKNOWN: "[??]  "}
        for f in findings:
            ctx.out.write(f"{marks[f.status]} {f.check:<20} {f.summary}\n")
            if f.fix and f.status != OK:
                ctx.out.write(f"{'':27}fix: {f.fix}\n")
        verdict = "healthy" if healthy else f"{len(failed)} finding(s)"
        if unknown:
            verdict += f", {len(unknown)} check(s) could not run"
        ctx.out.write(f"\n{ctx.deployment}: {verdict}\n")
    return EXIT_OK if healthy else EXIT_FINDINGS


def diagnose(ctx: Ctx) -> list[Finding]:
    args = ctx.args
    snapshot = ctx.reader.snapshot()  # a missing table is an error (exit 2), not a finding
    findings: list[Finding] = []
    gateway_ip = IPv4Address(args.gateway_ip) if args.gateway_ip else None
    try:
        config = load_config(
            ctx.aws.client("lambda"),
            ctx.reader,
            function_name=args.function_name or f"{ctx.deployment}-controller",
            gateway_ip=gateway_ip,
        )
    except CliError as exc:
        config = DeploymentConfig(None, "invalid", exc.message, gateway_ip_override=gateway_ip)
        findings.append(
            Finding("config", FAIL, exc.message, "fix the configuration and redeploy the stack")
        )
    else:
        if config.config is None:
            findings.append(
                Finding(
                    "config",
                    UNKNOWN,
                    f"controller configuration not readable ({config.problem})",
                    "pass --function-name, or --gateway-ip for the ENI check",
                )
            )
        else:
            findings.append(Finding("config", OK, f"configuration from {config.source}"))
    tag_key = args.tag_key or (config.config.enrolment_tag_key if config.config else "tunnelnat")
    tag_value = args.tag_value or (
        config.config.enrolment_tag_value if config.config else "enabled"
    )
    facts = Facts(
        snapshot, config, gateways(ctx.aws.client("ec2"), ctx.deployment), tag_key, tag_value
    )
    try:
        facts.pair = pair_state(
            ctx.aws.client("ec2"),
            ctx.aws.client("dynamodb"),
            args.table,
            facts.gateways,
            config.gateway_ip,
        )
    except ClientError as exc:
        findings.append(
            Finding(
                "pair",
                UNKNOWN,
                f"could not read the gateway pair: {exc.operation_name} failed ({error_code(exc)})",
                f"allow {exc.operation_name} to the caller, or retry",
            )
        )
    checks: list[Callable[[Ctx, Facts], list[Finding]]] = [
        check_gateway,
        check_impostors,
        check_pair,
        check_software,
        check_source_dest,
        check_eni,
        check_ssm,
        check_tunnels,
        check_generation,
        check_rejected,
        check_dlq,
        check_alarms,
        check_instances,
        check_partners,
    ]
    for check in checks:
        try:
            findings.extend(check(ctx, facts))
        except ClientError as exc:  # one API denied or failing: that check only, say which
            name = check.__name__.removeprefix("check_").replace("_", "-")
            findings.append(
                Finding(
                    name,
                    UNKNOWN,
                    f"could not check: {exc.operation_name} failed ({error_code(exc)})",
                    f"allow {exc.operation_name} to the caller, or retry",
                )
            )
    return findings


# -- the checks -------------------------------------------------------------------------------
def check_gateway(ctx: Ctx, facts: Facts) -> list[Finding]:
    d = ctx.deployment
    if not facts.gateways:
        return [
            Finding(
                "gateway",
                FAIL,
                f"no running instance tagged tunnelnat:role=gateway, tunnelnat:deployment={d}",
                "start the gateway (or check its Auto Scaling group's activity); if it runs, "
                f"tag it: aws ec2 create-tags --resources <id> --tags "
                f"Key=tunnelnat:role,Value=gateway Key=tunnelnat:deployment,Value={d}",
            )
        ]
    if facts.pair is not None:
        return _check_pair_gateways(facts)
    gw = facts.gateway
    assert gw is not None
    found = [
        Finding("gateway", OK, f"{gw.instance_id} running ({gw.private_ip})", None, gw.instance_id)
    ]
    if len(facts.gateways) > 1:
        others = ", ".join(g.instance_id for g in facts.gateways[:-1])
        found.append(
            Finding(
                "gateway",
                FAIL,
                f"{len(facts.gateways)} running gateways; the controller uses {gw.instance_id}, "
                f"not {others}",
                f"terminate the stale gateway(s) once {gw.instance_id} serves: "
                f"aws ec2 terminate-instances --instance-ids {others.replace(',', '')}",
                gw.instance_id,
            )
        )
    return found


GROUP_TAG = "aws:autoscaling:groupName"  # Auto Scaling's; the aws: prefix is reserved to AWS
LOOKALIKE_STATES = ["pending", "running", "stopping", "stopped"]


def check_impostors(ctx: Ctx, facts: Facts) -> list[Finding]:
    """``gateway-impostor`` (issue 21): an instance labelled like this deployment's gateway
    (``tunnelnat:gateway=<deployment>``, or ``tunnelnat:role=gateway`` of this deployment or of
    none) that its Auto Scaling group did not launch. Nothing trusts those labels any more (the
    associations, the pair agents, the roles and the healer go by the group and G's ENI), so it
    gets nothing; but someone set them, and they should know who."""
    d = ctx.deployment
    group = getattr(ctx.args, "gateway_group", None) or f"{d}-gateway"
    ec2 = ctx.aws.client("ec2")
    state = {"Name": "instance-state-name", "Values": LOOKALIKE_STATES}
    found: dict[str, Instance] = {}
    for filters in (
        [{"Name": "tag:tunnelnat:gateway", "Values": [d]}, state],
        [{"Name": f"tag:{GATEWAY_ROLE_TAG}", "Values": ["gateway"]}, state],
    ):
        for instance in describe_instances(ec2, filters):
            deployment = instance.tags.get(DEPLOYMENT_TAG)
            if instance.tags.get("tunnelnat:gateway") == d or deployment in (None, d):
                found[instance.instance_id] = instance
    impostors = sorted(i for i, inst in found.items() if inst.tags.get(GROUP_TAG) != group)
    if not impostors:
        return [
            Finding("gateway-impostor", OK, f"no instance outside {group} is labelled a gateway")
        ]
    return [
        Finding(
            "gateway-impostor",
            FAIL,
            f"{i} is labelled like a gateway of {d} "
            f"({', '.join(f'{k}={v}' for k, v in sorted(found[i].tags.items()) if k in LABELS)}) "
            f"but is not in its Auto Scaling group {group}"
            + (f" (it is in {found[i].tags[GROUP_TAG]})" if GROUP_TAG in found[i].tags else "")
            + ": it gets no gateway command, role or traffic",
            f"remove the labels (aws ec2 delete-tags --resources {i} --tags "
            "Key=tunnelnat:gateway Key=tunnelnat:role), and find who set them: CloudTrail "
            f"CreateTags/RunInstances on {i} (aws cloudtrail lookup-events --lookup-attributes "
            f"AttributeKey=ResourceName,AttributeValue={i}); docs/security.md reserves these keys",
            i,
        )
        for i in impostors
    ]


LABELS = ("tunnelnat:gateway", GATEWAY_ROLE_TAG, DEPLOYMENT_TAG)


def _check_pair_gateways(facts: Facts) -> list[Finding]:
    pair = facts.pair
    assert pair is not None
    ids = ", ".join(g.instance_id for g in facts.gateways)
    if pair.active is None:
        return [
            Finding(
                "gateway",
                FAIL,
                f"G's ENI is attached to none of the running gateways ({ids}): a failover in "
                "progress, or the ENI was detached by hand",
                "wait a minute and run doctor again; if it stays, check the pair agents' logs "
                "(journalctl -u tunnelnat-pair) on the gateways",
            )
        ]
    found = [
        Finding(
            "gateway",
            OK,
            f"{pair.active} is the active gateway (holds G's ENI {pair.eni_id})",
            None,
            pair.active,
        )
    ]
    if len(facts.gateways) > 2:
        found.append(
            Finding(
                "gateway",
                FAIL,
                f"{len(facts.gateways)} running gateways ({ids}); a pair is two",
                "terminate the stale gateway(s) that do not hold G's ENI "
                f"(the active is {pair.active}); the Auto Scaling group keeps two",
                pair.active,
            )
        )
    return found


def check_pair(ctx: Ctx, facts: Facts) -> list[Finding]:
    """Pair mode only: a standby is running, reporting, current, loaded and hearing the active;
    and the last failover, for the record."""
    pair = facts.pair
    if pair is None:
        return []
    now = ctx.runtime.now()
    desired = facts.snapshot.desired_generation
    found: list[Finding] = []
    if not pair.standbys:
        found.append(
            Finding(
                "pair",
                FAIL,
                f"pair mode, but only {len(facts.gateways)} gateway running: nobody takes over "
                "if it fails",
                "check the gateway Auto Scaling group's activity (it keeps two: "
                "aws autoscaling describe-scaling-activities); -c tunnelnat:gatewayPair=false "
                "for a single gateway on purpose",
            )
        )
    for standby in pair.standbys:
        sid = standby.instance_id
        ready = standby.readiness
        age = standby.age(now)
        if standby.stale(now):
            when = "never" if age is None else f"last {ago(now - age, now)}"
            found.append(
                Finding(
                    "pair",
                    FAIL,
                    f"standby {sid}: its pair agent has not reported ({when}): it is not "
                    "running, or cannot write to the table; it would not take over",
                    f"on {sid}: systemctl status tunnelnat-pair; journalctl -u tunnelnat-pair",
                    sid,
                )
            )
            continue
        assert ready is not None
        problems = []
        if standby.behind(desired):
            problems.append(
                (
                    f"behind the NAT table: applied generation {ready.applied_generation}, "
                    f"desired {desired}",
                    "tunnelnat reconcile --wait (SyncNatTable reaches both gateways); if it "
                    "stays behind, check the SSM agent on the standby",
                )
            )
        if ready.tunnel_loaded is False:
            problems.append(
                (
                    "the tunnel's connection is not loaded in its strongSwan: a takeover could "
                    "not initiate",
                    "aws ssm start-associations-once --association-ids <ConfigureTunnel's> "
                    "(it targets both gateways)",
                )
            )
        if standby.heard(now) is False:
            problems.append(
                (
                    "has not heard the active's heartbeat recently",
                    "check UDP 7465 between the gateways (the security group's self rule) and "
                    f"the active's pair agent on {pair.active}",
                )
            )
        for summary, fix in problems:
            found.append(Finding("pair", FAIL, f"standby {sid}: {summary}", fix, sid))
        if not problems:
            found.append(
                Finding(
                    "pair",
                    OK,
                    f"standby {sid} ready (generation {ready.applied_generation}/{desired}, "
                    f"reported {ago(now - (age or 0), now)})",
                    None,
                    sid,
                )
            )
    last = pair.record.last_failover if pair.record else None
    if last is not None:
        when = ago(last.at, now) if last.at else "at an unknown time"
        found.append(
            Finding(
                "pair",
                OK,
                f"last failover {last.from_instance} -> {last.to_instance} {when} "
                f"({pair.record.failovers if pair.record else 0} in all)",
            )
        )
    return found


def check_software(ctx: Ctx, facts: Facts) -> list[Finding]:
    """Each gateway runs the gateway software the stack deployed (issue 22): its pair agent
    says which package it runs; the stack's SSM parameter names the deployed one. A single
    gateway has no agent to say: only the deployed one is shown."""
    if not facts.gateways:
        return []
    deployed = deployed_software(ctx.aws.client("ssm"), ctx.deployment)
    if deployed.sha256 is None:
        return [
            Finding(
                "gateway-software",
                UNKNOWN,
                f"cannot tell which gateway software is deployed: {deployed.problem}",
                f"allow ssm:GetParameter on {deployed.parameter} to the caller; if it does not "
                "exist, deploy the stack (it writes the parameter)",
                deployed.parameter,
            )
        ]
    deployed_name = f"{deployed.version or '?'} ({short(deployed.sha256)})"
    if facts.pair is None:
        return [
            Finding(
                "gateway-software",
                OK,
                f"deployed gateway software {deployed_name}; a single gateway does not report "
                "which it runs (its InstallGatewaySoftware association installs it)",
                None,
                deployed.parameter,
            )
        ]
    now = ctx.runtime.now()
    association = f"{ctx.deployment}-InstallGatewaySoftware"
    fix = (
        f"run the {association} association again (it installs the deployed package, one "
        "gateway at a time, and restarts the pair agent): aws ssm start-associations-once "
        "--association-ids $(aws ssm list-associations --association-filter-list "
        f"key=AssociationName,value={association} --query 'Associations[0].AssociationId' "
        "--output text)"
    )
    found = []
    for g in gateway_software(facts.gateways, facts.pair):
        gid = g.instance_id
        age = None if g.reported_at is None else now - g.reported_at
        if age is None or age > READINESS_STALE_SECONDS:
            # A standby's silent agent is check_pair's finding; the active's is said here.
            if gid == facts.pair.active:
                found.append(
                    Finding(
                        "gateway-software",
                        UNKNOWN,
                        f"active {gid}: its pair agent has not reported: which gateway software "
                        "it runs is unknown",
                        f"on {gid}: systemctl status tunnelnat-pair",
                        gid,
                    )
                )
            continue
        if not g.reported:
            found.append(
                Finding(
                    "gateway-software-old",
                    FAIL,
                    f"{gid} runs gateway software older than the package (its pair agent "
                    f"reports no version); deployed: {deployed_name}",
                    fix,
                    gid,
                )
            )
        elif g.sha256 is None:
            found.append(
                Finding(
                    "gateway-software",
                    UNKNOWN,
                    f"{gid} runs the gateway software from a source tree ({g.version}), not an "
                    "installed package",
                    fix,
                    gid,
                )
            )
        elif g.deployed(deployed):
            found.append(
                Finding(
                    "gateway-software",
                    OK,
                    f"{gid} runs the deployed gateway software {deployed_name}",
                    None,
                    gid,
                )
            )
        else:
            found.append(
                Finding(
                    "gateway-software-old",
                    FAIL,
                    f"{gid} runs gateway software {g.version or '?'} ({short(g.sha256)}), not "
                    f"the deployed {deployed_name}",
                    fix,
                    gid,
                )
            )
    return found


def primary_interface(gw: Instance) -> dict[str, Any] | None:
    """The gateway's primary ENI (device index 0) as DescribeInstances lists it."""
    for interface in gw.raw.get("NetworkInterfaces", []):
        attachment = interface.get("Attachment") or {}
        if attachment.get("DeviceIndex") == 0 and attachment.get("NetworkCardIndex", 0) == 0:
            return interface
    return None


def check_source_dest(ctx: Ctx, facts: Facts) -> list[Finding]:
    """The check of the gateway's primary ENI, which forwards the instances' packets. The fix
    names that ENI: with G's ENI attached, EC2 refuses the instance's attribute ("There are
    multiple interfaces attached to instance", aws/aws-cdk#13791)."""
    gw = facts.gateway
    if gw is None:
        return []
    primary = primary_interface(gw)
    enabled = primary.get("SourceDestCheck") if primary else None
    if enabled is None:
        enabled = gw.source_dest_check
    if enabled is None:
        reply = ctx.aws.client("ec2").describe_instance_attribute(
            InstanceId=gw.instance_id, Attribute="sourceDestCheck"
        )
        enabled = bool(reply.get("SourceDestCheck", {}).get("Value", True))
    if enabled:
        eni = primary.get("NetworkInterfaceId") if primary else None
        fix = (
            f"aws ec2 modify-network-interface-attribute --network-interface-id {eni} "
            "--no-source-dest-check (the boot does this at every boot: "
            "journalctl -u tunnelnat-boot)"
            if eni
            else f"aws ec2 modify-instance-attribute --instance-id {gw.instance_id} "
            "--no-source-dest-check"
        )
        where = f"its primary ENI {eni}" if eni else "it"
        return [
            Finding(
                "source-dest-check",
                FAIL,
                f"source/destination check is ON on gateway {gw.instance_id} ({where}): EC2 "
                "drops the packets it forwards",
                fix,
                gw.instance_id,
            )
        ]
    return [Finding("source-dest-check", OK, "off on the gateway", None, gw.instance_id)]


def check_eni(ctx: Ctx, facts: Facts) -> list[Finding]:
    gw = facts.gateway
    g = facts.config.gateway_ip
    if g is None:
        return [
            Finding(
                "fixed-eni",
                UNKNOWN,
                "the gateway's fixed address G is unknown (configuration not readable)",
                "pass --gateway-ip G (or --function-name of the controller Lambda)",
            )
        ]
    if gw is None:
        return [Finding("fixed-eni", UNKNOWN, f"no gateway to hold G={g}")]
    filters = [{"Name": "addresses.private-ip-address", "Values": [str(g)]}]
    vpc = gw.raw.get("VpcId")
    if vpc:
        filters.append({"Name": "vpc-id", "Values": [vpc]})
    enis = ctx.aws.client("ec2").describe_network_interfaces(Filters=filters)["NetworkInterfaces"]
    if not enis:
        return [
            Finding(
                "fixed-eni",
                FAIL,
                f"no network interface holds G={g}{' in ' + vpc if vpc else ''}: instances' "
                "routes via G lead nowhere",
                f"aws ec2 create-network-interface --subnet-id {gw.subnet_id} "
                f"--private-ip-address {g} --description 'tunnelnat fixed ENI', then "
                "aws ec2 attach-network-interface --network-interface-id <eni> "
                f"--instance-id {gw.instance_id} --device-index 1",
                gw.instance_id,
            )
        ]
    eni = enis[0]
    eni_id = eni["NetworkInterfaceId"]
    attachment = eni.get("Attachment") or {}
    holder = attachment.get("InstanceId")
    if holder != gw.instance_id:
        where = f"attached to {holder}" if holder else "not attached"
        detach = (
            f"aws ec2 detach-network-interface --attachment-id {attachment.get('AttachmentId')}; "
            if holder
            else ""
        )
        return [
            Finding(
                "fixed-eni",
                FAIL,
                f"{eni_id} (G={g}) is {where}, not to gateway {gw.instance_id}",
                f"{detach}aws ec2 attach-network-interface --network-interface-id {eni_id} "
                f"--instance-id {gw.instance_id} --device-index 1",
                eni_id,
            )
        ]
    found = []
    if int(attachment.get("DeviceIndex", 1)) == 0:
        found.append(
            Finding(
                "fixed-eni",
                FAIL,
                f"G={g} is the gateway's primary interface {eni_id}: it is lost when the "
                "gateway is replaced",
                "put G on a dedicated ENI that the replacement gateway re-attaches at boot "
                "(see docs/operations.md, replace the gateway)",
                eni_id,
            )
        )
    # On the primary interface the instance's own attribute is the same switch (checked above).
    if eni.get("SourceDestCheck", True) and int(attachment.get("DeviceIndex", 1)) != 0:
        found.append(
            Finding(
                "fixed-eni",
                FAIL,
                f"source/destination check is ON on {eni_id} (G={g}): forwarded packets are "
                "dropped",
                f"aws ec2 modify-network-interface-attribute --network-interface-id {eni_id} "
                "--no-source-dest-check",
                eni_id,
            )
        )
    return found or [
        Finding("fixed-eni", OK, f"{eni_id} holds G={g} on {gw.instance_id}", None, eni_id)
    ]


def check_ssm(ctx: Ctx, facts: Facts) -> list[Finding]:
    targets: dict[str, str] = {}
    if facts.gateway is not None:
        targets[facts.gateway.instance_id] = "gateway"
    for standby in facts.pair.standbys if facts.pair else []:
        # SyncNatTable and ConfigureTunnel reach the standby through its agent too.
        targets[standby.instance_id] = "standby gateway"
    for instance_id, record in facts.snapshot.records.items():
        if record.status in ("enrolled", "pending-ssm") or instance_id in facts.snapshot.mappings:
            targets.setdefault(instance_id, "instance")
    for instance_id in facts.snapshot.mappings:
        targets.setdefault(instance_id, "instance")
    if not targets:
        return []
    try:
        pings = ssm_ping_status(ctx.aws.client("ssm"), sorted(targets))
    except (ClientError, BotoCoreError) as exc:
        reason = error_code(exc) if isinstance(exc, ClientError) else type(exc).__name__
        return [
            Finding(
                "ssm-agent",
                UNKNOWN,
                f"cannot tell whether SSM agents are online: DescribeInstanceInformation "
                f"failed ({reason or 'error'})",
                "allow ssm:DescribeInstanceInformation to the caller (moto does not implement it)",
            )
        ]
    found = []
    for instance_id in sorted(targets):
        role = targets[instance_id]
        ping = pings.get(instance_id)
        if ping == "Online":
            continue
        what = "not registered with SSM" if ping is None else f"SSM agent {ping}"
        found.append(
            Finding(
                "ssm-agent",
                FAIL,
                f"{role} {instance_id}: {what}; the controller cannot run commands on it",
                "check the instance profile has AmazonSSMManagedInstanceCore, the agent runs "
                "(systemctl status amazon-ssm-agent) and it reaches the ssm/ssmmessages "
                "endpoints (VPC endpoints or NAT)",
                instance_id,
            )
        )
    return found or [Finding("ssm-agent", OK, f"online on all {len(targets)} instance(s)")]


def ssm_ping_status(ssm: Any, instance_ids: list[str]) -> dict[str, str]:
    pings: dict[str, str] = {}
    for start in range(0, len(instance_ids), SSM_IDS_MAX):
        chunk = instance_ids[start : start + SSM_IDS_MAX]
        paginator = ssm.get_paginator("describe_instance_information")
        for page in paginator.paginate(Filters=[{"Key": "InstanceIds", "Values": chunk}]):
            for info in page.get("InstanceInformationList", []):
                pings[info["InstanceId"]] = info.get("PingStatus", "Unknown")
    return pings


def check_tunnels(ctx: Ctx, facts: Facts) -> list[Finding]:
    gw = facts.gateway
    if gw is None:
        return []
    states = tunnel_states(
        ctx.aws.client("cloudwatch"),
        gateway_ids={gw.instance_id},
        deployment=ctx.deployment,
        now=ctx.runtime.now(),
    )
    if not states:
        return [
            Finding(
                "tunnel",
                UNKNOWN,
                f"no TunnelUp metric from gateway {gw.instance_id}: its health agent publishes "
                "nothing",
                "check the health agent on the gateway (it publishes TunnelUp every minute)",
                gw.instance_id,
            )
        ]
    found = []
    causes: dict[str, str] | None = None
    for s in states:
        if s.state != "up" and causes is None:
            causes = tunnel_causes(ctx, gw.instance_id)
        why = (causes or {}).get(s.tunnel) or (causes or {}).get("")
        cause = f" — {why}" if why else ""
        if s.state == "up":
            found.append(Finding("tunnel", OK, f"{s.tunnel} up", None, s.tunnel))
            continue
        established = latest_established(
            ctx.aws.client("cloudwatch"),
            ctx.deployment,
            s.tunnel,
            now=ctx.runtime.now(),
            lookback=ESTABLISHED_LOOKBACK,
        )
        if established is False:
            # Never up since the gateway was configured: the healer waits, a restart cannot help.
            found.append(
                Finding(
                    "tunnel",
                    FAIL,
                    f"tunnel {s.tunnel} on {gw.instance_id}: waiting for the partner (not up "
                    "since the gateway was configured): is the PSK set? is the partner up?"
                    f"{cause}",
                    "put the key agreed with the partner into the PskSecretName secret (aws "
                    "secretsmanager put-secret-value --secret-id <PskSecretName output>) and ask "
                    "the partner to bring their side up; the healer restarts a tunnel only once "
                    "it has been up (docs/health.md)",
                    s.tunnel,
                )
            )
            continue
        what = "down" if s.state == "down" else "no datapoint in the last 5 minutes"
        found.append(
            Finding(
                "tunnel",
                FAIL,
                f"tunnel {s.tunnel} on {gw.instance_id}: {what}{cause}",
                f"aws ssm send-command --instance-ids {gw.instance_id} --document-name "
                f"{ctx.deployment}-RestartTunnel --parameters TunnelName={s.tunnel}; if it stays "
                "down, "
                "check the partner endpoint and the PSK (docs/operations.md)",
                s.tunnel,
            )
        )
    return found


def check_partners(ctx: Ctx, facts: Facts) -> list[Finding]:
    """Several partners (issue 23): one finding per partner, from its own lane only (its table,
    its generation, its tunnel's TunnelUp), so one partner's problem is never another's. A
    deployment without a partners file has no lanes and no finding, but for instances still
    marked enrolled with a partner it once declared (``retired_partners``)."""
    lanes = read_lanes(ctx.aws.client("ssm"), ctx.deployment)
    if lanes.problem:
        return [
            Finding(
                "partners",
                UNKNOWN,
                f"could not read the partners under {lanes.path}: {lanes.problem}",
                f"allow ssm:GetParametersByPath on {lanes.path} to the caller, or redeploy",
            )
        ]
    found = retired_partners(ctx, facts.tag_key, {lane.name for lane in lanes.lanes})
    if not lanes.lanes:
        return found
    gw = facts.gateway
    states = tunnel_states(
        ctx.aws.client("cloudwatch"),
        gateway_ids={gw.instance_id} if gw else set(),
        deployment=ctx.deployment,
        now=ctx.runtime.now(),
    )
    for lane in lanes.lanes:
        fails: list[tuple[str, str]] = []  # (what, fix)
        snap, problem = table_snapshot(ctx.aws.client("dynamodb"), lane)
        if problem:
            fails.append(
                (
                    f"its table cannot be read ({problem})",
                    f"redeploy the stack: it creates {lane.table} for partner {lane.name}",
                )
            )
        elif snap is not None and snap.applied_generation < snap.desired_generation:
            fails.append(
                (
                    f"the gateway is behind on its table {lane.table}: applied generation "
                    f"{snap.applied_generation}, desired {snap.desired_generation}",
                    "tunnelnat reconcile --wait; if it stays behind, check the SSM agent on the "
                    "gateway and the DLQ",
                )
            )
        tunnel = tunnel_of(lane, states)
        enrolled = sum(1 for r in snap.records.values() if r.status == "enrolled") if snap else None
        what = (
            f"partner {lane.name} (tunnel {lane.name}, IKEv{lane.ike_version}, "
            f"{_lane_networks(lane)}, S {','.join(map(str, lane.public_addresses))})"
        )
        if fails:
            found.append(
                Finding(
                    "partner",
                    FAIL,
                    f"{what}: " + "; ".join(f for f, _ in fails),
                    "; ".join(fix for _, fix in fails),
                    lane.name,
                )
            )
        elif tunnel is None:
            found.append(
                Finding(
                    "partner",
                    UNKNOWN,
                    f"{what}: no TunnelUp for its tunnel",
                    f"name {lane.name} in the health agent's TunnelName list (InstallHealthAgent)",
                    lane.name,
                )
            )
        else:
            tail = "" if enrolled is None else f"; {enrolled} enrolled"
            found.append(
                Finding("partner", OK, f"{what}: tunnel {tunnel.state}{tail}", None, lane.name)
            )
    return found


def retired_partners(ctx: Ctx, tag_key: str, declared: set[str]) -> list[Finding]:
    """Instances still marked enrolled with a partner the deployment no longer declares (taken
    out of the partners file): no lane reconciles them, so their host routes for it stay and
    send to G, which drops that traffic (``dropped_unclassified``). One finding per partner."""
    prefix = partner_status_prefix(ctx.deployment)
    by_partner: dict[str, list[str]] = {}
    # DescribeInstances, a permission the CLI already needs (not DescribeTags); filter values take
    # wildcards, "*" for any characters (EC2 API Reference, Filter).
    paginator = ctx.aws.client("ec2").get_paginator("describe_instances")
    filters = [{"Name": "tag-key", "Values": [f"{prefix}*"]}]
    for page in paginator.paginate(Filters=filters):
        for reservation in page.get("Reservations", []):
            for instance in reservation.get("Instances", []):
                if instance.get("State", {}).get("Name") == "terminated":
                    continue
                for tag in instance.get("Tags", []):
                    key = str(tag.get("Key", ""))
                    name = key[len(prefix) :]
                    if key.startswith(prefix) and name and name not in declared:
                        by_partner.setdefault(name, []).append(str(instance["InstanceId"]))
    return [
        Finding(
            "partner-retired",
            FAIL,
            f"partner {name} is no longer declared, but {len(ids)} instance(s) still carry its "
            f"status tag and host routes: {', '.join(sorted(ids))}; the gateway drops that "
            "traffic",
            f"on each: remove the tag {tag_key}:partner:{name} if it is still "
            f"there, run {ctx.deployment}-RemoveHostRoute with Deployment={ctx.deployment}."
            f"{name}, Gateway=G and Destinations=the networks its instances used for {name}, "
            f"then delete the tag {prefix}{name}",
            name,
        )
        for name, ids in sorted(by_partner.items())
    ]


def _lane_networks(lane: object) -> str:
    aliases, networks = lane.aliases, lane.networks  # type: ignore[attr-defined]
    if aliases:
        pairs = zip(aliases, networks, strict=True)
        return "instances address " + " ".join(f"{a} (alias of {n})" for a, n in pairs)
    return "networks " + " ".join(map(str, networks))


def tunnel_causes(ctx: Ctx, gateway_id: str) -> dict[str, str]:
    """Why each tunnel is down, in one line: the health agent's diagnosis of charon's log, read
    on the gateway by ShowTunnels (as ``tunnelnat tunnels``). ``""`` maps every tunnel when the
    gateway could not be asked."""
    try:
        doc, _ = show_tunnels(ctx, gateway_id, None, timeout=SHOW_TUNNELS_TIMEOUT)
    except CliError as exc:
        return {"": f"could not ask the gateway: {exc.message}"}
    return {
        t["tunnel"]: t.get("diagnosis") or "charon's log shows no failure since its last success"
        for t in doc["tunnels"]
        if isinstance(t.get("tunnel"), str)
    }


def check_generation(ctx: Ctx, facts: Facts) -> list[Finding]:
    snap = facts.snapshot
    desired, applied = snap.desired_generation, snap.applied_generation
    gw = facts.gateway
    if desired == 0:
        return [Finding("generation", OK, "no mapping written yet (generation 0)")]
    if gw is not None and snap.applied_by not in (None, gw.instance_id):
        return [
            Finding(
                "generation",
                FAIL,
                f"gateway {gw.instance_id} has not reported a sync; generation {applied} was "
                f"applied by {snap.applied_by}",
                "tunnelnat reconcile   (a full reconcile syncs the new gateway)",
            )
        ]
    if applied < desired:
        return [
            Finding(
                "generation",
                FAIL,
                f"gateway is behind: applied generation {applied}, desired {desired}",
                "tunnelnat reconcile --wait; if it stays behind, check the SSM agent on the "
                "gateway and the DLQ",
            )
        ]
    return [Finding("generation", OK, f"applied {applied} = desired {desired}")]


def check_rejected(ctx: Ctx, facts: Facts) -> list[Finding]:
    """The rows the gateway left out of the NAT table at its last sync (it applies every valid
    one and lists the others), from that SyncNatTable command's own output, when SSM still has
    it (Run Command keeps 30 days of history)."""
    gw = facts.gateway
    if gw is None:
        return []
    ssm = ctx.aws.client("ssm")
    document = f"{ctx.deployment}-SyncNatTable"
    try:
        reply = ssm.list_commands(
            InstanceId=gw.instance_id,
            Filters=[{"key": "DocumentName", "value": document}],
            MaxResults=10,
        )
        commands = [c for c in reply.get("Commands", []) if c.get("DocumentName") == document]
        done = [c for c in commands if c.get("Status") in ("Success", "Failed")]
        if not done:
            return []
        newest = max(done, key=lambda c: c.get("RequestedDateTime") or 0)
        invocation = ssm.get_command_invocation(
            CommandId=newest["CommandId"], InstanceId=gw.instance_id
        )
    except (ClientError, BotoCoreError) as exc:
        reason = error_code(exc) if isinstance(exc, ClientError) else type(exc).__name__
        return [
            Finding(
                "rejected-rows",
                UNKNOWN,
                f"cannot read the gateway's last SyncNatTable output ({reason or 'error'})",
                "allow ssm:ListCommands and ssm:GetCommandInvocation to the caller",
            )
        ]
    report = _last_json(invocation.get("StandardOutputContent") or "")
    rows = report.get("rejected")
    if not isinstance(rows, list) or not rows:
        return [Finding("rejected-rows", OK, "the gateway's last sync applied every mapping")]
    count = report.get("rejected_count") if isinstance(report.get("rejected_count"), int) else 0
    shown = "; ".join(
        f"{r.get('private_ip')} -> {r.get('public_ip')}: {r.get('reason')}"
        for r in rows[:REJECTED_SHOWN]
        if isinstance(r, dict)
    )
    return [
        Finding(
            "rejected-rows",
            FAIL,
            f"gateway {gw.instance_id} left {max(count, len(rows))} mapping row(s) out of its "
            f"NAT table at its last sync (command {newest['CommandId']}): {shown}",
            "each instance named is skipped until the rows agree: see its status "
            "(`tunnelnat status`), settle the conflict, then `tunnelnat reconcile`",
            gw.instance_id,
        )
    ]


def _last_json(text: str) -> dict[str, Any]:
    for line in reversed(text.strip().splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return {}


def check_dlq(ctx: Ctx, facts: Facts) -> list[Finding]:
    name = f"{ctx.deployment}-events-dlq"
    sqs = ctx.aws.client("sqs")
    try:
        url = ctx.args.dlq_url or sqs.get_queue_url(QueueName=name)["QueueUrl"]
        name = url.rstrip("/").rsplit("/", 1)[-1]
    except ClientError as exc:
        if error_code(exc) not in ("AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"):
            raise
        return [
            Finding(
                "dlq",
                FAIL,
                f"dead-letter queue {name} not found: failed events would be lost",
                "check --deployment or pass --dlq-url; deploy the stack (it creates the queue "
                "and its DLQ)",
            )
        ]
    attrs = sqs.get_queue_attributes(
        QueueUrl=url,
        AttributeNames=[
            "QueueArn",
            "ApproximateNumberOfMessages",
            "ApproximateNumberOfMessagesNotVisible",
        ],
    )["Attributes"]
    opt = f" --dlq-url {url}" if ctx.args.dlq_url else ""
    count = int(attrs.get("ApproximateNumberOfMessages", 0)) + int(
        attrs.get("ApproximateNumberOfMessagesNotVisible", 0)
    )
    if count:
        return [
            Finding(
                "dlq",
                FAIL,
                f"{count} message(s) in {name}: events the controller gave up on",
                f"see them with `tunnelnat dlq{opt}` (instances and reasons), fix the cause, "
                f"then `tunnelnat dlq --redrive{opt}` (reconciles their instances; DLQ "
                f"{attrs.get('QueueArn')})",
                name,
            )
        ]
    return [Finding("dlq", OK, f"{name} is empty", None, name)]


def alarm_prefixes(deployment: str) -> tuple[str, ...]:
    """The stack names alarms ``tunnelnat-<deployment>-...``; ``<deployment>-...`` also counts."""
    return (f"tunnelnat-{deployment}-", f"{deployment}-")


def check_alarms(ctx: Ctx, facts: Facts) -> list[Finding]:
    cloudwatch = ctx.aws.client("cloudwatch")
    alarms: dict[str, dict] = {}
    for prefix in alarm_prefixes(ctx.deployment):
        for page in cloudwatch.get_paginator("describe_alarms").paginate(
            AlarmNamePrefix=prefix, AlarmTypes=["MetricAlarm", "CompositeAlarm"]
        ):
            for alarm in page.get("MetricAlarms", []) + page.get("CompositeAlarms", []):
                alarms[alarm["AlarmName"]] = alarm
    if not alarms:
        return [
            Finding(
                "alarms",
                UNKNOWN,
                "no CloudWatch alarm named "
                + " or ".join(f"{p}*" for p in alarm_prefixes(ctx.deployment)),
                "deploy the stack's alarms (DLQ, tunnel health)",
            )
        ]
    found = []
    for alarm in sorted(alarms.values(), key=lambda a: a["AlarmName"]):
        name, state = alarm["AlarmName"], alarm.get("StateValue", "?")
        if state == "OK":
            continue
        reason = " ".join(str(alarm.get("StateReason", "")).split())[:200]
        if state == "INSUFFICIENT_DATA":
            fix = "its metric is not being published: check the component that emits it"
        elif "dlq" in name.lower() or "deadletter" in name.lower():
            fix = "see the dlq finding: read, fix, redrive"
        elif "queueage" in name.lower():
            fix = "the controller is not keeping up or not running: check its logs and errors"
        elif "tunnel" in name.lower():
            fix = "see the tunnel finding; the healer restarts the tunnel, RestartTunnel by hand"
        else:
            fix = f"aws cloudwatch describe-alarm-history --alarm-name {name}"
        found.append(Finding("alarms", FAIL, f"alarm {name} is {state}: {reason}", fix, name))
    return found or [Finding("alarms", OK, f"all {len(alarms)} alarm(s) OK")]


def check_instances(ctx: Ctx, facts: Facts) -> list[Finding]:
    snap = facts.snapshot
    ec2 = ctx.aws.client("ec2")
    tagged = {i.instance_id: i for i in tagged_instances(ec2, facts.tag_key, facts.tag_value)}
    ids = sorted(set(tagged) | set(snap.records) | set(snap.mappings))
    known = instances_by_id(ec2, ids) if ids else {}
    subnet = _gateway_subnet(ctx, facts)
    now = ctx.runtime.now() if ctx.runtime else time.time()
    found: list[Finding] = []
    for instance_id in ids:
        inst = known.get(instance_id)
        record = snap.records.get(instance_id)
        mapping = snap.mappings.get(instance_id)
        if record is not None and record.status in ISOLATION_STATUSES:
            found.append(
                Finding(
                    record.status,
                    FAIL,
                    f"{instance_id}: {record.status}: {record.reason}",
                    fix_for(record.status, instance_id),
                    instance_id,
                )
            )
            continue
        private = (mapping.private_ip if mapping else None) or (inst.private_ip if inst else None)
        outside = (
            subnet is not None
            and private is not None
            and _ip(private) is not None
            and _ip(private) not in subnet
        )
        if outside and (mapping is not None or instance_id in tagged):
            state = "enrolled" if mapping is not None else "tagged"
            found.append(
                Finding(
                    "unsupported-subnet",
                    FAIL,
                    f"{instance_id} is {state} but {private} is outside the gateway's subnet "
                    f"{subnet}: a host route via G cannot work there",
                    "launch it in the gateway's subnet (or enable route-table mode), or "
                    f"tunnelnat unenroll {instance_id}",
                    instance_id,
                )
            )
            continue
        if (
            record is not None
            and record.status not in ("not-running",)
            and (
                is_failure(record.status)
                or (
                    record.status == "pending-ssm"
                    and now - (record.updated_at or now) > PENDING_SSM_GRACE
                )
            )
        ):
            found.append(
                Finding(
                    "instance",
                    FAIL,
                    f"{instance_id}: {record.status}: {record.reason}",
                    fix_for(record.status, instance_id),
                    instance_id,
                )
            )
        elif mapping is not None and (inst is None or instance_id not in tagged):
            why = "no longer exists" if inst is None else f"is not tagged {facts.tag_key}"
            found.append(
                Finding(
                    "instance",
                    FAIL,
                    f"{instance_id} {why} but still has a mapping ({mapping.public_ip})",
                    f"tunnelnat reconcile {instance_id}",
                    instance_id,
                )
            )
        elif inst is not None and instance_id in tagged and inst.state == "running":
            if record is None:
                found.append(
                    Finding(
                        "instance",
                        FAIL,
                        f"{instance_id} is tagged {facts.tag_key}={facts.tag_value} but the "
                        "controller has not recorded it",
                        f"tunnelnat reconcile {instance_id}; if it persists, check the "
                        "EventBridge rules, the queue and the DLQ",
                        instance_id,
                    )
                )
            elif record.status == "enrolled" and mapping is None:
                found.append(
                    Finding(
                        "instance",
                        FAIL,
                        f"{instance_id} is recorded enrolled but has no mapping",
                        f"tunnelnat reconcile {instance_id}",
                        instance_id,
                    )
                )
    enrolled = sum(1 for r in snap.records.values() if r.status == "enrolled")
    return found or [
        Finding("instances", OK, f"{enrolled} enrolled; no instance stuck or misplaced")
    ]


def _gateway_subnet(ctx: Ctx, facts: Facts) -> IPv4Network | None:
    if facts.config.config is not None:
        return facts.config.config.gateway_subnet_cidr
    gw = facts.gateway
    if gw is None or not gw.subnet_id:
        return None
    subnets = ctx.aws.client("ec2").describe_subnets(SubnetIds=[gw.subnet_id])["Subnets"]
    return IPv4Network(subnets[0]["CidrBlock"]) if subnets else None


def _ip(text: str) -> IPv4Address | None:
    try:
        value = ip_address(text)
    except ValueError:
        return None
    return value if isinstance(value, IPv4Address) else None
