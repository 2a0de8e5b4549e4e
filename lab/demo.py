"""``make demo``: the whole story in a namespace lab, as a short report. Needs root.

    python -m lab.demo [--instances N] [--keep-going]

Builds the lab (namespaces, strongSwan at both ends, moto as AWS), configures the gateway with
the real ConfigureGateway document, drives the real controller handler with EC2 tag-change
events, and checks each step with real packets. Everything is removed on exit, on Ctrl-C and on
failure. Exit status 0 only when every step passed.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time

from lab import topology as topo

TOOLS = ("ip", "nft", "swanctl", "charon-systemd", "tcpdump", "curl", "socat", "nsenter", "unshare")


def missing_requirements() -> list[str]:
    problems = []
    if os.geteuid() != 0:
        problems.append("must run as root (network namespaces, nftables, strongSwan)")
    missing = [tool for tool in TOOLS if not shutil.which(tool)]
    problems += [f"{tool} not found (make deps installs it)" for tool in missing]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=2, help="instances web-1..N (>= 2)")
    parser.add_argument("--keep-going", action="store_true", help="run every step after a failure")
    args = parser.parse_args(argv)
    problems = missing_requirements()
    if problems:
        print("demo: cannot run:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    from lab.controller import LabController
    from lab.story import Story

    print("tunnelnat demo: building the lab (namespaces tn-*, strongSwan, moto) ...", flush=True)
    started = time.monotonic()
    failed = 0
    try:
        with topo.Lab(instances_count=max(2, args.instances)) as lab:
            names = ", ".join(f"{i.name}={i.private_ip}" for i in lab.instances)
            print(
                f"  lab ready in {lab.timings['build']:.1f}s: gateway G={topo.GW_ENI} "
                f"E={topo.GW_PUBLIC}, partner T={topo.PARTNER_ENDPOINT} A={topo.APP}, "
                f"instances {names}\n"
            )
            with LabController(lab) as controller:
                story = Story(lab, controller)
                for number, step_fn in enumerate(story.all_steps(), start=1):
                    step = step_fn()
                    mark = "\u2713" if step.ok else "\u2717"
                    print(f"{mark} {number}. {step.title}\n     {step.figure}", flush=True)
                    if not step.ok:
                        failed += 1
                        if not args.keep_going:
                            print(f"\n  stopping; logs were in {topo.LOGS} (removed on exit)")
                            break
    except KeyboardInterrupt:
        print("\ninterrupted: lab removed", file=sys.stderr)
        return 130
    left = topo.lab_namespaces()
    print(
        f"\n{'all steps passed' if not failed else f'{failed} step(s) failed'}; "
        f"{time.monotonic() - started:.1f}s; cleaned up "
        f"({'no namespaces left' if not left else 'LEFT: ' + ', '.join(left)})"
    )
    return 0 if not failed and not left else 1


if __name__ == "__main__":
    sys.exit(main())
