"""Waiting for another worker's gateway sync is not a failed attempt: it never brings a message
closer to the dead-letter queue, neither by the handler's count nor by the queue's redrive."""

from __future__ import annotations

import json
import time

from tests.lambdas.conftest import TABLE
from tests.lambdas.events import Context, sqs_batch, state_change
from tunnelnat.adapters.queue import FAILED_ATTEMPTS
from tunnelnat.adapters.store import EnrolmentStore
from tunnelnat.handlers import controller as handler_module
from tunnelnat.handlers.controller import handler

TAG = {"tunnelnat": "enabled"}
QUEUE_ARN = "arn:aws:sqs:us-east-1:123456789012:tunnelnat-events"


def batch(event: dict, *, receives: int, failed_before: int | None = None) -> dict:
    wrapped = sqs_batch(event)
    record = wrapped["Records"][0]
    record["eventSourceARN"] = QUEUE_ARN
    record["attributes"]["ApproximateReceiveCount"] = str(receives)
    if failed_before is not None:
        record["messageAttributes"] = {
            FAILED_ATTEMPTS: {"stringValue": str(failed_before), "dataType": "Number"}
        }
    return wrapped


def receive_all(sqs, url: str) -> list[dict]:
    return sqs.receive_message(
        QueueUrl=url, MaxNumberOfMessages=10, MessageAttributeNames=["All"], WaitTimeSeconds=0
    ).get("Messages", [])


def test_a_wait_sends_the_event_again_with_its_failed_attempts_and_acknowledges_the_original(
    world, queues
):
    sqs, main, dlq = queues
    web1 = world.launch("10.10.1.21", tags=TAG)
    EnrolmentStore(world.dynamodb, TABLE).begin_sync("another-worker")
    event = state_change(web1, "running")
    # Received three times: two real failures before this wait.
    result = handler(batch(event, receives=3, failed_before=4), Context())
    assert result == {"batchItemFailures": []}, "the original is done with; its copy waits"
    sqs.set_queue_attributes(QueueUrl=main, Attributes={"VisibilityTimeout": "0"})
    [copy] = receive_all(sqs, main) or _after_delay(sqs, main)
    assert json.loads(copy["Body"]) == event
    assert copy["MessageAttributes"][FAILED_ATTEMPTS]["StringValue"] == "6"
    assert receive_all(sqs, dlq) == []
    assert world.items("instance") == {}, "not marked failed"


def _after_delay(sqs, url: str) -> list[dict]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        messages = receive_all(sqs, url)
        if messages:
            return messages
        time.sleep(0.5)
    return []


def test_carried_failed_attempts_count_towards_the_dead_letter(world, queues):
    sqs, _, dlq = queues
    web1 = world.launch("10.10.1.21", tags=TAG)
    world.fleet.failing.add("AddHostRoute")
    limit = handler_module.MAX_ATTEMPTS
    # A copy received for the first time after limit - 1 real failures: this is the last attempt.
    result = handler(
        batch(state_change(web1, "running"), receives=1, failed_before=limit - 1), Context()
    )
    assert result == {"batchItemFailures": []}
    [parked] = receive_all(sqs, dlq)
    assert json.loads(parked["Body"])["instance_ids"] == [web1]
    assert world.items("instance")[web1]["status"]["S"] == "failed"


def test_a_nonsense_attempt_count_counts_as_none(world, queues):
    web1 = world.launch("10.10.1.21", tags=TAG)
    wrapped = batch(state_change(web1, "running"), receives=1)
    wrapped["Records"][0]["messageAttributes"] = {
        FAILED_ATTEMPTS: {"stringValue": "lots", "dataType": "Number"}
    }
    assert handler(wrapped, Context()) == {"batchItemFailures": []}
    assert world.items("instance")[web1]["status"]["S"] == "enrolled"
