"""The route to every partner's endpoint T (issue 23), from G: ``T via <subnet router> dev
<G's link> src G``, so IKE and ESP to each partner leave with source G (which the Internet
gateway translates to E).

boot.json and pair.json name the first partner's T only: they are the launch template's user
data, and adding a partner must not replace the gateways. So ConfigureTunnel records its
PartnerEndpoint in its per-tunnel facts (/etc/tunnelnat/tunnels/NAME.json) and routes it when G
is on this machine (the active); the pair agent's takeover, like the boot
(tests/unit/test_boot_program.py), routes every recorded T with the boot's helper
(``boot.partner_routes``); RemoveTunnel takes a removed partner's route away with its files.
The verb runs against the temporary root and ``ip``/``swanctl`` shims of test_tunnel_verb.py;
the pair agent against the fakes of test_pair_agent.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.unit.test_pair_agent import ME, FakeEc2, Links, fake_agent, pair
from tests.unit.test_tunnel_verb import BANK, Gateway, configure, run, tunnel


def route(t: str, dev: str, router: str = "10.10.1.1", g: str = "10.10.1.20") -> list[str]:
    return ["route", "replace", f"{t}/32", "via", router, "dev", dev, "src", g]


# -- the pair agent's takeover -------------------------------------------------------------------


def test_the_takeover_routes_every_recorded_partners_t(tmp_path):
    """The standby that takes G over routes pair.json's T and every T ConfigureTunnel recorded
    in tunnels_dir (each once), before it initiates the tunnels."""
    tunnels = tmp_path / "tunnels"
    tunnels.mkdir()
    for name, t in (("card", "203.0.113.1"), ("bank", "198.51.100.60"), ("old", None)):
        facts = {"children": [name]} | ({"partner_endpoint": t} if t else {})
        (tunnels / f"{name}.json").write_text(json.dumps(facts))
    ec2 = FakeEc2(None)
    links = Links(lambda: ec2.holder == ME)
    config = {"partner_endpoint": "203.0.113.1", "subnet_router": "10.10.1.1",
              "tunnels_dir": str(tunnels)}  # fmt: skip
    agent = fake_agent(tmp_path, ec2=ec2, links=links, config=config)
    agent.take_over(pair.TakeOver("test", 2.0))
    assert agent.machine.role == pair.ACTIVE
    assert [c for c in links.calls if c[0] == "route"] == [
        route("203.0.113.1", "ens6"),
        route("198.51.100.60", "ens6"),
    ]


def test_the_takeover_without_tunnels_dir_routes_its_one_t(tmp_path):
    """One partner (no tunnels_dir): pair.json's T, as before issue 23."""
    ec2 = FakeEc2(None)
    links = Links(lambda: ec2.holder == ME)
    config = {"partner_endpoint": "203.0.113.1", "subnet_router": "10.10.1.1"}
    agent = fake_agent(tmp_path, ec2=ec2, links=links, config=config)
    agent.take_over(pair.TakeOver("test", 2.0))
    assert [c for c in links.calls if c[0] == "route"] == [route("203.0.113.1", "ens6")]


# -- ConfigureTunnel: the T recorded, routed on the active -----------------------------------------


BOOT = {
    "region": "us-east-1",
    "eni_id": "eni-0123456789abcdef0",
    "gateway": "10.10.0.10/24",
    "partner_endpoint": "198.51.100.40",  # the first partner's
    "subnet_router": "10.10.0.1",
}


@pytest.fixture
def gw(tmp_path: Path) -> Gateway:
    return Gateway(tmp_path)


