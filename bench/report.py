"""The markdown report and the verdicts against issue 16's and issue 6's targets."""

from __future__ import annotations

from typing import Any


def _get(d: Any, *path: Any) -> Any:
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def _s(x: float | None, unit: str = "s") -> str:
    if x is None:
        return "n/a"
    if unit == "s":
        if x >= 10:
            return f"{x:.1f} s"
        if x >= 1:
            return f"{x:.2f} s"
        if x >= 0.01:
            return f"{x * 1000:.0f} ms"
        return f"{x * 1000:.1f} ms"
    return f"{x:.3g}"


def _x(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x:.2f}×" if x < 10 else f"{x:.0f}×"


def _n(x: float | None) -> str:
    return "n/a" if x is None else f"{x:,.0f}"


def targets(results: dict) -> list[dict]:
    parts = results.get("parts", {})
    out = []
    apply_ = parts.get("apply", {})
    sizes = apply_.get("sizes") or {}
    big = max(sizes, key=int) if sizes else None
    if big:
        r = apply_["ratios"][big]
        v = r["sync_excl_api_over_raw_nft"]
        out.append({
            "target": f"apply {int(big):,} mappings ≤ 1.5× raw `nft -f` of the same ruleset",
            "measured": f"{_x(v)} (gateway sync minus the DynamoDB calls); the whole "
                        "SyncNatTable document incl. moto's read: "
                        f"{_x(r['document_over_raw_nft'])}",
            "met": v is not None and v <= 1.5,
        })  # fmt: skip
        v = r["seed_over_document"]
        seed = sizes[big]["seed"]
        how = "measured" if seed.get("measured") else "extrapolated"
        out.append({
            "target": f"apply {int(big):,} mappings ≥ 100× faster than the seed's way",
            "measured": f"{_x(v)} vs the whole SyncNatTable document; "
                        f"{_x(r['seed_over_sync_excl_api'])} vs the sync minus DynamoDB "
                        f"(seed {how})",
            "met": v is not None and v >= 100,
        })  # fmt: skip
    fl = parts.get("flows", {})
    v = _get(fl, "ratios", "nft_10k_over_1")
    if v is not None:
        out.append({
            "target": "new-connection rate at 10,000 mappings ≥ 90% of the rate at 1",
            "measured": f"{v * 100:.0f}% (nft maps); linear iptables: "
                        f"{(_get(fl, 'ratios', 'iptables_10k_over_1') or 0) * 100:.1f}%",
            "met": v >= 0.9,
        })  # fmt: skip
    ctl = parts.get("controller", {})
    v = _get(ctl, "one", "api_calls", "total")
    bursts = _get(ctl, "bursts") or ({str(ctl["burst"]["instances"]): ctl["burst"]}
                                     if _get(ctl, "burst") else {})  # fmt: skip
    if v is not None:
        per = {n: b["api_calls_per_enrolment"] for n, b in bursts.items()}
        amortized = max(per.values()) if per else None
        out.append({
            "target": "≤ 6 AWS API calls per enrolment",
            "measured": f"one enrolment alone: {v}; amortized in a burst: "
                        + ", ".join(f"{x:.2f} per enrolment (burst of {n})"
                                    for n, x in per.items()),
            "met": "partly" if v > 6 and amortized is not None and amortized <= 6
                   else v <= 6,
        })  # fmt: skip
    big = bursts.get("200")
    if bursts:
        shown = big or bursts[max(bursts, key=int)]
        n = shown["instances"]
        out.append({
            "target": "a burst of 200 converges with ≤ 10 gateway syncs",
            "measured": f"burst of {n}: {shown['gateway_syncs']} syncs, converged="
                        f"{shown['converged']} ({shown.get('workers', 1)} concurrent "
                        f"invocations, {shown.get('ssm_latency_simulated', 0):g} s per command)"
                        + ("" if big else " (run `--burst 200` for the target's size)"),
            "met": (big["gateway_syncs"] <= 10 and bool(big["converged"])) if big else None,
        })  # fmt: skip
    imports = _get(parts, "coldstart", "imports") or []
    ok = [i for i in imports if "importtime_cumulative_seconds" in i]
    traced = {i["module"]: i for i in _get(parts, "coldstart", "imports_tracing_on") or []
              if "importtime_cumulative_seconds" in i}  # fmt: skip
    if ok:
        worst = max(ok, key=lambda i: i["importtime_cumulative_seconds"])
        measured = ", ".join(
            f"`{i['module'].rsplit('.', 1)[-1]}` {_s(i['importtime_cumulative_seconds'])}"
            for i in ok
        )
        if traced:
            measured += "; with X-Ray tracing on (as deployed): " + ", ".join(
                f"`{m.rsplit('.', 1)[-1]}` {_s(i['importtime_cumulative_seconds'])}"
                for m, i in traced.items()
            )
        out.append({
            "target": "handler import ≤ 500 ms",
            "measured": measured,
            "met": worst["importtime_cumulative_seconds"] <= 0.5,
        })  # fmt: skip
    return out


