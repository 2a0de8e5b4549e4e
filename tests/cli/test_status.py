from __future__ import annotations

from datetime import timedelta

import jsonschema

from tests.cli.conftest import DEPLOYMENT, TABLE
from tunnelnat_cli.schemas import STATUS

TAG = {"tunnelnat": "enabled"}


def test_status_of_an_empty_deployment(dep):
    result = dep.run("status")
    assert result.code == 0, result.err
    assert f"gateway {dep.gateway_id}" in result.out
    assert "applied 0 / desired 0 (in sync)" in result.out
    assert "no instances enrolled or tagged tunnelnat=enabled" in result.out
    assert "partner" in result.out and "up" in result.out


def test_status_table_shows_enrolled_pending_and_unseen_instances(dep):
    web1 = dep.launch("10.10.1.21", name="web-1")
    assert dep.run("enroll", web1, "--wait").code == 0
    far = dep.launch("10.10.2.30", name="far-1", subnet=dep.other_subnet_id)
    assert dep.run("enroll", far, "--wait").code == 1  # unsupported-subnet
    quiet = dep.launch("10.10.1.40", name="quiet-1", tags=TAG)  # tagged, no event seen

    result = dep.run("status")
    assert result.code == 0, result.err
    lines = {line.split()[0]: line for line in result.out.splitlines() if line.startswith("i-")}
    assert "web-1" in lines[web1] and "203.0.113.10" in lines[web1] and "enrolled" in lines[web1]
    assert "10.10.1.21" in lines[web1]
    assert "unsupported-subnet" in lines[far] and "far-1" in lines[far]
    assert "not-seen" in lines[quiet] and "quiet-1" in lines[quiet]
    assert "1 enrolled, 2 not enrolled" in result.out
    assert "INSTANCE" in result.out and "LAST CHANGE" in result.out


def test_status_json_follows_its_schema(dep):
    web1 = dep.launch("10.10.1.21", name="web-1")
    dep.run("enroll", web1, "--wait")
    dep.launch("10.10.1.40", name="quiet-1", tags=TAG)
    dep.put_metric("backup", 0)
    dep.put_metric("stale", 1, age=timedelta(minutes=10))

    result = dep.run("status", "--json")
    assert result.code == 0, result.err
    doc = result.json()
    jsonschema.validate(doc, STATUS)
    assert doc["schema"] == "tunnelnat.status/v1"
    assert doc["table"] == TABLE and doc["deployment"] == "test" and doc["region"] == "us-east-1"
    assert doc["gateway"]["instance_id"] == dep.gateway_id
    assert doc["gateway"]["in_sync"] is True
    assert doc["gateway"]["applied_generation"] == doc["gateway"]["desired_generation"] == 1
    [row] = [r for r in doc["instances"] if r["instance_id"] == web1]
    assert row == {
        "instance_id": web1,
        "name": "web-1",
        "state": "running",
        "private_ip": "10.10.1.21",
        "public_ip": "203.0.113.10",
        "status": "enrolled",
        "reason": "route and NAT in place",
        "route_installed": True,
        "mapped": True,
        "updated_at": row["updated_at"],
    }
    assert row["updated_at"].endswith("Z")
    assert doc["summary"] == {"total": 2, "enrolled": 1, "pending": 1, "attention": {}}
    tunnels = {t["tunnel"]: t["state"] for t in doc["tunnels"]}
    assert tunnels == {"partner": "up", "backup": "down", "stale": "unknown"}


def test_status_shows_a_gateway_behind(dep):
    web1 = dep.launch("10.10.1.21", name="web-1")
    dep.run("enroll", web1, "--wait")
    dep.dynamodb.update_item(
        TableName=TABLE,
        Key={"pk": {"S": "meta"}, "sk": {"S": "generation"}},
        UpdateExpression="SET generation = :g",
        ExpressionAttributeValues={":g": {"N": "7"}},
    )
    result = dep.run("status")
    assert "applied 1 / desired 7 (BEHIND: run `tunnelnat reconcile`)" in result.out
    assert dep.run("status", "--json").json()["gateway"]["in_sync"] is False