def boot_json(gw: Gateway, **change: object) -> None:
    path = gw.file("/etc/tunnelnat/boot.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**BOOT, **change}))


def routes(gw: Gateway) -> list[str]:
    return [c for c in gw.ip_calls() if c.startswith("route")]


def test_configure_tunnel_records_its_partner_endpoint(gw):
    assert configure(gw)[0] == 0
    gw.conns("partner", "bank")
    assert configure(gw, **BANK)[0] == 0
    facts = {
        name: json.loads(gw.file(f"/etc/tunnelnat/tunnels/{name}.json").read_text())
        for name in ("partner", "bank")
    }
    assert facts["partner"]["partner_endpoint"] == "198.51.100.40"
    assert facts["bank"]["partner_endpoint"] == "198.51.100.60"
    assert facts["bank"]["children"] == ["bank"]  # F2's facts kept beside it


def test_on_the_active_configure_tunnel_routes_its_t_from_g_before_loading(gw):
    """G on this machine (boot.json's G is on a link): the partner's T is routed via the
    subnet's router from G and reported. Run again: the same idempotent replace."""
    boot_json(gw)
    (gw.fake / "addresses").write_text("10.10.0.10\n")
    gw.conns("partner", "bank")
    code, report, err = configure(gw, **BANK)
    assert code == 0, err
    want = "route replace 198.51.100.60/32 via 10.10.0.1 dev eth1 src 10.10.0.10"
    assert routes(gw) == [want]
    assert report["partner_route"] == "198.51.100.60 via 10.10.0.1 dev eth1"
    gw.forget_calls()
    assert configure(gw, **BANK)[1]["partner_route"] == report["partner_route"]
    assert routes(gw) == [want]


def test_the_route_comes_before_the_load(gw, monkeypatch):
    """start_action start initiates at the load: IKE's first packet must already leave from G."""
    boot_json(gw)
    (gw.fake / "addresses").write_text("10.10.0.10\n")
    order: list[str] = []
    real = tunnel.Host.run

    def spy(self, argv, **kw):
        if list(argv[:2]) in (["ip", "route"], ["swanctl", "--load-all"]):
            order.append(" ".join(argv[:2]))
        return real(self, argv, **kw)

    monkeypatch.setattr(tunnel.Host, "run", spy)
    assert configure(gw, **BANK)[0] == 0
    assert order == ["ip route", "swanctl --load-all"]


def test_a_standby_or_a_gateway_without_a_router_routes_nothing(gw):
    """The standby (G is the active's) routes nothing: the pair agent does when it takes G
    over. Nor does a gateway whose boot.json routes no T (the lab), or one without boot.json."""
    gw.conns("partner", "bank")
    assert configure(gw, **BANK)[0] == 0  # no boot.json
    boot_json(gw)  # G not on this machine: the standby
    code, report, _ = configure(gw, **BANK, local_address="10.10.0.10")
    assert code == 0 and report["standby"] is True and "partner_route" not in report
    (gw.fake / "addresses").write_text("10.10.0.10\n")
    boot_json(gw, partner_endpoint=None, subnet_router=None)  # the lab's
    assert "partner_route" not in configure(gw, **BANK)[1]
    assert routes(gw) == []


def test_an_endpoint_no_partner_can_have_is_never_routed(gw):
    boot_json(gw)
    (gw.fake / "addresses").write_text("10.10.0.10\n")
    gw.conns("partner", "bank")
    code, report, _ = configure(gw, **{**BANK, "partner_endpoint": "10.10.0.77"})  # G's subnet
    assert code == 0 and "partner_route" not in report and routes(gw) == []


def test_remove_tunnel_takes_its_ts_route_away_unless_another_partner_needs_it(gw):
    """A removed partner's T is no longer routed from G; boot.json's T (the boot routes it at
    every boot) and a T another tunnel still records stay routed."""
    boot_json(gw)
    (gw.fake / "addresses").write_text("10.10.0.10\n")
    gw.conns("partner", "bank", "twin")
    assert configure(gw)[0] == 0
    assert configure(gw, **BANK)[0] == 0
    twin = {**BANK, "tunnel_name": "twin", "public_addresses": "203.0.113.21"}
    assert configure(gw, **twin)[0] == 0  # a second tunnel to bank's T
    gw.forget_calls()
    assert run(tunnel.remove_main, gw, ["--tunnel-name", "bank"])[0] == 0
    assert routes(gw) == []  # twin still records bank's T
    assert run(tunnel.remove_main, gw, ["--tunnel-name", "twin"])[0] == 0
    assert routes(gw) == ["route del 198.51.100.60/32 via 10.10.0.1 dev eth1 src 10.10.0.10"]
    gw.forget_calls()
    assert run(tunnel.remove_main, gw, ["--tunnel-name", "partner"])[0] == 0
    assert routes(gw) == []  # boot.json's T
