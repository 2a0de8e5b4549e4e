from __future__ import annotations

import json

import jsonschema

from tests.lambdas.events import state_change
from tunnelnat_cli.schemas import DLQ

TAG = {"tunnelnat": "enabled"}


def park(dep, instance_ids, reason="CommandError: i-x: AddHostRoute Failed: boom"):
    """A message as the controller parks it after its last retry (adapters/queue.py)."""
    body = {"event": json.dumps(state_change(instance_ids[0], "running")),
            "instance_ids": instance_ids, "reason": reason}  # fmt: skip
    dep.sqs.send_message(
        QueueUrl=dep.dlq_url,
        MessageBody=json.dumps(body),
        MessageAttributes={"reason": {"DataType": "String", "StringValue": reason[:250]}},
    )


def test_dlq_lists_what_the_controller_gave_up_on(dep):
    a = dep.launch("10.10.1.21", tags=TAG)
    b = dep.launch("10.10.1.22", tags=TAG)
    park(dep, [a])
    dep.sqs.send_message(QueueUrl=dep.dlq_url, MessageBody=json.dumps(state_change(b, "running")))
    dep.sqs.send_message(QueueUrl=dep.dlq_url, MessageBody="not json")
    result = dep.run("dlq", "--json")
    assert result.code == 0, result.err
    doc = result.json()
    jsonschema.validate(doc, DLQ)
    by_ids = {tuple(m["instance_ids"]): m for m in doc["messages"]}
    assert by_ids[(a,)]["reason"] == "CommandError: i-x: AddHostRoute Failed: boom"
    assert by_ids[(b,)]["readable"] is True
    assert by_ids[()]["readable"] is False
    assert doc["redrive"] is None
    text = dep.run("dlq")
    assert "(unreadable)" in text.out and a in text.out
    assert "after fixing the cause: tunnelnat dlq --redrive" in text.out
    visible = dep.sqs.get_queue_attributes(
        QueueUrl=dep.dlq_url, AttributeNames=["ApproximateNumberOfMessages"]
    )["Attributes"]["ApproximateNumberOfMessages"]
    assert visible == "3", "listing leaves the messages in place, visible"


def test_dlq_redrive_reconciles_their_instances_and_empties_the_queue(dep):
    a = dep.launch("10.10.1.21", tags=TAG)
    b = dep.launch("10.10.1.22", tags=TAG)
    park(dep, [a])
    dep.sqs.send_message(QueueUrl=dep.dlq_url, MessageBody=json.dumps(state_change(b, "running")))
    result = dep.run("dlq", "--redrive")
    assert result.code == 0, result.err
    assert f"reconcile requested for {', '.join(sorted([a, b]))}" in result.out
    assert "deleted 2 message(s), left 0 unreadable" in result.out
    assert set(dep.items("mapping")) == {a, b}, "the controller handled the request"
    assert "Messages" not in dep.sqs.receive_message(QueueUrl=dep.dlq_url)
    dep.ssm_online()
    assert dep.run("doctor").code == 0


def test_dlq_redrive_leaves_unreadable_messages(dep):
    dep.sqs.send_message(QueueUrl=dep.dlq_url, MessageBody="not json")
    result = dep.run("dlq", "--redrive", "--json")
    assert result.code == 1
    assert result.json()["redrive"] is None
    assert len(dep.sqs.receive_message(QueueUrl=dep.dlq_url)["Messages"]) == 1


def test_a_parked_full_reconcile_is_redriven_as_one(dep):
    missed = dep.launch("10.10.1.21", tags=TAG)
    body = {"event": "{}", "instance_ids": [], "reason": "full reconcile failed"}
    dep.sqs.send_message(QueueUrl=dep.dlq_url, MessageBody=json.dumps(body))
    doc = dep.run("dlq", "--redrive", "--json").json()
    assert doc["redrive"]["instance_ids"] == []
    assert set(dep.items("mapping")) == {missed}


def test_empty_and_missing_dlq(dep):
    assert dep.run("dlq").out.endswith(": empty\n")
    dep.sqs.delete_queue(QueueUrl=dep.dlq_url)
    result = dep.run("dlq")
    assert result.code == 2
    assert "dead-letter queue 'test-events-dlq' not found in region us-east-1" in result.err


# -- issue 14, finding 7: never "empty" while the queue holds messages --------------------------
def test_dlq_max_must_be_positive(dep):
    park(dep, ["i-0123456789abcdef0"])
    for value in ("0", "-3", "nan", "x"):
        result = dep.run("dlq", "--max", value)
        assert result.code == 2 and result.out == "", result
        assert result.err.count("\n") == 1 and "argument --max" in result.err, result.err


def test_dlq_max_lists_that_many_and_says_more_wait(dep):
    for n in range(3):
        park(dep, [f"i-0123456789abcdef{n}"])
    result = dep.run("dlq", "--max", "2")
    assert result.code == 0, result.err
    assert result.out.count("i-0123456789abcdef") == 2
    assert "2 of about 3 message(s) shown (--max 2)" in result.out
    doc = dep.run("dlq", "--max", "1", "--json").json()
    assert len(doc["messages"]) == 1


def test_dlq_in_flight_messages_are_not_called_empty(dep):
    park(dep, ["i-0123456789abcdef0"])
    held = dep.sqs.receive_message(QueueUrl=dep.dlq_url, VisibilityTimeout=60)
    assert len(held["Messages"]) == 1, "another reader holds the only message"
    result = dep.run("dlq")
    assert "empty" not in result.out
    assert result.code == 1
    assert "1 message(s) in the queue but none readable now" in result.out
