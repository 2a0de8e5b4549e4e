"""ConfigureTunnel's and RestartTunnel's verbs (gateway/tunnelnat_gateway/tunnel.py).

Each runs against a temporary root (the files it writes), shims for ``swanctl``, ``ip`` and
``modprobe`` on PATH that log every call and answer from captures of strongSwan 5.9.8
(tests/unit/data/swanctl, tunnel_stats), and a clock whose sleeps take no time. The lab runs the
same verbs for real, through the documents (tests/lab/test_gateway_documents.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import boto3
import pytest
import yaml
from moto import mock_aws

from tests.unit.imports import third_party_imports

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "gateway"))
from tunnelnat_gateway import tunnel  # noqa: E402

DATA = REPO / "tests" / "unit" / "data"
DOCUMENTS = REPO / "ssm_documents"
PSK = "correct-horse-battery-staple-42"
ESTABLISHED_PLAIN = (DATA / "swanctl" / "established.plain").read_text()
ESTABLISHED_RAW = (DATA / "swanctl" / "established.raw").read_text()
# The same SA after 840 bytes in, the last packet 3 s ago (vici's use-in).
RECEIVING_RAW = ESTABLISHED_RAW.replace(
    "bytes-in=0 packets-in=0", "bytes-in=840 packets-in=10 use-in=3"
)

FAKE_SWANCTL = """#!/bin/bash
echo "$*" >> "$TN_FAKE/calls"
case "$*" in
  --stats) [ -e "$TN_FAKE/dead" ] && exit 1; cat "$TN_FAKE/stats" 2>/dev/null ;;
  --list-conns) cat "$TN_FAKE/conns" ;;
  "--list-sas --ike "*" --raw") cat "$TN_FAKE/raw" 2>/dev/null ;;
  "--list-sas --ike "*) cat "$TN_FAKE/plain" 2>/dev/null ;;
  "--load-all --noprompt")
    if [ -e "$TN_FAKE/load-fails" ]; then echo "loading connection 'partner' failed"; exit 1; fi ;;
  "--terminate --ike "*)
    if [ -e "$TN_FAKE/terminate-out" ]; then cat "$TN_FAKE/terminate-out"; exit 1; fi ;;
  "--initiate --child "*) [ -e "$TN_FAKE/comes-up" ] && cp "$TN_FAKE/comes-up" "$TN_FAKE/plain" ;;
esac
exit 0
"""
FAKE_IP = """#!/bin/bash
echo "$*" >> "$TN_FAKE/ip-calls"
if [ "$1 $2 $3 $4 $5" = "-o -4 addr show to" ]; then
  address="${6%/32}"
  if grep -qxF "$address" "$TN_FAKE/addresses" 2>/dev/null; then
    echo "3: eth1    inet $address/24 brd 10.10.0.255 scope global eth1"
  fi
