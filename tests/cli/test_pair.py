"""``status`` and ``doctor`` with the gateway pair (issue 15), in moto: two tagged gateways, G's
ENI on the active, and the items the pair agents write, written by the agent's own ``Records``
(gateway/tunnelnat_pair.py), so the CLI reads what the agent really writes."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import jsonschema
import pytest

from tests.cli.conftest import DEPLOYMENT, TABLE, G
from tests.cli.test_doctor import doctor, failures
from tunnelnat_cli.schemas import STATUS

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "gateway"))
from tunnelnat_gateway import pair as agent  # noqa: E402

STANDBY_IP = "10.10.1.11"


def _records(dep) -> agent.Records:
    config = agent.PairConfig.from_json(
        {
            "region": "us-east-1",
            "eni_id": dep.eni_id,
            "gateway": f"{G}/24",
            "deployment": DEPLOYMENT,
            "table": TABLE,
            "tunnel": "partner",
        }
    )
    return agent.Records(config, dep.dynamodb, dep.cloudwatch, None)


DEPLOYED = object()  # _report's default: the agent runs the deployed package


def _report(
    dep,
    instance_id: str,
    role: str,
    *,
    generation=1,
    sas=0,
    heard=0.0,
    age=5.0,
    loaded=None,
    software=DEPLOYED,
):
    """One agent's readiness write, ``age`` seconds ago (heard: seconds before that).
    ``software``: the package it runs ({"version", "sha256"}; None: an agent from before the
    package, which writes no ``software``)."""
    now = time.time() - age
    heard_at = None if heard is None else now - heard
    running = dep.software if software is DEPLOYED else software
    _records(dep).readiness(
        instance_id,
        role,
        generation,
        sas,
        heard_at,
        now,
        tunnel_loaded=loaded,
        software=None
        if running is None
        else agent.software.report(running, {"sha256": dep.software["sha256"]}),
    )


@pytest.fixture
def pair(dep):
    """The fixture's gateway is the active (it holds G's ENI); a second one is the standby; both
    agents have reported; the NAT table is at generation 1 (one enrolled instance)."""
    web1 = dep.launch("10.10.1.21", name="web-1")
    assert dep.run("enroll", web1, "--wait").code == 0
    standby = dep.launch(
        STANDBY_IP,
        name="gateway-2",
        tags={
            "tunnelnat:role": "gateway",
            "tunnelnat:deployment": DEPLOYMENT,
            "aws:autoscaling:groupName": f"{DEPLOYMENT}-gateway",  # moto plays Auto Scaling
        },
    )
    dep.source_dest_check(standby, False)
    _records(dep).claim(dep.gateway_id, time.time() - 3600)
    _report(dep, dep.gateway_id, "active", sas=1, heard=0.4)
    _report(dep, standby, "standby", heard=0.4)
    dep.standby_id = standby
    return dep


def _failover(dep, old: str, new: str) -> None:
    result = agent.TakeoverResult("won", "took the ENI", previous=old)
    at = time.time() - 120
    _records(dep).failover(
        new,
        result,
        {"at": at, "detected_seconds": 2.0, "switch_seconds": 1.4, "reason": "heartbeat lost"},
    )


def _ssm(pair) -> dict[str, str]:
    """Every SSM agent online: both gateways' and the enrolled instance's."""
    online = [pair.gateway_id, pair.standby_id, *pair.items("mapping")]
    return dict.fromkeys(online, "Online")


# -- status ------------------------------------------------------------------------------------


def test_status_names_the_active_and_the_ready_standby(pair):
    result = pair.run("status")
    assert result.code == 0, result.err
    assert f"gateway {pair.gateway_id}" in result.out
    assert f"pair: active {pair.gateway_id} (G's ENI {pair.eni_id})" in result.out
    (line,) = [x for x in result.out.splitlines() if "standby" in x]
    assert f"standby {pair.standby_id} ready" in line
    assert "generation 1" in line and "SAs 0" in line and "heard the active" in line
    assert "no failover recorded" in result.out


def test_status_json_pair_follows_the_schema(pair):
    _failover(pair, pair.standby_id, pair.gateway_id)
    doc = pair.run("status", "--json").json()
    jsonschema.validate(doc, STATUS)
    assert doc["gateway"]["instance_id"] == pair.gateway_id
    p = doc["pair"]
    assert (p["active"], p["eni_id"], p["failovers"]) == (pair.gateway_id, pair.eni_id, 1)
    (standby,) = p["standbys"]
    assert standby["instance_id"] == pair.standby_id
    assert (standby["applied_generation"], standby["behind"], standby["stale"]) == (1, False, False)
    assert standby["heard"] is True and standby["sas"] == 0
    last = p["last_failover"]
    assert (last["from"], last["to"]) == (pair.standby_id, pair.gateway_id)
    assert (last["detected_seconds"], last["switch_seconds"]) == (2.0, 1.4)
    assert last["reason"] == "heartbeat lost"


def test_status_after_a_failover_the_active_is_the_eni_holder(pair):
    """The standby took the ENI: status follows EC2, whatever ID sorts last."""
    attachment = pair.ec2.describe_network_interfaces(NetworkInterfaceIds=[pair.eni_id])[
        "NetworkInterfaces"
    ][0]["Attachment"]["AttachmentId"]
    pair.ec2.detach_network_interface(AttachmentId=attachment, Force=True)
    pair.ec2.attach_network_interface(
        NetworkInterfaceId=pair.eni_id, InstanceId=pair.standby_id, DeviceIndex=1
    )
    _failover(pair, pair.gateway_id, pair.standby_id)
    result = pair.run("status")
    assert f"pair: active {pair.standby_id}" in result.out
    assert f"standby {pair.gateway_id}" in result.out
    assert f"last failover {pair.gateway_id} -> {pair.standby_id}" in result.out
    assert "(detected 2.0 s, switched 1.4 s); 1 in all" in result.out


def test_single_gateway_status_has_no_pair(dep):
    doc = dep.run("status", "--json").json()
    jsonschema.validate(doc, STATUS)
    assert doc["pair"] is None
    assert "pair:" not in dep.run("status").out


# -- doctor ------------------------------------------------------------------------------------


def test_doctor_a_healthy_pair(pair):
    doc = doctor(pair, ssm=_ssm(pair))
    assert doc["healthy"] is True, failures(doc)
    summaries = [f["summary"] for f in doc["findings"] if f["check"] in ("gateway", "pair")]
    assert f"{pair.gateway_id} is the active gateway (holds G's ENI {pair.eni_id})" in summaries
    assert any(s.startswith(f"standby {pair.standby_id} ready (generation 1/1") for s in summaries)


def test_doctor_pair_mode_with_one_gateway_running(pair):
    pair.ec2.terminate_instances(InstanceIds=[pair.standby_id])
    doc = doctor(pair)
    (finding,) = [f for f in doc["findings"] if f["status"] == "fail"]
    assert finding["check"] == "pair"
    assert "pair mode, but only 1 gateway running" in finding["summary"]
    assert "tunnelnat:gatewayPair=false" in finding["fix"]


def test_doctor_standby_behind_the_desired_generation(pair):
    _report(pair, pair.standby_id, "standby", generation=0)
    finding = failures(doctor(pair, ssm=_ssm(pair)))[("pair", pair.standby_id)]
    assert "behind the NAT table: applied generation 0, desired 1" in finding["summary"]
    assert "tunnelnat reconcile" in finding["fix"]


def test_doctor_standby_without_the_tunnel_loaded(pair):
    _report(pair, pair.standby_id, "standby", loaded=False)
    finding = failures(doctor(pair, ssm=_ssm(pair)))[("pair", pair.standby_id)]
    assert "connection is not loaded" in finding["summary"]


def test_doctor_stale_readiness_is_an_agent_not_running(pair):
    _report(pair, pair.standby_id, "standby", age=600)
    finding = failures(doctor(pair, ssm=_ssm(pair)))[("pair", pair.standby_id)]
    assert "its pair agent has not reported (last" in finding["summary"]
    assert "journalctl -u tunnelnat-pair" in finding["fix"]


def test_doctor_standby_not_hearing_the_active(pair):
    _report(pair, pair.standby_id, "standby", heard=None)
    finding = failures(doctor(pair, ssm=_ssm(pair)))[("pair", pair.standby_id)]
    assert "has not heard the active's heartbeat" in finding["summary"]
    assert "UDP 7465" in finding["fix"]


def test_doctor_eni_on_no_gateway_mid_failover(pair):
    attachment = pair.ec2.describe_network_interfaces(NetworkInterfaceIds=[pair.eni_id])[
        "NetworkInterfaces"
    ][0]["Attachment"]["AttachmentId"]
    pair.ec2.detach_network_interface(AttachmentId=attachment, Force=True)
    fails = failures(doctor(pair, ssm=_ssm(pair)))
    (gateway,) = [f for (check, _), f in fails.items() if check == "gateway"]
    assert "G's ENI is attached to none of the running gateways" in gateway["summary"]


def test_doctor_records_the_last_failover(pair):
    _failover(pair, pair.standby_id, pair.gateway_id)
    doc = doctor(pair, ssm=_ssm(pair))
    assert doc["healthy"] is True
    (last,) = [f for f in doc["findings"] if f["summary"].startswith("last failover")]
    assert f"{pair.standby_id} -> {pair.gateway_id}" in last["summary"]
    assert "(1 in all)" in last["summary"]


# -- the gateway software (issue 22) -------------------------------------------------------------

OLD = {"sha256": "0" * 64, "version": "0.21.0+0000"}


def test_status_shows_each_gateways_software_and_whether_it_is_deployed(pair):
    _report(pair, pair.standby_id, "standby", heard=0.4, software=OLD)
    doc = pair.run("status", "--json").json()
    jsonschema.validate(doc, STATUS)
    software = doc["software"]
    assert software["parameter"] == f"/tunnelnat/{DEPLOYMENT}/gateway-software"
    assert software["deployed"] == pair.software and software["problem"] is None
    by_id = {g["instance_id"]: g for g in software["gateways"]}
    assert by_id[pair.gateway_id]["version"] == pair.software["version"]
    assert by_id[pair.gateway_id]["deployed"] is True
    assert by_id[pair.standby_id] | {"reported_at": None} == {
        "instance_id": pair.standby_id,
        "version": OLD["version"],
        "sha256": OLD["sha256"],
        "deployed": False,
        "reported_at": None,
    }
    text = pair.run("status").out
    assert f"software: deployed {pair.software['version']} (sha256 555555555555)" in text
    assert f"  {pair.gateway_id} {pair.software['version']} (555555555555): the deployed one" in (
        text
    )
    assert f"  {pair.standby_id} 0.21.0+0000 (000000000000): NOT the deployed one" in text


def test_status_an_agent_from_before_the_package_reports_no_version(pair):
    _report(pair, pair.standby_id, "standby", heard=0.4, software=None)
    doc = pair.run("status", "--json").json()
    (standby,) = [g for g in doc["software"]["gateways"] if g["instance_id"] == pair.standby_id]
    assert (standby["version"], standby["deployed"], standby["reported_at"]) == (None, None, None)
    assert f"{pair.standby_id} version unknown: its pair agent reports none" in (
        pair.run("status").out
    )


def test_status_without_the_stacks_parameter_says_the_deployed_one_is_unknown(pair):
    ssm = pair.session.client("ssm", endpoint_url=pair.url)
    ssm.delete_parameter(Name=f"/tunnelnat/{DEPLOYMENT}/gateway-software")
    result = pair.run("status", "--json")
    assert result.code == 0, result.err  # the table is what status is for
    software = result.json()["software"]
    assert software["deployed"] is None and "does not exist" in software["problem"]
    assert {g["deployed"] for g in software["gateways"]} == {None}
    assert "software: the deployed gateway software is unknown" in pair.run("status").out


def test_doctor_names_a_gateway_running_another_package(pair):
    _report(pair, pair.standby_id, "standby", heard=0.4, software=OLD)
    doc = doctor(pair, ssm=_ssm(pair))
    finding = failures(doc)[("gateway-software-old", pair.standby_id)]
    assert finding["summary"] == (
        f"{pair.standby_id} runs gateway software 0.21.0+0000 (000000000000), not the deployed "
        f"{pair.software['version']} (555555555555)"
    )
    assert f"{DEPLOYMENT}-InstallGatewaySoftware" in finding["fix"]
    assert "start-associations-once" in finding["fix"]
    ok = [f for f in doc["findings"] if f["check"] == "gateway-software" and f["status"] == "ok"]
    assert [f["resource"] for f in ok] == [pair.gateway_id]


def test_doctor_an_agent_reporting_no_version_runs_software_older_than_the_package(pair):
    _report(pair, pair.gateway_id, "active", sas=1, heard=0.4, software=None)
    doc = doctor(pair, ssm=_ssm(pair))
    finding = failures(doc)[("gateway-software-old", pair.gateway_id)]
    assert "older than the package (its pair agent reports no version)" in finding["summary"]


def test_doctor_a_silent_standby_is_the_pair_checks_finding_not_a_second_one(pair):
    _report(pair, pair.standby_id, "standby", heard=0.4, age=600, software=OLD)
    doc = doctor(pair, ssm=_ssm(pair))
    assert ("pair", pair.standby_id) in failures(doc)
    assert not [f for f in doc["findings"] if f["check"].startswith("gateway-software-old")]
