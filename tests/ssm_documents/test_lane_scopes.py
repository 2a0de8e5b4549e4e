"""A several-partner deployment's lanes on one instance (issue 23): AddHostRoute and
RemoveHostRoute take ``Deployment=<deployment>.<partner>`` (core/lanes.py ``route_scope``), each
partner's routes have their own state file and drop-in, and one partner's removal never takes
another partner's routes, although both go via the same G.

The documents run through the agent-faithful runner (dash as ``sh``) in a private network and
mount namespace, as tests/ssm_documents/test_host_route_documents.py (whose stand-ins for
systemd's tools this reuses).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.ssm_documents.test_host_route_documents import NETWORKCTL, STATUS, SYSTEMCTL
from tunnelnat.core.lanes import route_scope

REPO = Path(__file__).resolve().parents[2]
DOCUMENTS = ("AddHostRoute", "RemoveHostRoute")

sys.path.insert(0, str(REPO / "instance"))
import tunnelnat_routes  # noqa: E402

GOOD = ["tunnelnat", "acme-2", "acme.bank-a", "acme.b2", route_scope("acme", "clearing-house")]
BAD = ["", "acme.", ".acme", "acme..bank", "acme.bank.x", "acme.Bank", "acme.b", "acme.-b",
       "acme.bank-", "acme/bank", "acme.bank;x", "a" * 31 + ".bank",
       "acme." + "b" * 25]  # fmt: skip


def _pattern(document: str) -> str:
    import yaml

    text = (REPO / "ssm_documents" / f"{document}.yaml").read_text()
    return yaml.safe_load(text)["parameters"]["Deployment"]["allowedPattern"]


@pytest.mark.parametrize("document", DOCUMENTS)
def test_the_documents_take_a_partners_scope(document):
    pattern = _pattern(document)
    for good in GOOD:
        assert re.fullmatch(pattern, good), good
    for bad in BAD:
        assert not re.fullmatch(pattern, bad), bad


def test_the_route_helper_takes_what_the_documents_take():
    """The script embedded in AddHostRoute names its drop-in from the scope: the same names."""
    for good in GOOD:
        assert tunnelnat_routes.dropin_name(good) == f"tunnelnat-{good}.conf"
        assert tunnelnat_routes.is_partner_scope(good) == ("." in good)
    for bad in BAD:
        with pytest.raises(tunnelnat_routes.RouteError):
            tunnelnat_routes.parse_deployment(bad)


def test_a_partners_scope_never_takes_over_an_earlier_versions_dropin(tmp_path):
    """Every partner of a deployment routes via the same G: the earlier versions' single
    drop-in, all of whose routes go via G, may hold another partner's routes."""
    network = Path("/run/systemd/network/10-netplan-ens5.network")
    netd = tmp_path / f"{network.name}.d"
    netd.mkdir()
    legacy = netd / "tunnelnat.conf"
    legacy.write_text("[Route]\nDestination=198.51.100.0/24\nGateway=10.10.1.5\n")
    calls: list[list[str]] = []

    def run(argv):
        calls.append(list(argv))
        out = {"ip": "10.10.1.5 dev ens5 src 10.10.1.20", "networkctl": STATUS.read_text()}
        return subprocess.CompletedProcess(argv, 0, out.get(argv[0], ""), "")

    report = tunnelnat_routes.persist(
        tunnelnat_routes.parse_gateway("10.10.1.5"),
        tunnelnat_routes.parse_destinations("192.0.2.0/24"),
        deployment="acme.bank-a",
        etc_dir=tmp_path,
        run=run,
        systemd=True,
    )
    assert report["dropin"] == str(netd / "tunnelnat-acme.bank-a.conf")
    assert report["removed"] == [] and legacy.exists()


# -- two lanes on one instance, in namespaces ----------------------------------------------------

