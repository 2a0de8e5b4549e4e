"""The gateway's sync program against the real nft, in a throwaway network namespace.

DynamoDB is moto in the namespace's process, written by the real store (its change log and
checksum), except where a test writes behind its back on purpose. Under test: full rebuild at
boot, deltas after, forced, gap and drift rebuilds, never going back to an older generation,
leaving out and reporting malformed rows, and (with random changes) that a delta leaves exactly
the sets and maps a full rebuild of the same generation leaves.
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

PRELUDE = textwrap.dedent(
    """
    import json, os, subprocess, sys
    from ipaddress import IPv4Address as A
    from pathlib import Path
    sys.path[:0] = [{repo!r} + "/lambdas", {repo!r} + "/gateway"]
    os.environ.update(AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="x",
                      AWS_DEFAULT_REGION="us-east-1")
    import boto3
    from moto import mock_aws
    from tunnelnat_gateway import nat_sync as g
    from tunnelnat.adapters.store import EnrolmentStore, MappingChange, StoredMapping

    g.STATE_DIR = Path({tmp!r}); g.BASE_FILE = g.STATE_DIR / "gateway.json"
    g.BOOT_RULESET = g.STATE_DIR / "tunnelnat.nft"; g.LOCK_FILE = g.STATE_DIR / "lock"
    BASE = json.dumps({{"partner_networks": ["192.0.2.0/24"], "tunnel_interface": "ipsec0"}})

    def nft(*args):
        return subprocess.run(["nft", *args], capture_output=True, text=True)

    def m(i, p, s):
        return StoredMapping(f"i-{{i:017x}}", A(p), A(s))

    def listing():
        # Every set's and map's elements: what the delta and the full path must agree on.
        out = {{}}
        for e in json.loads(nft("-j", "list", "table", "ip", "tunnelnat").stdout)["nftables"]:
            for kind in ("set", "map"):
                if kind in e:
                    out[e[kind]["name"]] = sorted(json.dumps(x) for x in e[kind].get("elem", []))
        return out

    mock = mock_aws(); mock.start()
    db = boto3.client("dynamodb")
    db.create_table(TableName="t", BillingMode="PAY_PER_REQUEST",
        KeySchema=[{{"AttributeName": "pk", "KeyType": "HASH"}},
                   {{"AttributeName": "sk", "KeyType": "RANGE"}}],
        AttributeDefinitions=[{{"AttributeName": "pk", "AttributeType": "S"}},
                              {{"AttributeName": "sk", "AttributeType": "S"}}])
    store = EnrolmentStore(db, "t")
    out = []
    """
)

SCRIPT = PRELUDE + textwrap.dedent(
    """
    try:
        g.sync(db, "t")
    except g.GatewayError as e:
        out.append({{"error": str(e)}})
    gen = store.write_mappings([MappingChange("i-1", m(1, "10.10.1.21", "203.0.113.10"), None)],
                               generation=0, claim=True)
    out.append(g.configure(db, "t", BASE))
    out.append(g.sync(db, "t"))
    gen = store.write_mappings([MappingChange(x.instance_id, x, None) for x in (
        m(2, "10.10.1.22", "203.0.113.11"), m(3, "10.10.1.23", "203.0.113.12"))],
        generation=gen, claim=True)
    out.append(g.sync(db, "t"))
    meta = {{"pk": {{"S": "meta"}}, "sk": {{"S": "generation"}}}}
    saved = db.get_item(TableName="t", Key=meta)["Item"]
    db.put_item(TableName="t", Item={{**saved, "generation": {{"N": "1"}}}})  # restored backup
    out.append(g.sync(db, "t"))
    db.put_item(TableName="t", Item=saved)
    # Rows written behind the store's back, the generation bumped without a change-log entry.
    def row(i, p, s):
        item = {{"pk": {{"S": "mapping"}}, "sk": {{"S": f"i-x{{i}}"}}, "private_ip": {{"S": p}}}}
        if s:
            item["public_ip"] = {{"S": s}}
        db.put_item(TableName="t", Item=item)
    row(4, "10.10.1.24; flush ruleset", "203.0.113.13")
    row(5, "10.10.1.22", "203.0.113.14")
    row(6, "10.10.1.25", None)
    gen = int(saved["generation"]["N"]) + 1
    db.put_item(TableName="t", Item={{**saved, "generation": {{"N": str(gen)}}}})
    out.append(g.sync(db, "t"))
    out.append({{"applied": g.applied_generation()}})
    out.append({{"snat_map": nft("list", "map", "ip", "tunnelnat", "snat_map").stdout}})
    # While a row is left out, the applied checksum is not the desired one: full, every time.
    gen = store.write_mappings([MappingChange("i-7", m(7, "10.10.1.27", "203.0.113.17"), None)],
                               generation=gen, claim=True)
    out.append(g.sync(db, "t"))
    # What a restart leaves (the health agent's test does the same): applied_generation
    # emptied, applied_state untouched. The contract reads that as nothing applied since boot.
    nft("flush", "set", "ip", "tunnelnat", "applied_generation")
    out.append(g.sync(db, "t"))
    print(json.dumps(out))
    """
)


def isolated_env() -> dict[str, str]:
    """The scripts mock AWS in-process inside a namespace with no network: an endpoint another
    suite on this worker left in the environment (tests/lambdas' moto server) must not leak in."""
    return {k: v for k, v in os.environ.items() if not k.startswith("AWS_ENDPOINT_URL")}


def run(script: str, tmp_path: Path) -> list:
    proc = subprocess.run(
        ["unshare", "-n", sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=isolated_env(),
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_sync_applies_deltas_forward_only_and_isolates_bad_rows(tmp_path):
    script = SCRIPT.format(repo=str(REPO), tmp=str(tmp_path))
    missing, configured, unchanged, delta, older, gap, applied, listing, drift, booted = run(
        script, tmp_path
    )
    assert "run ConfigureGateway first" in missing["error"]
    assert configured == {**configured, "action": "full", "reason": "forced"}
    assert configured["applied_generation"] == 1 and configured["previous_generation"] is None
    assert unchanged == {**unchanged, "action": "unchanged", "items_read": 1, "mappings": 1}
    # One generation, two rows added: the meta item and one change-log entry read.
    assert delta == {**delta, "action": "delta", "added": 2, "removed": 0, "mappings": 3}
    assert delta["items_read"] == 2 and delta["applied_generation"] == 2
    assert older == {**older, "action": "unchanged", "applied_generation": 2}, "never backwards"
    # Issue 14: bad rows are left out and reported; every other row is applied.
    assert gap == {**gap, "action": "full", "reason": "gap", "applied_generation": 3}
    assert gap["mappings"] == 2 and gap["rejected_count"] == 4  # 22 twice, 24, 25
    assert gap["items_read"] == 1 + 6
    reasons = {(r["private_ip"], r["reason"].split(":")[0]) for r in gap["rejected"]}
    assert (
        "10.10.1.22",
        "private address 10.10.1.22 is mapped to both 203.0.113.11 and 203.0.113.14",
    ) in reasons
    assert ("10.10.1.24; flush ruleset", "not an IPv4 address") in reasons
    assert ("10.10.1.25", "not an IPv4 address") in reasons
    assert applied == {"applied": 3}
    for private in ("10.10.1.21", "10.10.1.23"):
        assert private in listing["snat_map"]
    assert "10.10.1.22" not in listing["snat_map"] and "flush" not in listing["snat_map"]
    assert drift == {**drift, "action": "full", "reason": "drift", "applied_generation": 4}
    assert drift["mappings"] == 3 and drift["rejected_count"] == 4
    assert booted == {**booted, "action": "full", "reason": "boot", "applied_generation": 4}
    assert booted["previous_generation"] is None
    boot = (tmp_path / "tunnelnat.nft").read_text()
    assert boot.count("elements") == 3  # nets, then generation and state, flushed after
    assert boot.endswith("flush set ip tunnelnat applied_state\n")


EQUIVALENCE_SCRIPT = PRELUDE + textwrap.dedent(
    """
    import random
    rng = random.Random({seed})
    nft("add", "table", "ip", "tunnelnat")
    g.STATE_DIR.mkdir(parents=True, exist_ok=True)
    g.BASE_FILE.write_text(BASE)
    gen, held = 0, {{}}  # instance number -> StoredMapping
    out.append(g.sync(db, "t"))
    for step in range({steps}):
        taken_p = {{str(x.private_ip) for x in held.values()}}
        taken_s = {{str(x.public_ip) for x in held.values()}}
        changes = []
        for i in rng.sample(range(8), rng.randint(1, 3)):
            old = held.get(i)
            if old is not None and rng.random() < 0.4:
                new = None
            else:
                keep = old is not None and rng.random() < 0.5
                p = str(old.private_ip) if keep else next(
                    (x for x in rng.sample([f"10.10.1.{{k}}" for k in range(21, 31)], 10)
                     if x not in taken_p), None)
                s = next((x for x in rng.sample([f"203.0.113.{{k}}" for k in range(10, 20)], 10)
                          if x not in taken_s), None)
                if p is None or s is None:
                    continue
                taken_p.add(p); taken_s.add(s)
                new = m(i, p, s)
            changes.append(MappingChange(f"i-{{i:017x}}", new, old))
            held[i] = new
        held = {{k: v for k, v in held.items() if v is not None}}
        # Removals first, one transaction each (the controller's cut keeps one touch per item).
        for change in sorted(changes, key=lambda c: c.new is not None):
            gen = store.write_mappings([change], generation=gen, claim=True)
        if rng.random() < 0.2:  # the gateway falls several generations behind
            continue
        gone = [str(c.previous.private_ip) for c in changes if c.previous is not None]
        if gone and rng.random() < 0.2:  # removed by hand, then by the delta: nft refuses it
            nft("delete", "element", "ip", "tunnelnat", "snat_map", "{{ " + gone[0] + " }}")
        report = g.sync(db, "t")
        delta = listing()
        g.sync(db, "t", full=True)
        full = listing()
        out.append({{"report": report, "same": delta == full, "gen": gen,
                    "delta": delta, "full": full}})
    print(json.dumps(out))
    """
)


@pytest.mark.parametrize("seed", [1, 2])
def test_delta_and_full_leave_the_same_sets_and_maps_in_the_kernel(tmp_path, seed):
    """Random changes through the real store (moto), each sync applied by real nft: the sets
    and maps after a delta are exactly those a full rebuild of the same generation leaves."""
    script = EQUIVALENCE_SCRIPT.format(repo=str(REPO), tmp=str(tmp_path), seed=seed, steps=25)
    boot, *steps = run(script, tmp_path)
    assert boot == {**boot, "action": "full", "reason": "boot"}
    actions: dict[str, int] = {}
    for step in steps:
        report = step["report"]
        assert report["applied_generation"] == step["gen"]
        assert step["same"], (report, step["delta"], step["full"])
        key = report["action"] + ("/" + report["reason"] if "reason" in report else "")
        actions[key] = actions.get(key, 0) + 1
    assert actions.get("delta", 0) >= 10, actions  # the delta path does the work
    assert actions.get("full/drift", 0) >= 1, actions  # and refusals are rebuilt from


BOOT_SCRIPT = textwrap.dedent(
    """
    import json, subprocess, sys
    from pathlib import Path
    sys.path[:0] = [{repo!r} + "/lambdas", {repo!r} + "/gateway"]
    from tunnelnat_gateway import nat_sync as g

    g.STATE_DIR = Path({tmp!r}); g.BASE_FILE = g.STATE_DIR / "gateway.json"
    g.BOOT_RULESET = g.STATE_DIR / "tunnelnat.nft"; g.LOCK_FILE = g.STATE_DIR / "lock"

    class Table:
        generation = 0
        def get_item(self, **kw):
            return {{"Item": {{"generation": {{"N": str(self.generation)}}}}}}
        def query(self, **kw):
            return {{"Items": []}}

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
        ["unshare", "-n", sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=isolated_env(),
    )
    assert proc.returncode == 0, proc.stderr
    configured, again, restored, synced, applied = json.loads(proc.stdout)
    assert configured["action"] == "full" and configured["applied_generation"] == 0
    assert again["action"] == "unchanged"
    assert restored["loaded"] == 0 and restored["applied"] is None
    assert 'oifname != "ipsec0"' in restored["guard"] and "drop" in restored["guard"]
    assert synced["action"] == "full" and synced["previous_generation"] is None
    assert applied == {"applied": 0}
