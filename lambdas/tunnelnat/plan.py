"""What one ``converge`` call carries between its phases, and the pure helpers around it: the
per-instance plan, the run, the outcome, and how a batch's mapping writes are cut into
transactions. No AWS here (controller.py does the calls)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Any

from tunnelnat.adapters.commands import AgentNotReady, CommandError
from tunnelnat.adapters.store import (
    ADDRESS,
    LEASE,
    MAPPING,
    MAPPING_ITEMS_MAX,
    PRIVATE,
    InstanceRecord,
    Snapshot,
    StoreConflict,
    StoredMapping,
)
from tunnelnat.core.enrolment import Decision, ObservedInstance, Status
from tunnelnat.gateway_sync import GatewaySyncFailed, GatewaySyncPending

# Items per transaction, the generation bump, its change-log entry and the sync lease aside
# (DynamoDB's limit is 100): a mapping change is up to 5 (the mapping, a claim and a release of
# its public and of its private address).
TRANSACTION_ITEMS = MAPPING_ITEMS_MAX


@dataclass(frozen=True)
class Outcome:
    instance_id: str
    status: str
    reason: str
    public_ip: str | None = None
    generation: int | None = None
    gateway_synced: bool = False
    managed: bool = True
    # True when this run brought the instance to enrolled (it was not before): what the
    # Enrolments count and the EnrolmentLatency metric are about.
    newly_enrolled: bool = False
    # A several-partner deployment: each partner's own outcome (name -> its as_dict without
    # the instance), the fields above summing them up (partner_lanes.combine).
    partners: dict[str, dict[str, Any]] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            k: str(v) if k == "status" else v for k, v in self.__dict__.items() if v is not None
        }


@dataclass
class Plan:
    """One instance between phase 1 and phase 3."""

    instance_id: str
    instance: ObservedInstance | None
    decision: Decision
    mapping: StoredMapping | None  # the mapping it should have (None: none)
    route: bool  # is our route on the instance now
    record: InstanceRecord | None = None  # as stored before this run
    previous: StoredMapping | None = None  # the mapping as stored
    remove_route: bool = False
    claim_missing: bool = False  # a mapping stored before private addresses were claimed
    holds_private: bool = True  # the previous mapping's private address is claimed by it
    # Route-table mode: the tables whose record counts it now, and the one that should.
    tables: set[str] = field(default_factory=set)
    table: str | None = None
    leave_tables: bool = False  # leave them all before its mapping goes (phase 1)
    # Its instance lease is still to be taken: with its mapping write (conditional on the
    # lease's epoch as read), or alone when no write takes it along.
    lease_pending: bool = True

    @property
    def needs_write(self) -> bool:
        if self.decision.status is Status.POOL_EXHAUSTED:
            return False  # keeps whatever it has; nothing to claim
        if self.claim_missing and self.mapping is not None:
            return True
        if self.mapping is None or self.previous is None:
            return self.mapping is not self.previous
        return (self.mapping.private_ip, self.mapping.public_ip) != (
            self.previous.private_ip,
            self.previous.public_ip,
        )


@dataclass
class Run:
    """What one ``converge`` call carries between its phases."""

    owner: str
    leased: list[str] = field(default_factory=list)
    batch: set[str] = field(default_factory=set)  # the instances this run reads and plans
    # Each instance's lease epoch as first read (before it was observed): every take of its
    # lease, alone or with a mapping write, is conditional on it.
    lease_epochs: dict[str, int | None] = field(default_factory=dict)
    # Pool addresses claimed, valid at ``desired`` (None: not known; counted by a Query).
    claimed_count: int | None = None
    # An address was picked without reading the claims (controller._candidate): a conflict
    # then reads them and takes the lowest free one before spreading at random.
    guessed: bool = False
    snapshot: Snapshot | None = None
    desired: int = 0
    claimed_read: set[IPv4Address] | None = None
    claimed: set[IPv4Address] = field(default_factory=set)
    records: dict[str, InstanceRecord] = field(default_factory=dict)
    forget: set[str] = field(default_factory=set)
    tags: dict[str, tuple[ObservedInstance, str]] = field(default_factory=dict)
    pool_changed: bool = False
    contended: bool = False  # a mapping write lost to another worker's
    routes: Any = None  # the batch's route tables and their records (route_sync.RouteBatch)
    # The gateway sync lease, taken in a mapping transaction (the sync then needs no call to
    # take it), and whether it was found taken by another worker's sync meanwhile.
    sync_leased: bool = False
    sync_busy: bool = False
    sync_handed: bool = False  # GatewaySync.converge owns the lease now (it lets go)
    # A good sync's lease release, written with the run's last write (EnrolmentStore.finish).
    sync_release: Any = None  # gateway_sync.SyncRelease
    # pool-exhausted's list of who holds the pool's addresses (read once per batch).
    pool_holders: str | None = None
    # Pool addresses this batch picked, and for whom (before its mapping write).
    picked: dict[IPv4Address, str] = field(default_factory=dict)


def failure_reason(result: Outcome | Exception) -> str | None:
    if isinstance(result, Outcome):
        if result.status is Status.POOL_EXHAUSTED:
            return "pool-exhausted"
        if result.status is Status.UNSUPPORTED_SUBNET:
            return "unsupported-subnet"
        if result.status is Status.CONFLICT:
            return "conflict"
        if result.status is Status.ROUTE_CONFLICT:
            return "route-conflict"
        if result.status is Status.NOT_ALLOWED:
            return "not-allowed"
        if result.status is Status.ROUTE_TABLE_NOT_OPTED_IN:
            return "route-table-not-opted-in"
        return None
    if isinstance(result, GatewaySyncPending):
        return None  # coalescing, not a failure
    if isinstance(result, GatewaySyncFailed) or getattr(result, "gateway_sync", False):
        return "gateway-sync"
    if isinstance(result, AgentNotReady):
        return "agent-not-ready"
    if isinstance(result, CommandError):
        return "command-failed"
    if isinstance(result, StoreConflict):
        return "store-conflict"
    return None


def comparable(record: InstanceRecord) -> tuple:
    return (record.status, record.reason, record.route_installed, record.private_ip,
            record.public_ip)  # fmt: skip


def as_text(value: object | None) -> str | None:
    return None if value is None else str(value)


def conflict(private_ip: object, holder: str) -> Decision:
    return Decision(
        False,
        Status.CONFLICT,
        f"private address {private_ip} is mapped for {holder} already; one of them must go "
        "(another VPC, or an address reused before the old mapping was removed)",
    )


def conflicted(chunk: list[Plan], taken: dict[str, tuple[str, str]]) -> list[Plan]:
    """The chunk after some of its instances lost their private address: each becomes a
    conflict, kept only when it still has a mapping of its own to give up."""
    again: list[Plan] = []
    for plan in chunk:
        if plan.instance_id in taken:
            private_ip, holder = taken[plan.instance_id]
            plan.decision = conflict(private_ip, holder)
            plan.mapping = None
            plan.claim_missing = False
        if plan.needs_write:
            again.append(plan)
    return again


def touched_items(plan: Plan) -> set[tuple[str, str]]:
    """The table items a plan's write touches (a transaction may touch each only once): its
    mapping, its lease, and the addresses it claims or lets go of."""
    keys = {(MAPPING, plan.instance_id), (LEASE, plan.instance_id)}
    for mapping in (plan.mapping, plan.previous):
        if mapping is not None:
            keys |= {(PRIVATE, str(mapping.private_ip)), (ADDRESS, str(mapping.public_ip))}
    return keys


def transactions(pending: list[Plan]) -> list[list[Plan]]:
    """The batch's writes in as few transactions as fit, each touching an item at most once.
    Removals go first and a write that touches an item an earlier one touched goes in a later
    transaction: an address one instance lets go of is free when the next one claims it."""
    ordered = sorted(pending, key=lambda p: p.mapping is not None)
    chunks: list[tuple[list[Plan], set[tuple[str, str]]]] = []
    for plan in ordered:
        keys = touched_items(plan)
        after = max((i for i, (_, used) in enumerate(chunks) if used & keys), default=-1)
        for plans, used in chunks[after + 1 :]:
            if len(used) + len(keys) <= TRANSACTION_ITEMS:
                plans.append(plan)
                used |= keys
                break
        else:
            chunks.append(([plan], set(keys)))
    return [plans for plans, _ in chunks]


def private_ips(instances: Iterable[ObservedInstance]) -> list[IPv4Address]:
    return [i.private_ip for i in instances if i.private_ip is not None]


def holds_private(snap: Snapshot, instance_id: str, mapping: StoredMapping | None) -> bool:
    return mapping is not None and snap.private_claims.get(str(mapping.private_ip)) == instance_id
