"""An impostor labelled like the gateway (issue 21): it gets no command, and doctor names it.

Anyone allowed ``ec2:CreateTags`` can copy tunnelnat's labels (``tunnelnat:gateway``,
``tunnelnat:role=gateway``, ``tunnelnat:deployment``) onto an instance of theirs. Before issue
21 that made it a gateway: the State Manager associations targeted ``tag:tunnelnat:gateway``
(ConfigureGateway, ConfigureTunnel and InstallHealthAgent would have run on it as root every
30 minutes). Now every part knows the gateways by their Auto Scaling group's own tag
(``aws:autoscaling:groupName``, which only Auto Scaling can set).

The step launches such a lookalike in the lab's EC2 (moto), then shows, with the production code:
- the associations' targets as the stack synthesizes them (``stacks.gateway.gateway_targets``)
  resolve, the way State Manager resolves ``tag:<key>`` targets, to the gateway group's members
  only (the old tag target would have taken the lookalike);
- the controller's syncs of an enrolment and an unenrolment go to the gateways only;
- ``tunnelnat doctor`` (the real command against the lab's moto) names it ``gateway-impostor``.
The lookalike is terminated afterwards (the later steps' doctor runs stay clean).
"""

from __future__ import annotations

from typing import Any

from lab import topology as topo
from lab.cli import doctor_json

IMPOSTOR_IP = "10.10.1.240"  # in the gateway's subnet, outside the lab's instance range
LABELS = {
    "tunnelnat:gateway": topo.DEPLOYMENT,
    "tunnelnat:role": "gateway",
    "tunnelnat:deployment": topo.DEPLOYMENT,
}
OLD_TARGET = ("tag:tunnelnat:gateway", topo.DEPLOYMENT)  # b08b1c8's association target


def resolve_targets(ec2: Any, targets: list[tuple[str, list[str]]]) -> list[str]:
    """The running instances State Manager would run an association with these targets on:
    each ``tag:<key>`` target is the instances carrying that tag with one of the values."""
    found: set[str] | None = None
    for key, values in targets:
        if not key.startswith("tag:"):
            raise ValueError(f"the lab resolves tag targets only, not {key!r}")
        reply = ec2.describe_instances(
            Filters=[
                {"Name": key, "Values": values},
                {"Name": "instance-state-name", "Values": ["running"]},
            ]
        )
        ids = {i["InstanceId"] for r in reply["Reservations"] for i in r["Instances"]}
        found = ids if found is None else found & ids
    return sorted(found or ())


def association_targets() -> list[tuple[str, list[str]]]:
    """The gateways' association targets, as stacks/gateway.py synthesizes them."""
    from stacks.gateway import gateway_targets

    return [(t.key, list(t.values)) for t in gateway_targets(f"{topo.DEPLOYMENT}-gateway")]


def run_impostor(lab: topo.Lab, controller: Any, instance: str) -> dict[str, Any]:
    """The story; ``instance`` is enrolled and unenrolled to make the controller sync."""
    aws = lab.aws
    ec2 = aws.client("ec2")
    impostor = aws._run_instance(aws.image_id, IMPOSTOR_IP, "impostor", LABELS)
    gateways = sorted(lab.gateway_namespaces())
    try:
        targets = resolve_targets(ec2, association_targets())
        old_targets = resolve_targets(ec2, [(OLD_TARGET[0], [OLD_TARGET[1]])])
        before = len(lab.commands.history)
        enrolled = controller.tag_changed(instance, enrol=True)
        unenrolled = controller.tag_changed(instance, enrol=False)
        runs = lab.commands.history[before:]
        asked = [a for a in lab.commands.asked if a[0] == impostor]
        code, report = doctor_json(lab)
        named = [
            f
            for f in report["findings"]
            if f["check"] == "gateway-impostor" and impostor in f.get("summary", "")
        ]
    finally:
        ec2.terminate_instances(InstanceIds=[impostor])
    syncs = [r for r in runs if r.document == "SyncNatTable"]
    statuses = [(o.get("outcomes") or [{}])[0].get("status") for o in (enrolled, unenrolled)]
    return {
        "impostor": impostor,
        "gateways": gateways,
        "targets": targets,
        "old_targets": old_targets,
        "syncs": sorted({r.instance_id for r in syncs}),
        "sync_count": len(syncs),
        "statuses": statuses,
        "asked_impostor": asked,
        "doctor_exit": code,
        "doctor_finding": named[0] if named else None,
        "ok": (
            impostor not in targets
            and set(targets) <= set(gateways)
            and impostor in old_targets
            and bool(syncs)
            and {r.instance_id for r in syncs} <= set(gateways)
            and not asked
            and statuses[0] == "enrolled"
            and statuses[1] != "enrolled"
            and bool(named)
            and code != 0
        ),
    }


def figure(result: dict[str, Any]) -> str:
    finding = result["doctor_finding"] or {}
    labels = ", ".join(f"{k}={v}" for k, v in LABELS.items())
    return (
        f"lookalike {result['impostor']} tagged {labels}: "
        f"the gateway associations' targets resolve to {', '.join(result['targets']) or 'nobody'} "
        f"(b08b1c8's tag target took {', '.join(result['old_targets'])}); "
        f"{result['sync_count']} SyncNatTable runs for an enrolment and an unenrolment went to "
        f"{', '.join(result['syncs'])}, none to the lookalike; `tunnelnat doctor` exit "
        f"{result['doctor_exit']}: {finding.get('check', 'NO FINDING')}: "
        f"{finding.get('summary', '')}"
    )
