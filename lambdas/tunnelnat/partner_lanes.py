"""The controller of a several-partner deployment (issue 23): one ``Controller`` per lane.

A deployment with a partners file publishes one lane per partner (core/lanes.py) under
``TUNNELNAT_PARTNERS_PATH``. Each lane is today's controller with the partner's own parts: its
enrolment tag key, its networks as instances address them (aliases or real), its pool or shared
S, its table of mappings (``SyncNatTable`` pulls that table only), its status tag, and the scope
of its instance routes (``<deployment>.<partner>``, so two partners' routes on one instance are
each their own). What stays the deployment's: the gateway pair (found as today), the lifecycle
hooks, and its own table for what is about the deployment (reconcile requests, held lifecycle
actions).

Every event converges its instances in every lane, one after the other; one lane's failure (its
table missing, its gateway sync failing) never stops another's: all lanes run, then an instance
any lane failed is reported failed, so its message comes back and every lane converges it again
(each converge is idempotent: a lane that finished writes nothing the second time).

``PartnerLanes`` answers what the service and the handler ask of a ``Controller``
(``deployment``, ``store``, ``converge``, ``reconcile_all``, ``record_failure``), with each
instance's outcomes over the lanes summed up by ``combine``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from aws_lambda_powertools import Logger

from tunnelnat.adapters.store import EnrolmentStore
from tunnelnat.controller import Controller
from tunnelnat.core.config import ConfigError, NatMode, TunnelnatConfig
from tunnelnat.core.enrolment import Decision, Status, decide_enrolment
from tunnelnat.core.lanes import Lane, LaneError, load_lanes, parameter_path
from tunnelnat.gateway_sync import GatewaySyncPending
from tunnelnat.plan import Outcome
from tunnelnat.settings import ControllerSettings

logger = Logger(service="tunnelnat", child=True)

PARTNERS_PATH_ENV = "TUNNELNAT_PARTNERS_PATH"
# How long a container trusts the lanes it read: a partner added or changed by a redeploy is
# picked up within this even by a warm container (the stack's update of the function's
# environment recycles containers anyway; this is the backstop). One GetParametersByPath.
LANES_MAX_AGE_SECONDS = 300.0
# Statuses that leave nothing to wait for in a lane (the service's RELEASE_LAUNCH): a launch is
# released once every lane's status is one of these.
SETTLED = frozenset({Status.ENROLLED, Status.NOT_TAGGED, Status.GONE, Status.IS_GATEWAY})
# A lane's nat_mode as core/lanes.py writes it -> the controller's NatMode ("instance-public":
# the spelling of the lanes' first version, read still).
NAT_MODES = {
    "dedicated": NatMode.DEDICATED,
    "shared": NatMode.SHARED,
    "instance": NatMode.INSTANCE,
    "instance-public": NatMode.INSTANCE,
}


class LaneFailed(RuntimeError):
    """A whole lane could not converge (its table missing or unwritable, its lanes unreadable):
    every instance of the batch waits for it; the other lanes went on."""

    def __init__(self, partner: str, error: Exception) -> None:
        super().__init__(f"partner {partner}: {type(error).__name__}: {error}")
        self.partner = partner
        self.error = error


class LanePostponed(RuntimeError):
    """The scheduled repair ran out of time before this lane: it comes first next time."""

    def __init__(self, partner: str) -> None:
        super().__init__(f"partner {partner}: repair postponed to the next scheduled run")
        self.partner = partner


class PartnersFailed(RuntimeError):
    """An instance one or more lanes could not converge (the others did): retried as a whole."""

    def __init__(self, errors: Mapping[str, Exception]) -> None:
        super().__init__("; ".join(_described(name, e) for name, e in errors.items()))
        self.errors = dict(errors)


class PartnersPending(GatewaySyncPending):
    """Only waits for other workers' gateway syncs (no failure): sent again, never an attempt."""

    def __init__(self, errors: Mapping[str, Exception]) -> None:
        super().__init__("; ".join(_described(name, e) for name, e in errors.items()))
        self.errors = dict(errors)


def _described(name: str, error: Exception) -> str:
    if isinstance(error, LaneFailed):
        return str(error)
    return f"partner {name}: {type(error).__name__}: {error}"


