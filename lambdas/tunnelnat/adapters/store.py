"""DynamoDB: the one source of truth for mappings, address claims and generations.

Items (partition ``pk``, sort ``sk``):
  mapping/<instance-id>   private_ip, public_ip        what the gateway renders (it queries this)
  address/<ip>            instance_id                  a claim on a pool address
  instance/<instance-id>  status, reason, route, ...   what operators see
  meta/generation         generation                   bumped by every mapping change
  meta/gateway            applied_generation, gateway  what the gateway last reported
  meta/reconcile          request_id, handled_at, ...  the last reconcile request handled

Every mapping change, its address claim and the generation bump are one transaction, so the
gateway, which reads the generation before the mappings, never labels a table with a generation
newer than its contents; and two writers never claim one address.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any

from botocore.exceptions import ClientError

MAPPING, ADDRESS, INSTANCE, META, LEASE = "mapping", "address", "instance", "meta", "lease"


class StoreConflict(RuntimeError):
    """A concurrent writer won; re-read and try again (the caller's loop, or the queue's)."""


class InstanceBusy(StoreConflict):
    """Another worker is reconciling this instance right now; try again after it is done."""


class AddressTaken(StoreConflict):
    """The address we tried to claim belongs to another instance now."""


@dataclass(frozen=True)
class StoredMapping:
    instance_id: str
    private_ip: IPv4Address
    public_ip: IPv4Address


@dataclass(frozen=True)
class InstanceRecord:
    instance_id: str
    status: str
    reason: str
    route_installed: bool
    private_ip: str | None = None
    public_ip: str | None = None
    updated_at: float = 0.0


def _mapping(item: dict) -> StoredMapping:
    return StoredMapping(
        item["sk"]["S"], IPv4Address(item["private_ip"]["S"]), IPv4Address(item["public_ip"]["S"])
    )


def _record(item: dict) -> InstanceRecord:
    return InstanceRecord(
        instance_id=item["sk"]["S"],
        status=item["status"]["S"],
        reason=item.get("reason", {}).get("S", ""),
        route_installed=item.get("route_installed", {}).get("BOOL", False),
        private_ip=item.get("private_ip", {}).get("S"),
        public_ip=item.get("public_ip", {}).get("S"),
        updated_at=float(item.get("updated_at", {}).get("N", "0")),
    )


def _key(pk: str, sk: str) -> dict:
    return {"pk": {"S": pk}, "sk": {"S": sk}}


class EnrolmentStore:
    def __init__(self, dynamodb_client: Any, table_name: str, *, clock: Any = time.time) -> None:
        self._db = dynamodb_client
        self._table = table_name
        self._clock = clock

    @property
    def table_name(self) -> str:
        return self._table

    # -- reads -------------------------------------------------------------------------------
    def get_mapping(self, instance_id: str) -> StoredMapping | None:
        item = self._get(MAPPING, instance_id)
        return _mapping(item) if item else None

    def mappings(self) -> list[StoredMapping]:
        return [_mapping(i) for i in self._query(MAPPING)]

    def claimed_addresses(self) -> list[IPv4Address]:
        return [IPv4Address(i["sk"]["S"]) for i in self._query(ADDRESS)]

    def desired_generation(self) -> int:
        item = self._get(META, "generation")
        return int(item["generation"]["N"]) if item else 0

    def snapshot(self, instance_id: str) -> tuple[StoredMapping | None, InstanceRecord | None]:
        """The instance's mapping and record in one consistent BatchGetItem."""
        items = self._batch_get([_key(MAPPING, instance_id), _key(INSTANCE, instance_id)])
        mapping = items.get((MAPPING, instance_id))
        record = items.get((INSTANCE, instance_id))
        return (
            _mapping(mapping) if mapping else None,
            _record(record) if record else None,
        )

    def generations(self) -> tuple[int, int, str | None]:
        """Desired generation, applied generation and the gateway that applied it, in one call."""
        items = self._batch_get([_key(META, "generation"), _key(META, "gateway")])
        desired = items.get((META, "generation"))
        gateway = items.get((META, "gateway"))
        return (
            int(desired["generation"]["N"]) if desired else 0,
            int(gateway["applied_generation"]["N"]) if gateway else 0,
            gateway.get("gateway_instance_id", {}).get("S") if gateway else None,
        )

    def _batch_get(self, keys: list[dict]) -> dict[tuple[str, str], dict]:
        request = {self._table: {"Keys": keys, "ConsistentRead": True}}
        found: dict[tuple[str, str], dict] = {}
        while request:
            reply = self._db.batch_get_item(RequestItems=request)
            for item in reply.get("Responses", {}).get(self._table, []):
                found[(item["pk"]["S"], item["sk"]["S"])] = item
            request = reply.get("UnprocessedKeys") or {}
        return found

    def records(self) -> list[InstanceRecord]:
        return [_record(i) for i in self._query(INSTANCE)]

    def get_record(self, instance_id: str) -> InstanceRecord | None:
        item = self._get(INSTANCE, instance_id)
        return _record(item) if item else None

    def gateway_state(self) -> tuple[int, str | None]:
        """The generation the gateway last reported applying, and which gateway reported it."""
        _, applied, gateway = self.generations()
        return applied, gateway

    # -- writes ------------------------------------------------------------------------------
    def put_mapping(
        self,
        instance_id: str,
        private_ip: IPv4Address,
        public_ip: IPv4Address,
        *,
        claim: bool,
        previous: StoredMapping | None,
    ) -> int:
        """Write the mapping (claiming ``public_ip`` from the pool when ``claim``) and bump the
        generation, atomically. Returns the new generation."""
        generation = self.desired_generation()
        items: list[dict] = [
            {
                "Put": {
                    "TableName": self._table,
                    "Item": {
                        **_key(MAPPING, instance_id),
                        "private_ip": {"S": str(private_ip)},
                        "public_ip": {"S": str(public_ip)},
                        "generation": {"N": str(generation + 1)},
                    },
                }
            }
        ]
        if claim:
            items.append(self._claim(public_ip, instance_id))
        if previous is not None and previous.public_ip != public_ip:
            items.append(self._release(previous.public_ip, instance_id))
        items.append(self._bump(generation))
        self._transact(items, claimed=public_ip if claim else None)
        return generation + 1

    def delete_mapping(self, mapping: StoredMapping, *, release: bool) -> int:
        generation = self.desired_generation()
        items: list[dict] = [
            {
                "Delete": {
                    "TableName": self._table,
                    "Key": _key(MAPPING, mapping.instance_id),
                    "ConditionExpression": "public_ip = :ip",
                    "ExpressionAttributeValues": {":ip": {"S": str(mapping.public_ip)}},
                }
            }
        ]
        if release:
            items.append(self._release(mapping.public_ip, mapping.instance_id))
        items.append(self._bump(generation))
        self._transact(items)
        return generation + 1

    def acquire_lease(self, instance_id: str, owner: str, *, seconds: float = 300.0) -> None:
        """Serialise work on one instance across workers (as a workqueue does per key): a
        reconcile that read an older state can then never write after one that read a newer."""
        now = self._clock()
        try:
            self._db.put_item(
                TableName=self._table,
                Item={
                    **_key(LEASE, instance_id),
                    "owner": {"S": owner},
                    "expires": {"N": f"{now + seconds:.3f}"},
                },
                ConditionExpression="attribute_not_exists(pk) OR expires < :now OR #o = :me",
                ExpressionAttributeNames={"#o": "owner"},
                ExpressionAttributeValues={":now": {"N": f"{now:.3f}"}, ":me": {"S": owner}},
            )
        except ClientError as exc:
            if exc.response["Error"]["Code"] == "ConditionalCheckFailedException":
                raise InstanceBusy(f"{instance_id} is being reconciled by another worker") from exc
            raise

    def release_lease(self, instance_id: str, owner: str) -> None:
        try:
            self._db.delete_item(
                TableName=self._table,
                Key=_key(LEASE, instance_id),
                ConditionExpression="#o = :me",
                ExpressionAttributeNames={"#o": "owner"},
                ExpressionAttributeValues={":me": {"S": owner}},
            )
        except ClientError as exc:
            # Expired and taken over by another worker: theirs now, nothing to release.
            if exc.response["Error"]["Code"] != "ConditionalCheckFailedException":
                raise

    def record_applied(self, generation: int, gateway_id: str) -> None:
        """Remember what the gateway reported; never move the recorded generation backwards."""
        try:
            self._db.put_item(
                TableName=self._table,
                Item={
                    **_key(META, "gateway"),
                    "applied_generation": {"N": str(generation)},
                    "gateway_instance_id": {"S": gateway_id},
                    "updated_at": {"N": f"{self._clock():.3f}"},
                },
                ConditionExpression=(
                    "attribute_not_exists(applied_generation) OR applied_generation <= :g "
                    "OR gateway_instance_id <> :gw"
                ),
                ExpressionAttributeValues={":g": {"N": str(generation)}, ":gw": {"S": gateway_id}},
            )
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "ConditionalCheckFailedException":
                raise

    def put_record(self, record: InstanceRecord) -> None:
        item = {
            **_key(INSTANCE, record.instance_id),
            "status": {"S": record.status},
            "reason": {"S": record.reason},
            "route_installed": {"BOOL": record.route_installed},
            "updated_at": {"N": f"{self._clock():.3f}"},
        }
        if record.private_ip:
            item["private_ip"] = {"S": record.private_ip}
        if record.public_ip:
            item["public_ip"] = {"S": record.public_ip}
        self._db.put_item(TableName=self._table, Item=item)

    def record_reconcile(self, request_id: str, *, instances: int, failures: int) -> None:
        """Say that a reconcile request was handled (``tunnelnat reconcile --wait`` waits for it)."""
        self._db.put_item(
            TableName=self._table,
            Item={
                **_key(META, "reconcile"),
                "request_id": {"S": request_id},
                "handled_at": {"N": f"{self._clock():.3f}"},
                "instances": {"N": str(instances)},
                "failures": {"N": str(failures)},
            },
        )

    def delete_record(self, instance_id: str) -> None:
        self._db.delete_item(TableName=self._table, Key=_key(INSTANCE, instance_id))

    # -- helpers -----------------------------------------------------------------------------
    def _get(self, pk: str, sk: str) -> dict | None:
        reply = self._db.get_item(TableName=self._table, Key=_key(pk, sk), ConsistentRead=True)
        return reply.get("Item")

    def _query(self, pk: str) -> list[dict]:
        items: list[dict] = []
        pages = self._db.get_paginator("query").paginate(
            TableName=self._table,
            KeyConditionExpression="pk = :pk",
            ExpressionAttributeValues={":pk": {"S": pk}},
            ConsistentRead=True,
        )
        for page in pages:
            items.extend(page["Items"])
        return items

    def _claim(self, address: IPv4Address, instance_id: str) -> dict:
        return {
            "Put": {
                "TableName": self._table,
                "Item": {**_key(ADDRESS, str(address)), "instance_id": {"S": instance_id}},
                "ConditionExpression": "attribute_not_exists(pk) OR instance_id = :me",
                "ExpressionAttributeValues": {":me": {"S": instance_id}},
            }
        }

    def _release(self, address: IPv4Address, instance_id: str) -> dict:
        return {
            "Delete": {
                "TableName": self._table,
                "Key": _key(ADDRESS, str(address)),
                "ConditionExpression": "attribute_not_exists(pk) OR instance_id = :me",
                "ExpressionAttributeValues": {":me": {"S": instance_id}},
            }
        }

    def _bump(self, generation: int) -> dict:
        return {
            "Update": {
                "TableName": self._table,
                "Key": _key(META, "generation"),
                "UpdateExpression": "SET generation = :next",
                "ConditionExpression": "attribute_not_exists(generation) OR generation = :seen",
                "ExpressionAttributeValues": {
                    ":next": {"N": str(generation + 1)},
                    ":seen": {"N": str(generation)},
                },
            }
        }

    def _transact(self, items: list[dict], *, claimed: IPv4Address | None = None) -> None:
        try:
            self._db.transact_write_items(TransactItems=items)
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "TransactionCanceledException":
                raise
            reasons = [r.get("Code", "None") for r in exc.response.get("CancellationReasons", [])]
            if claimed is not None and len(reasons) > 1 and reasons[1] == "ConditionalCheckFailed":
                raise AddressTaken(f"address {claimed} was claimed by another instance") from exc
            raise StoreConflict(f"concurrent change, transaction cancelled: {reasons}") from exc
