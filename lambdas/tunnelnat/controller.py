"""The heart: drive instances, and the gateway, to what they should be.

Level-triggered: whatever event led here, the controller reads the instances' real state from EC2
and the stored state from DynamoDB, decides, writes the desired state, then makes the instances and
the gateway match it. Running it twice changes nothing the second time.

``converge`` works in three phases so a batch of instances costs one gateway sync, not one each:
1. per instance: observe, decide, write the desired mapping (or remove a route and the mapping);
2. once: if the gateway is behind the desired generation, it pulls and applies the newest table;
3. per instance: add the route, record the status.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from tunnelnat.adapters.commands import AgentNotReady, CommandError, CommandPort
from tunnelnat.adapters.store import (
    AddressTaken,
    EnrolmentStore,
    InstanceRecord,
    StoreConflict,
    StoredMapping,
)
from tunnelnat.core.config import NatMode, TunnelnatConfig
from tunnelnat.core.enrolment import (
    Decision,
    ObservedInstance,
    Status,
    decide_enrolment,
    public_address_for,
)

STORE_ATTEMPTS = 5
# Without the enrolment tag an instance is none of our business unless we enrolled it before.
UNMANAGED = (Status.NOT_TAGGED, Status.GONE, Status.IS_GATEWAY)
PENDING_SSM = "pending-ssm"
TERMINATING = "terminating"


class InstanceSource(Protocol):
    def describe(self, instance_id: str) -> ObservedInstance | None: ...

    def describe_many(self, instance_ids: Iterable[str]) -> dict[str, ObservedInstance]: ...

    def tagged(self, tag_key: str) -> dict[str, ObservedInstance]: ...

    def find_gateway(self, deployment: str) -> str: ...

    def set_status_tag(self, instance: ObservedInstance, status: str) -> None: ...


class Telemetry(Protocol):
    def count(self, name: str, value: float = 1) -> None: ...


class NoTelemetry:
    def count(self, name: str, value: float = 1) -> None:
        return None


@dataclass(frozen=True)
class Outcome:
    instance_id: str
    status: str
    reason: str
    public_ip: str | None = None
    generation: int | None = None
    gateway_synced: bool = False
    managed: bool = True

    def as_dict(self) -> dict[str, Any]:
        return {
            k: str(v) if k == "status" else v for k, v in self.__dict__.items() if v is not None
        }


@dataclass
class _Plan:
    """One instance between phase 1 and phase 3."""

    instance_id: str
    instance: ObservedInstance | None
    decision: Decision
    mapping: StoredMapping | None
    route: bool  # is our route on the instance now


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
    ) -> None:
        self.config = config
        self.store = store
        self.instances = instances
        self.commands = commands
        self.deployment = deployment
        self.region = region
        self.telemetry = telemetry or NoTelemetry()
        self._gateway: str | None = None

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
        return self.converge(sorted(ids), full_sync=True)

    def converge(
        self,
        instance_ids: Iterable[str],
        *,
        terminating: Iterable[str] = (),
        full_sync: bool = False,
    ) -> dict[str, Outcome | Exception]:
        """Converge many instances with at most one gateway sync. Each instance's result is its
        Outcome or the exception that stopped it; one instance's failure never stops another's."""
        owner = uuid.uuid4().hex
        leased: list[str] = []
        try:
            return self._converge(instance_ids, set(terminating), full_sync, owner, leased)
        finally:
            for instance_id in leased:
                self.store.release_lease(instance_id, owner)

    def _converge(
        self,
        instance_ids: Iterable[str],
        ending: set[str],
        full_sync: bool,
        owner: str,
        leased: list[str],
    ) -> dict[str, Outcome | Exception]:
        results: dict[str, Outcome | Exception] = {}
        for instance_id in dict.fromkeys(instance_ids):
            try:
                self.store.acquire_lease(instance_id, owner)
                leased.append(instance_id)
            except Exception as exc:  # noqa: BLE001 - reported per instance, retried by the queue
                results[instance_id] = exc
        # Observe only under the leases (what we read can no longer be overtaken by another
        # worker), and in one call per 1,000 instances.
        observed = self.instances.describe_many(leased) if leased else {}
        plans: list[_Plan] = []
        for instance_id in leased:
            try:
                plan = self._plan(
                    instance_id, observed.get(instance_id), terminating=instance_id in ending
                )
            except Exception as exc:  # noqa: BLE001
                results[instance_id] = exc
                continue
            if isinstance(plan, Outcome):
                results[instance_id] = plan
            else:
                plans.append(plan)
        synced = False
        generation: int | None = None
        sync_error: Exception | None = None
        if plans or full_sync:
            try:
                synced, generation = self._sync_gateway(full=full_sync)
            except Exception as exc:  # noqa: BLE001
                sync_error = exc
        for plan in plans:
            if sync_error is not None:
                results[plan.instance_id] = sync_error
                continue
            try:
                results[plan.instance_id] = self._finish(plan, generation, synced)
            except Exception as exc:  # noqa: BLE001
                results[plan.instance_id] = exc
        return results

    # -- phase 1 -----------------------------------------------------------------------------
    def _plan(
        self, instance_id: str, instance: ObservedInstance | None, *, terminating: bool
    ) -> _Plan | Outcome:
        decision = decide_enrolment(instance, self.config)
        if terminating:
            decision = Decision(False, Status.GONE, "Auto Scaling is terminating the instance")
        mapping, record = self.store.snapshot(instance_id)
        if not decision.enrol and mapping is None and record is None:
            if decision.status in UNMANAGED:
                # Never ours: an event about some other instance. Nothing to write or undo.
                return Outcome(instance_id, decision.status, decision.reason, managed=False)
        route = bool(record and record.route_installed)
        if decision.enrol:
            assert instance is not None
            mapping = self._desire_mapping(instance, mapping)
            if mapping is None:
                reason = f"all {len(self.config.address_pool)} pool addresses are in use"
                self.telemetry.count("PoolExhausted")
                decision = Decision(False, Status.POOL_EXHAUSTED, reason)
                self._record(instance_id, instance, decision.status, reason, route=route)
                if route and instance.state == "running":
                    self._run(instance_id, "RemoveHostRoute", self._route_parameters())
                    self._record(instance_id, instance, decision.status, reason, route=False)
                return Outcome(instance_id, decision.status, reason)
            return _Plan(instance_id, instance, decision, mapping, route)
        # Not to be enrolled: stop its traffic first (route), then forget its mapping.
        if route and instance is not None and instance.state == "running" and not terminating:
            self._run(instance_id, "RemoveHostRoute", self._route_parameters())
            route = False
        elif instance is None or instance.state == "terminated" or terminating:
            route = False  # gone with the instance
        # A stopped instance keeps its route file; we stay responsible and remove it at start.
        if mapping is not None:
            try:
                self.store.delete_mapping(mapping, release=self._dedicated)
            except StoreConflict:
                if self.store.get_mapping(instance_id) is not None:
                    raise
            self.telemetry.count("Unenrolments")
        return _Plan(instance_id, instance, decision, None, route)

    def _desire_mapping(
        self, instance: ObservedInstance, mapping: StoredMapping | None
    ) -> StoredMapping | None:
        assert instance.private_ip is not None
        for _ in range(STORE_ATTEMPTS):
            claimed = self.store.claimed_addresses() if self._dedicated and not mapping else []
            address = public_address_for(
                instance,
                self.config,
                current=mapping.public_ip if mapping else None,
                claimed=claimed,
            )
            if address is None:
                return None
            if mapping and (mapping.private_ip, mapping.public_ip) == (
                instance.private_ip,
                address,
            ):
                return mapping
            try:
                self.store.put_mapping(
                    instance.instance_id,
                    instance.private_ip,
                    address,
                    claim=self._dedicated,
                    previous=mapping,
                )
                return StoredMapping(instance.instance_id, instance.private_ip, address)
            except (AddressTaken, StoreConflict):
                self.telemetry.count("StoreConflicts")
                mapping = self.store.get_mapping(instance.instance_id)
        raise StoreConflict(f"{instance.instance_id}: gave up after {STORE_ATTEMPTS} conflicts")

    # -- phase 3 -----------------------------------------------------------------------------
    def _finish(self, plan: _Plan, generation: int | None, synced: bool) -> Outcome:
        instance, decision = plan.instance, plan.decision
        if decision.enrol:
            assert instance is not None and plan.mapping is not None
            try:
                self._run(plan.instance_id, "AddHostRoute", self._route_parameters())
            except AgentNotReady as exc:
                self._record(plan.instance_id, instance, PENDING_SSM, str(exc), route=plan.route)
                raise
            reason = "route and NAT in place"
            self._record(
                plan.instance_id,
                instance,
                Status.ENROLLED,
                reason,
                route=True,
                mapping=plan.mapping,
            )
            self.telemetry.count("Enrolments")
            return Outcome(
                plan.instance_id,
                Status.ENROLLED,
                reason,
                public_ip=str(plan.mapping.public_ip),
                generation=generation,
                gateway_synced=synced,
            )
        if decision.status is Status.GONE or (not plan.route and decision.status in UNMANAGED):
            # Nothing of ours is left on it: forget it rather than keep a row per past instance.
            self.store.delete_record(plan.instance_id)
            if instance is not None and decision.status is Status.NOT_TAGGED:
                self.instances.set_status_tag(instance, "not-enrolled")
        else:
            self._record(plan.instance_id, instance, decision.status, decision.reason, plan.route)
        return Outcome(
            plan.instance_id,
            decision.status,
            decision.reason,
            generation=generation,
            gateway_synced=synced,
        )

    # -- the gateway ---------------------------------------------------------------------------
    def gateway_id(self, *, refresh: bool = False) -> str:
        """The gateway's instance ID, looked up once per container and again when it may have
        changed (a full reconcile, or a command the old one could not take)."""
        if refresh or self._gateway is None:
            self._gateway = self.instances.find_gateway(self.deployment)
        return self._gateway

    def sync_gateway(self, *, full: bool = False, gateway: str | None = None) -> dict[str, Any]:
        """Ask the gateway to pull and apply the newest table; returns what it reported."""
        gateway = gateway or self.gateway_id()
        parameters = {
            "TableName": self.store.table_name,
            "Region": self.region,
            "Full": "true" if full else "false",
        }
        try:
            result = self._run(gateway, "SyncNatTable", parameters)
        except AgentNotReady:
            # Replaced since we looked it up? Ask EC2 again; the queue retries if it is the same.
            fresh = self.gateway_id(refresh=True)
            if fresh == gateway:
                raise
            gateway = fresh
            result = self._run(gateway, "SyncNatTable", parameters)
        report = _last_json_line(result.stdout)
        applied = int(report.get("applied_generation", -1))
        if applied >= 0:
            self.store.record_applied(applied, gateway)
        self.telemetry.count("GatewaySyncs")
        return report

    def _sync_gateway(self, *, full: bool = False) -> tuple[bool, int]:
        # The gateway pulls the newest table, so one sync covers every change written before it
        # starts; none is needed while the gateway reports the desired generation already.
        desired, applied, _ = self.store.generations()
        if not full and applied >= desired:
            return False, desired
        gateway = self.gateway_id(refresh=full) if full else None
        report = self.sync_gateway(full=full, gateway=gateway)
        if int(report.get("applied_generation", -1)) < desired:
            raise CommandError(f"gateway reported {report}, but generation {desired} is desired")
        return True, desired

    # -- helpers -------------------------------------------------------------------------------
    @property
    def _dedicated(self) -> bool:
        return self.config.nat_mode is NatMode.DEDICATED

    def _route_parameters(self) -> dict[str, str]:
        return {
            "Destinations": ",".join(str(n) for n in self.config.partner_networks),
            "Gateway": str(self.config.gateway_private_ip),
        }

    def _run(self, instance_id: str, document: str, parameters: dict[str, str]) -> Any:
        result = self.commands.run(instance_id, document, parameters)
        if not result.ok:
            self.telemetry.count("CommandFailures")
            detail = (result.stderr or result.stdout).strip()[-300:]
            if result.status in ("Undeliverable", "DeliveryTimedOut"):
                raise AgentNotReady(f"{instance_id}: {document} {result.status}: {detail}")
            raise CommandError(f"{instance_id}: {document} {result.status}: {detail}")
        return result

    def _record(
        self,
        instance_id: str,
        instance: ObservedInstance | None,
        status: str,
        reason: str,
        route: bool,
        *,
        mapping: StoredMapping | None = None,
    ) -> None:
        self.store.put_record(
            InstanceRecord(
                instance_id,
                str(status),
                reason,
                route_installed=route,
                private_ip=_text(instance.private_ip if instance else None),
                public_ip=_text(mapping.public_ip if mapping else None),
            )
        )
        if instance is not None and instance.state not in ("terminated", "shutting-down"):
            self.instances.set_status_tag(instance, str(status))

    def record_failure(self, instance_id: str, reason: str) -> None:
        """Mark an instance whose retries ran out, keeping what we know of its route."""
        _, record = self.store.snapshot(instance_id)
        self.store.put_record(
            InstanceRecord(
                instance_id,
                "failed",
                reason[:1000],
                route_installed=bool(record and record.route_installed),
                private_ip=record.private_ip if record else None,
                public_ip=record.public_ip if record else None,
            )
        )


def _text(value: object | None) -> str | None:
    return None if value is None else str(value)


def _last_json_line(text: str) -> dict[str, Any]:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return {}
