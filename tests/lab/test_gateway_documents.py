"""ConfigureGateway and RestartTunnel run for real on the lab's gateway."""

from __future__ import annotations

import json

import pytest

from lab import topology as topo
from tunnelnat.adapters.commands import CommandError

pytestmark = pytest.mark.lab


def last_json(text):
    return json.loads(text.strip().splitlines()[-1])


def gateway_state(lab):
    return {
        "conf": topo.in_ns("tn-gw", ["cat", "/etc/swanctl/conf.d/tunnelnat.conf"]),
        "table": topo.in_ns("tn-gw", ["nft", "list", "table", "ip", "tunnelnat"]),
        "lo": topo.in_ns("tn-gw", ["ip", "-4", "-o", "addr", "show", "dev", "lo"]),
        "ike_sas": topo.in_ns("tn-gw", ["swanctl", "--list-sas"]).count("ESTABLISHED"),
    }


def test_configure_gateway_twice_is_idempotent(configured_lab):
    lab = configured_lab
    before = gateway_state(lab)
    again = lab.configure_gateway()
    assert again.ok, again.stderr[-1500:]
    report = last_json(again.stdout)
    assert report["up"] is True
    assert report["swanctl_changed"] is False
    assert gateway_state(lab) == before
    # Still exactly one tunnel at both ends: the re-run did not start a second one.
    assert lab.child_sas_installed() == 1
    assert lab.child_sas_installed("tn-pvpn") == 1
    # The key never appears in the output; it sits in a root-only file.
    assert lab.psk not in again.stdout + again.stderr
    mode = topo.in_ns("tn-gw", ["stat", "-c", "%a", "/etc/swanctl/conf.d/tunnelnat-secret.conf"])
    assert mode.strip() == "600"
    assert topo.in_ns("tn-gw", ["sysctl", "-n", "net.ipv4.ip_forward"]).strip() == "1"


def test_restart_tunnel_reports_up(configured_lab):
    lab = configured_lab
    result = lab.commands.run(lab.aws.gateway_id, "RestartTunnel", {"TunnelName": topo.TUNNEL})
    assert result.ok, result.stderr
    report = last_json(result.stdout)
    assert report["tunnel"] == topo.TUNNEL and report["up"] is True
    assert report["seconds"] < 5
    assert lab.child_sas_installed() == 1
    # unique = replace on the partner: one IKE SA there after the restart, not two.
    assert topo.in_ns("tn-pvpn", ["swanctl", "--list-sas"]).count("ESTABLISHED") == 1


def test_restart_of_an_unknown_tunnel_fails_loudly(configured_lab):
    lab = configured_lab
    result = lab.commands.run(lab.aws.gateway_id, "RestartTunnel", {"TunnelName": "nosuch"})
    assert result.status == "Failed"
    assert "no connection named nosuch" in result.stderr


def test_configure_gateway_with_a_missing_secret_fails_and_names_it(configured_lab):
    lab = configured_lab
    result = lab.configure_gateway(PskSecretName="tunnelnat/lab/absent")
    assert result.status == "Failed"
    assert "cannot read secret tunnelnat/lab/absent" in result.stderr
    # The working tunnel was left alone.
    assert lab.child_sas_installed() == 1


def test_hostile_parameter_is_refused_before_anything_runs(configured_lab):
    lab = configured_lab
    runs = len(lab.commands.history)
    with pytest.raises(CommandError) as err:
        lab.commands.run(lab.aws.gateway_id, "RestartTunnel", {"TunnelName": "x; reboot"})
    assert not err.value.retryable
    assert "TunnelName" in str(err.value)
    assert len(lab.commands.history) == runs


def test_documents_write_only_inside_the_machine():
    # Instances' and the gateway's /etc changes live in the lab's overlay, never on the host.
    from pathlib import Path

    assert not Path("/etc/tunnelnat").exists()
    assert not Path("/etc/systemd/system/tunnelnat-routes.service").exists()