# -- reading the lanes --------------------------------------------------------------------------


def read_lanes(ssm: Any, path: str, deployment: str) -> tuple[Lane, ...]:
    """The lanes the stack published under ``path`` (one String parameter each), in index order.
    Refuses a path that is not this deployment's, none at all, or lanes of another deployment:
    a controller that cannot know its partners must not act as if there were none."""
    if path != parameter_path(deployment):
        raise LaneError(f"{PARTNERS_PATH_ENV} {path!r} is not {parameter_path(deployment)!r}")
    values: list[str] = []
    pages = ssm.get_paginator("get_parameters_by_path").paginate(Path=path, Recursive=False)
    for page in pages:
        values.extend(p["Value"] for p in page.get("Parameters", []))
    lanes = load_lanes(values)
    if not lanes:
        raise LaneError(f"no partner lanes under {path}")
    others = sorted({lane.deployment for lane in lanes} - {deployment})
    if others:
        raise LaneError(f"lanes under {path} are of deployment {others[0]!r}, not {deployment!r}")
    return lanes


def lane_config(base: TunnelnatConfig, lane: Lane) -> TunnelnatConfig:
    """The controller's configuration for one lane: the deployment's placement (G, its subnet,
    the tag value, the MSS) with the partner's own endpoint, networks as instances address them
    (the aliases, or the real networks), NAT and enrolment tag key."""
    values = base.model_dump(mode="json")
    values.update(
        partner_endpoint=str(lane.endpoint),
        partner_networks=[str(n) for n in lane.local_networks],
        nat_mode=NAT_MODES[lane.nat_mode].value,
        address_pool=[str(a) for a in lane.pool],
        shared_address=None if lane.shared_address is None else str(lane.shared_address),
        enrolment_tag_key=lane.tag_key,
    )
    return TunnelnatConfig.from_mapping(values, source=f"partner {lane.name}'s lane")


def lane_settings(settings: ControllerSettings, lane: Lane) -> ControllerSettings:
    """``settings`` (the deployment's) for one lane: its configuration and its table."""
    if settings.route_table_mode:
        # The stack refuses it too (docs/stack.md): a route in a route table is the VPC's,
        # shared by every partner, and per-partner route records are not built yet.
        raise ConfigError("route-table mode with a partners file is not supported yet")
    if lane.deployment != settings.deployment:
        raise ConfigError(f"lane {lane.name} is of {lane.deployment}, not {settings.deployment}")
    return settings.model_copy(
        update={"config": lane_config(settings.config, lane), "table_name": lane.table}
    )


# -- many lanes as one controller -------------------------------------------------------------