def targets_issue16(results: dict) -> list[dict]:
    """Issue 16's table: every target, measured in this run (None: the part did not run)."""
    parts = results.get("parts", {})
    apply_ = parts.get("apply", {})
    ch = apply_.get("change") or {}
    n = ch.get("mappings")
    at = f"one-mapping change on {n:,}" if n else "one-mapping change"
    work = _get(ch, "archive", "apply_excl_api", "median")
    raw = _get(ch, "raw_nft_one_element", "median")
    v = work / raw if work is not None and raw else None
    out = [{
        "target": f"{at}: gateway work ÷ raw `nft -f` of that single change ≤ 2×",
        "measured": f"{_x(v)} ({_s(work)} vs {_s(raw)}; the archive's sync minus its DynamoDB "
                    "calls)"
                    if v is not None else "n/a",
        "met": None if v is None else v <= 2,
    }]  # fmt: skip
    items = _get(ch, "archive", "dynamodb_items", "max")
    out.append({
        "target": f"{at}: DynamoDB items read by the gateway ≤ 10",
        "measured": "n/a" if items is None else
                    f"{items:.0f} (the generation item and one change-log entry; the sync's "
                    "items_read)",
        "met": None if items is None else items <= 10,
    })  # fmt: skip
    doc = _get(ch, "document", "median")
    out.append({
        "target": f"{at}: whole SyncNatTable document on moto ≤ 1.5 s",
        "measured": _s(doc) + " (bash, the package check, python3 and boto3 start from the "
                    "archive, the reads, `nft -f`)",
        "met": None if doc is None else doc <= 1.5,
    })  # fmt: skip
    sizes = apply_.get("sizes") or {}
    big = max(sizes, key=int) if sizes else None
    v = apply_["ratios"][big]["sync_excl_api_over_raw_nft"] if big else None
    out.append({
        "target": f"full apply of {int(big):,} ÷ raw `nft -f` ≤ 1.5×" if big
                  else "full apply ÷ raw `nft -f` ≤ 1.5×",
        "measured": f"{_x(v)} (the sync minus its DynamoDB calls, from an empty ruleset)",
        "met": None if v is None else v <= 1.5,
    })  # fmt: skip
    calls = _get(parts, "controller", "one", "api_calls", "total")
    running = _get(parts, "controller", "one_running", "api_calls", "total")
    worst = max((c for c in (calls, running) if c is not None), default=None)
    out.append({
        "target": "API calls, one enrolment alone ≤ 6",
        "measured": "n/a" if calls is None else
                    f"{calls} on a new deployment; {'n/a' if running is None else running} in a "
                    "running one (cold container, the gateway already recorded)",
        "met": None if worst is None else worst <= 6,
    })  # fmt: skip
    lab = parts.get("lab", {})
    med, worst = lab.get("median"), lab.get("max")
    out.append({
        "target": "tag → traffic in the lab, median ≤ 3 s",
        "measured": "n/a" if med is None else
                    f"median {_s(med)}, max {_s(worst)} over {lab.get('reached')} of "
                    f"{len(lab.get('samples', []))} enrolments",
        "met": None if med is None else med <= 3 and lab.get("reached") == len(lab["samples"]),
    })  # fmt: skip
    imports = [i for i in _get(parts, "coldstart", "imports") or []
               if "importtime_cumulative_seconds" in i]  # fmt: skip
    worst_import = max((i["importtime_cumulative_seconds"] for i in imports), default=None)
    out.append({
        "target": "handler import, median ≤ 400 ms",
        "measured": ", ".join(f"`{i['module'].rsplit('.', 1)[-1]}` "
                              f"{_s(i['importtime_cumulative_seconds'])}" for i in imports)
                    or "n/a",
        "met": None if worst_import is None else worst_import <= 0.4,
    })  # fmt: skip
    return out


