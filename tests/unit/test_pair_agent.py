"""The pair agent's decisions (gateway/tunnelnat_pair.py): the pure state machine, the
configuration and the heartbeat format. No AWS, no sockets, no sleeping: time is a number the
test moves. The takeover against EC2 (moto) is tests/lambdas/test_pair_split_brain.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.imports import third_party_imports

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "gateway"))
import tunnelnat_pair as pair  # noqa: E402

ME, PEER = "i-0000000000000000a", "i-0000000000000000b"
INTERVAL, MISSES, GRACE, CHECK = 0.5, 4, 10.0, 30.0


def machine(role: str = pair.STANDBY, now: float = 1000.0) -> pair.PairMachine:
    return pair.PairMachine(
        ME,
        role,
        now,
        interval=INTERVAL,
        misses=MISSES,
        startup_grace=GRACE,
        check_seconds=CHECK,
    )


def beat(role: str = pair.ACTIVE, instance: str = PEER, seq: int = 1) -> pair.Heartbeat:
    return pair.Heartbeat(instance, role, seq, 7, 1, 1.0)


def kinds(actions) -> list[str]:
    return [type(a).__name__ for a in actions if not isinstance(a, pair.Report)]


def run_ticks(m, start: float, end: float, *, heard=None, link=True):
    """Tick every interval from ``start`` to ``end``; ``heard(t)`` says whether the active's
    heartbeat arrived at t. Returns [(t, action)] without the periodic Report."""
    out = []
    t = start
    while t <= end + 1e-9:
        if heard is not None and heard(t):
            out += [(t, a) for a in m.heard(beat(), t)]
        out += [(t, a) for a in m.tick(t, link_present=link) if not isinstance(a, pair.Report)]
        t = round(t + INTERVAL, 6)
    return out


# -- the standby's count ------------------------------------------------------------------------


def test_a_heard_active_is_never_taken_over():
    m = machine()
    assert run_ticks(m, 1000.0, 1300.0, heard=lambda t: True) == []


def test_the_standby_takes_over_after_exactly_misses_silent_intervals():
    m = machine()
    # Heard until t=1020, then silent: misses x interval = 2.0 s later, not one interval before.
    actions = run_ticks(m, 1000.0, 1030.0, heard=lambda t: t <= 1020.0)
    t, first = actions[0]
    assert isinstance(first, pair.TakeOver)
    assert t == pytest.approx(1022.0)
    assert first.silent_seconds == pytest.approx(2.0)
    assert first.reason == f"active {PEER} silent for 2.0 s (4 misses)"


def test_one_lost_heartbeat_is_not_a_failure():
    m = machine()
    lost = {1010.0, 1010.5, 1011.0}  # three in a row lost, the fourth arrives
    assert run_ticks(m, 1000.0, 1060.0, heard=lambda t: t not in lost) == []


def test_startup_grace_when_the_active_was_never_heard():
    m = machine(now=1000.0)
    actions = run_ticks(m, 1000.0, 1020.0)
    t, first = actions[0]
    assert isinstance(first, pair.TakeOver)
    assert t == pytest.approx(1000.0 + MISSES * INTERVAL + GRACE)
    assert first.reason == "no active heard for 12.0 s (start or step-down)"


def test_the_grace_ends_once_the_active_was_heard():
    m = machine(now=1000.0)
    m.heard(beat(), 1000.5)
    actions = run_ticks(m, 1001.0, 1010.0)
    assert actions[0][0] == pytest.approx(1002.5)  # 2 s after it was heard, no grace


def test_a_standby_heartbeat_does_not_count_as_the_active():
    m = machine()
    m.heard(beat(role=pair.STANDBY), 1005.0)
    assert m.peer_heard_at == 1005.0 and m.active_heard_at is None
    actions = run_ticks(m, 1000.0, 1020.0)
    assert actions[0][0] == pytest.approx(1012.0)


def test_its_own_heartbeat_looped_back_is_ignored():
    m = machine()
    assert m.heard(beat(instance=ME), 1001.0) == []
    assert m.peer_heard_at is None and m.active_heard_at is None


# -- after a takeover attempt ----------------------------------------------------------------


def test_hold_down_refusal_waits_for_what_is_left_of_it():
    m = machine()
    m.heard(beat(), 1000.0)
    (t, takeover), *_ = run_ticks(m, 1000.0, 1010.0)
    m.takeover_failed(t, retry_after=40.0)  # attached 20 s ago, hold-down 60 s
    later = run_ticks(m, t + INTERVAL, t + 60.0)
    assert later[0][0] == pytest.approx(t + 40.0)
    assert all(isinstance(a, pair.TakeOver) for _, a in later)


def test_a_lost_race_stays_standby_and_the_winner_silences_it():
    m = machine()
    m.takeover_failed(1012.0, retry_after=60.0)
    assert m.role == pair.STANDBY
    # The winner's heartbeats arrive: no takeover, ever, while they do.
    assert run_ticks(m, 1012.5, 1200.0, heard=lambda t: True) == []


def test_a_failed_takeover_retries_after_a_count_of_misses():
    m = machine()
    m.heard(beat(), 1000.0)
    (t, _), *_ = run_ticks(m, 1000.0, 1010.0)
    m.takeover_failed(t)
    later = run_ticks(m, t + INTERVAL, t + 10.0)
    assert later[0][0] == pytest.approx(t + MISSES * INTERVAL)


def test_won_makes_it_active_and_it_reports_at_once():
    m = machine()
    m.took_over(1020.0)
    assert m.role == pair.ACTIVE
    actions = m.tick(1020.0, link_present=True)
    assert any(isinstance(a, pair.Report) for a in actions)
    assert kinds(actions) == []


# -- the active ------------------------------------------------------------------------------


def test_the_active_checks_the_eni_every_check_seconds():
    m = machine(pair.ACTIVE)
    actions = run_ticks(m, 1000.0, 1000.0 + 2 * CHECK)
    assert [t for t, _ in actions] == [pytest.approx(1000.0 + CHECK), pytest.approx(1060.0)]
    assert all(isinstance(a, pair.CheckEni) for _, a in actions)


def test_the_active_that_loses_its_link_steps_down():
    m = machine(pair.ACTIVE)
    (action,) = kinds(m.tick(1001.0, link_present=False))
    assert action == "StepDown" and m.role == pair.STANDBY


def test_a_fenced_active_steps_down_when_ec2_names_another_holder():
    m = machine(pair.ACTIVE)
    assert m.eni_seen(1001.0, ME) == []
    (down,) = m.eni_seen(1002.0, PEER)
    assert isinstance(down, pair.StepDown) and PEER in down.reason
    assert m.role == pair.STANDBY
    assert m.eni_seen(1003.0, PEER) == []  # a standby has nothing to step down from


def test_both_active_asks_ec2_at_once_but_not_on_every_heartbeat():
    m = machine(pair.ACTIVE)
    (check,) = m.heard(beat(), 1001.0)
    assert isinstance(check, pair.CheckEni) and PEER in check.reason
    assert m.heard(beat(seq=2), 1001.5) == []  # rate-limited
    assert len(m.heard(beat(seq=3), 1001.0 + MISSES * INTERVAL)) == 1


def test_no_fail_back_a_recovered_old_active_stays_standby():
    """The old active wakes up (frozen, then thawed): its link has moved to the new active. It
    steps down and, hearing the new active, never takes the ENI back."""
    old = machine(pair.ACTIVE)
    (down,) = kinds(old.tick(1100.0, link_present=False))
    assert down == "StepDown"
    assert run_ticks(old, 1100.5, 1500.0, heard=lambda t: True) == []
    assert old.role == pair.STANDBY


def test_a_stepped_down_active_counts_with_the_startup_grace():
    m = machine(pair.ACTIVE)
    m.tick(1100.0, link_present=False)
    actions = run_ticks(m, 1100.5, 1130.0)
    assert actions[0][0] == pytest.approx(1100.0 + MISSES * INTERVAL + GRACE)


def test_both_report_readiness_every_check_seconds():
    for role in (pair.ACTIVE, pair.STANDBY):
        m = machine(role)
        reports = []
        t = 1000.0
        while t <= 1000.0 + 2 * CHECK:
            m.heard(beat(), t)
            reports += [t for a in m.tick(t, link_present=True) if isinstance(a, pair.Report)]
            t += INTERVAL
        assert reports == [1000.0, 1030.0, 1060.0], role


# -- heartbeats ------------------------------------------------------------------------------


def test_a_heartbeat_round_trips():
    sent = pair.Heartbeat(PEER, pair.ACTIVE, 41, 12, 2, 1796000000.123)
    body = json.loads(sent.encode())
    assert body == {
        "v": 1,
        "instance": PEER,
        "role": "active",
        "seq": 41,
        "generation": 12,
        "sas": 2,
        "sent": 1796000000.123,
    }
    assert pair.Heartbeat.parse(sent.encode()) == sent
    unsynced = pair.Heartbeat(PEER, pair.STANDBY, 1, None, 0, 1.0)
    assert pair.Heartbeat.parse(unsynced.encode()) == unsynced


GOOD = {"v": 1, "instance": PEER, "role": "active", "seq": 1, "generation": 3, "sas": 1, "sent": 2}


@pytest.mark.parametrize(
    "junk",
    [
        b"",
        b"hello",
        b"\xff\xfe{}",
        b"[1, 2]",
        b"null",
        json.dumps(GOOD | {"v": 2}).encode(),
        json.dumps({k: v for k, v in GOOD.items() if k != "v"}).encode(),
        json.dumps(GOOD | {"instance": "i-; rm -rf /"}).encode(),
        json.dumps(GOOD | {"instance": 7}).encode(),
        json.dumps(GOOD | {"role": "master"}).encode(),
        json.dumps(GOOD | {"seq": -1}).encode(),
        json.dumps(GOOD | {"seq": True}).encode(),
        json.dumps(GOOD | {"seq": 1.5}).encode(),
        json.dumps(GOOD | {"sas": "1"}).encode(),
        json.dumps(GOOD | {"generation": -3}).encode(),
        json.dumps(GOOD | {"generation": "7"}).encode(),
        json.dumps(GOOD | {"sent": "now"}).encode(),
        json.dumps(GOOD | {"sent": None}).encode(),
        b'{"v": 1, "instance": "i-0000000000000000b", "role": "active", "seq": 1, "sas": 0, '
        b'"generation": null, "sent": NaN}',
        json.dumps(GOOD | {"pad": "x" * 2000}).encode(),
    ],
)
def test_heartbeat_parsing_refuses_junk(junk):
    with pytest.raises(ValueError):
        pair.Heartbeat.parse(junk)


def test_heartbeat_parsing_accepts_the_good_one():
    assert pair.Heartbeat.parse(json.dumps(GOOD).encode()).seq == 1


# -- configuration -------------------------------------------------------------------------------

VALID = {
    "region": "eu-west-1",
    "eni_id": "eni-0123456789abcdef0",
    "gateway": "10.10.1.20/24",
    "deployment": "tunnelnat-lab",
    "table": "tunnelnat-lab",
    "tunnel": "partner",
}


def test_a_minimal_configuration_gets_the_documented_defaults():
    cfg = pair.PairConfig.from_json(VALID)
    assert cfg.children == ("partner",)
    assert (cfg.heartbeat_port, cfg.interval_seconds, cfg.misses) == (7465, 0.5, 4)
    assert (cfg.hold_down_seconds, cfg.namespace, cfg.topic_arn) == (60.0, "tunnelnat", None)
    assert cfg.peer_address is None and cfg.partner_endpoint is None
    assert cfg.role_file == Path("/run/tunnelnat/pair-role")


def test_a_full_configuration():
    cfg = pair.PairConfig.from_json(
        VALID
        | {
            "children": ["partner-1", "partner-2"],
            "heartbeat_port": 7500,
            "interval_seconds": 0.25,
            "misses": 4,
            "hold_down_seconds": 30,
            "startup_grace_seconds": 5,
            "check_seconds": 10,
            "topic_arn": "arn:aws:sns:eu-west-1:123456789012:tunnelnat-alarms",
            "namespace": "tunnelnat",
            "partner_endpoint": "203.0.113.1",
            "subnet_router": "10.10.1.1",
            "peer_address": "10.10.1.11",
            "role_file": "/run/tunnelnat/gw2/pair-role",
        }
    )
    assert cfg.children == ("partner-1", "partner-2") and cfg.interval_seconds == 0.25
    assert str(cfg.peer_address) == "10.10.1.11" and str(cfg.subnet_router) == "10.10.1.1"
    assert cfg.boot_config().gateway == cfg.gateway


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"colour": "blue"}, "unknown configuration keys: colour"),
        ({"eni_id": "eni-; reboot"}, "invalid ENI ID"),
        ({"region": "eu-west-1 x"}, "invalid region"),
        ({"gateway": "10.10.1.300/24"}, "invalid boot configuration"),
        ({"deployment": "a b"}, "invalid deployment"),
        ({"table": "t$(id)"}, "invalid table"),
        ({"tunnel": "-x"}, "invalid tunnel"),
        ({"children": []}, "children"),
        ({"children": "partner"}, "children"),
        ({"children": ["partner", "a;b"]}, "children"),
        ({"heartbeat_port": 0}, "heartbeat_port"),
        ({"heartbeat_port": 70000}, "heartbeat_port"),
        ({"heartbeat_port": 7465.5}, "whole numbers"),
        ({"misses": True}, "misses must be a number"),
        ({"misses": "4"}, "misses must be a number"),
        ({"interval_seconds": 0}, "interval_seconds"),
        ({"interval_seconds": float("nan")}, "interval_seconds"),
        ({"hold_down_seconds": -1}, "hold_down_seconds"),
        ({"topic_arn": "arn:aws:sqs:eu-west-1:123456789012:q"}, "invalid topic_arn"),
        ({"namespace": "tunnel nat"}, "invalid namespace"),
        ({"partner_endpoint": "203.0.113.1"}, "go together"),
        ({"subnet_router": "10.99.0.1", "partner_endpoint": "203.0.113.1"}, "not in G's subnet"),
        ({"peer_address": "10.10.1.x"}, "peer_address"),
        ({"role_file": "relative/path"}, "invalid role_file"),
        ({"role_file": "/run/../etc/passwd"}, "invalid role_file"),
    ],
)
def test_the_configuration_is_validated(change, message):
    with pytest.raises(pair.PairError, match=message):
        pair.PairConfig.from_json(VALID | change)


def test_the_configuration_must_be_an_object():
    with pytest.raises(pair.PairError, match="JSON object"):
        pair.PairConfig.from_json(["region"])


def test_check_config_cli(tmp_path, capsys):
    path = tmp_path / "pair.json"
    path.write_text(json.dumps(VALID | {"misses": 3}))
    assert pair.main(["check-config", "--config", str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["misses"] == "3"
    path.write_text(json.dumps(VALID | {"misses": 0}))
    assert pair.main(["check-config", "--config", str(path)]) == 2
    assert "misses" in capsys.readouterr().err
    assert pair.main(["run", "--config", str(tmp_path / "missing.json")]) == 2


# -- what the agent reads on the gateway -----------------------------------------------------


def test_installed_children_from_swanctl_raw():
    raw = (REPO / "tests" / "unit" / "data" / "swanctl" / "established.raw").read_text()
    assert pair.installed_children(raw, ["partner"]) == 1
    assert pair.installed_children(raw, ["partner", "partner-2"]) == 1
    connecting = (REPO / "tests" / "unit" / "data" / "swanctl" / "connecting.raw").read_text()
    assert pair.installed_children(connecting, ["partner"]) == 0


def completed(stdout: str, code: int = 0):
    return subprocess.CompletedProcess([], code, stdout, "")


def test_read_generation_from_nft():
    answer = {"nftables": [{"set": {"name": "applied_generation", "elem": [41, 42]}}]}
    assert pair.read_generation(lambda *a, **k: completed(json.dumps(answer))) == 42
    empty = {"nftables": [{"set": {"name": "applied_generation"}}]}
    assert pair.read_generation(lambda *a, **k: completed(json.dumps(empty))) is None
    assert pair.read_generation(lambda *a, **k: completed("", 1)) is None
    assert pair.read_generation(lambda *a, **k: completed("not json")) is None


def test_initiate_drops_the_half_open_sa_then_starts_every_child():
    calls = []

    def run(argv, **kwargs):
        calls.append(argv)
        return completed("", 1 if argv[-3:-2] == ["partner-2"] else 0)

    cfg = pair.PairConfig.from_json(VALID | {"children": ["partner-1", "partner-2"]})
    assert pair.initiate(cfg, run) == ["partner-2"]
    assert calls == [
        ["swanctl", "--terminate", "--ike", "partner", "--force"],
        ["swanctl", "--initiate", "--child", "partner-1", "--timeout", "-1"],
        ["swanctl", "--initiate", "--child", "partner-2", "--timeout", "-1"],
    ]


def test_the_agent_uses_only_the_standard_library_boto3_and_the_boot_program():
    found = third_party_imports(REPO / "gateway" / "tunnelnat_pair.py")
    assert found == {"botocore", "boto3", "tunnelnat_boot"}


def test_the_agent_runs_from_its_install_directory_next_to_the_boot_program(tmp_path):
    """On the gateway both sit in /etc/tunnelnat/lib; nothing else of the repository is there."""
    lib = tmp_path / "lib"
    lib.mkdir()
    for name in ("tunnelnat_pair.py", "tunnelnat_boot.py"):
        (lib / name).write_text((REPO / "gateway" / name).read_text())
    config = tmp_path / "pair.json"
    config.write_text(json.dumps(VALID))
    proc = subprocess.run(
        [sys.executable, "-I", str(lib / "tunnelnat_pair.py"), "check-config", "--config", config],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


def test_heartbeats_over_real_udp_on_loopback():
    """The agent's socket: a heartbeat from the peer's address is heard within the interval;
    the same datagram from another address, and junk, are not."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cfg = pair.PairConfig.from_json(VALID | {"heartbeat_port": port, "peer_address": "127.0.0.2"})
    agent = pair.Agent(cfg, ME, ec2=None, records=None)
    agent.machine = machine()
    agent.peers = [pair.IPv4Address("127.0.0.2")]
    sock = agent.open_socket()
    try:
        with (
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer,
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger,
        ):
            peer.bind(("127.0.0.2", 0))
            stranger.bind(("127.0.0.3", 0))
            stranger.sendto(beat().encode(), ("127.0.0.1", port))
            peer.sendto(b"junk", ("127.0.0.1", port))
            agent.receive(0.2)
            assert agent.machine.peer_heard_at is None
            peer.sendto(beat().encode(), ("127.0.0.1", port))
            agent.receive(0.2)
            assert agent.machine.active_heard_at is not None
            agent.send_heartbeat()  # to 127.0.0.2:port, which the agent's own socket receives
            agent.receive(0.1)  # from 127.0.0.1: not the peer, ignored
            assert agent.seq == 1
    finally:
        sock.close()


def test_tunnel_loaded_read_from_list_conns() -> None:
    listing = (
        "partner: IKEv2, no reauthentication, rekeying every 28800s, dpd delay 10s\n"
        "  local:  %any\n  remote: 198.51.100.40\n"
        "  partner-1: TUNNEL, rekeying every 3600s, dpd action is restart\n"
    )

    def run(argv, **_kw):
        return subprocess.CompletedProcess(argv, 0, stdout=listing, stderr="")

    def down(argv, **_kw):
        return subprocess.CompletedProcess(argv, 1, stdout="", stderr="connecting failed")

    assert pair.read_tunnel_loaded("partner", run) is True
    assert pair.read_tunnel_loaded("partner-1", run) is False  # a child, not a connection
    assert pair.read_tunnel_loaded("other", run) is False
    assert pair.read_tunnel_loaded("partner", down) is None
