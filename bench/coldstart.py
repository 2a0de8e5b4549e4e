"""Part 4: cold start — each Lambda handler module's import time, and the code asset's size.

Import time: a fresh interpreter per run, ``python -X importtime -c 'import MODULE'``; the
module's cumulative time is read from the last line naming it. The wall time of the same
command minus that of ``python -c pass`` is reported next to it. Median of several runs.

Asset: the ``lambdas/`` directory zipped (deflate), without ``__pycache__`` and ``*.egg-info``
(build leftovers), as CDK would upload it; the sizes of the third-party packages the handlers
import that the Lambda runtime does not provide are listed apart (Powertools comes as a layer).
"""

from __future__ import annotations

import io
import os
import re
import statistics
import subprocess
import sys
import time
import zipfile
from pathlib import Path

from bench.common import PYTHON, REPO

HANDLERS = REPO / "lambdas" / "tunnelnat" / "handlers"
LAMBDA_ENV = {
    "AWS_REGION": "us-east-1",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "POWERTOOLS_SERVICE_NAME": "tunnelnat",
    "POWERTOOLS_METRICS_NAMESPACE": "tunnelnat",
    "POWERTOOLS_TRACE_DISABLED": "1",
}
# As deployed: inside Lambda (LAMBDA_TASK_ROOT) with X-Ray tracing on, the Tracer imports the
# X-Ray SDK, which builds a botocore client at import.
TRACED_ENV = {"LAMBDA_TASK_ROOT": "/var/task", "POWERTOOLS_TRACE_DISABLED": None}


def default_config(quick: bool = False) -> dict:
    return {"runs": 3 if quick else 7}


def handler_modules() -> list[str]:
    return sorted(
        f"tunnelnat.handlers.{p.stem}"
        for p in HANDLERS.glob("*.py")
        if "\ndef handler(" in p.read_text()  # Lambda entry points, not their helpers
    )


def _env(overrides: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "TUNNELNAT_"))}
    env.update(LAMBDA_ENV)
    env["PYTHONPATH"] = str(REPO / "lambdas")
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    for key, value in (overrides or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def import_time(module: str, runs: int, env_overrides: dict | None = None) -> dict:
    env = _env(env_overrides)
    cumulative, walls, bases, top = [], [], [], []
    # One unmeasured run first: it writes the bytecode caches, as a deployed asset would have.
    subprocess.run([PYTHON, "-c", f"import {module}"], env=env, capture_output=True, check=False)
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([PYTHON, "-c", "pass"], env=env, check=True, capture_output=True)
        bases.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        proc = subprocess.run([PYTHON, "-c", f"import {module}"], env=env, capture_output=True,
                              text=True)  # fmt: skip
        walls.append(time.perf_counter() - t0)
        if proc.returncode != 0:
            return {"module": module, "error": proc.stderr.strip()[-500:]}
        proc = subprocess.run([PYTHON, "-X", "importtime", "-c", f"import {module}"], env=env,
                              capture_output=True, text=True, check=True)  # fmt: skip
        rows = _parse_importtime(proc.stderr)
        mine = [r for r in rows if r[2] == module]
        cumulative.append(mine[-1][1] / 1e6 if mine else float("nan"))
        top = rows
    # What the module imports directly, heaviest first (importtime lists children before their
    # parent, one indentation level deeper).
    children: list[tuple[str, int]] = []
    idx = max((i for i, r in enumerate(top) if r[2] == module and r[3] == 0), default=-1)
    for _self_us, cum_us, name, depth in reversed(top[:idx] if idx >= 0 else []):
        if depth == 0:
            break
        if depth == 1:
            children.append((name, cum_us))
    heaviest = sorted(children, key=lambda kv: -kv[1])[:8]
    return {
        "module": module,
        "importtime_cumulative_seconds": statistics.median(cumulative),
        "import_wall_seconds": statistics.median(walls),
        "interpreter_start_seconds": statistics.median(bases),
        "import_wall_minus_start_seconds": statistics.median(walls) - statistics.median(bases),
        "runs": runs,
        "samples": [round(c, 4) for c in cumulative],
        "heaviest_direct_imports": [{"module": k, "seconds": v / 1e6} for k, v in heaviest],
    }


def _parse_importtime(stderr: str) -> list[tuple[int, int, str, int]]:
    rows = []
    for line in stderr.splitlines():
        m = re.match(r"import time:\s+(\d+)\s+\|\s+(\d+)\s+\|( *)(\S+)", line)
        if m:
            depth = (len(m.group(3)) - 1) // 2
            rows.append((int(m.group(1)), int(m.group(2)), m.group(4), depth))
    return rows


def zip_size(root: Path, *, arc_prefix: str = "") -> dict:
    buf = io.BytesIO()
    files = raw = 0
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(root.rglob("*")):
            parts = path.relative_to(root).parts
            if "__pycache__" in parts or any(p.endswith(".egg-info") for p in parts):
                continue
            if path.is_file():
                zf.write(path, arc_prefix + str(path.relative_to(root)))
                files += 1
                raw += path.stat().st_size
    return {"zipped_bytes": len(buf.getvalue()), "unzipped_bytes": raw, "files": files}


def dependency_sizes() -> dict:
    """Zipped size of the third-party packages the handlers need beyond the Lambda runtime's
    boto3: what a bundled asset (instead of the Powertools layer) would add."""
    out = {}
    site = Path(
        subprocess.run([PYTHON, "-c", "import pydantic, os; print(os.path.dirname("
                        "os.path.dirname(pydantic.__file__)))"],
                       capture_output=True, text=True, check=False).stdout.strip() or "."
    )  # fmt: skip
    for pkg in ("aws_lambda_powertools", "pydantic", "pydantic_core", "yaml"):
        path = site / pkg
        if path.is_dir():
            out[pkg] = zip_size(path)["zipped_bytes"]
    return out


def run(config: dict) -> dict:
    modules = config.get("modules") or handler_modules()
    imports = [import_time(m, config["runs"]) for m in modules]
    traced = [import_time(m, config["runs"], TRACED_ENV) for m in modules]
    for r in imports:
        if "error" in r:
            sys.stderr.write(f"  [coldstart] {r['module']}: import failed: {r['error']}\n")
        else:
            sys.stderr.write(
                f"  [coldstart] {r['module']}: {r['importtime_cumulative_seconds'] * 1000:.0f} ms "
                f"(-X importtime), wall {r['import_wall_seconds'] * 1000:.0f} ms\n"
            )
    asset = zip_size(REPO / "lambdas")
    for r in traced:
        if "error" not in r:
            sys.stderr.write(
                f"  [coldstart] {r['module']} with X-Ray tracing on: "
                f"{r['importtime_cumulative_seconds'] * 1000:.0f} ms\n"
            )
    return {
        "config": config,
        "imports": imports,
        "imports_tracing_on": traced,
        "asset": {"path": "lambdas/", **asset},
        "dependencies_zipped_bytes": dependency_sizes(),
    }
