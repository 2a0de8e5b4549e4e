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
from tunnelnat.cli.schemas import STATUS

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


def _report(
    dep, instance_id: str, role: str, *, generation=1, sas=0, heard=0.0, age=5.0, loaded=None
):
    """One agent's readiness write, ``age`` seconds ago (heard: seconds before that)."""
    now = time.time() - age
    heard_at = None if heard is None else now - heard
    _records(dep).readiness(instance_id, role, generation, sas, heard_at, now, tunnel_loaded=loaded)


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
