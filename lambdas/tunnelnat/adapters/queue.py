"""SQS: back-off through the queue's visibility timeout, a wait that is not an attempt, and a dead
letter that says why."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from tunnelnat.core.text import printable

T = TypeVar("T")

# Failed attempts a message had before it was sent again as a new message (whose receive count
# starts over): a wait for another worker's gateway sync is not an attempt and must not use one.
FAILED_ATTEMPTS = "tunnelnat-failed-attempts"


def _batches(entries: list[T]) -> list[list[T]]:
    """SQS's batch calls take at most 10 entries."""
    return [entries[k : k + 10] for k in range(0, len(entries), 10)]


class EventQueue:
    def __init__(self, sqs_client: Any, *, dead_letter_url: str | None = None) -> None:
        self._sqs = sqs_client
        self._dlq = dead_letter_url
        self._urls: dict[str, str] = {}

    def delay_retries(self, source_arn: str, delays: list[tuple[str, int]]) -> None:
        """Make failed messages of one queue reappear after their ``(receipt handle, seconds)``
        instead of the queue's default visibility timeout."""
        url = self._url(source_arn)
        for chunk in _batches(delays):
            reply = self._sqs.change_message_visibility_batch(
                QueueUrl=url,
                Entries=[
                    {
                        "Id": str(k),
                        "ReceiptHandle": handle,
                        "VisibilityTimeout": max(0, min(seconds, 43_200)),
                    }
                    for k, (handle, seconds) in enumerate(chunk)
                ],
            )
            failed = reply.get("Failed") or []
            if failed:
                raise RuntimeError(f"{len(failed)} retry delay(s) not set: {failed[0]}")

    def requeue(self, source_arn: str, entries: list[tuple[str, int, int]]) -> list[bool]:
        """Send each ``(body, failed_attempts, delay_seconds)`` again as a new message of the
        queue; per entry, whether it was sent (the caller keeps the original when not)."""
        url = self._url(source_arn)
        sent: list[bool] = []
        for chunk in _batches(entries):
            reply = self._sqs.send_message_batch(
                QueueUrl=url,
                Entries=[
                    {
                        "Id": str(k),
                        "MessageBody": body,
                        "DelaySeconds": max(0, min(delay, 900)),
                        "MessageAttributes": {
                            FAILED_ATTEMPTS: {"DataType": "Number", "StringValue": str(failed)}
                        },
                    }
                    for k, (body, failed, delay) in enumerate(chunk)
                ],
            )
            ok = {entry["Id"] for entry in reply.get("Successful") or []}
            sent.extend(str(k) in ok for k in range(len(chunk)))
        return sent

    def dead_letter(self, body: str, *, instance_ids: list[str], reason: str) -> bool:
        """Park a message that keeps failing, with the instances and the reason; False if no DLQ."""
        if not self._dlq:
            return False
        # The reason may quote what an instance wrote: never an escape sequence in the DLQ.
        reason = printable(reason)
        self._sqs.send_message(
            QueueUrl=self._dlq,
            MessageBody=json.dumps(
                {"event": body, "instance_ids": instance_ids, "reason": reason[:2000]}
            ),
            MessageAttributes={
                "reason": {"DataType": "String", "StringValue": reason[:250] or "unknown"},
            },
        )
        return True

    def _url(self, arn: str) -> str:
        if arn not in self._urls:
            # arn:aws:sqs:REGION:ACCOUNT:NAME
            _, _, _, _, account, name = arn.split(":", 5)
            reply = self._sqs.get_queue_url(QueueName=name, QueueOwnerAWSAccountId=account)
            self._urls[arn] = reply["QueueUrl"]
        return self._urls[arn]
