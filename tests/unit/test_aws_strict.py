"""tools/aws_strict.py: the strict fakes refuse and delay as AWS does, where moto alone does not.

One SerialMotoServer (strict) and, for the contrast, moto's plain ThreadedMotoServer on another
port: both serve the same in-process moto backends, so the same call can be shown refused through
one door and accepted through the other.
"""

from __future__ import annotations

import threading
import time
import urllib.request

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError
from moto.moto_server.threaded_moto_server import ThreadedMotoServer

from tools.aws_strict import StrictClient
from tools.moto_server import SerialMotoServer

REGION = "eu-west-1"
NO_RETRY = Config(retries={"total_max_attempts": 1, "mode": "standard"})


@pytest.fixture(scope="module")
def servers():
    strict = SerialMotoServer()
    strict.start()
    plain = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    plain.start()
    host, port = plain.get_host_and_port()
    yield strict.url, f"http://{host}:{port}"
    plain.stop()
    strict.stop()


@pytest.fixture
def url(servers):
    strict_url, _ = servers
    urllib.request.urlopen(urllib.request.Request(f"{strict_url}/moto-api/reset", method="POST"))
    return strict_url


@pytest.fixture
def plain_url(servers, url):
    return servers[1]


def client(url, service="ec2", key="AKIATESTSTRICT", config=NO_RETRY):
    return boto3.client(
        service,
        endpoint_url=url,
        region_name=REGION,
        aws_access_key_id=key,
        aws_secret_access_key="secret",
        config=config,
    )


@pytest.fixture
def world(url):
    """A subnet, two instances (one interface each) and a free ENI."""
    ec2 = client(url)
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.0.0.0/24")["Subnet"]["SubnetId"]
    run = ec2.run_instances(ImageId="ami-12c6146b", MinCount=2, MaxCount=2, SubnetId=subnet)
    a, b = (i["InstanceId"] for i in run["Instances"])
    eni = ec2.create_network_interface(SubnetId=subnet)["NetworkInterface"]["NetworkInterfaceId"]
    return {"ec2": ec2, "vpc": vpc, "subnet": subnet, "a": a, "b": b, "eni": eni}


def code_of(excinfo) -> str:
    return excinfo.value.response["Error"]["Code"]


def attachment(ec2, eni) -> dict:
    return (
        ec2.describe_network_interfaces(NetworkInterfaceIds=[eni])["NetworkInterfaces"][0].get(
            "Attachment"
        )
        or {}
    )


def instance_attachment(ec2, instance, eni) -> dict:
    reply = ec2.describe_instances(InstanceIds=[instance])
    for nic in reply["Reservations"][0]["Instances"][0]["NetworkInterfaces"]:
        if nic["NetworkInterfaceId"] == eni:
            return nic["Attachment"]
    return {}


# -- always on ------------------------------------------------------------------------------------


def test_source_dest_check_on_an_instance_with_two_interfaces_is_refused(world, plain_url):
    ec2, a = world["ec2"], world["a"]
    ec2.modify_instance_attribute(InstanceId=a, SourceDestCheck={"Value": False})  # one: fine
    ec2.attach_network_interface(NetworkInterfaceId=world["eni"], InstanceId=a, DeviceIndex=1)
    with pytest.raises(ClientError) as refused:
        ec2.modify_instance_attribute(InstanceId=a, SourceDestCheck={"Value": False})
    assert code_of(refused) == "InvalidInstanceID"
    assert refused.value.response["Error"]["Message"] == (
        f"There are multiple interfaces attached to instance '{a}'. "
        "Please specify an interface ID for the operation instead."
    )
    assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    # The primary interface itself is what EC2 wants changed.
    primary = ec2.describe_network_interfaces(
        Filters=[{"Name": "attachment.instance-id", "Values": [a]}]
    )["NetworkInterfaces"]
    first = next(n for n in primary if n["Attachment"]["DeviceIndex"] == 0)
    ec2.modify_network_interface_attribute(
        NetworkInterfaceId=first["NetworkInterfaceId"], SourceDestCheck={"Value": False}
    )
    # moto alone accepts it.
    client(plain_url).modify_instance_attribute(InstanceId=a, SourceDestCheck={"Value": False})


