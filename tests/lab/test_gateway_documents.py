"""ConfigureGateway, ConfigureTunnel and RestartTunnel run for real on the lab's gateway."""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import time

import pytest

from lab import topology as topo
from lab.ssm_runner import load_document
from lab.story import _wait, settle_sas
from tunnelnat.adapters.commands import CommandError

pytestmark = pytest.mark.lab
TUNNEL_LOCK = "/run/lock/tunnelnat-configure-tunnel.lock"


def last_json(text):
    return json.loads(text.strip().splitlines()[-1])


def configure_tunnel(lab, **overrides):
    """ConfigureTunnel alone, with its association's parameters: what the PskRollout rule sends
    when the secret's AWSCURRENT version moved."""
    declared = load_document(topo.REPO / "ssm_documents" / "ConfigureTunnel.yaml")["parameters"]
    params = lab.configure_gateway_parameters(**overrides)
    return lab.commands.run(
        lab.aws.gateway_id, "ConfigureTunnel", {k: v for k, v in params.items() if k in declared}
    )


def ike_sas():
    """The tunnel's ESTABLISHED IKE SAs on the gateway: unique id ('#N') -> True when the
    partner initiated it (the '*' marks our own SPI: on the responder's, the partner started)."""
    out = topo.in_ns("tn-gw", ["swanctl", "--list-sas", "--ike", topo.TUNNEL], check=False)
    found = re.findall(
        rf"^{topo.TUNNEL}: (#\d+), ESTABLISHED, IKEv2, \w+_i(\*?) \w+_r", out, re.MULTILINE
    )
    return {sa: star == "" for sa, star in found}


def settled(lab):
    """The AWS-like partner initiates too (its start action, retried until answered): wait until
    both sides hold one IKE SA and one CHILD_SA and the partner has no attempt of its own still
    pending, so nothing completes a second IKE SA by itself while a test compares. Whose SA
    survives (ours, or the partner's after unique = replace) does not matter here."""

    def quiet() -> bool:
        pending = topo.in_ns("tn-pvpn", ["swanctl", "--list-sas"], check=False)
        return settle_sas(timeout=0)["one_each"] and "CONNECTING" not in pending

    assert _wait(quiet, 45), topo.in_ns("tn-gw", ["swanctl", "-l"])
    return ike_sas()


def config_id():
    return topo.in_ns("tn-gw", ["cat", f"/etc/tunnelnat/tunnels/{topo.TUNNEL}.config-id"]).strip()


def set_psk(lab, psk, *, partner=True):
    """A new key in the secret (AWSCURRENT moves) and, agreed, on the partner's side too (it
    loads the key; its IKE SA stays as it is)."""
    lab.aws.client("secretsmanager").put_secret_value(SecretId=topo.PSK_SECRET, SecretString=psk)
    if partner:
        lab.psk = psk
        lab.write_partner(lab.partner)
        topo.in_ns("tn-pvpn", ["swanctl", "--load-creds", "--noprompt"])


def gateway_state(lab):
    return {
        "conf": topo.in_ns("tn-gw", ["cat", f"/etc/swanctl/conf.d/tunnelnat-{topo.TUNNEL}.conf"]),
        "table": topo.in_ns("tn-gw", ["nft", "list", "table", "ip", "tunnelnat"]),
        "lo": topo.in_ns("tn-gw", ["ip", "-4", "-o", "addr", "show", "dev", "lo"]),
        "ike_sas": topo.in_ns("tn-gw", ["swanctl", "--list-sas"]).count("ESTABLISHED"),
    }


def test_configure_gateway_twice_is_idempotent(configured_lab):
    lab = configured_lab
    sas = settled(lab)
    before, token = gateway_state(lab), config_id()
    again = lab.configure_gateway()
    assert again.ok, again.stderr[-1500:]
    report = last_json(again.stdout)  # ConfigureTunnel's
    assert report["up"] is True
    assert report["swanctl_changed"] is False and report["restarted"] is False
    assert last_json(lab.gateway_configure.stdout)["forwarding"] is True
    assert gateway_state(lab) == before
    # The established tunnel was kept: the same IKE SAs, the same configuration token, and the
    # re-run started none.
    assert ike_sas() == sas and config_id() == token
    # The key never appears in the output; it sits in a root-only file.
    for run in (lab.gateway_configure, lab.tunnel_configure):
        assert lab.psk not in run.stdout + run.stderr
    mode = topo.in_ns(
        "tn-gw", ["stat", "-c", "%a", f"/etc/swanctl/conf.d/tunnelnat-{topo.TUNNEL}.secret.conf"]
    )
    assert mode.strip() == "600"
    assert topo.in_ns("tn-gw", ["sysctl", "-n", "net.ipv4.ip_forward"]).strip() == "1"


