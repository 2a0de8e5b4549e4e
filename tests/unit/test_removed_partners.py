"""A partner removed by redeploy is torn down (issue 23): ConfigureGateway with PartnersPath
(re-run on every lane change through PartnersDigest) removes every tunnel ConfigureTunnel
recorded under /etc/tunnelnat/tunnels whose name is no lane's, with tunnel.remove_tunnel, and
says so in ``removed_tunnels``; without PartnersPath (one partner) no tunnel is ever removed.

The tunnels are configured by the real ConfigureTunnel verb against the temporary root and the
``swanctl``/``ip`` shims of test_tunnel_verb.py; the NAT side is stubbed here (its real-nft
proof that the removed lane's sets go with it is in test_sync_partners.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
from types import SimpleNamespace

import pytest

from tests.unit.test_tunnel_verb import BANK, Gateway, configure, tunnel
from tunnelnat_gateway import configure_gateway as cg
from tunnelnat_gateway import nat_sync

CARD = {**BANK, "tunnel_name": "card", "partner_endpoint": "198.51.100.70",
        "public_addresses": "203.0.113.30", "psk_secret_name": "tunnelnat/card-psk"}  # fmt: skip
GONE = {**BANK, "tunnel_name": "gone", "partner_endpoint": "198.51.100.80",
        "public_addresses": "203.0.113.40", "psk_secret_name": "tunnelnat/gone-psk"}  # fmt: skip


@pytest.fixture
def gw(tmp_path, monkeypatch) -> Gateway:
    """A gateway with four tunnels: the single-partner layout's ``partner``, and card, bank and
    gone as three partners' ConfigureTunnel runs left them; the NAT side stubbed."""
    gw = Gateway(tmp_path)
    gw.conns("partner", "card", "bank", "gone")
    for args in ({}, CARD, BANK, GONE):
        assert configure(gw, **args)[0] == 0
    gw.forget_calls()
    monkeypatch.setattr(cg, "TUNNEL_HOST", gw.host)
    monkeypatch.setattr(cg, "LOCK_FILE", tmp_path / "configure.lock")
    monkeypatch.setattr(cg, "forwarding_on", lambda: None)
    applied: list[object] = []
    monkeypatch.setattr(nat_sync, "configure", lambda client, table, base: {"action": "full"})
    monkeypatch.setattr(nat_sync, "save_source", lambda *a: None)
    monkeypatch.setattr(nat_sync, "partners_base", lambda lanes, mss, interfaces: lanes)
    monkeypatch.setattr(
        nat_sync,
        "configure_partners",
        lambda client, base, lanes: applied.append(lanes) or {"lanes": {}, "failed": []},
    )
    gw.applied = applied
    return gw


def lanes(monkeypatch, *names: str) -> None:
    found = tuple(SimpleNamespace(name=n, table=f"tnlab-{n}") for n in names)
    monkeypatch.setattr(nat_sync, "read_lanes", lambda ssm, path: found)


def verb(*extra: str) -> tuple[int, dict | None, str]:
    argv = ["--partner-networks", "192.0.2.0/24", "--table", "tnlab", "--region", "us-east-1"]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cg.main([*argv, *extra], client=object(), ssm=object())
    line = out.getvalue().strip()
    return code, json.loads(line) if line else None, err.getvalue()


PARTNERS = ("--partners-path", "/tunnelnat/tnlab/partners", "--partners-digest", "ab" * 32)


def tunnel_files(gw: Gateway, name: str) -> list[str]:
    paths = [f"/etc/swanctl/conf.d/tunnelnat-{name}{x}" for x in (".conf", ".secret.conf")]
    paths += [f"/etc/tunnelnat/tunnels/{name}.{x}" for x in ("json", "charon", "config-id")]
    return [p for p in paths if gw.file(p).exists()]


