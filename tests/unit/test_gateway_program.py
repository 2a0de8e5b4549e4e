"""The gateway's sync program against the real nft, in a throwaway network namespace.

DynamoDB is a small stand-in here (the moto-backed path is covered in tests/lambdas and the lab):
what is under test is the program's own logic — full render when the table is missing, map-only
updates, never going back to an older generation, refusing malformed rows.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("nft") or not shutil.which("unshare"),
    reason="needs root, nft and unshare for a private network namespace",
)

SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    sys.path[:0] = [{repo!r} + "/lambdas", {repo!r} + "/gateway"]
    import tunnelnat_gateway as g

    g.STATE_DIR = Path({tmp!r}); g.BASE_FILE = g.STATE_DIR / "gateway.json"
    g.BOOT_RULESET = g.STATE_DIR / "tunnelnat.nft"; g.LOCK_FILE = g.STATE_DIR / "lock"

    class Table:
        def __init__(self): self.generation = 0; self.rows = []
        def get_item(self, **kw):
            return {{"Item": {{"generation": {{"N": str(self.generation)}}}}}}
        def get_paginator(self, name):
            rows = self.rows
            class P:
                def paginate(self, **kw):
                    return [{{"Items": rows[i:i + 2]}} for i in range(0, max(len(rows), 1), 2)]
            return P()

    def row(p, s): return {{"private_ip": {{"S": p}}, "public_ip": {{"S": s}}}}
    t = Table(); out = []
    base = json.dumps({{"partner_networks": ["192.0.2.0/24"], "tunnel_interface": "ipsec0"}})
    try:
        g.sync(t, "x")
    except g.GatewayError as e:
        out.append({{"error": str(e)}})
    t.generation = 1; t.rows = [row("10.10.1.21", "203.0.113.10")]
    out.append(g.configure(t, "x", base))
    out.append(g.sync(t, "x"))
    t.generation = 3
    t.rows += [row("10.10.1.22", "203.0.113.11"), row("10.10.1.23", "203.0.113.12")]
    out.append(g.sync(t, "x"))
    t.generation = 2; t.rows = []
    out.append(g.sync(t, "x"))
    t.generation = 4
    t.rows = [row("10.10.1.21", "203.0.113.10"), row("10.10.1.22", "203.0.113.11"),
              row("10.10.1.23", "203.0.113.12"), row("10.10.1.24; flush ruleset", "203.0.113.13"),
              row("10.10.1.22", "203.0.113.14"), {{"private_ip": {{"S": "10.10.1.25"}}}}]
    out.append(g.sync(t, "x"))
    out.append({{"applied": g.applied_generation()}})
    import subprocess
    listing = subprocess.run(["nft", "list", "map", "ip", "tunnelnat", "snat_map"],
                             capture_output=True, text=True).stdout
    out.append({{"snat_map": listing}})
    print(json.dumps(out))
    """
)


def test_sync_applies_forward_only_and_refuses_bad_rows(tmp_path):
    script = SCRIPT.format(repo=str(REPO), tmp=str(tmp_path))
    proc = subprocess.run(
        ["unshare", "-n", sys.executable, "-c", script], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    missing, configured, unchanged, updated, older, malformed, applied, listing = json.loads(
        proc.stdout
    )
    assert "run ConfigureGateway first" in missing["error"]
    assert configured["action"] == "full" and configured["applied_generation"] == 1
    assert unchanged["action"] == "unchanged"
    assert updated["action"] == "updated" and updated["mappings"] == 3
    assert older == {**older, "action": "unchanged", "applied_generation": 3}, "never backwards"
    # Issue 14: bad rows are left out and reported; every other row is applied.
    assert malformed["action"] == "updated" and malformed["applied_generation"] == 4
    assert malformed["mappings"] == 2 and malformed["rejected_count"] == 4  # 22 twice, 24, 25
    reasons = {(r["private_ip"], r["reason"].split(":")[0]) for r in malformed["rejected"]}
    assert (
        "10.10.1.22",
        "private address 10.10.1.22 is mapped to both 203.0.113.11 and 203.0.113.14",
    ) in reasons
    assert ("10.10.1.24; flush ruleset", "not an IPv4 address") in reasons
    assert ("10.10.1.25", "not an IPv4 address") in reasons
    assert applied == {"applied": 4}
    for private in ("10.10.1.21", "10.10.1.23"):
        assert private in listing["snat_map"]
    assert "10.10.1.22" not in listing["snat_map"] and "flush" not in listing["snat_map"]
    assert (tmp_path / "tunnelnat.nft").read_text().count("elements") == 2  # nets + generation


BOOT_SCRIPT = textwrap.dedent(
    """
    import json, subprocess, sys
    from pathlib import Path
    sys.path[:0] = [{repo!r} + "/lambdas", {repo!r} + "/gateway"]
    import tunnelnat_gateway as g

    g.STATE_DIR = Path({tmp!r}); g.BASE_FILE = g.STATE_DIR / "gateway.json"
    g.BOOT_RULESET = g.STATE_DIR / "tunnelnat.nft"; g.LOCK_FILE = g.STATE_DIR / "lock"

    class Table:
        generation = 0
        def get_item(self, **kw):
            return {{"Item": {{"generation": {{"N": str(self.generation)}}}}}}
        def get_paginator(self, name):
            class P:
                def paginate(self, **kw):
                    return [{{"Items": []}}]
            return P()

    def nft(*args):
        return subprocess.run(["nft", *args], capture_output=True, text=True)

    out = []
    base = json.dumps({{"partner_networks": ["192.0.2.0/24"], "tunnel_interface": "ipsec0"}})
    out.append(g.configure(Table(), "x", base))  # generation 0: still "applied"
    out.append(g.sync(Table(), "x"))
    # A reboot: the kernel forgets everything, the restore unit loads the saved ruleset.
    nft("flush", "ruleset")
    loaded = nft("-f", str(g.BOOT_RULESET))
    out.append({{"loaded": loaded.returncode, "applied": g.applied_generation(),
                 "guard": nft("list", "chain", "ip", "tunnelnat", "guard").stdout}})
    out.append(g.sync(Table(), "x"))
    out.append({{"applied": g.applied_generation()}})
    print(json.dumps(out))
    """
)


def test_the_boot_ruleset_is_guarded_and_reads_as_nothing_applied(tmp_path):
    """The contract with the health agent: the set is empty after a restore, and every
    successful sync (also of generation 0) fills it."""
    script = BOOT_SCRIPT.format(repo=str(REPO), tmp=str(tmp_path))
    proc = subprocess.run(
        ["unshare", "-n", sys.executable, "-c", script], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    configured, again, restored, synced, applied = json.loads(proc.stdout)
    assert configured["action"] == "full" and configured["applied_generation"] == 0
    assert again["action"] == "unchanged"
    assert restored["loaded"] == 0 and restored["applied"] is None
    assert 'oifname != "ipsec0"' in restored["guard"] and "drop" in restored["guard"]
    assert synced["action"] == "full" and synced["previous_generation"] is None
    assert applied == {"applied": 0}
