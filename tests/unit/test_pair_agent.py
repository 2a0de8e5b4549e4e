"""The pair agent (gateway/tunnelnat_pair.py): the pure state machine, the configuration and
the heartbeat format (time is a number the test moves), then the Agent with fakes for EC2,
Auto Scaling, CloudFormation and ``ip``, and the heart over real UDP sockets on 127.0.0.x where
a thread's independence is the point. The takeover against moto: tests/unit/test_pair_strict.py
and tests/lambdas/test_pair_split_brain.py."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.unit.imports import third_party_imports

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "gateway"))
from tunnelnat_gateway import pair as pair  # noqa: E402

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


def test_a_fenced_active_steps_down_when_two_ec2_readings_apart_name_another_holder():
    m = machine(pair.ACTIVE)
    assert m.eni_seen(1001.0, ME) == []
    assert m.eni_seen(1002.0, PEER) == []  # one reading: maybe stale
    assert m.next_check == pytest.approx(1002.0 + pair.CONFIRM_SECONDS)  # asked again soon
    assert m.eni_seen(1003.0, PEER) == []  # too close to the first
    (down,) = m.eni_seen(1002.0 + pair.CONFIRM_SECONDS, PEER)
    assert isinstance(down, pair.StepDown) and PEER in down.reason
    assert m.role == pair.STANDBY and m.fenced
    assert m.eni_seen(1010.0, PEER) == []  # a standby has nothing to step down from


def test_a_reading_naming_itself_in_between_starts_the_count_again():
    m = machine(pair.ACTIVE)
    assert m.eni_seen(1002.0, PEER) == []
    assert m.eni_seen(1003.0, ME) == []
    assert m.eni_seen(1004.5, PEER) == []
    assert m.role == pair.ACTIVE


def test_a_stale_read_right_after_its_own_attach_never_steps_down():
    """Issue 20, defect 6: DescribeNetworkInterfaces right after the attach still names the
    old holder. b08b1c8's machine stepped down on that one reading."""
    m = machine()
    m.took_over(1020.0)
    for t in (1020.1, 1021.0, 1022.5, 1024.9):  # within SETTLE_SECONDS: ignored, even twice
        assert m.eni_seen(t, PEER) == [], t
    assert m.role == pair.ACTIVE
    assert m.next_check == pytest.approx(1020.0 + pair.SETTLE_SECONDS)  # read again then
    assert m.eni_seen(1025.0, ME) == []  # EC2 caught up
    assert m.role == pair.ACTIVE


def test_the_link_gone_steps_down_at_once_even_right_after_the_attach():
    m = machine()
    m.took_over(1020.0)
    (down,) = kinds(m.tick(1020.5, link_present=False))
    assert down == "StepDown" and m.fenced


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


KEY = b"k" * 32


def test_a_heartbeat_round_trips():
    sent = pair.Heartbeat(PEER, pair.ACTIVE, 41, 12, 2, 1796000000.123, 7, True)
    data = sent.encode(KEY)
    body = json.loads(data[pair.MAC_HEX :])
    assert body == {
        "v": 2,
        "kind": "beat",
        "instance": PEER,
        "role": "active",
        "seq": 41,
        "epoch": 7,
        "generation": 12,
        "sas": 2,
        "sent": 1796000000.123,
        "tunnel_loaded": True,
        "fenced": False,
        "retiring": False,
        "to": None,
    }
    assert pair.Heartbeat.parse(data, KEY) == sent
    unsynced = pair.Heartbeat(PEER, pair.STANDBY, 1, None, 0, 1.0, kind="handover", to=ME)
    assert pair.Heartbeat.parse(unsynced.encode(KEY), KEY) == unsynced


def test_a_heartbeat_under_another_key_is_a_forgery():
    data = beat().encode(b"x" * 32)
    with pytest.raises(pair.AuthError):
        pair.Heartbeat.parse(data, KEY)
    tampered = bytearray(beat().encode(KEY))
    tampered[-5] ^= 1
    with pytest.raises(pair.AuthError):
        pair.Heartbeat.parse(bytes(tampered), KEY)


GOOD = {
    "v": 2,
    "kind": "beat",
    "instance": PEER,
    "role": "active",
    "seq": 1,
    "epoch": 5,
    "generation": 3,
    "sas": 1,
    "sent": 2,
    "tunnel_loaded": None,
    "fenced": False,
    "retiring": False,
    "to": None,
}


def signed(payload: bytes) -> bytes:
    import hashlib
    import hmac

    return hmac.new(KEY, payload, hashlib.sha256).hexdigest().encode() + payload


@pytest.mark.parametrize(
    "junk",
    [
        b"",
        b"hello",
        b"\xff\xfe{}",
        b"[1, 2]",
        b"null",
        json.dumps(GOOD | {"v": 1}).encode(),
        json.dumps({k: v for k, v in GOOD.items() if k != "v"}).encode(),
        json.dumps(GOOD | {"instance": "i-; rm -rf /"}).encode(),
        json.dumps(GOOD | {"instance": 7}).encode(),
        json.dumps(GOOD | {"role": "master"}).encode(),
        json.dumps(GOOD | {"kind": "takeover"}).encode(),
        json.dumps(GOOD | {"to": "i-x"}).encode(),
        json.dumps(GOOD | {"seq": -1}).encode(),
        json.dumps(GOOD | {"seq": True}).encode(),
        json.dumps(GOOD | {"seq": 1.5}).encode(),
        json.dumps(GOOD | {"epoch": None}).encode(),
        json.dumps(GOOD | {"sas": "1"}).encode(),
        json.dumps(GOOD | {"generation": -3}).encode(),
        json.dumps(GOOD | {"generation": "7"}).encode(),
        json.dumps(GOOD | {"sent": "now"}).encode(),
        json.dumps(GOOD | {"sent": None}).encode(),
        json.dumps(GOOD | {"tunnel_loaded": "yes"}).encode(),
        json.dumps(GOOD | {"fenced": None}).encode(),
        json.dumps(GOOD).encode().replace(b'"sent": 2', b'"sent": NaN'),
        json.dumps(GOOD | {"pad": "x" * 2000}).encode(),
    ],
)
def test_heartbeat_parsing_refuses_junk_even_when_signed(junk):
    with pytest.raises(ValueError):
        pair.Heartbeat.parse(signed(junk), KEY)
    with pytest.raises(ValueError):
        pair.Heartbeat.parse(junk, KEY)


