"""From requests (parsed events) to one ``converge`` call, plus what Auto Scaling waits for.

A batch of events becomes one set of instance IDs, so a burst of launches costs one gateway sync
per batch. Each request then gets its own result: None when done, or the exception to retry.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from aws_lambda_powertools import Logger

from tunnelnat.adapters.autoscaling import LifecyclePort
from tunnelnat.controller import Controller, Outcome
from tunnelnat.core.enrolment import Status
from tunnelnat.events import RECONCILE_REQUEST, Request, is_our_hook

logger = Logger(service="tunnelnat", child=True)

# Statuses that settle a launch: enrolled, or never ours to hold.
RELEASE_LAUNCH = {Status.ENROLLED, Status.NOT_TAGGED, Status.GONE, Status.IS_GATEWAY}


# The longest the controller may be away before it retries (the delivery policy's longest
# back-off): a held action with less than this left is ended now.
RETRY_RESERVE_SECONDS = 900.0


class StillWaiting(RuntimeError):
    """A held launch is not enrolled yet for a reason that may clear (pool, subnet fix, tag)."""


class Service:
    def __init__(
        self,
        controller: Controller,
        *,
        lifecycle: LifecyclePort | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.controller = controller
        self.lifecycle = lifecycle
        self.clock = clock

    def process(
        self, requests: Sequence[Request]
    ) -> tuple[list[Exception | None], dict[str, Outcome | Exception]]:
        """Per request: None when done, or the exception to retry; and every instance's result."""
        ids: list[str] = []
        terminating: set[str] = set()
        for request in requests:
            ids.extend(request.instance_ids)
            if request.lifecycle is not None and not request.lifecycle.launching:
                terminating.add(request.lifecycle.instance_id)
        results: dict[str, Outcome | Exception] = {}
        if any(r.full for r in requests):
            results.update(self.controller.reconcile_all())
            failed = [i for i, r in results.items() if isinstance(r, Exception)]
            if failed:
                logger.warning("full reconcile left failures", extra={"instances": failed[:50]})
        rest = [i for i in ids if i not in results or i in terminating]
        if rest:
            results.update(self.controller.converge(rest, terminating=terminating))
        errors = [self._settle_one(request, results) for request in requests]
        for request, error in zip(requests, errors, strict=True):
            if request.kind == RECONCILE_REQUEST and error is None:
                self._mark_handled(request, results)
        return errors, results

    def give_up(self, request: Request) -> None:
        """The controller will not come back to this request (it is dead-lettered): a held
        launch is abandoned, a held termination continued, now rather than at the hook's
        timeout (whose default result might let an unenrolled instance into service)."""
        action = request.lifecycle
        if action is None or self.lifecycle is None:
            return
        state = self.lifecycle.describe(action)
        if state.waiting:
            outcome = "ABANDON" if action.launching else "CONTINUE"
            logger.error("lifecycle action given up", extra={"result": outcome})
            self.lifecycle.complete(action, outcome)

    def _mark_handled(self, request: Request, results: dict[str, Outcome | Exception]) -> None:
        # The operator's `tunnelnat reconcile --wait` waits for this request ID to appear.
        scope = list(results) if request.full else list(request.instance_ids)
        failures = sum(isinstance(results.get(i), Exception) for i in scope)
        self.controller.store.record_reconcile(
            request.event_id, instances=len(scope), failures=failures
        )

    def _settle_one(self, request: Request, results: dict[str, Any]) -> Exception | None:
        try:
            return self._settle(request, results)
        except Exception as exc:  # noqa: BLE001 - e.g. Auto Scaling refused a completion
            # That request is retried; the other requests of the batch are settled regardless.
            logger.warning("could not settle the request", extra={"reason": repr(exc)[:300]})
            return exc

    def _settle(self, request: Request, results: dict[str, Any]) -> Exception | None:
        if request.full:
            return None  # per-instance failures are repaired by the next scheduled run
        errors = [results[i] for i in request.instance_ids if isinstance(results.get(i), Exception)]
        if request.lifecycle is None:
            return errors[0] if errors else None
        if not is_our_hook(request.lifecycle.hook_name, self.controller.deployment):
            # parse_request drops these already; a request built elsewhere is never answered
            # for another deployment's hook either.
            logger.warning("lifecycle action of another deployment's hook left alone")
            return None
        return self._lifecycle(request, results.get(request.lifecycle.instance_id))

    def _lifecycle(self, request: Request, result: Any) -> Exception | None:
        action = request.lifecycle
        assert action is not None and self.lifecycle is not None
        if isinstance(result, Outcome):
            if result.status is Status.OTHER_VPC:
                # Our hook on an instance of another VPC (a group spanning VPCs): not ours to end.
                logger.info("lifecycle action left alone: the instance is in another VPC")
                return None
            if not action.launching or result.status in RELEASE_LAUNCH:
                self.lifecycle.complete(action, "CONTINUE")
                logger.info(
                    "lifecycle action completed",
                    extra={"result": "CONTINUE", "status": str(result.status)},
                )
                return None
            failure: Exception = StillWaiting(f"{result.status}: {result.reason}")
        else:
            failure = result if isinstance(result, Exception) else StillWaiting("no result")
        # How long the action may still be held is the action's own business, not the event's
        # time (a delayed or redriven event is still worth a heartbeat while the action is open).
        state = self.lifecycle.describe(action)
        if not state.waiting:
            # Completed, or timed out with the hook's default result: nothing left to hold.
            logger.info("lifecycle action no longer open", extra={"reason": str(failure)})
            return None if isinstance(failure, StillWaiting) else failure
        held = self.clock() - self.controller.store.lifecycle_started(action.token)
        if held + RETRY_RESERVE_SECONDS >= state.global_timeout:
            # The hook ends the action before the controller is back for certain: end it now
            # with our result rather than the hook's default.
            outcome = "ABANDON" if action.launching else "CONTINUE"
            logger.error(
                "lifecycle action timed out",
                extra={"result": outcome, "held_s": round(held), "reason": str(failure)},
            )
            self.lifecycle.complete(action, outcome)
            return None
        self.lifecycle.heartbeat(action)
        return failure