fi
exit 0
"""
FAKE_CHARON = """#!/bin/bash
rm -f "$TN_FAKE/dead"
"""


class Clock:
    """Monotonic time that a sleep advances at once (``real``: sleeps a little for real too,
    for a process started in the background)."""

    def __init__(self, real: bool = False) -> None:
        self.now, self.real, self.slept = 1000.0, real, 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.slept += seconds
        if self.real:
            time.sleep(min(seconds, 0.02))


class Gateway:
    """A gateway under ``tmp_path/root`` with fake programs in ``tmp_path/fake``."""

    def __init__(self, tmp_path: Path, *, real_sleep: bool = False) -> None:
        self.root = tmp_path / "root"
        self.fake = tmp_path / "fake"
        bin_dir = self.fake / "bin"
        bin_dir.mkdir(parents=True)
        for name, text in (("swanctl", FAKE_SWANCTL), ("ip", FAKE_IP), ("modprobe", "exit 0\n")):
            (bin_dir / name).write_text(text if text.startswith("#!") else f"#!/bin/bash\n{text}")
            (bin_dir / name).chmod(0o755)
        for d in ("etc/swanctl", "sys/module/esp4", "var/log"):
            (self.root / d).mkdir(parents=True)
        self.conns("partner")
        self.down()  # a new gateway: no SA until the first initiate brings one up
        (self.fake / "comes-up").write_text(ESTABLISHED_PLAIN)
        self.clock = Clock(real_sleep)
        self.secret = PSK
        self.env = {
            "PATH": f"{bin_dir}:/usr/bin:/bin",
            "TN_FAKE": str(self.fake),
            "TN_CLOUD_INIT": "done",
        }

    def conns(self, *children: str) -> None:
        lines = ["partner: IKEv2, no reauthentication, rekeying every 14400s", "  local:  %any"]
        for child in children:
            lines += [f"  {child}: TUNNEL, rekeying every 3600s", "    local:  203.0.113.210/32"]
        (self.fake / "conns").write_text("\n".join(lines) + "\n")

    def up(self) -> None:
        (self.fake / "plain").write_text(ESTABLISHED_PLAIN)

    def down(self) -> None:
        (self.fake / "plain").write_text("")

    def never_up(self) -> None:
        self.down()
        (self.fake / "comes-up").unlink(missing_ok=True)

    def host(self) -> tunnel.Host:
        return tunnel.Host(
            root=self.root,
            sleep=self.clock.sleep,
            clock=self.clock,
            secret=lambda name, region: self.secret,
            env=dict(self.env),
        )

    def calls(self) -> list[str]:
        path = self.fake / "calls"
        return path.read_text().splitlines() if path.exists() else []

    def ip_calls(self) -> list[str]:
        path = self.fake / "ip-calls"
        return path.read_text().splitlines() if path.exists() else []

    def forget_calls(self) -> None:
        for name in ("calls", "ip-calls"):
            (self.fake / name).unlink(missing_ok=True)

    def file(self, path: str) -> Path:
        return self.root / path.lstrip("/")


@pytest.fixture
def gw(tmp_path: Path) -> Gateway:
    return Gateway(tmp_path)


ARGS = {
    "--partner-endpoint": "198.51.100.40",
    "--partner-networks": "192.0.2.0/24",
    "--public-addresses": "203.0.113.10,203.0.113.11",
    "--local-id": "198.51.100.10",
    "--psk-secret-name": "tunnelnat/psk",
    "--region": "us-east-1",
}


def argv(**overrides: str) -> list[str]:
    given = {**ARGS, **{f"--{k.replace('_', '-')}": v for k, v in overrides.items()}}
    return [x for k, v in given.items() for x in (k, v)]


def run(main, gw: Gateway, args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args, gw.host())
    return code, out.getvalue(), err.getvalue()


def configure(gw: Gateway, **overrides: str) -> tuple[int, dict, str]:
    code, out, err = run(tunnel.configure_main, gw, argv(**overrides))
    assert PSK not in out + err and PSK.encode().hex() not in out + err
    lines = out.splitlines()
    assert len(lines) <= 1, out  # one JSON line, or nothing and a failure
    return code, (json.loads(lines[0]) if lines else {}), err


def refused(gw: Gateway, message: str, **overrides: str) -> None:
    code, report, err = configure(gw, **overrides)
    assert code != 0 and report == {}
    assert err.startswith("ConfigureTunnel: ") and err.count("\n") == 1, err
    assert message in err, err
    # Nothing ran, nothing was written.
    assert gw.calls() == [] and not gw.file("/etc/swanctl/conf.d").exists()


# -- ConfigureTunnel: values checked again ------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("partner_endpoint", "256.1.1.1", "PartnerEndpoint '256.1.1.1': not an IPv4 address"),
        ("partner_endpoint", "1.2.3.4; reboot", "PartnerEndpoint"),
        ("partner_networks", "10.0.0.0/33", "PartnerNetworks '10.0.0.0/33'"),
        ("partner_networks", "10.0.0.0", "PartnerNetworks '10.0.0.0': not an IPv4 network"),
        ("partner_networks", "192.0.2.1/24", "has host bits set"),  # core/swanctl.py's own
        ("partner_networks", ",".join(f"10.0.{i}.0/24" for i in range(33)), "1 to 32 entries"),
        ("public_addresses", "203.0.113.10,$(id)", "PublicAddresses '$(id)'"),
        ("local_id", 'evil"id', "LocalId"),
        ("local_id", "1.2.3.999", "1.2.3.999"),  # a dotted quad must be an address
        ("remote_id", "a b", "RemoteId"),
        ("psk_secret_name", "psk\nreboot", "PskSecretName"),
        ("region", "us-east-1; id", "Region"),
        ("tunnel_name", "x; reboot", "TunnelName"),
        ("ike_proposals", "aes256 sha256", "IkeProposals"),
        ("ike_lifetimes", "1,2", "IkeLifetimes"),
        ("child_lifetimes", "3600,3060,540", "rand_time < rekey_time < life_time"),
        ("dpd", "1,30", "DpdDelay 5-300"),
        ("keying_tries", "-1", "KeyingTries"),
        ("ipsec_backend", "userspace", "invalid choice"),
        ("local_address", "10.10.0.10/32", "LocalAddress '10.10.0.10/32': not an IPv4 address"),
        ("partner_networks", "198.51.100.0/24", "overlap PartnerNetworks"),
    ],
)
def test_configure_checks_every_value_again(gw, option, value, message):
    refused(gw, message, **{option: value})


def test_configure_names_a_missing_argument(gw):
    code, _, err = run(tunnel.configure_main, gw, argv()[:-2])  # no --region
    assert code != 0 and err == "ConfigureTunnel: the following arguments are required: --region\n"


ESCAPES = [
    "/var/log/tunnelnat/../../../etc/cron.d/tunnelnat.log",
    "/var/log/tunnelnat/../x.log",
    "/etc/cron.d/evil.log",
    "/root/.ssh/authorized_keys",
    "/var/log/tunnelnat/sub/charon.log",
    "/var/log/tunnelnat/.log",
    "/var/log/tunnelnat/charon.log/",
    "/var/log/tunnelnatX/charon.log",
    "/var/log/tunnelnat/charon.log\n",
]


@pytest.mark.parametrize("path", ESCAPES)
def test_charon_log_outside_its_directory_is_refused(gw, path):
    """charon appends to it as root (issue 21, 2): checked again whatever the allowedPattern
    let through, before anything else runs."""
    shown = path if path.isprintable() else repr(path)
    refused(gw, f"CharonLog {shown}: only /var/log/tunnelnat/NAME.log", charon_log=path)


@pytest.mark.parametrize("link", ["/var/log/tunnelnat", "/var/log/tunnelnat/charon.log"])
def test_charon_log_through_a_symbolic_link_is_refused(gw, link):
    target = gw.root / "elsewhere"
    target.mkdir()
    if link.endswith(".log"):
        gw.file("/var/log/tunnelnat").mkdir()
    gw.file(link).symlink_to(target)
    refused(gw, "/var/log/tunnelnat or the log is a symbolic link")


# -- ConfigureTunnel: what it writes and reports -------------------------------------------------


def test_first_run_writes_the_tunnel_and_reports_it(gw):
    code, report, err = configure(gw)
    assert code == 0, err
    assert list(report) == [
        "configured",
        "tunnel",
        "up",
        "installed",
        "standby",
        "backend",
        "swanctl_changed",
        "restarted",
        "config_id",
        "cloud_init",
    ]
    assert report == {
        **report,
        "configured": True,
        "tunnel": "partner",
        "up": True,
        "installed": 1,
        "standby": False,
        "backend": "kernel",
        "swanctl_changed": True,
        "restarted": False,  # no IKE SA before the load: nothing to start over
        "cloud_init": "done",
    }
    uuid.UUID(report["config_id"])
    assert (
        gw.file("/etc/tunnelnat/tunnels/partner.config-id").read_text().strip()
        == (report["config_id"])
    )
    conf = gw.file("/etc/swanctl/conf.d/tunnelnat-partner.conf")
    assert "remote_addrs = 198.51.100.40" in conf.read_text()
    assert conf.stat().st_mode & 0o777 == 0o644
    secret = gw.file("/etc/swanctl/conf.d/tunnelnat-partner.secret.conf")
    assert secret.stat().st_mode & 0o777 == 0o600
    text = secret.read_text()
    assert f"secret = 0x{PSK.encode().hex()}" in text and PSK not in text
    assert 'id-1 = "198.51.100.10"' in text and 'id-2 = "198.51.100.40"' in text
    settings = gw.file("/etc/strongswan.d/tunnelnat.conf").read_text()
    assert "path = /var/log/tunnelnat/charon.log" in settings
    assert json.loads(gw.file("/etc/tunnelnat/tunnels/partner.json").read_text())["children"] == [
        "partner"
    ]
    assert gw.file("/var/log/tunnelnat").is_dir()
    calls = gw.calls()
    assert "--load-all --noprompt" in calls and "--reload-settings" in calls
    assert not any(c.startswith("--terminate") for c in calls)
    # Kernel ESP: no addresses on lo.
    assert gw.file("/etc/tunnelnat/lo-addresses").read_text() == ""
    assert not [c for c in gw.ip_calls() if "dev lo" in c]


def test_an_unchanged_rerun_touches_nothing(gw):
    first = configure(gw)[1]
    gw.forget_calls()
    code, report, _ = configure(gw)
    assert code == 0
    assert report["swanctl_changed"] is False and report["restarted"] is False
    assert report["config_id"] == first["config_id"] and report["up"] is True
    calls = gw.calls()
    assert "--reload-settings" not in calls  # strongswan.conf unchanged
    assert not any(c.startswith(("--terminate", "--initiate")) for c in calls)


def test_a_new_key_restarts_the_ike_sa_that_was_up(gw):
    first = configure(gw)[1]
    gw.secret = PSK + "-rotated"
    gw.forget_calls()
    code, report, _ = configure(gw)
    assert code == 0
    assert report["swanctl_changed"] is True and report["restarted"] is True
    assert report["up"] is True and report["config_id"] != first["config_id"]
    calls = gw.calls()
    # The IKE SA is looked at before the load, terminated after it, every child initiated.
    assert calls.index("--list-sas --ike partner") < calls.index("--load-all --noprompt")
    assert calls.count("--terminate --ike partner --force") == 1
    assert calls.index("--load-all --noprompt") < calls.index("--terminate --ike partner --force")
    assert "--initiate --child partner --ike partner --timeout -1" in calls
    assert (PSK + "-rotated").encode().hex() in gw.file(
        "/etc/swanctl/conf.d/tunnelnat-partner.secret.conf"
    ).read_text()


def test_a_changed_connection_without_an_sa_is_not_a_restart(gw):
    configure(gw)
    gw.down()  # an initiate brings it up
    gw.forget_calls()
    code, report, _ = configure(gw, dpd="20,60")
    assert code == 0
    assert report["swanctl_changed"] is True and report["restarted"] is False
    assert report["up"] is True  # down for 5 s, StartAction start: initiated, then up
    assert not any(c.startswith("--terminate") for c in gw.calls())
    assert "--initiate --child partner --ike partner --timeout -1" in gw.calls()
    assert "--reload-settings" in gw.calls()  # DPD's timeout is charon's setting


def test_per_pair_children_are_each_initiated(gw):
    gw.conns("partner-1", "partner-2")
    gw.never_up()
    code, report, _ = configure(gw, selector_layout="per-pair")
    assert code == 0 and report["up"] is False and report["installed"] == 0
    initiated = [c for c in gw.calls() if c.startswith("--initiate")]
    assert initiated == [
        "--initiate --child partner-1 --ike partner --timeout -1",
        "--initiate --child partner-2 --ike partner --timeout -1",
    ]
    assert 19.9 < gw.clock.slept < 21  # waited 5 s, then 15 s after initiating


def test_start_action_none_waits_for_the_partner_without_initiating(gw):
    gw.never_up()
    code, report, _ = configure(gw, start_action="none")
    assert code == 0 and report["up"] is False
    assert not any(c.startswith("--initiate") for c in gw.calls())
    assert 4.9 < gw.clock.slept < 6


def test_a_standby_without_the_local_address_waits_for_nothing(gw):
    """A pair's standby lacks LocalAddress (G's ENI is the active's): configured, not up, and
    nothing initiated: the pair agent does that when it takes the ENI over."""
    gw.never_up()
    code, report, _ = configure(gw, local_address="10.10.0.10")
    assert code == 0 and report["standby"] is True and report["up"] is False
    assert "-o -4 addr show to 10.10.0.10/32" in gw.ip_calls()
    assert not any(c.startswith("--initiate") for c in gw.calls()) and gw.clock.slept == 0
    conf = gw.file("/etc/swanctl/conf.d/tunnelnat-partner.conf").read_text()
    assert "local_addrs = 10.10.0.10" in conf
    # The active holds it: not a standby.
    (gw.fake / "addresses").write_text("10.10.0.10\n")
    gw.up()
    report = configure(gw, local_address="10.10.0.10")[1]
    assert report["standby"] is False and report["up"] is True


def test_libipsec_keeps_the_addresses_on_lo_and_leaves_the_probe_source(gw):
    (gw.fake / "stats").write_text(
        "loaded plugins: charon aes sha2 kernel-libipsec socket-default\n"
    )
    state = gw.file("/etc/tunnelnat")
    state.mkdir(parents=True)
    (state / "lo-addresses").write_text("203.0.113.99\n203.0.113.50\n")
    (state / "probe-source").write_text("203.0.113.50\n")
    code, report, err = configure(gw, ipsec_backend="libipsec", public_addresses="203.0.113.8/30")
    assert code == 0, err
    assert report["backend"] == "libipsec"
    ip = gw.ip_calls()
    assert "addr del 203.0.113.99/32 dev lo" in ip  # an earlier run's, now unlisted
    assert not any("203.0.113.50" in c for c in ip)  # InstallHealthAgent's
    assert "addr replace 203.0.113.9/32 dev lo" in ip  # the first host of 203.0.113.8/30
    assert (state / "lo-addresses").read_text() == "203.0.113.9\n"
    libipsec = gw.file("/etc/strongswan.d/charon/kernel-libipsec.conf").read_text()
    assert libipsec == "kernel-libipsec {\n    load = yes\n}\n"
    assert "encap = yes" in gw.file("/etc/swanctl/conf.d/tunnelnat-partner.conf").read_text()


def test_libipsec_without_the_plugin_and_without_systemd_says_what_to_do(gw):
    (gw.fake / "stats").write_text("loaded plugins: charon aes sha2 socket-default\n")
    code, _, err = configure(gw, ipsec_backend="libipsec")
    assert code == 1
    assert err == (
        "ConfigureTunnel: charon runs without kernel-libipsec; restart it so it reads "
        "/etc/strongswan.d/charon/kernel-libipsec.conf\n"
    )


FAKE_SYSTEMCTL = """#!/bin/bash
echo "$*" >> "$TN_FAKE/systemctl-calls"
# Units named in $TN_FAKE/failing-units fail; a restart of strongswan loads kernel-libipsec.
if grep -qxF "${@: -1}" "$TN_FAKE/failing-units" 2>/dev/null; then exit 1; fi
if [ "$1" = restart ]; then
  rm -f "$TN_FAKE/dead"
  cp "$TN_FAKE/stats.after" "$TN_FAKE/stats" 2>/dev/null
