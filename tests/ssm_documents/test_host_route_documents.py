"""AddHostRoute and RemoveHostRoute through the agent-faithful runner (dash as ``sh``), on a
throwaway "instance": a private network namespace with the interface that reaches G, and a private
mount namespace whose /etc is an overlay and whose /run/systemd says systemd is running, with
``networkctl`` and ``systemctl`` answering as on Ubuntu 24.04 (captured ``networkctl status``).

The lab (tests/lab) runs the same documents on machines without systemd: the oneshot-unit path.
This covers the networkd path: the drop-in written, networkd reloaded once, the unit of an
earlier run removed, a second run changing nothing, and RemoveHostRoute taking it all away.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STATUS = REPO / "tests" / "unit" / "data" / "networkctl" / "ubuntu2404-ens5.txt"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0
    or not shutil.which("unshare")
    or not shutil.which("ip")
    or not Path("/run/systemd").is_dir(),
    reason="needs root, unshare, ip and a /run/systemd to mount over",
)

# Runs inside the namespaces: the real runner, the real documents, stand-ins for systemd's tools.
DRIVER = textwrap.dedent(
    """
    import json, subprocess, sys
    from pathlib import Path
    from lab.ssm_runner import AGENT_PATH, run_document

    work = Path(sys.argv[1])
    env = {"PATH": f"{work}/stubs:{AGENT_PATH}"}
    params = {
        "Destinations": "192.0.2.0/24,198.51.100.0/28", "Gateway": "10.10.1.5",
        "Deployment": "acme",
    }
    # Another deployment on the same instance: its own G, its own partner network.
    other = {"Destinations": "198.18.0.0/24", "Gateway": "10.10.1.6", "Deployment": "other"}
    docs = Path("ssm_documents")
    netd = Path("/etc/systemd/network/10-netplan-ens5.network.d")
    dropin = netd / "tunnelnat-acme.conf"
    other_dropin = netd / "tunnelnat-other.conf"
    unit = Path("/etc/systemd/system/tunnelnat-routes.service")
    legacy = Path("/etc/tunnelnat/routes")
    state = Path("/etc/tunnelnat/routes.d")

    def step(document, parameters=params):
        inv = run_document(docs / f"{document}.yaml", parameters, env=env, timeout=60)
        log = work / "calls.log"
        calls = log.read_text().splitlines() if log.exists() else []
        log.write_text("")
        routes = subprocess.run(["ip", "-4", "route", "show"], capture_output=True, text=True)
        return {
            "status": inv.status,
            "stdout": inv.stdout,
            "stderr": inv.stderr,
            "calls": calls,
            "routes": sorted(line.strip() for line in routes.stdout.splitlines()),
            "dropin": dropin.read_text() if dropin.exists() else None,
            "other_dropin": other_dropin.exists(),
            "unit": unit.exists(),
            "legacy": legacy.read_text() if legacy.exists() else None,
            "state": sorted(p.name for p in state.iterdir()) if state.is_dir() else [],
        }

    def ip(*args):
        subprocess.run(["ip", *args], check=True)

    # An earlier version's single file, written by another deployment (its G): A's run took it
    # as its own and deleted the route in it (issue 21, finding 4). Then one of A's own.
    Path("/etc/tunnelnat").mkdir(exist_ok=True)
    ip("route", "add", "198.51.100.64/26", "via", "10.10.1.99")
    legacy.write_text("198.51.100.64/26 via 10.10.1.99\\n")
    results = {"legacy_theirs": step("AddHostRoute")}
    legacy.unlink()
    ip("route", "del", "198.51.100.64/26", "via", "10.10.1.99")
    subprocess.run(["rm", "-rf", str(state)], check=True)
    ip("route", "add", "203.0.113.0/24", "via", "10.10.1.5")
    legacy.write_text("203.0.113.0/24 via 10.10.1.5\\n192.0.2.0/24 via 10.10.1.5\\n")
    results["without_systemd"] = step("AddHostRoute")
    Path("/run/systemd/system").mkdir()
    results["networkd"] = step("AddHostRoute")
    results["again"] = step("AddHostRoute")
    results["other_add"] = step("AddHostRoute", other)
    results["acme_again"] = step("AddHostRoute")
    results["remove"] = step("RemoveHostRoute")
    results["remove_again"] = step("RemoveHostRoute")
    results["other_remove"] = step("RemoveHostRoute", other)
    print(json.dumps(results))
    """
)

SETUP = textwrap.dedent(
    """
    set -e
    ip link set lo up
    ip link add ens5 type veth peer name ens5-peer
    ip link set ens5-peer up
    ip addr add 10.10.1.20/24 dev ens5
    ip link set ens5 up
    mount -t overlay tn-etc -o "lowerdir=/etc,upperdir=$WORK/upper,workdir=$WORK/ovl" /etc
    mount -t tmpfs tn-run-systemd /run/systemd
    exec "$PYTHON" -c "$DRIVER" "$WORK"
    """
)

NETWORKCTL = """#!/bin/bash
echo "networkctl $*" >> "{work}/calls.log"
case "$1" in
  status) cat "{status}" ;;
  reload) ;;
  *) exit 1 ;;
