"""What the health agent sees inside a tunnel: bytes, the newest inbound packet, rekeys done and
failed, the NAT map's size, from real strongSwan and nftables output.

tests/unit/data/tunnel_stats/ (capture_tunnel_stats.sh): ``swanctl --list-sas --raw`` of a
per-pair tunnel (partner-1, partner-2) with traffic, before (first.raw) and after (second.raw)
a rekey of each pair; partner-2's rekey succeeded (a new SA, uniqueid 4, beside the old one, now
DELETED), partner-1's was refused for a PFS mismatch; our charon's log over both; the NAT map of
three mappings as ``nft -j list map`` prints it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "gateway"))
from tunnelnat_gateway import health as agent  # noqa: E402

DATA = Path(__file__).parent / "data" / "tunnel_stats"
CHILDREN = ["partner-1", "partner-2"]
NOW = 1_796_035_845.0


def reading(name: str) -> agent.SaReading:
    return agent.SaReading(sas=agent.parse_list_sas_raw((DATA / f"{name}.raw").read_text()))


def log_parts() -> tuple[str, str]:
    """The log up to the first listing (both pairs up, traffic sent), and what came after."""
    text = (DATA / "charon.log").read_text()
    cut = text.index("vici rekey CHILD_SA 'partner-1'")
    cut = text.rindex("\n", 0, cut) + 1
    return text[:cut], text[cut:]


def test_vici_counters_are_read_per_child_sa():
    [ike] = reading("second").sas
    by_id = {c.info["uniqueid"]: c for c in ike.children}
    assert {k: (c.name, c.state) for k, c in by_id.items()} == {
        "1": ("partner-1", "INSTALLED"),
        "2": ("partner-2", "DELETED"),
        "4": ("partner-2", "INSTALLED"),
    }
    new = by_id["4"]
    assert (new.number("bytes-in"), new.number("bytes-out"), new.number("use-in")) == (80, 120, 1)
    assert new.number("packets-in") == 2
    assert new.number("no-such-key") is None
    assert new.info["local-ts"] == ["203.0.113.232/32"]


def test_traffic_counts_what_each_sa_added_since_the_previous_run():
    first = agent.tunnel_children(reading("first"), "partner", CHILDREN)
    b_in, b_out, last_in, seen = agent.traffic(first, {}, None, NOW)
    # Nothing known before: every SA counts all it has (3 exchanges via partner-1, 1 via -2).
    assert (b_in, b_out) == (120 + 40, 180 + 60)
    assert last_in == NOW - 1
    second = agent.tunnel_children(reading("second"), "partner", CHILDREN)
    b_in, b_out, last_in, after = agent.traffic(second, seen, None, NOW + 3)
    # partner-1 added 80/120; partner-2's old SA nothing; its rekeyed SA is new: all of 80/120.
    assert (b_in, b_out) == (80 + 0 + 80, 120 + 0 + 120)
    assert last_in == NOW + 3 - 1
    assert after == {"e7174dba": [200, 300], "bf93eb9a": [40, 60], "5514ff95": [80, 120]}


def test_a_counter_that_went_back_is_a_new_sa_with_a_reused_spi():
    sas = agent.tunnel_children(reading("first"), "partner", CHILDREN)
    b_in, b_out, _, _ = agent.traffic(sas, {"e7174dba": [10_000, 10_000]}, None, NOW)
    assert (b_in, b_out) == (160, 240)


def test_the_newest_inbound_packet_is_kept_when_no_sa_says():
    sas = agent.tunnel_children(reading("first"), "partner", CHILDREN)
    quiet = [agent.ChildSa(s.name, s.state, {**s.info, "use-in": None}) for s in sas]
    assert agent.traffic(quiet, {}, NOW - 50, NOW)[2] == NOW - 50
    # A later packet wins over the remembered one; an older one does not.
    assert agent.traffic(sas, {}, NOW - 50, NOW)[2] == NOW - 1
    assert agent.traffic(sas, {}, NOW - 0.5, NOW)[2] == NOW - 0.5


def test_other_tunnels_children_are_not_counted():
    assert agent.tunnel_children(reading("second"), "partner", ["partner-1"])[0].name == (
        "partner-1"
    )
    assert agent.tunnel_children(reading("second"), "other") == []


def test_rekeys_done_and_failed_from_charons_log():
    before, after = log_parts()
    assert agent.rekey_counts(before) == {}  # first CHILD_SAs are not rekeys
    # partner-2's rekey (outbound SA installed), partner-1's refused (PFS mismatch).
    assert agent.rekey_counts(after) == {"partner": [1, 1]}
    assert agent.rekey_counts(before + after) == {"partner": [1, 1]}


def test_the_log_is_read_from_where_the_previous_run_stopped(tmp_path):
    log = tmp_path / "charon.log"
    before, after = log_parts()
    log.write_text(before)
    text, mark = agent.read_log_since(str(log), None)
    assert text == "" and mark == {"ino": os.stat(log).st_ino, "offset": len(before.encode())}
    first, rest = after.split("\n", 1)
    with log.open("a") as f:
        f.write(first)  # a line still being written
    text, mark2 = agent.read_log_since(str(log), mark)
    assert text == "" and mark2 == mark
    with log.open("a") as f:
        f.write("\n" + rest)
    text, mark3 = agent.read_log_since(str(log), mark2)
    assert text == after and mark3["offset"] == log.stat().st_size
    # Rotated (a new file) or truncated: from its start.
    log.unlink()
    log.write_text(after)
    assert agent.read_log_since(str(log), {**mark3, "ino": -1})[0] == after
    assert agent.read_log_since(str(log), {**mark3, "offset": 10**9})[0] == after
    assert agent.read_log_since(str(tmp_path / "gone.log"), mark3) == ("", mark3)


def test_nat_map_size_from_nft():
    listing = (DATA / "nat-map.json").read_text()

    def run(argv, **kwargs):
        assert argv == ["nft", "-j", "list", "map", "ip", "tunnelnat", "snat_map"]
        return subprocess.CompletedProcess(argv, 0, listing, "")

    assert agent.read_map_size(run) == 3
    missing = subprocess.CompletedProcess([], 1, "", "Error: No such file or directory")
    assert agent.read_map_size(lambda argv, **kw: missing) is None
    garbled = subprocess.CompletedProcess([], 0, "{", "")
    assert agent.read_map_size(lambda argv, **kw: garbled) is None


def _runner(swanctl: str):
    def run(argv, **kwargs):
        if argv[0] == "swanctl":
            if swanctl == "dead":
                return subprocess.CompletedProcess(argv, 111, "", "Error: connecting failed")
            return subprocess.CompletedProcess(argv, 0, (DATA / f"{swanctl}.raw").read_text(), "")
        if argv[:4] == ["nft", "-j", "list", "map"]:
            return subprocess.CompletedProcess(argv, 0, (DATA / "nat-map.json").read_text(), "")
        if argv[:4] == ["nft", "-j", "list", "set"]:
            body = {"nftables": [{"set": {"name": "applied_generation", "elem": [9]}}]}
            return subprocess.CompletedProcess(argv, 0, json.dumps(body), "")
        return subprocess.CompletedProcess(argv, 1, "", "Error: No such file")

    return run


@pytest.fixture
def gateway(tmp_path):
    """ConfigureGateway's facts for a per-pair tunnel, its charon log as of the first listing."""
    config = tmp_path / "tunnels"
    config.mkdir()
    log = tmp_path / "charon.log"
    log.write_text(log_parts()[0])
    (config / "partner.config-id").write_text("c1\n")
    facts = {"children": CHILDREN, "ike": "aes256-sha256-modp2048", "log": str(log)}
    (config / "partner.json").write_text(json.dumps(facts))

    def collect(swanctl: str, now: float) -> agent.Report:
        return agent.collect(
            ["partner"],
            gateway="i-0123456789abcdef0",
            deployment="lab",
            state_file=tmp_path / "counters.json",
            established_file=tmp_path / "established.json",
            config_dir=config,
            now=now,
            run=_runner(swanctl),
        )

    collect.log = log
    return collect


