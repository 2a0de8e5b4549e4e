"""The health agent's one-line diagnosis, from charon's own log lines as the lab's broken
partners made them (tests/unit/data/charon/*.log, captured from tn-gw's CharonLog running
lab/partners.py's profiles), and per-pair tunnels counted as up only when every pair is."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "gateway"))
from tunnelnat_gateway import health as agent  # noqa: E402

CHARON = Path(__file__).parent / "data" / "charon"
FACTS = {
    "children": ["partner"],
    "ike": "aes256-sha256-modp2048",
    "esp": "aes256-sha256-modp2048",
    "log": "/var/log/tunnelnat/charon.log",
}


def diagnosis(name: str, now_offset: int = 5) -> str | None:
    text = (CHARON / f"{name}.log").read_text()
    last = int(text.strip().splitlines()[-1].split()[0])
    return agent.diagnose(text, "partner", FACTS, last + now_offset)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("wrong-psk", "authentication failed: the partner refused our pre-shared key"),
        (
            "no-common-proposal",
            "no common ESP proposal: the partner accepts none of ours (we offer "
            "aes256-sha256-modp2048)",
        ),
        ("selector-mismatch", "traffic selectors unacceptable: the partner refused partner's"),
        ("partner-down", "partner not answering (retransmits to 198.51.100.40 for "),
    ],
)
def test_each_broken_partner_is_named_in_one_line(name, expected):
    line = diagnosis(name)
    assert line is not None and line.startswith(expected), line
    assert "\n" not in line and line.endswith(" s ago]")


def test_a_success_after_a_failure_clears_the_diagnosis():
    text = (CHARON / "wrong-psk.log").read_text()
    ok = "1796034700 09[IKE] <partner|9> CHILD_SA partner{9} established with SPIs a_i b_o and TS x"
    assert agent.diagnose(text + ok + "\n", "partner", FACTS, 1796034701) is None


def test_other_tunnels_and_noise_are_ignored():
    text = (CHARON / "wrong-psk.log").read_text().replace("<partner|", "<acme|")
    assert agent.diagnose(text, "partner", FACTS, 1796034700) is None
    assert agent.diagnose("garbage\n\n", "partner", FACTS, 0) is None


def test_log_tail_reads_only_the_end(tmp_path):
    log = tmp_path / "charon.log"
    log.write_text("x" * 100_000 + "\nlast line\n")
    assert agent.read_log_tail(str(log), size=20).endswith("last line\n")
    assert agent.read_log_tail(str(tmp_path / "missing")) == ""
    assert agent.read_log_tail(None) == ""


def _reading(*children: tuple[str, str]) -> agent.SaReading:
    kids = tuple(agent.ChildSa(name, state) for name, state in children)
    return agent.SaReading((agent.IkeSa("partner", "ESTABLISHED", kids),))


def test_per_pair_tunnel_is_up_only_when_every_pair_is_installed():
    names = ["partner-1", "partner-2", "partner-3"]
    all_up = _reading(*((n, "INSTALLED") for n in names), ("partner-2", "REKEYED"))
    status = agent.sa_status("partner", all_up, names)
    assert status.up and status.installed == 3
    one_missing = _reading(("partner-1", "INSTALLED"), ("partner-3", "INSTALLED"))
    status = agent.sa_status("partner", one_missing, names)
    assert not status.up and status.reason == "2 of 3 child SAs installed (missing partner-2)"
    # Without ConfigureGateway's list: the child named as the tunnel, as before.
    assert agent.sa_status("partner", _reading(("partner", "INSTALLED"))).up
    assert not agent.sa_status("partner", one_missing).up
