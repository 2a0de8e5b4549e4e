"""Issue 23 in the lab: three partners on one gateway (lab.partners_lab, lab.partners_story).

One lab for the module: card (AWS-like IKEv2), bank (IKEv1 main mode, per-pair) and clearing
(IKEv2, its app server at card's very address, reached through the alias), configured from a
partners file as the stack does it, enrolment per partner through the real controller. The
story's steps run once, in order; each test asserts on what one step observed.
"""

from __future__ import annotations

import logging
import re
from ipaddress import IPv4Address, IPv4Network

import pytest

from lab.partners_lab import (
    BANK,
    CARD,
    CLEARING,
    NAMES,
    PARTNERS_YAML,
    SITES,
    bank_conf,
    load_partners,
    parse_list_sas,
)
from lab.partners_story import WEB1, WEB2, partners_lab, shared_reqids
from lab.partners_story import PartnersStory as Story

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def steps():
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    done = {}
    with partners_lab() as (lab, controller):
        story = Story(lab, controller)
        # Every step, also after one failed (each test judges its own); one that raises ends
        # the story (the next would build on what it left half-done).
        for step_fn in story.all_steps(peer_killed=True):
            step = step_fn()
            print(f"{'ok' if step.ok else 'FAILED'} {step.title}\n   {step.figure}")
            done[step_fn.__name__] = step
        yield done, lab, story
    assert lab.cleaned, "the lab left namespaces behind"


def _step(steps, name):
    done, _, _ = steps
    if name not in done:
        pytest.fail(f"step {name} did not run (an earlier step raised)")
    return done[name]


def test_three_tunnels_ikev2_ikev1_per_pair_and_overlap(steps):
    step = _step(steps, "configure")
    assert step.ok, step.figure
    sas = step.data["sas"]
    assert sas[CARD]["version"] == 2 and sas[CLEARING]["version"] == 2
    # IKEv1 main mode, one selector pair per CHILD_SA: 2 networks x 2 S.
    assert sas[BANK]["version"] == 1
    assert len(sas[BANK]["children"]) == step.data["expected_bank_children"] == 4
    # Each of bank's CHILD_SAs carries one pair (one S, one network), together every pair.
    assert step.data["bank_pairs"] == step.data["every_bank_pair"]
    assert step.data["peers"][BANK]["tunnelnat"]["version"] == 1
    assert len(step.data["parameters"]) == 3


def test_one_instance_enrolled_to_three_partners(steps):
    step = _step(steps, "enrol")
    assert step.ok, step.figure
    _, lab, _ = steps
    s = step.data["s"]
    assert set(s[WEB1]) == set(NAMES) and set(s[WEB2]) == {CARD}
    for partner, address in s[WEB1].items():
        assert IPv4Address(address) in lab.lane(partner).public_addresses
    # clearing's network is card's: web-1 routes its alias, never a second 192.0.2.0/24.
    assert "100.64.0.0/24" in step.data["routes"][WEB1]
    assert step.data["routes"][WEB2] == ["192.0.2.0/24"]


def test_each_app_server_logs_its_partners_s_even_at_the_same_address(steps):
    step = _step(steps, "reach_each")
    assert step.ok, step.figure
    _, lab, story = steps
    assert SITES[CARD].app == SITES[CLEARING].app  # the overlap
    assert IPv4Address(story.app_address(CLEARING)) in IPv4Network("100.64.0.0/24")
    logged = step.data["logged"]
    assert logged[CARD] == [story.s[WEB1][CARD]]
    assert logged[CLEARING] == [story.s[WEB1][CLEARING]]
    assert logged[BANK] == [story.s[WEB1][BANK]]
    assert step.data["clear"] == 0
    assert step.data["second_network"]  # bank's other network, over its own CHILD_SAs


def test_partner_initiated_connections_reach_the_right_instance(steps):
    step = _step(steps, "partner_initiated")
    assert step.ok, step.figure
    answers = step.data["answers"]
    assert answers[CLEARING][1] == "web-1 saw 100.64.0.80"  # the alias, not card's address
    assert answers[CARD][1] == "web-1 saw 192.0.2.80"


def test_an_instance_of_card_only_never_reaches_bank_or_clearing(steps):
    step = _step(steps, "only_card")
    assert step.ok, step.figure
    assert not step.data["logged"][BANK] and not step.data["logged"][CLEARING]
    assert step.data["dropped"] > 0