class PartnerLanes:
    """One ``Controller`` per lane, asked as one. ``factory`` builds a lane's controller;
    ``loader`` (optional) reads the lanes again once they are ``max_age`` seconds old, and a
    lane that changed gets a new controller (the others keep theirs, and what they know)."""

    def __init__(
        self,
        lanes: Sequence[Lane],
        factory: Callable[[Lane], Controller],
        *,
        store: EnrolmentStore,
        deployment: str,
        loader: Callable[[], Sequence[Lane]] | None = None,
        max_age: float = LANES_MAX_AGE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        base_tag_key: str | None = None,
        deadline: Callable[[], float | None] = lambda: None,
    ) -> None:
        self.store = store  # the deployment's table: reconcile requests, lifecycle actions
        self.deployment = deployment
        # The deployment's own enrolment key: with a partners file it enrols in no partner (an
        # instance joins each by <key>:partner:<name>); an instance carrying it alone is told so.
        self.base_tag_key = base_tag_key
        self._factory = factory
        self._loader = loader
        self._max_age = max_age
        self._clock = clock
        self._lanes: dict[str, Lane] = {}
        self._controllers: dict[str, Controller] = {}
        self._base_tagged: list[str] = []  # this batch's instances carrying base_tag_key
        # When the scheduled repair must stop starting lanes (the clock's time; None: never),
        # and the lane it starts with next time (those it did not reach come first).
        self._deadline = deadline
        self._next_full = 0
        self._set(lanes)

    @property
    def lanes(self) -> tuple[Lane, ...]:
        return tuple(self._lanes.values())

    @property
    def controllers(self) -> dict[str, Controller]:
        """Each partner's controller, in the lanes' order."""
        return dict(self._controllers)

    def _set(self, lanes: Sequence[Lane]) -> None:
        controllers: dict[str, Controller] = {}
        for lane in sorted(lanes, key=lambda lane: lane.index):
            kept = self._controllers.get(lane.name)
            same = kept is not None and self._lanes.get(lane.name) == lane
            controllers[lane.name] = kept if same and kept is not None else self._factory(lane)
        self._lanes = {lane.name: lane for lane in sorted(lanes, key=lambda lane: lane.index)}
        self._controllers = controllers
        self._read_at = self._clock()

    def refresh(self) -> None:
        """Read the lanes again when they are older than ``max_age``; on failure keep the ones
        known (logged): a partner's lanes going missing is never a reason to stop the others."""
        if self._loader is None or self._clock() - self._read_at <= self._max_age:
            return
        try:
            lanes = tuple(self._loader())
        except Exception as exc:  # noqa: BLE001 - kept: the lanes known still serve
            logger.warning("partner lanes not read again", extra={"reason": repr(exc)[:300]})
            self._read_at = self._clock()
            return
        if lanes != self.lanes:
            logger.info("partner lanes changed", extra={"partners": [la.name for la in lanes]})
        self._set(lanes)

    def converge(
        self,
        instance_ids: Iterable[str],
        *,
        terminating: Iterable[str] = (),
        full_sync: bool = False,
    ) -> dict[str, Outcome | Exception]:
        """Converge the instances in every lane; each instance's outcomes summed up."""
        self.refresh()
        ids = list(dict.fromkeys(instance_ids))
        ending = set(terminating)
        self._base_tagged = []  # set by _relevant for this batch
        per_lane: dict[str, dict[str, Outcome | Exception]] = {}
        wanted, untouched = (
            self._relevant(ids, ending)
            if not full_sync
            else ({n: ids for n in self._controllers}, {})
        )
        # Each lane observes its instances itself, after reading its own table: a view shared
        # between lanes would be older than a later lane's table read, which is what the
        # controller's leases rely on (controller._converge: the table first, then EC2).
        for name, controller in self._controllers.items():
            per_lane[name] = dict(untouched.get(name, {}))
            mine = wanted.get(name, ids)
            if not mine:
                continue
            logger.append_keys(partner=name)  # every line the lane logs names its partner
            try:
                per_lane[name].update(
                    controller.converge(mine, terminating=ending, full_sync=full_sync)
                )
            except Exception as exc:  # noqa: BLE001 - this lane's: the others go on
                logger.exception("partner lane failed")
                per_lane[name].update(dict.fromkeys(mine, LaneFailed(name, exc)))
            finally:
                logger.remove_keys(["partner"])
        combined = {i: combine(i, _of(i, per_lane)) for i in ids}
        for instance_id in self._base_tagged:
            result = combined.get(instance_id)
            if isinstance(result, Outcome) and not result.managed:
                keys = ", ".join(lane.tag_key for lane in self.lanes)
                reason = (
                    f"tagged {self.base_tag_key}, which joins no partner in a deployment with a "
                    f"partners file: tag one of {keys}"
                )
                logger.warning("tagged for no partner", extra={"instance": instance_id,
                               "reason": reason})  # fmt: skip
                combined[instance_id] = replace(result, reason=reason)
        return combined

    def _relevant(
        self, ids: list[str], ending: set[str]
    ) -> tuple[dict[str, list[str]], dict[str, dict[str, Outcome]]]:
        """Which lanes have anything to do with which instances: a lane runs for an instance
        that carries its tag key or that its table knows (a mapping or a record: ours to undo);
        for the others it would only read and conclude "not tagged". One DescribeInstances for
        every lane and one table read per lane instead of both per lane: with many partners, an
        event costs EC2 one call, not one per partner (EC2 throttles each API per account and
        Region with a token bucket: "Request throttling for the Amazon EC2 API", EC2 Developer
        Guide). Skipping is safe: it writes nothing, and a tag added since is its own event.
        Anything that cannot be read here: every lane runs in full, as it would without this."""
        everyone = {name: ids for name in self._controllers}
        self._base_tagged = []
        if not ids or not self._controllers:
            return everyone, {}
        first = next(iter(self._controllers.values()))
        try:
            observed = first.instances.describe_many(ids)
        except Exception as exc:  # noqa: BLE001 - each lane observes them itself then
            logger.warning("instances not described up front", extra={"reason": repr(exc)[:300]})
            return everyone, {}
        wanted: dict[str, list[str]] = {}
        untouched: dict[str, dict[str, Outcome]] = {}
        if self.base_tag_key is not None:
            base = self.base_tag_key
            self._base_tagged = [i for i in ids if i in observed and base in observed[i].tags]
        for name, controller in self._controllers.items():
            key = controller.config.enrolment_tag_key
            tagged = {i for i in ids if i in observed and key in observed[i].tags}
            rest = [i for i in ids if i not in tagged]
            known = set(rest)
            if rest:
                try:
                    snap = controller.store.snapshot_many(rest)
                    known = {i for i in rest if i in snap.mappings or i in snap.records}
                except Exception:  # noqa: BLE001 - the lane's own converge meets and reports it
                    logger.warning("partner lane's table not read up front",
                                   extra={"partner": name})  # fmt: skip
            wanted[name] = [i for i in ids if i in tagged or i in known]
            untouched[name] = {
                i: _untouched(controller, i, observed.get(i), terminating=i in ending)
                for i in rest
                if i not in known
            }
        return wanted, untouched

    def reconcile_all(self) -> dict[str, Outcome | Exception]:
        """The scheduled repair, in every lane. A lane that failed as a whole is reported under
        ``partner:<name>`` (no instance of its is known): counted in the reconcile's failures
        and logged; the next scheduled run tries it again.

        Each lane's repair re-renders its partner on the gateway (a command each): with many
        partners the whole may not fit one invocation. Lanes are started only until the
        deadline; those not reached are reported (``LanePostponed``) and come first next
        time, so every partner is repaired within a few runs however many there are."""
        self.refresh()
        per_lane: dict[str, dict[str, Outcome | Exception]] = {}
        failed: dict[str, Exception] = {}
        names = list(self._controllers)
        start = self._next_full % len(names) if names else 0
        order = names[start:] + names[:start]
        for position, name in enumerate(order):
            deadline = self._deadline()
            if deadline is not None and position > 0 and self._clock() >= deadline:
                postponed = order[position:]
                logger.warning("partner lanes left to the next scheduled repair",
                               extra={"partners": postponed})  # fmt: skip
                for later in postponed:
                    failed[later] = LanePostponed(later)
                self._next_full = names.index(postponed[0])
                break
            logger.append_keys(partner=name)
            try:
                per_lane[name] = self._controllers[name].reconcile_all()
            except Exception as exc:  # noqa: BLE001 - this lane's: the others go on
                logger.exception("partner lane's reconcile failed")
                failed[name] = LaneFailed(name, exc)
            finally:
                logger.remove_keys(["partner"])
        else:
            self._next_full = 0
        ids = list(dict.fromkeys(i for results in per_lane.values() for i in results))
        combined: dict[str, Outcome | Exception] = {i: combine(i, _of(i, per_lane)) for i in ids}
        for name, error in failed.items():
            combined[f"partner:{name}"] = error
        return combined

    def reconcile(self, instance_id: str, *, terminating: bool = False) -> Outcome:
        result = self.converge([instance_id], terminating={instance_id} if terminating else ())[
            instance_id
        ]
        if isinstance(result, Exception):
            raise result
        return result

    def record_failure(self, instance_id: str, reason: str) -> None:
        """An instance whose retries ran out, marked failed where it failed: in the lanes the
        reason names (``partner <name>:``, as PartnersFailed words it), else in every lane that
        knows it (its mapping or record), else in every lane whose tag it carries. A lane that
        converged it keeps its own status; one lane's table failing never keeps the mark from
        the others."""
        named = [name for name in self._controllers if f"partner {name}:" in reason]
        if named:
            self._mark(named, instance_id, reason)
            return
        known: list[str] = []
        for name, controller in self._controllers.items():
            try:
                mapping, record = controller.store.snapshot(instance_id)
            except Exception:  # noqa: BLE001 - the other lanes still get their mark
                logger.exception("failure not recorded", extra={"partner": name})
                continue
            if mapping is not None or record is not None:
                known.append(name)
        if not known and self._controllers:
            first = next(iter(self._controllers.values()))
            try:
                instance = first.instances.describe_many([instance_id]).get(instance_id)
            except Exception:  # noqa: BLE001 - nothing else to learn who it is
                logger.exception("failure not recorded: the instance could not be described")
                return
            tags = instance.tags if instance is not None else {}
            known = [name for name, controller in self._controllers.items()
                     if controller.config.enrolment_tag_key in tags]  # fmt: skip
        self._mark(known, instance_id, reason)

    def _mark(self, names: Iterable[str], instance_id: str, reason: str) -> None:
        for name in names:
            try:
                self._controllers[name].record_failure(instance_id, reason)
            except Exception:  # noqa: BLE001 - the other lanes still get their mark
                logger.exception("failure not recorded", extra={"partner": name})


