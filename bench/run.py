"""``python -m bench.run [--quick] [--burst N[,M...]]`` (``make bench``, ``make bench
BENCH_ARGS="--burst 20,200"``): every benchmark, one run.

Writes ``bench/results/latest.json`` (every sample) and ``latest.md`` (the tables, the machine,
the targets of issues 16 and 6). The lab part (tag -> traffic) builds the namespace lab, which
takes the lab's lock: a running lab test or demo makes it wait. The parts that need the kernel
(NAT apply, new-connection rate) need root and run in ``tn-bench-<pid>-*`` namespaces that are
removed at the end, also on failure or Ctrl-C; without root they are skipped and the report
says so.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

from bench import coldstart, controller, flows, gateway_apply, lab_enrol, partners, report
from bench.common import REPO, is_root, machine
from bench.netns import Sandbox, list_namespaces, remove_stale

# partners, tunnels: issue 23's three figures side by side (bench/partners.py: 10 paired rounds,
# ~2 min, the quick sizes with --quick; bench/tunnels.py: ~15 s); they run after the others.
PARTS = ("apply", "flows", "partners", "tunnels", "controller", "coldstart", "lab")


def run_all(
    *,
    quick: bool = False,
    burst: int | list[int] = 20,
    parts: tuple[str, ...] = PARTS,
    configs: dict | None = None,
    out_dir: Path | None = None,
    command: str = "",
) -> dict:
    """Run the selected parts; returns the results (and writes them when ``out_dir`` is set).

    ``configs`` overrides a part's configuration (the smoke test uses tiny sizes)."""
    configs = configs or {}
    started = time.perf_counter()
    results: dict = {
        "command": command or "python -m bench.run" + (" --quick" if quick else ""),
        "quick": quick,
        "machine": machine(),
        "parts": {},
    }
    netns_parts = [p for p in parts if p in ("apply", "flows")]
    if netns_parts:
        if not is_root():
            for p in netns_parts:
                results["parts"][p] = {"skipped": "needs root (network namespaces)"}
        else:
            remove_stale()
            for p in netns_parts:
                cfg = configs.get(p) or (
                    gateway_apply.default_config(quick) if p == "apply"
                    else flows.default_config(quick)
                )  # fmt: skip
                t0 = time.perf_counter()
                for attempt in range(1, ATTEMPTS + 1):
                    _wait_for_lab()
                    _log(f"{p}: starting (attempt {attempt})")
                    try:
                        with Sandbox() as box:
                            if p == "apply":
                                res = gateway_apply.run(box, cfg)
                                res["ratios"] = gateway_apply.ratios(res)
                            else:
                                res = flows.run(box, cfg)
                        break
                    except Exception as exc:  # noqa: BLE001 - reported, the other parts still run
                        traceback.print_exc()
                        res = {"error": f"{type(exc).__name__}: {exc}"}
                        if not _interfered(str(exc)):
                            break
                        _log(f"{p}: killed from outside (the lab's cleanup?); trying again")
                res["attempts"] = attempt
                res["seconds"] = time.perf_counter() - t0
                results["parts"][p] = res
    if "controller" in parts:
        cfg = configs.get("controller") or controller.default_config(quick, burst)
        _log("controller: starting")
        t0 = time.perf_counter()
        try:
            res = controller.run(cfg)
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            res = {"error": f"{type(exc).__name__}: {exc}"}
        res["seconds"] = time.perf_counter() - t0
        results["parts"]["controller"] = res
    if "coldstart" in parts:
        cfg = configs.get("coldstart") or coldstart.default_config(quick)
        _log("coldstart: starting")
        t0 = time.perf_counter()
        try:
            res = coldstart.run(cfg)
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            res = {"error": f"{type(exc).__name__}: {exc}"}
        res["seconds"] = time.perf_counter() - t0
        results["parts"]["coldstart"] = res
    if "lab" in parts:
        if not is_root():
            results["parts"]["lab"] = {"skipped": "needs root (the namespace lab)"}
        else:
            cfg = configs.get("lab") or lab_enrol.default_config(quick)
            _log("lab: starting (tag -> traffic; waits for another lab run to finish)")
            t0 = time.perf_counter()
            try:
                res = lab_enrol.run(cfg)
            except Exception as exc:  # noqa: BLE001
                traceback.print_exc()
                res = {"error": f"{type(exc).__name__}: {exc}"}
            res["seconds"] = time.perf_counter() - t0
            results["parts"]["lab"] = res
    # Last: bench.tunnels imports the gateway package from the repository, and the controller's
    # and the lab's SSM runners refuse a tunnelnat_gateway imported before their archive.
    for p in ("partners", "tunnels"):
        if p in parts:
            results["parts"][p] = _issue23_part(p, quick, configs.get(p))
    results["total_seconds"] = time.perf_counter() - started
    results["targets"] = report.targets(results)
    results["targets_issue16"] = report.targets_issue16(results)
    results["targets_issue23"] = report.targets_issue23(results)
    results["namespaces_left"] = [ns for ns in list_namespaces() if ns.startswith("tn-bench-")]
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "latest.json").write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
        (out_dir / "latest.md").write_text(report.markdown(results))
    return results


