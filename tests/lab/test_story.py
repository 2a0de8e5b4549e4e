"""The demo's story as assertions, with real packets through real strongSwan and nftables.

The steps build on each other (tag, traffic, untag), so they run in file order on one lab.
"""

from __future__ import annotations

import re

import pytest

from lab import topology as topo
from lab.cli import doctor_json, status_json
from lab.controller import LabController
from lab.story import SETTLE_SECONDS, Story, _wait, settle_sas, tunnel_sas

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def story(lab):
    with LabController(lab) as controller:
        yield Story(lab, controller)


def test_tunnel_comes_up_through_configure_gateway(story):
    step = story.tunnel()
    assert step.data["status"] == "Success", step.figure
    assert step.data["report"]["up"] is True
    assert step.data["installed"] >= 1 and step.data["partner_installed"] >= 1
    # Both sides initiate: a second IKE SA may exist for a while, never once settled.
    settled = step.data["settled"]
    assert settled["one_each"], settled
    assert (settled["gateway"], settled["partner"]) == ((1, 1), (1, 1))
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


def test_an_impostor_labelled_like_the_gateway_gets_no_command_and_doctor_names_it(story):
    """Issue 21, 1: the associations' targets, the controller's syncs and doctor know the
    gateways by their Auto Scaling group, not by the labels a lookalike copies."""
    step = story.impostor("web-2")
    data = step.data
    assert data["impostor"] not in data["targets"], step.figure
    assert data["impostor"] in data["old_targets"]  # b08b1c8's tag target took it
    assert set(data["targets"]) == set(data["gateways"])
    assert data["syncs"] and set(data["syncs"]) <= set(data["gateways"])
    assert not data["asked_impostor"]
    assert data["doctor_finding"]["status"] == "fail" and data["doctor_exit"] != 0
    assert step.ok, step.figure


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
    # Our new IKE SA replaced the partner's stale one (INITIAL_CONTACT): one a side.
    settled = settle_sas()
    assert (settled["gateway"], settled["partner"]) == ((1, 1), (1, 1)), settled


def test_restart_tunnel_document_brings_it_back(story):
    step = story.restart_tunnel("web-1")
    assert step.data["report"]["up"] is True, step.figure
    assert step.data["answered"]
    settled = settle_sas()
    assert (settled["gateway"], settled["partner"]) == ((1, 1), (1, 1)), settled


def test_untagging_web1_removes_route_and_mapping(story):
    step = story.unenrol("web-1")
    assert step.data["outcome"]["status"] == "not-tagged", step.figure
    assert not step.data["route"]
    assert step.data["snat"] == [] and step.data["dnat"] == []
    assert step.data["stored"] == {}
    assert not step.data["answered"] and not step.data["answered_by_hand"]
    assert not step.data["inbound"]
    assert step.data["arrived"] == []


def _local_spis(ns: str) -> tuple[str, str]:
    """The surviving IKE SA's local SPI side (i or r: who initiated it) and its CHILD_SA's
    inbound SPI, as charon in ``ns`` lists them."""
    out = topo.in_ns(ns, ["swanctl", "--list-sas", "--ike", topo.TUNNEL])
    role = re.search(r"_([ir])\*", out)
    spi_in = re.search(r"^\s+in\s+([0-9a-f]{8}),", out, re.MULTILINE)
    assert role and spi_in, out
    return role.group(1), spi_in.group(1)


def test_partner_initiating_while_we_do_ends_with_one_ike_sa(story):
    """The collision behind the story's occasional second IKE SA, made on purpose: the partner's
    attempt goes unanswered (as while our charon has no connection yet), ours completes, then the
    partner's retransmission completes a second IKE SA with us answering. Our unique = replace
    deletes the older one (ours) after charon's 10 s: one IKE SA and one CHILD_SA a side, the
    same SA on both."""
    # Down on both sides: our DELETE takes the partner's SAs (it has no close_action).
    topo.in_ns("tn-gw", ["swanctl", "--terminate", "--ike", topo.TUNNEL], check=False)
    assert _wait(lambda: tunnel_sas("tn-gw") == tunnel_sas("tn-pvpn") == (0, 0), 10)
    logged = len(topo.in_ns("tn-gw", ["cat", topo.CHARON_LOG]))
    hold = (
        "table inet tn_lab_hold {\n  chain out {\n    type filter hook output priority 0;\n"
        f"    ip daddr {topo.GW_PUBLIC} udp dport {{ 500, 4500 }} drop\n  }}\n}}\n"
    )
    topo.sh(topo.machine_argv("tn-pvpn", ["nft", "-f", "-"]), input=hold)
    try:
        # Its IKE_SA_INIT is lost; charon goes on retransmitting it (first after 4 s).
        topo.in_ns(
            "tn-pvpn",
            ["swanctl", "--initiate", "--child", topo.TUNNEL, "--timeout", "1"],
            check=False,
        )
    finally:
        topo.in_ns("tn-pvpn", ["nft", "delete", "table", "inet", "tn_lab_hold"])
    topo.in_ns("tn-gw", ["swanctl", "--initiate", "--child", topo.TUNNEL, "--timeout", "5"])
    assert tunnel_sas("tn-gw") == (1, 1)
    # The partner's retransmission arrives: a second IKE SA, answered by us.
    assert _wait(lambda: tunnel_sas("tn-gw")[0] == 2, 15), "the partner's attempt never completed"
    settled = settle_sas(timeout=SETTLE_SECONDS)
    assert (settled["gateway"], settled["partner"]) == ((1, 1), (1, 1)), settled
    assert settled["seconds"] <= SETTLE_SECONDS
    log = topo.in_ns("tn-gw", ["cat", topo.CHARON_LOG])[logged:]
    assert re.search(r"delete of duplicate IKE_SA .* due to uniqueness policy", log), log[-2000:]
    # The partner's IKE SA stayed (we answered it), and both sides kept the same CHILD_SA.
    gw_role, gw_in = _local_spis("tn-gw")
    partner_role, _ = _local_spis("tn-pvpn")
    assert (gw_role, partner_role) == ("r", "i")
    partner_out = re.search(
        r"^\s+out\s+([0-9a-f]{8}),",
        topo.in_ns("tn-pvpn", ["swanctl", "--list-sas", "--ike", topo.TUNNEL]),
        re.MULTILINE,
    )
    assert partner_out and partner_out.group(1) == gw_in