def _untouched(
    controller: Controller, instance_id: str, instance: Any, *, terminating: bool
) -> Outcome:
    """What the lane's own converge would conclude for an instance it never served and whose
    tag it does not carry: not its business (decide_enrolment's status and reason)."""
    decision = decide_enrolment(
        instance,
        controller.config,
        vpc_id=controller.vpc_id,
        allowed=controller.allowed,
        gateway_group=controller.gateway_group,
    )
    if terminating:
        decision = Decision(False, Status.GONE, "Auto Scaling is terminating the instance")
    return Outcome(instance_id, decision.status, decision.reason, managed=False)


def _of(
    instance_id: str, per_lane: Mapping[str, Mapping[str, Outcome | Exception]]
) -> dict[str, Outcome | Exception]:
    return {name: results[instance_id] for name, results in per_lane.items()
            if instance_id in results}  # fmt: skip


def combine(instance_id: str, results: Mapping[str, Outcome | Exception]) -> Outcome | Exception:
    """One instance's outcome over the lanes (name -> its lane's outcome or error).

    Any lane's error makes the instance's result an error naming each (``PartnersPending`` when
    every one is only a wait for another worker's gateway sync), so its event comes back.
    Otherwise the status is the first lane's that still waits (pool exhausted, not running, ...:
    a launch stays held), else ``enrolled`` when any lane enrolled it, else the first managing
    lane's; each partner's own outcome travels in ``partners``. No lane managing it: the
    instance is none of the deployment's business (``managed`` False), as today."""
    errors = {name: r for name, r in results.items() if isinstance(r, Exception)}
    if errors:
        if all(isinstance(e, GatewaySyncPending) for e in errors.values()):
            return PartnersPending(errors)
        return PartnersFailed(errors)
    outcomes = {name: r for name, r in results.items() if isinstance(r, Outcome)}
    if not outcomes:
        return RuntimeError(f"{instance_id}: no partner lane reported")
    managed = {name: o for name, o in outcomes.items() if o.managed}
    shown = managed or outcomes
    reason = "; ".join(f"partner {name}: {o.status}: {o.reason}" for name, o in shown.items())
    if not managed:
        first = next(iter(outcomes.values()))
        return Outcome(instance_id, first.status, reason, managed=False)
    waiting = [o for o in managed.values() if o.status not in SETTLED]
    enrolled = [o for o in managed.values() if o.status == Status.ENROLLED]
    if waiting:
        status = waiting[0].status
    elif enrolled:
        status = Status.ENROLLED
    else:
        status = next(iter(managed.values())).status
    # No generation: each lane's table counts its own.
    return Outcome(
        instance_id,
        status,
        reason,
        public_ip=",".join(o.public_ip for o in enrolled if o.public_ip) or None,
        gateway_synced=any(o.gateway_synced for o in managed.values()),
        newly_enrolled=any(o.newly_enrolled for o in enrolled),
        partners={
            name: {k: v for k, v in o.as_dict().items() if k != "instance_id"}
            for name, o in managed.items()
        },
    )