def _issue23_part(part: str, quick: bool, config: dict | None) -> dict:
    """bench.partners (NAT with 50 partners: flows ratio, one-mapping change) or bench.tunnels
    (ConfigureTunnel with 50 partners on real charon), in their own Sandbox."""
    from bench import tunnels as tunnels_bench  # imports tunnelnat_gateway: only now

    why = "needs root (network namespaces)" if not is_root() else None
    if part == "tunnels":
        why = why or tunnels_bench.available()
    if why:
        return {"skipped": why}
    remove_stale()
    _wait_for_lab()
    _log(f"{part}: starting")
    t0 = time.perf_counter()
    try:
        with Sandbox() as box:
            if part == "partners":
                # --quick's sizes whatever the run's: 50 x 10,000 is the figure, rounds are few.
                cfg = config or partners.default_config(quick)
                res = {"delta": partners.run_delta(box, cfg), "flows": partners.run_flows(box, cfg)}
            else:
                cfg = config or tunnels_bench.default_config(quick)
                box.run_dir.mkdir(parents=True, exist_ok=True)
                res = tunnels_bench.run(box, cfg)
            res["config"] = cfg
    except Exception as exc:  # noqa: BLE001 - reported, the other parts still run
        traceback.print_exc()
        res = {"error": f"{type(exc).__name__}: {exc}"}
    res["seconds"] = time.perf_counter() - t0
    return res


ATTEMPTS = 3
LAB_WAIT = 180.0


def _foreign_lab() -> list[str]:
    return [ns for ns in list_namespaces() if ns.startswith("tn-") and not
            ns.startswith("tn-bench-")]  # fmt: skip


def _wait_for_lab() -> None:
    """The namespace lab's cleanup() kills every process in, and removes, every tn-* namespace
    (ours too): while a lab runs, wait (bounded) for it to finish before starting a part."""
    deadline = time.monotonic() + LAB_WAIT
    if _foreign_lab():
        _log(f"a namespace lab is running ({', '.join(_foreign_lab()[:3])}...); waiting for it")
    while _foreign_lab() and time.monotonic() < deadline:
        time.sleep(2)


def _interfered(message: str) -> bool:
    return "(-15)" in message or "(-9)" in message or "namespace is gone" in message


def _log(msg: str) -> None:
    sys.stderr.write(f"bench: {msg}\n")
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer runs")
    parser.add_argument(
        "--burst", default="20", help="launches in the controller burst (20,200: both)"
    )
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma list of {PARTS}")
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = parser.parse_args(argv)
    parts = tuple(p for p in args.only.split(",") if p)
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts: {', '.join(sorted(unknown))}")
    try:
        bursts = [int(b) for b in args.burst.split(",") if b]
    except ValueError:
        parser.error("--burst takes numbers, e.g. 20 or 20,200")
    if not bursts or not all(1 <= b <= controller.MAX_BURST for b in bursts):
        parser.error(f"--burst must be 1..{controller.MAX_BURST}")
    command = "python -m bench.run" + " ".join([""] + (argv if argv is not None else sys.argv[1:]))
    results = run_all(quick=args.quick, burst=bursts, parts=parts, out_dir=Path(args.out),
                      command=command.strip())  # fmt: skip
    print(report.markdown(results))
    _log(f"done in {results['total_seconds']:.0f}s; wrote {args.out}/latest.json and latest.md")
    errors = [p for p, r in results["parts"].items() if "error" in r]
    if results["namespaces_left"]:
        _log(f"namespaces left behind: {results['namespaces_left']}")
        return 2
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