def test_tunnels_no_lane_names_are_removed_the_others_untouched(gw, monkeypatch):
    lanes(monkeypatch, "card", "bank")
    kept = {n: {p: gw.file(p).read_bytes() for p in tunnel_files(gw, n)} for n in ("card", "bank")}
    code, report, err = verb(*PARTNERS)
    assert code == 0, err
    assert report["removed_tunnels"] == ["gone", "partner"]
    assert "tunnels_not_removed" not in report
    assert tunnel_files(gw, "gone") == [] and tunnel_files(gw, "partner") == []
    for name, files in kept.items():
        assert {p: gw.file(p).read_bytes() for p in tunnel_files(gw, name)} == files, name
    # charon: the removed connections unloaded by one load of what is left; only the removed
    # tunnels' IKE SAs were looked at, no other tunnel's touched.
    calls = gw.calls()
    assert calls.count("--load-all --noprompt") == 2
    assert not [c for c in calls if c.startswith(("--terminate", "--initiate"))
                and ("card" in c or "bank" in c)]  # fmt: skip
    # Re-run (the next lane change): nothing left to remove.
    gw.forget_calls()
    code, report, _ = verb(*PARTNERS)
    assert code == 0 and report["removed_tunnels"] == [] and gw.calls() == []


def test_the_removed_partners_ike_sa_is_terminated(gw, monkeypatch):
    (gw.fake / "plain").write_text("gone: #3, ESTABLISHED, IKEv2\n")
    lanes(monkeypatch, "partner", "card", "bank")
    code, report, _ = verb(*PARTNERS)
    assert code == 0 and report["removed_tunnels"] == ["gone"]
    terminated = [c for c in gw.calls() if c.startswith("--terminate")]
    assert terminated == ["--terminate --ike gone --force"]


def test_a_removed_partners_route_from_g_goes_with_it(gw, monkeypatch):
    """On the active (G here, boot.json routing Ts), the removed partner's T is no longer
    routed from G; the others' routes stay."""
    boot = gw.file("/etc/tunnelnat/boot.json")
    boot.write_text(json.dumps({"gateway": "10.10.0.10/24", "subnet_router": "10.10.0.1",
                                "partner_endpoint": "198.51.100.40"}))  # fmt: skip
    (gw.fake / "addresses").write_text("10.10.0.10\n")
    lanes(monkeypatch, "partner", "card", "bank")
    assert verb(*PARTNERS)[0] == 0
    assert [c for c in gw.ip_calls() if c.startswith("route")] == [
        "route del 198.51.100.80/32 via 10.10.0.1 dev eth1 src 10.10.0.10"
    ]


def test_tunnels_that_cannot_be_removed_fail_the_run_and_are_removed_by_the_next(gw, monkeypatch):
    """ConfigureTunnel's lock held past its 240 s (a run that hangs): nothing removed, the run
    fails naming them after the others were served; the next run (every lane change re-runs
    it) removes them."""
    lanes(monkeypatch, "card")
    lock = gw.file(tunnel.LOCK_FILE)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        code, report, err = verb(*PARTNERS)
    assert code == 1
    assert report["removed_tunnels"] == []
    assert set(report["tunnels_not_removed"]) == {"bank", "gone", "partner"}
    assert "still holds the lock" in report["tunnels_not_removed"]["bank"]
    # Waited once (240 s of the fake clock), not once per tunnel: the document has 900 s.
    assert report["tunnels_not_removed"]["gone"].startswith("not tried: another Configure")
    assert report["forwarding"] is True and gw.applied  # the others served all the same
    assert "ConfigureGateway: tunnels of removed partners not removed (bank: " in err
    assert all(tunnel_files(gw, n) for n in ("bank", "gone", "partner"))
    code, report, _ = verb(*PARTNERS)
    assert code == 0 and report["removed_tunnels"] == ["bank", "gone", "partner"]


def test_without_partners_path_no_tunnel_is_ever_removed(gw, monkeypatch):
    lanes(monkeypatch, "card")  # never read
    before = {n: tunnel_files(gw, n) for n in ("partner", "card", "bank", "gone")}
    code, report, err = verb()
    assert code == 0, err
    assert list(report) == ["configured", "forwarding", "cloud_init", "nat"]  # as before
    assert {n: tunnel_files(gw, n) for n in before} == before
    assert gw.calls() == [] and gw.applied == []


def test_lanes_that_cannot_be_read_remove_nothing(gw, monkeypatch):
    def refused(ssm, path):
        raise ValueError(f"no partners under {path}")

    monkeypatch.setattr(nat_sync, "read_lanes", refused)
    code, report, err = verb(*PARTNERS)
    assert code == 1 and report is None and "no partners under" in err
    assert all(tunnel_files(gw, n) for n in ("partner", "card", "bank", "gone"))
    assert gw.calls() == []
