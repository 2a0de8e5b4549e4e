"""Issue 22's upgrade story: new gateway software on a running pair, under traffic.

As a deploy with one line of gateway code changed does it on AWS:
1. the stack builds a new archive (a new SHA-256): the lab builds it with tools/gateway_package.py
   from a copy of the sources with that line changed, puts it in its asset bucket and points
   ``/tunnelnat/<deployment>/gateway-software`` at it; the documents are bound to it from then on;
2. the InstallGatewaySoftware association's parameters change, so State Manager runs it again on
   every gateway, one at a time (MaxConcurrency 1): the lab plays State Manager, the standby first,
   then the active (the lab waits for each gateway's agent to be back before the next: the
   association itself only waits for the command to end);
3. the document installs the archive (content-addressed, the units' symbolic link swapped in one
   rename) and asks systemd to try-restart the pair agent. The lab has no systemd: the document
   says so ("no systemd") and the lab plays the try-restart (a running agent stopped and started
   from the unit's ExecStart, now the new archive).

Printed: the datagrams lost (and as seconds) while both gateways were upgraded, the clear-text
packets on the Internet link (0 required), and the version each gateway runs afterwards as its
pair agent reports it in DynamoDB (its readiness item's ``software``) and as ``version`` says.
docs/parity.md lists where this differs from AWS.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lab import topology as topo
from lab.cli import status_json
from lab.failover_story import _plain
from lab.pair_stories import (
    _wait,
    failovers,
    machines,
    ready_standby,
    role_of,
    switchovers,
    traffic,
)
from tools.gateway_package import CORE_MODULES

# The line the story changes (gateway/tunnelnat_gateway/software.py): it only names what a
# source tree reports as its version, so the new archive behaves as the old one; any change to
# the package's sources gives a new version and a new SHA-256.
CHANGED_FILE = "software.py"
CHANGED_LINE = 'SOURCE_VERSION = "source"'
READY_SECONDS = 30.0  # a restarted agent back (its role file, its readiness item), at most


def changed_sources(into: Path, stamp: str) -> Path:
    """A copy of what tools.gateway_package.build reads (the package, the core modules it
    ships, pyproject.toml) under ``into``, with one line of gateway code changed. Its root."""
    package = topo.REPO / "gateway" / "tunnelnat_gateway"
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(package, into / "gateway" / "tunnelnat_gateway", ignore=ignore)
    for name in CORE_MODULES:
        target = into / "lambdas" / "tunnelnat" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(topo.REPO / "lambdas" / "tunnelnat" / name, target)
    shutil.copyfile(topo.REPO / "pyproject.toml", into / "pyproject.toml")
    path = into / "gateway" / "tunnelnat_gateway" / CHANGED_FILE
    text = path.read_text()
    if text.count(CHANGED_LINE) == 1:
        path.write_text(text.replace(CHANGED_LINE, f'SOURCE_VERSION = "source ({stamp})"'))
    else:  # the line moved on: one line added instead, as harmless
        path.write_text(text.rstrip("\n") + f'\n\nLAB_UPGRADE = "{stamp}"\n')
    return into


@dataclass
class GatewayUpgrade:
    ns: str
    instance_id: str
    role: str  # before the upgrade
    status: str  # the document's
    result: dict[str, Any]  # its JSON line
    restarted_by: str  # "the document" (systemd) or "the lab (systemd's try-restart)" or ""
    seconds: float  # the document's run
    back_after: float | None  # the agent's restart -> its role file and readiness item again
    stderr: str = ""


@dataclass
class UpgradeReport:
    sha256_before: str
    version_before: str
    sha256_after: str
    version_after: str
    upgrades: list[GatewayUpgrade]
    sent: int
    lost: int
    loss_seconds: float
    widest_gap_at_a: float
    clear: list[str]
    installed: dict[str, dict[str, Any]]  # machine -> `tunnelnat-gateway version`
    reported: dict[str, dict[str, Any]]  # instance -> its readiness item's software
    status_software: dict[str, Any]  # `tunnelnat status`'s software, per gateway (H5)
    roles_after: dict[str, str]
    failovers_before: int
    failovers_after: int
    switchovers_before: int
    switchovers_after: int
    errors: list[str] = field(default_factory=list)

    @property
    def both_upgraded(self) -> bool:
        return len(self.upgrades) == 2 and all(
            u.status == "Success" and u.result.get("sha256") == self.sha256_after
            for u in self.upgrades
        )

    @property
    def ok(self) -> bool:
        return (
            not self.errors
            and self.sha256_after != self.sha256_before
            and self.both_upgraded
            and all(v.get("sha256") == self.sha256_after for v in self.installed.values())
            and all(v.get("sha256") == self.sha256_after for v in self.reported.values())
            and len(self.reported) == 2
            and all(
                isinstance(v, dict) and v.get("version") == self.version_after and v.get("deployed")
                for v in self.status_software.values()
            )
            and not self.clear
            and self.failovers_after == self.failovers_before
            and sorted(self.roles_after.values()) == ["active", "standby"]
        )

    def figure(self) -> str:
        order = " then ".join(
            f"{u.ns} ({u.role}: {u.result.get('pair_agent', u.status)}"
            + (f", restarted by {u.restarted_by}" if u.restarted_by else "")
            + (f", back in {u.back_after:.1f}s" if u.back_after is not None else "")
            + ")"
            for u in self.upgrades
        )
        reported = ", ".join(
            f"{i}: {v.get('version')}" + ("" if v.get("deployed") in (True, None) else " (OLD)")
            for i, v in sorted(self.reported.items())
        )
        return (
            f"gateway software {self.version_before} -> {self.version_after} (sha256 "
            f"{self.sha256_before[:12]} -> {self.sha256_after[:12]}), InstallGatewaySoftware one "
            f"gateway at a time: {order}; {self.sent} datagrams sent, {self.lost} lost = "
            f"{self.loss_seconds:.2f}s of loss, widest gap at A {self.widest_gap_at_a:.2f}s; "
            f"{len(self.clear)} clear-text packets; failovers {self.failovers_before} -> "
            f"{self.failovers_after}; the pair agents report {reported or 'nothing'}"
            + (
                "; `tunnelnat status`: "
                + ", ".join(
                    f"{i} {v.get('version')}"
                    + (" (the deployed one)" if v.get("deployed") else " (NOT the deployed one)")
                    for i, v in sorted(self.status_software.items())
                    if isinstance(v, dict)
                )
                if self.status_software
                else ""
            )
            + (f"; problems: {'; '.join(self.errors)}" if self.errors else "")
        )


def installed_version(ns: str) -> dict[str, Any]:
    """What the units run on machine ``ns``: ``tunnelnat-gateway.pyz version``'s JSON."""
    out = topo.in_ns(ns, ["python3", "/etc/tunnelnat/lib/tunnelnat-gateway.pyz", "version"])
    try:
        return json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"error": out.strip()[-200:]}


