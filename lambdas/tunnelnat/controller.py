"""The heart: drive instances, and the gateway, to what they should be.

Level-triggered: whatever event led here, the controller reads the instances' real state from EC2
and the stored state from DynamoDB, decides, writes the desired state, then makes the instances and
the gateway match it. Running it twice changes nothing the second time.

``converge`` works in three phases so a batch of instances costs one gateway sync, not one each:
1. per instance: observe, decide, write the desired mapping (or remove a route and the mapping);
2. once: if the gateway is behind the desired generation, it pulls and applies the newest table;
3. per instance: add the route, record the status.

The gateway's side (finding it, the coalesced sync) is ``gateway_sync.GatewaySync``; the plan each
instance carries between the phases, and the pure helpers, are in ``plan.py``.

AWS calls are made per batch, not per instance (issue 6's budget): one transaction takes every
lease, one DescribeInstances observes, one BatchGetItem reads every mapping, record and both
generations, one transaction writes every mapping change with one generation bump, one command
adds every route, one transaction writes the records that changed and gives the leases back, and
one CreateTags per status value. Writes that would change nothing are skipped.

Isolation: an instance that cannot be served (its private address mapped for another instance,
another VPC, no pool address) gets a status naming why and, where there is one, the other party;
it is skipped and reported, and the rest of the batch converges. No private address is ever
mapped twice: its claim is written in the same transaction as the mapping.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterable
from ipaddress import IPv4Address
from typing import Any, Protocol

from aws_lambda_powertools import Logger

from tunnelnat.adapters.commands import (
    AgentNotReady,
    CommandError,
    CommandPort,
    CommandResult,
    raise_for_status,
    run_many,
)
from tunnelnat.adapters.store import (
    AddressTaken,
    EnrolmentStore,
    GenerationMoved,
    InstanceBusy,
    InstanceRecord,
    LeaseLost,
    MappingChange,
    PrivateAddressTaken,
    Snapshot,
    StoreConflict,
    StoredMapping,
    SyncLeaseBusy,
    claimed_delta,
)
from tunnelnat.core.config import NatMode, TunnelnatConfig
from tunnelnat.core.enrolment import (
    AddressPool,
    AllowList,
    Decision,
    Mode,
    ObservedInstance,
    Status,
    decide_enrolment,
    public_address_for,
)
from tunnelnat.core.routes import ROUTES_TAG, describe_routes
from tunnelnat.core.text import printable
from tunnelnat.gateway_sync import (  # noqa: F401 - GatewaySyncFailed: re-exported
    GatewaySync,
    GatewaySyncFailed,
    GatewaySyncPending,
    SyncRelease,
)
from tunnelnat.plan import (
    Outcome,
    Plan,
    Run,
    as_text,
    comparable,
    conflict,
    conflicted,
    failure_reason,
    holds_private,
    transactions,
)
from tunnelnat.route_sync import RouteBatch, RouteTableSync, TableOutcome
from tunnelnat.telemetry import FAILURE_REASONS, NoTelemetry, Telemetry  # noqa: F401

logger = Logger(service="tunnelnat", child=True)

STORE_ATTEMPTS = 5
# Retries when only the generation bump lost (cheap: no re-read), before they count as attempts.
GENERATION_RETRIES = 20
# Without the enrolment tag (or in another VPC) an instance is none of our business unless we
# enrolled it before.
UNMANAGED = (Status.NOT_TAGGED, Status.GONE, Status.IS_GATEWAY, Status.OTHER_VPC)
PENDING_SSM = "pending-ssm"
CLEAR_STATUS = ""  # run.tags: remove the instance's status tag
# pool-exhausted's reason names this many holders (records keep reasons to 1,000 characters).
POOL_HOLDERS_SHOWN = 15
TERMINATING = "terminating"


class InstanceSource(Protocol):
    def describe_many(self, instance_ids: Iterable[str]) -> dict[str, ObservedInstance]: ...

    def tagged(self, tag_key: str) -> dict[str, ObservedInstance]: ...

    def find_gateway(self, deployment: str) -> str: ...

    def set_status_tag(self, instance: ObservedInstance, status: str) -> None: ...


class Controller:
    def __init__(
        self,
        config: TunnelnatConfig,
        *,
        store: EnrolmentStore,
        instances: InstanceSource,
        commands: CommandPort,
        deployment: str,
        region: str,
        telemetry: Telemetry | None = None,
        vpc_id: str | None = None,
        routes: RouteTableSync | None = None,
        allowed: AllowList | None = None,
        gateway_group: str | None = None,
        route_scope: str | None = None,
        partner: str | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.instances = instances
        self.commands = commands
        self.deployment = deployment
        self.region = region
        self.vpc_id = vpc_id  # the gateway's VPC: instances elsewhere are never enrolled
        self.telemetry = telemetry or NoTelemetry()
        # Who may enrol (subnets / Auto Scaling groups; empty: anyone who can tag), and the
        # gateway's group, whose members are never enrolled.
        self.allowed = allowed or AllowList()
        self.gateway_group = gateway_group
        # A several-partner deployment runs one controller per partner (partner_lanes.py): its
        # instance routes are scoped ``<deployment>.<partner>`` (core/lanes.py), so each
        # partner's routes on an instance are its own; the gateway stays the deployment's.
        self.route_scope = route_scope or deployment
        self.partner = partner
        # Route-table mode (None: off, other subnets are unsupported-subnet).
        self.routes = routes if vpc_id is not None else None
        self.gateway = GatewaySync(
            store=store,
            instances=instances,
            commands=commands,
            deployment=deployment,
            region=region,
            telemetry=self.telemetry,
        )

    # -- entry points ------------------------------------------------------------------------
    def reconcile(self, instance_id: str, *, terminating: bool = False) -> Outcome:
        """Converge one instance; raise what went wrong so the caller can retry."""
        result = self.converge([instance_id], terminating={instance_id} if terminating else ())[
            instance_id
        ]
        if isinstance(result, Exception):
            raise result
        return result

    def reconcile_all(self) -> dict[str, Outcome | Exception]:
        """The scheduled repair: every tagged instance and everything the table remembers, and a
        full re-render on the gateway (it may have been rebooted, replaced or edited by hand)."""
        ids = set(self.instances.tagged(self.config.enrolment_tag_key))
        ids |= {m.instance_id for m in self.store.mappings()}
        ids |= {r.instance_id for r in self.store.records()}
        if self.routes is not None:
            # Every instance a route table counts (level-triggered: each puts back a route of
            # ours that was deleted, or leaves); tables left without members lose our routes.
            for record in self.routes.records.all().values():
                ids |= set(record.members)
        results = self.converge(sorted(ids), full_sync=True)
        if self.routes is not None:
            try:
                self.routes.begin().tidy()
            except Exception as exc:  # noqa: BLE001 - the next scheduled run tries again
                logger.warning("route tables not tidied", extra={"reason": repr(exc)[:300]})
                self.telemetry.failure("store-conflict")
        return results

    def converge(
        self,
        instance_ids: Iterable[str],
        *,
        terminating: Iterable[str] = (),
        full_sync: bool = False,
    ) -> dict[str, Outcome | Exception]:
        """Converge many instances with at most one gateway sync. Each instance's result is its
        Outcome or the exception that stopped it; one instance's failure never stops another's."""
        run = Run(owner=uuid.uuid4().hex)
        try:
            results = self._converge(list(instance_ids), set(terminating), full_sync, run)
        finally:
            if run.sync_leased and not run.sync_handed:
                # Taken with a mapping write, never used (the run stopped before its sync).
                self.store.end_sync(run.owner, applied=None, gateway_id=None)
            # Records that changed, records to forget, the leases back and the gateway sync's
            # release: one write.
            release = run.sync_release
            released = self.store.finish(
                put=list(run.records.values()),
                delete=sorted(run.forget),
                release=run.leased,
                owner=run.owner,
                sync=(release.applied, release.gateway, release.standbys)
                if release is not None
                else None,
            )
            if release is not None and not released:
                self._trail(release)
        self._tag(run)
        self._report(results, run, full_sync=full_sync)
        return results

    def _converge(
        self, instance_ids: list[str], ending: set[str], full_sync: bool, run: Run
    ) -> dict[str, Outcome | Exception]:
        results: dict[str, Outcome | Exception] = {}
        ids = list(dict.fromkeys(instance_ids))
        if not ids and not full_sync:
            return results
        # The table's side first, in one call (leases included), then EC2's: each instance's
        # lease is taken later conditional on its epoch as read here (nobody took it between
        # this read and our write), so what we observe cannot have been overtaken by another
        # worker's newer read. An instance whose lease is held is another worker's now.
        snap = self.store.snapshot_many(ids, leases=True)
        run.snapshot = snap
        run.claimed_count = snap.claimed_count
        for instance_id in ids:
            lease = snap.leases.get(instance_id)
            if lease is not None and lease.held_by_other(run.owner, snap.read_at):
                results[instance_id] = InstanceBusy(
                    f"{instance_id} is being reconciled by another worker"
                )
            else:
                run.batch.add(instance_id)
                run.lease_epochs[instance_id] = lease.epoch if lease is not None else None
        ids = [i for i in ids if i in run.batch]
        if not ids and not full_sync:
            return results
        # A cold container starts from the gateway the table says last applied (what the warm
        # one keeps in memory), checked in the instances' own DescribeInstances.
        self.gateway.adopt(snap.gateway_id, snap.standby_ids)
        observed = self._observe(ids) if ids else {}
        run.routes = self.routes.begin() if self.routes is not None else None
        plans: list[Plan] = []
        for instance_id in ids:
            try:
                plan = self._plan(
                    instance_id, observed.get(instance_id), snap, run,
                    terminating=instance_id in ending,
                )  # fmt: skip
            except Exception as exc:  # noqa: BLE001 - reported per instance, retried by the queue
                results[instance_id] = exc
                continue
            if isinstance(plan, Outcome):
                results[instance_id] = plan  # read only: no lease, nothing written
            else:
                plans.append(plan)
        # Leases taken alone: before a command that comes ahead of the write (a route removed,
        # route tables left) and where no mapping write can take them along.
        alone = [p for p in plans if p.remove_route or (p.leave_tables and p.tables)
                 or not p.needs_write]  # fmt: skip
        plans = self._lease_alone(alone, plans, results, run)
        plans = self._remove_routes(plans, results, run)
        plans = self._write_mappings(plans, results, snap, run)
        # A write that no longer happened (its instance became a conflict, or nothing was left
        # to write after a re-read) took no lease: taken alone before anything else is done.
        plans = self._lease_alone([p for p in plans if p.lease_pending], plans, results, run)
        synced = False
        generation = run.desired
        sync_error: Exception | None = None
        if plans or full_sync:
            try:
                synced, generation = self._sync_gateway(full=full_sync, run=run)
            except Exception as exc:  # noqa: BLE001
                sync_error = exc
                if not isinstance(exc, GatewaySyncPending):
                    # Counted once as a gateway-sync failure, not per waiting instance.
                    exc.gateway_sync = True  # type: ignore[attr-defined]
        if sync_error is not None:
            for plan in plans:
                results[plan.instance_id] = sync_error
            return results
        results.update(self._finish(plans, generation, synced, run))
        return results

    def _lease_alone(
        self, wanted: list[Plan], plans: list[Plan], results: dict[str, Outcome | Exception],
        run: Run,
    ) -> list[Plan]:  # fmt: skip
        """Take these plans' leases (one call), conditional on each epoch as first read; a plan
        that lost its lease is another worker's (InstanceBusy) and goes no further."""
        wanted = [p for p in wanted if p.lease_pending]
        if not wanted:
            return plans
        ids = [p.instance_id for p in wanted]
        epochs = {i: run.lease_epochs.get(i) for i in ids}
        busy = self.store.acquire_leases(ids, run.owner, epochs=epochs)
        for plan in wanted:
            if plan.instance_id in busy:
                results[plan.instance_id] = busy[plan.instance_id]
            else:
                plan.lease_pending = False
                run.leased.append(plan.instance_id)
        return [p for p in plans if p.instance_id not in busy]

    def _observe(self, instance_ids: list[str]) -> dict[str, ObservedInstance]:
        """The instances as EC2 has them now; the gateway known from before is checked in the
        same DescribeInstances (still running, tagged, holding G in our VPC and group), so
        knowing it costs no call of its own."""
        candidate = self.gateway.candidate()
        pair = getattr(self.instances, "observe_gateways", None)
        if candidate is not None and pair is not None:
            observed, active, others = pair(
                instance_ids, gateways=self.gateway.candidates(), deployment=self.deployment
            )
            self.gateway.confirm_pair(active, others)
            return observed
        observe = getattr(self.instances, "observe", None)
        if candidate is None or observe is None:
            return self.instances.describe_many(instance_ids)
        observed, holds = observe(instance_ids, gateway=candidate, deployment=self.deployment)
        self.gateway.confirm(candidate, holds)
        return observed

    # -- phase 1 -----------------------------------------------------------------------------
    def _plan(
        self,
        instance_id: str,
        instance: ObservedInstance | None,
        snap: Snapshot,
        run: Run,
        *,
        terminating: bool,
    ) -> Plan | Outcome:
        decision = decide_enrolment(
            instance, self.config, vpc_id=self.vpc_id, route_tables=self.routes is not None,
            allowed=self.allowed, gateway_group=self.gateway_group,
        )  # fmt: skip
        if terminating:
            decision = Decision(False, Status.GONE, "Auto Scaling is terminating the instance")
        mapping, record = snap.mappings.get(instance_id), snap.records.get(instance_id)
        tables: set[str] = set()
        batch: RouteBatch | None = run.routes
        if batch is not None and self._maybe_routed(instance, mapping, record):
            tables = batch.memberships(instance_id)
            if decision.enrol and decision.mode is Mode.ROUTE_TABLE:
                assert instance is not None
                decision = self._table_decision(batch, instance, decision)
        claim_missing = False
        if decision.enrol:
            assert instance is not None and instance.private_ip is not None
            holder = snap.private_claims.get(str(instance.private_ip))
            if holder is not None and holder != instance_id and holder not in run.batch:
                # Served already for another instance: never map one P twice. (A holder in this
                # batch may be letting go of it: the transaction decides, in order.)
                decision = conflict(instance.private_ip, holder)
            claim_missing = holder is None and mapping is not None
        if not decision.enrol and mapping is None and record is None and not tables:
            if decision.status in UNMANAGED:
                # Never ours: an event about some other instance. Nothing to write or undo.
                return Outcome(instance_id, decision.status, decision.reason, managed=False)
        route = bool(record and record.route_installed)
        if decision.enrol:
            assert instance is not None
            address = self._address_for(instance, mapping, run)
            if address is None:
                self.telemetry.count("PoolExhausted")
                decision = Decision(False, Status.POOL_EXHAUSTED, self._exhausted(run))
                plan = Plan(instance_id, instance, decision, None, route, record, mapping)
                plan.remove_route = route and instance.state == "running"
                plan.tables, plan.leave_tables = tables, bool(tables)
                return plan
            wanted = StoredMapping(instance_id, instance.private_ip, address)  # type: ignore[arg-type]
            plan = Plan(instance_id, instance, decision, wanted, route, record)
            plan.previous, plan.claim_missing = mapping, claim_missing
            plan.holds_private = holds_private(snap, instance_id, mapping)
            plan.tables = tables
            if decision.mode is Mode.ROUTE_TABLE:
                assert batch is not None
                plan.table = batch.table_for(instance.subnet_id)
            return plan
        # Not to be enrolled: stop its traffic first (route), then forget its mapping.
        plan = Plan(instance_id, instance, decision, None, route, record)
        plan.previous = mapping
        plan.holds_private = holds_private(snap, instance_id, mapping)
        # Route-table mode: it leaves the tables that count it, whatever its state (a route
        # table's route is not on the instance; the last member's leaving removes it).
        plan.tables, plan.leave_tables = tables, bool(tables)
        if route and instance is not None and instance.state == "running" and not terminating:
            plan.remove_route = True
        elif instance is None or instance.state == "terminated" or terminating:
            plan.route = False  # gone with the instance
        # A stopped instance keeps its route file; we stay responsible and remove it at start.
        return plan

    def _table_decision(
        self, batch: RouteBatch, instance: ObservedInstance, decision: Decision
    ) -> Decision:
        """Route-table mode: whether the table serving the instance's subnet can serve it,
        decided before anything is written, so an instance that cannot be served never holds
        a pool address (issue 21, finding 6)."""
        table_id = batch.table_for(instance.subnet_id)
        if table_id is None:
            return Decision(
                False,
                Status.UNSUPPORTED_SUBNET,
                f"no route table of {self.vpc_id} serves {instance.subnet_id} "
                "(neither an explicit association nor a main table)",
            )
        if not batch.opted_in(table_id):
            return Decision(
                False,
                Status.ROUTE_TABLE_NOT_OPTED_IN,
                f"route table {table_id} (serving {instance.subnet_id}) is not opted in for "
                f"{self.deployment}: its owner tags it {ROUTES_TAG}={self.deployment}, or "
                "lists it in context route_tables",
            )
        conflicts = batch.conflicts(table_id)
        if conflicts:
            reason = "; ".join(c.describe() for c in conflicts)
            return Decision(False, Status.ROUTE_CONFLICT, reason[:1000])
        return decision

    def _maybe_routed(
        self,
        instance: ObservedInstance | None,
        mapping: StoredMapping | None,
        record: InstanceRecord | None,
    ) -> bool:
        """Whether the instance may be, or have been, in route-table mode: only then are the
        route tables' records read (a batch of the gateway's own subnet never reads them).
        A table counts an instance only while it has a mapping outside the gateway's subnet."""
        subnet = self.config.gateway_subnet_cidr
        for address in (
            instance.private_ip if instance else None,
            mapping.private_ip if mapping else None,
            IPv4Address(record.private_ip) if record and record.private_ip else None,
        ):
            if address is not None and address not in subnet:
                return True
        return instance is None and (mapping is not None or record is not None)

    def _address_for(
        self, instance: ObservedInstance, mapping: StoredMapping | None, run: Run
    ) -> IPv4Address | None:
        current = mapping.public_ip if mapping else None
        claimed: Iterable[IPv4Address] = ()
        if self._dedicated and (current is None or current not in self._pool):
            candidate = self._candidate(instance, run)
            if candidate is not None:
                return candidate
            claimed = self._claims(run)
            if run.contended:
                # Workers that all took the lowest free address and lost to one another
                # would keep colliding: after a conflict, any free address will do.
                free = AddressPool(self.config.address_pool).free(claimed)
                if free:
                    address = free[random.randrange(len(free))]  # noqa: S311 - spreading only
                    run.claimed.add(address)
                    run.picked[address] = instance.instance_id
                    return address
        address = public_address_for(instance, self.config, current=current, claimed=claimed)
        if address is not None and self._dedicated and address != current:
            run.claimed.add(address)  # no other instance of this batch picks it too
            run.picked[address] = instance.instance_id
        return address

    def _exhausted(self, run: Run) -> str:
        """pool-exhausted's reason: who holds the addresses, and in what state (issue 21,
        finding 6: "no hint why"). Read once per batch (two Queries), only when the pool is
        full; an instance that cannot be served holds none (see UNSERVED)."""
        if run.pool_holders is None:
            statuses = {r.instance_id: r.status for r in self.store.records()}
            pool = self._pool
            holders = {m.public_ip: m.instance_id for m in self.store.mappings()
                       if m.public_ip in pool}  # fmt: skip
            for address, instance_id in run.picked.items():
                # Picked by this batch, not written yet.
                holders.setdefault(address, instance_id)
                statuses.setdefault(instance_id, "being enrolled by this batch")
            held = sorted(holders.items())
            shown = [f"{ip} by {i} ({statuses.get(i, 'no record')})" for ip, i in held]
            more = (
                f" and {len(shown) - POOL_HOLDERS_SHOWN} more"
                if len(shown) > (POOL_HOLDERS_SHOWN)
                else ""
            )
            run.pool_holders = "; ".join(shown[:POOL_HOLDERS_SHOWN]) + more
        reason = f"all {len(self.config.address_pool)} pool addresses are in use"
        return f"{reason}: {run.pool_holders}" if run.pool_holders else reason

    def _candidate(self, instance: ObservedInstance, run: Run) -> IPv4Address | None:
        """An address to try without reading every claim: with ``k`` addresses claimed (the
        count the mapping writes keep), the pool's ``k``-th in order, which is the lowest free
        one while claims fill the pool from the bottom (the next one for each further instance
        of the batch). The mapping transaction's claim is conditional: taken (a hole below it,
        another worker), the write is cancelled (AddressTaken), and the batch reads the claims
        and takes the lowest free one. None: read the claims now (count unknown, a conflict
        already, or the pool full)."""
        if run.contended or run.claimed_read is not None or run.claimed_count is None:
            return None
        pool = sorted(self._pool)
        for address in pool[run.claimed_count :]:
            if address not in run.claimed:
                run.claimed.add(address)  # no other instance of this batch picks it too
                run.picked[address] = instance.instance_id
                run.guessed = True
                return address
        return None

    def _claims(self, run: Run) -> set[IPv4Address]:
        # One Query per batch (and per retry after a conflict), only when an address is needed
        # and the hashed candidate is not tried (see _candidate).
        if run.claimed_read is None:
            run.claimed_read = set(self.store.claimed_addresses())
            run.claimed |= run.claimed_read
            if run.claimed_count is None:
                # Read after the generation ``run.desired`` was: exact at it, should the write
                # conditional on it succeed (else the bump's failure says the count then).
                run.claimed_count = len(run.claimed_read)
        return run.claimed

    def _remove_routes(
        self, plans: list[Plan], results: dict[str, Outcome | Exception], run: Run
    ) -> list[Plan]:
        """One RemoveHostRoute for every instance that must lose its route, and every instance
        in route-table mode that leaves its tables (the last one behind a table takes the
        table's routes with it); an instance whose route could not be removed keeps its mapping
        (its traffic is still ours to carry)."""
        failed: set[str] = set()
        leaving = [p for p in plans if p.leave_tables and p.tables]
        if leaving:
            assert run.routes is not None
            left = run.routes.apply({}, {p.instance_id: p.tables for p in leaving})
            for plan in leaving:
                outcome = left.get(plan.instance_id)
                if isinstance(outcome, Exception):
                    results[plan.instance_id] = outcome
                    failed.add(plan.instance_id)
                else:
                    plan.tables = set()
        targets = [p for p in plans if p.remove_route and p.instance_id not in failed]
        if not targets:
            return [p for p in plans if p.instance_id not in failed]
        replies = self._run_many([p.instance_id for p in targets], "RemoveHostRoute")
        for plan in targets:
            reply = replies[plan.instance_id]
            if isinstance(reply, Exception):
                results[plan.instance_id] = reply
                failed.add(plan.instance_id)
                if plan.decision.status is Status.POOL_EXHAUSTED:
                    # What we know, and why: the route stays until the next attempt.
                    self._record(run, plan, plan.decision.status, plan.decision.reason, True)
                continue
            plan.route = False
        return [p for p in plans if p.instance_id not in failed]

    def _write_mappings(
        self,
        plans: list[Plan],
        results: dict[str, Outcome | Exception],
        snap: Snapshot,
        run: Run,
    ) -> list[Plan]:
        """Every mapping change of the batch in one transaction (per 30) with one generation
        bump; on a conflict (another worker bumped the generation or took an address), read
        again and retry the ones that failed."""
        run.desired = snap.desired_generation
        pending = [p for p in plans if p.needs_write]
        for chunk in transactions(pending):
            attempt = bumps = 0
            written = False
            last: Exception | None = None
            while attempt < STORE_ATTEMPTS and chunk:
                attempt += 1
                changes = [
                    MappingChange(p.instance_id, p.mapping, p.previous, p.holds_private)
                    for p in chunk
                ]
                # The gateway sync this write calls for takes its lease along, unless a sync was
                # in flight when read (its trailing sync will carry this change).
                take = not (run.sync_leased or run.sync_busy or run.snapshot is None
                            or run.snapshot.sync_in_flight)  # fmt: skip
                # Each instance's lease rides along, conditional on its epoch as first read.
                leases = {p.instance_id: run.lease_epochs.get(p.instance_id)
                          for p in chunk if p.lease_pending}  # fmt: skip
                claimed = run.claimed_count if self._dedicated else None
                try:
                    run.desired = self.store.write_mappings(
                        changes,
                        generation=run.desired,
                        claim=self._dedicated,
                        sync_owner=run.owner if take else None,
                        lease_owner=run.owner,
                        leases=leases,
                        claims_before=claimed,
                    )
                    written = True
                    run.sync_leased = run.sync_leased or take
                    if claimed is not None:
                        run.claimed_count = max(0, claimed + claimed_delta(changes))
                    for plan in chunk:
                        if plan.lease_pending:
                            plan.lease_pending = False
                            run.leased.append(plan.instance_id)
                    break
                except LeaseLost as exc:
                    # Another worker took those instances since we read them: theirs (the
                    # queue retries ours); the rest is written again at once.
                    for plan in chunk:
                        if plan.instance_id in exc.instances:
                            results[plan.instance_id] = InstanceBusy(
                                f"{plan.instance_id} is being reconciled by another worker"
                            )
                    chunk = [p for p in chunk if p.instance_id not in exc.instances]
                    written = not chunk
                    attempt -= 1
                    continue
                except SyncLeaseBusy:
                    run.sync_busy = True  # nothing else lost: write again at once without it
                    attempt -= 1
                    continue
                except GenerationMoved as exc:
                    # Only the counter raced (a burst's workers all bump it): the rest of the
                    # transaction stands, retry at once with the generation DynamoDB returned.
                    self.telemetry.count("StoreConflicts")
                    run.desired = exc.current
                    run.claimed_count = exc.claimed_count
                    bumps += 1
                    if bumps <= GENERATION_RETRIES:
                        attempt -= 1
                    continue
                except PrivateAddressTaken as exc:
                    # Those instances lost their private address to another's mapping: each
                    # becomes a conflict (and lets go of any mapping it has); the rest of the
                    # transaction is written again at once.
                    chunk = conflicted(chunk, exc.taken)
                    written = not chunk
                    bumps += 1
                    if bumps <= GENERATION_RETRIES:
                        attempt -= 1
                    continue
                except (AddressTaken, StoreConflict) as exc:
                    self.telemetry.count("StoreConflicts")
                    last = exc
                    if attempt < STORE_ATTEMPTS:
                        chunk = self._replan(chunk, results, run)
                        written = not chunk  # nothing left to write after the re-read
            if not written:
                for plan in chunk:
                    results[plan.instance_id] = StoreConflict(
                        f"{plan.instance_id}: gave up after {attempt} conflicting attempts: {last}"
                    )
                chunk = []
            for plan in chunk:
                if plan.mapping is None and plan.previous is not None:
                    self.telemetry.count("Unenrolments")
                    run.claimed.discard(plan.previous.public_ip)
                run.pool_changed = True
                plan.previous, plan.holds_private = plan.mapping, True
        failed = {i for i, r in results.items() if isinstance(r, Exception)}
        done: list[Plan] = []
        for plan in plans:
            if plan.instance_id in failed:
                continue
            if plan.decision.status is Status.POOL_EXHAUSTED:
                self._record(run, plan, plan.decision.status, plan.decision.reason, plan.route)
                results[plan.instance_id] = Outcome(
                    plan.instance_id, plan.decision.status, plan.decision.reason
                )
                continue
            done.append(plan)
        return done

    def _replan(
        self, chunk: list[Plan], results: dict[str, Outcome | Exception], run: Run
    ) -> list[Plan]:
        """After a cancelled transaction: the generation, the claims and these instances'
        mappings as they are now (the instances themselves stay as observed: their leases are
        held, or taken with the write conditional on the epochs first read)."""
        snap = self.store.snapshot_many([p.instance_id for p in chunk])
        run.desired = snap.desired_generation
        run.claimed_count = snap.claimed_count
        run.claimed_read = None
        run.claimed = set()
        # A guessed address lost: the claims are read and the lowest free one taken; lost
        # again (or after a read): any free one (see _address_for).
        run.contended = not run.guessed
        if run.guessed:
            run.guessed = False
            self._claims(run)  # no second guess
        again: list[Plan] = []
        for plan in chunk:
            plan.previous = snap.mappings.get(plan.instance_id)
            plan.holds_private = holds_private(snap, plan.instance_id, plan.previous)
            if plan.decision.enrol:
                assert plan.instance is not None
                address = self._address_for(plan.instance, plan.previous, run)
                if address is None:
                    self.telemetry.count("PoolExhausted")
                    plan.decision = Decision(False, Status.POOL_EXHAUSTED, self._exhausted(run))
                    plan.mapping = None
                    continue
                plan.mapping = StoredMapping(plan.instance_id, plan.instance.private_ip, address)  # type: ignore[arg-type]
            if plan.needs_write:
                again.append(plan)
        return again

    # -- phase 3 -----------------------------------------------------------------------------
    def _finish(
        self, plans: list[Plan], generation: int, synced: bool, run: Run
    ) -> dict[str, Outcome | Exception]:
        results: dict[str, Outcome | Exception] = {}
        enrol = [p for p in plans if p.decision.enrol and p.decision.mode is Mode.HOST_ROUTE]
        replies = self._run_many([p.instance_id for p in enrol], "AddHostRoute") if enrol else {}
        routed = self._join_tables(plans, run)
        for plan in plans:
            instance, decision = plan.instance, plan.decision
            if decision.enrol and decision.mode is Mode.ROUTE_TABLE:
                results[plan.instance_id] = self._routed(plan, routed, generation, synced, run)
                continue
            if decision.enrol:
                assert instance is not None and plan.mapping is not None
                reply = replies[plan.instance_id]
                if isinstance(reply, Exception):
                    if isinstance(reply, AgentNotReady):
                        self._record(run, plan, PENDING_SSM, str(reply), plan.route)
                    results[plan.instance_id] = reply
                    continue
                reason = "route and NAT in place"
                was = plan.record
                newly = not (was and was.status == Status.ENROLLED and was.route_installed)
                self._record(run, plan, Status.ENROLLED, reason, True, mapping=plan.mapping)
                if newly:
                    self.telemetry.count("Enrolments")
                results[plan.instance_id] = Outcome(
                    plan.instance_id,
                    Status.ENROLLED,
                    reason,
                    public_ip=str(plan.mapping.public_ip),
                    generation=generation,
                    gateway_synced=synced,
                    newly_enrolled=newly,
                )
                continue
            if decision.status is Status.GONE or (not plan.route and decision.status in UNMANAGED):
                # Nothing of ours is left on it: forget it rather than keep a row per past instance.
                if plan.record is not None:
                    run.forget.add(plan.instance_id)
                if instance is not None and decision.status is Status.NOT_TAGGED:
                    # Our status tag goes with our business: an instance without the enrolment
                    # key is none of ours (and the role may tag only instances carrying it).
                    run.tags[plan.instance_id] = (instance, CLEAR_STATUS)
            else:
                self._record(run, plan, decision.status, decision.reason, plan.route)
            results[plan.instance_id] = Outcome(
                plan.instance_id,
                decision.status,
                decision.reason,
                generation=generation,
                gateway_synced=synced,
            )
        return results

    def _join_tables(self, plans: list[Plan], run: Run) -> dict[str, TableOutcome | Exception]:
        """Every enrolled instance counted behind the table that serves its subnet now, and no
        longer behind any other (its subnet's table was replaced or re-associated): one
        record write and the routes each table needs, per table."""
        joins: dict[str, str] = {}
        leaves: dict[str, set[str]] = {}
        for plan in plans:
            if not plan.decision.enrol:
                continue
            if plan.table is not None:
                joins[plan.instance_id] = plan.table
            stale = plan.tables - ({plan.table} if plan.table else set())
            if stale:
                leaves[plan.instance_id] = stale
        if not joins and not leaves:
            return {}
        assert run.routes is not None
        return run.routes.apply(joins, leaves)

    def _routed(
        self,
        plan: Plan,
        routed: dict[str, TableOutcome | Exception],
        generation: int,
        synced: bool,
        run: Run,
    ) -> Outcome | Exception:
        """A route-table instance's outcome: enrolled once its table sends the partner's
        networks to the gateway, route-conflict (no retry) when a route there is not ours."""
        assert plan.mapping is not None
        outcome = routed.get(plan.instance_id)
        if isinstance(outcome, Exception):
            return outcome
        if outcome is None or outcome.table_id is None:
            return RuntimeError(f"{plan.instance_id}: no route table result")
        public_ip = str(plan.mapping.public_ip)
        if outcome.conflicts:
            reason = "; ".join(c.describe() for c in outcome.conflicts)
            self._record(run, plan, Status.ROUTE_CONFLICT, reason[:1000], False,
                         mapping=plan.mapping)  # fmt: skip
            return Outcome(
                plan.instance_id, Status.ROUTE_CONFLICT, reason, public_ip=public_ip,
                generation=generation, gateway_synced=synced,
            )  # fmt: skip
        assert self.routes is not None
        reason = describe_routes(outcome.table_id, outcome.routes, self.routes.eni)
        reason += " (route-table mode); NAT in place"
        was = plan.record
        newly = not (was and was.status == Status.ENROLLED)
        self._record(run, plan, Status.ENROLLED, reason, False, mapping=plan.mapping)
        if newly:
            self.telemetry.count("Enrolments")
        return Outcome(
            plan.instance_id, Status.ENROLLED, reason, public_ip=public_ip,
            generation=generation, gateway_synced=synced, newly_enrolled=newly,
        )  # fmt: skip

    # -- the gateway (gateway_sync.py) -----------------------------------------------------------
    def gateway_id(self, *, refresh: bool = False) -> str:
        return self.gateway.gateway_id(refresh=refresh)

    def sync_gateway(self, *, full: bool = False, gateway: str | None = None) -> dict[str, Any]:
        """Ask the gateway to pull and apply the newest table; returns what it reported."""
        return self.gateway.sync(full=full, gateway=gateway)

    def _sync_gateway(self, *, full: bool, run: Run) -> tuple[bool, int]:
        snap = run.snapshot
        run.sync_handed = True
        synced, desired, run.sync_release = self.gateway.converge(
            owner=run.owner,
            desired=max(run.desired, snap.desired_generation if snap else 0),
            applied=snap.applied_generation if snap else 0,
            full=full,
            leased=run.sync_leased,
            defer=True,
        )
        return synced, desired

    def _trail(self, release: SyncRelease) -> None:
        """Another worker wrote while our sync ran and left its change to us (our sync was in
        flight): the trailing sync, after this run's own work is recorded."""
        try:
            self.gateway.trail(release)
        except Exception as exc:  # noqa: BLE001 - theirs: their redelivery syncs it
            logger.warning("trailing gateway sync failed", extra={"reason": repr(exc)[:300]})
            self.telemetry.failure("gateway-sync")

    # -- helpers -------------------------------------------------------------------------------
    @property
    def _dedicated(self) -> bool:
        return self.config.nat_mode is NatMode.DEDICATED

    @property
    def _pool(self) -> frozenset[IPv4Address]:
        return frozenset(self.config.address_pool)

    def _route_parameters(self) -> dict[str, str]:
        return {
            "Destinations": ",".join(str(n) for n in self.config.partner_networks),
            "Gateway": str(self.config.gateway_private_ip),
            # Names the instance's state file and drop-in (/etc/tunnelnat/routes.d/<deployment>):
            # two deployments on one instance never undo each other's routes (issue 21), nor
            # two partners of one deployment (<deployment>.<partner>, issue 23).
            "Deployment": self.route_scope,
        }

    def _run_many(
        self, instance_ids: list[str], document: str
    ) -> dict[str, CommandResult | Exception]:
        replies = run_many(self.commands, instance_ids, document, self._route_parameters())
        out: dict[str, CommandResult | Exception] = {}
        for instance_id in instance_ids:
            reply = replies.get(instance_id) or CommandError(f"{instance_id}: no result")
            if isinstance(reply, Exception):
                out[instance_id] = reply
                continue
            try:
                out[instance_id] = self._check(reply)
            except CommandError as exc:
                out[instance_id] = exc
        return out

    def _check(self, result: CommandResult) -> CommandResult:
        if not result.ok:
            self.telemetry.count("CommandFailures")
        return raise_for_status(result)

    def _record(
        self,
        run: Run,
        plan: Plan,
        status: str,
        reason: str,
        route: bool,
        *,
        mapping: StoredMapping | None = None,
    ) -> None:
        """Queue the instance's record for the batch's last write, unless it would not change;
        and its status tag."""
        instance = plan.instance
        record = InstanceRecord(
            plan.instance_id,
            str(status),
            # Reasons quote command output: nothing an instance wrote reaches a terminal raw.
            printable(reason),
            route_installed=route,
            private_ip=as_text(instance.private_ip if instance else None),
            public_ip=as_text(mapping.public_ip if mapping else None),
        )
        before = plan.record
        if before is None or comparable(before) != comparable(record):
            run.records[plan.instance_id] = record
        else:
            run.records.pop(plan.instance_id, None)
        if instance is not None and instance.state not in ("terminated", "shutting-down"):
            run.tags[plan.instance_id] = (instance, str(status))

    def _tag(self, run: Run) -> None:
        """Each instance's last status as its tag: one CreateTags per status value."""
        by_status: dict[str, list[ObservedInstance]] = {}
        for instance, status in run.tags.values():
            by_status.setdefault(status, []).append(instance)
        many = getattr(self.instances, "set_status_tags", None)
        clear = by_status.pop(CLEAR_STATUS, [])
        if clear and hasattr(self.instances, "clear_status_tags"):
            self.instances.clear_status_tags(clear)
        for status, instances in by_status.items():
            if many is not None:
                many(instances, status)
            else:
                for instance in instances:
                    self.instances.set_status_tag(instance, status)

    def _report(
        self, results: dict[str, Outcome | Exception], run: Run, *, full_sync: bool = False
    ) -> None:
        """Failures by reason, and the pool's free addresses after the batch (dedicated mode)."""
        sync_failed = False
        for result in results.values():
            reason = failure_reason(result)
            if reason == "gateway-sync":
                sync_failed = True  # one failed sync, whatever the number of instances waiting
            elif reason is not None:
                self.telemetry.failure(reason)
        if sync_failed:
            self.telemetry.failure("gateway-sync")
        if not self._dedicated:
            return
        if full_sync:
            # The scheduled repair counts the claims themselves and puts the table's count
            # right (a pool changed in the configuration, a claim written by an older version).
            claimed = set(self.store.claimed_addresses())
            if run.claimed_count != len(claimed) and run.desired:
                self.store.set_claimed_count(len(claimed), run.desired)
            self.telemetry.measure("PoolFreeAddresses", len(self._pool - claimed), "Count")
        elif run.claimed_read is not None or run.pool_changed:
            # Known from this batch's own read of the claims, or from the count the mapping
            # writes keep on meta/generation; read once more only when neither is known.
            if run.claimed_read is not None:
                free = len(self._pool - run.claimed)
            elif run.claimed_count is not None:
                free = max(0, len(self._pool) - run.claimed_count)
            else:
                free = len(self._pool - set(self.store.claimed_addresses()))
            self.telemetry.measure("PoolFreeAddresses", free, "Count")

    def record_failure(self, instance_id: str, reason: str) -> None:
        """Mark an instance whose retries ran out, keeping what we know of its route."""
        _, record = self.store.snapshot(instance_id)
        self.store.put_record(
            InstanceRecord(
                instance_id,
                "failed",
                printable(reason)[:1000],
                route_installed=bool(record and record.route_installed),
                private_ip=record.private_ip if record else None,
                public_ip=record.public_ip if record else None,
            )
        )