esac
"""
SYSTEMCTL = """#!/bin/bash
echo "systemctl $*" >> "{work}/calls.log"
"""


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    work = tmp_path_factory.mktemp("instance")
    for sub in ("upper", "ovl", "stubs"):
        (work / sub).mkdir()
    for name, text in (("networkctl", NETWORKCTL), ("systemctl", SYSTEMCTL)):
        stub = work / "stubs" / name
        stub.write_text(text.format(work=work, status=STATUS))
        stub.chmod(0o755)
    env = {
        **os.environ,
        "WORK": str(work),
        "DRIVER": DRIVER,
        "PYTHON": str(REPO / ".venv" / "bin" / "python"),
        "PYTHONPATH": f"{REPO}:{REPO / 'lambdas'}",
    }
    done = subprocess.run(
        ["unshare", "--mount", "--net", "--propagation", "private", "bash", "-c", SETUP],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


OUR_ROUTES = ["192.0.2.0/24 via 10.10.1.5 dev ens5", "198.51.100.0/28 via 10.10.1.5 dev ens5"]
OTHER_ROUTE = "198.18.0.0/24 via 10.10.1.6 dev ens5"


def test_an_earlier_versions_file_of_another_deployment_is_left_alone(results):
    """b08b1c8: one /etc/tunnelnat/routes for every deployment, and whatever in it A did not
    want was deleted: another deployment's routes went."""
    run = results["legacy_theirs"]
    assert run["status"] == "Success", run["stderr"]
    assert "198.51.100.64/26 via 10.10.1.99 dev ens5" in run["routes"]
    assert run["legacy"] == "198.51.100.64/26 via 10.10.1.99\n", "not ours: kept as it is"
    assert run["state"] == ["acme"]


def test_an_earlier_versions_file_of_ours_is_migrated(results):
    run = results["without_systemd"]
    assert run["legacy"] is None and run["state"] == ["acme"]
    assert not any(r.startswith("203.0.113.0/24") for r in run["routes"]), "no longer wanted"


def test_two_deployments_never_undo_each_others_routes(results):
    both = results["acme_again"]
    assert both["status"] == "Success", both["stderr"]
    assert set(OUR_ROUTES) | {OTHER_ROUTE} <= set(both["routes"])
    assert both["other_dropin"] and both["dropin"] is not None
    assert both["state"] == ["acme", "other"]
    removed = results["remove"]
    assert OTHER_ROUTE in removed["routes"], "acme's RemoveHostRoute left other's route"
    assert removed["other_dropin"] and removed["state"] == ["other"]
    last = results["other_remove"]
    assert last["status"] == "Success", last["stderr"]
    assert OTHER_ROUTE not in last["routes"] and not last["other_dropin"]
    assert last["state"] == [] and not last["unit"]


def test_without_systemd_the_oneshot_unit_persists_the_routes(results):
    first = results["without_systemd"]
    assert first["status"] == "Success", first["stderr"]
    assert json.loads(first["stdout"])["persistence"] == "unit"
    assert first["unit"] and first["dropin"] is None
    assert first["calls"] == []  # neither networkctl nor systemctl without systemd
    assert set(OUR_ROUTES) <= set(first["routes"])


def test_with_networkd_the_routes_go_into_its_own_configuration(results):
    run = results["networkd"]
    assert run["status"] == "Success", run["stderr"]
    assert json.loads(run["stdout"])["persistence"] == "networkd"
    assert run["dropin"] == (
        "# tunnelnat (AddHostRoute): the partner's networks via the VPN gateway.\n"
        "# Rewritten by AddHostRoute, deleted by RemoveHostRoute; do not edit.\n"
        "\n[Route]\nDestination=192.0.2.0/24\nGateway=10.10.1.5\n"
        "\n[Route]\nDestination=198.51.100.0/28\nGateway=10.10.1.5\n"
    )
    assert not run["unit"]  # the earlier run's unit would be a second, foreign, copy
    assert run["calls"] == [
        "networkctl status --no-pager --lines=0 ens5",
        "networkctl reload",
        "systemctl daemon-reload",
    ]
    assert set(OUR_ROUTES) <= set(run["routes"])


def test_a_second_run_changes_nothing(results):
    again = results["again"]
    assert again["status"] == "Success", again["stderr"]
    assert again["dropin"] == results["networkd"]["dropin"]
    assert again["calls"] == ["networkctl status --no-pager --lines=0 ens5"]  # no reload


def test_remove_takes_the_dropin_and_the_routes(results):
    removed = results["remove"]
    assert removed["status"] == "Success", removed["stderr"]
    assert removed["dropin"] is None and not removed["unit"]
    assert "networkctl reload" in removed["calls"]
    assert not set(OUR_ROUTES) & set(removed["routes"])
    assert json.loads(removed["stdout"])["dropins"] == 1
    twice = results["remove_again"]
    assert twice["status"] == "Success", twice["stderr"]
    assert json.loads(twice["stdout"])["dropins"] == 0
    assert "networkctl reload" not in twice["calls"]
