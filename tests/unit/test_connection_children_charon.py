"""Several tunnels on one real charon whose CHILD_SA names collide across connections (issue 23).

Tunnel ``px`` (SelectorLayout per-pair, two S: children ``px-1`` and ``px-2``) beside a partner
named ``px-2`` (its one child is ``px-2`` too) and ``py``: the health agent, ShowTunnels'
listing and the pair agent find each tunnel's CHILD_SAs within its own connection. The test bed
is bench/tunnels.py's (two charons with kernel-libipsec in ``tn-bench-<pid>-*`` namespaces,
ConfigureTunnel's own verb per partner); the synthetic side is test_connection_children.py.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from bench import tunnels as bed_mod
from bench.netns import Sandbox

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "gateway"))
from tunnelnat_gateway import health, pair, sas  # noqa: E402

pytestmark = pytest.mark.skipif(bed_mod.available() is not None, reason=str(bed_mod.available()))

PX = bed_mod.Partner("px", 0, publics=("203.0.113.10", "203.0.113.11"), layout="per-pair")
PX2 = bed_mod.Partner("px-2", 1)
PY = bed_mod.Partner("py", 2)
MEMBERS = [PX, PX2, PY]
PAIR = {
    "region": "eu-west-1",
    "eni_id": "eni-0123456789abcdef0",
    "gateway": "10.10.1.20/24",
    "deployment": "bench",
    "table": "bench",
    "tunnel": "px",
}


@pytest.fixture(scope="module")
def bed():
    with Sandbox() as box:
        box.run_dir.mkdir(parents=True, exist_ok=True)
        with bed_mod.testbed(box, MEMBERS) as bed:
            for partner in MEMBERS:
                bed.configure(partner)
            bed.wait_up(MEMBERS)
            yield bed


def test_a_tunnel_down_is_down_though_another_has_a_child_of_its_name(bed):
    assert bed.swanctl("tgw", "--terminate", "--ike", "px-2", "--force").returncode == 0
    reading = bed.reading()
    assert "px-2" not in {ike.name for ike in reading.sas}
    # tunnel px's per-pair child px-2 is INSTALLED: read by name alone, px-2 looked up.
    assert any(
        c.name == "px-2" and c.state == "INSTALLED" for ike in reading.sas for c in ike.children
    )
    status = health.sa_status("px-2", reading, ["px-2"])
    assert not status.up and status.reason == "no IKE SA"
    assert health.sa_status("px", reading, ["px-1", "px-2"]).up
    assert health.tunnel_children(reading, "px-2", ["px-2"]) == []
    lines = sas.listing(reading, {"px-2": {"children": ["px-2"]}}, time.time())
    assert [line["kind"] for line in lines] == ["tunnel"]
    both = sas.listing(reading, {"px": {"children": ["px-1", "px-2"]}, "py": {}}, time.time())
    assert sorted((line["ike"], line["child"]) for line in both if line["kind"] == "child") == [
        ("px", "px-1"), ("px", "px-2"), ("py", "py"),
    ]  # fmt: skip


def test_the_pair_agent_takes_every_tunnel_over_by_connection(bed):
    """The takeover's initiate with tunnels_dir: every tunnel ConfigureTunnel configured, each
    child with its connection (--ike): px-2 comes back as its own IKE SA."""
    cfg = pair.PairConfig.from_json(
        PAIR | {"tunnels_dir": str(bed.root / "etc" / "tunnelnat" / "tunnels")}
    )
    conns = pair.connections(cfg)
    assert conns == (("px", ("px-1", "px-2")), ("px-2", ("px-2",)), ("py", ("py",)))
    assert pair.read_tunnel_loaded([t for t, _ in conns], bed.run_swanctl) is True
    assert pair.initiate(cfg, bed.run_swanctl) == []
    bed.wait_up(MEMBERS, 20)
    assert pair.read_sas(conns, bed.run_swanctl) == 4
    reading = bed.reading()
    assert sorted((ike.name, c.name) for ike in reading.sas for c in ike.children
                  if c.state == "INSTALLED") == [
        ("px", "px-1"), ("px", "px-2"), ("px-2", "px-2"), ("py", "py"),
    ]  # fmt: skip


def test_a_partner_removed_leaves_the_others_sas(bed):
    """remove-tunnel (a partner removed by redeploy): its SAs, connection, key and files go;
    every other tunnel keeps its IKE and CHILD SAs (unique ids), and the pair agent and the
    health agent no longer see it. Pruning to the partners left is then a no-op."""
    from tunnelnat_gateway import tunnel

    bed.wait_up(MEMBERS, 20)
    before = bed.ids()
    report = tunnel.remove_tunnel(bed.host(), "px-2")
    assert report["removed"] and report["terminated"] and report["unloaded"], report
    assert "etc/swanctl/conf.d/tunnelnat-px-2.secret.conf" in report["files"]
    after = bed.ids()
    assert "px-2" not in after
    assert {n: after[n] for n in ("px", "py")} == {n: before[n] for n in ("px", "py")}
    conns = bed.swanctl("tgw", "--list-conns").stdout
    assert "\npx-2: " not in "\n" + conns and "\npx: " in "\n" + conns
    tunnels_dir = bed.root / "etc" / "tunnelnat" / "tunnels"
    assert sorted(p.name for p in tunnels_dir.iterdir() if p.name.startswith("px-2")) == []
    cfg = pair.PairConfig.from_json(PAIR | {"tunnels_dir": str(tunnels_dir)})
    assert [t for t, _ in pair.connections(cfg)] == ["px", "py"]
    # The shared settings and lo addresses are the others' only; px-2's S gone from lo.
    lo = bed.box.run(bed.ns("tgw"), ["ip", "-4", "-o", "addr", "show", "dev", "lo"]).stdout
    assert PX2.s[0] not in lo and PY.s[0] in lo and PX.s[0] in lo
    assert tunnel.prune_tunnels(bed.host(), ["px", "py"]) == []
    assert tunnel.remove_tunnel(bed.host(), "px-2")["removed"] is False  # idempotent
    assert bed.ids() == after
