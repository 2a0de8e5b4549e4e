"""Arbitrary EC2 worlds (issue 14): several VPCs with the same ranges, addresses that overlap
across them, impostor gateways (tagged like ours, in our VPC without G, or holding "G" in another
VPC), a stale mapping left by an instance that is gone (and one written before private
addresses were claimed), instances appearing and vanishing with their events delivered or lost.
Whatever the world, after the scheduled reconcile:

- the gateway's table is valid: no private or public address twice, nothing left out;
- every servable instance (running, tagged, in our VPC and the gateway's subnet) is enrolled;
- no unservable instance is mapped, and nothing is ever sent to an impostor.
"""

from __future__ import annotations

import itertools
import time
import urllib.request
from ipaddress import IPv4Address

import boto3
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.lambdas.conftest import REGION, FakeFleet, create_enrolment_table
from tests.lambdas.events import state_change, tag_change
from tunnelnat.adapters.ec2 import Ec2Instances
from tunnelnat.adapters.store import EnrolmentStore
from tunnelnat.controller import Controller
from tunnelnat.core.config import TunnelnatConfig
from tunnelnat.core.enrolment import status_tag
from tunnelnat.core.nat import NatTable
from tunnelnat.events import parse_request
from tunnelnat.service import Service

G = "10.20.0.5"
CONFIG = TunnelnatConfig.from_mapping(
    {
        "partner_endpoint": "198.51.100.40",
        "partner_networks": ["192.0.2.0/24"],
        "address_pool": [f"203.0.113.{10 + i}" for i in range(8)],
        "gateway_private_ip": G,
        "gateway_subnet_cidr": "10.20.0.0/24",
    }
)
TAG = {"Key": "tunnelnat", "Value": "enabled"}
GATEWAY_TAGS = [
    {"Key": "tunnelnat:role", "Value": "gateway"},
    {"Key": "tunnelnat:deployment", "Value": "prop"},
]
SLOTS = 4  # addresses per example: the same slot in two VPCs is the same address
# moto keeps every instance (and its address) until a reset, and its tag filter slows with
# them: AWS starts over every few examples (see test_convergence_property.py).
EXAMPLES_PER_RESET = 20
tables = itertools.count()


class Worlds:
    def __init__(self, moto_url: str) -> None:
        self.moto_url = moto_url
        self.ec2 = boto3.client("ec2", region_name=REGION)
        self.dynamodb = boto3.client("dynamodb", region_name=REGION)
        self.examples = 0

    def _reset(self) -> None:
        request = urllib.request.Request(f"{self.moto_url}/moto-api/reset", method="POST")
        urllib.request.urlopen(request).close()
        self.subnets = {}
        ours = self.ec2.create_vpc(CidrBlock="10.20.0.0/16")["Vpc"]["VpcId"]
        other = self.ec2.create_vpc(CidrBlock="10.20.0.0/16")["Vpc"]["VpcId"]
        self.vpc = ours
        for name, vpc, cidr in (
            ("ours", ours, "10.20.0.0/24"),
            ("outside", ours, "10.20.1.0/24"),
            ("other", other, "10.20.0.0/24"),
        ):
            subnet = self.ec2.create_subnet(VpcId=vpc, CidrBlock=cidr)["Subnet"]["SubnetId"]
            self.subnets[name] = subnet
        self.gateway = self.run("ours", "10.20.0.4", GATEWAY_TAGS)
        self.attach_g("ours", self.gateway)
        # Another VPC's instance tagged like our gateway and holding "G" there: never ours.
        self.far_gateway = self.run("other", "10.20.0.4", GATEWAY_TAGS)
        self.attach_g("other", self.far_gateway)
        self.offset = 10

    def attach_g(self, where: str, instance_id: str) -> None:
        eni = self.ec2.create_network_interface(SubnetId=self.subnets[where], PrivateIpAddress=G)
        self.ec2.attach_network_interface(
            NetworkInterfaceId=eni["NetworkInterface"]["NetworkInterfaceId"],
            InstanceId=instance_id,
            DeviceIndex=1,
        )

    def run(self, where: str, address: str, tags: list[dict]) -> str:
        spec = {"SubnetId": self.subnets[where], "PrivateIpAddress": address}
        if tags:
            spec["TagSpecifications"] = [{"ResourceType": "instance", "Tags": tags}]
        reply = self.ec2.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1, **spec)
        return reply["Instances"][0]["InstanceId"]

    def address(self, where: str, slot: int) -> str:
        return f"10.20.{1 if where == 'outside' else 0}.{self.offset + slot}"

    def start(self) -> tuple[str, FakeFleet, Service]:
        if self.examples % EXAMPLES_PER_RESET == 0:
            self._reset()
        else:
            self.offset += SLOTS + 4  # fresh addresses (moto never frees one): slots, impostor,
            # two launches
        self.examples += 1
        table = f"world-{next(tables)}"
        create_enrolment_table(self.dynamodb, table)
        fleet = FakeFleet(self.dynamodb, gateway_id=self.gateway)
        instances = Ec2Instances(
            self.ec2, status_tag=status_tag("prop"), gateway_ip=IPv4Address(G), vpc_id=self.vpc
        )
        controller = Controller(
            CONFIG,
            store=EnrolmentStore(self.dynamodb, table),
            instances=instances,
            commands=fleet,
            deployment="prop",
            region=REGION,
            vpc_id=self.vpc,
        )
        return table, fleet, Service(controller)


