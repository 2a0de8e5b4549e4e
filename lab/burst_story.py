"""Issue 4's Auto Scaling story in the lab: a burst of launches converges, and what it cost.

    the group launches N instances (lab.autoscaling.launch), each booted as a namespace tn-web-K
      at the address EC2 gave it
    Auto Scaling holds each at its launch hook: N "EC2 Instance-launch Lifecycle Action" events
      go through EventBridge (moto) to the controller's queue
    Lambda's event source hands the queue to the real controller handler in batches of 10
    the controller claims N addresses, asks the gateway to pull the table (SyncNatTable, run in
      tn-gw, pulling from moto) once per batch, runs AddHostRoute in each instance's namespace
      and releases each launch with CompleteLifecycleAction CONTINUE
    then: every route, the gateway's maps and generation, and a request from every burst
      instance that must reach the partner's app server with that instance's S as its source
    and back: the group scales in, each instance is held at the terminate hook until the
      controller removed its mapping and returned its address, then EC2 terminates it

``run_burst_story(lab, controller)`` returns a ``BurstReport`` for the demo and tests/lab,
``run_scale_in(lab, controller, burst)`` a ``ScaleInReport``. The
instances are booted before the events are sent, so the time measured is the controller's, not
the boot's (in AWS the controller waits for the SSM agent through the queue's redelivery).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from lab import autoscaling
from lab import topology as topo
from lab.controller import LabController

SYNC = "SyncNatTable"


@dataclass
class BurstReport:
    instances: list[topo.Instance]
    boot_seconds: float  # launch in EC2 + namespaces booted
    converge_seconds: float  # first lifecycle event sent -> last launch released
    wall_seconds: float  # launch -> last launch released
    batches: list[int]  # sizes of the batches the handler got, in order
    failed_messages: int
    syncs: int  # SyncNatTable runs on the gateway during the burst
    add_route_runs: int
    continued: list[str]  # instance IDs released with CONTINUE
    heartbeats: int
    statuses: dict[str, str]  # instance name -> status recorded by the controller
    routes: dict[str, bool]  # instance name -> route A via G in place
    public: dict[str, str | None]  # instance name -> S stored for it
    snat: dict[str, bool]  # instance name -> private -> S in the gateway's snat map
    desired_generation: int
    applied_generation: int
    traffic: dict[str, str | None] = field(default_factory=dict)  # name -> peer the app saw

    @property
    def ids(self) -> list[str]:
        return [i.instance_id for i in self.instances]

    @property
    def all_continued(self) -> bool:
        return sorted(self.continued) == sorted(self.ids)

    @property
    def traffic_ok(self) -> bool:
        return bool(self.traffic) and all(
            peer is not None and peer == self.public.get(name)
            for name, peer in self.traffic.items()
        )

    @property
    def ok(self) -> bool:
        n = len(self.instances)
        return (
            n > 0
            and self.all_continued
            and self.failed_messages == 0
            and all(s == "enrolled" for s in self.statuses.values())
            and len(self.statuses) == n
            and all(self.routes.values())
            and all(self.snat.values())
            and len(set(self.public.values())) == n
            and self.applied_generation == self.desired_generation
            and 0 < self.syncs <= len(self.batches)
            and self.traffic_ok
        )

    def figure(self) -> str:
        n = len(self.instances)
        reached = sum(
            1 for name, peer in self.traffic.items() if peer and peer == self.public.get(name)
        )
        sync = "=" if self.applied_generation == self.desired_generation else "!="
        return (
            f"{n} instances launched into {autoscaling.GROUP} ({self.instances[0].name}.."
            f"{self.instances[-1].name}, booted in {self.boot_seconds:.1f}s); "
            f"{len(self.batches)} SQS batches ({'+'.join(str(b) for b in self.batches)}) -> "
            f"all converged in {self.converge_seconds:.1f}s (launch to last CONTINUE "
            f"{self.wall_seconds:.1f}s); gateway syncs (SyncNatTable): {self.syncs} for {n} "
            f"launches; CONTINUE {len(self.continued)}/{n}; routes {sum(self.routes.values())}/"
            f"{n}; SNAT entries {sum(self.snat.values())}/{n}; generation applied "
            f"{self.applied_generation} {sync} desired {self.desired_generation}; "
            f"{reached}/{len(self.traffic)} reach A with their own S"
        )


def next_numbers(lab: topo.Lab, count: int) -> list[int]:
    """The next free web-N numbers (the lab's subnet has room for 1..200)."""
    used = [int(i.name.rsplit("-", 1)[1]) for i in lab.instances]
    start = max(used, default=0) + 1
    return list(range(start, start + count))


def run_burst_story(
    lab: topo.Lab, controller: LabController, *, count: int = 20, timeout: float = 120.0
) -> BurstReport:
    """Needs the tunnel up (ConfigureGateway ran). Launches ``count`` instances at once."""
    lifecycle = controller.lifecycle
    history_before = len(lab.commands.history)
    calls_before = len(lifecycle.calls)
    started = time.monotonic()
    # Booted first, launched after: RunInstances needs the address, and a failure here leaves
    # only lab namespaces behind, which the lab's cleanup removes.
    instances = lab.add_instances(next_numbers(lab, count))
    ids = autoscaling.launch(lab.aws, instances)
    for inst in instances:
        # The SSM agent "registers": commands for this instance now run in its namespace.
        lab.commands.namespaces[inst.instance_id] = inst.ns
    booted = time.monotonic()
    source = autoscaling.LambdaSqsSource(lab.aws, controller.invoke)
    autoscaling.emit_lifecycle_events(lab.aws, lifecycle, ids, autoscaling.LAUNCHING)
    runs = source.drain(timeout=timeout)
    calls = lifecycle.calls[calls_before:]
    released = [
        c.at for c in calls if c.call == "CompleteLifecycleAction" and c.instance_id in set(ids)
    ]
    finished = max(released, default=time.monotonic())
    runs_during = lab.commands.history[history_before:]

    # -- what actually happened ------------------------------------------------------------------
    store = controller.controller.store
    records = {r.instance_id: r for r in store.records()}
    mappings = {m.instance_id: m for m in store.mappings()}
    desired, applied, _ = store.generations()
    snat = set(lab.nft_elements("map", "snat_map"))
    statuses, routes, public, in_snat = {}, {}, {}, {}
    for inst in instances:
        record = records.get(inst.instance_id)
        statuses[inst.name] = record.status if record else "no record"
        mapping = mappings.get(inst.instance_id)
        public[inst.name] = str(mapping.public_ip) if mapping else None
        routes[inst.name] = any(
            r.startswith(f"{topo.PARTNER_NET} via {topo.GW_ENI}") for r in lab.routes(inst.ns)
        )
        in_snat[inst.name] = f"{inst.private_ip} : {public[inst.name]}" in snat
    report = BurstReport(
        instances=instances,
        boot_seconds=booted - started,
        converge_seconds=finished - booted,
        wall_seconds=finished - started,
        batches=[r.size for r in runs],
        failed_messages=sum(r.failed for r in runs),
        syncs=sum(1 for r in runs_during if r.document == SYNC),
        add_route_runs=sum(1 for r in runs_during if r.document == "AddHostRoute"),
        continued=[
            c.instance_id
            for c in calls
            if c.call == "CompleteLifecycleAction"
            and c.result == "CONTINUE"
            and c.transition == autoscaling.LAUNCHING
        ],
        heartbeats=sum(1 for c in calls if c.call == "RecordLifecycleActionHeartbeat"),
        statuses=statuses,
        routes=routes,
        public=public,
        snat=in_snat,
        desired_generation=desired,
        applied_generation=applied,
    )
    report.traffic = send_from_each(lab, instances)
    return report


def send_from_each(lab: topo.Lab, instances: list[topo.Instance]) -> dict[str, str | None]:
    """One request from each instance to A; the peer address the app server logged for it."""
    paths = {}
    for inst in instances:
        path = f"/burst-{inst.name}-{time.monotonic_ns()}"
        paths[path] = inst.name
        lab.http(inst.ns, f"http://{topo.APP}:{topo.APP_PORT}{path}", timeout=3)
    seen: dict[str, str | None] = {inst.name: None for inst in instances}
    for line in lab.app_log.read_text().splitlines() if lab.app_log.exists() else []:
        parts = line.split()
        if len(parts) == 3 and parts[2] in paths:
            seen[paths[parts[2]]] = parts[1]
    return seen


@dataclass
class ScaleInReport:
    instances: list[topo.Instance]
    seconds: float  # first terminate event sent -> last action released
    batches: list[int]
    failed_messages: int
    syncs: int
    continued: list[str]  # instance IDs whose terminate action was released with CONTINUE
    left_mapped: list[str]  # names still in the store's mappings
    left_in_snat: list[str]  # names whose private address is still in the gateway's snat map
    claimed: list[str]  # addresses of theirs still claimed in the pool
    desired_generation: int
    applied_generation: int
    terminated: list[str]  # instance IDs EC2 reports terminated afterwards

    @property
    def ok(self) -> bool:
        ids = sorted(i.instance_id for i in self.instances)
        return (
            sorted(self.continued) == ids
            and sorted(self.terminated) == ids
            and self.failed_messages == 0
            and not self.left_mapped
            and not self.left_in_snat
            and not self.claimed
            and self.applied_generation == self.desired_generation
            and 0 < self.syncs <= len(self.batches)
        )

    def figure(self) -> str:
        n = len(self.instances)
        left = len(set(self.left_mapped) | set(self.left_in_snat))
        sync = "=" if self.applied_generation == self.desired_generation else "!="
        return (
            f"{n} terminate actions in {len(self.batches)} SQS batches "
            f"({'+'.join(str(b) for b in self.batches)}) -> released in {self.seconds:.1f}s at "
            f"{self.syncs} gateway sync(s); CONTINUE {len(self.continued)}/{n}; mappings left "
            f"{left}, addresses still claimed {len(self.claimed)}; generation applied "
            f"{self.applied_generation} {sync} desired {self.desired_generation}; terminated in "
            f"EC2 {len(self.terminated)}/{n}"
        )


def run_scale_in(
    lab: topo.Lab, controller: LabController, burst: BurstReport, *, timeout: float = 120
) -> ScaleInReport:
    """The group scales in by the burst's instances: each is held at the terminate hook, the
    controller removes its mapping and returns its address before CONTINUE, then EC2 terminates
    it. (Their namespaces stay until the lab closes, as powered-off machines.)"""
    instances = burst.instances
    lifecycle = controller.lifecycle
    history_before = len(lab.commands.history)
    calls_before = len(lifecycle.calls)
    ids = [i.instance_id for i in instances]
    source = autoscaling.LambdaSqsSource(lab.aws, controller.invoke)
    started = time.monotonic()
    autoscaling.emit_lifecycle_events(lab.aws, lifecycle, ids, autoscaling.TERMINATING)
    runs = source.drain(timeout=timeout)
    calls = [
        c
        for c in lifecycle.calls[calls_before:]
        if c.call == "CompleteLifecycleAction" and c.transition == autoscaling.TERMINATING
    ]
    finished = max((c.at for c in calls), default=time.monotonic())
    continued = [c.instance_id for c in calls if c.result == "CONTINUE"]
    # Auto Scaling terminates what it was allowed to (and only that).
    asg = lab.aws.client("autoscaling")
    for instance_id in continued:
        asg.terminate_instance_in_auto_scaling_group(
            InstanceId=instance_id, ShouldDecrementDesiredCapacity=True
        )
    reply = lab.aws.client("ec2").describe_instances(InstanceIds=ids)
    terminated = [
        i["InstanceId"]
        for r in reply["Reservations"]
        for i in r["Instances"]
        if i["State"]["Name"] == "terminated"
    ]
    store = controller.controller.store
    mapped = {m.instance_id for m in store.mappings()}
    claimed = {str(a) for a in store.claimed_addresses()}
    snat = lab.nft_elements("map", "snat_map")
    desired, applied, _ = store.generations()
    runs_during = lab.commands.history[history_before:]
    return ScaleInReport(
        instances=instances,
        seconds=finished - started,
        batches=[r.size for r in runs],
        failed_messages=sum(r.failed for r in runs),
        syncs=sum(1 for r in runs_during if r.document == SYNC),
        continued=continued,
        left_mapped=[i.name for i in instances if i.instance_id in mapped],
        left_in_snat=[
            i.name for i in instances if any(e.split(" : ")[0] == i.private_ip for e in snat)
        ],
        claimed=sorted(claimed & {p for p in burst.public.values() if p}),
        desired_generation=desired,
        applied_generation=applied,
        terminated=terminated,
    )