def test_attaching_an_interface_in_use_is_refused(world, plain_url):
    ec2, eni = world["ec2"], world["eni"]
    ec2.attach_network_interface(NetworkInterfaceId=eni, InstanceId=world["a"], DeviceIndex=1)
    with pytest.raises(ClientError) as refused:
        ec2.attach_network_interface(NetworkInterfaceId=eni, InstanceId=world["b"], DeviceIndex=1)
    assert code_of(refused) == "InvalidNetworkInterface.InUse"
    assert refused.value.response["Error"]["Message"] == f"Interface: [{eni}] in use."
    assert attachment(ec2, eni)["InstanceId"] == world["a"]
    # moto alone moves it.
    client(plain_url).attach_network_interface(
        NetworkInterfaceId=eni, InstanceId=world["b"], DeviceIndex=1
    )
    assert attachment(ec2, eni)["InstanceId"] == world["b"]


def test_an_occupied_device_index_is_refused(world):
    ec2 = world["ec2"]
    other = ec2.create_network_interface(SubnetId=world["subnet"])["NetworkInterface"]
    ec2.attach_network_interface(
        NetworkInterfaceId=world["eni"], InstanceId=world["a"], DeviceIndex=1
    )
    with pytest.raises(ClientError) as refused:
        ec2.attach_network_interface(
            NetworkInterfaceId=other["NetworkInterfaceId"], InstanceId=world["a"], DeviceIndex=1
        )
    assert code_of(refused) == "InvalidParameterValue"
    assert refused.value.response["Error"]["Message"] == (
        f"Instance '{world['a']}' already has an interface attached at device index '1'."
    )


def test_a_forced_detach_leaves_the_index_unusable_until_stop_and_start(world, url):
    ec2, a, eni = world["ec2"], world["a"], world["eni"]
    att = ec2.attach_network_interface(NetworkInterfaceId=eni, InstanceId=a, DeviceIndex=1)
    ec2.detach_network_interface(AttachmentId=att["AttachmentId"], Force=True)
    assert attachment(ec2, eni) == {}
    with pytest.raises(ClientError) as refused:
        ec2.attach_network_interface(NetworkInterfaceId=eni, InstanceId=a, DeviceIndex=1)
    assert code_of(refused) == "InvalidParameterValue"
    assert StrictClient(url).blocked() == [
        {"instance": a, "device_index": 1, "eni": eni, "region": REGION}
    ]
    ec2.reboot_instances(InstanceIds=[a])  # a reboot is not a stop/start
    with pytest.raises(ClientError):
        ec2.attach_network_interface(NetworkInterfaceId=eni, InstanceId=a, DeviceIndex=1)
    # Another index works; so does the same index on another instance.
    att2 = ec2.attach_network_interface(NetworkInterfaceId=eni, InstanceId=a, DeviceIndex=2)
    ec2.detach_network_interface(AttachmentId=att2["AttachmentId"])  # not forced: no block
    ec2.attach_network_interface(NetworkInterfaceId=eni, InstanceId=a, DeviceIndex=2)
    ec2.detach_network_interface(AttachmentId=attachment(ec2, eni)["AttachmentId"])
    ec2.stop_instances(InstanceIds=[a])
    ec2.start_instances(InstanceIds=[a])
    ec2.attach_network_interface(NetworkInterfaceId=eni, InstanceId=a, DeviceIndex=1)
    assert attachment(ec2, eni)["DeviceIndex"] == 1
    codes = [e["code"] for e in StrictClient(url).log()]
    assert codes[:3] == ["index-blocked", "InvalidParameterValue", "InvalidParameterValue"]
    assert "unblocked" in codes


def test_a_duplicate_route_is_refused(world, plain_url):
    ec2 = world["ec2"]
    table = ec2.create_route_table(VpcId=world["vpc"])["RouteTable"]["RouteTableId"]
    ec2.create_route(
        RouteTableId=table, DestinationCidrBlock="10.9.0.0/24", NetworkInterfaceId=world["eni"]
    )
    with pytest.raises(ClientError) as refused:
        ec2.create_route(
            RouteTableId=table, DestinationCidrBlock="10.9.0.0/24", NetworkInterfaceId=world["eni"]
        )
    assert code_of(refused) == "RouteAlreadyExists"
    assert refused.value.response["Error"]["Message"] == (
        "The route identified by 10.9.0.0/24 already exists."
    )
    with pytest.raises(ClientError) as refused:  # the local route is a route like any other
        ec2.create_route(
            RouteTableId=table, DestinationCidrBlock="10.0.0.0/16", NetworkInterfaceId=world["eni"]
        )
    assert code_of(refused) == "RouteAlreadyExists"
    # moto alone overwrites a route whose target is an interface.
    client(plain_url).create_route(
        RouteTableId=table, DestinationCidrBlock="10.9.0.0/24", NetworkInterfaceId=world["eni"]
    )