def test_status_only_shows_tunnels_of_this_deployment_and_gateway(dep):
    dep.put_metric("partner", 0, gateway="i-0000000000000dead")  # a replaced gateway
    dep.put_metric("partner", 0, deployment="test")  # covered by the gateway's own series
    dep.put_metric("backup", 1, deployment="test")  # only the deployment's series
    dep.put_metric("backup", 0, deployment="other")  # another deployment
    tunnels = dep.run("status", "--json").json()["tunnels"]
    assert [(t["tunnel"], t["gateway"], t["state"]) for t in tunnels] == [
        ("backup", None, "up"),
        ("partner", dep.gateway_id, "up"),
    ]
    assert "(deployment test)" in dep.run("status").out


def test_status_without_cloudwatch_access_still_shows_the_table(dep):
    from botocore.stub import Stubber

    cloudwatch = dep.session.client("cloudwatch", endpoint_url=dep.url)
    stubber = Stubber(cloudwatch)
    stubber.add_client_error("list_metrics", "AccessDenied", "no", http_status_code=403)
    stubber.activate()
    dep.clients["cloudwatch"] = cloudwatch
    result = dep.run("status", "--json")
    assert result.code == 0
    assert result.json()["tunnels"] == []
    assert result.err == "tunnelnat: tunnels unknown: ListMetrics failed (AccessDenied)\n"


def test_unenroll_of_an_instance_never_enrolled(dep):
    web1 = dep.launch("10.10.1.21")
    result = dep.run("unenroll", web1, "--wait")
    assert result.code == 0
    assert f"{web1} has no tunnelnat tag" in result.out
    assert "was not enrolled: nothing to undo" in result.out


# -- issue 21, finding 7: what an instance wrote reaches the terminal without its controls ------

HOSTILE = "route failed\x1b[2J\x1b]0;pwned\x07\x9b31m\u202egnp.exe\r ok"


def test_status_strips_terminal_controls_from_what_an_instance_wrote(dep):
    web1 = dep.launch("10.10.1.21", name="web-1")
    assert dep.run("enroll", web1, "--wait").code == 0
    dep.dynamodb.update_item(
        TableName=TABLE,
        Key={"pk": {"S": "instance"}, "sk": {"S": web1}},
        UpdateExpression="SET reason = :r",
        ExpressionAttributeValues={":r": {"S": HOSTILE}},
    )
    dep.launch("10.10.1.40", name="evil\u202e-1", tags=TAG)  # a Name tag is theirs too
    result = dep.run("status")
    assert result.code == 0, result.err
    for control in ("\x1b", "\x07", "\x9b", "\u202e", "\r"):
        assert control not in result.out and control not in result.err
    assert "route failedgnp.exe ok" in result.out and "evil-1" in result.out
    # JSON escapes controls itself: the reason is kept there, exactly.
    [row] = [r for r in dep.run("status", "--json").json()["instances"] if r["instance_id"] == web1]
    assert row["reason"] == HOSTILE


def test_a_lookalike_labelled_as_the_gateway_is_not_one_of_its_gateways(dep):
    """Issue 21, 1: the CLI lists gateways by their Auto Scaling group's own tag, never by the
    tunnelnat:* labels anyone can copy onto an instance (status, switchover and psk use the
    list; at b08b1c8 the lookalike was counted as a second gateway)."""
    from tunnelnat_cli.fleet import gateways

    lookalike = dep.launch(
        "10.10.1.79",
        name="lookalike",
        tags={"tunnelnat:role": "gateway", "tunnelnat:deployment": DEPLOYMENT},
    )
    import boto3

    found = [g.instance_id for g in gateways(boto3.client("ec2"), DEPLOYMENT)]
    assert found == [dep.gateway_id] and lookalike not in found
    result = dep.run("status")
    assert result.code == 0, result.err
    assert lookalike not in result.out


def test_status_of_a_single_gateway_shows_the_deployed_software_only(dep):
    """A single gateway has no pair agent to say which package it runs (issue 22)."""
    doc = dep.run("status", "--json").json()
    jsonschema.validate(doc, STATUS)
    software = doc["software"]
    assert software["deployed"] == dep.software
    assert software["gateways"] == [
        {
            "instance_id": dep.gateway_id,
            "version": None,
            "sha256": None,
            "deployed": None,
            "reported_at": None,
        }
    ]
    text = dep.run("status").out
    assert f"software: deployed {dep.software['version']} (sha256 555555555555)" in text
    assert f"{dep.gateway_id} version unknown: a single gateway has no pair agent" in text
