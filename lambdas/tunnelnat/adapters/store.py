"""DynamoDB: the one source of truth for mappings, address claims and generations.

Items (partition ``pk``, sort ``sk``):
  mapping/<instance-id>   private_ip, public_ip        what the gateway renders (it queries this)
  address/<ip>            instance_id                  a claim on a pool address
  private/<ip>            instance_id                  a claim on a private address (one mapping
                                                       per P, whatever the VPC or the instance)
  instance/<instance-id>  status, reason, route, ...   what operators see
  meta/generation         generation, checksum, ...    bumped by every mapping change
  change/<generation>     changes, expiration          what that generation changed (the log)
  meta/gateway            applied_generation, gateway  what the gateway last reported
  meta/reconcile          request_id, handled_at, ...  the last reconcile request handled
  lifecycle/<token>       first_seen, expiration       when the controller first held an action

Every mapping change, its address claim and the generation bump are one transaction, so the
gateway, which reads the generation before the mappings, never labels a table with a generation
newer than its contents; two writers never claim one address; and no private address is ever
mapped twice (the gateway could not tell which instance a packet to or from it belongs to).

The same transaction writes the generation's change-log entry (``change/<generation, 20 digits>``:
the rows removed and added, in order; it expires after ``CHANGE_KEEP_SECONDS``) and moves
``meta/generation``'s ``checksum`` (the sum of ``mapping_digest`` over every mapping row, kept
with ADD, so no writer reads the table for it). The gateway reads only the entries after the
generation it applied, and compares checksums to catch drift. ``checksum_from`` is the
generation the sum started at: anything but 0 (a table older than the checksum) means unknown.
Writing the mapping is conditional on ``previous`` being what the item holds, so the log and
the checksum never describe a row that was not there.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Any

from botocore.exceptions import ClientError

from tunnelnat.core.nat import mapping_digest

MAPPING, ADDRESS, INSTANCE, META, LEASE = "mapping", "address", "instance", "meta", "lease"
PRIVATE = "private"
LIFECYCLE = "lifecycle"
CHANGE = "change"
TRANSACT_MAX = 100  # DynamoDB's limit on items per TransactWriteItems
# A mapping transaction's own items: the rest are the generation bump, its change-log entry and
# the gateway sync lease taken along.
MAPPING_ITEMS_MAX = TRANSACT_MAX - 3
GENERATION_DIGITS = 20  # change/<generation>, zero-padded: the sort key orders generations
CHANGE_KEEP_SECONDS = 3 * 86400  # a gateway further behind reads the whole table instead
BATCH_GET_MAX = 100  # and on keys per BatchGetItem
# A released instance lease stays as an item (its epoch) this long: a worker that read the
# instance before someone else took and released its lease must still see that it did (an
# optimistic take is conditional on the epoch as read). Longer than any run.
LEASE_KEEP_SECONDS = 86400
_APPLIED_FORWARD = (
    "attribute_not_exists(applied_generation) OR applied_generation <= :g "
    "OR gateway_instance_id <> :gw"
)


class StoreConflict(RuntimeError):
    """A concurrent writer won; re-read and try again (the caller's loop, or the queue's)."""


class InstanceBusy(StoreConflict):
    """Another worker is reconciling this instance right now; try again after it is done."""


class AddressTaken(StoreConflict):
    """The address we tried to claim belongs to another instance now."""


class PrivateAddressTaken(StoreConflict):
    """Another instance's mapping holds the private address: ``taken`` maps each instance of
    the cancelled transaction that lost to (its private address, the holder's instance ID)."""

    def __init__(self, message: str, taken: dict[str, tuple[str, str]]) -> None:
        super().__init__(message)
        self.taken = taken


class SyncLeaseBusy(StoreConflict):
    """Only the gateway sync lease a mapping transaction tried to take along lost (another
    worker's sync started since the snapshot): write again without it."""


class GenerationMoved(StoreConflict):
    """Only the generation bump lost: another worker bumped first. ``current`` is the
    generation now (DynamoDB returned it with the failure), so a retry needs no re-read;
    ``claimed_count`` the pool's claimed count valid at it (None: not known)."""

    def __init__(self, message: str, current: int, claimed_count: int | None = None) -> None:
        super().__init__(message)
        self.current = current
        self.claimed_count = claimed_count


class LeaseLost(StoreConflict):
    """An instance lease taken along with a mapping write lost: another worker holds it, or
    took it (and perhaps gave it back) since we read the instance. ``instances`` are those:
    their reads may be stale, so they are retried through the queue; the rest is written."""

    def __init__(self, message: str, instances: set[str]) -> None:
        super().__init__(message)
        self.instances = instances


@dataclass(frozen=True)
class LeaseState:
    """An instance lease as read: its epoch (bumped by every take; None: no item) and holder."""

    epoch: int | None = None
    owner: str | None = None
    expires: float = 0.0

    def held_by_other(self, owner: str, now: float) -> bool:
        return self.owner is not None and self.owner != owner and self.expires >= now


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


@dataclass
class Snapshot:
    """What the table says about a batch of instances, read at one moment."""

    mappings: dict[str, StoredMapping]
    records: dict[str, InstanceRecord]
    desired_generation: int
    applied_generation: int
    # private address -> the instance whose mapping claims it (for the addresses asked about)
    private_claims: dict[str, str] = field(default_factory=dict)
    # The gateway that last reported applying (meta/gateway), and whether a sync was in flight
    # when read (its lease held and not expired).
    gateway_id: str | None = None
    sync_in_flight: bool = False
    # The instances' leases (when asked for): what an optimistic take is conditional on.
    leases: dict[str, LeaseState] = field(default_factory=dict)
    # How many pool addresses are claimed, when meta/generation's count is valid at
    # ``desired_generation`` (None: not known; the claims must be counted).
    claimed_count: int | None = None
    # The other gateways of the deployment that last synced (a standby of the pair).
    standby_ids: tuple[str, ...] = ()
    read_at: float = 0.0  # the store's clock when read (leases are held until ``expires``)


@dataclass(frozen=True)
class MappingChange:
    """One mapping to write (``new``) or to delete (``new`` is None), replacing ``previous``."""

    instance_id: str
    new: StoredMapping | None
    previous: StoredMapping | None
    # Whether the previous mapping's private address is claimed by this instance (a mapping
    # written before claims existed, or beside another's, has nothing of its own to release).
    release_private: bool = True


def change_ops(changes: Iterable[MappingChange]) -> tuple[list[dict], int]:
    """The change-log entry's rows (removals first: the transaction is atomic, and an address a
    row lets go of may be taken by another in it) and what the checksum moves by."""
    removed: list[dict] = []
    added: list[dict] = []
    moved = 0
    for change in changes:
        old, new = change.previous, change.new
        old_pair = (old.private_ip, old.public_ip) if old is not None else None
        new_pair = (new.private_ip, new.public_ip) if new is not None else None
        if old_pair == new_pair:
            continue
        if old_pair is not None:
            removed.append(_op("remove", *old_pair))
            moved -= mapping_digest(int(old_pair[0]), int(old_pair[1]))
        if new_pair is not None:
            added.append(_op("add", *new_pair))
            moved += mapping_digest(int(new_pair[0]), int(new_pair[1]))
    return removed + added, moved


def _op(op: str, private_ip: IPv4Address, public_ip: IPv4Address) -> dict:
    return {
        "M": {
            "op": {"S": op},
            "private_ip": {"S": str(private_ip)},
            "public_ip": {"S": str(public_ip)},
        }
    }


def change_key(generation: int) -> dict:
    return _key(CHANGE, f"{generation:0{GENERATION_DIGITS}d}")


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


def _lease(item: dict | None) -> LeaseState:
    if item is None:
        return LeaseState()
    epoch = item.get("epoch", {}).get("N")
    owner = item.get("owner", {}).get("S")
    # An item from before epochs: held by its owner; "no epoch" is what a take checks.
    return LeaseState(
        int(epoch) if epoch is not None else None,
        owner,
        float(item.get("expires", {}).get("N", "0")),
    )


def claimed_count(generation_item: dict | None, generation: int) -> int | None:
    """meta/generation's count of claimed pool addresses, when it is valid at ``generation``
    (written by the bump to it; a writer that did not keep it leaves it behind: not valid)."""
    if generation_item is None:
        return 0 if generation == 0 else None
    count = generation_item.get("claimed_count", {}).get("N")
    at = generation_item.get("claimed_generation", {}).get("N")
    if count is None or at is None or int(at) != generation:
        return None
    return int(count)


def claimed_delta(changes: Iterable[MappingChange]) -> int:
    """How many more pool addresses are claimed after ``changes`` (dedicated mode): a new
    address claimed +1, an address let go -1; keeping one's address changes nothing."""
    delta = 0
    for change in changes:
        old, new = change.previous, change.new
        if new is not None and (old is None or old.public_ip != new.public_ip):
            delta += 1
        if old is not None and (new is None or old.public_ip != new.public_ip):
            delta -= 1
    return delta


def _ids(instance_ids: Iterable[str]) -> dict:
    return {"L": [{"S": i} for i in instance_ids]}


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

    def snapshot_many(
        self,
        instance_ids: list[str],
        private_ips: Iterable[IPv4Address | str] = (),
        *,
        leases: bool = False,
    ) -> Snapshot:
        """Every instance's mapping and record (and lease, when ``leases``), both generations,
        and who claims each of ``private_ips`` and of the stored mappings' private addresses,
        consistently, in one BatchGetItem per 100 keys (a batch of 10 instances: one call).

        A mapping written with its private claim says so (``private_claimed``): its claim needs
        no read. Only a mapping from before that (or an address asked about) is looked up."""
        keys = [_key(META, "generation"), _key(META, "gateway")]
        for instance_id in instance_ids:
            keys += [_key(MAPPING, instance_id), _key(INSTANCE, instance_id)]
            if leases:
                keys.append(_key(LEASE, instance_id))
        privates = list(dict.fromkeys(str(ip) for ip in private_ips))
        keys += [_key(PRIVATE, ip) for ip in privates]
        items: dict[tuple[str, str], dict] = {}
        for start in range(0, len(keys), BATCH_GET_MAX):
            items.update(self._batch_get(keys[start : start + BATCH_GET_MAX]))
        known: dict[str, str] = {}
        for instance_id in instance_ids:
            item = items.get((MAPPING, instance_id))
            if item is not None and item.get("private_claimed", {}).get("BOOL"):
                known.setdefault(item["private_ip"]["S"], instance_id)
        # Who claims each older stored mapping's private address (one more read, only for a
        # mapping written before it carried ``private_claimed``).
        stored = {
            items[(MAPPING, i)]["private_ip"]["S"] for i in instance_ids if (MAPPING, i) in items
        }
        more = [_key(PRIVATE, ip) for ip in sorted(stored - set(privates) - set(known))]
        privates += [k["sk"]["S"] for k in more]
        for start in range(0, len(more), BATCH_GET_MAX):
            items.update(self._batch_get(more[start : start + BATCH_GET_MAX]))
        desired = items.get((META, "generation"))
        gateway = items.get((META, "gateway"))
        generation = int(desired["generation"]["N"]) if desired else 0
        claims = {
            ip: items[(PRIVATE, ip)]["instance_id"]["S"]
            for ip in privates
            if (PRIVATE, ip) in items
        }
        return Snapshot(
            mappings={
                i: _mapping(items[(MAPPING, i)]) for i in instance_ids if (MAPPING, i) in items
            },
            records={
                i: _record(items[(INSTANCE, i)]) for i in instance_ids if (INSTANCE, i) in items
            },
            desired_generation=generation,
            applied_generation=int(gateway["applied_generation"]["N"])
            if gateway and "applied_generation" in gateway
            else 0,
            private_claims={**known, **claims},
            gateway_id=gateway.get("gateway_instance_id", {}).get("S") if gateway else None,
            sync_in_flight=bool(
                gateway
                and "sync_owner" in gateway
                and float(gateway.get("sync_expires", {}).get("N", "0")) >= self._clock()
            ),
            leases={i: _lease(items.get((LEASE, i))) for i in instance_ids} if leases else {},
            read_at=self._clock(),
            claimed_count=claimed_count(desired, generation),
            standby_ids=tuple(
                v["S"] for v in (gateway or {}).get("standby_ids", {}).get("L", []) if "S" in v
            ),
        )

    def set_claimed_count(self, count: int, generation: int) -> bool:
        """Put meta/generation's count of claimed pool addresses right (counted by the caller
        at ``generation``, which must still be current); False when it moved meanwhile."""
        try:
            self._db.update_item(
                TableName=self._table,
                Key=_key(META, "generation"),
                UpdateExpression="SET claimed_count = :c, claimed_generation = :g",
                ConditionExpression="generation = :g",
                ExpressionAttributeValues={":c": {"N": str(count)}, ":g": {"N": str(generation)}},
            )
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "ConditionalCheckFailedException":
                raise
            return False
        return True

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
        new = StoredMapping(instance_id, private_ip, public_ip)
        items: list[dict] = [self._put_mapping(new, previous, generation)]
        if claim:
            items.append(self._claim(public_ip, instance_id))
        if previous is not None and previous.public_ip != public_ip:
            items.append(self._release(previous.public_ip, instance_id))
        items.append(self._claim(private_ip, instance_id, PRIVATE))
        items += self._log_and_bump([MappingChange(instance_id, new, previous)], generation)
        self._transact(items, claimed=public_ip if claim else None)
        return generation + 1

    def write_mappings(
        self,
        changes: list[MappingChange],
        *,
        generation: int,
        claim: bool,
        sync_owner: str | None = None,
        sync_seconds: float = 180.0,
        lease_owner: str | None = None,
        leases: dict[str, int | None] | None = None,
        lease_seconds: float = 300.0,
        claims_before: int | None = None,
    ) -> int:
        """Many mapping changes, their address claims and releases and ONE generation bump, in
        one transaction (all or nothing). ``generation`` is the one the caller read; a concurrent
        bump, a taken address or a changed mapping cancels it (AddressTaken / StoreConflict).
        ``sync_owner``: take the gateway sync lease (``begin_sync``) in the same transaction, so
        the sync that must follow costs no call of its own (SyncLeaseBusy when only it lost).
        ``leases``: instance -> the lease epoch read before the instance was observed: take
        each instance's lease for ``lease_owner`` here, conditional on nobody having taken it
        since (LeaseLost names those who lost), so what was read still holds when written.
        ``claims_before``: the count of claimed pool addresses valid at ``generation``; the bump
        writes it moved by this write's claims (else the count is left behind, not valid).
        Returns the new generation."""
        items: list[dict] = []
        claimed: list[IPv4Address] = []
        for change in changes:
            if change.new is not None:
                new = change.new
                items.append(self._put_mapping(new, change.previous, generation))
                if claim:
                    items.append(self._claim(new.public_ip, change.instance_id))
                    claimed.append(new.public_ip)
                items.append(self._claim(new.private_ip, change.instance_id, PRIVATE))
                old = change.previous
                if old is not None and old.public_ip != new.public_ip:
                    items.append(self._release(old.public_ip, change.instance_id))
                if old is not None and old.private_ip != new.private_ip and change.release_private:
                    items.append(self._release(old.private_ip, change.instance_id, PRIVATE))
            elif change.previous is not None:
                old = change.previous
                items.append(
                    {
                        "Delete": {
                            "TableName": self._table,
                            "Key": _key(MAPPING, change.instance_id),
                            # What the log says it removes is what was there.
                            "ConditionExpression": "private_ip = :p AND public_ip = :ip",
                            "ExpressionAttributeValues": {
                                ":p": {"S": str(old.private_ip)},
                                ":ip": {"S": str(old.public_ip)},
                            },
                        }
                    }
                )
                if claim:
                    items.append(self._release(old.public_ip, change.instance_id))
                if change.release_private:
                    items.append(self._release(old.private_ip, change.instance_id, PRIVATE))
        if not items:
            return generation
        if len(items) + (len(leases or {}) if lease_owner else 0) > MAPPING_ITEMS_MAX:
            raise ValueError(f"{len(changes)} changes need {len(items) + 3} transaction items")
        log, bump = self._log_and_bump(changes, generation)
        bump["Update"]["ReturnValuesOnConditionCheckFailure"] = "ALL_OLD"
        if claims_before is not None and claim:
            update = bump["Update"]
            update["UpdateExpression"] = update["UpdateExpression"].replace(
                "SET ", "SET claimed_count = :claimed, claimed_generation = :next, ", 1
            )
            update["ExpressionAttributeValues"][":claimed"] = {
                "N": str(max(0, claims_before + claimed_delta(changes)))
            }
        now = self._clock()
        taking = [
            self._lease_take(i, lease_owner, now, lease_seconds, epoch=epoch)
            for i, epoch in (leases or {}).items()
            if lease_owner is not None
        ]
        items += taking
        sync = None
        if sync_owner is not None:
            sync = self._sync_lease(sync_owner, sync_seconds)
            items.append(sync)
        items += [log, bump]
        try:
            self._db.transact_write_items(TransactItems=items)
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "TransactionCanceledException":
                raise
            raw = exc.response.get("CancellationReasons", [])
            reasons = [r.get("Code", "None") for r in raw]
            if taking and len(raw) == len(items):
                lost = {
                    item["Update"]["Key"]["sk"]["S"]
                    for item, code in zip(items, reasons, strict=True)
                    if code == "ConditionalCheckFailed" and any(item is t for t in taking)
                }
                if lost:
                    raise LeaseLost(f"instance lease(s) of {', '.join(sorted(lost))} taken "
                                    "by another worker since read", lost) from exc  # fmt: skip
            if sync is not None:
                if len(raw) == len(items):
                    lost = sum(c != "None" for c in reasons)
                    if reasons[-3] == "ConditionalCheckFailed" and lost == 1:
                        raise SyncLeaseBusy("a gateway sync started since the snapshot") from exc
                    # Lost more than the lease: the rest reads as if it had not been asked for.
                    raw, reasons = raw[:-3] + raw[-2:], reasons[:-3] + reasons[-2:]
                items = [i for i in items if i is not sync]
            if len(raw) == len(items) and all(c == "None" for c in reasons[:-1]):
                now_item = raw[-1].get("Item", {})
                current = now_item.get("generation", {}).get("N")
                if reasons[-1] == "ConditionalCheckFailed" and current is not None:
                    raise GenerationMoved(
                        f"generation moved from {generation} to {current}",
                        int(current),
                        claimed_count(now_item, int(current)),
                    ) from exc
            private = {
                item["Put"]["Item"]["instance_id"]["S"]: (
                    item["Put"]["Item"]["sk"]["S"],
                    reason.get("Item", {}).get("instance_id", {}).get("S", "another instance"),
                )
                for item, reason in zip(items, raw, strict=False)
                if reason.get("Code") == "ConditionalCheckFailed"
                and "Put" in item
                and item["Put"]["Item"]["pk"]["S"] == PRIVATE
            }
            if private:
                shown = ", ".join(f"{ip} (held by {holder})" for ip, holder in private.values())
                raise PrivateAddressTaken(f"private address(es) {shown}", private) from exc
            taken = [
                item["Put"]["Item"]["sk"]["S"]
                for item, code in zip(items, reasons, strict=False)
                if code == "ConditionalCheckFailed"
                and "Put" in item
                and item["Put"]["Item"]["pk"]["S"] == ADDRESS
            ]
            if taken:
                raise AddressTaken(f"address(es) {', '.join(taken)} claimed by another") from exc
            raise StoreConflict(f"concurrent change, transaction cancelled: {reasons}") from exc
        return generation + 1

    def acquire_leases(
        self,
        instance_ids: list[str],
        owner: str,
        *,
        seconds: float = 300.0,
        epochs: dict[str, int | None] | None = None,
    ) -> dict[str, Exception]:
        """``acquire_lease`` for many instances in one transaction; returns the instances NOT
        leased, each with why (another worker holds it, or took it since ``epochs`` were read:
        InstanceBusy)."""
        failed: dict[str, Exception] = {}
        todo = list(dict.fromkeys(instance_ids))
        epochs = epochs or {}
        if len(todo) == 1:
            try:
                self.acquire_lease(todo[0], owner, seconds=seconds, **self._epoch(epochs, todo[0]))
            except StoreConflict as exc:
                failed[todo[0]] = exc
            return failed
        now = self._clock()
        for start in range(0, len(todo), TRANSACT_MAX):
            chunk = todo[start : start + TRANSACT_MAX]
            for _ in range(3):
                if not chunk:
                    break
                items = [self._lease_take(i, owner, now, seconds, **self._epoch(epochs, i))
                         for i in chunk]  # fmt: skip
                try:
                    self._db.transact_write_items(TransactItems=items)
                    chunk = []
                    break
                except ClientError as exc:
                    if exc.response["Error"]["Code"] != "TransactionCanceledException":
                        raise
                    reasons = [
                        r.get("Code", "None") for r in exc.response.get("CancellationReasons", [])
                    ]
                    busy = [i for i, c in zip(chunk, reasons, strict=False) if c != "None"]
                    if not busy:
                        break  # cancelled without a reason per item: one by one below
                    for instance_id in busy:
                        failed[instance_id] = InstanceBusy(
                            f"{instance_id} is being reconciled by another worker"
                        )
                    chunk = [i for i in chunk if i not in failed]
            for instance_id in chunk:  # what the transactions could not settle
                try:
                    self.acquire_lease(
                        instance_id, owner, seconds=seconds, **self._epoch(epochs, instance_id)
                    )
                except StoreConflict as exc:
                    failed[instance_id] = exc
        return failed

    def finish(
        self,
        *,
        put: list[InstanceRecord],
        delete: list[str],
        release: list[str],
        owner: str,
        sync: tuple[int, str] | tuple[int, str, tuple[str, ...]] | None = None,
    ) -> bool:
        """The batch's last write: the records that changed, the records to forget, and the
        leases given back, in one transaction per 100 items. When a lease was taken over (it
        expired), item by item instead, so the records still land.

        ``sync``: (applied generation, gateway) of this run's gateway sync, whose lease is given
        back here too (``end_sync`` with ``unless_desired_moved``, in the same transaction).
        Returns False when the sync lease is kept because the desired generation moved while
        the sync ran (the caller runs the trailing sync); True otherwise."""
        if sync is not None:
            standbys = sync[2] if len(sync) > 2 else ()  # type: ignore[misc]
            extra = self._end_sync_items(owner, sync[0], sync[1], standbys)
            records = len(put) + len(delete) + len(release)
            if records + len(extra) <= TRANSACT_MAX:
                items = [{"Put": {"TableName": self._table, "Item": self._record_item(r)}}
                         for r in put]  # fmt: skip
                items += [{"Delete": {"TableName": self._table, "Key": _key(INSTANCE, i)}}
                          for i in delete]  # fmt: skip
                items += [self._lease_release(i, owner) for i in release]
                try:
                    self._db.transact_write_items(TransactItems=items + extra)
                    return True
                except ClientError as exc:
                    if exc.response["Error"]["Code"] != "TransactionCanceledException":
                        raise
                    codes = [
                        r.get("Code", "None") for r in exc.response.get("CancellationReasons", [])
                    ]
                    # Written apart: the records (and leases) first, then the sync's release.
                    self.finish(put=put, delete=delete, release=release, owner=owner)
                    if codes[-2:-1] == ["ConditionalCheckFailed"]:
                        return False  # the desired generation moved: a trailing sync is due
                    return self.end_sync(owner, applied=sync[0], gateway_id=sync[1],
                                         unless_desired_moved=True,
                                         standbys=standbys)  # fmt: skip
            self.finish(put=put, delete=delete, release=release, owner=owner)
            return self.end_sync(owner, applied=sync[0], gateway_id=sync[1],
                                 unless_desired_moved=True, standbys=standbys)  # fmt: skip
        items: list[dict] = [
            {"Put": {"TableName": self._table, "Item": self._record_item(r)}} for r in put
        ]
        items += [{"Delete": {"TableName": self._table, "Key": _key(INSTANCE, i)}} for i in delete]
        items += [self._lease_release(i, owner) for i in release]
        if len(items) == 1 and release:
            self.release_lease(release[0], owner)
            return True
        if len(items) == 1 and put:
            self.put_record(put[0])
            return True
        for start in range(0, len(items), TRANSACT_MAX):
            chunk = items[start : start + TRANSACT_MAX]
            try:
                self._db.transact_write_items(TransactItems=chunk)
            except ClientError as exc:
                if exc.response["Error"]["Code"] != "TransactionCanceledException":
                    raise
                for item in chunk:
                    if "Put" in item:
                        self._db.put_item(TableName=self._table, Item=item["Put"]["Item"])
                    elif "Delete" in item:
                        self._db.delete_item(TableName=self._table, Key=item["Delete"]["Key"])
                    else:
                        self.release_lease(item["Update"]["Key"]["sk"]["S"], owner)
        return True

    @staticmethod
    def _epoch(epochs: dict[str, int | None], instance_id: str) -> dict[str, Any]:
        return {"epoch": epochs[instance_id]} if instance_id in epochs else {}

    def _lease_release(self, instance_id: str, owner: str) -> dict:
        """Give the lease back, keeping the item (its epoch) for ``LEASE_KEEP_SECONDS``."""
        return {
            "Update": {
                "TableName": self._table,
                "Key": _key(LEASE, instance_id),
                "UpdateExpression": "SET expiration = :ttl REMOVE #o, expires",
                "ConditionExpression": "#o = :me",
                "ExpressionAttributeNames": {"#o": "owner"},
                "ExpressionAttributeValues": {
                    ":me": {"S": owner},
                    ":ttl": {"N": str(int(self._clock() + LEASE_KEEP_SECONDS))},
                },
            }
        }

    _ANY_EPOCH = object()

    def _lease_take(
        self, instance_id: str, owner: str | None, now: float, seconds: float,
        *, epoch: Any = _ANY_EPOCH,
    ) -> dict:  # fmt: skip
        """Take the lease when nobody holds it (or it expired, or it is ours already), bumping
        its epoch; with ``epoch`` (as read, None: no epoch) only if nobody took it since."""
        condition = "(attribute_not_exists(#o) OR expires < :now OR #o = :me)"
        values: dict[str, dict] = {
            ":me": {"S": str(owner)},
            ":exp": {"N": f"{now + seconds:.3f}"},
            ":now": {"N": f"{now:.3f}"},
            ":one": {"N": "1"},
            ":ttl": {"N": str(int(now + seconds + LEASE_KEEP_SECONDS))},
        }
        if epoch is None:
            condition += " AND attribute_not_exists(epoch)"
        elif epoch is not self._ANY_EPOCH:
            condition += " AND epoch = :epoch"
            values[":epoch"] = {"N": str(epoch)}
        return {
            "Update": {
                "TableName": self._table,
                "Key": _key(LEASE, instance_id),
                "UpdateExpression": "SET #o = :me, expires = :exp, expiration = :ttl "
                "ADD epoch :one",
                "ConditionExpression": condition,
                "ExpressionAttributeNames": {"#o": "owner"},
                "ExpressionAttributeValues": values,
            }
        }

    def acquire_lease(
        self, instance_id: str, owner: str, *, seconds: float = 300.0, epoch: Any = _ANY_EPOCH
    ) -> None:
        """Serialise work on one instance across workers (as a workqueue does per key): a
        reconcile that read an older state can then never write after one that read a newer.
        ``epoch``: the lease's epoch when the caller read the instance (taken only if nobody
        took it since)."""
        update = self._lease_take(instance_id, owner, self._clock(), seconds, epoch=epoch)
        try:
            self._db.update_item(**update["Update"])
        except ClientError as exc:
            if exc.response["Error"]["Code"] == "ConditionalCheckFailedException":
                raise InstanceBusy(f"{instance_id} is being reconciled by another worker") from exc
            raise

    def release_lease(self, instance_id: str, owner: str) -> None:
        try:
            self._db.update_item(**self._lease_release(instance_id, owner)["Update"])
        except ClientError as exc:
            # Expired and taken over by another worker: theirs now, nothing to release.
            if exc.response["Error"]["Code"] != "ConditionalCheckFailedException":
                raise

    def record_applied(
        self, generation: int, gateway_id: str, *, standbys: Iterable[str] = ()
    ) -> None:
        """Remember what the gateway reported (and the standby synced with it); never move the
        recorded generation backwards.

        An update, not a put: the same item carries the sync lease (``begin_sync``)."""
        try:
            self._db.update_item(
                TableName=self._table,
                Key=_key(META, "gateway"),
                UpdateExpression="SET applied_generation = :g, gateway_instance_id = :gw, "
                "updated_at = :t, standby_ids = :sb",
                ConditionExpression=_APPLIED_FORWARD,
                ExpressionAttributeValues={
                    ":g": {"N": str(generation)},
                    ":gw": {"S": gateway_id},
                    ":t": {"N": f"{self._clock():.3f}"},
                    ":sb": _ids(standbys),
                },
            )
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "ConditionalCheckFailedException":
                raise

    # -- the gateway sync lease: one sync in flight; the others' changes ride on it ---------
    def begin_sync(self, owner: str, *, seconds: float = 180.0) -> int | None:
        """Take the gateway sync lease; returns the applied generation as recorded now, or None
        when another worker's sync is in flight (it will pull our changes too, or its holder's
        trailing sync will)."""
        now = self._clock()
        try:
            reply = self._db.update_item(
                TableName=self._table,
                Key=_key(META, "gateway"),
                UpdateExpression="SET sync_owner = :me, sync_expires = :exp",
                ConditionExpression="attribute_not_exists(sync_owner) OR sync_expires < :now "
                "OR sync_owner = :me",
                ExpressionAttributeValues={
                    ":me": {"S": owner},
                    ":exp": {"N": f"{now + seconds:.3f}"},
                    ":now": {"N": f"{now:.3f}"},
                },
                ReturnValues="ALL_NEW",
            )
        except ClientError as exc:
            if exc.response["Error"]["Code"] == "ConditionalCheckFailedException":
                return None
            raise
        attrs = reply.get("Attributes", {})
        return int(attrs.get("applied_generation", {}).get("N", "0"))

    def _end_sync_items(
        self, owner: str, applied: int, gateway_id: str, standbys: Iterable[str] = ()
    ) -> list[dict]:
        """``end_sync`` with ``unless_desired_moved`` as transaction items: a check that the
        desired generation is still ``applied`` (second to last: callers read its reason there),
        then the record of what the gateway applied and the lease given back."""
        return [
            {
                "ConditionCheck": {
                    "TableName": self._table,
                    "Key": _key(META, "generation"),
                    "ConditionExpression": "attribute_not_exists(generation) OR generation <= :g",
                    "ExpressionAttributeValues": {":g": {"N": str(applied)}},
                }
            },
            {
                "Update": {
                    "TableName": self._table,
                    "Key": _key(META, "gateway"),
                    "UpdateExpression": "SET applied_generation = :g, "
                    "gateway_instance_id = :gw, updated_at = :t, standby_ids = :sb "
                    "REMOVE sync_owner, sync_expires",
                    "ConditionExpression": f"sync_owner = :me AND ({_APPLIED_FORWARD})",
                    "ExpressionAttributeValues": {
                        ":g": {"N": str(applied)},
                        ":gw": {"S": gateway_id},
                        ":t": {"N": f"{self._clock():.3f}"},
                        ":me": {"S": owner},
                        ":sb": _ids(standbys),
                    },
                }
            },
        ]

    def _sync_lease(self, owner: str, seconds: float) -> dict:
        """``begin_sync``'s write as a transaction item."""
        now = self._clock()
        return {
            "Update": {
                "TableName": self._table,
                "Key": _key(META, "gateway"),
                "UpdateExpression": "SET sync_owner = :me, sync_expires = :exp",
                "ConditionExpression": "attribute_not_exists(sync_owner) OR sync_expires < :now "
                "OR sync_owner = :me",
                "ExpressionAttributeValues": {
                    ":me": {"S": owner},
                    ":exp": {"N": f"{now + seconds:.3f}"},
                    ":now": {"N": f"{now:.3f}"},
                },
            }
        }

    def end_sync(
        self,
        owner: str,
        *,
        applied: int | None,
        gateway_id: str | None,
        unless_desired_moved: bool = False,
        standbys: Iterable[str] = (),
    ) -> bool:
        """Record what the gateway applied and give the sync lease back, in one write.

        ``unless_desired_moved``: only if the desired generation is still ``applied`` (one
        transaction with a check on it); False, and the lease kept, when another worker wrote
        since: that worker found our sync in flight and left its change to us."""
        if unless_desired_moved and applied is not None and gateway_id is not None:
            try:
                self._db.transact_write_items(
                    TransactItems=self._end_sync_items(owner, applied, gateway_id, standbys)
                )
                return True
            except ClientError as exc:
                if exc.response["Error"]["Code"] != "TransactionCanceledException":
                    raise
                reasons = [
                    r.get("Code", "None") for r in exc.response.get("CancellationReasons", [])
                ]
                if reasons[:1] == ["ConditionalCheckFailed"]:
                    return False
                # Our lease was taken over (it expired): record and let go as below.
        if applied is not None and gateway_id is not None:
            try:
                self._db.update_item(
                    TableName=self._table,
                    Key=_key(META, "gateway"),
                    UpdateExpression="SET applied_generation = :g, gateway_instance_id = :gw, "
                    "updated_at = :t, standby_ids = :sb REMOVE sync_owner, sync_expires",
                    ConditionExpression=f"sync_owner = :me AND ({_APPLIED_FORWARD})",
                    ExpressionAttributeValues={
                        ":g": {"N": str(applied)},
                        ":gw": {"S": gateway_id},
                        ":t": {"N": f"{self._clock():.3f}"},
                        ":me": {"S": owner},
                        ":sb": _ids(standbys),
                    },
                )
                return True
            except ClientError as exc:
                if exc.response["Error"]["Code"] != "ConditionalCheckFailedException":
                    raise
            # Our lease expired and was taken over, or a newer generation is recorded already.
            self.record_applied(applied, gateway_id, standbys=standbys)
        try:
            self._db.update_item(
                TableName=self._table,
                Key=_key(META, "gateway"),
                UpdateExpression="REMOVE sync_owner, sync_expires",
                ConditionExpression="sync_owner = :me",
                ExpressionAttributeValues={":me": {"S": owner}},
            )
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "ConditionalCheckFailedException":
                raise
        return True

    def put_record(self, record: InstanceRecord) -> None:
        self._db.put_item(TableName=self._table, Item=self._record_item(record))

    def _record_item(self, record: InstanceRecord) -> dict:
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
        return item

    def record_reconcile(self, request_id: str, *, instances: int, failures: int) -> None:
        """Say that a reconcile request was handled (``tunnelnat reconcile --wait`` waits)."""
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

    def lifecycle_started(self, token: str, *, keep_seconds: float = 3 * 86400) -> float:
        """When the controller first held the lifecycle action ``token`` (now, the first time):
        a lower bound of how long the action has been open, whatever the event's own time. The
        item expires by itself (the table's TTL) after the longest a hook may hold."""
        now = self._clock()
        reply = self._db.update_item(
            TableName=self._table,
            Key=_key(LIFECYCLE, token),
            UpdateExpression="SET first_seen = if_not_exists(first_seen, :now), "
            "expiration = if_not_exists(expiration, :exp)",
            ExpressionAttributeValues={
                ":now": {"N": f"{now:.3f}"},
                ":exp": {"N": str(int(now + keep_seconds))},
            },
            ReturnValues="ALL_NEW",
        )
        return float(reply["Attributes"]["first_seen"]["N"])

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

    def _claim(self, address: IPv4Address, instance_id: str, kind: str = ADDRESS) -> dict:
        claim = {
            "Put": {
                "TableName": self._table,
                "Item": {**_key(kind, str(address)), "instance_id": {"S": instance_id}},
                "ConditionExpression": "attribute_not_exists(pk) OR instance_id = :me",
                "ExpressionAttributeValues": {":me": {"S": instance_id}},
            }
        }
        if kind == PRIVATE:
            # Who holds it comes back with the cancellation: the conflict names the other party.
            claim["Put"]["ReturnValuesOnConditionCheckFailure"] = "ALL_OLD"
        return claim

    def _release(self, address: IPv4Address, instance_id: str, kind: str = ADDRESS) -> dict:
        return {
            "Delete": {
                "TableName": self._table,
                "Key": _key(kind, str(address)),
                "ConditionExpression": "attribute_not_exists(pk) OR instance_id = :me",
                "ExpressionAttributeValues": {":me": {"S": instance_id}},
            }
        }

    def _put_mapping(
        self, new: StoredMapping, previous: StoredMapping | None, generation: int
    ) -> dict:
        if previous is None:
            condition: dict = {"ConditionExpression": "attribute_not_exists(pk)"}
        else:  # the log removes ``previous``: it must be what the item holds
            condition = {
                "ConditionExpression": "private_ip = :p AND public_ip = :s",
                "ExpressionAttributeValues": {
                    ":p": {"S": str(previous.private_ip)},
                    ":s": {"S": str(previous.public_ip)},
                },
            }
        return {
            "Put": {
                "TableName": self._table,
                "Item": {
                    **_key(MAPPING, new.instance_id),
                    "private_ip": {"S": str(new.private_ip)},
                    "public_ip": {"S": str(new.public_ip)},
                    "generation": {"N": str(generation + 1)},
                    # Written with its private address's claim (every caller claims it in the
                    # same transaction): a snapshot needs no read to know the claim is its own.
                    "private_claimed": {"BOOL": True},
                },
                **condition,
            }
        }

    def _log_and_bump(self, changes: Iterable[MappingChange], generation: int) -> list[dict]:
        """The change-log entry of ``generation + 1`` and the bump to it (last: callers read
        the bump's cancellation reason there), moving the checksum by the rows changed."""
        ops, moved = change_ops(changes)
        log = {
            "Put": {
                "TableName": self._table,
                "Item": {
                    **change_key(generation + 1),
                    "changes": {"L": ops},
                    "expiration": {"N": str(int(self._clock() + CHANGE_KEEP_SECONDS))},
                },
            }
        }
        return [log, self._bump(generation, moved)]

    def _bump(self, generation: int, moved: int = 0) -> dict:
        return {
            "Update": {
                "TableName": self._table,
                "Key": _key(META, "generation"),
                "UpdateExpression": "SET generation = :next, "
                "checksum_from = if_not_exists(checksum_from, :seen) ADD checksum :moved",
                "ConditionExpression": "attribute_not_exists(generation) OR generation = :seen",
                "ExpressionAttributeValues": {
                    ":next": {"N": str(generation + 1)},
                    ":seen": {"N": str(generation)},
                    ":moved": {"N": str(moved)},
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
