"""Issue 4's Auto Scaling story: a burst of 20 launches converges, at a few gateway syncs, and
the scale-in that follows returns every address before Auto Scaling may terminate.

20 instances in namespaces, launched into a group with a launch lifecycle hook in moto; their
lifecycle events go through moto's EventBridge and the controller's SQS queue to the real handler
in batches of 10; the real documents run in the namespaces and on the gateway. No timing is
asserted (the machine's load varies); the figures are printed.
"""

from __future__ import annotations

import pytest

from lab import autoscaling
from lab import topology as topo
from lab.burst_story import BurstReport, run_burst_story, run_scale_in
from lab.controller import LabController

pytestmark = pytest.mark.lab

BURST = 20


@pytest.fixture(scope="module")
def burst(configured_lab):
    with LabController(configured_lab) as controller:
        report = run_burst_story(configured_lab, controller, count=BURST)
        print("\n" + report.figure())
        yield configured_lab, controller, report


def test_burst_has_its_own_namespaces_at_the_addresses_ec2_knows(burst):
    lab, _, report = burst
    assert len(report.instances) == BURST
    namespaces = set(topo.lab_namespaces())
    ec2 = lab.aws.client("ec2")
    reply = ec2.describe_instances(InstanceIds=report.ids)
    found = [i for r in reply["Reservations"] for i in r["Instances"]]
    addresses = {i["InstanceId"]: i["PrivateIpAddress"] for i in found}
    for inst in report.instances:
        assert inst.ns in namespaces
        assert addresses[inst.instance_id] == inst.private_ip
        assert f"{inst.private_ip}/24" in topo.in_ns(inst.ns, ["ip", "-4", "-o", "addr"])
    members = lab.aws.client("autoscaling").describe_auto_scaling_groups(
        AutoScalingGroupNames=[autoscaling.GROUP]
    )["AutoScalingGroups"][0]["Instances"]
    assert {m["InstanceId"] for m in members} == set(report.ids)


def test_every_launch_is_enrolled_and_released_with_continue(burst):
    _, controller, report = burst
    assert report.failed_messages == 0
    assert all(status == "enrolled" for status in report.statuses.values()), report.statuses
    # CompleteLifecycleAction CONTINUE once per instance, as checked and recorded by the lab's
    # lifecycle port (moto does not implement the call).
    assert sorted(report.continued) == sorted(report.ids)
    assert controller.lifecycle.completed("ABANDON") == []
    assert not any(token[0] in report.ids for token in controller.lifecycle.issued.values())


def test_batches_of_ten_and_at_most_one_gateway_sync_per_batch(burst):
    _, _, report = burst
    assert sum(report.batches) == BURST
    assert max(report.batches) <= autoscaling.BATCH_SIZE
    assert len(report.batches) >= BURST // autoscaling.BATCH_SIZE
    assert 1 <= report.syncs <= len(report.batches), report.figure()
    assert report.add_route_runs == BURST


def test_routes_maps_and_generation_converged(burst):
    lab, _, report = burst
    assert all(report.routes.values()), report.routes
    assert all(report.snat.values()), report.snat
    publics = list(report.public.values())
    assert None not in publics and len(set(publics)) == BURST, "one address each, no double"
    assert set(publics) <= set(topo.POOL)
    dnat = set(lab.nft_elements("map", "dnat_map"))
    for inst in report.instances:
        assert f"{report.public[inst.name]} : {inst.private_ip}" in dnat
    assert report.applied_generation == report.desired_generation > 0


def test_every_burst_instance_reaches_the_app_server_as_its_own_s(burst):
    _, _, report = burst
    assert set(report.traffic) == {i.name for i in report.instances}
    for name, peer in report.traffic.items():
        assert peer == report.public[name], f"{name}: the app server saw {peer}"
    assert report.ok, report.figure()


def test_report_figure_names_time_and_syncs(burst):
    _, _, report = burst
    assert isinstance(report, BurstReport)
    figure = report.figure()
    assert f"{BURST} instances" in figure and "gateway syncs" in figure


@pytest.fixture(scope="module")
def scaled_in(burst):
    lab, controller, report = burst
    scale_in = run_scale_in(lab, controller, report)
    print("\n" + scale_in.figure())
    return lab, controller, report, scale_in


def test_scale_in_removes_mappings_returns_addresses_then_continues(scaled_in):
    lab, controller, burst_report, report = scaled_in
    assert report.failed_messages == 0
    assert sorted(report.continued) == sorted(burst_report.ids)
    assert controller.lifecycle.completed("ABANDON", autoscaling.TERMINATING) == []
    assert report.left_mapped == [] and report.left_in_snat == [], report.figure()
    assert report.claimed == [], "their addresses must be back in the pool"
    assert report.applied_generation == report.desired_generation
    assert 1 <= report.syncs <= len(report.batches)
    assert sorted(report.terminated) == sorted(burst_report.ids)
    assert report.ok, report.figure()
