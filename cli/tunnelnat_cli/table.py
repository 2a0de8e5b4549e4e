"""Read-only views of the enrolment table (schema: ``tunnelnat.adapters.store``).

The CLI never writes the table: it reads what the controller and the gateway recorded. Items are
read with strongly consistent queries, one per partition (``instance``, ``mapping``, ``meta``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tunnelnat.adapters.store import INSTANCE, MAPPING, META


@dataclass(frozen=True)
class Record:
    """An ``instance/<id>`` item: what the controller last concluded."""

    instance_id: str
    status: str
    reason: str = ""
    route_installed: bool = False
    private_ip: str | None = None
    public_ip: str | None = None
    updated_at: float | None = None


@dataclass(frozen=True)
class Mapping:
    """A ``mapping/<id>`` item: what the gateway renders."""

    instance_id: str
    private_ip: str
    public_ip: str


@dataclass(frozen=True)
class Snapshot:
    records: dict[str, Record] = field(default_factory=dict)
    mappings: dict[str, Mapping] = field(default_factory=dict)
    desired_generation: int = 0
    applied_generation: int = 0
    applied_by: str | None = None  # the gateway instance that reported applied_generation
    applied_at: float | None = None
    meta: dict[str, dict] = field(default_factory=dict)  # raw meta/* items, by sort key


class TableReader:
    def __init__(self, dynamodb: Any, table: str) -> None:
        self._db = dynamodb
        self.table = table

    def query(self, pk: str) -> list[dict]:
        items: list[dict] = []
        pages = self._db.get_paginator("query").paginate(
            TableName=self.table,
            KeyConditionExpression="pk = :pk",
            ExpressionAttributeValues={":pk": {"S": pk}},
            ConsistentRead=True,
        )
        for page in pages:
            items.extend(page.get("Items", []))
        return items

    def get(self, pk: str, sk: str) -> dict | None:
        reply = self._db.get_item(
            TableName=self.table,
            Key={"pk": {"S": pk}, "sk": {"S": sk}},
            ConsistentRead=True,
        )
        return reply.get("Item")

    def record(self, instance_id: str) -> Record | None:
        item = self.get(INSTANCE, instance_id)
        return None if item is None else _record(item)

    def mapping(self, instance_id: str) -> Mapping | None:
        item = self.get(MAPPING, instance_id)
        return None if item is None else _mapping(item)

    def generations(self) -> tuple[int, int]:
        """``(desired, applied)``."""
        meta = {i["sk"]["S"]: i for i in self.query(META)}
        return _number(meta.get("generation"), "generation"), _number(
            meta.get("gateway"), "applied_generation"
        )

    def snapshot(self) -> Snapshot:
        records = {r.instance_id: r for r in map(_record, self.query(INSTANCE))}
        mappings = {m.instance_id: m for m in map(_mapping, self.query(MAPPING))}
        meta = {i["sk"]["S"]: i for i in self.query(META)}
        gateway = meta.get("gateway", {})
        return Snapshot(
            records=records,
            mappings=mappings,
            desired_generation=_number(meta.get("generation"), "generation"),
            applied_generation=_number(gateway, "applied_generation"),
            applied_by=_text(gateway, "gateway_instance_id"),
            applied_at=_float(gateway, "updated_at"),
            meta=meta,
        )


def _record(item: dict) -> Record:
    return Record(
        instance_id=item["sk"]["S"],
        status=_text(item, "status") or "unknown",
        reason=_text(item, "reason") or "",
        route_installed=bool(item.get("route_installed", {}).get("BOOL", False)),
        private_ip=_text(item, "private_ip"),
        public_ip=_text(item, "public_ip"),
        updated_at=_float(item, "updated_at"),
    )


def _mapping(item: dict) -> Mapping:
    return Mapping(
        instance_id=item["sk"]["S"],
        private_ip=_text(item, "private_ip") or "",
        public_ip=_text(item, "public_ip") or "",
    )


def _text(item: dict | None, name: str) -> str | None:
    if not item:
        return None
    value = item.get(name, {})
    return value.get("S") if isinstance(value, dict) else None


def _float(item: dict | None, name: str) -> float | None:
    if not item or "N" not in item.get(name, {}):
        return None
    return float(item[name]["N"])


def _number(item: dict | None, name: str) -> int:
    value = _float(item, name)
    return 0 if value is None else int(value)
