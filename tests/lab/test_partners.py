"""Real partners (issue 12), with real strongSwan on both sides: the strict policy-based peer
with our per-pair layout, each broken partner named by the health agent from charon's own log,
a partner that is down at first, DPD by behaviour, and rekeys without loss.

One lab for the module (the AWS-like partner of the demo's story, web-1 enrolled). Times are the
lab's, not production's: DPD 5 s + 10 s (production: 10 s + 30 s) so a dead partner is noticed in
seconds; the "down" partner starts ~20 s later instead of five minutes: what matters is that at
least one whole retransmission sequence (10 s here) has run out, so the tunnel comes up through
keyingtries = 0 ("peer not responding, trying again"), which is the same at any delay.
"""

from __future__ import annotations

import re
import time

import pytest

from lab import topology as topo
from lab.controller import LabController
from lab.story import Story, _wait, diagnose_partner, run_health_agent

pytestmark = pytest.mark.lab
FAST_DPD = "5,10"


@pytest.fixture(scope="module")
def story(lab):
    with LabController(lab) as controller:
        story = Story(lab, controller)
        assert lab.configure_gateway(Dpd=FAST_DPD).ok
        assert story.enrol("web-1").ok
        yield story


def installed(ns: str = "tn-gw") -> dict[str, int]:
    out = topo.in_ns(ns, ["swanctl", "--list-sas"], check=False)
    found = re.findall(r"^\s+(partner(?:-\d+)?): #\d+, reqid \d+, INSTALLED", out, re.MULTILINE)
    return {name: found.count(name) for name in set(found)}


def test_strict_policy_based_peer_with_one_child_per_pair(story):
    lab = story.lab
    lab.reconfigure_partner("strict")
    result = lab.configure_gateway(Dpd=FAST_DPD, SelectorLayout="per-pair")
    assert result.ok, result.stderr[-500:]
    pairs = len(topo.POOL) + 1
    assert _wait(lambda: len(installed()) == pairs and len(installed("tn-pvpn")) == pairs, 20)
    ok, body = lab.http("tn-web-1", story.app_url("web-1"))
    assert ok and story.public in body  # A saw S: NAT through the pair's own CHILD_SA
    agent = run_health_agent(lab)["tunnels"][0]
    assert agent["up"] is True and agent["installed"] == pairs, agent
    # One pair refused (the partner drops one of its selectors): the tunnel is not up.
    topo.in_ns("tn-gw", ["swanctl", "--terminate", "--child", "partner-5", "--force"], check=False)
    agent = run_health_agent(lab)["tunnels"][0]
    assert agent["up"] is False and "missing partner-5" in agent["reason"], agent
    # Back to the AWS-like partner and one CHILD_SA.
    assert story._restore_partner()


@pytest.mark.parametrize(
    ("profile", "expected"),
    [
        ("wrong-psk", "authentication failed: the partner refused our pre-shared key"),
        ("no-common-proposal", "no common ESP proposal: the partner accepts none of ours"),
        ("selector-mismatch", "traffic selectors unacceptable: the partner refused partner's"),
    ],
)
def test_broken_partner_is_named_in_one_line(story, profile, expected):
    line = diagnose_partner(story.lab, profile)
    print(f"{profile}: {line}")
    assert line and line.startswith(expected), line


def test_partner_down_at_first_comes_up_by_our_retries_alone(story):
    lab = story.lab
    # The lab's DPD timeout again (the previous restore put the defaults back): charon reads
    # its retransmission settings when it creates an IKE SA, so the next one retries for 10 s.
    assert lab.configure_gateway(Dpd=FAST_DPD).ok
    logged = len(topo.in_ns("tn-gw", ["cat", topo.CHARON_LOG]))
    line = diagnose_partner(lab, "down", settle=16)
    print(f"down: {line}")
    assert line and line.startswith(
        f"partner not answering (retransmits to {topo.PARTNER_ENDPOINT}"
    )
    # A whole retransmission sequence (DpdTimeout, 10 s) has run out in this attempt: only
    # keyingtries = 0 keeps us trying (keyingtries 1, strongSwan's default, would have given up
    # for good).
    log = topo.in_ns("tn-gw", ["cat", topo.CHARON_LOG])[logged:]
    assert "giving up after 4 retransmits" in log, log[-2000:]
    lab.start_partner_charon()  # it does not initiate: only our next retransmit brings it up
    assert _wait(lambda: lab.child_sas_installed() >= 1, 15)
    assert story._restore_partner()


def test_dpd_re_establishes_after_the_partners_daemon_restarts(story):
    """The partner's charon killed and started again (no SA left there, and it does not
    initiate): our DPD finds it, dpd_action restart brings the SA back, no healer involved."""
    lab = story.lab
    assert lab.configure_gateway(Dpd=FAST_DPD).ok  # the previous restore put the defaults back
    lab.reconfigure_partner("down")  # the AWS-like peer, but waiting to be called
    # A fresh IKE SA: an existing one keeps the DPD settings it was created with.
    topo.in_ns("tn-gw", ["swanctl", "--terminate", "--ike", topo.TUNNEL, "--force"], check=False)
    topo.in_ns("tn-gw", ["swanctl", "--initiate", "--child", topo.TUNNEL, "--timeout", "5"])
    before = topo.in_ns("tn-gw", ["swanctl", "--list-sas"])
    documents = len(lab.commands.history)
    killed = time.monotonic()
    lab.stop_partner_charon()
    lab.start_partner_charon()

    def new_sa() -> bool:
        out = topo.in_ns("tn-gw", ["swanctl", "--list-sas"], check=False)
        return lab.child_sas_installed() >= 1 and out.split(",")[0] != before.split(",")[0]

    assert _wait(new_sa, 40), topo.in_ns("tn-gw", ["swanctl", "--list-sas"])
    seconds = time.monotonic() - killed
    print(f"DPD: partner restarted -> SA re-established by us in {seconds:.1f}s")
    assert seconds < 30  # DPD delay 5 s + timeout 10 s + setup
    assert lab.child_sas_installed("tn-pvpn") >= 1
    assert len(lab.commands.history) == documents  # no RestartTunnel: charon did it alone
    ok, _ = lab.http("tn-web-1", story.app_url("web-1"))
    assert ok
    assert story._restore_partner()


def test_rekeys_in_both_directions_lose_nothing(story):
    step = story.rekey("web-1")
    print(step.figure)
    data = step.data
    assert data["lost"] == 0 and data["clear"] == 0, step.figure
    assert data["ours"] >= 3 and data["theirs"] >= 3 and data["ike"] >= 2, step.figure
    assert data["make_before_break"], step.figure
    assert data["sent"] / data["seconds"] >= 50, step.figure
    assert step.ok, step.figure
