"""The delivery policy: what becomes of a queued event whose processing failed.

Attempts, back-off, requeue and dead-letter, apart from the handler (which only parses, converges
and reports). An event that may succeed later comes back after an exponential back-off; one that
waits for another worker's gateway sync is sent again as a new message that carries its failed
attempts (a wait is not an attempt); after the last attempt it goes to the dead-letter queue with
the instances and the reason.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from aws_lambda_powertools import Logger
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord

from tunnelnat.adapters.queue import FAILED_ATTEMPTS, EventQueue
from tunnelnat.events import Request
from tunnelnat.gateway_sync import GatewaySyncPending

logger = Logger(service=os.environ.get("POWERTOOLS_SERVICE_NAME") or "tunnelnat", child=True)

MAX_ATTEMPTS = int(os.environ.get("TUNNELNAT_MAX_ATTEMPTS", "8"))


def sync_pending_delay() -> int:
    """Seconds before an event that waits for another worker's gateway sync comes back."""
    return int(os.environ.get("TUNNELNAT_SYNC_PENDING_DELAY", "5"))


def backoff_seconds(attempt: int) -> int:
    """Redelivery delay after the ``attempt``-th failure: 15 s doubling to 15 min, with jitter."""
    base = min(900, 15 * 2 ** max(0, attempt - 1))
    return int(base * random.uniform(0.8, 1.0))  # noqa: S311 - jitter, not crypto


def failed_attempts(record: SQSRecord) -> int:
    """The failures a message carried over from the copy it replaced (see ``requeue``)."""
    attribute = record.message_attributes[FAILED_ATTEMPTS]
    return _count(attribute.string_value if attribute else None, default=0)


def _count(text: object, *, default: int) -> int:
    # A count SQS or our own requeue wrote; anything else reads as the default, never raises.
    try:
        return min(max(0, int(text)), 1_000_000) if text not in (None, "") else default  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return default


@dataclass(frozen=True)
class Failure:
    """One message that failed this time, and what it asked."""

    record: SQSRecord
    request: Request
    error: Exception


class DeliveryPolicy:
    """Settles failed messages: which come back (when), which are sent again, which are parked.

    ``on_dead_letter(request, reason)`` runs for each message parked in the dead-letter queue
    (the handler counts it, records the instances as failed and ends a held lifecycle action)."""

    def __init__(
        self,
        queue: Callable[[], EventQueue],
        *,
        on_dead_letter: Callable[[Request, str], None],
        max_attempts: int | None = None,
    ) -> None:
        self._queue = queue
        self._on_dead_letter = on_dead_letter
        self.max_attempts = MAX_ATTEMPTS if max_attempts is None else max_attempts

    def settle(self, failures: Sequence[Failure]) -> dict[str, Exception | None]:
        """Per message ID: None when the message is done with (dead-lettered, or sent again as a
        copy), else the error (the message stays and comes back after its delay)."""
        results: dict[str, Exception | None] = {}
        delays: dict[str, list[tuple[str, int]]] = {}  # per source queue: one batch call
        requeue: dict[str, list[tuple[SQSRecord, int]]] = {}
        for failure in failures:
            record, error = failure.record, failure.error
            results[record.message_id] = error
            receives = _count(record.attributes.approximate_receive_count, default=1)
            failed_before = failed_attempts(record)
            attempt = failed_before + receives
            reason = f"{type(error).__name__}: {error}"
            extra = {"attempt": attempt, "reason": reason}
            if isinstance(error, GatewaySyncPending):
                # A wait, not an attempt: sent again as a new message so its receive count (which
                # the queue's redrive policy counts) starts over; the attempts so far travel along.
                logger.info("waiting for another worker's gateway sync", extra=extra)
                requeue.setdefault(record.event_source_arn, []).append(
                    (record, failed_before + receives - 1)
                )
                continue
            if attempt >= self.max_attempts and self._queue().dead_letter(
                record.body, instance_ids=list(failure.request.instance_ids), reason=reason
            ):
                logger.error("giving up: sent to the dead-letter queue", extra=extra)
                self._on_dead_letter(failure.request, reason)
                results[record.message_id] = None
                continue
            logger.warning("will retry", extra=extra)
            delays.setdefault(record.event_source_arn, []).append(
                (record.receipt_handle, backoff_seconds(attempt))
            )
        for source_arn, waiting in requeue.items():
            try:
                sent = self._queue().requeue(
                    source_arn, [(r.body, failed, sync_pending_delay()) for r, failed in waiting]
                )
            except Exception:  # noqa: BLE001 - the originals stay and come back instead
                logger.exception("could not send waiting messages again")
                sent = [False] * len(waiting)
            for (record, _), ok in zip(waiting, sent, strict=True):
                if ok:
                    results[record.message_id] = None  # its copy carries on; this one is deleted
                else:
                    delays.setdefault(source_arn, []).append(
                        (record.receipt_handle, sync_pending_delay())
                    )
        for source_arn, entries in delays.items():
            try:
                self._queue().delay_retries(source_arn, entries)
            except Exception:  # noqa: BLE001 - the default visibility timeout still retries it
                logger.exception("could not set the retry delay")
        return results
