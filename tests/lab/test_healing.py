"""Issue 5's lab story: the gateway's charon is killed and the health chain heals the tunnel.

Agent (in tn-gw, publishing to moto) -> accelerated alarm evaluation -> EventBridge-shaped event
-> the real healer handler -> RestartTunnel through LabCommands -> traffic from web-1 reaches A
as S again. Needs root and the lab's packages (tests/lab/conftest.py skips otherwise).
"""

from __future__ import annotations

import json

import pytest

from lab import topology as topo
from lab.controller import LabController
from lab.healing_story import run_agent, run_healing_story
from lab.story import Story


@pytest.fixture(scope="module")
def enrolled(lab):
    with LabController(lab) as controller:
        story = Story(lab, controller)
        tunnel = story.tunnel()
        assert tunnel.ok, tunnel.figure
        enrol = story.enrol()
        assert enrol.ok, enrol.figure
        yield lab, controller, story.public


def test_agent_publishes_one_while_the_tunnel_is_up(enrolled):
    lab, _, _ = enrolled
    # The agent InstallHealthAgent installed (its own document, run after ConfigureGateway).
    assert lab.health_install.ok, lab.health_install.stderr[-800:]
    installed = json.loads(lab.health_install.stdout.strip().splitlines()[-1])
    assert installed["installed"] is True and installed["timer"] == "skipped"  # no systemd here
    line = run_agent(lab)
    assert line["exit"] == 0 and line["published"] is True, line
    (tunnel,) = line["tunnels"]
    assert tunnel["up"] is True and tunnel["probe_ok"] is True, tunnel
    # Up since ConfigureGateway wrote the tunnel's token: the healer may restart it.
    assert tunnel["established"] is True, tunnel
    assert line["counters"] is not None  # the gateway's nftables table is there
    assert line["table"]["applied_generation"] is not None


def test_agent_reads_down_until_the_table_is_synced(enrolled):
    """A boot-time restore leaves applied_generation empty: TunnelUp 0 whatever strongSwan says,
    until the gateway's next sync fills it (the contract with the gateway program)."""
    lab, _, _ = enrolled
    topo.in_ns("tn-gw", ["nft", "flush", "set", "ip", "tunnelnat", "applied_generation"])
    try:
        line = run_agent(lab)
        (tunnel,) = line["tunnels"]
        assert tunnel["up"] is False and "applied_generation is empty" in tunnel["reason"], line
        assert tunnel["installed"] == 1  # strongSwan's child SA is there all the same
        assert tunnel["established"] is True  # down now, but it was up since configured
    finally:
        sync = lab.commands.run(
            lab.aws.gateway_id, "SyncNatTable", {"TableName": topo.TABLE, "Region": topo.REGION}
        )
    assert sync.ok, sync.stderr[-800:]
    line = run_agent(lab)
    assert line["tunnels"][0]["up"] is True, line
    assert line["table"]["applied_generation"] is not None


def test_charon_killed_then_healed_by_the_healer(enrolled):
    lab, controller, public = enrolled
    report = run_healing_story(lab, controller, public=public)
    print("\n" + report.figure())
    for at, what in report.timeline:
        print(f"  +{at:6.2f}s  {what}")
    print(f"  alarm evaluations: {report.evaluations}; agent runs: {report.agent_runs}")
    assert report.kill_to_agent_zero is not None, "the agent never published 0"
    assert report.kill_to_alarm is not None, "the alarm never fired"
    assert report.healer_outcome.get("action") == "restart", report.healer_outcome
    assert report.healer_outcome.get("status") == "Success", report.healer_outcome
    assert report.ok and report.kill_to_restored is not None, report.figure()
    assert public in report.peers_after
    assert report.recovery_outcome is not None and report.recovery_outcome["action"] == "recovered"
    # The healer's attempt is on record.
    item = lab.aws.client("dynamodb").get_item(
        TableName=topo.TABLE, Key={"pk": {"S": "healer"}, "sk": {"S": topo.TUNNEL}}
    )["Item"]
    assert '"status": "Success"' in item["attempts"]["S"]