def test_heartbeat_parsing_accepts_the_good_one():
    assert pair.Heartbeat.parse(signed(json.dumps(GOOD).encode()), KEY).seq == 1


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
        # --ike: a child's name is unique only within its connection (issue 23; several
        # tunnels: test_connection_children.py).
        ["swanctl", "--initiate", "--ike", "partner", "--child", "partner-1", "--timeout", "-1"],
        ["swanctl", "--initiate", "--ike", "partner", "--child", "partner-2", "--timeout", "-1"],
    ]


def test_the_agent_uses_only_the_standard_library_boto3_and_the_gateway_package():
    found = third_party_imports(REPO / "gateway" / "tunnelnat_gateway" / "pair.py")
    assert found == {"botocore", "boto3", "tunnelnat_gateway"}


def test_the_agent_runs_from_the_gateway_package(tmp_path):
    """On the gateway the agent is the package's ``pair`` verb, run from the archive the stack
    ships (tools/gateway_package.py): nothing else of the repository is there."""
    from tools.gateway_package import build

    archive = build(tmp_path / "out").path
    config = tmp_path / "pair.json"
    config.write_text(json.dumps(VALID))
    proc = subprocess.run(
        [sys.executable, "-I", str(archive), "pair", "check-config", "--config", str(config)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    # The deployed software's parameter: the stack's name for this deployment, by default.
    parameter = json.loads(proc.stdout)["software_parameter"]
    assert parameter == "/tunnelnat/tunnelnat-lab/gateway-software"


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


# -- more of the machine: planned handover -----------------------------------------------------


def ready(instance: str = PEER, **change) -> pair.Heartbeat:
    fields = {"generation": 7, "tunnel_loaded": True} | change
    return pair.Heartbeat(
        instance, fields.pop("role", pair.STANDBY), fields.pop("seq", 1), fields["generation"],
        0, time.time(), tunnel_loaded=fields["tunnel_loaded"], fenced=fields.get("fenced", False),
        retiring=fields.get("retiring", False),
    )  # fmt: skip


def test_the_active_hands_over_to_a_ready_standby_only():
    m = machine(pair.ACTIVE)
    assert isinstance(m.handover_wanted(1000.0, "test", 7), pair.NoHandover)  # nobody heard
    m.heard(ready(), 1000.0)
    action = m.handover_wanted(1000.5, "test", 7)
    assert action == pair.HandOver(PEER, "test")
    for change in (
        {"generation": 6},
        {"generation": None},
        {"tunnel_loaded": None},
        {"fenced": True},
        {"retiring": True},
    ):
        m = machine(pair.ACTIVE)
        m.heard(ready(**change), 1000.0)
        refused = m.handover_wanted(1000.5, "test", 7)
        assert isinstance(refused, pair.NoHandover), change
        assert PEER in refused.reason
    m = machine(pair.ACTIVE)
    m.heard(ready(), 1000.0)
    assert isinstance(m.handover_wanted(1000.0 + 2.5, "test", 7), pair.NoHandover)  # not fresh
    assert isinstance(machine().handover_wanted(1000.0, "t", 7), pair.NoHandover)  # a standby


def handover_from(sender: str = PEER, to: str = ME) -> pair.Heartbeat:
    return pair.Heartbeat(sender, pair.ACTIVE, 9, 7, 1, 1.0, kind="handover", to=to)


def test_the_standby_takes_a_handover_from_the_active_it_hears_once():
    m = machine()
    assert m.heard(handover_from(), 1000.0) == []  # no active heard yet: not ours to take
    m.heard(beat(), 1000.1)
    assert m.heard(handover_from(to="i-0000000000000000c"), 1000.2) == []
    assert m.heard(handover_from(sender="i-0000000000000000c"), 1000.2) == []
    assert m.heard(handover_from(), 1000.3) == [pair.AcceptHandover(PEER)]
    assert m.heard(handover_from(), 1000.4) == []  # the copies of the same handover
    m.retiring = True
    assert m.heard(handover_from(), 1010.0) == []


def test_a_handed_over_active_is_a_healthy_standby_that_waits_for_the_new_active():
    m = machine(pair.ACTIVE)
    m.handed_over(1000.0)
    assert m.role == pair.STANDBY and not m.fenced
    assert run_ticks(m, 1000.5, 1100.0, heard=lambda t: t >= 1001.0) == []
    # The new active is silent for a while (its detach, attach, hot-plug): no takeover back
    # before the standby's own handover deadline.
    m = machine(pair.ACTIVE)
    m.handed_over(1000.0)
    (first, _), *_ = run_ticks(m, 1000.5, 1100.0)
    assert first == pytest.approx(1000.0 + pair.HANDOVER_ENI_SECONDS + MISSES * INTERVAL)


def test_a_retiring_standby_never_takes_over():
    m = machine()
    m.retiring = True
    assert run_ticks(m, 1000.0, 1100.0) == []


# -- the heart ---------------------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def heart(instance: str, bind: str, port: int, key: bytes = KEY, **kw) -> pair.Heart:
    h = pair.Heart(instance, key, port, kw.pop("interval", 0.05), bind=bind, **kw)
    h.open()
    return h


def test_the_heart_drops_forgeries_stale_replays_and_strangers():
    h = pair.Heart(ME, KEY, 7465, 0.5, wall=lambda: 5000.0)
    good = pair.Heartbeat(PEER, pair.ACTIVE, 1, 7, 1, 5000.0, epoch=3)
    assert h.receive(good.encode(b"y" * 32), "10.0.0.2", 1.0) is None  # another key
    assert h.receive(b"junk", "10.0.0.2", 1.0) is None
    stale = pair.Heartbeat(PEER, pair.ACTIVE, 1, 7, 1, 5000.0 - 31, epoch=3)
    assert h.receive(stale.encode(KEY), "10.0.0.2", 1.0) is None
    assert h.receive(good.encode(KEY), "10.0.0.2", 1.0) == good  # discovery never ran: heard
    assert h.receive(good.encode(KEY), "10.0.0.9", 1.1) is None  # replayed
    older_epoch = pair.Heartbeat(PEER, pair.ACTIVE, 99, 7, 1, 5000.0, epoch=2)
    assert h.receive(older_epoch.encode(KEY), "10.0.0.2", 1.2) is None  # replayed
    restarted = pair.Heartbeat(PEER, pair.ACTIVE, 1, 7, 1, 5000.0, epoch=4)
    assert h.receive(restarted.encode(KEY), "10.0.0.2", 1.3) == restarted
    # Membership known: a non-member (with the key: a tagged lookalike) is a stranger.
    h.set_peers([pair.IPv4Address("10.0.0.2")], {PEER: pair.IPv4Address("10.0.0.2"), ME: None})
    other = "i-0000000000000000c"
    lookalike = pair.Heartbeat(other, pair.ACTIVE, 1, 7, 1, 5000.0, epoch=9)
    assert h.receive(lookalike.encode(KEY), "10.0.0.3", 1.4) is None
    member = pair.Heartbeat(PEER, pair.ACTIVE, 2, 7, 1, 5000.0, epoch=4)
    assert h.receive(member.encode(KEY), "10.0.0.2", 1.6) == member
    stats = h.stats()
    assert (stats["auth_failures"], stats["junk"], stats["stale"]) == (1, 1, 1)
    assert (stats["replayed"], stats["strangers"], stats["heard"]) == (2, 1, 3)
    assert [b for b, _ in h.drain()] == [good, restarted, member]
    assert h.drain() == []


def test_a_forged_heartbeat_keeps_no_standby_from_taking_over():
    """Issue 20, defect 6: b08b1c8's agent believed any datagram from the active's address;
    now a forgery (no key) or a lookalike non-member is not heard: the dead active is taken."""
    agent = fake_agent(role_holder="i-0000000000000000c")
    agent.members = {ME: None, "i-0000000000000000c": pair.IPv4Address("10.10.1.12")}
    agent.heart.set_peers([pair.IPv4Address("10.10.1.12")], agent.members)
    now = agent.clock()
    forged = pair.Heartbeat("i-0000000000000000c", pair.ACTIVE, 5, 7, 1, agent.wall(), 1)
    agent.handle_datagram(forged.encode(b"guessed" * 5), "10.10.1.12")
    lookalike = pair.Heartbeat("i-0000000000000000d", pair.ACTIVE, 5, 7, 1, agent.wall(), 1)
    agent.handle_datagram(lookalike.encode(KEY), "10.10.1.99")
    assert agent.machine.active_heard_at is None
    assert agent.heart.stats()["auth_failures"] == 1 and agent.heart.stats()["strangers"] == 1
    assert any(
        isinstance(a, pair.TakeOver) for a in agent.machine.tick(now + 13, link_present=True)
    )


def test_an_authenticated_stranger_makes_the_agent_discover_at_once():
    """A heartbeat with the key from an instance that is not a known member is most likely a
    gateway launched since the last discovery (a rolling replacement's new standby): the group
    is looked up at the next round, not at the next check 30 s later, and at most every
    STRANGER_DISCOVERY_SECONDS however many such beats arrive."""
    agent = fake_agent(role_holder="i-0000000000000000c")
    agent.members = {ME: None, "i-0000000000000000c": pair.IPv4Address("10.10.1.12")}
    agent.heart.set_peers([pair.IPv4Address("10.10.1.12")], agent.members)
    now = agent.clock()
    agent.next_peers = now + 30
    newcomer = pair.Heartbeat("i-0000000000000000e", pair.STANDBY, 1, 7, 0, agent.wall(), 1)
    agent.handle_datagram(newcomer.encode(KEY), "10.10.1.13")
    agent.look_again_for_strangers(now)
    assert agent.next_peers == now  # discovered at this round
    agent.next_peers = now + 30
    again = pair.Heartbeat("i-0000000000000000e", pair.STANDBY, 2, 7, 0, agent.wall(), 1)
    agent.handle_datagram(again.encode(KEY), "10.10.1.13")
    agent.look_again_for_strangers(now + 1)
    assert agent.next_peers == now + 30  # rate-limited
    agent.look_again_for_strangers(now + pair.STRANGER_DISCOVERY_SECONDS + 1)
    assert agent.next_peers == now + pair.STRANGER_DISCOVERY_SECONDS + 1


def test_two_hearts_hear_each_other_and_measure_the_gaps():
    port = free_port()
    a = heart(ME, "127.0.0.2", port)
    b = heart(PEER, "127.0.0.3", port)
    a.set_peers([pair.IPv4Address("127.0.0.3")], None)
    b.set_peers([pair.IPv4Address("127.0.0.2")], None)
    a.update(role=pair.ACTIVE, generation=7)
    import time

    try:
        a.start()
        b.start()
        time.sleep(1.0)
    finally:
        a.stop()
        b.stop()
    heard = b.drain()
    assert len(heard) >= 10 and all(x.instance == ME and x.role == "active" for x, _ in heard)
    assert a.drain() and b.stats()["gaps"] >= 9
    stats = b.stats()
    assert 0.02 < stats["gap_p99"] <= stats["gap_max"] < 0.5, stats


class FakeRecords:
    def __init__(self):
        self.readiness_calls: list[dict] = []
        self.switchovers: list[tuple] = []
        self.failovers: list[tuple] = []
        self.desired = 0

    def readiness(self, *args, **kw):
        self.readiness_calls.append({"args": args, **kw})

    def failover(self, *args):
        self.failovers.append(args)

    def claim(self, *args):
        pass

    def switchover(self, *args):
        self.switchovers.append(args)

    def desired_generation(self):
        return self.desired


class FakeEc2:
    """The ENI's holder, and what the agent asked; ``block`` seconds in every call."""

    def __init__(self, holder: str | None, *, block: float = 0.0, fail=None):
        self.holder, self.block, self.fail = holder, block, fail
        self.calls: list[str] = []
        self.state = "running"
        self.attached_at = 0.0

    def _call(self, name: str) -> None:
        import time

        self.calls.append(name)
        if self.block:
            time.sleep(self.block)
        if self.fail and name in self.fail:
            raise self.fail[name]

    stale: list[str | None]  # the holders the next reads show (EC2 behind its own change)

    def describe_network_interfaces(self, **kw):
        self._call("describe_network_interfaces")
        from datetime import UTC, datetime

        holder = self.stale.pop(0) if getattr(self, "stale", None) else self.holder
        attachment = (
            {
                "Status": "attached",
                "InstanceId": holder,
                "AttachmentId": "eni-attach-1",
                "AttachTime": datetime.fromtimestamp(self.attached_at, UTC),
            }
            if holder
            else {}
        )
        return {
            "NetworkInterfaces": [
                {
                    "Status": "in-use" if holder else "available",
                    "MacAddress": "02:00:00:00:00:99",
                    "Attachment": attachment,
                }
            ]
        }

    def describe_instances(self, **kw):
        self._call("describe_instances")
        members = {ME: "10.10.1.10", PEER: "10.10.1.11"}
        wanted = kw.get("InstanceIds") or list(members)
        instances = [
            {"InstanceId": i, "PrivateIpAddress": a} for i, a in members.items() if i in wanted
        ]
        return {"Reservations": [{"Instances": instances}]}

    def describe_instance_status(self, **kw):
        self._call("describe_instance_status")
        return {"InstanceStatuses": [{"InstanceState": {"Name": self.state}}]}

    def detach_network_interface(self, **kw):
        self._call(f"detach Force={kw.get('Force', False)}")
        self.holder = None

    def attach_network_interface(self, **kw):
        self._call(f"attach {kw['DeviceIndex']}")
        self.holder = kw["InstanceId"]


class Links:
    """``ip`` whose link list holds the ENI's link while ``here()``; ``fail``: every call
    raises the boot program's BootError, as a failing ``ip`` does."""

    def __init__(self, here=lambda: False, fail: bool = False):
        self.here, self.fail = here, fail
        self.calls: list[list[str]] = []

    def __call__(self, argv):
        argv = list(argv)
        self.calls.append(argv)
        if self.fail:
            raise pair.boot.BootError("ip -j link show: Cannot open netlink socket")
        if argv[:3] == ["-j", "link", "show"]:
            links = [{"ifname": "ens5", "address": "02:00:00:00:00:01"}]
            if self.here():
                links.append({"ifname": "ens6", "address": "02:00:00:00:00:99"})
            return json.dumps(links)
        return ""


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(seconds, 0.0)


def fake_agent(tmp_path=None, *, role_holder=PEER, ec2=None, links=None, **kw) -> pair.Agent:
    import tempfile

    tmp = Path(tmp_path or tempfile.mkdtemp())
    cfg = pair.PairConfig.from_json(
        VALID | {"role_file": str(tmp / "pair-role"), "key_file": str(tmp / "pair.key")}
        | kw.pop("config", {})
    )  # fmt: skip
    ec2 = ec2 or FakeEc2(role_holder)
    clock = kw.pop("clock", None) or Clock()
    heart_ = kw.pop("heart", None) or pair.Heart(ME, KEY, 7465, 0.5, clock=clock)
    agent = pair.Agent(
        cfg, ME, ec2, FakeRecords(),
        links=pair.boot.Links(links or Links(lambda: ec2.holder == ME)),
        run_cmd=lambda argv, **k: completed("", 1), clock=clock, sleep=clock.sleep,
        heart=heart_, pinger=kw.pop("pinger", lambda address: False), **kw,
    )  # fmt: skip
    agent.start(confirm=False)
    agent.guard("confirm", agent.confirm)  # as the loop does
    return agent


def test_an_aws_call_blocking_3s_on_the_active_does_not_silence_its_heartbeats(tmp_path):
    """Issue 20, defect 2: b08b1c8's agent sent its heartbeat from the loop that made the AWS
    calls; a 3 s DescribeNetworkInterfaces silenced it and the standby took over. Now the
    active's heart beats on while its main loop waits 3 s, and the standby's machine, fed by
    its own heart, never decides to take over."""
    import threading
    import time

    port = free_port()
    active_heart = heart(ME, "127.0.0.2", port, interval=0.1)
    standby_heart = heart(PEER, "127.0.0.3", port, interval=0.1)
    ec2 = FakeEc2(ME)
    fast = {"interval_seconds": 0.1, "role_file": str(tmp_path / "r")}
    active = pair.Agent(
        pair.PairConfig.from_json(VALID | fast),
        ME, ec2, FakeRecords(), links=pair.boot.Links(Links(lambda: True)),
        run_cmd=lambda argv, **k: completed("", 1), heart=active_heart,
    )  # fmt: skip
    active.start()
    assert active.machine.role == pair.ACTIVE
    active.heart.set_peers([pair.IPv4Address("127.0.0.3")], None)
    standby_heart.set_peers([pair.IPv4Address("127.0.0.2")], None)
    standby_heart.start()
    standby = pair.PairMachine(PEER, pair.STANDBY, time.monotonic(), interval=0.1, misses=4)
    ec2.block = 3.0  # from now on, every EC2 call takes 3 s
    active.machine.next_check = 0.0  # its periodic CheckEni is due: 3 s in EC2
    loop = threading.Thread(target=active.step)
    decisions = []
    try:
        loop.start()
        end = time.monotonic() + 3.5
        while time.monotonic() < end:
            for b, at in standby_heart.drain():
                standby.heard(b, at)
            decisions += standby.tick(time.monotonic(), link_present=False)
            time.sleep(0.05)
        loop.join(timeout=10)
    finally:
        active.heart.stop()
        standby_heart.stop()
    assert "describe_network_interfaces" in ec2.calls  # the loop really sat in EC2
    assert not [d for d in decisions if isinstance(d, pair.TakeOver)]
    assert standby.active_heard_at is not None
    assert standby_heart.stats()["gap_max"] < 0.4  # 4 intervals of 0.1 s: never silent


def test_an_agent_restarted_on_the_active_beats_before_any_aws_call(tmp_path):
    """Issue 20, defect 2: b08b1c8's agent asked EC2 (with 10 s timeouts and retries) before
    its first heartbeat. Now the role comes from this machine (the ENI's MAC cached by the
    previous run, on a local link) and the first heartbeat says active before EC2 is asked."""
    import time

    role_file = tmp_path / "pair-role"
    (tmp_path / "pair-role.state").write_text(
        json.dumps({"mac": "02:00:00:00:00:99", "peers": ["127.0.0.3"]})
    )
    port = free_port()
    listener = heart(PEER, "127.0.0.3", port)
    listener.start()
    ec2 = FakeEc2(ME, fail={"describe_network_interfaces": RuntimeError("EC2 is slow")})
    agent = pair.Agent(
        pair.PairConfig.from_json(VALID | {"role_file": str(role_file), "heartbeat_port": port}),
        ME, ec2, FakeRecords(), links=pair.boot.Links(Links(lambda: True)),
        run_cmd=lambda argv, **k: completed("", 1), heart=heart(ME, "127.0.0.2", port),
    )  # fmt: skip
    try:
        agent.start(confirm=False)
        deadline = time.monotonic() + 2
        heard = []
        while not heard and time.monotonic() < deadline:
            heard = listener.drain()
            time.sleep(0.01)
        assert heard and heard[0][0].role == pair.ACTIVE
        assert ec2.calls == []  # not one AWS call before it
        assert role_file.read_text() == "active\n"
        agent.step()  # EC2 fails: the loop goes on, still active, confirmation retried
        assert agent.machine.role == pair.ACTIVE and not agent.confirmed
    finally:
        agent.heart.stop()
        listener.stop()


def test_the_standby_hears_authenticated_heartbeats_while_discovery_fails(tmp_path):
    """Issue 20, defect 2: b08b1c8's standby dropped every heartbeat when DescribeInstances
    failed (no peer address) and took the ENI after 12 s. Now it hears the key's holders."""
    import time

    port = free_port()
    active_heart = heart(PEER, "127.0.0.2", port, interval=0.1)
    active_heart.update(role=pair.ACTIVE)
    active_heart.set_peers([pair.IPv4Address("127.0.0.3")], None)
    ec2 = FakeEc2(PEER, fail={"describe_instances": RuntimeError("RequestLimitExceeded")})
    clock = time.monotonic
    fast = {"interval_seconds": 0.1, "startup_grace_seconds": 0, "role_file": str(tmp_path / "r")}
    agent = pair.Agent(
        pair.PairConfig.from_json(VALID | fast),
        ME, ec2, FakeRecords(), links=pair.boot.Links(Links()), clock=clock,
        run_cmd=lambda argv, **k: completed("", 1),
        heart=heart(ME, "127.0.0.3", port, interval=0.1),
    )  # fmt: skip
    taken = []
    agent.take_over = taken.append
    try:
        active_heart.start()
        agent.start()
        assert agent.machine.role == pair.STANDBY and agent.members is None
        end = time.monotonic() + 1.5
        while time.monotonic() < end:
            agent.step()
            time.sleep(0.1)
    finally:
        active_heart.stop()
        agent.heart.stop()
    assert "describe_instances" in ec2.calls
    assert agent.machine.active_instance == PEER and taken == []


def test_a_failing_ip_never_raises_out_of_the_loop(capsys):
    """Issue 20, defect 6: b08b1c8's run_forever died on a failing ``ip`` (BootError)."""
    ec2 = FakeEc2(ME)
    agent = fake_agent(ec2=ec2, links=Links(fail=True), config={"interval_seconds": 0.5})
    assert agent.machine.role == pair.ACTIVE  # EC2 says so; bring_up failed: logged
    agent.mac = "02:00:00:00:00:99"
    agent.run_forever(rounds=400)  # 200 s of rounds, ``ip`` failing in each
    assert agent.machine.role == pair.ACTIVE  # an unknown link is not a lost one
    err = capsys.readouterr().err
    assert err.count("ip link failed: BootError") == 4  # at most one a minute
    assert "more since the last report" in err


def test_a_fenced_active_marks_itself_unhealthy():
    """Issue 20, defect 4: b08b1c8's fenced active stayed as the next standby."""

    class Autoscaling:
        calls: list[dict] = []

        def set_instance_health(self, **kw):
            self.calls.append(kw)

    ec2 = FakeEc2(ME)
    scaling = Autoscaling()
    agent = fake_agent(ec2=ec2, autoscaling=scaling)
    assert agent.machine.role == pair.ACTIVE
    ec2.holder = PEER  # taken by a forced detach: the link goes with it
    agent.step()
    assert agent.machine.role == pair.STANDBY and agent.machine.fenced
    assert scaling.calls == [
        {"InstanceId": ME, "HealthStatus": "Unhealthy", "ShouldRespectGracePeriod": False}
    ]
    assert agent.records.readiness_calls[-1]["fenced"] is True
    assert agent.heart.status["fenced"] is True  # its heartbeats say it is never ready


def test_the_second_opinion_spares_a_holder_that_answers_pings():
    """Issue 20, defect 2: b08b1c8's standby forced the ENI off a silent holder without asking
    whether it was impaired. Now a running holder that answers ICMP keeps it."""
    pings = []
    ec2 = FakeEc2(PEER)
    agent = fake_agent(ec2=ec2, pinger=lambda address: pings.append(address) or True)
    agent.members = {PEER: pair.IPv4Address("10.10.1.11")}
    now = agent.clock()
    agent.take_over(pair.TakeOver("test: silent", 2.0))
    assert pings == [pair.IPv4Address("10.10.1.11")]
    assert ec2.holder == PEER and not [c for c in ec2.calls if c.startswith("detach")]
    assert agent.machine.role == pair.STANDBY
    assert agent.machine.not_before == pytest.approx(now + MISSES * INTERVAL)  # asked again


@pytest.mark.parametrize(
    ("state", "fails", "answers", "pinged", "forced"),
    [
        ("running", False, False, True, True),
        ("stopped", False, True, False, True),  # not running: no ping needed
        ("running", True, True, True, False),  # DescribeInstanceStatus failed: the ping decides
        ("running", True, False, True, True),
    ],
)
def test_the_second_opinion(state, fails, answers, pinged, forced):
    fail = {"describe_instance_status": RuntimeError("throttled")} if fails else None
    ec2 = FakeEc2(PEER, fail=fail)
    ec2.state = state
    pings = []
    agent = fake_agent(ec2=ec2, pinger=lambda address: pings.append(address) or answers)
    agent.members = {PEER: pair.IPv4Address("10.10.1.11")}
    agent.take_over(pair.TakeOver("test: silent", 2.0))
    assert bool(pings) == pinged
    assert ("detach Force=True" in ec2.calls) == forced
    assert agent.machine.role == (pair.ACTIVE if forced else pair.STANDBY)


def test_the_takeover_tries_the_next_device_index_when_ec2_says_it_is_in_use():
    from botocore.exceptions import ClientError

    class Refusing(FakeEc2):
        def attach_network_interface(self, **kw):
            if kw["DeviceIndex"] == 1:
                self.calls.append("attach 1")
                message = f"Instance '{ME}' already has an interface attached at device index '1'."
                raise ClientError(
                    {"Error": {"Code": "InvalidParameterValue", "Message": message}},
                    "AttachNetworkInterface",
                )
            super().attach_network_interface(**kw)

    ec2 = Refusing(None)
    agent = fake_agent(ec2=ec2)
    agent.take_over(pair.TakeOver("test", 2.0))
    assert [c for c in ec2.calls if c.startswith("attach")] == ["attach 1", "attach 2"]
    assert agent.machine.role == pair.ACTIVE


# -- switchover, lifecycle, ready signal (fakes) -----------------------------------------------


def test_a_switchover_request_without_a_ready_standby_fails_clearly(tmp_path):
    agent = fake_agent(tmp_path, ec2=FakeEc2(ME))
    request = tmp_path / "switchover"
    request.write_text("operator\n")
    agent.step()
    result = json.loads((tmp_path / "switchover.result").read_text())
    assert result["outcome"] == "failed" and "no ready standby" in result["detail"]
    assert not request.exists() and agent.machine.role == pair.ACTIVE


def test_a_switchover_request_on_the_standby_says_so(tmp_path):
    agent = fake_agent(tmp_path, ec2=FakeEc2(PEER))
    (tmp_path / "switchover").write_text("")
    agent.step()
    result = json.loads((tmp_path / "switchover.result").read_text())
    assert result["outcome"] == "not_active"


class Lifecycle:
    def __init__(self):
        self.completed: list[dict] = []

    def complete_lifecycle_action(self, **kw):
        self.completed.append(kw)

    def set_instance_health(self, **kw):
        pass


def test_terminating_the_active_hands_over_then_completes_the_lifecycle_action(tmp_path):
    scaling = Lifecycle()
    agent = fake_agent(
        tmp_path, ec2=FakeEc2(ME), autoscaling=scaling, imds=lambda path: "Terminated",
        config={"lifecycle_hook": "tunnelnat-x-gateway-terminating", "group_name": "gw-group"},
    )  # fmt: skip
    handed = []

    def hand_over(action):
        handed.append(action)
        agent.machine.handed_over(agent.clock())
        return True, "ok"

    agent.hand_over = hand_over
    agent.handle_datagram(ready().encode(KEY), "10.10.1.11")
    agent.step()
    assert handed == [pair.HandOver(PEER, "terminating")]
    assert scaling.completed == [
        {
            "LifecycleHookName": "tunnelnat-x-gateway-terminating",
            "AutoScalingGroupName": "gw-group",
            "LifecycleActionResult": "CONTINUE",
            "InstanceId": ME,
        }
    ]
    assert agent.machine.retiring and agent.heart.status["retiring"] is True


def test_terminating_without_a_ready_standby_completes_after_a_bounded_wait(tmp_path):
    scaling = Lifecycle()
    clock = Clock()
    agent = fake_agent(
        tmp_path, ec2=FakeEc2(ME), autoscaling=scaling, imds=lambda path: "Terminated",
        clock=clock, config={"lifecycle_hook": "hook", "group_name": "gw-group"},
    )  # fmt: skip
    agent.step()
    assert scaling.completed == []
    clock.now += pair.LIFECYCLE_WAIT_SECONDS - 1
    agent.step()
    assert scaling.completed == []
    clock.now += 2
    agent.step()
    assert len(scaling.completed) == 1 and agent.lifecycle_done
    assert agent.machine.role == pair.ACTIVE  # nobody to hand over to


def test_not_terminating_nothing_happens(tmp_path):
    scaling = Lifecycle()
    agent = fake_agent(
        tmp_path, ec2=FakeEc2(ME), autoscaling=scaling, imds=lambda path: None,
        config={"lifecycle_hook": "hook", "group_name": "gw-group"},
    )  # fmt: skip
    agent.step()
    assert scaling.completed == [] and not agent.machine.retiring


def test_the_ready_signal_is_sent_once_when_ready(tmp_path):
    class Cfn:
        signals: list[dict] = []

        def signal_resource(self, **kw):
            self.signals.append(kw)

    cfn = Cfn()
    clock = Clock()
    agent = fake_agent(
        tmp_path, ec2=FakeEc2(PEER), cloudformation=cfn, clock=clock,
        config={"signal_stack": "tunnelnat", "signal_resource": "GatewayGroupABC123"},
    )  # fmt: skip
    agent.records.desired = 8
    agent.refresh_status = lambda now: None
    agent.tunnel_loaded, agent.generation = True, 7
    agent.step()
    assert cfn.signals == []  # generation 7 < the table's 8
    agent.generation = 8
    clock.now += pair.SIGNAL_POLL_SECONDS
    agent.step()
    assert cfn.signals == [
        {
            "StackName": "tunnelnat",
            "LogicalResourceId": "GatewayGroupABC123",
            "UniqueId": ME,
            "Status": "SUCCESS",
        }
    ]
    clock.now += pair.SIGNAL_POLL_SECONDS
    agent.step()
    assert len(cfn.signals) == 1
    # A restarted agent finds the marker: no second signal.
    again = fake_agent(
        tmp_path, ec2=FakeEc2(PEER), cloudformation=cfn,
        config={"signal_stack": "tunnelnat", "signal_resource": "GatewayGroupABC123"},
    )  # fmt: skip
    again.tunnel_loaded, again.generation = True, 9
    again.refresh_status = lambda now: None
    again.step()
    assert len(cfn.signals) == 1


def test_readiness_says_the_epoch_fenced_gaps_and_auth_failures():
    agent = fake_agent(ec2=FakeEc2(PEER))
    agent.handle_datagram(beat().encode(b"z" * 32), "10.10.1.11")
    agent.report()
    call = agent.records.readiness_calls[-1]
    assert call["epoch"] == agent.heart.epoch and call["fenced"] is False
    assert call["heart"]["auth_failures"] == 1 and call["heart"]["gap_max"] is None


# -- the key -----------------------------------------------------------------------------------


def test_the_key_comes_from_the_cache_then_secrets_manager(tmp_path):
    import os

    cfg = pair.PairConfig.from_json(
        VALID | {"key_secret": "tunnelnat/pair-key", "key_file": str(tmp_path / "k" / "pair.key")}
    )
    asked = []

    class Secrets:
        def get_secret_value(self, **kw):
            asked.append(kw)
            return {"SecretString": "s" * 40}

    assert pair.load_key(cfg, Secrets) == b"s" * 40
    assert asked == [{"SecretId": "tunnelnat/pair-key"}]
    assert os.stat(cfg.key_file).st_mode & 0o777 == 0o600
    assert pair.load_key(cfg, Secrets) == b"s" * 40 and len(asked) == 1  # cached: no AWS


def test_no_key_no_run_unless_insecure(tmp_path):
    cfg = pair.PairConfig.from_json(VALID | {"key_file": str(tmp_path / "none")})
    with pytest.raises(pair.PairError, match="no heartbeat key"):
        pair.load_key(cfg, None)
    insecure = pair.PairConfig.from_json(
        VALID | {"key_file": str(tmp_path / "none"), "insecure_heartbeats": True}
    )
    assert pair.load_key(insecure, None) == pair.INSECURE_KEY

    class Short:
        def get_secret_value(self, **kw):
            return {"SecretString": "short"}

    short = pair.PairConfig.from_json(
        VALID | {"key_file": str(tmp_path / "none"), "key_secret": "x"}
    )
    with pytest.raises(pair.PairError, match="32"):
        pair.load_key(short, Short)


def test_run_without_a_key_exits_2(tmp_path, monkeypatch):
    path = tmp_path / "pair.json"
    path.write_text(json.dumps(VALID | {"key_file": str(tmp_path / "none")}))
    monkeypatch.setattr(pair.boot, "instance_id_from_imds", lambda base: ME)
    assert pair.main(["run", "--config", str(path)]) == 2


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"key_secret": "a b"}, "invalid key_secret"),
        ({"key_file": "relative"}, "invalid key_file"),
        ({"insecure_heartbeats": "yes"}, "insecure_heartbeats"),
        ({"lifecycle_hook": "a hook"}, "invalid lifecycle_hook"),
        ({"signal_stack": "tunnelnat"}, "go together"),
        ({"signal_stack": "1x", "signal_resource": "Group"}, "invalid signal_stack"),
        ({"request_file": "/run/../x"}, "invalid request_file"),
        ({"group_name": "a;b"}, "invalid group_name"),
    ],
)
def test_the_new_keys_are_validated(change, message):
    with pytest.raises(pair.PairError, match=message):
        pair.PairConfig.from_json(VALID | change)


