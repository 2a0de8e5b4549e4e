"""Random interleavings of launches, tag changes, stops, starts and terminations, with events
delivered late, twice and out of order to two controller workers running at once, all against
moto's server. However it goes, the end state is the one the final instances call for: no leaked
address, no double allocation, no stale mapping, the gateway's applied table equal to the table.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor

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
from tunnelnat.events import parse_request
from tunnelnat.service import Service

INSTANCES = 3
# The issue asks for at least 500 examples in every CI run; locally a quicker default. They run
# as two halves with different examples (hypothesis seeds each parametrized case apart), which
# two test workers can run at once.
EXAMPLES = int(
    os.environ.get("TUNNELNAT_PROPERTY_EXAMPLES", "500" if os.environ.get("CI") else "40")
)
HALVES = (1, 2)
CONFIG = TunnelnatConfig.from_mapping(
    {
        "partner_endpoint": "198.51.100.40",
        "partner_networks": ["192.0.2.0/24"],
        "address_pool": [f"203.0.113.{10 + i}" for i in range(INSTANCES)],
        "gateway_private_ip": "10.20.0.5",
        "gateway_subnet_cidr": "10.20.0.0/16",
    }
)
TAG = {"Key": "tunnelnat", "Value": "enabled"}
tables = itertools.count()


# moto filters instances by tag in time quadratic in the instances it holds: letting them pile
# up over 500 examples made the late examples ten times slower than the first. A reset is costly
# too (moto reloads its AMIs), so AWS starts over every few examples.
EXAMPLES_PER_RESET = 20


class Env:
    """Each example gets fresh instances and a fresh table; AWS itself (a VPC and the gateway)
    starts over every ``EXAMPLES_PER_RESET`` examples."""

    def __init__(self, moto_url: str) -> None:
        self.moto_url = moto_url
        self.ec2 = boto3.client("ec2", region_name=REGION)
        self.dynamodb = boto3.client("dynamodb", region_name=REGION)
        # Two workers, each with its own clients, as two Lambda instances would have.
        sessions = [boto3.session.Session(region_name=REGION) for _ in range(2)]
        self.clients = [(s.client("dynamodb"), s.client("ec2")) for s in sessions]
        self.examples = 0

    def _reset(self) -> None:
        reset = urllib.request.Request(f"{self.moto_url}/moto-api/reset", method="POST")
        urllib.request.urlopen(reset).close()
        vpc = self.ec2.create_vpc(CidrBlock="10.20.0.0/16")["Vpc"]["VpcId"]
        self.subnet = self.ec2.create_subnet(VpcId=vpc, CidrBlock="10.20.0.0/16")["Subnet"][
            "SubnetId"
        ]
        tags = [{"Key": "tunnelnat:role", "Value": "gateway"}]
        tags.append({"Key": "tunnelnat:deployment", "Value": "prop"})
        self.gateway = self._run(1, tags)[0]

    def _run(self, count: int, tags: list[dict]) -> list[str]:
        spec = {"TagSpecifications": [{"ResourceType": "instance", "Tags": tags}]} if tags else {}
        reply = self.ec2.run_instances(
            ImageId="ami-12345678", MinCount=count, MaxCount=count, SubnetId=self.subnet, **spec
        )
        return [i["InstanceId"] for i in reply["Instances"]]

    def example(self, tagged: list[bool]) -> tuple[str, list[str], FakeFleet, list[Service]]:
        if self.examples % EXAMPLES_PER_RESET == 0:
            self._reset()
        self.examples += 1
        table = f"prop-{next(tables)}"
        create_enrolment_table(self.dynamodb, table)
        ids = self._run(INSTANCES, [])
        for instance_id, on in zip(ids, tagged, strict=True):
            if on:
                self.ec2.create_tags(Resources=[instance_id], Tags=[TAG])
        fleet = FakeFleet(self.dynamodb, gateway_id=self.gateway)
        workers = []
        for dynamodb, ec2 in self.clients:
            controller = Controller(
                CONFIG,
                store=EnrolmentStore(dynamodb, table),
                instances=Ec2Instances(ec2),
                commands=fleet,
                deployment="prop",
                region=REGION,
            )
            workers.append(Service(controller))
        return table, ids, fleet, workers


@pytest.fixture(scope="module")
def env(moto_url):
    return Env(moto_url)


operation = st.one_of(
    st.tuples(st.sampled_from(["tag", "untag", "stop", "start", "terminate"]), st.integers(0, 2)),
    st.tuples(st.sampled_from(["deliver", "duplicate"]), st.integers(0, 50)),
)


def state_of(ec2, instance_id: str) -> tuple[str, bool, str]:
    [reservation] = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
    raw = reservation["Instances"][0]
    tags = {t["Key"]: t["Value"] for t in raw.get("Tags", [])}
    return raw["State"]["Name"], tags.get("tunnelnat") == "enabled", raw["PrivateIpAddress"]


@pytest.mark.spread
@pytest.mark.parametrize("half", HALVES)
@settings(
    max_examples=-(-EXAMPLES // len(HALVES)),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=bool(os.environ.get("CI")),
)
@given(
    tagged=st.lists(st.booleans(), min_size=INSTANCES, max_size=INSTANCES),
    ops=st.lists(operation, max_size=8),
    # A seed, not st.randoms(): how many messages the drain shuffles depends on the two workers'
    # timing (a busy lease, a sync in flight), and Hypothesis refuses data drawn in a
    # timing-dependent amount (FlakyStrategyDefinition). One draw, whatever the batch's size.
    drain_seed=st.integers(0, 2**32 - 1),
)
def test_any_interleaving_converges(env, half, tagged, ops, drain_seed):
    drain_order = random.Random(drain_seed)
    table, ids, fleet, workers = env.example(tagged)
    pending: list[str] = [json.dumps(state_change(i, "running")) for i in ids]
    lock = threading.Lock()
    retry: list[str] = []

    def deliver(worker: Service, body: str) -> None:
        [error], _ = worker.process([parse_request(body)])
        if error is not None:  # SQS would deliver it again
            with lock:
                retry.append(body)

    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = []
        turn = itertools.cycle(workers)
        for op, arg in ops:
            instance_id = ids[arg % INSTANCES]
            state, _, _ = state_of(env.ec2, instance_id)
            if op == "tag" and state != "terminated":
                env.ec2.create_tags(Resources=[instance_id], Tags=[TAG])
                pending.append(json.dumps(tag_change(instance_id, {"tunnelnat": "enabled"})))
            elif op == "untag" and state != "terminated":
                env.ec2.delete_tags(Resources=[instance_id], Tags=[{"Key": "tunnelnat"}])
                pending.append(json.dumps(tag_change(instance_id, {})))
            elif op == "stop" and state == "running":
                env.ec2.stop_instances(InstanceIds=[instance_id])
                pending.append(json.dumps(state_change(instance_id, "stopped")))
            elif op == "start" and state == "stopped":
                env.ec2.start_instances(InstanceIds=[instance_id])
                pending.append(json.dumps(state_change(instance_id, "running")))
            elif op == "terminate" and state != "terminated":
                env.ec2.terminate_instances(InstanceIds=[instance_id])
                pending.append(json.dumps(state_change(instance_id, "terminated")))
            elif op in ("deliver", "duplicate") and pending:
                index = arg % len(pending)
                body = pending[index] if op == "duplicate" else pending.pop(index)
                futures.append(pool.submit(deliver, next(turn), body))
        for future in futures:
            future.result()
        # Everything not delivered yet arrives now, in any order; failures come back (SQS).
        for _ in range(6):
            batch = pending + retry
            pending, retry = [], []
            drain_order.shuffle(batch)
            for future in [pool.submit(deliver, next(turn), b) for b in batch]:
                future.result()
            if not retry:
                break
    assert not retry, "still failing after six redeliveries"

    store = EnrolmentStore(env.dynamodb, table)
    expected = {}
    for instance_id in ids:
        state, is_tagged, private_ip = state_of(env.ec2, instance_id)
        if state == "running" and is_tagged:
            expected[instance_id] = private_ip
        if state == "running":
            assert (instance_id in fleet.routes) == is_tagged, f"route on {instance_id}"
    mappings = {m.instance_id: m for m in store.mappings()}
    assert {i: str(m.private_ip) for i, m in mappings.items()} == expected, "stale mapping"
    publics = [m.public_ip for m in mappings.values()]
    assert len(set(publics)) == len(publics), "an address was handed out twice"
    claims = {str(a) for a in store.claimed_addresses()}
    assert claims == {str(p) for p in publics}, "leaked or missing address claim"
    applied = fleet.applied_pairs()
    assert applied == {(str(m.private_ip), str(m.public_ip)) for m in mappings.values()}
    applied_generation, _ = store.gateway_state()
    assert applied_generation == store.desired_generation()
    for instance_id in expected:
        record = store.get_record(instance_id)
        assert record is not None and record.status == "enrolled"
    env.dynamodb.delete_table(TableName=table)