def test_a_new_psk_takes_effect_at_once(configured_lab):
    """The rule's ConfigureTunnel run with a new key: the IKE SA that was up is replaced by one
    authenticated with the new key, in the same run. A key the partner does not have is refused
    at once, not at some later re-authentication; the good key brings the tunnel back."""
    lab = configured_lab
    old_key, before, token = lab.psk, settled(lab), config_id()
    new_key = secrets.token_hex(24)
    set_psk(lab, new_key)
    result = configure_tunnel(lab)
    assert result.ok, result.stderr[-1500:]
    report = last_json(result.stdout)
    assert report["restarted"] is True and report["up"] is True, report
    # Every IKE SA of the old key is gone at once; once a partner's own attempt has been
    # replaced (unique = replace), one IKE SA and one CHILD_SA a side, with the new key.
    assert not set(ike_sas()) & set(before), (before, ike_sas())
    counts = settle_sas()
    assert counts["one_each"], counts
    after = ike_sas()
    assert len(after) == 1 and not set(after) & set(before), (before, after)
    assert config_id() != token  # TunnelEstablished starts over
    assert new_key not in result.stdout + result.stderr
    # Only our side has the next key: refused by the partner in this very run.
    logged = len(topo.in_ns("tn-gw", ["cat", topo.CHARON_LOG]))
    set_psk(lab, secrets.token_hex(24), partner=False)
    refused = configure_tunnel(lab)
    assert refused.ok, refused.stderr[-1500:]  # configured; the tunnel's state is reported
    report = last_json(refused.stdout)
    assert report["restarted"] is True and report["up"] is False, report
    assert ike_sas() == {} and lab.child_sas_installed() == 0
    assert "AUTHENTICATION_FAILED" in topo.in_ns("tn-gw", ["cat", topo.CHARON_LOG])[logged:]
    # The agreed key again: back up.
    set_psk(lab, old_key)
    back = configure_tunnel(lab)
    assert back.ok and last_json(back.stdout)["up"] is True, back.stdout + back.stderr
    assert _wait(lambda: lab.child_sas_installed("tn-pvpn") == 1, 5)


def test_configure_tunnel_runs_one_at_a_time(configured_lab):
    """A run waits for the one holding the lock (the association's, here a stand-in holding it
    3 s) instead of interleaving with it."""
    lab = configured_lab
    holder = subprocess.Popen(  # noqa: S603 - fixed arguments
        topo.machine_argv("tn-gw", ["flock", TUNNEL_LOCK, "sleep", "3"])
    )
    try:
        time.sleep(0.5)
        started = time.monotonic()
        result = configure_tunnel(lab)
        waited = time.monotonic() - started
        assert holder.poll() is not None, "the run finished while the lock was still held"
    finally:
        holder.wait(timeout=10)
    assert result.ok, result.stderr[-1500:]
    assert waited >= 2.4, waited
    assert last_json(result.stdout)["restarted"] is False


def test_the_tunnel_alone_turns_nothing_on(configured_lab):
    """A new gateway where ConfigureTunnel's association ran first: the tunnel comes up, but the
    gateway forwards nothing until ConfigureGateway loads the guard and turns forwarding on."""
    lab = configured_lab
    topo.in_ns("tn-gw", ["sysctl", "-qw", "net.ipv4.ip_forward=0"])
    try:
        result = configure_tunnel(lab)
        assert result.ok and last_json(result.stdout)["up"] is True, result.stderr[-1500:]
        assert topo.in_ns("tn-gw", ["sysctl", "-n", "net.ipv4.ip_forward"]).strip() == "0"
    finally:
        again = lab.configure_gateway()
    assert again.ok, again.stderr[-1500:]
    assert topo.in_ns("tn-gw", ["sysctl", "-n", "net.ipv4.ip_forward"]).strip() == "1"


def test_restart_tunnel_reports_up(configured_lab):
    lab = configured_lab
    # QuietSeconds 0: restart even a tunnel that carries traffic (by default a healthy one is
    # left alone, issue 21: tests/ssm_documents run that path against captured swanctl output).
    result = lab.commands.run(
        lab.aws.gateway_id, "RestartTunnel", {"TunnelName": topo.TUNNEL, "QuietSeconds": "0"}
    )
    assert result.ok, result.stderr
    report = last_json(result.stdout)
    assert report["tunnel"] == topo.TUNNEL and report["up"] is True
    assert report["seconds"] < 5
    assert lab.child_sas_installed() >= 1
    # unique = replace: one IKE SA and one CHILD_SA a side once settled, not two.
    counts = settle_sas()
    assert counts["one_each"], counts


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
    assert lab.child_sas_installed() >= 1
    assert settle_sas()["one_each"]