def test_the_new_keys_and_their_defaults():
    cfg = pair.PairConfig.from_json(VALID)
    assert cfg.key_file == Path("/var/lib/tunnelnat/pair.key") and cfg.key_secret is None
    assert cfg.switchover_file == Path("/run/tunnelnat/switchover")
    assert cfg.lifecycle_hook is None and cfg.signal_stack is None and cfg.group_name is None
    full = pair.PairConfig.from_json(
        VALID | {
            "key_secret": "arn:aws:secretsmanager:eu-west-1:123456789012:secret:tn-AbCdEf",
            "key_file": "/var/lib/tunnelnat/k", "lifecycle_hook": "tunnelnat-x-gateway-terminating",
            "signal_stack": "tunnelnat", "signal_resource": "GatewayGroup1A2B",
            "request_file": "/run/tunnelnat/please", "group_name": "tunnelnat-GatewayGroup-1",
        }
    )  # fmt: skip
    assert full.switchover_file == Path("/run/tunnelnat/please")
    assert full.signal_marker == Path("/var/lib/tunnelnat/pair.signalled")


def test_a_stale_read_after_the_takeover_does_not_make_the_new_active_step_down():
    """Issue 20, defect 6: the old active's last "active" heartbeat arrives just after the
    takeover; the new active asks EC2, whose read still names the old holder. b08b1c8's agent
    stepped down on it (and both were standby)."""
    ec2 = FakeEc2(PEER)
    agent = fake_agent(ec2=ec2)
    agent.take_over(pair.TakeOver("test: silent", 2.0))
    assert agent.machine.role == pair.ACTIVE and ec2.holder == ME
    ec2.stale = [PEER, PEER]  # eventual consistency: a few reads, seconds at most
    old_beat = pair.Heartbeat(PEER, pair.ACTIVE, 99, 7, 1, agent.wall(), 1)
    agent.handle_datagram(old_beat.encode(KEY), "10.10.1.11")  # CheckEni: a stale read
    agent.clock.sleep(pair.SETTLE_SECONDS)
    agent.step()  # the re-read after the settle window: stale again (one reading)
    agent.clock.sleep(1.0)
    agent.step()
    assert agent.machine.role == pair.ACTIVE
    agent.clock.sleep(pair.CONFIRM_SECONDS)
    agent.step()  # EC2 has caught up: it names this instance
    assert agent.machine.role == pair.ACTIVE and not agent.machine.fenced
    assert ec2.stale == []  # both stale reads were met