def targets_issue23(results: dict) -> list[dict]:
    """Issue 23's table (several partners), side by side: bench.partners and bench.tunnels."""
    parts = results.get("parts", {})
    flows = _get(parts, "partners", "flows", "conditions") or {}
    delta = _get(parts, "partners", "delta") or {}
    tun = parts.get("tunnels") or {}
    out = []
    c50, cd = flows.get("50x10k") or {}, flows.get("50x10k-direct") or {}
    r = c50.get("ratio")
    rd = cd.get("ratio")
    out.append({
        "target": "new flows/s, 50 partners × 10,000 mappings ÷ 1 partner × 10,000 ≥ 0.90",
        "measured": f"{r:.3f} (median of {len(c50.get('paired_ratios') or [])} paired rounds; "
                    f"24 partners aliased); none aliased: {rd:.3f}"
                    if r is not None and rd is not None else "n/a",
        "met": None if r is None else r >= 0.90,
    })  # fmt: skip
    v = delta.get("ratio")
    work, raw = _get(delta, "gateway", "median"), _get(delta, "raw", "median")
    out.append({
        "target": "one-mapping change for one partner, 50 × 1,000: gateway work ÷ raw "
                  "`nft -f` of that change ≤ 2×",
        "measured": f"{_x(v)} ({_s(work)} vs {_s(raw)}: render_partner_delta + nft -f)"
                    if v is not None else "n/a",
        "met": None if v is None else v <= 2,
    })  # fmt: skip
    rs = tun.get("reload_seconds") or {}
    touched = tun.get("others_touched_total")
    n = tun.get("partners")
    out.append({
        "target": "ConfigureTunnel with 50 partners: reload ≤ 2 s, SAs of untouched partners "
                  "re-keyed or dropped: 0",
        "measured": f"one partner's key changed: max {_s(rs['max'])} (median {_s(rs['median'])}, "
                    f"{rs['runs']} runs, {n} partners, real charon); others re-keyed or dropped: "
                    f"{touched} (also across a partner added, removed and an unchanged re-run); "
                    f"pings through an untouched tunnel lost: {tun.get('lost_total')}"
                    if rs.get("max") is not None else "n/a",
        "met": None if rs.get("max") is None else rs["max"] <= 2 and touched == 0,
    })  # fmt: skip
    return out


