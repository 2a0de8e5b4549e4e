"""``--stack``: names come from the CloudFormation stack's outputs (the stack generates them)."""

from __future__ import annotations

import json

import pytest

from tests.cli.conftest import TABLE


@pytest.fixture
def stack(dep):
    queue = dep.sqs.create_queue(QueueName="tn-Queue4A7E3555-abc")["QueueUrl"]
    dlq = dep.sqs.create_queue(QueueName="tn-DeadLetterQueue-xyz")["QueueUrl"]
    outputs = {
        "TableName": TABLE,
        "QueueUrl": queue,
        "DeadLetterQueueUrl": dlq,
        "ControllerFunctionName": "test-controller",
    }
    template = {
        "Resources": {"Handle": {"Type": "AWS::CloudFormation::WaitConditionHandle"}},
        "Outputs": {k: {"Value": v} for k, v in outputs.items()},
    }
    dep.session.client("cloudformation", endpoint_url=dep.url).create_stack(
        StackName="tn", TemplateBody=json.dumps(template)
    )
    return {"queue": queue, "dlq": dlq}


def test_table_from_the_stack(dep, stack):
    result = dep.run("status", "--json", "--stack", "tn", "--deployment", "test", base=False)
    assert result.code == 0, result.err
    assert result.json()["table"] == TABLE


def test_explicit_table_wins_over_the_stack(dep, stack):
    result = dep.run("status", "--stack", "tn", "--table", "other", base=False)
    assert result.code == 2 and "DynamoDB table 'other' not found" in result.err


def test_queue_and_dlq_from_the_stack(dep, stack):
    result = dep.run("reconcile", "--json", "--stack", "tn", react=False)
    assert result.code == 0, result.err
    assert result.json()["queue_url"] == stack["queue"]
    dep.sqs.send_message(QueueUrl=stack["dlq"], MessageBody="{}")
    dep.ssm_online()
    doc = dep.run("doctor", "--json", "--stack", "tn").json()
    [dlq] = [f for f in doc["findings"] if f["check"] == "dlq"]
    assert dlq["status"] == "fail" and dlq["resource"] == "tn-DeadLetterQueue-xyz"


def test_unknown_stack(dep):
    result = dep.run("status", "--stack", "nope")
    assert result.code == 2
    assert result.err == (
        "tunnelnat: CloudFormation stack 'nope' not found in region us-east-1: check --stack "
        "and --region\n"
    )
