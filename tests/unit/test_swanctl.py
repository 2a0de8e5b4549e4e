"""The partner's tunnel as charon reads it: every setting asserted where it is rendered
(lambdas/tunnelnat/core/swanctl.py, run on the gateway by ConfigureTunnel), and the proposal
policy checked at synthesis (core/crypto.py)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tunnelnat.core import crypto, swanctl

ROOT = Path(__file__).resolve().parents[2]
DOCUMENT = yaml.safe_load((ROOT / "ssm_documents" / "ConfigureTunnel.yaml").read_text())
DEFAULTS = {k: v.get("default") for k, v in DOCUMENT["parameters"].items()}


def environ(**overrides: str) -> dict[str, str]:
    """TN_* as ConfigureTunnel sets them, from the document's own defaults."""
    d = DEFAULTS
    env = {
        "TN_PARTNER": "198.51.100.40",
        "TN_NETS": "192.0.2.0/24,198.51.100.128/26",
        "TN_PUBLIC": "203.0.113.10,203.0.113.11",
        "TN_LOCAL_ID": "198.51.100.10",
        "TN_REMOTE_ID": d["RemoteId"],
        "TN_IKE": d["IkeProposals"],
        "TN_ESP": d["EspProposals"],
        "TN_IKE_LIFE": d["IkeLifetimes"],
        "TN_CHILD_LIFE": d["ChildLifetimes"],
        "TN_DPD": d["Dpd"],
        "TN_LAYOUT": d["SelectorLayout"],
        "TN_KEYINGTRIES": d["KeyingTries"],
        "TN_START": d["StartAction"],
        "TN_LOG": d["CharonLog"],
        "TN_TUNNEL": d["TunnelName"],
        "TN_BACKEND": d["IpsecBackend"],
        "TN_LOCAL_ADDR": d["LocalAddress"],
    }
    return env | overrides


def render(**overrides: str) -> str:
    return swanctl.render_connection(swanctl.from_environ(environ(**overrides)))


def lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines()]


def section(text: str, name: str) -> list[str]:
    """The lines of section ``name`` (its own settings, not its subsections')."""
    out, depth, inside = [], 0, False
    for line in lines(text):
        if not inside:
            inside = line == f"{name} {{"
            continue
        if line.endswith("{"):
            depth += 1
        elif line == "}":
            if depth == 0:
                return out
            depth -= 1
        elif depth == 0:
            out.append(line)
    raise AssertionError(f"no section {name}")


def test_defaults_a_strict_peer_accepts():
    conn = section(render(), "partner")
    assert conn == [
        "version = 2",
        "remote_addrs = 198.51.100.40",
        "encap = no",
        "mobike = no",
        "proposals = aes256-sha256-modp2048",
        "rekey_time = 28260s",  # + over_time: the IKE SA lives 8 h at most, as AWS's
        "over_time = 540s",
        "rand_time = 540s",
        "dpd_delay = 10s",
        "keyingtries = 0",  # never give up on a partner that is not up yet
        "unique = replace",  # a partner initiating too: its second IKE SA replaces ours
    ]
    text = render()
    assert section(text, "local") == ["auth = psk", 'id = "198.51.100.10"']
    assert section(text, "remote") == ["auth = psk", 'id = "198.51.100.40"']
    child = section(text.split("children {", 1)[1], "partner")
    assert child == [
        "local_ts = 203.0.113.10/32,203.0.113.11/32",
        "remote_ts = 192.0.2.0/24,198.51.100.128/26",
        "esp_proposals = aes256-sha256-modp2048",  # a DH group: PFS on every rekey
        "rekey_time = 3060s",
        "life_time = 3600s",  # AWS's phase 2 lifetime; rekeyed 9-18 min before
        "rand_time = 540s",
        "start_action = start",
        "dpd_action = restart",
    ]
    assert "close_action" not in text  # restart storms (DESIGN, Lessons)
    assert all(
        not crypto.proposal_problems(p, esp=True) for p in DEFAULTS["EspProposals"].split(",")
    )


