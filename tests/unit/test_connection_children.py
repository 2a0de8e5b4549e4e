"""Several tunnels on one gateway (issue 23): the health agent, ShowTunnels' listing and the
pair agent find a tunnel's CHILD_SAs within its own connection only.

A CHILD_SA's name is unique only within its IKE connection: tunnel ``x`` with SelectorLayout
per-pair has children ``x-1``, ``x-2``, and a partner may be named ``x-2`` (its one child is
``x-2`` too). Read by name alone, tunnel ``x``'s healthy ``x-2`` made tunnel ``x-2`` look up
while it was down. The real-charon side of this is test_connection_children_charon.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "gateway"))
from tunnelnat_gateway import health as agent  # noqa: E402
from tunnelnat_gateway import pair, sas  # noqa: E402

# What swanctl --list-sas --raw prints (one line per IKE SA; the shape of tests/unit/data/swanctl):
# tunnel x up with both per-pair children, tunnel x-2 still connecting.
RAW = (
    "list-sa event {x {uniqueid=1 version=2 state=ESTABLISHED child-sas {x-1-1 {name=x-1 "
    "uniqueid=1 state=INSTALLED bytes-in=10 bytes-out=20} x-2-2 {name=x-2 uniqueid=2 "
    "state=INSTALLED bytes-in=30 bytes-out=40}}}}\n"
    "list-sa event {x-2 {uniqueid=2 version=2 state=CONNECTING child-sas {}}}\n"
)
READING = agent.SaReading(agent.parse_list_sas_raw(RAW))


def test_a_child_named_like_another_tunnel_is_not_that_tunnels():
    status = agent.sa_status("x-2", READING, ["x-2"])
    assert not status.up and status.installed == 0
    assert status.reason == "IKE SA CONNECTING"
    assert agent.tunnel_children(READING, "x-2", ["x-2"]) == []
    # Tunnel x itself: both its pairs.
    assert agent.sa_status("x", READING, ["x-1", "x-2"]).up
    assert [c.name for c in agent.tunnel_children(READING, "x", ["x-1", "x-2"])] == ["x-1", "x-2"]


def test_both_tunnels_up_each_counted_in_its_own_ike_sa():
    raw = RAW.replace(
        "{x-2 {uniqueid=2 version=2 state=CONNECTING child-sas {}}}",
        "{x-2 {uniqueid=2 version=2 state=ESTABLISHED child-sas {x-2-3 {name=x-2 uniqueid=3 "
        "state=INSTALLED bytes-in=5 bytes-out=6}}}}",
    )
    reading = agent.SaReading(agent.parse_list_sas_raw(raw))
    status = agent.sa_status("x-2", reading, ["x-2"])
    assert status.up and status.installed == 1
    (child,) = agent.tunnel_children(reading, "x-2", ["x-2"])
    assert child.info["bytes-in"] == "5"  # x-2's own, not x's pair (30)


def test_the_health_agent_reports_every_tunnel_in_its_list(tmp_path):
    """One TunnelUp per tunnel, each from its own facts (children) and its own IKE SA."""
    (tmp_path / "x.json").write_text(json.dumps({"children": ["x-1", "x-2"]}))
    (tmp_path / "x-2.json").write_text(json.dumps({"children": ["x-2"]}))

    def run(argv, **_kw):
        if argv[0] == "swanctl":
            return subprocess.CompletedProcess(argv, 0, RAW, "")
        if argv[:4] == ["nft", "-j", "list", "set"]:
            found = {"nftables": [{"set": {"name": "applied_generation", "elem": [3]}}]}
            return subprocess.CompletedProcess(argv, 0, json.dumps(found), "")
        return subprocess.CompletedProcess(argv, 1, "", "Error: No such file")

    report = agent.collect(
        ["x", "x-2"],
        gateway="i-0123456789abcdef0",
        deployment="d",
        state_file=tmp_path / "state.json",
        established_file=tmp_path / "established.json",
        config_dir=tmp_path,
        now=1000.0,
        run=run,
    )
    assert [(t.tunnel, t.up) for t in report.tunnels] == [("x", True), ("x-2", False)]
    data = agent.metric_data(report, now=1000.0)
    up = {
        d["Dimensions"][0]["Value"]: d["Value"]
        for d in data
        if d["MetricName"] == "TunnelUp" and d["Dimensions"][0]["Name"] == "Tunnel"
    }
    assert up == {"x": 1, "x-2": 0}


def test_show_tunnels_lists_only_the_tunnels_own_sas():
    lines = sas.listing(READING, {"x-2": {}}, 1000.0)
    assert [line["kind"] for line in lines] == ["tunnel", "ike"]
    assert lines[1]["ike"] == "x-2" and lines[1]["state"] == "CONNECTING"
    both = sas.listing(READING, {"x": {"children": ["x-1", "x-2"]}, "x-2": {}}, 1000.0)
    children = [(line["ike"], line["child"]) for line in both if line["kind"] == "child"]
    assert children == [("x", "x-1"), ("x", "x-2")]


VALID = {
    "region": "eu-west-1",
    "eni_id": "eni-0123456789abcdef0",
    "gateway": "10.10.1.20/24",
    "deployment": "tunnelnat-lab",
    "table": "tunnelnat-lab",
    "tunnel": "partner",
}


def test_the_pair_agent_counts_children_within_their_connection():
    assert pair.installed_children(RAW, ["x-2"], "x-2") == 0
    assert pair.installed_children(RAW, ["x-1", "x-2"], "x") == 2
    assert pair.installed_children(RAW, ["x-2"]) == 1  # by name alone: the old reading


def test_the_pair_agent_without_tunnels_dir_carries_its_one_tunnel(tmp_path):
    cfg = pair.PairConfig.from_json(VALID | {"children": ["partner-1", "partner-2"]})
    assert pair.connections(cfg) == (("partner", ("partner-1", "partner-2")),)


def test_the_pair_agent_with_tunnels_dir_initiates_every_tunnel_by_connection(tmp_path):
    """Several partners: every tunnel ConfigureTunnel wrote a <tunnel>.json for, each child
    initiated with its connection (--ike), every IKE SA dropped first."""
    cfg = pair.PairConfig.from_json(VALID | {"tunnels_dir": str(tmp_path)})
    assert pair.connections(cfg) == (("partner", ("partner",)),)  # none yet: the config's
    (tmp_path / "x.json").write_text(json.dumps({"children": ["x-1", "x-2"]}))
    (tmp_path / "x-2.json").write_text(json.dumps({"children": ["x-2"], "ike": "aes256"}))
    (tmp_path / "y.json").write_text("not json")  # unreadable: its one child is its name
    (tmp_path / "y.charon").write_text("{}")  # ConfigureTunnel's other files: not tunnels
    (tmp_path / "bad name.json").write_text("{}")
    assert pair.connections(cfg) == (("x", ("x-1", "x-2")), ("x-2", ("x-2",)), ("y", ("y",)))
    calls = []

    def run(argv, **_kw):
        calls.append(argv)
        failed = argv[1] == "--initiate" and argv[3] == "y"
        return subprocess.CompletedProcess(argv, 1 if failed else 0, "", "")

    assert pair.initiate(cfg, run) == ["y/y"]
    assert calls == [
        ["swanctl", "--terminate", "--ike", "x", "--force"],
        ["swanctl", "--terminate", "--ike", "x-2", "--force"],
        ["swanctl", "--terminate", "--ike", "y", "--force"],
        ["swanctl", "--initiate", "--ike", "x", "--child", "x-1", "--timeout", "-1"],
        ["swanctl", "--initiate", "--ike", "x", "--child", "x-2", "--timeout", "-1"],
        ["swanctl", "--initiate", "--ike", "x-2", "--child", "x-2", "--timeout", "-1"],
        ["swanctl", "--initiate", "--ike", "y", "--child", "y", "--timeout", "-1"],
    ]


def test_the_pair_agent_reads_every_tunnels_sas_and_loaded_connections(tmp_path):
    conns = (("x", ("x-1", "x-2")), ("x-2", ("x-2",)))

    def run(argv, **_kw):
        if argv[1] == "--list-sas":
            return subprocess.CompletedProcess(argv, 0, RAW, "")
        listing = "x: IKEv2, rekeying every 28260s\n  x-2: TUNNEL\nx-2: IKEv1, reauth\n"
        return subprocess.CompletedProcess(argv, 0, listing, "")

    assert pair.read_sas(conns, run) == 2  # x's two; x-2 has none of its own yet
    assert pair.read_tunnel_loaded(["x", "x-2"], run) is True
    assert pair.read_tunnel_loaded(["x", "y"], run) is False
    assert pair.read_tunnel_loaded("x", run) is True


def test_charons_lines_of_another_tunnels_ike_sa_are_not_this_tunnels_diagnosis():
    """Several partners share charon's log: a line of an IKE SA before its connection is known
    (``<7>``) belongs to the tunnel that IKE SA later turns out to be (``<bank|7>``)."""
    log = (
        "1000 11[IKE] <7> tried 1 shared key for '198.51.100.1' - '198.51.100.6', but MAC "
        "mismatched\n"
        "1001 11[IKE] <bank|7> received AUTHENTICATION_FAILED notify error\n"
        "1002 12[IKE] <alpha|3> CHILD_SA alpha{3} established with SPIs c1_i c2_o\n"
    )
    assert agent.diagnose(log, "alpha", {}, 1010.0) is None
    assert agent.diagnose(log, "bank", {}, 1010.0).startswith("authentication failed")
    # An IKE SA no named line claims: still the tunnel's (one tunnel's log, as before).
    lone = "1000 11[IKE] <9> tried 1 shared key for 'a' - 'b', but MAC mismatched\n"
    assert agent.diagnose(lone, "alpha", {}, 1010.0).startswith("authentication failed")


def test_a_removal_whose_load_fails_stays_recorded_and_is_retried(tmp_path):
    """remove-tunnel unlinks the connection and key, then loads; only a load that succeeded
    removes the tunnel's records (what prune_tunnels and the agents go by): a failed one leaves
    it recorded, so the next run removes it again."""
    from tests.unit.test_tunnel_verb import Gateway, configure
    from tunnelnat_gateway import tunnel

    gw = Gateway(tmp_path)
    code, report, err = configure(gw)
    assert code == 0, err
    assert tunnel.configured_tunnels(gw.host()) == ["partner"]
    (gw.fake / "load-fails").touch()
    code = tunnel.remove_main(["--tunnel-name", "partner"], gw.host())
    assert code == 1
    assert not gw.file("/etc/swanctl/conf.d/tunnelnat-partner.conf").exists()
    assert gw.file("/etc/tunnelnat/tunnels/partner.json").exists()
    assert tunnel.configured_tunnels(gw.host()) == ["partner"]  # still to remove
    (gw.fake / "load-fails").unlink()
    (removed,) = tunnel.prune_tunnels(gw.host(), [])
    assert removed["tunnel"] == "partner" and removed["removed"] is True
    assert tunnel.configured_tunnels(gw.host()) == []
    assert not gw.file("/etc/tunnelnat/tunnels/partner.json").exists()
    assert "--load-all --noprompt" in gw.calls()
