"""The demo's story as assertions, with real packets through real strongSwan and nftables.

The steps build on each other (tag, traffic, untag), so they run in file order on one lab.
"""

from __future__ import annotations

import pytest

from lab import topology as topo
from lab.cli import doctor_json, status_json
from lab.controller import LabController
from lab.story import Story

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def story(lab):
    with LabController(lab) as controller:
        yield Story(lab, controller)


def test_tunnel_comes_up_through_configure_gateway(story):
    step = story.tunnel()
    assert step.data["status"] == "Success", step.figure
    assert step.data["report"]["up"] is True
    assert step.data["installed"] == 1 and step.data["partner_installed"] == 1
    assert step.data["seconds"] < 10


def test_tagging_web1_installs_route_and_nat(story):
    step = story.enrol("web-1")
    assert step.data["outcome"]["status"] == "enrolled", step.figure
    assert step.data["outcome"]["public_ip"] == topo.POOL[0]
    assert step.data["route"], "no host route A via G on web-1"
    web1 = story.lab.instance("web-1").private_ip
    assert step.data["snat"] == [f"{web1} : {topo.POOL[0]}"]
    assert step.data["dnat"] == [f"{topo.POOL[0]} : {web1}"]
    # The controller drove the real documents: the gateway's sync and the instance's route.
    assert {"SyncNatTable", "AddHostRoute"} <= set(step.data["runs"])


def test_tunnelnat_status_shows_web1_enrolled_with_s(story):
    # The installed CLI, as an operator runs it, with --endpoint-url at the lab's moto.
    doc = status_json(story.lab)
    web1 = story.lab.instance("web-1")
    rows = {r["instance_id"]: r for r in doc["instances"]}
    row = rows[web1.instance_id]
    assert row["status"] == "enrolled", row
    assert row["public_ip"] == story.public == topo.POOL[0]
    assert row["private_ip"] == web1.private_ip and row["name"] == "web-1"
    assert row["route_installed"] and row["mapped"]
    assert doc["gateway"]["instance_id"] == story.lab.aws.gateway_id
    assert doc["gateway"]["in_sync"]
    step = story.status_cli("web-1")  # the demo's text output says the same
    assert step.ok, step.figure
    assert "web-1" in step.data["output"] and topo.POOL[0] in step.data["output"]


def test_tunnelnat_doctor_finds_g_on_the_gateway_eni_and_nothing_wrong(story):
    code, report = doctor_json(story.lab)
    checks: dict[str, list[dict]] = {}
    for finding in report["findings"]:
        checks.setdefault(finding["check"], []).append(finding)
    assert [f["status"] for f in checks["fixed-eni"]] == ["ok"], checks["fixed-eni"]
    assert story.lab.aws.eni_id in checks["fixed-eni"][0]["summary"]
    assert [f["status"] for f in checks["source-dest-check"]] == ["ok"]
    assert checks["config"][0]["status"] == "ok"
    failed = [f for f in report["findings"] if f["status"] == "fail"]
    assert failed == [] and code == 0, failed


def test_request_from_web1_arrives_from_s_inside_esp_in_udp(story):
    step = story.request_arrives_as_s("web-1")
    assert step.data["answered"], step.figure
    assert step.data["body"] == f"app saw {topo.POOL[0]}"
    assert step.data["peers"] == [topo.POOL[0]], "the app server must log S as the source"
    assert step.data["esp"] > 0, "no UDP 4500 packets between E and T"
    assert step.data["clear"] == 0, "packets to A travelled in clear text"
    assert step.data["child_out"] > 0


def test_partner_connection_to_s_reaches_web1(story):
    step = story.partner_reaches_instance("web-1")
    assert step.data["body"] == f"web-1 saw {topo.APP}", step.figure


def test_untagged_web2_is_refused_even_with_a_host_route(story):
    step = story.unenrolled_blocked("web-2")
    assert not step.data["without_route_answered"]
    assert not step.data["answered"], step.figure
    assert step.data["arrived"] == []
    assert step.data["dropped"] > 0, "the gateway's forward chain did not count the drop"


def test_gateway_fails_closed_while_charon_is_down(story):
    step = story.fail_closed("web-1")
    assert not step.data["answered"], step.figure
    assert step.data["clear"] == 0, "packets to A left the gateway in clear text"
    assert step.data["dropped"] > 0, "the guard chain did not count the drop"
    assert step.data["back"], "traffic did not resume after charon restarted"
    assert story.lab.child_sas_installed() == 1
    assert topo.in_ns("tn-pvpn", ["swanctl", "--list-sas"]).count("ESTABLISHED") == 1


def test_restart_tunnel_document_brings_it_back(story):
    step = story.restart_tunnel("web-1")
    assert step.data["report"]["up"] is True, step.figure
    assert step.data["answered"]
    assert story.lab.child_sas_installed() == 1


def test_untagging_web1_removes_route_and_mapping(story):
    step = story.unenrol("web-1")
    assert step.data["outcome"]["status"] == "not-tagged", step.figure
    assert not step.data["route"]
    assert step.data["snat"] == [] and step.data["dnat"] == []
    assert step.data["stored"] == {}
    assert not step.data["answered"] and not step.data["answered_by_hand"]
    assert not step.data["inbound"]
    assert step.data["arrived"] == []
