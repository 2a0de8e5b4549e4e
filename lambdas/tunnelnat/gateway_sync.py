"""The gateway side of the controller: find the gateway, have it pull and apply the newest table.

The gateway pulls the whole table itself (``SyncNatTable``), so one sync covers every change
written before it starts, and none is needed while the gateway reports the desired generation.

Coalescing: one gateway sync is in flight at a time (a lease on ``meta/gateway``). A worker that
finds one in flight does not start another: its instances come back through the queue
(``GatewaySyncPending``), by when the holder's sync, or its trailing sync for changes written
while it ran, has applied them. A burst of N launches costs a handful of syncs, not N / 10.

Isolation: the gateway applies every valid mapping and reports the rows it refused (``rejected``
in its JSON line); they are logged and counted here (``Failures``, Reason ``invalid-mapping``),
never a reason to fail the sync for everyone else.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
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
from tunnelnat.adapters.ec2 import GatewayAmbiguous
from tunnelnat.adapters.store import EnrolmentStore
from tunnelnat.core.text import printable
from tunnelnat.telemetry import Telemetry

logger = Logger(service="tunnelnat", child=True)

# Syncs one lease holder runs back to back for changes written while its previous one ran.
TRAILING_SYNCS = 4
# How long a container trusts its list of the gateways (the active and the standbys) before it
# looks them up again in EC2. A gateway is confirmed at every sync, but only among those known:
# one added since (the pair's new standby after a rolling replacement, a standby that booted
# after this container's lookup) would otherwise never get a sync from a warm container, fall
# behind the table, and never be a ready standby (issue 20). One DescribeInstances a minute.
GATEWAYS_MAX_AGE_SECONDS = 60.0


class GatewaySyncPending(RuntimeError):
    """Another worker's gateway sync is in flight: retry soon (it, or its trailing sync, will
    have applied our changes by then). Not a failure; never dead-lettered."""


class GatewaySyncFailed(CommandError):
    """The gateway did not apply the table; every instance of the batch waits for it."""


@dataclass(frozen=True)
class SyncRelease:
    """The gateway sync lease's release, deferred to the run's last write: the generation the
    gateway reported and which gateway it was (the active: G's holder), and the pair's standby
    that got the table too."""

    owner: str
    applied: int
    gateway: str
    standbys: tuple[str, ...] = ()


class GatewayLocator(Protocol):
    def find_gateway(self, deployment: str) -> str: ...


class GatewaySync:
    def __init__(
        self,
        *,
        store: EnrolmentStore,
        instances: GatewayLocator,
        commands: CommandPort,
        deployment: str,
        region: str,
        telemetry: Telemetry,
    ) -> None:
        self.store = store
        self.instances = instances
        self.commands = commands
        self.deployment = deployment
        self.region = region
        self.telemetry = telemetry
        self._gateway: str | None = None
        # The other running gateways of the deployment (the pair's standby): they get every
        # sync too; their failure is counted, never anyone's enrolment's.
        self._standbys: tuple[str, ...] = ()
        self.clock = time.monotonic
        self._looked_up_at: float | None = None  # when find_gateways last listed them

    def candidate(self) -> str | None:
        """The gateway known from before (this container's, or the table's), to be checked;
        None once that knowledge is older than GATEWAYS_MAX_AGE_SECONDS (looked up again)."""
        self._expire()
        return self._gateway

    def _expire(self) -> None:
        if self._looked_up_at is not None and (
            self.clock() - self._looked_up_at > GATEWAYS_MAX_AGE_SECONDS
        ):
            logger.info("the gateways known from before are a minute old: looked up again")
            self._gateway, self._standbys, self._looked_up_at = None, (), None

    def candidates(self) -> list[str]:
        """Every gateway known from before (the active first), to be checked; none once the
        list is older than GATEWAYS_MAX_AGE_SECONDS (then they are looked up again, new
        members included)."""
        self._expire()
        return [self._gateway, *self._standbys] if self._gateway else []

    def confirm(self, gateway: str, holds: bool) -> None:
        """What EC2 said of ``candidate()``: when it no longer qualifies (replaced, stopped, G
        moved), it is looked up again before the next sync."""
        if not holds and self._gateway == gateway:
            logger.info("the gateway known from before no longer qualifies: looked up again")
            self._gateway = None

    def confirm_pair(self, active: str | None, others: list[str]) -> None:
        """What EC2 said of ``candidates()``: the one holding G now (the standby after a
        failover: no lookup needed), and the others still running; none holding G: looked up
        again before the next sync."""
        if active is None:
            logger.info("no gateway known from before holds G: looked up again")
            self._gateway, self._standbys = None, ()
            return
        if active != self._gateway:
            logger.info("G moved to the standby known from before", extra={"active": active})
        gone = set(self.candidates()) - {active, *others}
        if gone:
            # A gateway known from before is gone (replaced): its successor is found by a
            # lookup before the next sync, so it gets the table too.
            logger.info("a gateway known from before is gone: looked up again",
                        extra={"gone": sorted(gone)})  # fmt: skip
            self._gateway, self._standbys = None, ()
            return
        self._gateway, self._standbys = active, tuple(others)

    def adopt(self, recorded: str | None, standbys: tuple[str, ...] = ()) -> None:
        """The gateway that last reported applying, as the table remembers it (a sync recorded
        it after sending to it), and the standby it recorded, when this container knows none."""
        if self._gateway is None and recorded:
            self._gateway = recorded
            self._standbys = tuple(s for s in standbys if s != recorded)
            # The table's list is as old as its last sync: trusted for as long as a lookup's.
            self._looked_up_at = self.clock()

    def gateway_id(self, *, refresh: bool = False) -> str:
        """The gateway's instance ID, looked up once per container and again when it may have
        changed (a full reconcile, or a command the old one could not take)."""
        if refresh or self._gateway is None:
            self._gateway, self._standbys = None, ()
            try:
                many = getattr(self.instances, "find_gateways", None)
                if many is None:
                    self._gateway = self.instances.find_gateway(self.deployment)
                else:
                    active, standbys = many(self.deployment)
                    if len(standbys) > 1:
                        # A pair is two: a third is a rolling replacement caught mid-way, or
                        # something launched by hand. Synced too (harmless), and said.
                        logger.error(
                            "more than two running gateways: all of them get the table",
                            extra={"active": active, "others": standbys},
                        )
                        self.telemetry.count("ExtraGateways", len(standbys) - 1)
                    self._gateway, self._standbys = active, tuple(standbys)
                self._looked_up_at = self.clock()
            except GatewayAmbiguous as exc:
                # Loud: a second instance looks like the gateway; nothing goes to either.
                logger.error("more than one gateway candidate: no sync", extra={"reason": str(exc)})
                self.telemetry.failure("gateway-ambiguous")
                raise
        return self._gateway

    def sync(self, *, full: bool = False, gateway: str | None = None) -> dict[str, Any]:
        """Ask the gateway to pull and apply the newest table; returns what it reported."""
        report, gateway = self._run_sync(full=full, gateway=gateway)
        applied = int(report.get("applied_generation", -1))
        if applied >= 0:
            self.store.record_applied(applied, gateway, standbys=self._standbys)
        return report

    def converge(
        self,
        *,
        owner: str,
        desired: int,
        applied: int,
        full: bool,
        leased: bool = False,
        defer: bool = False,
    ) -> tuple[bool, int, SyncRelease | None]:
        """Bring the gateway to ``desired`` (or re-render it all when ``full``), at most one sync
        in flight across workers; (whether this call synced, the generation now desired, the
        lease's release when deferred).
        ``leased``: ``owner`` took the sync lease with its mapping write (no sync can have run
        since that write: none was in flight, and none could start).
        ``defer``: after a good first sync, keep the lease and return what its release must
        record: the caller writes it with its own last write (``EnrolmentStore.finish``) and
        calls ``trail`` when someone wrote while the sync ran."""
        if not full and applied >= desired:
            if leased:
                self.store.end_sync(owner, applied=None, gateway_id=None)
            return False, desired, None
        recorded = None if leased else self.store.begin_sync(owner)
        if not leased and recorded is None:
            raise GatewaySyncPending(
                f"a gateway sync is in flight; generation {desired} will be applied by it or next"
            )
        if recorded is not None and not full and recorded >= desired:
            # Another worker's sync applied ours while we were writing.
            self.store.end_sync(owner, applied=None, gateway_id=None)
            return False, desired, None
        gateway = self.gateway_id(refresh=True) if full else None
        release = self._rounds(owner, desired, full=full, gateway=gateway, first=0, defer=defer)
        return True, desired, release

    def trail(self, release: SyncRelease) -> None:
        """The trailing syncs of a deferred release the caller could not write (the desired
        generation moved while the sync ran: a writer found it in flight and left its change
        to us), and the lease's release."""
        self._rounds(release.owner, release.applied, full=False, gateway=release.gateway,
                     first=1, defer=False)  # fmt: skip

    def _rounds(
        self, owner: str, desired: int, *, full: bool, gateway: str | None, first: int, defer: bool
    ) -> SyncRelease | None:
        reported: int | None = None
        released = False
        try:
            for round_ in range(first, TRAILING_SYNCS):
                report, gateway = self._run_sync(full=full, gateway=gateway)
                reported = int(report.get("applied_generation", -1))
                if reported < desired:
                    raise GatewaySyncFailed(
                        f"gateway reported {report}, but generation {desired} is desired"
                    )
                if defer:
                    released = True  # the caller's to write
                    return SyncRelease(owner, reported, gateway, self._standbys)
                # Trailing edge: let go only if nobody wrote while this sync ran (they did not
                # start a sync of their own: we hold the lease); checked in the same write.
                released = self.store.end_sync(
                    owner,
                    applied=reported,
                    gateway_id=gateway,
                    unless_desired_moved=round_ < TRAILING_SYNCS - 1,
                    standbys=self._standbys,
                )
                if released:
                    break
                full = False
        finally:
            if not released:
                self.store.end_sync(
                    owner,
                    applied=reported if reported is not None and reported >= 0 else None,
                    gateway_id=gateway,
                    standbys=self._standbys,
                )
        return None

    def _run_sync(self, *, full: bool, gateway: str | None) -> tuple[dict[str, Any], str]:
        gateway = gateway or self.gateway_id()
        parameters = {
            "TableName": self.store.table_name,
            "Region": self.region,
            "Full": "true" if full else "false",
        }
        started = time.monotonic()
        try:
            try:
                result = self._run(gateway, parameters)
            except AgentNotReady:
                # Replaced since we looked it up? Ask EC2 again; the queue retries if the same.
                fresh = self.gateway_id(refresh=True)
                if fresh == gateway:
                    raise
                gateway = fresh
                result = self._run(gateway, parameters)
        finally:
            elapsed = (time.monotonic() - started) * 1000
            self.telemetry.measure("GatewaySyncDuration", elapsed, "Milliseconds")
        self.telemetry.count("GatewaySyncs")
        report = last_json_line(result.stdout)
        self._report_rejected(report)
        return report, gateway

    def _run(self, gateway: str, parameters: dict[str, str]) -> CommandResult:
        """SyncNatTable on the active and, in the same command, on every standby; the active's
        result is the sync's. A standby's failure is logged and counted, never the sync's: it
        pulls the whole table again on its next sync (and at takeover, the boot restore)."""
        standbys = [s for s in self._standbys if s != gateway]
        if not standbys:
            result = self.commands.run(gateway, "SyncNatTable", parameters)
        else:
            replies = run_many(self.commands, [gateway, *standbys], "SyncNatTable", parameters)
            for standby in standbys:
                self._standby_result(standby, replies.get(standby))
            reply = replies.get(gateway) or CommandError(f"{gateway}: no result")
            if isinstance(reply, Exception):
                raise reply
            result = reply
        if not result.ok:
            self.telemetry.count("CommandFailures")
        return raise_for_status(result)

    def _standby_result(self, standby: str, reply: CommandResult | Exception | None) -> None:
        if isinstance(reply, CommandResult) and reply.ok:
            report = last_json_line(reply.stdout)
            logger.info("standby gateway synced", extra={"standby": standby,
                        "applied_generation": report.get("applied_generation")})  # fmt: skip
            return
        if isinstance(reply, CommandResult):
            detail = f"{reply.status}: {printable((reply.stderr or reply.stdout).strip())[-300:]}"
        else:
            detail = repr(reply)[:300]
        logger.warning("standby gateway sync failed (the enrolment goes on)",
                       extra={"standby": standby, "reason": detail})  # fmt: skip
        self.telemetry.count("StandbySyncFailures")

    def _report_rejected(self, report: dict[str, Any]) -> None:
        rejected = report.get("rejected")
        if not rejected or not isinstance(rejected, list):
            return
        count = int(report.get("rejected_count", len(rejected)) or len(rejected))
        logger.error(
            "the gateway refused mapping rows (it applied every other one)",
            extra={"rejected": rejected[:20], "rejected_count": count},
        )
        self.telemetry.failure("invalid-mapping")
        self.telemetry.count("RejectedMappings", count)


def last_json_line(text: str) -> dict[str, Any]:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except (ValueError, RecursionError):
                continue
            if isinstance(value, dict):
                return value
    return {}
