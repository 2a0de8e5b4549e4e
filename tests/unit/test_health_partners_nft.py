"""The health agent on a several-partner NAT table (issue 23), with real nft in a private network
namespace: each tunnel's TunnelUp gates on its own partner's applied state (``applied_<name>``),
so one partner's maps not synced never read as another partner's tunnel down; NatMappings counts
every partner's mappings; the per-partner drop counters fold into the gateway's three.

The ruleset is core/nat.py's ``render_partners_table``; the namespace is this test's own
(``tnh-<pid>``), removed at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from ipaddress import IPv4Network
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "gateway"))
from tunnelnat.core.nat import MultiPartnerBase, NatTable, PartnerNat, render_partners_table  # noqa: E402
from tunnelnat_gateway import health as agent  # noqa: E402

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("nft"), reason="needs root and nft (a namespace)"
)
NS = f"tnh-{os.getpid()}"
# What swanctl lists: both tunnels established with their child.
RAW = "".join(
    f"list-sa event {{{t} {{uniqueid={i} state=ESTABLISHED child-sas {{{t}-{i} {{name={t} "
    f"uniqueid={i} state=INSTALLED bytes-in=1 bytes-out=1}}}}}}}}\n"
    for i, t in enumerate(("bank-a", "legacy-b"), 1)
)


@pytest.fixture(scope="module")
def ns():
    subprocess.run(["ip", "netns", "add", NS], check=True)
    try:
        base = MultiPartnerBase(
            (
                PartnerNat("bank-a", (IPv4Network("10.1.0.0/24"),)),
                PartnerNat("legacy-b", (IPv4Network("10.2.0.0/24"),)),
            ),
            tunnel_interfaces=("ipsec0",),
        )
        tables = {
            "bank-a": NatTable.from_rows(
                3, [("10.10.1.21", "203.0.113.20"), ("10.10.1.22", "203.0.113.21")]
            ),
            "legacy-b": NatTable.from_rows(5, [("10.10.1.21", "203.0.113.30")]),
        }
        text = render_partners_table(base, tables)
        subprocess.run(["ip", "netns", "exec", NS, "nft", "-f", "-"], input=text, text=True,
                       check=True)  # fmt: skip
        yield NS
    finally:
        subprocess.run(["ip", "netns", "del", NS], check=False)


def run_in(ns):
    def run(argv, **kw):
        if argv[0] == "swanctl":
            return subprocess.CompletedProcess(argv, 0, RAW, "")
        return subprocess.run(["ip", "netns", "exec", ns, *argv], **kw)  # noqa: S603

    return run


def collect(ns, tmp_path, tunnels=("bank-a", "legacy-b")):
    return agent.collect(
        list(tunnels),
        gateway="i-0123456789abcdef0",
        deployment="d",
        state_file=tmp_path / "state.json",
        established_file=tmp_path / "established.json",
        config_dir=tmp_path,
        now=1000.0,
        run=run_in(ns),
    )


def test_each_partner_applied_and_counted(ns, tmp_path):
    run = run_in(ns)
    assert agent.read_partner_applied("bank-a", run).generation == 3
    assert agent.read_partner_applied("legacy-b", run).generation == 5
    assert agent.read_partner_applied("nobody", run) is None  # no such set: the table's
    report = collect(ns, tmp_path)
    assert [(t.tunnel, t.up) for t in report.tunnels] == [("bank-a", True), ("legacy-b", True)]
    assert report.nat_mappings == 3  # 2 + 1, from each partner's enrolled set


def test_one_partner_not_synced_reads_down_alone(ns, tmp_path):
    """legacy-b's state flushed (its table could not be read at boot): the table's
    applied_generation is emptied too (not every lane applied), yet bank-a stays up."""
    for name in ("applied_legacy_b", "applied_generation"):
        subprocess.run(["ip", "netns", "exec", ns, "nft", "flush", "set", "ip", "tunnelnat", name],
                       check=True)  # fmt: skip
    report = collect(ns, tmp_path)
    up = {t.tunnel: (t.up, t.reason) for t in report.tunnels}
    assert up["bank-a"][0] is True
    assert up["legacy-b"][0] is False and "applied_legacy_b is empty" in up["legacy-b"][1]
    # One tunnel alone (a one-partner deployment): the table's applied_generation decides.
    (alone,) = collect(ns, tmp_path, ("bank-a",)).tunnels
    assert not alone.up and "applied_generation is empty" in alone.reason


def test_per_partner_counters_fold_into_the_gateways_three(ns, tmp_path):
    current = agent.read_counters(run_in(ns))
    assert {"dropped_unenrolled_bank_a", "dropped_inbound_legacy_b", "dropped_unclassified",
            "dropped_cleartext"} <= set(current)  # fmt: skip
    folded = agent.fold_counters(
        {"dropped_unenrolled_bank_a": 2, "dropped_unenrolled_legacy_b": 3,
         "dropped_inbound_bank_a": 1, "dropped_unclassified": 4, "dropped_cleartext": 5}
    )  # fmt: skip
    assert (folded["dropped_unenrolled"], folded["dropped_inbound"]) == (5, 5)
    assert folded["dropped_cleartext"] == 5
    one = {"dropped_unenrolled": 1, "dropped_inbound": 2, "dropped_cleartext": 3}
    assert agent.fold_counters(one) == one  # one partner's table: unchanged
    report = collect(ns, tmp_path)
    data = agent.metric_data(report, now=1000.0)
    names = {d["MetricName"] for d in data}
    assert {"DroppedUnenrolled", "DroppedInbound", "DroppedCleartext", "NatMappings"} <= names
    json.dumps(data)