@pytest.fixture(scope="module")
def worlds(moto_url):
    return Worlds(moto_url)


instance_specs = st.lists(
    st.tuples(
        st.sampled_from(["ours", "ours", "other", "outside"]),
        st.integers(0, SLOTS - 1),
        st.booleans(),  # tagged
    ),
    min_size=1,
    max_size=5,
    unique_by=lambda spec: spec[:2],  # moto refuses one address twice in a subnet
)
operations = st.lists(
    st.tuples(
        st.sampled_from(["tag", "untag", "stop", "start", "terminate", "launch"]),
        st.integers(0, 9),
        st.booleans(),  # its event is delivered (False: lost)
    ),
    max_size=6,
)
stale = st.one_of(
    st.none(), st.tuples(st.integers(0, SLOTS - 1), st.booleans())
)  # (slot, with claim)

STATS = {"examples": 0, "seconds": 0.0}


@pytest.mark.spread
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(specs=instance_specs, ops=operations, stale=stale, impostor=st.booleans())
def test_any_world_converges_and_the_table_stays_valid(worlds, specs, ops, stale, impostor):
    started = time.monotonic()
    table, fleet, service = worlds.start()
    store = service.controller.store
    ids: list[str] = []
    if impostor:  # tagged like our gateway, in our VPC, without G
        ids.append(worlds.run("ours", worlds.address("ours", SLOTS), GATEWAY_TAGS))
    if stale is not None:  # a gone instance's mapping at an address a live one may have now
        slot, claimed = stale
        gone = "i-0deadbeefdeadbeef"
        private = IPv4Address(worlds.address("ours", slot))
        store.put_mapping(gone, private, IPv4Address("203.0.113.17"), claim=True, previous=None)
        if not claimed:
            # A mapping from before private claims: no claim, and no mark of one on it.
            key = {"pk": {"S": "private"}, "sk": {"S": str(private)}}
            worlds.dynamodb.delete_item(TableName=table, Key=key)
            worlds.dynamodb.update_item(
                TableName=table,
                Key={"pk": {"S": "mapping"}, "sk": {"S": gone}},
                UpdateExpression="REMOVE private_claimed",
            )
    try:
        for where, slot, tagged in specs:
            ids.append(worlds.run(where, worlds.address(where, slot), [TAG] if tagged else []))
        _play(worlds, service, fleet, ids, specs, ops, impostor)
    finally:
        # The next example's scheduled reconcile must not find this one's instances.
        if ids:
            worlds.ec2.terminate_instances(InstanceIds=ids)
        worlds.dynamodb.delete_table(TableName=table)
    STATS["examples"] += 1
    STATS["seconds"] += time.monotonic() - started


