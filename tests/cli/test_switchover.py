"""``tunnelnat switchover`` (issue 20) in moto: the pair of tests/cli/test_pair.py, the readiness
the agents' own ``Records`` write, and on the gateway the real Switchover document, run in place
by the lab's runner while a thread plays the active's pair agent: it moves G's ENI in moto
(detach without Force, attach on the standby), records the switchover in meta/pair with the
agent's ``Records.switchover`` and answers the request as the agent does."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from botocore.stub import Stubber

from lab.commands import to_result
from lab.ssm_runner import run_document
from tests.cli.conftest import gateway_package
from tests.cli.test_pair import _records, _report, pair  # noqa: F401 - the fixture

REPO = Path(__file__).resolve().parents[2]
DOCUMENT = REPO / "ssm_documents" / "Switchover.yaml"


class ActiveGateway:
    """Run Command on the active: the Switchover document in ``tmp``, its agent a thread."""

    def __init__(self, dep, tmp: Path, *, hand_over: bool = True) -> None:
        self.dep, self.tmp, self.hand_over = dep, tmp, hand_over
        self.calls: list[tuple[str, str, dict]] = []
        (tmp / "pair.json").write_text(json.dumps({"role_file": str(tmp / "pair-role")}))
        (tmp / "pair-role").write_text("active\n")

    def agent(self) -> None:
        request = self.tmp / "switchover"
        deadline = time.monotonic() + 20
        while not request.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        dep, result = self.dep, {"instance": self.dep.gateway_id}
        if self.hand_over:
            ec2 = dep.ec2
            attachment = ec2.describe_network_interfaces(NetworkInterfaceIds=[dep.eni_id])[
                "NetworkInterfaces"
            ][0]["Attachment"]
            ec2.detach_network_interface(AttachmentId=attachment["AttachmentId"])
            ec2.attach_network_interface(
                NetworkInterfaceId=dep.eni_id, InstanceId=dep.standby_id, DeviceIndex=1
            )
            timing = {"at": time.time(), "seconds": 0.6, "reason": "switchover requested"}
            _records(dep).switchover(dep.gateway_id, dep.standby_id, timing)
            (self.tmp / "pair-role").write_text("standby\n")
            result |= {"outcome": "done", "detail": "handed over", "to": dep.standby_id}
        else:
            result |= {"outcome": "failed", "detail": "no ready standby heard"}
        (self.tmp / "switchover.result").write_text(json.dumps(result))
        request.unlink()

    def run(self, instance_id: str, document: str, parameters: dict):
        self.calls.append((instance_id, document, dict(parameters)))
        thread = threading.Thread(target=self.agent, daemon=True)
        thread.start()
        package = gateway_package()
        env = {"TUNNELNAT_PAIR_CONFIG": str(self.tmp / "pair.json")} | package.env
        invocation = run_document(
            DOCUMENT, parameters, env=env, timeout=60, binding=package.binding
        )
        thread.join(5)
        return to_result(instance_id, document, invocation)


@pytest.fixture
def ready(pair):  # noqa: F811 - the imported fixture
    """The pair with its standby ready: the tunnel loaded, the table's generation, fresh."""
    _report(pair, pair.standby_id, "standby", heard=0.4, loaded=True)
    return pair


def holder(dep) -> str | None:
    eni = dep.ec2.describe_network_interfaces(NetworkInterfaceIds=[dep.eni_id])
    return (eni["NetworkInterfaces"][0].get("Attachment") or {}).get("InstanceId")


def test_switchover_wait_hands_g_to_the_ready_standby(ready, tmp_path):
    gateway = ActiveGateway(ready, tmp_path)
    result = ready.run("switchover", "--wait", commands=gateway)
    assert result.code == 0, result.err
    assert gateway.calls == [(ready.gateway_id, "Switchover", {"WaitSeconds": "30"})]
    assert holder(ready) == ready.standby_id
    assert f"G moved from {ready.gateway_id} to {ready.standby_id}" in result.out
    assert f"meta/pair: active {ready.standby_id}, 1 switchover(s) so far" in result.out


def test_switchover_json(ready, tmp_path):
    result = ready.run("switchover", "--wait", "--json", commands=ActiveGateway(ready, tmp_path))
    assert result.code == 0, result.err
    doc = result.json()
    assert doc["schema"] == "tunnelnat.switchover/v1"
    assert (doc["from"], doc["active"], doc["switched"]) == (
        ready.gateway_id,
        ready.standby_id,
        True,
    )
    assert doc["standbys"] == [{"instance_id": ready.standby_id, "ready": True, "reason": "ready"}]
    assert doc["switchovers"] == 1
    assert doc["switchover"]["from"] == ready.gateway_id
    assert doc["switchover"]["to"] == ready.standby_id


def test_switchover_refuses_without_a_ready_standby(pair, tmp_path):  # noqa: F811
    """The fixture's standby has not loaded the tunnel's configuration: nothing is sent."""
    gateway = ActiveGateway(pair, tmp_path)
    result = pair.run("switchover", "--wait", commands=gateway)
    assert result.code == 1
    assert "no ready standby to take G from" in result.err
    assert f"{pair.standby_id}: the tunnel's configuration is not loaded" in result.err
    assert gateway.calls == [] and holder(pair) == pair.gateway_id


def test_switchover_refuses_a_standby_behind_the_table(ready, tmp_path):
    _report(ready, ready.standby_id, "standby", generation=0, loaded=True)
    result = ready.run("switchover", commands=ActiveGateway(ready, tmp_path))
    assert result.code == 1
    assert "NAT table at generation 0, the table's is 1" in result.err


def test_switchover_refuses_a_stale_standby(ready, tmp_path):
    _report(ready, ready.standby_id, "standby", loaded=True, age=600)
    result = ready.run("switchover", commands=ActiveGateway(ready, tmp_path))
    assert result.code == 1 and "report is 600s old" in result.err


def test_the_agent_refusing_leaves_g_where_it_is(ready, tmp_path):
    gateway = ActiveGateway(ready, tmp_path, hand_over=False)
    result = ready.run("switchover", "--wait", commands=gateway)
    assert result.code == 1
    assert f"G stays on {ready.gateway_id}: no ready standby heard" in result.err
    assert holder(ready) == ready.gateway_id


def test_switchover_without_wait_sends_the_document_to_the_active(ready):
    """SendCommand exactly (botocore's Stubber: moto's SendCommand adds instances of its own)."""
    ssm = ready.session.client("ssm", endpoint_url=ready.url)
    stubber = Stubber(ssm)
    stubber.add_response(
        "send_command",
        {"Command": {"CommandId": "11111111-2222-3333-4444-555555555555"}},
        {
            "InstanceIds": [ready.gateway_id],
            "DocumentName": "test-Switchover",
            "Parameters": {"WaitSeconds": ["30"]},
            "TimeoutSeconds": 120,
            "Comment": "tunnelnat switchover",
        },
    )
    stubber.activate()
    ready.clients["ssm"] = ssm
    result = ready.run("switchover")
    assert result.code == 0, result.err
    stubber.assert_no_pending_responses()
    assert f"sent test-Switchover to the active {ready.gateway_id}" in result.out
    assert "11111111-2222-3333-4444-555555555555" in result.out
    assert holder(ready) == ready.gateway_id  # the agent on the gateway does the rest


def test_a_single_gateway_has_nobody_to_hand_over_to(dep):
    result = dep.run("switchover")
    assert result.code == 2 and "is not a gateway pair" in result.err