def test_every_setting_follows_its_parameter():
    text = render(
        TN_IKE="aes256gcm16-prfsha384-ecp384,aes128-sha256-modp3072",
        TN_ESP="aes256gcm16-ecp384",
        TN_IKE_LIFE="3600,60,30",
        TN_CHILD_LIFE="20,40,5",
        TN_DPD="5,10",
        TN_KEYINGTRIES="3",
        TN_LOCAL_ID="gw.example.com",
        TN_REMOTE_ID="@#0a1b2c",
        TN_BACKEND="libipsec",
        TN_TUNNEL="acme",
    )
    conn = section(text, "acme")
    for expected in (
        "proposals = aes256gcm16-prfsha384-ecp384,aes128-sha256-modp3072",
        "rekey_time = 3600s",
        "over_time = 60s",
        "rand_time = 30s",
        "dpd_delay = 5s",
        "keyingtries = 3",
        "encap = yes",  # userspace ESP travels in UDP only
    ):
        assert expected in conn
    assert 'id = "gw.example.com"' in section(text, "local")
    assert 'id = "@#0a1b2c"' in section(text, "remote")
    child = section(text.split("children {", 1)[1], "acme")
    for expected in ("esp_proposals = aes256gcm16-ecp384", "rekey_time = 20s", "life_time = 40s"):
        assert expected in child
    assert "rand_time = 5s" in child


def test_responder_only_waits_for_the_partner_and_clears_on_dpd():
    text = render(TN_START="none")
    child = section(text.split("children {", 1)[1], "partner")
    assert child[-2:] == ["start_action = none", "dpd_action = clear"]
    assert section(text, "partner")[-1] == "unique = replace"  # whoever initiated it


def test_per_pair_layout_has_one_child_per_public_address_and_partner_network():
    text = render(TN_LAYOUT="per-pair")
    children = re.findall(r"^      (\S+) \{$", text, re.MULTILINE)
    assert children == ["partner-1", "partner-2", "partner-3", "partner-4"]
    pairs = re.findall(r"local_ts = (\S+)\n\s+remote_ts = (\S+)", text)
    assert pairs == [
        ("203.0.113.10/32", "192.0.2.0/24"),
        ("203.0.113.10/32", "198.51.100.128/26"),
        ("203.0.113.11/32", "192.0.2.0/24"),
        ("203.0.113.11/32", "198.51.100.128/26"),
    ]
    # Every child carries the whole crypto and DPD set, not only the first.
    for setting in ("esp_proposals = aes256-sha256-modp2048", "dpd_action = restart"):
        assert text.count(setting) == 4
    assert text.count("life_time = 3600s") == 4


def test_charon_settings_make_dpd_timeout_the_retransmission_budget():
    tunnel = swanctl.from_environ(environ(TN_DPD="10,30"))
    text = swanctl.render_charon_settings(tunnel)
    top = section(text, "charon-systemd")
    assert top == ["retransmit_timeout = 6", "retransmit_base = 1", "retransmit_tries = 4"]
    # 4 retransmits at a fixed 6 s after the first send: dead after 5 x 6 = 30 s.
    timeout = float(top[0].split("= ")[1])
    assert timeout * (int(top[2].split("= ")[1]) + 1) == 30
    log = section(text, "tunnelnat")
    assert "path = /var/log/tunnelnat/charon.log" in log
    assert {"default = 1", "ike_name = yes", "time_format = %s", "flush_line = yes"} <= set(log)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"TN_IKE_LIFE": "60,10,60"}, "lifetimes"),
        ({"TN_CHILD_LIFE": "3600,3600,60"}, "lifetimes"),
        ({"TN_DPD": "1,30"}, "DpdDelay"),
        ({"TN_DPD": "10,5"}, "DpdTimeout"),
        ({"TN_PUBLIC": "192.0.2.1"}, "overlap"),
        ({"TN_LOCAL_ID": "256.1.1.1"}, "256"),
        (
            {
                "TN_LAYOUT": "per-pair",
                "TN_PUBLIC": "203.0.113.0/25",
                "TN_NETS": ",".join(f"10.{i}.0.0/16" for i in range(3)),
            },
            None,
        ),
    ],
)
def test_the_gateway_refuses_what_cannot_work(overrides, message):
    if message is None:  # 3 children: fine
        assert len(swanctl.from_environ(environ(**overrides)).children) == 3
        return
    with pytest.raises(ValueError, match=message):
        swanctl.from_environ(environ(**overrides))