def test_the_ping_seam_runs_iputils_ping_with_a_half_second_budget(monkeypatch):
    seen = []

    def run(argv, **kw):
        seen.append(argv)
        return completed("", 0 if argv[-1] == "10.10.1.11" else 1)

    monkeypatch.setattr(pair.subprocess, "run", run)
    assert pair.ping(pair.IPv4Address("10.10.1.11")) is True
    assert pair.ping(pair.IPv4Address("10.10.1.12")) is False
    assert seen[0] == ["ping", "-n", "-q", "-c", "2", "-i", "0.2", "-W", "0.3", "10.10.1.11"]

    def missing(argv, **kw):
        raise FileNotFoundError("ping")

    monkeypatch.setattr(pair.subprocess, "run", missing)
    assert pair.ping(pair.IPv4Address("10.10.1.11")) is False  # no ping: force, as before


def test_a_retiring_or_fenced_standby_does_not_acknowledge_a_handover():
    for status in ({"retiring": True}, {"fenced": True}, {"role": pair.ACTIVE}):
        h = pair.Heart(ME, KEY, 7465, 0.5)
        h.update(**status)
        sent = []
        h._send = lambda message, peers, sent=sent: sent.append(message)
        h.receive(_handover(), "10.10.1.11", 1.0)
        assert sent == [], status
    h = pair.Heart(ME, KEY, 7465, 0.5)
    sent = []
    h._send = lambda message, peers: sent.append((message, peers))
    h.receive(_handover(), "10.10.1.11", 1.0)
    ((ack, peers),) = sent
    assert pair.Heartbeat.parse(ack, KEY).kind == "handover_ack"
    assert peers == [pair.IPv4Address("10.10.1.11")]


def _handover() -> bytes:
    return pair.Heartbeat(PEER, pair.ACTIVE, 9, 7, 1, time.time(), kind="handover", to=ME).encode(
        KEY
    )