def readiness_software(lab: topo.Lab, instance_id: str) -> dict[str, Any]:
    """The ``software`` of the pair agent's readiness item (pk gateway, sk its instance)."""
    reply = lab.aws.client("dynamodb").get_item(
        TableName=topo.TABLE,
        Key={"pk": {"S": "gateway"}, "sk": {"S": instance_id}},
        ConsistentRead=True,
    )
    item = _plain(reply.get("Item") or {})
    return dict(item.get("software") or {})


def status_software(lab: topo.Lab) -> dict[str, Any]:
    """Each gateway's software as ``tunnelnat status`` shows it: instance -> {"version",
    "sha256", "deployed"} (``deployed``: the one the parameter names)."""
    try:
        software = status_json(lab).get("software") or {}
    except (topo.LabError, ValueError, KeyError) as exc:
        return {"error": str(exc)}
    return {
        g["instance_id"]: {k: g.get(k) for k in ("version", "sha256", "deployed")}
        for g in software.get("gateways") or []
        if g.get("instance_id")
    }


def run_install(lab: topo.Lab, instance_id: str) -> tuple[Any, dict[str, Any], float]:
    """InstallGatewaySoftware on one gateway with the association's parameters."""
    software = lab.software
    params = {
        "Sha256": software.sha256,
        "Bucket": software.bucket,
        "Key": software.key,
        "Region": software.region,
    }
    started = time.monotonic()
    result = lab.commands.run(instance_id, "InstallGatewaySoftware", params)
    seconds = time.monotonic() - started
    try:
        line = json.loads(result.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        line = {}
    return result, line, seconds


def upgrade_one(lab: topo.Lab, ns: str, instance_id: str, errors: list[str]) -> GatewayUpgrade:
    role = role_of(ns)
    result, line, seconds = run_install(lab, instance_id)
    if not result.ok:
        errors.append(f"InstallGatewaySoftware on {ns}: {result.status}: {result.stderr[-400:]}")
    restarted_by, back_after = "", None
    said = line.get("pair_agent")
    if said == "restarted":
        restarted_by = "the document"
    elif said == "no systemd" and line.get("changed"):
        # systemd's try-restart, played: the running agent stopped, started from its unit.
        if lab.restart_pair_agent(ns):
            restarted_by = "the lab (systemd's try-restart)"
    if restarted_by:
        started = time.monotonic()
        sha = lab.software.sha256
        back = _wait(
            lambda: (
                role_of(ns) in ("active", "standby")
                and readiness_software(lab, instance_id).get("sha256") == sha
                and (role_of(ns) != "standby" or ready_standby(lab, ns))
            ),
            READY_SECONDS,
            0.2,
        )
        back_after = round(time.monotonic() - started, 2) if back else None
        if not back:
            errors.append(f"{ns}'s pair agent not back on the new software in {READY_SECONDS}s")
    return GatewayUpgrade(
        ns=ns,
        instance_id=instance_id,
        role=role,
        status=result.status,
        result=line,
        restarted_by=restarted_by,
        seconds=round(seconds, 2),
        back_after=back_after,
        stderr=result.stderr[-400:] if not result.ok else "",
    )


def run_upgrade(lab: topo.Lab, name: str) -> UpgradeReport:
    """Upgrade both gateways of the pair to a new build while ``name`` sends to A."""
    errors: list[str] = []
    before = lab.software
    active = lab.eni_holder_ns()
    if active is None:
        raise topo.LabError("nobody holds G's ENI before the upgrade")
    standby = next(ns for ns in machines(lab) if ns != active)
    ids = {ns: i for i, ns in lab.gateway_namespaces().items()}
    failovers_before, switchovers_before = failovers(lab), switchovers(lab)
    with tempfile.TemporaryDirectory(prefix="tn-upgrade-") as tmp:
        root = changed_sources(Path(tmp), f"lab upgrade {time.strftime('%H:%M:%S')}")
        after = lab.publish_software(root=root)  # the stack's deploy: asset, parameter, binding
    upgrades: list[GatewayUpgrade] = []
    with traffic(lab, name) as run:
        # State Manager, MaxConcurrency 1: the standby first (no traffic through it), then the
        # active (its agent restarts while it holds G: the datapath is the kernel's meanwhile).
        for ns in (standby, active):
            upgrades.append(upgrade_one(lab, ns, ids[ns], errors))
        time.sleep(1.0)  # datagrams after the last restart
    installed = {ns: installed_version(ns) for ns in (standby, active)}
    reported = {ids[ns]: readiness_software(lab, ids[ns]) for ns in (standby, active)}
    return UpgradeReport(
        sha256_before=before.sha256,
        version_before=before.version,
        sha256_after=after.sha256,
        version_after=after.version,
        upgrades=upgrades,
        sent=run.sent,
        lost=run.lost,
        loss_seconds=run.loss_seconds,
        widest_gap_at_a=run.widest_gap()[0],
        clear=run.clear,
        installed=installed,
        reported=reported,
        status_software=status_software(lab),
        roles_after={ns: role_of(ns) for ns in (standby, active)},
        failovers_before=failovers_before,
        failovers_after=failovers(lab),
        switchovers_before=switchovers_before,
        switchovers_after=switchovers(lab),
        errors=errors,
    )
