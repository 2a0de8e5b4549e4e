#!/usr/bin/env python3
"""Synthesize the tunnelnat stack: ``python app.py [-c key=value ...]`` (``make synth``) writes
cdk.out/ without credentials; the CDK CLI runs the same file through cdk.json.

Context keys and their defaults: docs/stack.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path[:0] = [str(ROOT), str(ROOT / "lambdas")]

from stacks.application import build_app, cdk_json_context  # noqa: E402
from tunnelnat.core.config import ConfigError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "-c",
        "--context",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a context key (as the CDK CLI's -c does)",
    )
    args = parser.parse_args(argv)
    context = cdk_json_context()
    for item in args.context:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"-c {item}: expected KEY=VALUE")
        context[key.strip()] = value
    # Under the CDK CLI, CDK_OUTDIR says where to write; on its own, cdk.out/ as the CLI would.
    outdir = None if os.environ.get("CDK_OUTDIR") else str(ROOT / "cdk.out")
    try:
        app, _ = build_app(context, outdir=outdir)
    except ConfigError as exc:
        print(f"tunnelnat: {exc}", file=sys.stderr)
        return 2
    app.synth()
    return 0


if __name__ == "__main__":
    sys.exit(main())
