"""Pinned CHILD_SA reqids (core/swanctl.py, tunnel.reqid_base): strongSwan issue #1855 (two
CHILD_SAs of different selectors sharing a reqid after a DPD restart, one pair's packets on the
other's SA) cannot happen when each child's reqid is fixed; the three-partner lab's bank step
proves it with real charon daemons (tests/lab/test_three_partners.py)."""

from __future__ import annotations

import dataclasses
import json
import re

from tests.unit.test_swanctl import environ
from tests.unit.test_tunnel_verb import Gateway, configure, gw  # noqa: F401
from tunnelnat.core import swanctl
from tunnelnat_gateway import tunnel


def reqids(conf: str) -> list[int]:
    return [int(x) for x in re.findall(r"^ +reqid = (\d+)$", conf, re.MULTILINE)]


def test_each_child_gets_base_plus_its_number_and_none_without_a_base():
    t = swanctl.from_environ(environ(TN_LAYOUT="per-pair"))
    assert len(t.children) == 4 and reqids(swanctl.render_connection(t)) == []
    pinned = swanctl.render_connection(dataclasses.replace(t, reqid_base=1_002_000))
    assert reqids(pinned) == [1_002_001, 1_002_002, 1_002_003, 1_002_004]
    # Inside each child's own section, after its settings.
    assert "dpd_action = restart\n        reqid = 1002001\n      }" in pinned


def test_bases_are_unique_kept_for_a_tunnels_life_and_freed_with_it(tmp_path):
    tunnels = tmp_path
    record = {"dpd_timeout": 30, "log": "/var/log/tunnelnat/charon.log"}

    def keep(name: str) -> int:
        base = tunnel.reqid_base(tunnels, name)
        (tunnels / f"{name}.charon").write_text(json.dumps(record | {"reqid_base": base}))
        return base

    assert [keep(n) for n in ("card", "bank", "clearing")] == [1_000_000, 1_001_000, 1_002_000]
    assert [keep(n) for n in ("clearing", "card", "bank")] == [1_002_000, 1_000_000, 1_001_000]
    (tunnels / "bank.charon").unlink()  # remove-tunnel: its slot is free again
    assert keep("insurer") == 1_001_000
    # A record from before pinning, or a damaged or hand-edited one: a free slot, never a taken one.
    (tunnels / "old.charon").write_text(json.dumps(record))
    (tunnels / "bad.charon").write_text("{")
    (tunnels / "odd.charon").write_text(json.dumps(record | {"reqid_base": 1_000_000}))
    assert tunnel.reqid_base(tunnels, "old") == 1_003_000
    assert tunnel.reqid_base(tunnels, "odd") == 1_003_000  # card holds 1,000,000


def test_configure_pins_and_records_the_base(gw):  # noqa: F811
    code, report, err = configure(gw, selector_layout="per-pair")
    assert code == 0, err
    conf = gw.file("/etc/swanctl/conf.d/tunnelnat-partner.conf").read_text()
    assert reqids(conf) == [1_000_001, 1_000_002]
    record = json.loads(gw.file("/etc/tunnelnat/tunnels/partner.charon").read_text())
    assert record["reqid_base"] == 1_000_000
    assert configure(gw, selector_layout="per-pair")[1]["swanctl_changed"] is False


def test_a_tunnel_from_before_pinning_keeps_its_connection_while_up(gw):  # noqa: F811
    """charon re-establishes the SAs of a connection a load replaces: adding reqid lines to a
    tunnel that is up would be an outage at upgrade. It keeps the loaded connection until it
    changes for another reason, or is down."""
    assert configure(gw)[0] == 0
    conf = gw.file("/etc/swanctl/conf.d/tunnelnat-partner.conf")
    unpinned = re.sub(r"^ +reqid = \d+\n", "", conf.read_text(), flags=re.MULTILINE)
    conf.write_text(unpinned)  # as an older gateway software wrote it
    gw.forget_calls()
    code, report, _ = configure(gw)
    assert code == 0 and report["swanctl_changed"] is False and report["restarted"] is False
    assert conf.read_text() == unpinned
    assert not any(c.startswith("--terminate") for c in gw.calls())
    gw.down()  # its SA is gone: nothing to keep, pinned now
    code, report, _ = configure(gw)
    assert code == 0 and report["swanctl_changed"] is True and report["restarted"] is False
    assert reqids(conf.read_text()) == [1_000_001]
    # A real change while up: pinned with it (one restart, as for any change).
    conf.write_text(unpinned)
    code, report, _ = configure(gw, dpd="20,60")
    assert code == 0 and report["restarted"] is True and reqids(conf.read_text()) == [1_000_001]
