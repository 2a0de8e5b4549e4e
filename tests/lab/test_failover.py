"""Issue 15: the gateway pair fails over in seconds, fail-closed, with the same E and G.

One lab for the module, built with the standby (``Lab(pair=True)``: tn-gw2 boots through its
units as the standby, gets the same documents and its table). web-1 is enrolled and sends to A
every 50 ms; the active is powered off (links down, processes frozen). The standby's pair agent
(the installed package's ``pair run``) takes G's ENI against moto, the ENI mirror moves the
links, and the assertions read what happened: at A, on the Internet link, in EC2 and DynamoDB.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from lab import topology as topo
from lab.controller import LabController
from lab.eni_mirror import PARKING_NS, EniMirror
from lab.failover_story import FAILOVER_TARGET, applied_generation, switch_gap
from lab.story import Story, tunnel_sas

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def failover():
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    with topo.Lab(instances_count=1, private_count=0, pair=True) as lab:
        with LabController(lab) as controller:
            story = Story(lab, controller)
            configured = lab.configure_gateway()
            assert configured.ok, configured.stderr[-1500:]
            assert story.enrol("web-1").ok
            before = {
                "holder": lab.eni_holder(),
                "standby_sas": tunnel_sas(topo.STANDBY_NS),
                "standby_established": _established(topo.STANDBY_NS),
                "standby_has_eni_link": lab.has_link(topo.STANDBY_NS, topo.ENI_LINK),
            }
            step = story.gateway_failover("web-1")
            print(f"\n{step.title}: {step.figure}\ntimings: {lab.timings}")
            frozen = {pid: _state(pid) for pid in lab.frozen}
            links = topo.sh(["ip", "-n", "tn-gw", "-o", "link", "show", "up"]).stdout
            yield {"lab": lab, "step": step, "before": before, "frozen": frozen, "up": links}
    assert lab.cleaned, "the lab left namespaces behind"


def _established(ns: str) -> int:
    out = topo.in_ns(ns, ["swanctl", "--list-sas"], check=False)
    return len(re.findall(rf"^{topo.TUNNEL}: #\d+, ESTABLISHED", out, re.MULTILINE))


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_the_standby_booted_as_standby_with_the_table(failover):
    lab, before = failover["lab"], failover["before"]
    attach = lab.standby_boot.unit("tunnelnat-boot.service")
    assert attach is not None and attach.state == "done", attach
    assert '"role": "standby"' in attach.output, attach.output
    # EC2 said the first gateway holds the ENI: no link, no SA on the standby before.
    assert before["holder"] == lab.aws.gateway_id
    assert not before["standby_has_eni_link"]
    # Its charon keeps trying from an address it does not have (LocalAddress): never an SA.
    assert before["standby_sas"][1] == 0 and before["standby_established"] == 0, before
    tags = lab.aws.tags(lab.standby_id)
    assert {k: tags.get(k) for k in ("tunnelnat:role", "tunnelnat:gateway")} == {
        "tunnelnat:role": "gateway",
        "tunnelnat:gateway": topo.DEPLOYMENT,
    }
    # The standby was built (and synced) before web-1's enrolment: the controller's own
    # SyncNatTable for it reached both gateways, so the lab had nothing to sync before the
    # power-off.
    report = failover["step"].data["failover"]
    assert report.standby_synced_by == "already current", report.standby_synced_by


def test_the_standby_takes_g_s_eni_and_traffic_resumes_within_target(failover):
    step, lab = failover["step"], failover["lab"]
    report = step.data["failover"]
    assert report.holder_after == lab.standby_id, step.figure
    assert report.active_after == topo.STANDBY_NS
    assert report.takeover.get("outcome") == "won", report.takeover
    assert report.failover_seconds is not None and report.failover_seconds <= FAILOVER_TARGET, (
        step.figure
    )
    # Lost: only what was sent while nobody forwarded (50 ms apart).
    assert report.lost <= report.failover_seconds / 0.05 + 2, step.figure
    # A new SA carries the traffic after: the new active's, not the frozen one's.
    assert set(report.spis_after) - set(report.spis_before), step.figure
    assert step.ok, step.figure


def test_no_clear_text_partner_bound_packet_during_the_switch(failover):
    report = failover["step"].data["failover"]
    assert report.clear == []


def test_e_and_g_stay_the_same(failover):
    report = failover["step"].data["failover"]
    seen = report.e_and_g
    assert seen["g_on_eni_link"] == [topo.GW_ENI], seen
    assert seen["eni_link_mac"] == seen["ec2_eni_mac"]
    assert seen["e_on_public_link"] == [topo.GW_PUBLIC]
    assert seen["ec2_eni_address"] == topo.GW_ENI
    assert report.host_route_unchanged


def test_no_instance_is_re_enrolled(failover):
    report = failover["step"].data["failover"]
    assert report.commands_after == []  # no AddHostRoute, no document to anybody
    assert report.mappings_unchanged
    assert report.generation_before == report.generation_after
    # The new active's table is the same generation the controller wrote.
    assert applied_generation(topo.STANDBY_NS) == report.generation_after


def test_the_failover_is_recorded(failover):
    lab = failover["lab"]
    record = failover["step"].data["failover"].pair_record
    assert record.get("active") == lab.standby_id, record
    assert record.get("failovers", 0) >= 1
    assert record.get("last_failover", {}).get("from") == lab.aws.gateway_id


def test_the_operator_s_status_shows_the_new_active_and_the_failover(failover):
    """``tunnelnat status`` (the real command, against the lab's moto) after the failover: the
    active is the instance that now holds G's ENI, the old one is listed as the standby, and the
    failover is there with its timings."""
    from lab.cli import status_json

    lab = failover["lab"]
    pair = status_json(lab)["pair"]
    assert pair is not None, "a pair deployment shows its pair"
    assert pair["active"] == lab.standby_id, pair
    assert [s["instance_id"] for s in pair["standbys"]] == [lab.aws.gateway_id], pair
    assert pair["failovers"] >= 1, pair
    last = pair["last_failover"]
    assert (last["from"], last["to"]) == (lab.aws.gateway_id, lab.standby_id), last


def test_the_powered_off_active_is_frozen_and_dark(failover):
    assert failover["frozen"], "nothing was frozen"
    assert set(failover["frozen"].values()) <= {"T", "gone"}, failover["frozen"]
    assert failover["up"].strip() == "", failover["up"]


# -- without a lab ---------------------------------------------------------------------------------


class FakeEc2:
    def __init__(self) -> None:
        self.attachment: dict | None = {"InstanceId": "i-0aaaaaaaaaaaaaaa1", "Status": "attached"}

    def describe_network_interfaces(self, NetworkInterfaceIds):  # noqa: N803 - boto3's names
        eni = {"NetworkInterfaceId": NetworkInterfaceIds[0]}
        if self.attachment is not None:
            eni["Attachment"] = self.attachment
        return {"NetworkInterfaces": [eni]}


def test_the_eni_mirror_follows_ec2_and_only_puts_e_back():
    ec2 = FakeEc2()
    batches: list[tuple[str, list[str]]] = []
    mirror = EniMirror(
        ec2=ec2,
        eni_id="eni-0123456789abcdef0",
        namespaces={"i-0aaaaaaaaaaaaaaa1": "tn-gw", "i-0aaaaaaaaaaaaaaa2": "tn-gw2"},
        location="tn-gw",
        eni_link="eni0",
        public_link="eth1",
        public_address="198.51.100.10/28",
        public_router="198.51.100.1",
        run_batch=lambda ns, commands: batches.append((ns, commands)),
    )
    assert mirror.sync() is None and batches == []  # where EC2 says: nothing to do
    ec2.attachment = None  # force-detached
    move = mirror.sync()
    assert move is not None and move.target == PARKING_NS
    assert batches == [
        ("tn-gw", ["link set dev eni0 netns tn-vpc", "link set dev eth1 netns tn-vpc"])
    ]
    batches.clear()
    ec2.attachment = {"InstanceId": "i-0aaaaaaaaaaaaaaa2", "Status": "attached"}
    mirror.sync()
    assert batches[0] == (
        PARKING_NS,
        ["link set dev eni0 netns tn-gw2", "link set dev eth1 netns tn-gw2"],
    )
    # On the new holder: E and the default route (the Internet gateway's part), never G.
    ns, commands = batches[1]
    assert ns == "tn-gw2"
    assert "address replace 198.51.100.10/28 dev eth1" in commands
    assert "route replace default via 198.51.100.1 dev eth1" in commands
    assert not any("eni0" in c for c in commands)
    assert mirror.sync() is None  # level-triggered: a second look changes nothing


def test_switch_gap_is_the_silence_around_the_power_off():
    arrivals = [0.0, 0.05, 0.10, 0.15, 0.21, 2.9, 2.95, 3.0]
    # The datagram at 0.21 was past the old active's links when they went down.
    assert switch_gap(arrivals, powered_off=0.2) == (0.21, 2.9)
    assert switch_gap([0.0, 0.05], powered_off=0.2) == (None, None)