DRIVER = textwrap.dedent(
    """
    import json, subprocess, sys
    from pathlib import Path
    from lab.ssm_runner import AGENT_PATH, run_document

    work = Path(sys.argv[1])
    env = {"PATH": f"{work}/stubs:{AGENT_PATH}"}
    gateway = "10.10.1.5"
    # Partner A by its real network; partner C (overlapping A) through its alias.
    lane_a = {"Destinations": "192.0.2.0/24", "Gateway": gateway, "Deployment": "acme.bank-a"}
    lane_c = {"Destinations": "100.64.1.0/24", "Gateway": gateway, "Deployment": "acme.bank-c"}
    docs = Path("ssm_documents")
    netd = Path("/etc/systemd/network/10-netplan-ens5.network.d")
    legacy = Path("/etc/tunnelnat/routes")
    legacy_dropin = netd / "tunnelnat.conf"
    state = Path("/etc/tunnelnat/routes.d")

    def step(document, parameters):
        inv = run_document(docs / f"{document}.yaml", parameters, env=env, timeout=60)
        routes = subprocess.run(["ip", "-4", "route", "show"], capture_output=True, text=True)
        return {
            "status": inv.status,
            "stdout": inv.stdout,
            "stderr": inv.stderr,
            "routes": sorted(line.strip() for line in routes.stdout.splitlines()),
            "dropins": sorted(p.name for p in netd.iterdir()) if netd.is_dir() else [],
            "legacy": legacy.exists(),
            "state": sorted(p.name for p in state.iterdir()) if state.is_dir() else [],
            "unit": Path("/etc/systemd/system/tunnelnat-routes.service").exists(),
        }

    # Without systemd (the lab's machines): the oneshot unit restores every scope's routes.
    results = {"unit_add_a": step("AddHostRoute", lane_a)}
    results["unit_add_c"] = step("AddHostRoute", lane_c)
    results["unit_remove_c"] = step("RemoveHostRoute", lane_c)
    results["unit_remove_a"] = step("RemoveHostRoute", lane_a)

    # An earlier version's file and drop-in via the same G: a partner's scope leaves both.
    Path("/etc/tunnelnat").mkdir(exist_ok=True)
    subprocess.run(["ip", "route", "add", "203.0.113.0/24", "via", gateway], check=True)
    legacy.write_text(f"203.0.113.0/24 via {gateway}\\n")
    netd.mkdir(parents=True)
    legacy_dropin.write_text(f"[Route]\\nDestination=203.0.113.0/24\\nGateway={gateway}\\n")
    Path("/run/systemd/system").mkdir()
    results["add_a"] = step("AddHostRoute", lane_a)
    results["add_c"] = step("AddHostRoute", lane_c)
    results["add_a_again"] = step("AddHostRoute", lane_a)
    results["remove_c"] = step("RemoveHostRoute", lane_c)
    results["remove_a"] = step("RemoveHostRoute", lane_a)
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

A_ROUTE = "192.0.2.0/24 via 10.10.1.5 dev ens5"
C_ROUTE = "100.64.1.0/24 via 10.10.1.5 dev ens5"
LEGACY_ROUTE = "203.0.113.0/24 via 10.10.1.5 dev ens5"
needs_namespaces = pytest.mark.skipif(
    os.geteuid() != 0
    or not shutil.which("unshare")
    or not shutil.which("ip")
    or not Path("/run/systemd").is_dir(),
    reason="needs root, unshare, ip and a /run/systemd to mount over",
)


@pytest.fixture(scope="module")
def lanes(tmp_path_factory):
    work = tmp_path_factory.mktemp("lanes")
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
    # Private namespaces: the root namespace's routes and /etc are never touched, and both go
    # with the process, whatever happens.
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


@needs_namespaces
def test_each_partner_has_its_own_state_and_dropin(lanes):
    for step in ("add_a", "add_c", "add_a_again"):
        assert lanes[step]["status"] == "Success", lanes[step]["stderr"]
        assert json.loads(lanes[step]["stdout"])["persistence"] == "networkd"
    both = lanes["add_a_again"]
    assert {A_ROUTE, C_ROUTE, LEGACY_ROUTE} <= set(both["routes"])
    assert both["state"] == ["acme.bank-a", "acme.bank-c"]
    assert both["dropins"] == ["tunnelnat-acme.bank-a.conf", "tunnelnat-acme.bank-c.conf",
                               "tunnelnat.conf"]  # fmt: skip
    assert both["legacy"], "an earlier version's file via the same G is not a partner's"


@needs_namespaces
def test_one_partners_removal_never_takes_anothers_routes(lanes):
    removed = lanes["remove_c"]
    assert removed["status"] == "Success", removed["stderr"]
    assert C_ROUTE not in removed["routes"]
    assert {A_ROUTE, LEGACY_ROUTE} <= set(removed["routes"])
    assert removed["state"] == ["acme.bank-a"]
    assert removed["dropins"] == ["tunnelnat-acme.bank-a.conf", "tunnelnat.conf"]
    assert json.loads(removed["stdout"])["dropins"] == 1
    last = lanes["remove_a"]
    assert last["status"] == "Success", last["stderr"]
    assert A_ROUTE not in last["routes"] and LEGACY_ROUTE in last["routes"]
    assert last["state"] == [] and last["dropins"] == ["tunnelnat.conf"]


@needs_namespaces
def test_without_systemd_the_unit_serves_every_partner_until_the_last_leaves(lanes):
    for step in ("unit_add_a", "unit_add_c", "unit_remove_c", "unit_remove_a"):
        assert lanes[step]["status"] == "Success", lanes[step]["stderr"]
    both = lanes["unit_add_c"]
    assert json.loads(both["stdout"])["persistence"] == "unit"
    assert {A_ROUTE, C_ROUTE} <= set(both["routes"]) and both["unit"]
    assert both["state"] == ["acme.bank-a", "acme.bank-c"]
    one = lanes["unit_remove_c"]
    assert A_ROUTE in one["routes"] and C_ROUTE not in one["routes"]
    assert one["unit"], "bank-a's routes still rely on it"
    none = lanes["unit_remove_a"]
    assert A_ROUTE not in none["routes"] and none["state"] == [] and not none["unit"]
