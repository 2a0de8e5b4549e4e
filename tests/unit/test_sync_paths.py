"""Each way a NAT sync can go, against the real nft in a private network namespace (issue 22).

unchanged, delta, full at boot, full on a gap in the change log, full on drift (applied_state
missing; the live maps changed behind the program's back while the generation stayed the same;
the same before a delta with ``--verify``; found by a forced sync). Each test asserts on the
report's action and reason AND on what the kernel holds afterwards, so each fails when its path
is skipped: an unchanged sync that did not read the maps back, or a delta built on them, leaves
the hand-made change in the kernel. DynamoDB is moto in the namespace's process, written by the
real store (its change log and checksum).

One script runs every scenario in order in one namespace (one moto start); the tests read its
record.
"""

from __future__ import annotations

import json
import textwrap

import pytest

from tests.unit.test_gateway_program import PRELUDE, REPO, pytestmark, run  # noqa: F401

SCRIPT = PRELUDE + textwrap.dedent(
    """
    from tunnelnat.core.nat import ipv4_int, mapping_digest, M32
    g.SOURCE_FILE = g.STATE_DIR / "source.json"
    meta = {{"pk": {{"S": "meta"}}, "sk": {{"S": "generation"}}}}

    seen = {{}}

    def kernel():
        # What the kernel holds, read independently of the program under test.
        sets = {{}}
        for e in json.loads(nft("-j", "list", "table", "ip", "tunnelnat").stdout)["nftables"]:
            if "table" in e:
                seen["handle"] = e["table"]["handle"]  # new when the whole table is rewritten
            body = e.get("set") or e.get("map")
            if body:
                sets[body["name"]] = body.get("elem", [])
        state = sets["applied_state"][0]["concat"] if sets["applied_state"] else None
        return {{"snat": dict(sets["snat_map"]), "dnat": dict(sets["dnat_map"]),
                "enrolled": sorted(sets["enrolled"]), "state": state,
                "generation": sets["applied_generation"]}}

    def wanted():
        # What a full rebuild of the store's table leaves: every row, its checksum.
        t = g.read_desired(db, "t", "dedicated")
        rows = dict(t.rows)
        return {{"snat": rows, "dnat": {{s: p for p, s in rows.items()}},
                "enrolled": sorted(rows), "state": [t.generation, t.checksum, len(rows)],
                "generation": [t.generation]}}

    def step(name, **kw):
        report = g.sync(db, "t", **kw)
        out.append({{"step": name, "report": report, "kernel": kernel(), "wanted": wanted(),
                    "table_handle": seen["handle"]}})

    gen = store.write_mappings([MappingChange(x.instance_id, x, None) for x in (
        m(1, "10.10.1.21", "203.0.113.10"), m(2, "10.10.1.22", "203.0.113.11"),
        m(3, "10.10.1.23", "203.0.113.12"))], generation=0, claim=True)
    g.configure(db, "t", BASE)

    # boot: the kernel forgot everything; the restore unit loaded the saved (empty) ruleset.
    nft("flush", "ruleset")
    assert nft("-f", str(g.BOOT_RULESET)).returncode == 0
    step("boot")

    step("unchanged")

    gen = store.write_mappings([MappingChange("i-4", m(4, "10.10.1.24", "203.0.113.13"), None)],
                               generation=gen, claim=True)
    step("delta")

    # gap: the change-log entry of the next generation expired and was deleted.
    gen = store.write_mappings([MappingChange("i-5", m(5, "10.10.1.25", "203.0.113.14"), None)],
                               generation=gen, claim=True)
    db.delete_item(TableName="t", Key={{"pk": {{"S": "change"}}, "sk": {{"S": f"{{gen:020d}}"}}}})
    step("gap")

    # drift, applied_state missing (an older program's table, or emptied by hand).
    nft("flush", "set", "ip", "tunnelnat", "applied_state")
    step("state-missing")

    # drift behind the back, the generation unchanged: one element deleted by hand...
    nft("delete", "element", "ip", "tunnelnat", "snat_map", "{{ 10.10.1.22 }}")
    step("deleted-by-hand")
    # ... dnat_map pointed elsewhere (the counts stay right)...
    nft("delete", "element", "ip", "tunnelnat", "dnat_map", "{{ 203.0.113.12 }}")
    nft("add", "element", "ip", "tunnelnat", "dnat_map", "{{ 203.0.113.99 : 10.10.1.23 }}")
    step("dnat-by-hand")
    # ... one S swapped consistently in both maps (only the checksum tells)...
    nft("delete", "element", "ip", "tunnelnat", "snat_map", "{{ 10.10.1.21 }}")
    nft("delete", "element", "ip", "tunnelnat", "dnat_map", "{{ 203.0.113.10 }}")
    nft("add", "element", "ip", "tunnelnat", "snat_map", "{{ 10.10.1.21 : 203.0.113.98 }}")
    nft("add", "element", "ip", "tunnelnat", "dnat_map", "{{ 203.0.113.98 : 10.10.1.21 }}")
    step("swapped-by-hand")
    # ... an unenrolled address let through the forward filter.
    nft("add", "element", "ip", "tunnelnat", "enrolled", "{{ 10.10.1.77 }}")
    nft("delete", "element", "ip", "tunnelnat", "enrolled", "{{ 10.10.1.24 }}")
    step("enrolled-by-hand")

    # A new generation with --verify: the live maps are checked before the delta builds on them.
    nft("delete", "element", "ip", "tunnelnat", "snat_map", "{{ 10.10.1.23 }}")
    gen = store.write_mappings([MappingChange("i-6", m(6, "10.10.1.26", "203.0.113.15"), None)],
                               generation=gen, claim=True)
    step("verify-before-delta", verify=True)
    # A verified delta on healthy maps is still a delta.
    gen = store.write_mappings([MappingChange("i-7", m(7, "10.10.1.27", "203.0.113.16"), None)],
                               generation=gen, claim=True)
    step("verified-delta", verify=True)

    # The scheduled forced sync says what it repaired.
    nft("delete", "element", "ip", "tunnelnat", "snat_map", "{{ 10.10.1.25 }}")
    step("forced", full=True)
    step("forced-clean", full=True)

    # Never backwards: a restored backup's older generation, the maps left as they are.
    saved = db.get_item(TableName="t", Key=meta)["Item"]
    db.put_item(TableName="t", Item={{**saved, "generation": {{"N": "1"}}}})
    step("older")
    db.put_item(TableName="t", Item=saved)
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def steps(tmp_path_factory) -> dict[str, dict]:
    tmp = tmp_path_factory.mktemp("sync-paths")
    record = run(SCRIPT.format(repo=str(REPO), tmp=str(tmp)), tmp)
    return {s["step"]: s for s in record}


def maps_only(steps: dict[str, dict], name: str) -> None:
    """A gap or a drift rewrites the maps in place: the chains (the guard) and their counters
    stay, the table is the one the step before left (nft gives a rewritten table a new handle)."""
    names = list(steps)
    before = steps[names[names.index(name) - 1]]
    assert steps[name]["table_handle"] == before["table_handle"]


def converged(step: dict) -> None:
    """The kernel holds exactly what a full rebuild of the store's table holds."""
    kernel, wanted = step["kernel"], step["wanted"]
    assert kernel == wanted, json.dumps({"kernel": kernel, "wanted": wanted})


def test_boot_rebuilds_the_whole_table(steps):
    step = steps["boot"]
    report = step["report"]
    assert report == {**report, "action": "full", "reason": "boot", "mappings": 3}
    assert report["previous_generation"] is None
    converged(step)


def test_unchanged_reads_the_maps_back_and_nothing_else(steps):
    step = steps["unchanged"]
    report = step["report"]
    assert report == {**report, "action": "unchanged", "verified": True, "items_read": 1}
    assert "reason" not in report
    converged(step)


def test_delta_reads_one_change_log_entry_and_applies_one_element(steps):
    step = steps["delta"]
    report = step["report"]
    assert report == {**report, "action": "delta", "added": 1, "removed": 0, "mappings": 4}
    assert report["items_read"] == 2  # the generation and one change-log entry, not the table
    assert "verified" not in report  # a delta does not read the maps back unless asked
    assert step["kernel"]["snat"]["10.10.1.24"] == "203.0.113.13"
    converged(step)


def test_a_gap_in_the_change_log_rebuilds_the_maps(steps):
    step = steps["gap"]
    report = step["report"]
    assert report == {**report, "action": "full", "reason": "gap", "mappings": 5}
    assert "is not in the change log" in report["detail"]
    converged(step)
    maps_only(steps, "gap")


def test_drift_when_applied_state_is_missing(steps):
    step = steps["state-missing"]
    report = step["report"]
    assert report == {**report, "action": "full", "reason": "drift"}
    assert report["detail"] == "applied_state is empty"
    converged(step)


@pytest.mark.parametrize(
    ("name", "detail"),
    [
        ("deleted-by-hand", "snat_map holds 4 elements, 5 were applied"),
        ("dnat-by-hand", "dnat_map is not the inverse of snat_map"),
        ("swapped-by-hand", "snat_map's checksum is"),
        ("enrolled-by-hand", "enrolled is not the set of snat_map's private addresses"),
    ],
)
def test_drift_behind_the_programs_back_with_the_generation_unchanged(steps, name, detail):
    """nft by hand changed the maps; applied_state still says what the program wrote, the
    generation is the store's: only reading the live maps back finds it."""
    step = steps[name]
    report = step["report"]
    assert report == {**report, "action": "full", "reason": "drift"}
    assert report["previous_generation"] == report["applied_generation"]  # nothing new
    assert report["detail"].startswith(detail), report["detail"]
    converged(step)
    maps_only(steps, name)


def test_verify_checks_the_live_maps_before_a_delta_builds_on_them(steps):
    step = steps["verify-before-delta"]
    report = step["report"]
    assert report == {**report, "action": "full", "reason": "drift"}
    assert report["applied_generation"] == report["previous_generation"] + 1
    converged(step)  # 10.10.1.23 back, 10.10.1.26 added
    step = steps["verified-delta"]
    report = step["report"]
    assert report == {**report, "action": "delta", "verified": True, "added": 1}
    converged(step)


def test_a_forced_sync_reports_the_drift_it_repairs(steps):
    report = steps["forced"]["report"]
    assert report == {**report, "action": "full", "reason": "forced"}
    assert report["drift"].startswith("snat_map holds")
    converged(steps["forced"])
    with pytest.raises(AssertionError):
        maps_only(steps, "forced")  # forced: the whole table, chains included
    clean = steps["forced-clean"]["report"]
    assert clean == {**clean, "action": "full", "reason": "forced"} and "drift" not in clean


def test_never_backwards(steps):
    step = steps["older"]
    report = step["report"]
    assert report == {**report, "action": "unchanged"}
    assert report["applied_generation"] > 1
    assert step["kernel"]["state"][0] == report["applied_generation"]
