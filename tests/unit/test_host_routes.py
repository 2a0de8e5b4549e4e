"""The instance's route persistence (instance/tunnelnat_routes.py, embedded in AddHostRoute):
the networkd drop-in it writes on Amazon Linux 2023 and on Ubuntu 24.04 (netplan), from captured
``networkctl status`` output, and what it does around it (reload once, idempotent, fall back)."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DATA = Path(__file__).parent / "data" / "networkctl"
sys.path.insert(0, str(REPO / "instance"))
import tunnelnat_routes as routes  # noqa: E402

G = ipaddress.IPv4Address("10.10.1.5")
NETS = [ipaddress.IPv4Network("192.0.2.0/24"), ipaddress.IPv4Network("198.51.100.0/28")]
ROUTE_GET = "10.10.1.5 dev ens5 src 10.10.1.20 uid 0 \\    cache \n"
EXPECTED_DROPIN = """\
# tunnelnat (AddHostRoute): the partner's networks via the VPN gateway.
# Rewritten by AddHostRoute, deleted by RemoveHostRoute; do not edit.

[Route]
Destination=192.0.2.0/24
Gateway=10.10.1.5

[Route]
Destination=198.51.100.0/28
Gateway=10.10.1.5
"""


class FakeHost:
    """``ip`` and ``networkctl`` as an instance answers them; records every call."""

    def __init__(self, status_file: str | None, *, reload_rc: int = 0, status_rc: int = 0):
        self.status = (DATA / status_file).read_text() if status_file else ""
        self.reload_rc = reload_rc
        self.status_rc = status_rc
        self.calls: list[list[str]] = []

    def __call__(self, argv: Sequence[str]) -> subprocess.CompletedProcess:
        argv = list(argv)
        self.calls.append(argv)
        if argv[:2] == ["ip", "-o"]:
            return subprocess.CompletedProcess(argv, 0, ROUTE_GET, "")
        if argv[:2] == ["networkctl", "status"]:
            err = "" if self.status_rc == 0 else "Failed to connect to system bus"
            return subprocess.CompletedProcess(argv, self.status_rc, self.status, err)
        if argv == ["networkctl", "reload"]:
            err = "" if self.reload_rc == 0 else "Failed to reload"
            return subprocess.CompletedProcess(argv, self.reload_rc, "", err)
        raise AssertionError(f"unexpected command {argv}")

    @property
    def reloads(self) -> int:
        return self.calls.count(["networkctl", "reload"])


@pytest.mark.parametrize(
    ("sample", "network_file"),
    [
        # amazon-ec2-net-utils links 70-IF.network to 80-ec2.network, with its own drop-ins.
        ("al2023-ens5.txt", "/run/systemd/network/70-ens5.network"),
        # netplan renders its YAML (cloud-init's 50-cloud-init.yaml) into /run at boot.
        ("ubuntu2404-ens5.txt", "/run/systemd/network/10-netplan-ens5.network"),
    ],
)
def test_the_dropin_for_each_image(sample, network_file, tmp_path):
    host = FakeHost(sample)
    report = routes.persist(G, NETS, deployment="acme", etc_dir=tmp_path, run=host, systemd=True)
    name = Path(network_file).name
    dropin = tmp_path / f"{name}.d" / "tunnelnat-acme.conf"
    assert report == {
        "persistence": "networkd",
        "device": "ens5",
        "network_file": network_file,
        "dropin": str(dropin),
        "changed": True,
        "removed": [],
    }
    assert dropin.read_text() == EXPECTED_DROPIN
    assert dropin.stat().st_mode & 0o777 == 0o644
    assert ["networkctl", "status", "--no-pager", "--lines=0", "ens5"] in host.calls
    assert host.reloads == 1


def test_a_second_run_changes_nothing_and_does_not_reload(tmp_path):
    host = FakeHost("ubuntu2404-ens5.txt")
    routes.persist(G, NETS, deployment="acme", etc_dir=tmp_path, run=host, systemd=True)
    again = routes.persist(
        G, list(reversed(NETS)), deployment="acme", etc_dir=tmp_path, run=host, systemd=True
    )
    assert again["changed"] is False
    assert host.reloads == 1  # a reload reconfigures the interface: only when something changed


def test_new_networks_rewrite_the_dropin_and_reload(tmp_path):
    host = FakeHost("al2023-ens5.txt")
    routes.persist(G, NETS, deployment="acme", etc_dir=tmp_path, run=host, systemd=True)
    report = routes.persist(
        G, NETS[:1], deployment="acme", etc_dir=tmp_path, run=host, systemd=True
    )
    assert report["changed"] is True and host.reloads == 2
    assert "198.51.100.0/28" not in Path(report["dropin"]).read_text()


def test_a_dropin_for_another_network_file_is_removed(tmp_path):
    """The interface's .network file changed name (a new netplan ID, another image's tool):
    the old drop-in would keep routes networkd no longer needs from us."""
    old = tmp_path / "10-netplan-eth0.network.d" / "tunnelnat-acme.conf"
    old.parent.mkdir()
    old.write_text(EXPECTED_DROPIN)
    theirs = tmp_path / "10-netplan-eth0.network.d" / "other.conf"
    host = FakeHost("ubuntu2404-ens5.txt")
    theirs.write_text("[Network]\n")
    report = routes.persist(G, NETS, deployment="acme", etc_dir=tmp_path, run=host, systemd=True)
    assert report["removed"] == [str(old)]
    assert not old.exists() and theirs.exists()  # only our file goes
    assert routes.existing_dropins("acme", tmp_path) == [Path(report["dropin"])]


def test_an_unmanaged_interface_falls_back(tmp_path):
    host = FakeHost("unmanaged-docker0.txt")
    report = routes.persist(G, NETS, deployment="acme", etc_dir=tmp_path, run=host, systemd=True)
    assert report["persistence"] == "none" and report["reason"] == "not managed by networkd"
    assert not list(tmp_path.iterdir()) and host.reloads == 0


def test_no_networkd_falls_back(tmp_path):
    host = FakeHost(None, status_rc=1)
    report = routes.persist(G, NETS, deployment="acme", etc_dir=tmp_path, run=host, systemd=True)
    assert report["persistence"] == "none" and "Failed to connect" in report["reason"]
    assert not list(tmp_path.iterdir())


def test_no_systemd_touches_nothing(tmp_path):
    host = FakeHost("al2023-ens5.txt")
    report = routes.persist(G, NETS, deployment="acme", etc_dir=tmp_path, run=host, systemd=False)
    assert report == {"persistence": "none", "reason": "systemd is not running"}
    assert host.calls == []


def test_a_failed_reload_leaves_no_file_networkd_has_not_seen(tmp_path):
    host = FakeHost("al2023-ens5.txt", reload_rc=1)
    with pytest.raises(routes.RouteError, match="reload failed"):
        routes.persist(G, NETS, deployment="acme", etc_dir=tmp_path, run=host, systemd=True)
    assert routes.existing_dropins("acme", tmp_path) == []
    # The next run writes and reloads again.
    host.reload_rc = 0
    assert routes.persist(G, NETS, deployment="acme", etc_dir=tmp_path, run=host, systemd=True)[
        "changed"
    ]


@pytest.mark.parametrize(
    "text",
    [
        "192.0.2.1/24",  # host bits set
        "192.0.2.0/24,",
        "192.0.2.0/24;reboot",
        "192.0.2.0/24\n[Route]",
        "2001:db8::/32",
        ",".join(f"10.{i}.0.0/16" for i in range(33)),
    ],
)
def test_bad_destinations_never_reach_a_file(text):
    with pytest.raises(routes.RouteError):
        routes.parse_destinations(text)


@pytest.mark.parametrize("text", ["10.10.1.5\nGateway=1.2.3.4", "10.10.1", "::1", ""])
def test_bad_gateways_never_reach_a_file(text):
    with pytest.raises(routes.RouteError):
        routes.parse_gateway(text)


@pytest.mark.parametrize(
    "status",
    [
        "Network File: /run/systemd/network/../../etc/passwd",
        "Network File: relative.network",
        "Network File: /run/systemd/network/a b.network",
        "Network File: /run/systemd/network/x.conf",
    ],
)
def test_odd_network_files_are_refused(status):
    with pytest.raises(routes.RouteError):
        routes.parse_network_file(status)


def test_parsers():
    assert routes.parse_route_get(ROUTE_GET) == "ens5"
    with pytest.raises(routes.RouteError):
        routes.parse_route_get("10.10.1.5 via 10.10.1.1 src 10.10.1.20")
    with pytest.raises(routes.RouteError):
        routes.parse_route_get("10.10.1.5 dev ../x src 1.2.3.4")
    assert routes.parse_network_file("") is None
    assert routes.parse_destinations("198.51.100.0/28,192.0.2.0/24,192.0.2.0/24") == NETS


def test_the_command_line_reports_and_exits_by_outcome(tmp_path, monkeypatch, capsys):
    host = FakeHost("ubuntu2404-ens5.txt")
    monkeypatch.setattr(routes, "run_command", host)
    monkeypatch.setattr(routes, "systemd_is_running", lambda: True)
    args = ["persist", "--gateway", str(G), "--destinations", "192.0.2.0/24,198.51.100.0/28"]
    args += ["--deployment", "acme"]
    assert routes.main([*args, "--etc-dir", str(tmp_path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["persistence"] == "networkd"
    host.status = (DATA / "unmanaged-docker0.txt").read_text()
    assert routes.main([*args, "--etc-dir", str(tmp_path / "other")]) == routes.NOT_MANAGED
    bad = ["persist", "--gateway", "x", "--destinations", "192.0.2.0/24", "--deployment", "a1"]
    assert routes.main(bad) == 2


# -- issue 21, finding 4: per-deployment state on the instance --------------------------------
def test_another_deployments_dropin_is_never_touched(tmp_path):
    """b08b1c8: one tunnelnat.conf for every deployment, and every other one removed as stale:
    A's AddHostRoute deleted B's persisted routes."""
    theirs = tmp_path / "10-netplan-ens5.network.d" / "tunnelnat-other.conf"
    theirs.parent.mkdir()
    theirs.write_text("[Route]\nDestination=198.18.0.0/24\nGateway=10.10.1.99\n")
    host = FakeHost("ubuntu2404-ens5.txt")
    report = routes.persist(G, NETS, deployment="acme", etc_dir=tmp_path, run=host, systemd=True)
    assert report["removed"] == [] and theirs.exists()
    assert Path(report["dropin"]).name == "tunnelnat-acme.conf"


def test_an_earlier_versions_dropin_is_taken_over_only_when_all_its_routes_are_ours(tmp_path):
    ours = tmp_path / "10-netplan-ens5.network.d" / "tunnelnat.conf"
    ours.parent.mkdir()
    ours.write_text(EXPECTED_DROPIN)  # every Gateway= is our G
    theirs = tmp_path / "70-ens6.network.d" / "tunnelnat.conf"
    theirs.parent.mkdir()
    theirs.write_text("[Route]\nDestination=198.18.0.0/24\nGateway=10.10.1.99\n")
    host = FakeHost("ubuntu2404-ens5.txt")
    report = routes.persist(G, NETS, deployment="acme", etc_dir=tmp_path, run=host, systemd=True)
    assert report["removed"] == [str(ours)] and not ours.exists()
    assert theirs.exists(), "another G: another deployment's"


@pytest.mark.parametrize("name", ["..", ".", "a/b", "Acme", "x", "-ab", "a" * 31])
def test_a_deployment_name_that_could_climb_out_is_refused(name, tmp_path):
    with pytest.raises(routes.RouteError):
        routes.dropin_name(name)
    args = ["persist", "--gateway", str(G), "--destinations", "192.0.2.0/24"]
    assert routes.main([*args, f"--deployment={name}", "--etc-dir", str(tmp_path)]) == 2
