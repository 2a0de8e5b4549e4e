from __future__ import annotations

import jsonschema
import pytest

from tests.cli.conftest import TABLE
from tunnelnat_cli.schemas import ENROLL


def test_enroll_wait_follows_the_controller_to_enrolled(dep):
    web1 = dep.launch("10.10.1.21", name="web-1")
    result = dep.run("enroll", web1, "--wait")
    assert result.code == 0, result.err
    assert f"tagged {web1} (web-1) tunnelnat=enabled" in result.out
    assert f"{web1}: enrolled as 203.0.113.10" in result.out
    assert dep.tags(web1)["tunnelnat"] == "enabled"
    assert dep.fleet.routes[web1] == {"192.0.2.0/24"}
    assert [c.action for c in dep.changes] == ["enroll"]


def test_enroll_wait_shows_progress_until_the_controller_acts(dep):
    """The controller reacts late (a queue in between): the CLI polls and says what it sees."""
    web1 = dep.launch("10.10.1.21", name="web-1")
    polls = []

    def sleep(seconds):
        polls.append(seconds)
        dep.clock.t += seconds
        if len(polls) == 3:
            dep.handle(web1)

    dep.clock.sleep = sleep
    result = dep.run("enroll", web1, "--wait", "--interval", "5", react=False)
    assert result.code == 0, result.err
    assert polls == [5, 5, 5]
    assert f"[    0s] {web1} (web-1): no record yet" in result.err
    assert "enrolled as 203.0.113.10" in result.out


def test_enroll_without_wait_only_tags(dep):
    web1 = dep.launch("10.10.1.21")
    result = dep.run("enroll", web1, react=False)
    assert result.code == 0, result.err
    assert "not waiting" in result.out
    assert dep.tags(web1) == {"tunnelnat": "enabled"}
    assert dep.items("instance") == {}


def test_enroll_json_follows_its_schema(dep):
    web1 = dep.launch("10.10.1.21")
    result = dep.run("enroll", web1, "--wait", "--json")
    assert result.code == 0, result.err
    doc = result.json()
    jsonschema.validate(doc, ENROLL)
    assert doc["result"] == "enrolled" and doc["public_ip"] == "203.0.113.10"
    assert doc["status"] == "enrolled" and doc["fix"] is None
    assert "tagged" in result.err, "human text goes to stderr when stdout carries JSON"


def test_enroll_in_an_unsupported_subnet_fails_with_the_fix(dep):
    far = dep.launch("10.10.2.30", subnet=dep.other_subnet_id)
    result = dep.run("enroll", far, "--wait")
    assert result.code == 1
    assert f"{far}: unsupported-subnet: 10.10.2.30 is outside the gateway's subnet" in result.err
    assert "fix: launch the instance in the gateway's subnet" in result.err


def test_enroll_when_the_pool_is_exhausted_fails_with_the_fix(dep):
    for i in range(3):
        assert dep.run("enroll", dep.launch(f"10.10.1.{21 + i}"), "--wait").code == 0
    fourth = dep.launch("10.10.1.24")
    result = dep.run("enroll", fourth, "--wait", "--json")
    assert result.code == 1
    doc = result.json()
    assert doc["result"] == "failed" and doc["status"] == "pool-exhausted"
    assert "add Elastic IPs to the address pool" in doc["fix"]


def test_enroll_a_stopped_instance_says_it_waits_for_the_start(dep):
    web1 = dep.launch("10.10.1.21")
    dep.ec2.stop_instances(InstanceIds=[web1])
    result = dep.run("enroll", web1, "--wait")
    assert result.code == 1
    assert "is stopped; it is enrolled once it runs" in result.out
    assert "not-running" in result.err and "fix: start the instance" in result.err


def test_enroll_an_already_enrolled_instance_returns_at_once(dep):
    web1 = dep.launch("10.10.1.21")
    dep.run("enroll", web1, "--wait")
    result = dep.run("enroll", web1, "--wait", react=False)
    assert result.code == 0
    assert "already carries tunnelnat=enabled" in result.out
    assert dep.clock.sleeps == []


