"""``tunnelnat-gateway install-health`` (InstallHealthAgent's verb, health_install.py): the probe's
checks, its source on lo, the dry run, the units written only when they change, systemd or not.
Every path under a throwaway directory; ``ip`` and ``systemctl`` are a recording fake."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tunnelnat_gateway import health, health_install

PROBE = {
    "probe": "192.0.2.7:443",
    "probe_source": "203.0.113.10",
    "partner_networks": "192.0.2.0/24",
    "public_addresses": "203.0.113.10,203.0.113.11",
}


class Runner:
    """``ip``/``systemctl``: records each argv; ``fail`` names argv[1:3] prefixes that fail."""

    def __init__(self, fail: tuple[str, ...] = ()):
        self.calls: list[list[str]] = []
        self.fail = fail

    def __call__(self, argv, **_kw):
        self.calls.append([Path(argv[0]).name, *argv[1:]])
        failed = " ".join(argv[1:3]) in self.fail
        return subprocess.CompletedProcess(argv, 1 if failed else 0, "", "no" if failed else "")

    def named(self, tool: str) -> list[list[str]]:
        return [c[1:] for c in self.calls if c[0] == tool]


@pytest.fixture
def dry(monkeypatch):
    """The agent's dry run, recorded: what it was asked, a line like the agent's."""
    seen: list[list[str]] = []

    def main(argv):
        seen.append(argv)
        print(json.dumps({"gateway": "install-check", "published": False, "tunnels": []}))
        return 0

    monkeypatch.setattr(health_install.health, "main", main)
    return seen


@pytest.fixture
def paths(tmp_path):
    lib = tmp_path / "lib"
    (lib / "gateway").mkdir(parents=True)
    return {"state_dir": tmp_path / "etc", "units_dir": tmp_path / "units", "lib": lib}


def options(**given) -> health_install.Options:
    return health_install.Options(
        **({"tunnel": "partner", "region": "us-east-1", "deployment": "acme"} | given)
    )


def install(paths, runner, *, systemd=False, **given):
    return health_install.install(options(**given), run=runner, systemd=systemd, **paths)


def test_units_run_the_installed_package_through_its_stable_link(paths, dry, capsys):
    runner = Runner()
    line = install(paths, runner, interval=10, namespace="tunnelnat/acme", **PROBE)
    service = (paths["units_dir"] / "tunnelnat-health.service").read_text()
    (exec_start,) = [x for x in service.splitlines() if x.startswith("ExecStart=")]
    argv = exec_start.removeprefix("ExecStart=").split()
    assert argv[1:6] == [
        str(paths["lib"] / "tunnelnat-gateway.pyz"),
        "health",
        "once",
        "--gateway-id",
        "auto",
    ]
    assert os.path.basename(argv[0]).startswith("python3")
    args = argv[6:]
    assert args[:6] == ["--tunnels", "partner", "--region", "us-east-1", "--deployment", "acme"]
    assert "--high-resolution" in args  # 10 s: 1-second storage
    assert args[args.index("--namespace") + 1] == "tunnelnat/acme"
    assert args[args.index("--probe") + 1] == "192.0.2.7:443"
    assert args[args.index("--probe-source") + 1] == "203.0.113.10"
    assert args[args.index("--software-parameter") + 1] == "/tunnelnat/acme/gateway-software"
    assert "ExecStartPre=-" in service and "addr replace 203.0.113.10/32 dev lo" in service
    timer = (paths["units_dir"] / "tunnelnat-health.timer").read_text()
    assert "OnUnitActiveSec=10s" in timer and "AccuracySec=1s" in timer
    assert "WantedBy=timers.target" in timer
    # The dry run had the unit's arguments, with its own state files and no publishing.
    (asked,) = dry
    assert asked[:3] == ["once", "--gateway-id", "install-check"] and "--dry-run" in asked
    assert asked[3 : 3 + len(args)] == args
    # The probe's source on lo, remembered for the next run.
    assert runner.named("ip") == [["addr", "replace", "203.0.113.10/32", "dev", "lo"]]
    assert (paths["state_dir"] / "probe-source").read_text() == "203.0.113.10\n"
    # No systemd (the lab's namespaces): installed, said so, and the same JSON line as before.
    assert runner.named("systemctl") == []
    assert "systemd is not PID 1 here" in capsys.readouterr().err
    assert list(line) == [
        "installed",
        "tunnel",
        "timer",
        "interval",
        "probe_source",
        "cloud_init",
        "agent_changed",
        "check",
    ]
    assert line["timer"] == "skipped" and line["interval"] == 10 and line["agent_changed"]
    assert line["check"]["gateway"] == "install-check"


def test_without_a_probe_no_address_and_standard_resolution(paths, dry):
    runner = Runner()
    line = install(paths, runner)
    service = (paths["units_dir"] / "tunnelnat-health.service").read_text()
    assert "ExecStartPre" not in service and "--probe" not in service
    assert "--high-resolution" not in service and "--namespace" not in service
    assert runner.named("ip") == [] and line["probe_source"] == ""
    assert (paths["state_dir"] / "probe-source").read_text() == ""


def test_units_rewritten_only_when_they_change_and_the_timer_restarted_only_then(paths, dry):
    first, second, third = Runner(), Runner(), Runner()
    assert install(paths, first, systemd=True)["agent_changed"] is True
    assert first.named("systemctl") == [
        ["daemon-reload"],
        ["enable", "tunnelnat-health.timer"],
        ["restart", "tunnelnat-health.timer"],
    ]
    service = paths["units_dir"] / "tunnelnat-health.service"
    mtime = service.stat().st_mtime_ns
    line = install(paths, second, systemd=True)
    assert line["agent_changed"] is False and line["timer"] == "enabled"
    assert service.stat().st_mtime_ns == mtime
    assert second.named("systemctl") == [
        ["enable", "tunnelnat-health.timer"],
        ["start", "tunnelnat-health.timer"],
    ]
    assert install(paths, third, systemd=True, interval=30)["agent_changed"] is True
    assert ["daemon-reload"] in third.named("systemctl")
    assert "OnUnitActiveSec=30s" in (paths["units_dir"] / "tunnelnat-health.timer").read_text()


@pytest.mark.parametrize(
    "fail, message",
    [
        ("enable tunnelnat-health.timer", "cannot enable tunnelnat-health.timer"),
        ("restart tunnelnat-health.timer", "cannot start tunnelnat-health.timer"),
        ("daemon-reload", "systemctl daemon-reload failed"),
    ],
)
def test_systemctl_failures_fail_the_document(paths, dry, fail, message):
    with pytest.raises(health_install.Failed, match=message):
        install(paths, Runner(fail=(fail,)), systemd=True)


def test_the_old_probe_source_goes_unless_configure_gateway_keeps_it(paths, dry):
    state = paths["state_dir"]
    state.mkdir()
    (state / "probe-source").write_text("203.0.113.11\n")
    runner = Runner()
    install(paths, runner, **PROBE)
    assert ["addr", "del", "203.0.113.11/32", "dev", "lo"] in runner.named("ip")
    # Kept: ConfigureGateway's lo-addresses names it (a mapped or tunnel address).
    (state / "probe-source").write_text("203.0.113.11\n")
    (state / "lo-addresses").write_text("203.0.113.11\n198.51.100.10\n")
    runner = Runner()
    install(paths, runner, **PROBE)
    assert not [c for c in runner.named("ip") if c[1] == "del"]
    # What the file says reaches ip only as an address.
    (state / "probe-source").write_text("1.2.3.4 dev eth0\n")
    runner = Runner()
    install(paths, runner)
    assert runner.named("ip") == []


def test_a_probe_source_ip_refuses_fails_the_document(paths, dry):
    with pytest.raises(health_install.Failed, match="cannot put 203.0.113.10 on lo: no"):
        install(paths, Runner(fail=("addr replace",)), **PROBE)


@pytest.mark.parametrize(
    "given, message",
    [
        ({"probe": "192.0.2.7:443"}, "ProbeTarget and ProbeSource go together"),
        ({"probe_source": "203.0.113.10"}, "ProbeTarget and ProbeSource go together"),
        (PROBE | {"partner_networks": ""}, "a probe needs PartnerNetworks and PublicAddresses"),
        (PROBE | {"probe": "198.51.100.1:443"}, "ProbeTarget 198.51.100.1 is not inside"),
        (PROBE | {"probe_source": "203.0.113.99"}, "ProbeSource 203.0.113.99 is not among"),
        (PROBE | {"partner_networks": "192.0.2.1/24"}, "invalid PartnerNetworks"),
    ],
)
def test_a_probe_that_would_not_cross_the_tunnel_is_refused_before_anything(
    paths, dry, given, message
):
    runner = Runner()
    with pytest.raises(health_install.Failed, match=message):
        install(paths, runner, **given)
    assert runner.calls == [] and dry == [] and not paths["units_dir"].exists()


def test_the_dry_run_failing_fails_the_document_and_writes_no_unit(paths, monkeypatch):
    monkeypatch.setattr(health_install.health, "main", lambda argv: 2)
    with pytest.raises(health_install.Failed, match="does not run with these parameters"):
        install(paths, Runner())
    assert not (paths["units_dir"] / "tunnelnat-health.service").exists()


def test_the_real_agent_dry_runs_in_process(paths, monkeypatch):
    """No swanctl, no nft, no AWS: the agent reads all as down and publishes nothing."""
    monkeypatch.setattr(health, "read_sas", lambda **k: health.SaReading(error="no charon"))
    monkeypatch.setattr(health, "read_counters", lambda run=None: None)
    monkeypatch.setattr(
        health, "read_applied_generation", lambda run=None: health.TableReading(None, "no nft")
    )
    monkeypatch.setattr(health, "read_map_size", lambda run=None: None)
    monkeypatch.setattr(health.software, "read_deployed", lambda *a, **k: None)
    line = install(paths, Runner())
    check = line["check"]
    assert check["gateway"] == "install-check" and check["published"] is False
    assert check["tunnels"][0]["tunnel"] == "partner" and check["tunnels"][0]["up"] is False
    assert check["software"]["deployed"] is None


def test_no_current_software_yet_this_archive_becomes_it(paths, dry):
    """A gateway older than the package (its InstallGatewaySoftware still to come): the timer
    must have something to run. An existing link is never moved here."""
    lib = paths["lib"]
    archive = lib / "gateway" / f"{'a' * 64}.pyz"
    archive.write_bytes(b"zip")
    line = health_install.install(options(), run=Runner(), systemd=False, archive=archive, **paths)
    link = lib / "tunnelnat-gateway.pyz"
    assert os.readlink(link) == f"gateway/{'a' * 64}.pyz" and line["agent_changed"] is True
    other = lib / "gateway" / f"{'b' * 64}.pyz"
    other.write_bytes(b"zip")
    health_install.install(options(), run=Runner(), systemd=False, archive=other, **paths)
    assert os.readlink(link) == f"gateway/{'a' * 64}.pyz"


def test_an_archive_outside_lib_is_not_linked(paths, dry, tmp_path):
    archive = tmp_path / "elsewhere.pyz"
    archive.write_bytes(b"zip")
    health_install.install(options(), run=Runner(), systemd=False, archive=archive, **paths)
    assert not os.path.lexists(paths["lib"] / "tunnelnat-gateway.pyz")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--interval", "5"], "HealthInterval must be 10-3600"),
        (["--interval", "3601"], "HealthInterval must be 10-3600"),
        (["--tunnel", "partner\nExecStart=/bin/sh"], "invalid TunnelName"),
        (["--region", "us-east-1 x"], "invalid Region"),
        (["--deployment", "a b"], "invalid Deployment"),
        (["--namespace", "tunnelnat"], "invalid Namespace"),
    ],
)
def test_the_verb_checks_every_parameter_again(argv, message, capsys):
    base = {"--tunnel": "partner", "--region": "us-east-1"}
    given = dict(zip(argv[::2], argv[1::2], strict=True))
    args = [x for k, v in (base | given).items() for x in (k, v)]
    assert health_install.main(args) == 1
    assert f"InstallHealthAgent: {message}" in capsys.readouterr().err


def test_a_deployment_ssm_cannot_name_gets_no_software_parameter():
    args = health_install.agent_args(options(deployment="a:b"))
    assert "--software-parameter" not in args


# -- several partners (issue 23): one agent, every tunnel -------------------------------------


def test_several_tunnels_one_agent_reporting_each(paths, dry):
    opts = health_install.parse(["--tunnel", "bank-a,legacy-b,overlap-c", "--region", "us-east-1"])
    assert opts.tunnel == "bank-a,legacy-b,overlap-c"
    install(paths, Runner(), tunnel=opts.tunnel)
    assert dry[0][dry[0].index("--tunnels") + 1] == "bank-a,legacy-b,overlap-c"
    service = (paths["units_dir"] / "tunnelnat-health.service").read_text()
    assert "TunnelUp for tunnels bank-a, legacy-b, overlap-c\n" in service
    assert "--tunnels bank-a,legacy-b,overlap-c " in service


@pytest.mark.parametrize(
    "names", ["a,", ",a", "a,,b", "a,a", "a,b c", "a;b", ",".join(f"t{i}" for i in range(101))]
)
def test_a_bad_tunnel_list_is_refused(names):
    with pytest.raises(health_install.Failed, match="TunnelName"):
        health_install.parse(["--tunnel", names, "--region", "us-east-1"])


def test_a_probe_with_several_tunnels_is_refused(paths, dry):
    """A probe crosses one partner's tunnel: it would mark every partner down with it."""
    with pytest.raises(health_install.Failed, match="with several tunnels leave ProbeTarget"):
        install(paths, Runner(), tunnel="a,b", **PROBE)
    assert dry == [] and not paths["units_dir"].exists()


def test_the_agent_refuses_a_probe_with_several_tunnels(capsys):
    argv = ["once", "--tunnels", "a,b", "--gateway-id", "i-1", "--region", "us-east-1"]
    argv += ["--probe", "192.0.2.7:443", "--probe-source", "203.0.113.10", "--dry-run"]
    with pytest.raises(SystemExit):
        health.main(argv)
    assert "--probe goes with one tunnel" in capsys.readouterr().err