def test_the_primary_interface_never_detaches(world, plain_url):
    ec2, a = world["ec2"], world["a"]
    ec2.attach_network_interface(NetworkInterfaceId=world["eni"], InstanceId=a, DeviceIndex=1)
    reply = ec2.describe_instances(InstanceIds=[a])["Reservations"][0]["Instances"][0]
    primary = next(n for n in reply["NetworkInterfaces"] if n["Attachment"]["DeviceIndex"] == 0)
    with pytest.raises(ClientError) as refused:
        ec2.detach_network_interface(AttachmentId=primary["Attachment"]["AttachmentId"])
    assert code_of(refused) == "OperationNotPermitted"


# -- configurable delays ------------------------------------------------------------------------


def test_attach_takes_attach_seconds(world, url):
    ec2, a, eni = world["ec2"], world["a"], world["eni"]
    StrictClient(url).configure(attach_seconds=0.6)
    ec2.attach_network_interface(NetworkInterfaceId=eni, InstanceId=a, DeviceIndex=1)
    assert attachment(ec2, eni)["Status"] == "attaching"
    assert instance_attachment(ec2, a, eni)["Status"] == "attaching"
    time.sleep(0.7)
    assert attachment(ec2, eni)["Status"] == "attached"
    assert instance_attachment(ec2, a, eni)["Status"] == "attached"


def test_detach_takes_detach_seconds_and_the_eni_stays_in_use(world, url):
    ec2, a, b, eni = world["ec2"], world["a"], world["b"], world["eni"]
    strict = StrictClient(url)
    att = ec2.attach_network_interface(NetworkInterfaceId=eni, InstanceId=a, DeviceIndex=1)
    strict.configure(detach_seconds=0.6)
    ec2.detach_network_interface(AttachmentId=att["AttachmentId"], Force=True)
    seen = attachment(ec2, eni)
    assert (seen["Status"], seen["InstanceId"]) == ("detaching", a)
    with pytest.raises(ClientError) as refused:
        ec2.attach_network_interface(NetworkInterfaceId=eni, InstanceId=b, DeviceIndex=1)
    assert code_of(refused) == "InvalidNetworkInterface.InUse"
    time.sleep(0.7)
    reply = ec2.describe_network_interfaces(NetworkInterfaceIds=[eni])["NetworkInterfaces"][0]
    assert reply["Status"] == "available" and "Attachment" not in reply
    ec2.attach_network_interface(NetworkInterfaceId=eni, InstanceId=b, DeviceIndex=1)
    assert [e["code"] for e in strict.log() if e["code"] in ("detaching", "detached")] == [
        "detaching",
        "detached",
    ]
    assert {"instance": a, "device_index": 1, "eni": eni, "region": REGION} in strict.blocked()


def test_stale_reads_after_an_attachment_change(world, url):
    ec2, a, eni = world["ec2"], world["a"], world["eni"]
    StrictClient(url).configure(stale_reads=2)
    ec2.attach_network_interface(NetworkInterfaceId=eni, InstanceId=a, DeviceIndex=1)
    assert attachment(ec2, eni) == {}  # the view from before the attach, twice
    assert attachment(ec2, eni) == {}
    assert attachment(ec2, eni)["InstanceId"] == a
    assert [e["code"] for e in StrictClient(url).log()].count("stale-read") == 2


def test_slow_delays_one_access_key_and_holds_nobody_else(url):
    strict = StrictClient(url)
    slow_db = client(url, "dynamodb", key="AKIATNGW1")
    fast_db = client(url, "dynamodb", key="AKIATNGW2")
    fast_db.create_table(
        TableName="t",
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )
    strict.slow("AKIATNGW1", seconds=1.0, duration=30)
    done = {}

    def slow_call():
        started = time.monotonic()
        slow_db.get_item(TableName="t", Key={"pk": {"S": "x"}})
        done["slow"] = time.monotonic() - started

    thread = threading.Thread(target=slow_call)
    thread.start()
    time.sleep(0.1)
    started = time.monotonic()
    fast_db.get_item(TableName="t", Key={"pk": {"S": "x"}})
    fast = time.monotonic() - started
    thread.join()
    assert done["slow"] >= 1.0
    assert fast < 0.5  # not queued behind the delayed call (the delay is outside the lock)
    started = time.monotonic()
    client(url, key="AKIATNGW1").describe_instances()  # EC2 too
    assert time.monotonic() - started >= 1.0
    delays = [e for e in strict.log() if e["code"] == "delay"]
    assert [(e["action"], e["access_key"]) for e in delays] == [
        ("GetItem", "AKIATNGW1"),
        ("DescribeInstances", "AKIATNGW1"),
    ]


