"""The heart: ``reconcile(instance_id)`` drives one instance, and the gateway, to what it should be.

Level-triggered: whatever event led here, the controller reads the instance's real state from
EC2 and the stored state from DynamoDB, decides, writes the desired state, then makes the instance
and the gateway match it. Running it twice changes nothing the second time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Protocol

from tunnelnat.adapters.commands import CommandError, CommandPort
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


class InstanceSource(Protocol):
    def describe(self, instance_id: str) -> ObservedInstance | None: ...

    def find_gateway(self, deployment: str) -> str: ...


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
        return {k: v for k, v in self.__dict__.items() if v is not None}


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

    # -- the one path every event leads to ---------------------------------------------------
    def reconcile(self, instance_id: str) -> Outcome:
        instance = self.instances.describe(instance_id)
        decision = decide_enrolment(instance, self.config)
        mapping = self.store.get_mapping(instance_id)
        record = self.store.get_record(instance_id)
        if decision.enrol:
            assert instance is not None
            return self._enrol(instance, mapping)
        if mapping is None and record is None and decision.status in UNMANAGED:
            # Never ours: an event about some other instance. Nothing to write, nothing to undo.
            return Outcome(instance_id, decision.status, decision.reason, managed=False)
        return self._unenrol(instance_id, instance, decision, mapping, record)

    # -- enrol -------------------------------------------------------------------------------
    def _enrol(self, instance: ObservedInstance, mapping: StoredMapping | None) -> Outcome:
        assert instance.private_ip is not None
        for _ in range(STORE_ATTEMPTS):
            claimed = [] if mapping is not None else self._claimed()
            address = public_address_for(
                instance,
                self.config,
                current=mapping.public_ip if mapping else None,
                claimed=claimed,
            )
            if address is None:
                self.telemetry.count("PoolExhausted")
                reason = f"all {len(self.config.address_pool)} pool addresses are in use"
                self._record(instance, Status.POOL_EXHAUSTED, reason, route=False)
                return Outcome(instance.instance_id, Status.POOL_EXHAUSTED, reason)
            if (
                mapping is not None
                and mapping.private_ip == instance.private_ip
                and mapping.public_ip == address
            ):
                break
            try:
                self.store.put_mapping(
                    instance.instance_id,
                    instance.private_ip,
                    address,
                    claim=self.config.nat_mode is NatMode.DEDICATED,
                    previous=mapping,
                )
                mapping = StoredMapping(instance.instance_id, instance.private_ip, address)
                break
            except (AddressTaken, StoreConflict):
                mapping = self.store.get_mapping(instance.instance_id)
        else:
            raise StoreConflict(f"{instance.instance_id}: gave up after {STORE_ATTEMPTS} conflicts")
        assert mapping is not None
        generation = self.store.desired_generation()
        synced = self._sync_gateway(generation)
        self._run(instance.instance_id, "AddHostRoute", self._route_parameters())
        self._record(
            instance, Status.ENROLLED, "route and NAT in place", route=True, mapping=mapping
        )
        self.telemetry.count("Enrolments")
        return Outcome(
            instance.instance_id,
            Status.ENROLLED,
            "route and NAT in place",
            public_ip=str(mapping.public_ip),
            generation=generation,
            gateway_synced=synced,
        )

    # -- unenrol -----------------------------------------------------------------------------
    def _unenrol(
        self,
        instance_id: str,
        instance: ObservedInstance | None,
        decision: Decision,
        mapping: StoredMapping | None,
        record: InstanceRecord | None,
    ) -> Outcome:
        route = bool(record and record.route_installed)
        if route and instance is not None and instance.state == "running":
            self._run(instance_id, "RemoveHostRoute", self._route_parameters())
            route = False
        elif instance is None or instance.state == "terminated":
            route = False  # gone with the instance
        # A stopped instance keeps its route file; we stay responsible and remove it at start.
        generation = None
        if mapping is not None:
            try:
                self.store.delete_mapping(
                    mapping, release=self.config.nat_mode is NatMode.DEDICATED
                )
            except StoreConflict:
                if self.store.get_mapping(instance_id) is not None:
                    raise
        generation = self.store.desired_generation()
        synced = self._sync_gateway(generation)
        if decision.status is Status.GONE or (not route and decision.status is Status.NOT_TAGGED):
            # Nothing of ours is left on it: forget it rather than keep a row per past instance.
            self.store.delete_record(instance_id)
        else:
            self.store.put_record(
                InstanceRecord(
                    instance_id,
                    decision.status.value,
                    decision.reason,
                    route_installed=route,
                    private_ip=_text(instance.private_ip if instance else None),
                )
            )
        if mapping is not None:
            self.telemetry.count("Unenrolments")
        return Outcome(
            instance_id,
            decision.status,
            decision.reason,
            generation=generation,
            gateway_synced=synced,
        )

    # -- the gateway ---------------------------------------------------------------------------
    def sync_gateway(self, *, full: bool = False) -> dict[str, Any]:
        """Ask the gateway to pull and apply the newest table; returns what it reported."""
        gateway = self.instances.find_gateway(self.deployment)
        result = self._run(
            gateway,
            "SyncNatTable",
            {
                "TableName": self.store.table_name,
                "Region": self.region,
                "Full": "true" if full else "false",
            },
        )
        report = _last_json_line(result.stdout)
        applied = int(report.get("applied_generation", -1))
        if applied >= 0:
            self.store.record_applied(applied, gateway)
        self.telemetry.count("GatewaySyncs")
        return report

    def _sync_gateway(self, generation: int) -> bool:
        # The gateway pulls the newest table, so a sync is needed only while it is behind; any
        # sync in flight already carries every change made before it read the table.
        if self.store.applied_generation() >= generation:
            return False
        report = self.sync_gateway()
        if int(report.get("applied_generation", -1)) < generation:
            raise CommandError(f"gateway applied {report} but generation {generation} is desired")
        return True

    # -- helpers -------------------------------------------------------------------------------
    def _claimed(self) -> list:
        if self.config.nat_mode is not NatMode.DEDICATED:
            return []
        return self.store.claimed_addresses()

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
            raise CommandError(f"{instance_id}: {document} {result.status}: {detail}")
        return result

    def _record(
        self,
        instance: ObservedInstance,
        status: Status,
        reason: str,
        *,
        route: bool,
        mapping: StoredMapping | None = None,
    ) -> None:
        self.store.put_record(
            InstanceRecord(
                instance.instance_id,
                status.value,
                reason,
                route_installed=route,
                private_ip=_text(instance.private_ip),
                public_ip=_text(mapping.public_ip if mapping else None),
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