fi
exit 0
"""


def with_systemd(gw: Gateway, *failing: str) -> Path:
    """systemd as PID 1 of the gateway (sd_booted()), and a systemctl that logs its calls."""
    gw.file("/run/systemd/system").mkdir(parents=True)
    gw.file("/proc/1").mkdir(parents=True)
    gw.file("/proc/1/comm").write_text("systemd\n")
    systemctl = gw.fake / "bin" / "systemctl"
    systemctl.write_text(FAKE_SYSTEMCTL)
    systemctl.chmod(0o755)
    (gw.fake / "failing-units").write_text("".join(f"{u}\n" for u in failing))
    return gw.fake / "systemctl-calls"


def test_with_systemd_the_service_is_enabled_and_started(gw):
    calls = with_systemd(gw, "strongswan")  # Debian 11's unit name is strongswan-swanctl
    assert configure(gw)[0] == 0
    assert calls.read_text().splitlines() == [
        "enable --now strongswan",
        "enable --now strongswan-swanctl",
    ]
    (gw.fake / "failing-units").write_text("strongswan\nstrongswan-swanctl\n")
    code, _, err = configure(gw)
    assert code == 1 and err.endswith("ConfigureTunnel: cannot start the strongswan service\n")


def test_with_systemd_libipsec_restarts_charon_to_load_its_plugin(gw):
    calls = with_systemd(gw)
    (gw.fake / "stats").write_text("loaded plugins: charon aes sha2 socket-default\n")
    (gw.fake / "stats.after").write_text("loaded plugins: charon kernel-libipsec\n")
    code, report, err = configure(gw, ipsec_backend="libipsec")
    assert code == 0, err
    assert "restart strongswan" in calls.read_text().splitlines()
    # A charon that still lacks it after the restart: said so.
    (gw.fake / "stats.after").write_text("loaded plugins: charon aes\n")
    (gw.fake / "stats").write_text("loaded plugins: charon aes\n")
    code, _, err = configure(gw, ipsec_backend="libipsec")
    assert code == 1 and err == "ConfigureTunnel: kernel-libipsec did not load\n"


def test_restart_with_systemd_restarts_the_unit_of_a_dead_charon(gw):
    calls = with_systemd(gw)
    (gw.fake / "dead").touch()
    code, doc, err = restart(gw, RECEIVING_RAW)
    assert code == 0, err
    assert calls.read_text().splitlines() == ["restart strongswan"]
    assert doc["charon_restarted"] is True and "--load-all --noprompt" in gw.calls()
    (gw.fake / "dead").touch()
    (gw.fake / "failing-units").write_text("strongswan\nstrongswan-swanctl\n")
    code, _, err = restart(gw, RECEIVING_RAW)
    assert code == 1 and err == (
        "RestartTunnel: charon does not answer and the strongswan service does not restart\n"
    )


def test_a_kernel_without_esp_fails_before_anything_is_loaded(gw):
    gw.file("/sys/module/esp4").rmdir()
    code, _, err = configure(gw)
    assert code == 1
    assert err == "ConfigureTunnel: the kernel has no ESP (esp4); use IpsecBackend libipsec\n"
    assert not gw.file("/etc/swanctl/conf.d/tunnelnat-partner.secret.conf").exists()


def test_the_fedora_layout_is_used_when_present(gw):
    gw.file("/etc/strongswan/swanctl").mkdir(parents=True)
    assert configure(gw)[0] == 0
    assert gw.file("/etc/strongswan/swanctl/conf.d/tunnelnat-partner.conf").exists()
    assert gw.file("/etc/strongswan/strongswan.d/tunnelnat.conf").exists()


def test_no_swanctl_directory_fails_and_says_so(gw):
    gw.file("/etc/swanctl").rmdir()
    code, _, err = configure(gw)
    assert code == 1 and "no swanctl configuration directory" in err


def test_missing_programs_are_named_with_cloud_inits_word(gw):
    (gw.fake / "bin" / "swanctl").unlink()
    gw.env["PATH"] = str(gw.fake / "bin")
    gw.env["TN_CLOUD_INIT"] = "still running after 600s"
    code, _, err = configure(gw)
    assert code == 1
    assert (
        err == "ConfigureTunnel: swanctl is not installed (cloud-init: still running after 600s)\n"
    )


def test_a_dead_charon_fails_after_ten_seconds(gw):
    (gw.fake / "dead").touch()
    code, _, err = configure(gw)
    assert code == 1
    assert "charon does not answer on its vici socket (is strongSwan running?)" in err
    assert 9.9 < gw.clock.slept < 10.1


def test_a_failed_load_shows_swanctls_words(gw):
    (gw.fake / "load-fails").touch()
    code, _, err = configure(gw)
    assert code == 1
    assert (
        err == "loading connection 'partner' failed\nConfigureTunnel: swanctl --load-all failed\n"
    )


def test_runs_one_at_a_time(gw):
    """The association's and the PskRollout rule's runs queue on one flock(2) lock; a run that
    cannot take it in 240 s gives up and says so."""
    lock = gw.file(tunnel.LOCK_FILE)
    lock.parent.mkdir(parents=True)
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        code, _, err = configure(gw)
    assert code == 1
    assert err == "ConfigureTunnel: another ConfigureTunnel run still holds the lock after 240s\n"
    assert 240 <= gw.clock.slept < 241 and gw.calls() == []
    assert configure(gw)[0] == 0  # released: the next run goes ahead


def test_the_lock_is_flock1s(gw, tmp_path):
    """flock(1) (the lab's stand-in holder, an operator's) and the verb exclude each other."""
    lock = gw.file(tunnel.LOCK_FILE)
    lock.parent.mkdir(parents=True)
    holder = subprocess.Popen(["flock", str(lock), "sleep", "30"])  # noqa: S603, S607
    try:
        for _ in range(100):
            probe = subprocess.run(["flock", "-n", str(lock), "true"], check=False)  # noqa: S603, S607
            if probe.returncode != 0:
                break
            time.sleep(0.02)
        code, _, err = configure(gw)
        assert code == 1 and "still holds the lock" in err
    finally:
        holder.kill()
        holder.wait()


# -- the secret --------------------------------------------------------------------------------


@mock_aws
def test_the_secret_is_read_by_name_and_its_errors_name_it_not_its_value():
    client = boto3.client("secretsmanager", region_name="us-east-1")
    client.create_secret(Name="tunnelnat/psk", SecretString=f"  {PSK}\n")
    assert tunnel.fetch_secret("tunnelnat/psk", "us-east-1") == PSK
    client.create_secret(Name="tunnelnat/bin", SecretBinary=PSK.encode())
    assert tunnel.fetch_secret("tunnelnat/bin", "us-east-1") == PSK
    client.create_secret(Name="tunnelnat/short", SecretString="short-key")
    with pytest.raises(tunnel.Failed, match="^secret tunnelnat/short is shorter than 20 char"):
        tunnel.fetch_secret("tunnelnat/short", "us-east-1")
    client.create_secret(Name="tunnelnat/bytes", SecretBinary=b"\xff" * 30)
    with pytest.raises(tunnel.Failed, match="^secret tunnelnat/bytes is not text$"):
        tunnel.fetch_secret("tunnelnat/bytes", "us-east-1")
    with pytest.raises(tunnel.Failed) as err:
        tunnel.fetch_secret("tunnelnat/absent", "us-east-1")
    assert str(err.value).startswith("cannot read secret tunnelnat/absent: ResourceNotFound")


def test_a_secret_that_cannot_be_read_changes_nothing(gw):
    configure(gw)
    before = gw.file("/etc/swanctl/conf.d/tunnelnat-partner.secret.conf").read_text()

    def absent(name: str, region: str) -> str:
        raise tunnel.Failed(f"cannot read secret {name}: ResourceNotFoundException: gone")

    gw.forget_calls()
    host = gw.host()
    host.secret = absent
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = tunnel.configure_main(argv(psk_secret_name="tunnelnat/absent"), host)
    assert code == 1
    assert err.getvalue().startswith("ConfigureTunnel: cannot read secret tunnelnat/absent")
    assert gw.file("/etc/swanctl/conf.d/tunnelnat-partner.secret.conf").read_text() == before
    assert not any(c.startswith(("--load-all", "--terminate")) for c in gw.calls())


# -- RestartTunnel ----------------------------------------------------------------------------
# A forged TunnelUp=0 that reaches RestartTunnel must not cut a tunnel charon says is up and
# receiving (issue 21, 3).


def restart(gw: Gateway, raw: str = "", *args: str) -> tuple[int, dict, str]:
    (gw.fake / "raw").write_text(raw)
    code, out, err = run(tunnel.restart_main, gw, ["--wait-seconds", "2", *args])
    lines = out.splitlines()
    assert len(lines) <= 1, out
    return code, (json.loads(lines[0]) if lines else {}), err


def cut(calls: list[str]) -> bool:
    return any(c.startswith(("--terminate", "--initiate")) for c in calls)


def test_restart_leaves_a_healthy_receiving_tunnel_alone(gw):
    code, doc, _ = restart(gw, RECEIVING_RAW)
    assert code == 0
    assert doc == {
        "tunnel": "partner",
        "up": True,
        "skipped": "healthy",
        "installed": 1,
        "inbound_seconds": 3,
        "quiet_seconds": 120,
        "charon_restarted": False,
    }
    assert not cut(gw.calls())


def test_restart_per_pair_children_all_installed_and_receiving_is_healthy(gw):
    # partner-2's first SA is DELETED, a newer one INSTALLED (a rekey): both children are up.
    raw = (DATA / "tunnel_stats" / "second.raw").read_text()
    gw.conns("partner-1", "partner-2")
    assert restart(gw, raw)[1]["skipped"] == "healthy" and not cut(gw.calls())
    # A child missing: not healthy (TunnelUp's own rule): restarted.
    gw.conns("partner-1", "partner-2", "partner-3")
    code, doc, _ = restart(gw, raw)
    assert "skipped" not in doc and cut(gw.calls())


@pytest.mark.parametrize(
    ("raw", "args"),
    [
        (ESTABLISHED_RAW, ()),  # installed but nothing received: maybe a dead partner SA
        (RECEIVING_RAW.replace("use-in=3", "use-in=500"), ()),  # last packet 500 s ago
        (RECEIVING_RAW, ("--quiet-seconds", "0")),  # 0: always restart
        (RECEIVING_RAW.replace("state=ESTABLISHED", "state=CONNECTING", 1), ()),
        ("", ()),  # no SA at all
    ],
)
def test_restart_restarts_a_tunnel_that_is_not_healthy(gw, raw, args):
    code, doc, _ = restart(gw, raw, *args)
    calls = gw.calls()
    assert "--terminate --ike partner --timeout 10" in calls
    assert "--initiate --child partner --ike partner --timeout 2" in calls
    assert code == 0 and list(doc) == ["tunnel", "up", "seconds", "installed", "charon_restarted"]
    assert doc["up"] is True and doc["installed"] == 1 and "skipped" not in doc
    assert 0 <= doc["seconds"] < 5


@pytest.mark.parametrize("quiet", ["-1", "3601", "1;reboot", "", "01"])
def test_restart_quiet_seconds_is_a_bounded_number(gw, quiet):
    code, doc, err = restart(gw, RECEIVING_RAW, "--quiet-seconds", quiet)
    assert code != 0 and doc == {} and err.startswith("RestartTunnel: QuietSeconds")
    assert gw.calls() == []


@pytest.mark.parametrize("quiet", ["-1", "3601", "1;reboot", "", "01"])
def test_restart_documents_quiet_seconds_is_a_bounded_number_for_ssm_too(quiet):
    from lab.ssm_runner import InvalidParameters, load_document, render_scripts

    document = load_document(DOCUMENTS / "RestartTunnel.yaml")
    for good in ("0", "120", "3600"):
        render_scripts(document, {"QuietSeconds": good})
    with pytest.raises(InvalidParameters, match="QuietSeconds"):
        render_scripts(document, {"QuietSeconds": quiet})


@pytest.mark.parametrize(
    "args", [("--wait-seconds", "0"), ("--wait-seconds", "121"), ("--tunnel-name", "x; reboot")]
)
def test_restart_checks_its_other_values(gw, args):
    code, _, err = run(tunnel.restart_main, gw, list(args))
    assert code != 0 and err.startswith("RestartTunnel: ") and gw.calls() == []


def test_restart_of_an_unknown_tunnel_fails_loudly(gw):
    code, doc, err = restart(gw, "", "--tunnel-name", "nosuch")
    assert code == 1 and doc == {}
    assert (
        err == "RestartTunnel: no connection named nosuch is loaded (run ConfigureTunnel first)\n"
    )


def test_restart_that_does_not_come_back_reports_then_fails(gw):
    gw.never_up()
    code, doc, err = restart(gw, "")
    assert code == 1
    assert doc["up"] is False and doc["installed"] == 0
    assert err == "RestartTunnel: tunnel partner did not come back within 2s\n"


def test_restart_reports_a_terminate_that_failed_for_another_reason(gw):
    (gw.fake / "terminate-out").write_text("terminate failed: vici timeout\n")
    code, _, err = restart(gw, "")
    assert code == 0
    assert err == "RestartTunnel: terminate: terminate failed: vici timeout\n"
    (gw.fake / "terminate-out").write_text("no matching SAs found to terminate\n")
    assert restart(gw, "")[2] == ""


def test_restart_starts_a_dead_charon_detached(tmp_path):
    gw = Gateway(tmp_path, real_sleep=True)
    (gw.fake / "dead").touch()
    charon = gw.fake / "bin" / "charon-systemd"
    charon.write_text(FAKE_CHARON)
    charon.chmod(0o755)
    code, doc, err = restart(gw, RECEIVING_RAW)
    assert code == 0, err
    assert doc["charon_restarted"] is True and doc["skipped"] == "healthy"
    assert "--load-all --noprompt" in gw.calls()


def test_restart_without_a_charon_binary_says_so(gw):
    (gw.fake / "dead").touch()
    gw.env["PATH"] = f"{gw.fake / 'bin'}:/bin"  # no charon-systemd, no /usr/lib/ipsec/charon
    code, _, err = restart(gw, "")
    assert code == 1
    assert err == "RestartTunnel: charon does not answer and no charon binary was found\n"


# -- the verbs and their documents ---------------------------------------------------------------


def _document(name: str) -> dict:
    return yaml.safe_load((DOCUMENTS / f"{name}.yaml").read_text())


def _option(parameter: str) -> str:
    return "--" + re.sub(r"(?<!^)([A-Z])", r"-\1", parameter).lower()


@pytest.mark.parametrize(
    ("name", "verb", "parser"),
    [
        ("ConfigureTunnel", "configure-tunnel", tunnel.configure_parser),
        ("RestartTunnel", "restart-tunnel", tunnel.restart_parser),
    ],
)
def test_each_document_passes_every_parameter_to_its_verb(name, verb, parser):
    """The document runs its verb with every parameter, each once, as the option of the same
    name; the verb's defaults are the document's, its patterns the document's allowedPatterns."""
    document = _document(name)
    (script,) = document["mainSteps"][0]["inputs"]["runCommand"]
    assert f'exec python3 "$pkg" {verb} ' in script
    invocation = script[script.index(f'exec python3 "$pkg" {verb} ') :]
    passed = re.findall(r'(--[a-z-]+) "\{\{ (\w+) \}\}"', invocation)
    assert sorted(p for _, p in passed) == sorted(document["parameters"])
    actions = {a.option_strings[0]: a for a in parser()._actions}
    for option, parameter in passed:
        assert option == _option(parameter) and option in actions, (option, parameter)
        spec, action = document["parameters"][parameter], actions[option]
        if "default" in spec:
            assert action.default == spec["default"], parameter
        else:
            assert action.required, parameter
        if parameter in tunnel.PATTERNS:
            assert spec["allowedPattern"] == f"^({tunnel.PATTERNS[parameter]})$" or (
                spec["allowedPattern"] == f"^{tunnel.PATTERNS[parameter]}$"
            ), parameter
        if action.choices:
            assert spec["allowedPattern"] == f"^({'|'.join(action.choices)})$", parameter
    # Nothing of the old script stays in the document.
    assert "swanctl" not in invocation and "TN_" not in script.replace("TN_CLOUD_INIT", "")