def test_slow_ends_after_its_duration(url):
    StrictClient(url).slow("AKIATNGW1", seconds=1.0, duration=0.2, services=["ec2"])
    time.sleep(0.3)
    started = time.monotonic()
    client(url, key="AKIATNGW1").describe_instances()
    assert time.monotonic() - started < 0.5


def test_throttled_ec2_call_is_retried_by_botocore(world, url):
    strict = StrictClient(url)
    strict.throttle("DescribeNetworkInterfaces", 2)
    retrying = client(url, config=Config(retries={"max_attempts": 5, "mode": "standard"}))
    reply = retrying.describe_network_interfaces(NetworkInterfaceIds=[world["eni"]])
    assert reply["ResponseMetadata"]["RetryAttempts"] == 2
    strict.throttle("DescribeNetworkInterfaces", 1, access_key="AKIAOTHER")
    world["ec2"].describe_network_interfaces()  # another key: not throttled
    with pytest.raises(ClientError) as refused:
        client(url, key="AKIAOTHER").describe_network_interfaces()
    assert code_of(refused) == "RequestLimitExceeded"
    assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    assert [e["code"] for e in strict.log()] == ["RequestLimitExceeded"] * 3


def test_throttled_dynamodb_call_answers_dynamodbs_error(url):
    db = client(url, "dynamodb")
    db.create_table(
        TableName="t",
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )
    StrictClient(url).throttle("PutItem", 1)
    with pytest.raises(ClientError) as refused:
        db.put_item(TableName="t", Item={"pk": {"S": "x"}})
    assert code_of(refused) == "ProvisionedThroughputExceededException"
    db.put_item(TableName="t", Item={"pk": {"S": "x"}})
    StrictClient(url).throttle("DescribeTable", 1)
    with pytest.raises(ClientError) as refused:
        db.describe_table(TableName="t")
    assert code_of(refused) == "ThrottlingException"


# -- calls moto lacks ------------------------------------------------------------------------------


def test_signal_resource_and_complete_lifecycle_action_are_answered_and_recorded(url):
    strict = StrictClient(url)
    client(url, "cloudformation").signal_resource(
        StackName="tunnelnat", LogicalResourceId="GatewayGroup", UniqueId="i-1", Status="SUCCESS"
    )
    client(url, "autoscaling").complete_lifecycle_action(
        LifecycleHookName="tunnelnat-test-gateway-terminating",
        AutoScalingGroupName="gw",
        InstanceId="i-1",
        LifecycleActionResult="CONTINUE",
    )
    [signal] = strict.signals()
    assert {k: signal[k] for k in ("stack", "logical_resource_id", "unique_id", "status")} == {
        "stack": "tunnelnat",
        "logical_resource_id": "GatewayGroup",
        "unique_id": "i-1",
        "status": "SUCCESS",
    }
    [action] = strict.lifecycle_actions()
    assert (action["hook"], action["group"], action["instance"], action["result"]) == (
        "tunnelnat-test-gateway-terminating",
        "gw",
        "i-1",
        "CONTINUE",
    )
    with pytest.raises(ClientError) as refused:
        client(url, "cloudformation").signal_resource(
            StackName="s", LogicalResourceId="G", UniqueId="i-1", Status="MAYBE"
        )
    assert code_of(refused) == "ValidationError"


def test_moto_reset_resets_the_strict_fakes_too(url):
    strict = StrictClient(url)
    strict.configure(attach_seconds=3, detach_seconds=4, stale_reads=1)
    strict.throttle("DescribeInstances", 5)
    assert strict.config()["attach_seconds"] == 3
    urllib.request.urlopen(urllib.request.Request(f"{url}/moto-api/reset", method="POST"))
    assert strict.config() == {
        "attach_seconds": 0.0,
        "detach_seconds": 0.0,
        "stale_reads": 0,
        "slow": [],
        "throttle": [],
    }
    strict.configure(stale_reads=1)
    strict.reset()
    assert strict.config()["stale_reads"] == 0 and strict.log() == []
