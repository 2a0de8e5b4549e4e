"""The benchmark code at tiny sizes, so it cannot rot. No timing assertions: only that every part
runs, produces the fields the report needs, and leaves no namespace behind."""

from __future__ import annotations

import os

import pytest

from bench import coldstart, gateway_apply, report, tables
from bench.netns import list_namespaces
from bench.run import run_all

ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def test_tables_put_the_measured_sources_last_and_render():
    maps = tables.mappings(300, measured=4)
    assert len(maps) == 300
    assert [str(m.private_ip) for m in maps[-4:]] == [f"10.20.1.{k}" for k in range(1, 5)]
    rules = tables.linear_rules(maps)
    assert len(rules) == 600 and rules[-2][0] == "POSTROUTING"
    assert tables.iptables_restore_text(rules).count("\n-A ") == 600
    assert tables.seed_script(rules).count("iptables -t nat -A") == 600
    text = tables.render_nft(maps)
    assert "snat to ip saddr map @snat_map" in text and 'oifname != "eth1"' in text


def test_seed_model_sums_interpolated_costs():
    samples = [
        {"rules_in_table": 0, "per_process": 1.0},
        {"rules_in_table": 10, "per_process": 2.0},
    ]
    assert gateway_apply.predict_seed(samples, 11) == pytest.approx(
        sum(1 + k / 10 for k in range(11))
    )
    assert gateway_apply.predict_seed(samples[:1], 5) == 5.0


def test_coldstart_parses_importtime_and_sizes_the_asset():
    rows = coldstart._parse_importtime(
        "import time: self [us] | cumulative | imported package\n"
        "import time:       10 |         10 |     leaf\n"
        "import time:       20 |         30 |   child\n"
        "import time:        5 |         35 | top\n"
    )
    assert rows == [(10, 10, "leaf", 2), (20, 30, "child", 1), (5, 35, "top", 0)]
    asset = coldstart.zip_size(tables.__file__ and coldstart.REPO / "bench")
    assert asset["files"] > 0 and asset["zipped_bytes"] > 0


TINY = {
    "apply": {
        "sizes": [1, 20],
        "reps": 1,
        "seed_full_max_rules": 10,
        "seed_sample_rules": [0, 40],
        "seed_sample_calls": 2,
        "change_reps": 1,
    },
    "flows": {"rounds": 1, "seconds": 0.1, "max_flows": 500, "large": 300, "sources": 4},
    # Two worker processes: the concurrent delivery path runs too.
    "controller": {
        "burst": 3,
        "bursts": [3],
        "batch_size": 2,
        "ssm_latency": 0.0,
        "max_passes": 5,
        "workers": 2,
    },
    # A light module keeps the smoke run short; make bench measures every handler.
    "coldstart": {"runs": 1, "modules": ["tunnelnat.core.nat"]},
}


def test_controller_and_coldstart_parts_run_and_report(tmp_path):
    results = run_all(parts=("controller", "coldstart"), configs=TINY, out_dir=tmp_path)
    ctl = results["parts"]["controller"]
    assert "error" not in ctl, ctl.get("error")
    assert ctl["one"]["converged"] and ctl["burst"]["converged"]
    assert ctl["one"]["api_calls"]["total"] > 0 and ctl["burst"]["gateway_syncs"] >= 1
    assert ctl["burst"]["workers"] == 2 and ctl["burst"]["invocations"] >= 2
    assert ctl["burst"]["api_calls"]["total"] > 0, "the workers' counters came back"
    assert "error" not in results["parts"]["coldstart"]
    md = (tmp_path / "latest.md").read_text()
    assert "Controller cost" in md and "Cold start" in md
    assert (tmp_path / "latest.json").exists()


