"""DynamoDB: what tunnelnat keeps per route table in route-table mode (same table as the mappings).

Item ``route-table/<rtb-id>``:
  vpc_id      the VPC
  members     string set: the instances enrolled behind this table (absent when none: DynamoDB
              has no empty sets)
  routes      map: partner network -> the ENI tunnelnat pointed it at (the routes it created)
  version     bumped by every write; every write is conditional on the version read
  updated_at  epoch seconds

Two workers serving instances behind one table therefore never lose each other's members, and a
worker that removed the last member and deleted the routes finds out, by its own conditional
delete failing, that someone joined meanwhile (and puts the routes back).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from botocore.exceptions import ClientError

from tunnelnat.adapters.store import StoreConflict

ROUTE_TABLE = "route-table"
BATCH_GET_MAX = 100


class RecordMoved(StoreConflict):
    """Another worker wrote the table's record since we read it: read again and re-decide."""


@dataclass(frozen=True)
class TableRecord:
    table_id: str
    vpc_id: str = ""
    members: frozenset[str] = frozenset()
    routes: Mapping[str, str] = field(default_factory=dict)
    version: int = 0  # 0: no item


def _key(table_id: str) -> dict:
    return {"pk": {"S": ROUTE_TABLE}, "sk": {"S": table_id}}


def _record(item: dict) -> TableRecord:
    return TableRecord(
        table_id=item["sk"]["S"],
        vpc_id=item.get("vpc_id", {}).get("S", ""),
        members=frozenset(item.get("members", {}).get("SS", [])),
        routes={k: v.get("S", "") for k, v in item.get("routes", {}).get("M", {}).items()},
        version=int(item.get("version", {}).get("N", "0")),
    )


class RouteTableRecords:
    def __init__(self, dynamodb_client: Any, table_name: str, *, clock: Any = time.time) -> None:
        self._db = dynamodb_client
        self._table = table_name
        self._clock = clock

    def all(self) -> dict[str, TableRecord]:
        """Every table's record (one Query: a VPC has tens of tables, not thousands)."""
        found: dict[str, TableRecord] = {}
        pages = self._db.get_paginator("query").paginate(
            TableName=self._table,
            KeyConditionExpression="pk = :pk",
            ExpressionAttributeValues={":pk": {"S": ROUTE_TABLE}},
            ConsistentRead=True,
        )
        for page in pages:
            for item in page["Items"]:
                record = _record(item)
                found[record.table_id] = record
        return found

    def get(self, table_id: str) -> TableRecord:
        """The table's record now (version 0 when there is none)."""
        reply = self._db.get_item(TableName=self._table, Key=_key(table_id), ConsistentRead=True)
        item = reply.get("Item")
        return _record(item) if item else TableRecord(table_id)

    def put(
        self,
        table_id: str,
        *,
        vpc_id: str,
        members: Iterable[str],
        routes: Mapping[str, str],
        version: int,
    ) -> TableRecord:
        """Write the record if it is still at ``version`` (0: there is none); the new record."""
        members = frozenset(members)
        item: dict[str, Any] = {
            **_key(table_id),
            "vpc_id": {"S": vpc_id},
            "routes": {"M": {d: {"S": eni} for d, eni in sorted(routes.items())}},
            "version": {"N": str(version + 1)},
            "updated_at": {"N": f"{self._clock():.3f}"},
        }
        if members:
            item["members"] = {"SS": sorted(members)}
        try:
            self._db.put_item(TableName=self._table, Item=item, **_condition(version))
        except ClientError as exc:
            _raise_moved(exc, table_id, version)
            raise
        return TableRecord(table_id, vpc_id, members, dict(routes), version + 1)

    def delete(self, table_id: str, *, version: int) -> None:
        """Forget the table (no members, no routes of ours) if it is still at ``version``."""
        if version == 0:
            return
        try:
            self._db.delete_item(TableName=self._table, Key=_key(table_id), **_condition(version))
        except ClientError as exc:
            _raise_moved(exc, table_id, version)
            raise


def _condition(version: int) -> dict[str, Any]:
    if version == 0:
        return {"ConditionExpression": "attribute_not_exists(pk)"}
    return {
        "ConditionExpression": "version = :v",
        "ExpressionAttributeValues": {":v": {"N": str(version)}},
    }


def _raise_moved(exc: ClientError, table_id: str, version: int) -> None:
    if exc.response["Error"]["Code"] == "ConditionalCheckFailedException":
        raise RecordMoved(f"{table_id}: its record moved past version {version}") from exc