def test_a_pair_gateway_initiates_only_from_the_address_on_the_eni():
    """LocalAddress (a gateway pair): local_addrs pins IKE to G, which only the ENI's holder has;
    empty (the default, a single gateway): no local_addrs, as before."""
    conn = section(render(TN_LOCAL_ADDR="10.10.0.10"), "partner")
    assert conn[1:3] == ["remote_addrs = 198.51.100.40", "local_addrs = 10.10.0.10"]
    assert "unique = replace" in conn  # INITIAL_CONTACT needs unique other than never
    assert not [line for line in section(render(), "partner") if line.startswith("local_addrs")]
    tunnel = swanctl.from_environ({k: v for k, v in environ().items() if k != "TN_LOCAL_ADDR"})
    assert tunnel.local_addr is None  # an older document's environment still renders
    with pytest.raises(ValueError):
        swanctl.from_environ(environ(TN_LOCAL_ADDR="10.10.0.300"))


def test_main_writes_what_configure_tunnel_installs(tmp_path):
    env = environ(TN_LAYOUT="per-pair", TN_BACKEND="libipsec", TN_PUBLIC="203.0.113.8/30")
    proc = subprocess.run(
        [sys.executable, "-m", "tunnelnat.core.swanctl", str(tmp_path)],
        env={**env, "PYTHONPATH": str(ROOT / "lambdas")},
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    facts = json.loads((tmp_path / "tunnel.json").read_text())
    assert facts == {
        "children": ["partner-1", "partner-2"],
        "ike": "aes256-sha256-modp2048",
        "esp": "aes256-sha256-modp2048",
        "log": "/var/log/tunnelnat/charon.log",
    }
    assert (tmp_path / "ids").read_text() == "198.51.100.10 198.51.100.40\n"
    assert (tmp_path / "lo_addresses").read_text() == "203.0.113.9\n"
    # The NAT table's fixed part is ConfigureGateway's, from its own parameters.
    assert not (tmp_path / "base.json").exists()
    assert (tmp_path / "tunnel.conf").read_text().count("start_action = start") == 2


def test_main_fails_with_one_line_naming_the_problem(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "tunnelnat.core.swanctl", str(tmp_path)],
        env={**environ(TN_DPD="10"), "PYTHONPATH": str(ROOT / "lambdas")},
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("ConfigureTunnel: ") and proc.stderr.count("\n") == 1


@pytest.mark.parametrize(
    ("proposal", "esp", "problem"),
    [
        ("aes256-sha256-modp2048", False, None),
        ("aes256gcm16-ecp384", True, None),
        ("aes128-sha256-x25519", True, None),
        ("aes256-sha256", True, "PFS"),  # what the gateway offered before: no PFS
        ("aes256-sha256", False, "DH group"),
        ("aes256-sha1-modp1024", False, "modp1024 is too weak"),
        ("3des-sha256-modp2048", True, "3des is too weak"),
        ("aes256;sha256", False, "not a proposal"),
    ],
)
def test_proposal_policy(proposal, esp, problem):
    problems = crypto.proposal_problems(proposal, esp=esp)
    if problem is None:
        assert problems == []
    else:
        assert any(problem in p for p in problems), problems


@pytest.mark.parametrize(
    "identity",
    ["198.51.100.10", "vpn.example.com", "@vpn.example.com", "ops@example.com", "@#0a1b2c3d"],
)
def test_identity_forms_are_accepted_by_policy_and_document(identity):
    assert crypto.IDENTITY.fullmatch(identity)
    assert re.fullmatch(DOCUMENT["parameters"]["RemoteId"]["allowedPattern"], identity)
    assert re.fullmatch(DOCUMENT["parameters"]["LocalId"]["allowedPattern"], identity)


@pytest.mark.parametrize("hostile", ['a"b', "a b", "a{b", "a#b", "a=b", "a\\b", "$(id)", "-x"])
def test_identities_that_would_break_swanctl_or_a_shell_are_refused(hostile):
    assert not crypto.IDENTITY.fullmatch(hostile)
    assert not re.fullmatch(DOCUMENT["parameters"]["RemoteId"]["allowedPattern"], hostile)


def test_policy_and_document_patterns_agree():
    assert DOCUMENT["parameters"]["LocalId"]["allowedPattern"] == f"^({crypto.IDENTITY.pattern})$"
    assert DOCUMENT["parameters"]["RemoteId"]["allowedPattern"] == f"^(|{crypto.IDENTITY.pattern})$"


# -- IKEv1 (issue 23: legacy partners' appliances speak IKEv1 main mode) ------------------------


def test_ikev1_is_main_mode_reauthenticates_and_has_its_own_dpd_timeout():
    text = render(TN_IKE_VERSION="1", TN_NETS="192.0.2.0/24", TN_PUBLIC="203.0.113.10")
    assert section(text, "partner") == [
        "version = 1",
        "remote_addrs = 198.51.100.40",
        "encap = no",
        "aggressive = no",  # main mode: the ID and the PSK's hash never in clear
        "proposals = aes256-sha256-modp2048",
        "rekey_time = 0s",  # IKEv1 cannot rekey an ISAKMP SA (swanctl.conf(5), rekey_time)
        "reauth_time = 28260s",  # it reauthenticates at IkeLifetimes' first value
        "over_time = 540s",
        "rand_time = 540s",
        "dpd_delay = 10s",
        "dpd_timeout = 30s",  # IKEv1 only; IKEv2's is charon's retransmissions
        "keyingtries = 0",
        "unique = replace",
    ]
    child = section(text.split("children {", 1)[1], "partner")
    assert child[:2] == ["local_ts = 203.0.113.10/32", "remote_ts = 192.0.2.0/24"]
    facts = json.loads(swanctl.render_files(swanctl.from_environ(environ(
        TN_IKE_VERSION="1", TN_LAYOUT="per-pair"
    )))["tunnel.json"])  # fmt: skip
    assert facts["ike_version"] == 1 and len(facts["children"]) == 4


def test_ikev1_refuses_a_multi_selector_child_sa_and_takes_per_pair():
    """Quick mode negotiates one selector pair: charon would use only the first of several
    (swanctl.conf(5), local_ts), the partner's other networks would never see the tunnel."""
    with pytest.raises(ValueError, match="IKEv1 negotiates one selector pair per CHILD_SA"):
        swanctl.from_environ(environ(TN_IKE_VERSION="1"))
    with pytest.raises(ValueError, match="IkeVersion"):
        swanctl.from_environ(environ(TN_IKE_VERSION="3"))
    text = render(TN_IKE_VERSION="1", TN_LAYOUT="per-pair")
    assert re.findall(r"^      (\S+) \{$", text, re.MULTILINE) == [
        "partner-1", "partner-2", "partner-3", "partner-4"
    ]  # fmt: skip
    assert not [x for x in re.findall(r"_ts = (\S+)", text) if "," in x]


def test_ikev2_is_what_it_was_and_its_facts_name_no_version():
    explicit = render(TN_IKE_VERSION="2")
    assert explicit == render() and "version = 2" in explicit and "reauth_time" not in explicit
    facts = json.loads(swanctl.render_files(swanctl.from_environ(environ()))["tunnel.json"])
    assert "ike_version" not in facts


def test_shared_charon_settings_one_tunnel_is_the_single_tunnel_file():
    tunnel = swanctl.from_environ(environ(TN_DPD="10,30"))
    assert swanctl.render_shared_charon_settings([(30, tunnel.log)]) == (
        swanctl.render_charon_settings(tunnel)
    )


def test_shared_charon_settings_take_the_smallest_dpd_timeout_and_every_log():
    text = swanctl.render_shared_charon_settings(
        [(60, "/var/log/tunnelnat/charon.log"), (30, "/var/log/tunnelnat/bank.log"),
         (120, "/var/log/tunnelnat/charon.log")]
    )  # fmt: skip
    assert section(text, "charon-systemd")[0] == "retransmit_timeout = 6"  # 30 / 5
    assert "path = /var/log/tunnelnat/bank.log" in section(text, "tunnelnat-bank")
    assert "path = /var/log/tunnelnat/charon.log" in section(text, "tunnelnat-charon")
    assert text.count("filelog {") == 1 and text.count("path = ") == 2