def test_bank_healed_alone_card_and_clearing_lose_nothing(steps):
    step = _step(steps, "heal_bank")
    assert step.ok, step.figure
    heal = step.data["partners_heal"]
    assert heal["lost"][CARD] == 0 and heal["lost"][CLEARING] == 0
    assert heal["clear"] == 0
    assert [r["TunnelName"] for r in heal["restarts"]] == [BANK]
    assert all(heal["untouched"].values())


def test_bank_daemon_killed_only_bank_reestablished(steps):
    step = _step(steps, "bank_peer_killed")
    data = step.data
    # Card and clearing untouched and lossless, nothing in clear text; bank's four per-pair
    # CHILD_SAs keep their pinned reqids (strongSwan issue #1855 otherwise: two pairs on one).
    assert data["lost"][CARD] == 0 and data["lost"][CLEARING] == 0, step.figure
    assert all(data["untouched"].values()) and data["clear"] == 0, step.figure
    assert not data["shared_reqids"], step.figure
    assert step.ok, step.figure


# -- the lab's own plan, without a lab (no namespaces, no root needed beyond the lab marker) ----


def test_the_labs_partners_file_is_valid_and_aliases_clearing(tmp_path):
    path = tmp_path / "partners.yaml"
    path.write_text(PARTNERS_YAML)
    plan = load_partners(path)
    lanes = {lane.name: lane for lane in plan.lanes("lab", "tunnelnat")}
    assert list(lanes) == [CARD, BANK, CLEARING]
    assert lanes[CLEARING].networks == lanes[CARD].networks  # the overlap
    assert [str(a) for a in lanes[CLEARING].aliases] == ["100.64.0.0/24"]
    assert lanes[BANK].ike_version == 1 and plan[BANK].partner.layout == "per-pair"
    assert lanes[BANK].tag_key == "tunnelnat:partner:bank"


def test_the_banks_side_is_ikev1_main_mode_one_selector_pair_per_child():
    conf = bank_conf("k" * 48, ["203.0.113.20", "203.0.113.21"], ["172.20.0.0/24", "172.20.5.0/28"])
    assert "version = 1" in conf and "aggressive = no" in conf
    local = re.findall(r"local_ts = (\S+)", conf)
    remote = re.findall(r"remote_ts = (\S+)", conf)
    assert len(local) == len(remote) == 4 and not any("," in ts for ts in local + remote)
    assert sorted(zip(local, remote, strict=True)) == sorted(
        (n, f"{s}/32")
        for n in ("172.20.0.0/24", "172.20.5.0/28")
        for s in ("203.0.113.20", "203.0.113.21")
    )


RAW = (
    "list-sa event {bank {uniqueid=2 version=1 state=ESTABLISHED child-sas {bank-1-2 {name=bank-1 "
    "uniqueid=2 reqid=2 state=INSTALLED packets-in=3 packets-out=4 local-ts=[203.0.113.20/32] "
    "remote-ts=[172.20.0.0/24]} bank-2-3 {name=bank-2 uniqueid=3 reqid=2 state=INSTALLED "
    "packets-in=0 packets-out=1 local-ts=[203.0.113.20/32] remote-ts=[172.20.5.0/28]}}}}\n"
    "list-sa event {card {uniqueid=5 version=2 state=ESTABLISHED child-sas {card-7 {name=card "
    "uniqueid=7 reqid=1 state=INSTALLED local-ts=[203.0.113.10/32 203.0.113.11/32] "
    "remote-ts=[192.0.2.0/24]}}}}\n"
    "list-sas reply {}\n"
)


def test_list_sas_raw_is_read_per_connection():
    sas = parse_list_sas(RAW)
    assert sas["bank"]["version"] == 1 and sas["bank"]["ike_ids"] == ["2"]
    assert sas["bank"]["children"] == {"bank-1": 1, "bank-2": 1}
    assert sas["bank"]["packets_in"] == 3 and sas["bank"]["packets_out"] == 5
    assert sas["card"]["selectors"]["card"] == (
        ["203.0.113.10/32", "203.0.113.11/32"],
        ["192.0.2.0/24"],
    )
    assert shared_reqids(sas["bank"]["reqids"]) == {"2": ["bank-1", "bank-2"]}