def markdown(results: dict) -> str:
    m = results.get("machine", {})
    parts = results.get("parts", {})
    lines = [
        "# tunnelnat benchmarks",
        "",
        f"Command: `{results.get('command', 'python -m bench.run')}` (`make bench`), "
        f"total {results.get('total_seconds', 0):.0f} s.",
        "",
        "| machine | |",
        "|---|---|",
        f"| date | {m.get('date')} |",
        f"| nproc | {m.get('nproc')} |",
        f"| CPU | {m.get('cpu')} |",
        f"| kernel | {m.get('kernel')} |",
        f"| OS | {m.get('os')} |",
        f"| tools | {m.get('nft')}; {m.get('iptables')}; Python {m.get('python')} |",
        f"| load average at start | {', '.join(str(x) for x in m.get('loadavg_at_start', []))} |",
        "",
        "## Targets (issue 16)",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]
    for t in results.get("targets_issue16", []):
        met = {True: "yes", False: "**no**", None: "not measured"}[t["met"]]
        lines.append(f"| {t['target']} | {t['measured']} | {met} |")
    lines += [
        "",
        "## Targets (issue 23: several partners)",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]
    for t in results.get("targets_issue23", []):
        met = {True: "yes", False: "**no**", None: "not measured"}[t["met"]]
        lines.append(f"| {t['target']} | {t['measured']} | {met} |")
    lines += [
        "",
        "## Targets (issue 6)",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]
    for t in results.get("targets", []):
        met = {True: "yes", False: "**no**", None: "not measured",
               "partly": "in bursts yes; alone **no**"}[t["met"]]  # fmt: skip
        lines.append(f"| {t['target']} | {t['measured']} | {met} |")
    lines += ["", *_apply_md(parts.get("apply", {})), "", *_flows_md(parts.get("flows", {})), ""]
    lines += [*_controller_md(parts.get("controller", {})), ""]
    lines += [*_coldstart_md(parts.get("coldstart", {})), ""]
    lines += [*_lab_md(parts.get("lab", {})), ""]
    lines += [*_issue23_md(parts), ""]
    left = results.get("namespaces_left")
    lines.append(f"Namespaces left after the run: {left if left else 'none'}.")
    return "\n".join(lines) + "\n"


def _skipped(title: str, part: dict) -> list[str] | None:
    if not part:
        return [f"## {title}", "", "Not run."]
    if "skipped" in part:
        return [f"## {title}", "", f"Skipped: {part['skipped']}."]
    if "error" in part:
        return [f"## {title}", "", f"**Failed**: `{part['error']}`"]
    return None


