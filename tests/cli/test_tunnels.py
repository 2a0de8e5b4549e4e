"""``tunnelnat tunnels``: the gateway's SAs, through the real ShowTunnels document.

moto's SSM runs nothing, so the document runs here as the SSM agent would run it (the lab's
runner: ``sh -c _script.sh``, parameters checked against their allowedPattern), with ``swanctl``
answering what the real one printed for a per-pair tunnel with traffic after a rekey
(tests/unit/data/tunnel_stats/, capture_tunnel_stats.sh) and charon's log of that run. The
production path (SendCommand, GetCommandInvocation) is checked with that same output through
botocore's Stubber.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from botocore.stub import ANY, Stubber

from lab.commands import to_result
from lab.ssm_runner import run_document
from tests.cli.conftest import DEPLOYMENT, Result, gateway_package

REPO = Path(__file__).resolve().parents[2]
DOCUMENT = REPO / "ssm_documents" / "ShowTunnels.yaml"
DATA = REPO / "tests" / "unit" / "data" / "tunnel_stats"
COMMAND_ID = "11111111-2222-3333-4444-555555555555"  # SSM's are UUIDs (36 characters)
GATEWAY_TAGS = {
    "tunnelnat:role": "gateway",
    "tunnelnat:deployment": DEPLOYMENT,
    "aws:autoscaling:groupName": f"{DEPLOYMENT}-gateway",  # moto plays Auto Scaling
}


CHARON = REPO / "tests" / "unit" / "data" / "charon"
# ConfigureGateway's facts for the tunnel of the broken partners' logs (as tests/unit's).
BROKEN_FACTS = {
    "children": ["partner"],
    "ike": "aes256-sha256-modp2048",
    "esp": "aes256-sha256-modp2048",
}


class GatewayDocuments:
    """The gateway's side of Run Command: ShowTunnels run in place, swanctl answering ``raw``
    (or failing as with a dead charon), ConfigureGateway's facts and charon's log in tmp.
    ``broken``: a broken partner's log from tests/unit/data/charon/ (the lab's capture) and no
    SA at all, as charon lists them while the partner refuses us."""

    def __init__(self, tmp_path: Path, raw: str = "second", broken: str | None = None) -> None:
        self.calls: list[tuple[str, str, dict]] = []
        bin_dir, tunnels = tmp_path / "bin", tmp_path / "tunnels"
        bin_dir.mkdir()
        tunnels.mkdir()
        swanctl = bin_dir / "swanctl"
        if raw == "dead":
            swanctl.write_text(
                "#!/bin/sh\necho \"Error: connecting to 'unix:///var/run/charon.vici' failed: "
                'Connection refused" >&2\nexit 111\n'
            )
        elif broken:
            swanctl.write_text("#!/bin/sh\nexit 0\n")
        else:
            swanctl.write_text(f"#!/bin/sh\ncat {DATA / f'{raw}.raw'}\n")
        swanctl.chmod(0o755)
        # charon's log of the capture, its clock moved so that the last line is 90 s old.
        text = (CHARON / f"{broken}.log" if broken else DATA / "charon.log").read_text()
        stamps = [int(line.split(" ", 1)[0]) for line in text.splitlines()]
        shift = int(time.time()) - 90 - max(stamps)
        log = tmp_path / "charon.log"
        log.write_text(
            "".join(
                f"{int(line.split(' ', 1)[0]) + shift} {line.split(' ', 1)[1]}\n"
                for line in text.splitlines()
            )
        )
        facts = BROKEN_FACTS if broken else {"children": ["partner-1", "partner-2"]}
        (tunnels / "partner.json").write_text(json.dumps({**facts, "log": str(log)}))
        self.env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "TUNNELNAT_TUNNELS_DIR": str(tunnels)}

    def invoke(self, parameters: dict) -> object:
        package = gateway_package()
        env = self.env | package.env
        return run_document(DOCUMENT, parameters, env=env, timeout=60, binding=package.binding)

    def run(self, instance_id, document, parameters):
        self.calls.append((instance_id, document, dict(parameters)))
        return to_result(instance_id, document, self.invoke(parameters))


def tunnels(dep, *argv: str, commands=None) -> Result:
    return dep.run("tunnels", *argv, commands=commands)


def rows(text: str, first: str) -> list[list[str]]:
    """The table rows whose first column is ``first``, split on runs of two spaces or more."""
    return [re.split(r"\s{2,}", line) for line in text.splitlines() if line.startswith(first)]


def test_the_sas_with_selectors_proposals_age_and_last_rekey(dep, tmp_path):
    gateway = GatewayDocuments(tmp_path)
    result = tunnels(dep, commands=gateway)
    assert result.code == 0, result.err
    assert gateway.calls == [(dep.gateway_id, "ShowTunnels", {"TunnelName": ""})]
    assert f"gateway {dep.gateway_id}" in result.out
    assert "tunnel partner: 2 CHILD_SA name(s); charon's log holds 1 rekey(s), 1 failed" in (
        result.out
    )
    [ike] = rows(result.out, "partner ")
    assert ike[:5] == ["partner", "1", "ESTABLISHED", "198.51.100.240", "198.51.100.240"]
    assert ike[5] == "AES_CBC-256/HMAC_SHA2_256_128/PRF_HMAC_SHA2_256/MODP_2048"
    children = rows(result.out, "partner-")
    assert [(c[0], c[1], c[2]) for c in children] == [
        ("partner-1", "1", "INSTALLED"),
        ("partner-2", "2", "DELETED"),
        ("partner-2", "4", "INSTALLED"),
    ]
    one, old, new = children
    assert one[3:6] == ["203.0.113.231/32", "192.0.2.0/24", "AES_CBC-256/HMAC_SHA2_256_128"]
    # partner-2 rekeys with PFS: its proposal names the DH group; partner-1's refused rekey
    # left it without one (the partner's policy for that pair has none).
    assert new[3:6] == [
        "203.0.113.232/32",
        "192.0.2.0/24",
        "AES_CBC-256/HMAC_SHA2_256_128/MODP_2048",
    ]
    assert one[6] == "4s" and new[6] == "3s"  # age: install-time
    assert one[7] == "-"  # never rekeyed (its rekey was refused)
    assert re.fullmatch(r"9\ds ago", new[7]), new[7]  # the log's last outbound install
    assert new[8] == "57m" and new[9] == "80/120" and new[10] == "1s ago"
    assert old[9] == "40/60"


def test_json_has_every_sa_and_the_tunnels_last_rekeys(dep, tmp_path):
    result = tunnels(dep, "--json", commands=GatewayDocuments(tmp_path))
    assert result.code == 0, result.err
    doc = result.json()
    assert doc["schema"] == "tunnelnat.tunnels/v1"
    assert (doc["gateway"], doc["truncated"], doc["errors"]) == (dep.gateway_id, False, [])
    [tunnel] = doc["tunnels"]
    assert set(tunnel["last_rekey_ago"]) == {"partner-2"}
    assert (tunnel["rekeys_in_log"], tunnel["failed_rekeys_in_log"]) == (1, 1)
    by_id = {c["id"]: c for c in doc["child_sas"]}
    assert by_id["1"]["bytes_in"] == 200 and by_id["1"]["packets_out"] == 5
    assert by_id["4"]["rekey_in"] == 3442 and by_id["4"]["expires_in"] == 3957
    assert doc["ike_sas"][0]["rekey_in"] == 13733


# Each broken partner of the lab (tests/unit/data/charon/) and the start of its one-line cause.
BROKEN_CAUSES = {
    "wrong-psk": "authentication failed: the partner refused our pre-shared key (the PSK does "
    "not match theirs",
    "no-common-proposal": "no common ESP proposal: the partner accepts none of ours (we offer "
    "aes256-sha256-modp2048)",
    "selector-mismatch": "traffic selectors unacceptable: the partner refused partner's selectors",
    "partner-down": "partner not answering (retransmits to 198.51.100.40 for 10",
}


@pytest.mark.parametrize("broken", sorted(BROKEN_CAUSES))
def test_a_broken_partner_is_named_in_one_line_from_charons_log(dep, tmp_path, broken):
    gateway = GatewayDocuments(tmp_path, broken=broken)
    doc = tunnels(dep, "--json", commands=gateway).json()
    [tunnel] = doc["tunnels"]
    assert tunnel["diagnosis"].startswith(BROKEN_CAUSES[broken]), tunnel["diagnosis"]
    assert re.search(r" \[charon, 9\d s ago\]$", tunnel["diagnosis"])
    assert doc["child_sas"] == [] and doc["errors"] == []
    text = tunnels(dep, commands=gateway)
    [line] = [x for x in text.out.splitlines() if "charon's last failure" in x]
    assert line.startswith(f"tunnel partner: charon's last failure: {BROKEN_CAUSES[broken]}")
    assert "no SA on the gateway: the tunnel is down" in text.out


def test_a_tunnel_without_a_failure_since_its_last_success_has_no_diagnosis(dep, tmp_path):
    # The capture's refused rekey of partner-1 came before partner-2's successful one.
    gateway = GatewayDocuments(tmp_path)
    doc = tunnels(dep, "--json", commands=gateway).json()
    assert doc["tunnels"][0]["diagnosis"] is None
    assert "charon's last failure" not in tunnels(dep, commands=gateway).out


def test_one_tunnel_only(dep, tmp_path):
    gateway = GatewayDocuments(tmp_path)
    result = tunnels(dep, "--tunnel", "other", "--json", commands=gateway)
    assert gateway.calls[0][2] == {"TunnelName": "other"}
    doc = result.json()
    assert doc["child_sas"] == [] and [t["tunnel"] for t in doc["tunnels"]] == ["other"]
    text = tunnels(dep, "--tunnel", "other", commands=gateway)
    assert "no SA on the gateway: the tunnel is down" in text.out


def test_a_dead_charon_is_said_in_one_line_and_exit_1(dep, tmp_path):
    result = tunnels(dep, commands=GatewayDocuments(tmp_path, raw="dead"))
    assert result.code == 1
    assert "charon: swanctl exited 111: Error: connecting to" in result.out


@pytest.mark.parametrize("bad", ["x;reboot", "1partner", "a" * 33])
def test_a_tunnel_name_the_document_would_refuse_is_refused_first(dep, tmp_path, bad):
    gateway = GatewayDocuments(tmp_path)
    result = tunnels(dep, "--tunnel", bad, commands=gateway)
    assert result.code == 2 and gateway.calls == []
    assert len(result.err.strip().splitlines()) == 1


def test_through_ssm_run_command(dep, tmp_path):
    """No command port given: SendCommand with the deployment's ShowTunnels, then
    GetCommandInvocation until it ends (here: what the document printed)."""
    output = GatewayDocuments(tmp_path).invoke({"TunnelName": ""})
    assert output.status == "Success"
    ssm = dep.session.client("ssm", endpoint_url=dep.url)
    stub = Stubber(ssm)
    stub.add_response(
        "send_command",
        {"Command": {"CommandId": COMMAND_ID}},
        {
            "InstanceIds": [dep.gateway_id],
            "DocumentName": f"{DEPLOYMENT}-ShowTunnels",
            "Parameters": {"TunnelName": [""]},
            "TimeoutSeconds": ANY,
            "Comment": ANY,
        },
    )
    invocation = {"CommandId": COMMAND_ID, "InstanceId": dep.gateway_id}
    stub.add_response("get_command_invocation", {"Status": "InProgress"}, invocation)
    stub.add_response(
        "get_command_invocation",
        {"Status": "Success", "StandardOutputContent": output.stdout},
        {"CommandId": COMMAND_ID, "InstanceId": dep.gateway_id},
    )
    stub.activate()
    dep.clients["ssm"] = ssm
    result = tunnels(dep)
    assert result.code == 0, result.err
    assert len(rows(result.out, "partner-")) == 3
    stub.assert_no_pending_responses()


def test_a_failed_command_is_one_line_naming_the_document(dep):
    ssm = dep.session.client("ssm", endpoint_url=dep.url)
    stub = Stubber(ssm)
    stub.add_response(
        "send_command", {"Command": {"CommandId": "11111111-2222-3333-4444-666666666666"}}, None
    )
    stub.add_response(
        "get_command_invocation",
        {"Status": "Failed", "StandardErrorContent": "ShowTunnels: swanctl is not installed\n"},
        None,
    )
    stub.activate()
    dep.clients["ssm"] = ssm
    result = tunnels(dep)
    assert result.code == 2 and result.out == ""
    [line] = result.err.splitlines()
    assert "ShowTunnels Failed on gateway" in line and "swanctl is not installed" in line


def test_the_gateway_is_the_instance_holding_g_not_an_impostor(dep, tmp_path):
    for n in range(12):  # until one sorts after the real gateway (a tag-only lookup took it)
        impostor = dep.launch(f"10.10.1.{60 + n}", tags=GATEWAY_TAGS)
        if impostor > dep.gateway_id:
            break
    gateway = GatewayDocuments(tmp_path)
    assert tunnels(dep, commands=gateway).code == 0
    assert [call[0] for call in gateway.calls] == [dep.gateway_id]


def test_no_gateway_is_one_line(dep, tmp_path):
    dep.ec2.terminate_instances(InstanceIds=[dep.gateway_id])
    result = tunnels(dep, commands=GatewayDocuments(tmp_path))
    assert result.code == 2
    [line] = result.err.splitlines()
    assert "no running gateway" in line