@pytest.mark.parametrize("name", ["ConfigureTunnel", "RestartTunnel"])
def test_documents_fit_in_8_kb(name):
    assert len(json.dumps(_document(name))) <= 8 * 1024


def test_the_verb_imports_only_the_standard_library_boto3_and_the_core():
    assert third_party_imports(REPO / "gateway" / "tunnelnat_gateway" / "tunnel.py") <= {
        "boto3",
        "tunnelnat",
    }


def test_the_entry_point_runs_the_verbs(gw):
    """Through ``python3 -m tunnelnat_gateway`` as the documents exec it: the JSON line on
    stdout, the failure on stderr, the exit code."""
    (gw.fake / "raw").write_text(RECEIVING_RAW)
    env = {
        **gw.env,
        "PYTHONPATH": f"{REPO / 'gateway'}:{REPO / 'lambdas'}",
        "PATH": f"{gw.fake / 'bin'}:/usr/bin:/bin",
    }
    ok = subprocess.run(  # noqa: S603
        [sys.executable, "-m", "tunnelnat_gateway", "restart-tunnel", "--wait-seconds", "2"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["skipped"] == "healthy"
    bad = subprocess.run(  # noqa: S603
        [sys.executable, "-m", "tunnelnat_gateway", "configure-tunnel", "--charon-log", "/etc/x"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode != 0 and bad.stdout == ""
    assert bad.stderr.startswith("ConfigureTunnel: ") and bad.stderr.count("\n") == 1
    assert not os.path.exists("/etc/x")


# -- several tunnels on one gateway (issue 23) ---------------------------------------------------

BANK = {
    "tunnel_name": "bank",
    "partner_endpoint": "198.51.100.60",
    "partner_networks": "10.0.0.0/24",
    "public_addresses": "203.0.113.20",
    "psk_secret_name": "tunnelnat/bank-psk",
}


def snapshot(gw: Gateway, *paths: str) -> dict[str, tuple[str, int]]:
    out = {}
    for path in paths:
        f = gw.file(path)
        out[path] = (f.read_text(), f.stat().st_mtime_ns)
    return out


A_FILES = (
    "/etc/swanctl/conf.d/tunnelnat-partner.conf",
    "/etc/swanctl/conf.d/tunnelnat-partner.secret.conf",
    "/etc/tunnelnat/tunnels/partner.json",
    "/etc/tunnelnat/tunnels/partner.config-id",
    "/etc/tunnelnat/tunnels/partner.charon",
)


def test_each_tunnel_has_its_own_files_and_a_run_for_one_never_rewrites_the_others(gw):
    assert configure(gw)[0] == 0
    before = snapshot(gw, *A_FILES)
    gw.conns("partner", "bank")
    gw.forget_calls()
    code, report, err = configure(gw, **BANK, dpd="10,20")
    assert code == 0, err
    assert report["tunnel"] == "bank" and report["swanctl_changed"] is True
    assert snapshot(gw, *A_FILES) == before  # not even rewritten with the same bytes
    conf_d = gw.file("/etc/swanctl/conf.d")
    assert sorted(p.name for p in conf_d.iterdir()) == [
        "tunnelnat-bank.conf",
        "tunnelnat-bank.secret.conf",
        "tunnelnat-partner.conf",
        "tunnelnat-partner.secret.conf",
    ]
    # Each key in a section of its own: two sections of one name in two files would merge.
    assert "ike-tunnelnat-bank {" in (conf_d / "tunnelnat-bank.secret.conf").read_text()
    assert "ike-tunnelnat-partner {" in (conf_d / "tunnelnat-partner.secret.conf").read_text()
    assert (conf_d / "tunnelnat-bank.secret.conf").stat().st_mode & 0o777 == 0o600
    assert "remote_addrs = 198.51.100.60" in (conf_d / "tunnelnat-bank.conf").read_text()
    # charon's settings are shared: the smallest DPD timeout (20 s: 4 retransmits at 4 s).
    settings = gw.file("/etc/strongswan.d/tunnelnat.conf").read_text()
    assert "retransmit_timeout = 4\n" in settings and "--reload-settings" in gw.calls()
    # Re-running A after B keeps B's budget: the settings are every tunnel's, not the last's.
    gw.forget_calls()
    assert configure(gw)[1]["swanctl_changed"] is False
    assert gw.file("/etc/strongswan.d/tunnelnat.conf").read_text() == settings
    assert "--reload-settings" not in gw.calls()


def test_a_changed_tunnel_restarts_only_its_own_ike_sa(gw):
    configure(gw)
    gw.conns("partner", "bank")
    configure(gw, **BANK)
    # The fake lists the same SAs for any --ike: both tunnels' IKE SAs are up.
    both = ESTABLISHED_PLAIN + ESTABLISHED_PLAIN.replace("partner", "bank")
    (gw.fake / "plain").write_text(both)
    (gw.fake / "comes-up").write_text(both)
    gw.forget_calls()
    gw.secret = PSK + "-bank-rotated"
    code, report, _ = configure(gw, **BANK)
    assert code == 0 and report["restarted"] is True
    cut = [c for c in gw.calls() if c.startswith(("--terminate", "--initiate"))]
    assert cut == [
        "--terminate --ike bank --force",
        "--initiate --child bank --ike bank --timeout -1",
    ]


def test_children_are_read_from_the_tunnels_own_connection_only(gw):
    """A tunnel named partner-2 has a child partner-2, as tunnel partner's second per-pair
    child would: only partner's own lines count (and a tunnel named local is no child)."""
    (gw.fake / "conns").write_text(
        "partner: IKEv2, no reauthentication, rekeying every 14400s\n"
        "  local:  %any\n"
        "  partner: TUNNEL, rekeying every 3600s\n"
        "partner-2: IKEv2, no reauthentication, rekeying every 14400s\n"
        "  local:  %any\n"
        "  partner-2: TUNNEL, rekeying every 3600s\n"
    )
    assert tunnel.Sas(gw.host(), "partner").children() == ["partner"]
    assert tunnel.Sas(gw.host(), "partner-2").children() == ["partner-2"]
    assert tunnel.Sas(gw.host(), "local").children() == ["local"]  # the default: its name


def legacy_layout(gw: Gateway, psk: str = PSK) -> None:
    """The single-tunnel layout as the version before issue 23 left it: what it rendered into
    conf.d/tunnelnat.conf and conf.d/tunnelnat-secret.conf (key in section ike-tunnelnat)."""
    configure(gw)
    conf_d = gw.file("/etc/swanctl/conf.d")
    (conf_d / "tunnelnat-partner.conf").rename(conf_d / "tunnelnat.conf")
    (conf_d / "tunnelnat-partner.secret.conf").unlink()
    legacy = tunnel.secret_conf("198.51.100.10 198.51.100.40", psk)
    (conf_d / "tunnelnat-secret.conf").write_text(legacy)
    gw.file("/etc/tunnelnat/tunnels/partner.charon").unlink()
    gw.forget_calls()


def test_the_single_tunnel_layout_moves_to_the_tunnels_files_without_a_restart(gw):
    legacy_layout(gw)
    token = gw.file("/etc/tunnelnat/tunnels/partner.config-id").read_text()
    code, report, _ = configure(gw)
    assert code == 0
    assert report["swanctl_changed"] is False and report["restarted"] is False
    assert gw.file("/etc/tunnelnat/tunnels/partner.config-id").read_text() == token
    conf_d = gw.file("/etc/swanctl/conf.d")
    assert sorted(p.name for p in conf_d.iterdir()) == [
        "tunnelnat-partner.conf",
        "tunnelnat-partner.secret.conf",
    ]
    assert not any(c.startswith(("--terminate", "--initiate")) for c in gw.calls())


def test_a_migration_with_a_new_key_is_a_change(gw):
    legacy_layout(gw, psk="an-older-key-of-twenty-chars")
    code, report, _ = configure(gw)
    assert code == 0 and report["swanctl_changed"] is True and report["restarted"] is True
    assert not gw.file("/etc/swanctl/conf.d/tunnelnat-secret.conf").exists()


def test_another_tunnel_leaves_the_single_tunnel_layout_to_its_own_run(gw):
    legacy_layout(gw)
    gw.conns("partner", "bank")
    assert configure(gw, **BANK)[0] == 0
    conf_d = gw.file("/etc/swanctl/conf.d")
    assert (conf_d / "tunnelnat.conf").exists() and (conf_d / "tunnelnat-secret.conf").exists()
    # A tunnel named "secret" would write over that layout's key file: refused until then.
    code, _, err = configure(gw, **{**BANK, "tunnel_name": "secret"})
    assert code == 1 and "holds tunnel partner's key: configure partner first" in err


def test_libipsec_lo_addresses_are_each_tunnels_own(gw):
    (gw.fake / "stats").write_text("loaded plugins: charon kernel-libipsec\n")
    assert configure(gw, ipsec_backend="libipsec")[0] == 0
    gw.conns("partner", "bank")
    assert configure(gw, **BANK, ipsec_backend="libipsec")[0] == 0
    state = gw.file("/etc/tunnelnat")
    assert (state / "lo-addresses").read_text() == "203.0.113.10\n203.0.113.11\n203.0.113.20\n"
    assert (state / "tunnels" / "bank.lo-addresses").read_text() == "203.0.113.20\n"
    assert not [c for c in gw.ip_calls() if c.startswith("addr del")]  # A's stay on lo
    # B moves to another address: only B's old one goes; one A also uses stays.
    gw.forget_calls()
    assert configure(gw, **{**BANK, "public_addresses": "203.0.113.11"},
                     ipsec_backend="libipsec")[0] == 0  # fmt: skip
    assert [c for c in gw.ip_calls() if c.startswith("addr del")] == [
        "addr del 203.0.113.20/32 dev lo"
    ]
    assert (state / "lo-addresses").read_text() == "203.0.113.10\n203.0.113.11\n"


def test_another_tunnels_first_run_keeps_the_single_tunnel_layouts_lo_addresses(gw):
    """The single-tunnel layout listed only the union (/etc/tunnelnat/lo-addresses): those are
    its tunnel's until that tunnel's own run; another tunnel's first run never removes them."""
    (gw.fake / "stats").write_text("loaded plugins: charon kernel-libipsec\n")
    legacy_layout(gw)
    state = gw.file("/etc/tunnelnat")
    (state / "tunnels" / "partner.lo-addresses").unlink()
    (state / "lo-addresses").write_text("203.0.113.10\n203.0.113.11\n")
    gw.conns("partner", "bank")
    assert configure(gw, **BANK, ipsec_backend="libipsec")[0] == 0
    assert not [c for c in gw.ip_calls() if c.startswith("addr del")]
    assert (state / "lo-addresses").read_text() == "203.0.113.10\n203.0.113.11\n203.0.113.20\n"
    # partner's own run claims them; moved to one address, the other goes.
    gw.forget_calls()
    assert configure(gw, public_addresses="203.0.113.10", ipsec_backend="libipsec")[0] == 0
    assert [c for c in gw.ip_calls() if c.startswith("addr del")] == [
        "addr del 203.0.113.11/32 dev lo"
    ]
    assert (state / "tunnels" / "partner.lo-addresses").read_text() == "203.0.113.10\n"
    assert (state / "lo-addresses").read_text() == "203.0.113.10\n203.0.113.20\n"


def test_ike_version_1_is_rendered_and_checked(gw):
    code, _, err = configure(gw, ike_version="1")
    assert code == 1 and "IKEv1 negotiates one selector pair per CHILD_SA" in err
    gw.conns("partner-1", "partner-2")
    assert configure(gw, ike_version="1", selector_layout="per-pair")[0] == 0
    conf = gw.file("/etc/swanctl/conf.d/tunnelnat-partner.conf").read_text()
    assert "version = 1" in conf and "aggressive = no" in conf
    refused(Gateway(gw.root.parent / "other"), "invalid choice", ike_version="3")