def test_hostile_parameter_is_refused_before_anything_runs(configured_lab):
    lab = configured_lab
    runs = len(lab.commands.history)
    with pytest.raises(CommandError) as err:
        lab.commands.run(lab.aws.gateway_id, "RestartTunnel", {"TunnelName": "x; reboot"})
    assert not err.value.retryable
    assert "TunnelName" in str(err.value)
    assert len(lab.commands.history) == runs


def test_sync_nat_table_rebuilds_maps_changed_by_hand(configured_lab):
    """SyncNatTable as the controller sends it (bound, the package's sync): a mapping arrives as
    a delta; an element deleted by hand, the generation unchanged, is found by the next sync
    (it reads the live maps back) and rebuilt (drift); with Verify, before a delta too."""
    from ipaddress import IPv4Address

    from tunnelnat.adapters.store import EnrolmentStore, MappingChange, StoredMapping

    lab = configured_lab
    db = lab.aws.client("dynamodb")
    store = EnrolmentStore(db, topo.TABLE)
    meta = db.get_item(TableName=topo.TABLE, Key={"pk": {"S": "meta"}, "sk": {"S": "generation"}})
    generation = int(meta.get("Item", {}).get("generation", {}).get("N", "0"))
    # Addresses no lab machine has (10.10.99.k as 203.0.113.24k): the lab's own mappings stay.
    added = [
        StoredMapping(
            f"i-0drift{k:011d}", IPv4Address(f"10.10.99.{k}"), IPv4Address(f"203.0.113.{240 + k}")
        )
        for k in (1, 2)
    ]

    def sync(**extra: str) -> dict:
        params = {"TableName": topo.TABLE, "Region": topo.REGION, **extra}
        result = lab.commands.run(lab.aws.gateway_id, "SyncNatTable", params)
        assert result.ok, result.stderr[-1500:]
        return last_json(result.stdout)

    def snat() -> str:
        return topo.in_ns("tn-gw", ["nft", "list", "map", "ip", "tunnelnat", "snat_map"])

    def by_hand(*argv: str) -> None:
        topo.in_ns("tn-gw", ["nft", *argv])

    try:
        sync()  # whatever the lab left: current first
        generation = store.write_mappings(
            [MappingChange(added[0].instance_id, added[0], None)], generation=generation,
            claim=False,
        )  # fmt: skip
        report = sync()
        assert report == {**report, "action": "delta", "added": 1}, report
        assert "10.10.99.1 : 203.0.113.241" in snat()
        by_hand("delete", "element", "ip", "tunnelnat", "snat_map", "{ 10.10.99.1 }")
        report = sync()
        assert report == {**report, "action": "full", "reason": "drift"}, report
        assert report["applied_generation"] == report["previous_generation"] == generation
        assert "10.10.99.1 : 203.0.113.241" in snat()
        report = sync()
        assert report == {**report, "action": "unchanged", "verified": True}, report
        # Verify: the live maps checked before a delta builds on them.
        by_hand("delete", "element", "ip", "tunnelnat", "snat_map", "{ 10.10.99.1 }")
        generation = store.write_mappings(
            [MappingChange(added[1].instance_id, added[1], None)], generation=generation,
            claim=False,
        )  # fmt: skip
        report = sync(Verify="true")
        assert report == {**report, "action": "full", "reason": "drift"}, report
        assert "10.10.99.1 : 203.0.113.241" in snat() and "10.10.99.2 : 203.0.113.242" in snat()
    finally:
        meta = db.get_item(
            TableName=topo.TABLE, Key={"pk": {"S": "meta"}, "sk": {"S": "generation"}}
        )
        generation = int(meta["Item"]["generation"]["N"])
        gone = [
            MappingChange(m.instance_id, None, m)
            for m in added
            if "Item" in db.get_item(
                TableName=topo.TABLE, Key={"pk": {"S": "mapping"}, "sk": {"S": m.instance_id}}
            )
        ]  # fmt: skip
        if gone:
            store.write_mappings(gone, generation=generation, claim=False)
        sync()
    assert "10.10.99." not in snat()


def test_documents_write_only_inside_the_machine():
    # Instances' and the gateway's /etc changes live in the lab's overlay, never on the host.
    from pathlib import Path

    assert not Path("/etc/tunnelnat").exists()
    assert not Path("/etc/systemd/system/tunnelnat-routes.service").exists()
