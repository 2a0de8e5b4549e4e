"""The gateway's health agent, against real strongSwan and nftables output captured in the lab.

tests/unit/data/swanctl/ holds what ``swanctl --list-sas [--raw]`` printed on the initiator in
each state (tests/unit/data/capture_swanctl.sh re-captures it: two charons in tn-heal-*
namespaces); tests/unit/data/nft/ what ``nft -j list counters`` and ``nft -j list set ...
applied_generation`` printed (capture_nft.sh).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "gateway"))
from tunnelnat_gateway import health as agent  # noqa: E402

DATA = Path(__file__).parent / "data"
SWANCTL = DATA / "swanctl"
NFT = DATA / "nft"


def recorded(name: str) -> subprocess.CompletedProcess:
    """What swanctl --list-sas --raw returned in state ``name``: exit code, stdout, stderr."""
    base = SWANCTL / f"{name}.raw"
    return subprocess.CompletedProcess(
        ["swanctl"],
        int((SWANCTL / f"{name}.raw.rc").read_text()),
        base.read_text(),
        (SWANCTL / f"{name}.raw.stderr").read_text(),
    )


def nft_recorded(name: str) -> subprocess.CompletedProcess:
    rc = NFT / f"{name}.rc"
    if rc.exists():
        return subprocess.CompletedProcess(["nft"], int(rc.read_text()), "", "")
    return subprocess.CompletedProcess(["nft"], 0, (NFT / f"{name}.json").read_text(), "")


def generation_recorded(state: str) -> subprocess.CompletedProcess:
    """``nft -j list set ip tunnelnat applied_generation`` in ``state``: applied, empty, missing."""
    name = f"generation-{state}"
    rc = NFT / f"{name}.rc"
    if rc.exists():
        stderr = (NFT / f"{name}.stderr").read_text()
        return subprocess.CompletedProcess(["nft"], int(rc.read_text()), "", stderr)
    return subprocess.CompletedProcess(["nft"], 0, (NFT / f"{name}.json").read_text(), "")


def runner(swanctl=None, nft=None, calls=None, generation="applied", nat_map=None):
    """swanctl's answer; nft's for the counters (``nft``), for the applied generation set
    (``generation``: a recorded state's name, a CompletedProcess or an exception) and for the
    NAT map (``nat_map``; default: the table is missing)."""

    def run(argv, **kwargs):
        if calls is not None:
            calls.append((argv, kwargs))
        if argv[0] == "swanctl":
            if isinstance(swanctl, BaseException):
                raise swanctl
            return swanctl
        if argv[:4] == ["nft", "-j", "list", "set"]:
            if isinstance(generation, BaseException):
                raise generation
            if isinstance(generation, str):
                return generation_recorded(generation)
            return generation
        if argv[:4] == ["nft", "-j", "list", "map"]:
            return nat_map or subprocess.CompletedProcess(argv, 1, "", "Error: No such file")
        if argv[0] == "nft":
            if isinstance(nft, BaseException):
                raise nft
            return nft or subprocess.CompletedProcess(argv, 1, "", "Error: No such file")
        raise AssertionError(argv)

    return run


def reading(name: str) -> agent.SaReading:
    return agent.read_sas(run=runner(recorded(name)))


# -- parsing real output ---------------------------------------------------------------------


def test_established_tunnel_is_up():
    status = agent.sa_status("partner", reading("established"))
    assert status.up and status.installed == 1
    assert status.reason == "established, child SA installed"


def test_established_ike_sa_without_child_sa_is_down():
    sas = agent.parse_list_sas_raw((SWANCTL / "child-missing.raw").read_text())
    assert [(s.name, s.state, s.children) for s in sas] == [("partner", "ESTABLISHED", ())]
    status = agent.sa_status("partner", reading("child-missing"))
    assert not status.up
    assert "no INSTALLED child SA" in status.reason


def test_connecting_and_deleting_ike_sas_are_down():
    sas = agent.parse_list_sas_raw((SWANCTL / "connecting.raw").read_text())
    assert sorted(s.state for s in sas) == ["CONNECTING", "DELETING"]
    status = agent.sa_status("partner", reading("connecting"))
    assert not status.up
    assert status.reason == "IKE SA CONNECTING/DELETING"


def test_rekeying_counts_only_the_installed_child_sa():
    (ike,) = agent.parse_list_sas_raw((SWANCTL / "rekeying.raw").read_text())
    assert sorted(c.state for c in ike.children) == ["DELETED", "INSTALLED"]
    status = agent.sa_status("partner", reading("rekeying"))
    assert status.up and status.installed == 1


def test_dead_charon_reads_as_down_not_as_an_error():
    result = recorded("charon-dead")
    assert result.returncode != 0 and result.stdout == ""
    r = agent.read_sas(run=runner(result))
    assert not r.ok
    assert "Connection refused" in r.error
    status = agent.sa_status("partner", r)
    assert not status.up and status.reason.startswith("charon: swanctl exited")


def test_other_tunnel_names_are_not_up():
    status = agent.sa_status("other", reading("established"))
    assert not status.up and status.reason == "no IKE SA"


def test_the_plain_listing_agrees_with_the_raw_one():
    # The lab's helper and RestartTunnel grep the plain listing; the agent reads --raw. Both
    # captures come from the same moment.
    for name, up in [("established", True), ("child-missing", False), ("rekeying", True)]:
        plain = (SWANCTL / f"{name}.plain").read_text()
        assert ("INSTALLED" in plain) is up
        assert agent.sa_status("partner", reading(name)).up is up


@pytest.mark.parametrize(
    "failure, words",
    [
        (subprocess.TimeoutExpired(["swanctl"], 8), "did not answer"),
        (FileNotFoundError(2, "swanctl"), "not installed"),
        (PermissionError(13, "denied"), "cannot run swanctl"),
    ],
)
def test_swanctl_that_hangs_or_is_missing_reads_as_down(failure, words):
    r = agent.read_sas(run=runner(failure))
    assert not r.ok and words in r.error
    assert not agent.sa_status("partner", r).up


@pytest.mark.parametrize(
    "text",
    [
        "garbage\n",
        "list-sa event {partner {state=ESTABLISHED child-sas {}\n",  # unbalanced
        "list-sa event partner\n",
        "list-sa event {partner {state=ESTABLISHED}}}\n",
    ],
)
def test_unreadable_output_reads_as_down(text):
    r = agent.read_sas(run=runner(subprocess.CompletedProcess(["swanctl"], 0, text, "")))
    assert not r.ok and "unreadable" in r.error
    assert not agent.sa_status("partner", r).up


def test_empty_listing_is_no_ike_sa():
    r = agent.read_sas(run=runner(subprocess.CompletedProcess(["swanctl"], 0, "", "")))
    assert r.ok and r.sas == ()
    assert agent.sa_status("partner", r).reason == "no IKE SA"


def test_swanctl_is_asked_with_raw_noblock_and_a_timeout():
    calls = []
    agent.read_sas(uri="unix:///run/x.vici", run=runner(recorded("established"), calls=calls))
    argv, kwargs = calls[0]
    assert argv == ["swanctl", "--list-sas", "--raw", "--noblock", "--uri", "unix:///run/x.vici"]
    assert kwargs["timeout"] > 0


# -- the probe ---------------------------------------------------------------------------------


PROBE = agent.Probe.parse("192.0.2.80:8080", "203.0.113.100")


def test_probe_runs_only_when_the_sas_are_up():
    asked = []

    def prober(p):
        asked.append(p)
        return False, "probe 192.0.2.80:8080: ETIMEDOUT"

    down = agent.tunnel_status("partner", reading("child-missing"), PROBE, prober)
    assert not down.up and asked == []
    failed = agent.tunnel_status("partner", reading("established"), PROBE, prober)
    assert not failed.up and failed.probe_ok is False and "ETIMEDOUT" in failed.reason
    ok = agent.tunnel_status("partner", reading("established"), PROBE, lambda p: (True, "ok"))
    assert ok.up and ok.probe_ok is True


def test_tcp_probe_counts_accept_and_reset_as_an_answer():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        probe = agent.Probe.parse(f"127.0.0.1:{port}", "127.0.0.1")
        assert agent.tcp_probe(probe, timeout=2)[0]
    # The listener is gone: the RST still came back.
    assert agent.tcp_probe(probe, timeout=2)[0]


def test_tcp_probe_from_an_address_we_do_not_have_fails():
    probe = agent.Probe.parse("127.0.0.1:9", "198.51.100.254")
    ok, detail = agent.tcp_probe(probe, timeout=1)
    assert not ok and "probe" in detail


@pytest.mark.parametrize("spec", ["192.0.2.80", "192.0.2.80:0", "host:80", "192.0.2.80:99999"])
def test_bad_probe_specs_are_refused(spec):
    with pytest.raises(ValueError):
        agent.Probe.parse(spec)


# -- nftables counters -------------------------------------------------------------------------


def test_counters_from_real_nft_output():
    assert agent.parse_nft_counters((NFT / "empty.json").read_text()) == {
        "dropped_unenrolled": 0,
        "dropped_inbound": 0,
        "dropped_cleartext": 0,
    }
    assert agent.parse_nft_counters((NFT / "counting.json").read_text()) == {
        "dropped_unenrolled": 1,
        "dropped_inbound": 0,
        "dropped_cleartext": 3,
    }


def test_missing_table_reads_as_none():
    rc = int((NFT / "missing.rc").read_text())
    missing = subprocess.CompletedProcess(["nft"], rc, "", (NFT / "missing.stderr").read_text())
    assert agent.read_counters(runner(nft=missing)) is None
    assert agent.read_counters(runner(nft=FileNotFoundError(2, "nft"))) is None
    garbage = subprocess.CompletedProcess(["nft"], 0, "{not json", "")
    assert agent.read_counters(runner(nft=garbage)) is None


def test_counter_deltas_handle_first_run_and_reset():
    assert agent.counter_deltas({"a": 5, "b": 7}, {}) == {"a": 5, "b": 7}
    assert agent.counter_deltas({"a": 9, "b": 7}, {"a": 5, "b": 7}) == {"a": 4, "b": 0}
    # The table was reloaded: counting restarted from zero.
    assert agent.counter_deltas({"a": 2}, {"a": 5}) == {"a": 2}


# -- collecting and publishing -----------------------------------------------------------------


def nft_ok():
    return subprocess.CompletedProcess(["nft"], 0, (NFT / "counting.json").read_text(), "")


def configured(tmp_path, tunnel="partner", token="c1"):
    """ConfigureGateway's marker for ``tunnel`` in a config dir under tmp_path."""
    config_dir = tmp_path / "tunnels"
    config_dir.mkdir(exist_ok=True)
    (config_dir / f"{tunnel}.config-id").write_text(token + "\n")
    return config_dir


def test_collect_and_metric_data(tmp_path):
    state = tmp_path / "counters.json"
    state.write_text(json.dumps({"dropped_cleartext": 1}))
    report = agent.collect(
        ["partner"],
        gateway="i-0123456789abcdef0",
        deployment="lab",
        high_resolution=True,
        state_file=state,
        established_file=tmp_path / "established.json",
        config_dir=configured(tmp_path),
        run=runner(recorded("established"), nft_ok()),
    )
    assert report.counters == {
        "dropped_unenrolled": 1,
        "dropped_inbound": 0,
        "dropped_cleartext": 2,
    }
    assert json.loads(state.read_text())["dropped_cleartext"] == 3
    data = agent.metric_data(report, now=1_700_000_000)
    up = [d for d in data if d["MetricName"] == "TunnelUp"]
    assert [d["Dimensions"] for d in up] == [
        [
            {"Name": "Tunnel", "Value": "partner"},
            {"Name": "Gateway", "Value": "i-0123456789abcdef0"},
        ],
        [{"Name": "Deployment", "Value": "lab"}, {"Name": "Tunnel", "Value": "partner"}],
    ]
    assert all(d["Value"] == 1.0 and d["StorageResolution"] == 1 for d in up)
    by_name = {d["MetricName"]: d["Value"] for d in data if d["MetricName"] != "TunnelUp"}
    assert by_name == {
        "TunnelEstablished": 1.0,
        # The captured SA carried nothing yet; no log to count rekeys from, no NAT map listed.
        "TunnelDataIn": 0.0,
        "TunnelDataOut": 0.0,
        "NatTablePresent": 1.0,
        "DroppedCleartext": 2.0,
        "DroppedUnenrolled": 1.0,
        "DroppedInbound": 0.0,
    }


def test_dead_charon_and_missing_table_still_publish_zeros(tmp_path):
    report = agent.collect(
        ["partner", "backup"],
        gateway="i-1",
        deployment="lab",
        state_file=tmp_path / "s.json",
        established_file=tmp_path / "e.json",
        config_dir=tmp_path / "none",
        run=runner(recorded("charon-dead"), generation="missing"),
    )
    data = agent.metric_data(report, now=0)
    assert [d["Value"] for d in data if d["MetricName"] == "TunnelUp"] == [0.0] * 4
    assert [d["Value"] for d in data if d["MetricName"] == "TunnelEstablished"] == [0.0] * 2
    others = {
        d["MetricName"]: d["Value"]
        for d in data
        if d["MetricName"] not in ("TunnelUp", "TunnelEstablished")
    }
    assert others == {"NatTablePresent": 0.0}
    assert all(d["StorageResolution"] == 60 for d in data)


class FakeCloudWatch:
    def __init__(self, fail=False):
        self.calls = []
        self.fail = fail

    def put_metric_data(self, **kwargs):
        if self.fail:
            raise RuntimeError("endpoint unreachable")
        self.calls.append(kwargs)


def run_main(monkeypatch, capsys, state, client, *extra):
    import boto3

    monkeypatch.setattr(boto3, "client", lambda *a, **k: client)
    monkeypatch.setattr(agent, "read_sas", lambda **k: agent.SaReading(error="swanctl exited 111"))
    monkeypatch.setattr(agent, "read_counters", lambda run=None: None)
    code = agent.main(
        [
            "once",
            "--tunnels",
            "partner",
            "--gateway-id",
            "i-1",
            "--region",
            "us-east-1",
            "--established-file",
            str(state / "established.json"),
            "--config-dir",
            str(state / "tunnels"),
            "--role-file",  # a pair agent's, absent unless the test writes it: single mode
            str(state / "pair-role"),
            *extra,
        ]
    )
    return code, json.loads(capsys.readouterr().out)


def test_main_publishes_zero_when_charon_is_dead(monkeypatch, capsys, tmp_path):
    client = FakeCloudWatch()
    code, line = run_main(
        monkeypatch, capsys, tmp_path, client, "--state-file", str(tmp_path / "s")
    )
    assert code == 0 and line["published"] is True
    assert line["tunnels"][0]["up"] is False
    (call,) = client.calls
    assert call["Namespace"] == "tunnelnat/tunnelnat"  # the default deployment's own namespace
    assert [d["Value"] for d in call["MetricData"] if d["MetricName"] == "TunnelUp"] == [0.0, 0.0]


def test_metrics_go_to_the_deployments_own_namespace(monkeypatch, capsys, tmp_path):
    """Issue 21, finding 3: the shared ``tunnelnat`` namespace is anyone's with PutMetricData on
    it (the CloudWatch agent's policy, another deployment's gateway): TunnelUp goes to
    ``tunnelnat/<deployment>``, the only namespace this deployment's gateway role may publish
    to and the one its alarm and healer read."""
    client = FakeCloudWatch()
    code, _ = run_main(
        monkeypatch, capsys, tmp_path, client, "--state-file", str(tmp_path / "s"),
        "--deployment", "lab",
    )  # fmt: skip
    assert code == 0 and {c["Namespace"] for c in client.calls} == {"tunnelnat/lab"}
    # The stack may name it (InstallHealthAgent's Namespace); never the shared one.
    client = FakeCloudWatch()
    code, line = run_main(monkeypatch, capsys, tmp_path, client, "--namespace", "tunnelnat/lab")
    assert code == 0 and line["namespace"] == "tunnelnat/lab"
    for shared in ("tunnelnat", "AWS/EC2", "tunnelnat/"):
        with pytest.raises(SystemExit):
            run_main(monkeypatch, capsys, tmp_path, FakeCloudWatch(), "--namespace", shared)


@pytest.mark.parametrize("role", ["active", "standby"])
def test_the_standby_of_a_pair_publishes_no_tunnel_metric(monkeypatch, capsys, tmp_path, role):
    """Its tunnel reads 0 by design (it holds no SA): that 0 must never reach the series the
    alarm watches, which the active feeds. The gateway's own metrics still go out."""
    (tmp_path / "pair-role").write_text(f"{role}\n")
    client = FakeCloudWatch()
    code, line = run_main(
        monkeypatch, capsys, tmp_path, client, "--state-file", str(tmp_path / "s")
    )
    assert code == 0 and line["role"] == role and line["tunnels"][0]["up"] is False
    names = {d["MetricName"] for d in client.calls[0]["MetricData"]}
    tunnel_metrics = {"TunnelUp", "TunnelEstablished"}
    if role == "standby":
        assert names & tunnel_metrics == set() and "NatTablePresent" in names
    else:
        assert tunnel_metrics <= names


def test_main_fails_loudly_when_publishing_fails(monkeypatch, capsys, tmp_path):
    code, line = run_main(monkeypatch, capsys, tmp_path, FakeCloudWatch(fail=True))
    assert code == 2 and line["published"] is False and "unreachable" in line["error"]


@pytest.mark.parametrize(
    "args",
    [
        ["--tunnels", "bad;name"],
        ["--tunnels", "partner", "--probe", "nope"],
        ["--tunnels", "partner", "--deployment", "a b"],
    ],
)
def test_main_refuses_bad_arguments(args):
    with pytest.raises(SystemExit):
        agent.main(["once", "--gateway-id", "i-1", "--region", "us-east-1", *args])


# -- the NAT table must be applied (synced), not just present ----------------------------------


def test_applied_generation_from_real_nft_output():
    assert agent.parse_applied_generation((NFT / "generation-applied.json").read_text()) == 7
    # A boot-time restore leaves the set empty until the first sync.
    assert agent.parse_applied_generation((NFT / "generation-empty.json").read_text()) is None
    with pytest.raises(ValueError):
        agent.parse_applied_generation((NFT / "counting.json").read_text())


@pytest.mark.parametrize(
    "state, generation, words",
    [
        ("applied", 7, ""),
        ("empty", None, "not synced since boot (applied_generation is empty)"),
        ("missing", None, "NAT table ip tunnelnat missing: Error: No such file or directory"),
    ],
)
def test_reading_the_applied_generation(state, generation, words):
    table = agent.read_applied_generation(runner(generation=state))
    assert table.generation == generation and table.applied is (generation is not None)
    assert words in table.reason


def test_nft_that_fails_to_run_reads_as_not_applied():
    table = agent.read_applied_generation(runner(generation=FileNotFoundError(2, "nft")))
    assert not table.applied and "not readable" in table.reason


@pytest.mark.parametrize("state", ["empty", "missing"])
def test_tunnel_reads_down_until_the_table_is_applied_whatever_strongswan_says(tmp_path, state):
    probes = []
    report = agent.collect(
        ["partner"],
        gateway="i-1",
        deployment="lab",
        probe=agent.Probe.parse("192.0.2.7:443", "203.0.113.10"),
        state_file=tmp_path / "s.json",
        established_file=tmp_path / "e.json",
        config_dir=configured(tmp_path),
        run=runner(recorded("established"), nft_ok(), generation=state),
        prober=lambda p: probes.append(p) or (True, "probe answered"),
    )
    (status,) = report.tunnels
    assert status.up is False and status.installed == 1
    assert "NAT table" in status.reason and "strongSwan: established" in status.reason
    assert probes == []  # a tunnel without its table is not probed
    data = agent.metric_data(report, now=0)
    assert [d["Value"] for d in data if d["MetricName"] == "TunnelUp"] == [0.0, 0.0]
    # Once the table is synced the same SAs read up.
    synced = agent.collect(
        ["partner"],
        gateway="i-1",
        deployment="lab",
        state_file=tmp_path / "s.json",
        established_file=tmp_path / "e.json",
        config_dir=configured(tmp_path),
        run=runner(recorded("established"), nft_ok(), generation="applied"),
    )
    assert synced.tunnels[0].up is True and synced.table.generation == 7


def test_main_prints_why_the_tunnel_reads_down(monkeypatch, capsys, tmp_path):
    import boto3

    client = FakeCloudWatch()
    monkeypatch.setattr(boto3, "client", lambda *a, **k: client)
    established = reading("established")
    monkeypatch.setattr(agent, "read_sas", lambda **k: established)
    monkeypatch.setattr(agent, "read_counters", lambda run=None: None)
    monkeypatch.setattr(
        agent,
        "read_applied_generation",
        lambda run=None: agent.TableReading(None, "NAT table not synced since boot"),
    )
    code = agent.main(
        [
            "once",
            *("--tunnels", "partner", "--gateway-id", "i-1", "--region", "us-east-1"),
            *("--state-file", str(tmp_path / "s"), "--established-file", str(tmp_path / "e")),
            *("--config-dir", str(configured(tmp_path))),
        ]
    )
    line = json.loads(capsys.readouterr().out)
    assert code == 0 and line["tunnels"][0]["up"] is False
    assert "not synced since boot" in line["tunnels"][0]["reason"]
    assert line["table"] == {
        "applied_generation": None,
        "reason": "NAT table not synced since boot",
    }


# -- TunnelEstablished: up at least once since the configuration changed -----------------------


def run_once(tmp_path, swanctl_state, token="c1", now=1000.0):
    return agent.collect(
        ["partner"],
        gateway="i-1",
        deployment="lab",
        state_file=tmp_path / "s.json",
        established_file=tmp_path / "e.json",
        config_dir=configured(tmp_path, token=token),
        now=now,
        run=runner(recorded(swanctl_state), nft_ok()),
    ).tunnels[0]


def test_established_only_once_the_tunnel_has_been_up_and_until_the_configuration_changes(
    tmp_path,
):
    # A new gateway (or a PSK nobody set yet): down, never up since configured.
    first = run_once(tmp_path, "connecting", now=1000)
    assert (first.up, first.established) == (False, False)
    up = run_once(tmp_path, "established", now=1060)
    assert (up.up, up.established) == (True, True)
    # It stays established when the tunnel goes down: that is what the healer heals.
    down = run_once(tmp_path, "charon-dead", now=1120)
    assert (down.up, down.established) == (False, True)
    assert json.loads((tmp_path / "e.json").read_text()) == {
        "partner": {"config": "c1", "since": 1060.0}
    }
    # ConfigureGateway changed the connection or the key: a new token, waiting again.
    reconfigured = run_once(tmp_path, "charon-dead", token="c2", now=1180)
    assert (reconfigured.up, reconfigured.established) == (False, False)
    assert run_once(tmp_path, "established", token="c2", now=1240).established is True


def test_not_established_without_configure_gateways_marker(tmp_path):
    report = agent.collect(
        ["partner"],
        gateway="i-1",
        deployment="lab",
        state_file=tmp_path / "s.json",
        established_file=tmp_path / "e.json",
        config_dir=tmp_path / "absent",
        run=runner(recorded("established"), nft_ok()),
    )
    assert report.tunnels[0].up is True and report.tunnels[0].established is False
    assert not (tmp_path / "e.json").exists()


@pytest.mark.parametrize("token", ["", "a b", "x" * 129, "../etc"])
def test_a_malformed_marker_counts_as_not_configured(tmp_path, token):
    config_dir = tmp_path / "tunnels"
    config_dir.mkdir()
    (config_dir / "partner.config-id").write_text(token)
    assert agent.read_config_id(config_dir, "partner") is None


def test_a_corrupt_established_file_starts_over(tmp_path):
    (tmp_path / "e.json").write_text("{not json")
    status = run_once(tmp_path, "established")
    assert status.established is True
    assert json.loads((tmp_path / "e.json").read_text())["partner"]["config"] == "c1"


def test_established_is_published_on_the_deployment_series(tmp_path):
    report = agent.Report(
        "i-1", "lab", tunnels=[agent.TunnelStatus("partner", False, "no IKE SA", established=True)]
    )
    (datum,) = [
        d for d in agent.metric_data(report, now=0) if d["MetricName"] == "TunnelEstablished"
    ]
    assert datum["Value"] == 1.0
    assert datum["Dimensions"] == [
        {"Name": "Deployment", "Value": "lab"},
        {"Name": "Tunnel", "Value": "partner"},
    ]


# -- issue 21, finding 2: ConfigureTunnel's CharonLog, the log this agent diagnoses from --------
# charon appends to it as root: a path outside one fixed directory would let whoever may send
# ConfigureTunnel (or set its association's parameters) append to any file on the gateway.

CONFIGURE_TUNNEL = Path(__file__).resolve().parents[2] / "ssm_documents" / "ConfigureTunnel.yaml"
ESCAPES = [
    "/var/log/tunnelnat/../../../etc/cron.d/tunnelnat.log",
    "/var/log/tunnelnat/../x.log",
    "/etc/cron.d/evil.log",
    "/root/.ssh/authorized_keys",
    "/var/log/tunnelnat/sub/charon.log",
    "/var/log/tunnelnat/.log",
    "/var/log/tunnelnat/charon.log/",
    "/var/log/tunnelnatX/charon.log",
]


@pytest.mark.parametrize("path", ESCAPES)
def test_charon_log_outside_its_directory_is_refused_by_the_allowed_pattern(path):
    import re as regex

    import yaml

    document = yaml.safe_load(CONFIGURE_TUNNEL.read_text())
    pattern = document["parameters"]["CharonLog"]["allowedPattern"]
    assert regex.search(pattern, "/var/log/tunnelnat/charon.log")
    assert regex.search(pattern, document["parameters"]["CharonLog"]["default"])
    assert not regex.search(pattern, path)


# The verb checks it again (tunnel.py's _charon_log): tests/unit/test_tunnel_verb.py.


# -- issue 22: which gateway software runs the agent, and is it the deployed one ---------------

SHA_A, SHA_B = "a" * 64, "b" * 64
PARAMETER = "/tunnelnat/acme/gateway-software"


class FakeAws(FakeCloudWatch):
    """CloudWatch and SSM in one (run_main hands the same client to every boto3.client)."""

    def __init__(self, deployed: object = None, fail: bool = False):
        super().__init__()
        self.deployed, self.ssm_fail, self.asked = deployed, fail, []

    def get_parameter(self, Name):  # noqa: N803 - boto3's keyword
        self.asked.append(Name)
        if self.ssm_fail:
            raise RuntimeError("AccessDeniedException")
        value = self.deployed if isinstance(self.deployed, str) else json.dumps(self.deployed)
        return {"Parameter": {"Name": Name, "Value": value}}


def _running(monkeypatch, sha256: str | None, version: str = "0.22.0+abc") -> None:
    monkeypatch.setattr(
        agent.software, "identity", lambda: {"version": version, "sha256": sha256, "path": "/x"}
    )


@pytest.mark.parametrize(
    "running, deployed, expected",
    [
        (SHA_A, {"sha256": SHA_A, "version": "0.22.0+abc"}, True),
        (SHA_A, {"sha256": SHA_B, "version": "0.22.0+new"}, False),
        (None, {"sha256": SHA_A}, None),  # run from a source tree: no archive, no hash
    ],
)
def test_the_report_says_which_software_runs_and_whether_it_is_deployed(
    monkeypatch, capsys, tmp_path, running, deployed, expected
):
    _running(monkeypatch, running)
    client = FakeAws(deployed)
    code, line = run_main(monkeypatch, capsys, tmp_path, client, "--software-parameter", PARAMETER)
    assert code == 0 and client.asked == [PARAMETER]
    assert line["software"] == {
        "version": "0.22.0+abc",
        "sha256": running,
        "deployed_sha256": deployed["sha256"],
        "deployed": expected,
    }


@pytest.mark.parametrize(
    "client",
    [
        FakeAws(fail=True),  # no permission, no network
        FakeAws("not json"),
        FakeAws({"sha256": "short"}),
        FakeAws(["a", "list"]),
    ],
    ids=["denied", "not-json", "bad-sha", "not-an-object"],
)
def test_an_unreadable_parameter_is_unknown_never_a_failed_report(
    monkeypatch, capsys, tmp_path, client
):
    _running(monkeypatch, SHA_A)
    code, line = run_main(monkeypatch, capsys, tmp_path, client, "--software-parameter", PARAMETER)
    assert code == 0 and line["published"] is True  # the metrics went out all the same
    assert line["software"]["deployed"] is None and line["software"]["deployed_sha256"] is None
    assert line["software"]["sha256"] == SHA_A


def test_without_the_parameter_nothing_is_asked(monkeypatch, capsys, tmp_path):
    _running(monkeypatch, SHA_A)
    client = FakeAws({"sha256": SHA_A})
    code, line = run_main(monkeypatch, capsys, tmp_path, client)
    assert code == 0 and client.asked == []
    assert line["software"]["deployed"] is None and line["software"]["version"] == "0.22.0+abc"


@pytest.mark.parametrize("name", ["tunnelnat/acme/x", "/a b", "/x;y", "/" + "a" * 1011])
def test_a_bad_software_parameter_is_refused(name):
    with pytest.raises(SystemExit):
        agent.main(
            ["once", "--gateway-id", "i-1", "--region", "us-east-1", "--tunnels", "partner"]
            + ["--software-parameter", name]
        )


def test_the_identity_of_the_archive_it_runs_from(tmp_path):
    """Run from the package (as the timer runs it): the version built in, the archive's hash."""
    import hashlib

    from tools.gateway_package import build

    package = build(tmp_path / "out")
    link = tmp_path / "tunnelnat-gateway.pyz"
    link.symlink_to(package.path)  # what the units run: the stable link
    proc = subprocess.run(
        [sys.executable, "-I", str(link), "version"], capture_output=True, text=True, check=True
    )
    found = json.loads(proc.stdout)
    assert found["version"] == package.version
    assert (
        found["sha256"] == package.sha256 == hashlib.sha256(package.path.read_bytes()).hexdigest()
    )
    assert found["path"] == str(package.path)  # the link resolved: which archive, not which name
