"""The healer and the gateway pair (issue 15): RestartTunnel goes to the active gateway only, the
instance G's ENI is attached to (TUNNELNAT_GATEWAY_ENI_ID, as the stack deploys it), never to
the standby of the same gateway group; it follows the ENI when the standby takes it over, and a
detached ENI (a failover under way) or one held by a stranger is a failed restart, not a command.
"""

from __future__ import annotations

import json
import time

import boto3
import pytest

from tests.lambdas.conftest import REGION, TABLE
from tests.lambdas.test_healer_handler import _launch_member, _serve_gateway, healer_world


@pytest.fixture
def aws(moto_url, monkeypatch):
    """The healer suite's moto rig."""
    yield from healer_world(moto_url, monkeypatch)


def _pair(aws):
    """The fixture's gateway plus a second member of the gateway group (the standby, as Auto
    Scaling launches it); G's ENI detached from the first and left unattached."""
    ec2 = boto3.client("ec2", region_name=REGION)
    other = _launch_member(aws)
    reply = ec2.describe_network_interfaces(NetworkInterfaceIds=[aws.eni_id])
    attachment = reply["NetworkInterfaces"][0]["Attachment"]["AttachmentId"]
    # A plain detach: a forced one leaves the index unusable until a stop/start (strict fakes).
    ec2.detach_network_interface(AttachmentId=attachment)
    return ec2, aws.eni_id, other


def _attach(ec2, eni: str, instance_id: str) -> str:
    return ec2.attach_network_interface(
        NetworkInterfaceId=eni, InstanceId=instance_id, DeviceIndex=1
    )["AttachmentId"]


def _restart(aws) -> dict:
    return aws.invoke(aws.event("ALARM", aws.set_alarm("ALARM")))


def test_restart_goes_to_the_eni_holder_whichever_id_sorts_last(aws, monkeypatch):
    ec2, eni, other = _pair(aws)
    # The holder sorts first: by the tags alone the healer would take the other one.
    active, standby = sorted([aws.gateway_id, other])
    _attach(ec2, eni, active)
    _serve_gateway(aws, monkeypatch, TUNNELNAT_GATEWAY_ENI_ID=eni)
    out = _restart(aws)
    assert out["action"] == "restart" and out["status"] == "Success"
    assert [call[0] for call in aws.port.calls] == [active]
    assert standby not in json.dumps(out)


def test_after_a_failover_restart_follows_the_eni_to_the_new_active(aws, monkeypatch):
    ec2, eni, other = _pair(aws)
    attachment = _attach(ec2, eni, aws.gateway_id)
    _serve_gateway(aws, monkeypatch, TUNNELNAT_GATEWAY_ENI_ID=eni)
    assert _restart(aws)["status"] == "Success"
    # The standby's agent takes the ENI over (force-detach, attach), as PAIR.md describes.
    ec2.detach_network_interface(AttachmentId=attachment, Force=True)
    _attach(ec2, eni, other)
    monkeypatch.setenv("TUNNELNAT_HEALER_BACKOFF_BASE_SECONDS", "1")
    _serve_gateway(aws, monkeypatch)
    time.sleep(1.1)
    assert _restart(aws)["status"] == "Success"
    assert [call[0] for call in aws.port.calls] == [aws.gateway_id, other]


def test_split_brain_both_claim_active_the_attachment_decides(aws, monkeypatch):
    """Both gateways' agents think they are active (a partition between them): the healer asks
    EC2, not them, and restarts only where the ENI is."""
    ec2, eni, other = _pair(aws)
    _attach(ec2, eni, other)
    for instance_id in (aws.gateway_id, other):
        aws.dynamodb.put_item(
            TableName=TABLE,
            Item={
                "pk": {"S": "gateway"},
                "sk": {"S": instance_id},
                "role": {"S": "active"},
                "updated_at": {"N": str(int(time.time()))},
            },
        )
    _serve_gateway(aws, monkeypatch, TUNNELNAT_GATEWAY_ENI_ID=eni)
    assert _restart(aws)["status"] == "Success"
    assert [call[0] for call in aws.port.calls] == [other]


def test_a_detached_eni_is_a_failed_restart_sent_nowhere(aws, monkeypatch):
    ec2, eni, _ = _pair(aws)
    _serve_gateway(aws, monkeypatch, TUNNELNAT_GATEWAY_ENI_ID=eni)
    out = _restart(aws)
    assert out["action"] == "restart" and out["status"] == "Error"
    assert aws.port.calls == []
    [attempt] = json.loads(aws.record()["attempts"]["S"])
    assert "attached to no gateway" in attempt["detail"]


def test_an_eni_held_by_a_stranger_is_never_sent_a_command(aws, monkeypatch):
    ec2, eni, _ = _pair(aws)
    [raw] = ec2.describe_instances(InstanceIds=[aws.gateway_id])["Reservations"][0]["Instances"]
    stranger = ec2.run_instances(
        ImageId="ami-12345678", MinCount=1, MaxCount=1, SubnetId=raw["SubnetId"]
    )["Instances"][0]["InstanceId"]
    _attach(ec2, eni, stranger)
    _serve_gateway(aws, monkeypatch, TUNNELNAT_GATEWAY_ENI_ID=eni)
    out = _restart(aws)
    assert out["status"] == "Error" and aws.port.calls == []
    [attempt] = json.loads(aws.record()["attempts"]["S"])
    assert f"attached to {stranger}, which is not a gateway of test" in attempt["detail"]