@pytest.mark.skipif(not ROOT, reason="network namespaces need root")
def test_namespace_parts_run_and_clean_up(tmp_path):
    results = run_all(parts=("apply", "flows"), configs=TINY, out_dir=tmp_path)
    apply_ = results["parts"]["apply"]
    assert "error" not in apply_, apply_.get("error")
    assert set(apply_["sizes"]) == {"1", "20"}
    assert apply_["sizes"]["20"]["checks"]["snat_map_elements"] == 20
    assert apply_["sizes"]["20"]["seed"]["measured"] is False  # beyond seed_full_max_rules
    # The one-mapping change is a delta: the generation item and one change-log entry read, by
    # the archive the stack ships (and the same code from the source tree, for its start-up).
    change = apply_["change"]
    assert change["archive"]["dynamodb_items"]["max"] == 2
    assert change["archive"]["dynamodb_calls"]["max"] == 2
    assert change["source"]["dynamodb_items"]["max"] == 2
    assert change["version_start_up"]["archive"]["runs"] >= 1
    table16 = {t["target"].split(":")[-1].strip(): t for t in results["targets_issue16"]}
    assert table16["DynamoDB items read by the gateway ≤ 10"]["met"] is True
    flows = results["parts"]["flows"]
    assert "error" not in flows, flows.get("error")
    for cond in ("nft-1", "nft-10k", "iptables-1", "iptables-10k"):
        assert flows["conditions"][cond]["samples"][0]["sent"] > 0
    assert results["namespaces_left"] == []
    assert not [ns for ns in list_namespaces() if ns.startswith("tn-bench-")]
    assert "Applying the gateway's NAT table" in report.markdown(results)


def test_issue16_targets_name_every_figure_and_its_verdict():
    """The table the README shows: every target of issue 16, measured or 'not measured'."""
    lab = {
        "config": {"instances": 2, "interval": 0.01, "settle": 1.0},
        "lab_build_seconds": 20.0,
        "samples": [
            {"instance": "web-1", "status": "enrolled", "public_ip": "203.0.113.10",
             "handler_seconds": 1.2, "seconds": 1.3},
            {"instance": "web-2", "status": "enrolled", "public_ip": "203.0.113.11",
             "handler_seconds": 1.1, "seconds": 4.0},
        ],
        "reached": 2, "median": 2.65, "max": 4.0, "min": 1.3,
    }  # fmt: skip
    results = {"parts": {"lab": lab, "controller": {"one": {"api_calls": {"total": 7}}}}}
    rows = report.targets_issue16(results)
    assert len(rows) == 7
    verdict = {r["target"]: r["met"] for r in rows}
    assert verdict["tag → traffic in the lab, median ≤ 3 s"] is True
    assert verdict["API calls, one enrolment alone ≤ 6"] is False
    assert verdict["handler import, median ≤ 400 ms"] is None  # not run
    md = report.markdown({"parts": {"lab": lab}, "targets_issue16": rows})
    assert "## Targets (issue 16)" in md and "Tag → traffic in the lab" in md
    assert "| web-2 | enrolled | 203.0.113.11 | 1.10 s | 4.00 s |" in md


def test_issue23_targets_side_by_side_and_not_measured_when_absent():
    """Issue 23's table: the NAT figures (bench/partners.py) beside ConfigureTunnel's with 50
    partners (bench/tunnels.py); a part that did not run reads 'not measured'."""
    assert [t["met"] for t in report.targets_issue23({"parts": {}})] == [None, None, None]
    parts = {
        "partners": {
            "flows": {"conditions": {
                "50x10k": {"ratio": 0.91, "paired_ratios": [0.9, 0.91, 0.95]},
                "50x10k-direct": {"ratio": 0.96},
            }},
            "delta": {"ratio": 2.5, "gateway": {"median": 0.01}, "raw": {"median": 0.004}},
        },
        "tunnels": {"reload_seconds": {"max": 0.4, "median": 0.2, "runs": 3}, "partners": 50,
                    "others_touched_total": 0, "lost_total": 0},
    }  # fmt: skip
    rows = report.targets_issue23({"parts": parts})
    assert [t["met"] for t in rows] == [True, False, True]
    assert "0.910" in rows[0]["measured"] and "none aliased: 0.960" in rows[0]["measured"]
    parts["tunnels"]["others_touched_total"] = 1
    assert report.targets_issue23({"parts": parts})[2]["met"] is False


TINY_TUNNELS = {"partners": 3, "rounds": 1}


@pytest.mark.skipif(not ROOT, reason="network namespaces need root")
def test_tunnels_part_runs_and_cleans_up(tmp_path):
    """bench/tunnels.py at 3 partners (real charon when it is installed, else skipped)."""
    results = run_all(parts=("tunnels",), configs={"tunnels": TINY_TUNNELS}, out_dir=tmp_path)
    tun = results["parts"]["tunnels"]
    if "skipped" in tun:
        pytest.skip(tun["skipped"])
    assert "error" not in tun, tun.get("error")
    assert tun["partners"] == 3 and tun["others_touched_total"] == 0
    assert tun["reload_seconds"]["runs"] == 1
    assert results["targets_issue23"][2]["met"] is not None
    assert results["namespaces_left"] == []
    assert "ConfigureTunnel (bench/tunnels.py)" in (tmp_path / "latest.md").read_text()