def _apply_md(a: dict) -> list[str]:
    title = "1. Applying the gateway's NAT table"
    skipped = _skipped(title, a)
    if skipped:
        return skipped
    lines = [
        f"## {title}",
        "",
        "Medians; from an empty ruleset each time, inside a throwaway namespace. "
        "*document*: the real SyncNatTable document, bound to the built archive, end to end "
        "(bash, the package check, python3 and boto3 start from the archive, the DynamoDB "
        "read from moto's server on the namespace's loopback, render, `nft -f`). "
        "*sync − DynamoDB*: `python3 <archive> sync` (the package the stack ships, as the "
        "document execs it), its own report's time minus its DynamoDB calls (moto) — what the "
        "gateway itself spends: building the table, rendering, `nft -f`, bookkeeping. *raw "
        "nft*: `nft -f` of the very text it renders. Linear rules: one SNAT + one DNAT per "
        "mapping.",
        "",
        "| mappings | document | of which DynamoDB calls (moto) | sync − DynamoDB "
        "(nft / the rest) | raw `nft -f` | `iptables-restore` | seed's way "
        "(1 process per rule) | seed ÷ document | sync−DDB ÷ raw nft |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n, r in sorted(a["sizes"].items(), key=lambda kv: int(kv[0])):
        ph = r["archive"]
        seed = r["seed"]
        seed_txt = _s(seed.get("median")) + (
            f" ({seed['processes']:,} procs)" if seed.get("measured")
            else f" (**extrapolated**, {seed['processes']:,} procs)"
        )  # fmt: skip
        ratios = a["ratios"][n]
        lines.append(
            f"| {int(n):,} | {_s(r['document']['median'])} | {_s(ph['dynamodb_api']['median'])} "
            f"| {_s(ph['apply_excl_api']['median'])} ({_s(ph['nft_apply']['median'])} / "
            f"{_s(ph['other']['median'])}) "
            f"| {_s(r['raw_nft']['median'])} | {_s(r['iptables_restore']['median'])} "
            f"| {seed_txt} | {_x(ratios['seed_over_document'])} "
            f"| {_x(ratios['sync_excl_api_over_raw_nft'])} |"
        )
    model = a.get("seed_model", {})
    if model.get("samples"):
        pts = ", ".join(
            f"{s['rules_in_table']:,} rules: {_s(s['per_process'])}" for s in model["samples"]
        )
        lines += [
            "",
            f"Seed's way: cost of one `iptables -t nat -A` process by table size ({pts}; "
            f"{model['calls_per_sample']} processes each). Where the full script was not run, "
            "its time is the sum of these per-process costs, interpolated linearly over the "
            "table's growth. Check of that model where both exist: "
            + "; ".join(
                f"{int(n):,} mappings measured {_s(r['seed'].get('median'))}, model "
                f"{_s(r['seed'].get('model_prediction'))}"
                for n, r in a["sizes"].items()
                if r["seed"].get("measured")
            )
            + ".",
        ]
    ch = a.get("change")
    if ch:
        ph = ch["archive"]
        lines += [
            "",
            f"**One-mapping change on a {ch['mappings']:,}-mapping table** (medians):",
            "",
            "| way | time |",
            "|---|---:|",
            f"| SyncNatTable document (delta: the change-log entry, element changes) "
            f"| {_s(ch['document']['median'])} |",
            f"| gateway sync − DynamoDB calls (`nft -f` / the rest) "
            f"| {_s(ph['apply_excl_api']['median'])} ({_s(ph['nft_apply']['median'])} / "
            f"{_s(_minus(ph['apply_excl_api']['median'], ph['nft_apply']['median']))}) |",
            f"| of which DynamoDB: calls / items read (moto) "
            f"| {_s(ph['dynamodb_api']['median'])}: {ph['dynamodb_calls']['median']:.0f} / "
            f"{ph['dynamodb_items']['median']:.0f} |",
            f"| raw `nft -f` of the whole map update (what a full sync sends) "
            f"| {_s(ch['raw_nft_map_update']['median'])} |",
            f"| raw `nft -f` changing only that element "
            f"| {_s(ch['raw_nft_one_element']['median'])} |",
            f"| seed's way: `iptables -D` ×2 + `-A` ×2 | {_s(ch['seed']['median'])} |",
            f"| `iptables-restore` of the whole table | {_s(ch['iptables_restore']['median'])} |",
        ]
        src, ver = ch.get("source"), ch.get("version_start_up")
        if src and ver:
            lines += [
                "",
                "What running from the archive costs (the same one-mapping delta, interleaved; "
                "medians): the process's wall time, of which start-up (python3, the imports, "
                "boto3's client) and the sync itself; and `version` alone (no boto3).",
                "",
                "| | from the archive (`python3 <archive>`) | from the source tree "
                "(`python3 -m tunnelnat_gateway`) | archive ÷ source |",
                "|---|---:|---:|---:|",
            ]
            for label, a_val, s_val in (
                ("sync process, wall", ph["process"]["median"], src["process"]["median"]),
                ("of which start-up", ph["start_up"]["median"], src["start_up"]["median"]),
                ("of which the sync", ph["total"]["median"], src["total"]["median"]),
                ("`version` process, wall", ver["archive"]["median"], ver["source"]["median"]),
            ):
                lines.append(
                    f"| {label} | {_s(a_val)} | {_s(s_val)} | {_x(_ratio(a_val, s_val))} |"
                )
    return lines


def _flows_md(f: dict) -> list[str]:
    title = "2. New connections through the gateway"
    skipped = _skipped(title, f)
    if skipped:
        return skipped
    cfg = f["config"]
    lines = [
        f"## {title}",
        "",
        f"New UDP flows (each datagram a new 5-tuple: a new conntrack entry and a NAT lookup) "
        f"from {cfg['sources']} source addresses (1 at 1 mapping), {cfg['workers']} sender "
        f"processes, {cfg['seconds']} s per measurement, {cfg['rounds']} rounds with the four "
        "conditions alternating. tunnelnat's table is the real one (maps, enrolled-only forward "
        "filter, fail-closed guard on the egress device); the linear rules put the measured "
        "sources last. Flows/s = datagrams that reached the server NATed to 203.0.113.x.",
        "",
        "| gateway table | flows/s (median) | min–max | ratio to 1 mapping |",
        "|---|---:|---:|---:|",
    ]
    conds = f["conditions"]
    for c in ("nft-1", "nft-10k", "iptables-1", "iptables-10k"):
        s = conds[c]["flows_per_second"]
        base = conds[c.split("-")[0] + "-1"]["flows_per_second"]["median"]
        label = {
            "nft-1": "tunnelnat (nft maps), 1 mapping",
            "nft-10k": f"tunnelnat (nft maps), {cfg['large']:,} mappings",
            "iptables-1": "seed (linear iptables), 1 mapping",
            "iptables-10k": f"seed (linear iptables), {cfg['large']:,} mappings",
        }[c]
        lines.append(
            f"| {label} | {_n(s['median'])} | {_n(s['min'])}–{_n(s['max'])} "
            f"| {_x((s['median'] or 0) / base if base else None)} |"
        )
    r = f["ratios"]
    lines += [
        "",
        f"At {cfg['large']:,} mappings tunnelnat accepts {_x(r['nft_10k_over_iptables_10k'])} "
        f"the new flows of linear rules; with 1 mapping its extra forward/guard rules cost "
        f"{(1 - (r['nft_1_over_iptables_1'] or 0)) * 100:.0f}% against one bare SNAT rule.",
    ]
    return lines


def _controller_md(c: dict) -> list[str]:
    title = "3. Controller cost"
    skipped = _skipped(title, c)
    if skipped:
        return skipped
    cfg = c["config"]
    lines = [
        f"## {title}",
        "",
        "The real handler against moto's server on loopback, events as SQS batches "
        f"of {cfg['batch_size']} (the stack's batch size). One enrolment: one invocation, "
        f"in-process. Bursts: {cfg.get('workers', 1)} worker processes, each a Lambda execution "
        "environment of its own, take the batches concurrently (as SQS's event source does); "
        "what a pass leaves failed (a retry, or a batch whose gateway sync rode on another's) is "
        "delivered again in the next pass. Commands are sent with the production SsmCommands "
        "adapter to moto's SSM (so counted), each followed by a simulated "
        f"{cfg.get('ssm_latency', 0):g} s SSM round trip; their effects are applied by a fake "
        "fleet whose gateway reads the table with the gateway's reader (nat_sync, imported from "
        "the built archive). API calls "
        "(the Lambda's, retry delays included) counted with botocore's `before-call` hook.",
        "",
        "| scenario | wall to convergence | invocations (passes) | gateway syncs | commands "
        "| API calls (per enrolment) | gateway's own DynamoDB reads | converged |",
        "|---|---:|---:|---:|---|---:|---:|---|",
    ]
    rows = [("one enrolment (new deployment)", c["one"])]
    if c.get("one_running"):
        rows.append(("one enrolment (running deployment, cold container)", c["one_running"]))
    bursts = c.get("bursts") or {str(c["burst"]["instances"]): c["burst"]}
    rows += [(f"burst of {n}", b) for n, b in sorted(bursts.items(), key=lambda kv: int(kv[0]))]
    for label, r in rows:
        cmds = ", ".join(f"{k} {v}" for k, v in sorted(r["commands"].items()))
        lines.append(
            f"| {label} | {_s(r['wall_seconds'])} | {r['invocations']} ({r.get('passes', 1)}) "
            f"| {r['gateway_syncs']} | {cmds} | {r['api_calls']['total']} "
            f"({r['api_calls_per_enrolment']:.2f}) | {r['gateway_api_calls']['total']} "
            f"| {r['converged']} |"
        )
    for label, r in rows:
        ops = r["api_calls"]["by_operation"]
        lines += ["", f"API calls, {label}: " + ", ".join(f"{k} {v}" for k, v in ops.items())]
    return lines


def _coldstart_md(c: dict) -> list[str]:
    title = "4. Cold start"
    skipped = _skipped(title, c)
    if skipped:
        return skipped
    lines = [
        f"## {title}",
        "",
        "Tracing off: `POWERTOOLS_TRACE_DISABLED=1` (the default measurement). Tracing on: "
        "as deployed, inside Lambda (`LAMBDA_TASK_ROOT` set) with X-Ray on.",
        "",
        "| handler module | import (`-X importtime`, median) | `python -c import` − "
        "`python -c pass` | with X-Ray tracing on | heaviest direct imports |",
        "|---|---:|---:|---:|---|",
    ]
    traced = {i["module"]: i for i in c.get("imports_tracing_on", [])}
    for i in c["imports"]:
        if "error" in i:
            lines.append(f"| `{i['module']}` | import failed | | | `{i['error'][-120:]}` |")
            continue
        heavy = ", ".join(
            f"{h['module']} {_s(h['seconds'])}" for h in i["heaviest_direct_imports"][:4]
        )
        on = traced.get(i["module"], {}).get("importtime_cumulative_seconds")
        lines.append(
            f"| `{i['module']}` | {_s(i['importtime_cumulative_seconds'])} "
            f"| {_s(i['import_wall_minus_start_seconds'])} | {_s(on)} | {heavy} |"
        )
    a = c["asset"]
    deps = ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in c["dependencies_zipped_bytes"].items())
    lines += [
        "",
        f"Lambda code asset (`lambdas/` zipped, without `__pycache__`/egg-info): "
        f"{a['zipped_bytes'] / 1024:.0f} KiB ({a['files']} files, "
        f"{a['unzipped_bytes'] / 1024:.0f} KiB unzipped). Third-party packages it needs beyond "
        f"the runtime's boto3, zipped (Powertools normally arrives as the public layer): {deps}.",
    ]
    return lines


