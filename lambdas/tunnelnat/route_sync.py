"""Route-table mode's side of the controller: keep each route table that serves enrolled
instances sending the partner's networks to the gateway's ENI, and only those tables.

Per batch (``RouteTableSync.begin``): one Query reads every table's record, one
DescribeRouteTables reads the VPC's tables, both only when an instance of the batch may be in
route-table mode. Per table, the batch's joins and leaves are applied together: one record write
and the route calls the table needs (one route per partner network per table, never per
instance). What to do is decided in ``core/routes.py``.

Concurrency: every record write is conditional on the version read, and the record is written
before a route is created and after one is deleted. A worker that loses a write reads the record
and the table again and decides again; one that removed the last member and deleted the routes
learns from its own conditional delete failing that someone joined meanwhile, and puts them back.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from aws_lambda_powertools import Logger

from tunnelnat.adapters.route_records import RecordMoved, TableRecord
from tunnelnat.adapters.routes import RouteExists
from tunnelnat.adapters.store import StoreConflict
from tunnelnat.core.routes import (
    RouteConflict,
    RouteTableView,
    TableChanges,
    opted_in,
    plan_table,
    table_for_subnet,
)
from tunnelnat.telemetry import Telemetry

logger = Logger(service="tunnelnat", child=True)

# Reads and writes of one table's record before its instances go back to the queue.
TABLE_ATTEMPTS = 5


class RoutePort(Protocol):
    def tables(
        self, vpc_id: str, table_ids: Iterable[str] | None = None
    ) -> dict[str, RouteTableView]: ...

    def create(self, table_id: str, destination: str, eni: str) -> None: ...

    def replace(self, table_id: str, destination: str, eni: str) -> None: ...

    def delete(self, table_id: str, destination: str) -> None: ...


class RecordPort(Protocol):
    def all(self) -> dict[str, TableRecord]: ...

    def get(self, table_id: str) -> TableRecord: ...

    def put(
        self,
        table_id: str,
        *,
        vpc_id: str,
        members: Iterable[str],
        routes: Mapping[str, str],
        version: int,
    ) -> TableRecord: ...

    def delete(self, table_id: str, *, version: int) -> None: ...


@dataclass(frozen=True)
class TableOutcome:
    """What became of the tables an instance joined or left."""

    table_id: str | None  # the table serving it now (None: it only left)
    conflicts: tuple[RouteConflict, ...] = ()
    routes: tuple[str, ...] = ()  # the partner networks this table sends to the gateway


class RouteTableSync:
    def __init__(
        self,
        *,
        routes: RoutePort,
        records: RecordPort,
        vpc_id: str,
        eni: str,
        destinations: Iterable[str],
        telemetry: Telemetry,
        deployment: str,
        listed: Iterable[str] = (),
    ) -> None:
        self.routes = routes
        self.records = records
        self.vpc_id = vpc_id
        self.eni = eni
        self.destinations = tuple(str(d) for d in destinations)
        self.telemetry = telemetry
        # Tables the network owner opted in: tagged tunnelnat:routes=<deployment>, or listed.
        self.deployment = deployment
        self.listed = frozenset(listed)

    def opted_in(self, table: RouteTableView) -> bool:
        return opted_in(table, self.deployment, self.listed)

    def begin(self) -> RouteBatch:
        """A view of the records and tables for one batch (read lazily, at most once each)."""
        return RouteBatch(self)


class RouteBatch:
    def __init__(self, sync: RouteTableSync) -> None:
        self.sync = sync
        self._records: dict[str, TableRecord] | None = None
        self._tables: dict[str, RouteTableView] | None = None
        self._members: dict[str, set[str]] | None = None

    # -- reads ---------------------------------------------------------------------------------
    def records(self) -> dict[str, TableRecord]:
        if self._records is None:
            self._records = self.sync.records.all()
        return self._records

    def tables(self) -> dict[str, RouteTableView]:
        if self._tables is None:
            # Records first: a route another worker created after this read has its intent in
            # a record newer than ours, so our conditional write catches the difference.
            self.records()
            self._tables = self.sync.routes.tables(self.sync.vpc_id)
        return self._tables

    def memberships(self, instance_id: str) -> set[str]:
        """The tables whose record counts ``instance_id`` as enrolled behind them."""
        if self._members is None:
            self._members = {}
            for record in self.records().values():
                for member in record.members:
                    self._members.setdefault(member, set()).add(record.table_id)
        return set(self._members.get(instance_id, ()))

    def table_for(self, subnet_id: str | None) -> str | None:
        if not subnet_id:
            return None
        return table_for_subnet(subnet_id, self.tables().values())

    def opted_in(self, table_id: str) -> bool:
        view = self.tables().get(table_id)
        return view is not None and self.sync.opted_in(view)

    def conflicts(self, table_id: str) -> tuple[RouteConflict, ...]:
        """What would keep an instance joining ``table_id`` from being served: routes equal to,
        inside or around a partner network that are not ours (read before anything is
        written, so an instance that cannot be served never takes a pool address)."""
        view = self.tables().get(table_id)
        if view is None:
            return ()
        record = self.records().get(table_id) or TableRecord(table_id)
        sync = self.sync
        return plan_table(
            view, members={"joining"}, owned=record.routes, destinations=sync.destinations,
            eni=sync.eni,
        ).conflicts  # fmt: skip

    # -- writes --------------------------------------------------------------------------------
    def apply(
        self, joins: Mapping[str, str], leaves: Mapping[str, Iterable[str]]
    ) -> dict[str, TableOutcome | Exception]:
        """Each instance of ``joins`` counted behind its table, each of ``leaves`` no longer
        behind those tables; every table touched gets the routes its members need."""
        by_table: dict[str, tuple[set[str], set[str]]] = {}
        for instance_id, table_id in joins.items():
            by_table.setdefault(table_id, (set(), set()))[0].add(instance_id)
        for instance_id, table_ids in leaves.items():
            for table_id in table_ids:
                by_table.setdefault(table_id, (set(), set()))[1].add(instance_id)
        results: dict[str, TableOutcome | Exception] = {}
        for instance_id in list(joins) + list(leaves):
            results.setdefault(instance_id, TableOutcome(joins.get(instance_id)))
        for table_id, (add, remove) in sorted(by_table.items()):
            try:
                changes = self._apply_table(table_id, add, remove)
            except Exception as exc:  # noqa: BLE001 - its instances retry; other tables go on
                for instance_id in add | remove:
                    results[instance_id] = exc
                continue
            for instance_id in add:
                if isinstance(results.get(instance_id), Exception):
                    continue
                results[instance_id] = TableOutcome(
                    table_id, changes.conflicts, tuple(sorted(changes.owned))
                )
        return results

    def tidy(self) -> list[str]:
        """The full reconcile's sweep: tables whose record has no members lose the routes we
        left there (a worker stopped between deleting routes and forgetting the table)."""
        done: list[str] = []
        for table_id, record in sorted(self.records().items()):
            if not record.members:
                self._apply_table(table_id, set(), set())
                done.append(table_id)
        return done

    def _apply_table(self, table_id: str, add: set[str], remove: set[str]) -> TableChanges:
        sync = self.sync
        record = self.records().get(table_id) or TableRecord(table_id)
        view = self.tables().get(table_id)
        last: Exception | None = None
        for _ in range(TABLE_ATTEMPTS):
            try:
                changes = self._once(table_id, record, view, add, remove)
            except (RecordMoved, RouteExists) as exc:
                # Another worker changed the record or the table: read both again (record first).
                last = exc
                sync.telemetry.count("StoreConflicts")
                record = sync.records.get(table_id)
                view = sync.routes.tables(sync.vpc_id, [table_id]).get(table_id)
                continue
            return changes
        raise StoreConflict(f"{table_id}: gave up after {TABLE_ATTEMPTS} attempts: {last}")

    def _once(
        self,
        table_id: str,
        record: TableRecord,
        view: RouteTableView | None,
        add: set[str],
        remove: set[str],
    ) -> TableChanges:
        sync = self.sync
        members = (set(record.members) | add) - remove
        if view is None:
            # The table is gone (deleted with its routes): nothing of ours can be left in it.
            view = RouteTableView(table_id, sync.vpc_id)
            if add:
                raise StoreConflict(f"route table {table_id} is not in {sync.vpc_id} any more")
        changes = plan_table(
            view, members=members, owned=record.routes, destinations=sync.destinations,
            eni=sync.eni,
        )  # fmt: skip
        if not sync.opted_in(view) and changes.calls:
            # The owner took the opt-in away (or never gave it): no call to its routes (IAM
            # would refuse them too). What we own stays recorded, so an opt-in given again
            # lets the next run clean up; the operator sees it logged here.
            logger.error(
                "route table not opted in: its routes are left as they are",
                extra={"route_table": table_id, "routes_owned": dict(record.routes)},
            )
            if add:
                raise StoreConflict(f"route table {table_id} is not opted in")
            changes = TableChanges(
                table_id, conflicts=changes.conflicts, owned=dict(record.routes),
                owned_during=dict(record.routes),
            )  # fmt: skip
        version = record.version
        changed = members != set(record.members) or dict(changes.owned_during) != dict(
            record.routes
        )
        if changed or changes.conflicts or changes.calls:
            # Before any call (and to check a conflict was not our own worker's route, made
            # after we read): conditional on the version we read.
            if members or changes.owned_during:
                version = sync.records.put(
                    table_id, vpc_id=sync.vpc_id, members=members,
                    routes=changes.owned_during, version=version,
                ).version  # fmt: skip
        for destination in changes.create:
            sync.routes.create(table_id, destination, sync.eni)
        for destination in changes.replace:
            sync.routes.replace(table_id, destination, sync.eni)
        for destination in changes.delete:
            sync.routes.delete(table_id, destination)
        if changes.calls:
            calls = len(changes.create) + len(changes.replace) + len(changes.delete)
            sync.telemetry.count("RouteChanges", calls)
            logger.info(
                "route table changed",
                extra={
                    "route_table": table_id,
                    "routes_created": list(changes.create),
                    "routes_replaced": list(changes.replace),
                    "routes_deleted": list(changes.delete),
                    "members": len(members),
                },
            )
        if changes.conflicts:
            logger.error(
                "routes tunnelnat did not create: left alone",
                extra={
                    "route_table": table_id,
                    "conflicts": [c.describe() for c in changes.conflicts],
                },
            )
        if not members and not changes.owned:
            # Nothing of ours left behind this table: forget it (a joiner since our write makes
            # this fail, and the next attempt puts the routes back).
            sync.records.delete(table_id, version=version)
            self._forget(table_id)
        elif dict(changes.owned) != dict(changes.owned_during):
            version = sync.records.put(
                table_id, vpc_id=sync.vpc_id, members=members, routes=changes.owned,
                version=version,
            ).version  # fmt: skip
            self._remember(table_id, members, changes.owned, version)
        else:
            self._remember(table_id, members, changes.owned, version)
        return changes

    def _remember(
        self, table_id: str, members: set[str], owned: Mapping[str, str], version: int
    ) -> None:
        if self._records is not None:
            self._records[table_id] = TableRecord(
                table_id, self.sync.vpc_id, frozenset(members), dict(owned), version
            )
        self._members = None

    def _forget(self, table_id: str) -> None:
        if self._records is not None:
            self._records.pop(table_id, None)
        self._members = None