def test_enroll_wait_times_out_when_nothing_happens(dep):
    web1 = dep.launch("10.10.1.21")
    result = dep.run("enroll", web1, "--wait", "--timeout", "30", "--interval", "10", react=False)
    assert result.code == 1
    assert f"{web1}: timed out after 30s; last: no record yet" in result.err
    assert "tunnelnat doctor" in result.err
    assert sum(dep.clock.sleeps) == pytest.approx(30)


def test_an_old_failure_is_not_taken_for_the_answer(dep):
    """A pool-exhausted record from before the tag changed is stale: keep waiting."""
    for i in range(3):
        dep.run("enroll", dep.launch(f"10.10.1.{21 + i}"), "--wait")
    fourth = dep.launch("10.10.1.24")
    assert dep.run("enroll", fourth, "--wait").code == 1
    result = dep.run("enroll", fourth, "--wait", "--timeout", "4", react=False)
    assert result.code == 1 and "timed out" in result.err


def test_unenroll_wait_removes_mapping_route_and_tag(dep):
    web1 = dep.launch("10.10.1.21", name="web-1")
    dep.run("enroll", web1, "--wait")
    result = dep.run("unenroll", web1, "--wait")
    assert result.code == 0, result.err
    assert f"removed tag tunnelnat from {web1} (web-1)" in result.out
    assert f"{web1}: mapping and route removed" in result.out
    assert "tunnelnat" not in dep.tags(web1)
    assert dep.items("mapping") == {} and web1 not in dep.fleet.routes


def test_unenroll_json(dep):
    web1 = dep.launch("10.10.1.21")
    dep.run("enroll", web1, "--wait")
    doc = dep.run("unenroll", web1, "--wait", "--json").json()
    jsonschema.validate(doc, ENROLL)
    assert doc["action"] == "unenroll" and doc["result"] == "unenrolled"


def test_custom_enrolment_tag(dep):
    web1 = dep.launch("10.10.1.21")
    result = dep.run("enroll", web1, "--tag-key", "team:vpn", "--tag-value", "on", react=False)
    assert result.code == 0
    assert dep.tags(web1) == {"team:vpn": "on"}


@pytest.mark.parametrize("value", ["$(id)", "a;b", "aws:x"])
def test_hostile_tag_values_are_refused_before_any_call(dep, value):
    web1 = dep.launch("10.10.1.21")
    result = dep.run("enroll", web1, "--tag-value", value)
    assert result.code == 2
    assert "argument --tag-value" in result.err
    assert dep.tags(web1) == {}


@pytest.mark.parametrize("command", ["enroll", "unenroll"])
def test_malformed_instance_id(dep, command):
    result = dep.run(command, "web-1")
    assert result.code == 2
    assert result.err == (
        "tunnelnat: not an EC2 instance ID: 'web-1' (expected i- and 8 or 17 hex digits, "
        "e.g. i-0123456789abcdef0)\n"
    )


@pytest.mark.parametrize("command", ["enroll", "unenroll"])
def test_unknown_instance(dep, command):
    result = dep.run(command, "i-0123456789abcdef0")
    assert result.code == 2
    assert result.err == (
        "tunnelnat: instance i-0123456789abcdef0 not found in region us-east-1: check the ID, "
        "--region and --profile\n"
    )


def test_unenroll_a_vanished_instance_still_in_the_table_points_at_reconcile(dep):
    dep.dynamodb.put_item(
        TableName=TABLE,
        Item={
            "pk": {"S": "mapping"},
            "sk": {"S": "i-0123456789abcdef0"},
            "private_ip": {"S": "10.10.1.99"},
            "public_ip": {"S": "203.0.113.12"},
        },
    )
    result = dep.run("unenroll", "i-0123456789abcdef0")
    assert result.code == 2
    assert "no longer exists but the table still lists it" in result.err
    assert "tunnelnat reconcile i-0123456789abcdef0" in result.err


def test_the_gateway_and_terminated_instances_cannot_be_enrolled(dep):
    result = dep.run("enroll", dep.gateway_id)
    assert result.code == 2 and "is a tunnelnat gateway" in result.err
    gone = dep.launch("10.10.1.30")
    dep.ec2.terminate_instances(InstanceIds=[gone])
    result = dep.run("enroll", gone)
    assert result.code == 2 and "is terminated: it cannot be enrolled" in result.err
