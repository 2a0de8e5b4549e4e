"""Issue 11: the gateway boots, and reboots, through its production boot code.

The lab's gateway got its ENI from the installed package's ``boot`` verb (run from the same unit
files the user data writes) at build time; here it "reboots" with web-1 enrolled and sending: the
units restore the guarded table before the network, put G back on the ENI and sync the table
from DynamoDB, with no document and no controller involved, and nothing leaves in clear text.
"""

from __future__ import annotations

import json

import pytest

from lab import topology as topo
from lab.controller import LabController
from lab.gateway_boot import boot_order, parse_unit
from lab.story import Story

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def story(lab):
    with LabController(lab) as controller:
        story = Story(lab, controller)
        assert story.tunnel().ok
        assert story.enrol("web-1").ok
        yield story


def test_the_lab_gateway_got_its_eni_from_the_boot_program(story):
    lab = story.lab
    eni = lab.aws.client("ec2").describe_network_interfaces(NetworkInterfaceIds=[lab.aws.eni_id])
    attachment = eni["NetworkInterfaces"][0]["Attachment"]
    assert attachment["InstanceId"] == lab.aws.gateway_id
    assert attachment["DeviceIndex"] == 1
    link = json.loads(topo.in_ns("tn-gw", ["ip", "-j", "addr", "show", "dev", topo.ENI_LINK]))[0]
    assert link["address"] == eni["NetworkInterfaces"][0]["MacAddress"].lower()
    assert "UP" in link["flags"]
    assert [a["local"] for a in link["addr_info"] if a["family"] == "inet"] == [topo.GW_ENI]
    # G lives on the ENI's link only, as on AWS (not on the primary interface).
    primary = topo.in_ns("tn-gw", ["ip", "-4", "-o", "addr", "show", "dev", "eth0"])
    assert topo.GW_ENI not in primary


def test_boot_order_follows_the_unit_files():
    units = [
        parse_unit(name, (topo.GATEWAY_DIR / "systemd" / name).read_text())
        for name in topo.GATEWAY_UNITS
    ]
    strongswan = parse_unit("strongswan.service", "[Unit]\nAfter=network-online.target\n")
    order = boot_order(units, strongswan)
    assert order.index("systemd-sysctl.service") < order.index("tunnelnat-restore.service")
    assert order.index("tunnelnat-restore.service") < order.index("network-pre.target")
    assert order.index("network-online.target") < order.index("tunnelnat-boot.service")
    assert order.index("tunnelnat-boot.service") < order.index("strongswan.service")
    assert order.index("tunnelnat-boot.service") < order.index("tunnelnat-sync.service")


def test_a_reboot_fails_closed_and_brings_nat_back_without_the_controller(story):
    from tools.aws_strict import StrictClient

    strict = StrictClient(story.lab.moto_endpoint)
    logged_before = len(strict.log())
    step = story.gateway_reboot("web-1")
    data = step.data
    assert data["clear"] == 0, (step.figure, data["clear_packets"])
    assert data["arrived_while_off"] == 0, step.figure
    states = {name: state for name, state, _, _ in data["units"]}
    assert states == {
        "systemd-sysctl.service": "done",
        "tunnelnat-restore.service": "done",
        "network-pre.target": "done",
        "network-online.target": "done",
        "tunnelnat-boot.service": "done",
        "strongswan.service": "done",
        "tunnelnat-sync.service": "done",
    }, data["units"]
    # The restored table read as "nothing applied since boot": the sync applied all of it.
    assert data["sync"]["action"] == "full" and data["sync"]["previous_generation"] is None
    assert data["sync"]["mappings"] == 1
    applied = [int(g, 0) for g in data["applied_generation"]]  # nft prints a mark as hex
    assert applied == [data["sync"]["applied_generation"]]
    assert data["mapped"], "web-1's mapping is back"
    assert data["documents"] == 0, "no document ran: the gateway came back on its own"
    assert data["answered"]
    assert data["boot_to_a"] is not None and data["boot_to_a"] < 20, step.figure
    assert step.ok, step.figure
    # The app server saw S again, as before the reboot.
    assert story.lab.app_peers()[-1] == story.public
    # Issue 20: G's ENI stayed attached through the reboot (two interfaces on the instance), and
    # the strict fakes (always on in the lab's moto) refused none of the gateway's calls: its boot
    # no longer calls ModifyInstanceAttribute(SourceDestCheck), which EC2 refuses then.
    lab = story.lab
    assert lab.eni_holder() == lab.aws.gateway_id
    reservations = lab.aws.client("ec2").describe_instances(InstanceIds=[lab.aws.gateway_id])
    interfaces = reservations["Reservations"][0]["Instances"][0]["NetworkInterfaces"]
    assert len(interfaces) == 2, interfaces
    notes = {"delay", "signal", "lifecycle-action", "stale-read", "unblocked"}
    key = topo.gateway_access_key("tn-gw")
    refused = [
        e for e in strict.log()[logged_before:] if e["access_key"] == key and e["code"] not in notes
    ]
    assert refused == [], refused


def test_the_restored_table_alone_is_guarded_and_reads_as_nothing_applied(story):
    """Between restore and sync: the guard is there and applied_generation is empty (the
    contract with the health agent: TunnelUp=0 until the table is applied)."""
    lab = story.lab
    lab.power_off_gateway()
    ruleset = "/etc/tunnelnat/tunnelnat.nft"
    topo.in_ns("tn-gw", ["nft", "-f", ruleset])
    guard = topo.in_ns("tn-gw", ["nft", "list", "chain", "ip", "tunnelnat", "guard"])
    assert 'oifname != "ipsec0"' in guard and "drop" in guard
    assert lab.nft_elements("set", "applied_generation") == []
    assert lab.nft_elements("map", "snat_map") == []
    # ... and the whole boot brings it back.
    boot = lab.boot_gateway()
    assert [r.state for r in boot.runs] == ["done"] * len(boot.runs), boot.runs
    assert lab.nft_elements("set", "applied_generation") != []
    answered, body = lab.http(lab.instance("web-1").ns, story.app_url("web-1"))
    assert answered, body