def _lab_md(lab: dict) -> list[str]:
    title = "5. Tag → traffic in the lab"
    skipped = _skipped(title, lab)
    if skipped:
        return skipped
    cfg = lab["config"]
    lines = [
        f"## {title}",
        "",
        f"The namespace lab ({lab['config']['instances']} instances; real strongSwan, nftables, "
        "the documents run as the SSM agent runs them, moto for AWS), the tunnel up. Per "
        f"instance, one at a time: a sender in its namespace sends a datagram to A every "
        f"{cfg['interval'] * 1000:.0f} ms from a fresh socket (a new flow each); the tag is "
        "written and the tag-change event handed to the real controller handler (SyncNatTable "
        "and AddHostRoute run in the gateway's and the instance's namespaces); a capture on A's "
        "interface gives the first datagram arriving with the instance's S as its source. "
        f"Lab ready {_s(lab['lab_build_seconds'])} after the part started (waiting for "
        "another lab run's lock included).",
        "",
        "| instance | status | S | handler returned | first packet at A as S |",
        "|---|---|---|---:|---:|",
    ]
    for x in lab["samples"]:
        lines.append(
            f"| {x['instance']} | {x['status']} | {x['public_ip']} "
            f"| {_s(x['handler_seconds'])} | {_s(x['seconds'])} |"
        )
    lines += [
        "",
        f"Median {_s(lab['median'])}, min {_s(lab['min'])}, max {_s(lab['max'])}; "
        f"{lab['reached']} of {len(lab['samples'])} reached A.",
    ]
    return lines


def _issue23_md(parts: dict) -> list[str]:
    """The two issue-23 parts' own tables (bench/partners.py's and bench/tunnels.py's)."""
    from bench import partners, tunnels

    out = []
    p = parts.get("partners", {})
    skipped = _skipped("Several partners: the NAT table (bench/partners.py)", p)
    if skipped is not None:
        out += skipped
    else:
        out += ["## Several partners: the NAT table (bench/partners.py)", ""]
        out += [partners.markdown(p["flows"], p["delta"]), ""]
    t = parts.get("tunnels", {})
    skipped = _skipped("Several partners: ConfigureTunnel (bench/tunnels.py)", t)
    if skipped is not None:
        out += skipped
    else:
        out += ["## Several partners: ConfigureTunnel (bench/tunnels.py)", ""]
        out += [tunnels.markdown(t), "", f"({t['seconds']:.0f} s)"]
    return out


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None