def per_tunnel(report: agent.Report, now: float) -> dict[str, tuple[float, str]]:
    data = agent.metric_data(report, now=now)
    tunnel = [{"Name": "Deployment", "Value": "lab"}, {"Name": "Tunnel", "Value": "partner"}]
    return {d["MetricName"]: (d["Value"], d["Unit"]) for d in data if d["Dimensions"] == tunnel}


def test_two_runs_publish_what_happened_between_them(gateway):
    first = gateway("first", NOW)
    assert first.tunnels[0].up
    metrics = per_tunnel(first, NOW)
    assert metrics["TunnelDataIn"] == (160.0, "Bytes")
    assert metrics["TunnelDataOut"] == (240.0, "Bytes")
    assert metrics["SecondsSinceInbound"] == (1.0, "Seconds")
    assert metrics["ChildSaRekeys"] == (0.0, "Count")  # the log's past is a baseline
    assert metrics["ChildSaRekeyFailures"] == (0.0, "Count")
    with gateway.log.open("a") as f:
        f.write(log_parts()[1])
    second = gateway("second", NOW + 60)
    metrics = per_tunnel(second, NOW + 60)
    assert metrics["TunnelDataIn"] == (160.0, "Bytes")
    assert metrics["TunnelDataOut"] == (240.0, "Bytes")
    assert metrics["SecondsSinceInbound"] == (1.0, "Seconds")
    assert metrics["ChildSaRekeys"] == (1.0, "Count")
    assert metrics["ChildSaRekeyFailures"] == (1.0, "Count")
    assert metrics["TunnelUp"][0] == 1.0
    nat = [d for d in agent.metric_data(second, now=NOW) if d["MetricName"] == "NatMappings"]
    assert [(d["Value"], d["Dimensions"]) for d in nat] == [
        (3.0, [{"Name": "Deployment", "Value": "lab"}])
    ]
    # Nothing new: the same listing again adds no bytes and no rekeys.
    third = per_tunnel(gateway("second", NOW + 120), NOW + 120)
    assert third["TunnelDataIn"][0] == third["TunnelDataOut"][0] == 0.0
    assert third["ChildSaRekeys"][0] == third["ChildSaRekeyFailures"][0] == 0.0
    stats = gateway("second", NOW + 180).tunnels[0].stats
    assert stats == agent.TunnelStats(0, 0, 1.0, 0, 0)


def test_a_dead_charon_publishes_no_bytes_and_the_silence_grows(gateway):
    gateway("second", NOW)
    dead = gateway("dead", NOW + 60)
    metrics = per_tunnel(dead, NOW + 60)
    assert metrics["TunnelUp"][0] == 0.0
    assert "TunnelDataIn" not in metrics and "TunnelDataOut" not in metrics
    assert metrics["SecondsSinceInbound"] == (61.0, "Seconds")


def test_without_charons_log_no_rekey_counts(tmp_path):
    report = agent.collect(
        ["partner"],
        gateway="i-1",
        deployment="lab",
        state_file=tmp_path / "counters.json",
        established_file=tmp_path / "e.json",
        config_dir=tmp_path / "none",
        now=NOW,
        run=_runner("first"),
    )
    metrics = per_tunnel(report, NOW)
    assert "ChildSaRekeys" not in metrics and "ChildSaRekeyFailures" not in metrics
    # Without ConfigureGateway's children list the tunnel's own name is its one CHILD_SA.
    assert metrics["TunnelDataIn"] == (0.0, "Bytes")