def _play(worlds, service, fleet, ids, specs, ops, impostor) -> None:
    ec2 = worlds.ec2
    store = service.controller.store

    def deliver(event: dict) -> None:
        service.process([parse_request(event)])  # failures come back with the schedule

    for instance_id in ids:
        deliver(state_change(instance_id, "running"))
    launched: set[str] = set()
    for op, index, delivered in ops:
        if op == "launch":
            slot = SLOTS + 1 + index % 2  # beyond the specs' slots, in our subnet
            address = worlds.address("ours", slot)
            if address in launched:
                continue
            launched.add(address)
            ids.append(worlds.run("ours", address, [TAG]))
            event = state_change(ids[-1], "running")
            if delivered:
                deliver(event)
            continue
        instance_id = ids[index % len(ids)]
        state = _state(ec2, instance_id)[0]
        if op == "tag" and state != "terminated":
            ec2.create_tags(Resources=[instance_id], Tags=[TAG])
            event = tag_change(instance_id, {"tunnelnat": "enabled"})
        elif op == "untag" and state != "terminated":
            ec2.delete_tags(Resources=[instance_id], Tags=[{"Key": "tunnelnat"}])
            event = tag_change(instance_id, {})
        elif op == "stop" and state == "running":
            ec2.stop_instances(InstanceIds=[instance_id])
            event = state_change(instance_id, "stopped")
        elif op == "start" and state == "stopped":
            ec2.start_instances(InstanceIds=[instance_id])
            event = state_change(instance_id, "running")
        elif op == "terminate" and state != "terminated":
            ec2.terminate_instances(InstanceIds=[instance_id])
            event = state_change(instance_id, "terminated")
        else:
            continue
        if delivered:
            deliver(event)
    scheduled = {**state_change(ids[0], "running"), "detail-type": "Scheduled Event"}
    scheduled.update(source="aws.events", detail={})
    deliver(scheduled)

    servable = set()
    for instance_id in ids:
        state, tagged, vpc, address = _state(ec2, instance_id)
        in_subnet = IPv4Address(address) in CONFIG.gateway_subnet_cidr
        gateway_like = instance_id == ids[0] and impostor  # the gateway itself never enrols
        if state == "running" and tagged and vpc == worlds.vpc and in_subnet and not gateway_like:
            servable.add(instance_id)
    mappings = store.mappings()
    privates = [m.private_ip for m in mappings]
    publics = [m.public_ip for m in mappings]
    assert len(set(privates)) == len(privates), "a private address is mapped twice"
    assert len(set(publics)) == len(publics), "a public address is mapped twice"
    assert {m.instance_id for m in mappings} == servable, "mapped != servable"
    for instance_id in servable:
        record = store.get_record(instance_id)
        assert record is not None and record.status == "enrolled", (instance_id, record)
        assert instance_id in fleet.routes
    applied = fleet.applied
    assert isinstance(applied, NatTable) and not applied.rejected
    assert fleet.applied_pairs() == {(str(m.private_ip), str(m.public_ip)) for m in mappings}
    assert {i for i, doc in fleet.calls if doc == "SyncNatTable"} == {worlds.gateway}


def _state(ec2, instance_id: str) -> tuple[str, bool, str, str]:
    [reservation] = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
    raw = reservation["Instances"][0]
    tags = {t["Key"]: t["Value"] for t in raw.get("Tags", [])}
    return (
        raw["State"]["Name"],
        tags.get("tunnelnat") == "enabled",
        raw["VpcId"],
        raw["PrivateIpAddress"],
    )
