"""``make demo``: the whole story in a namespace lab, as a short report. Needs root.

    python -m lab.demo [--instances N] [--burst N] [--keep-going]

Builds the lab (namespaces, strongSwan at both ends, moto as AWS), configures the gateway with
the real ConfigureGateway document, drives the real controller handler with EC2 tag-change
events and Auto Scaling lifecycle events (through EventBridge and SQS, in batches), heals a
killed tunnel through the health agent, the alarm and the healer, shows the operator's
``tunnelnat status`` and ``tunnelnat doctor``, runs the gateway pair's stories against the strict
AWS fakes (a planned switchover, an upgrade of the gateway software under traffic:
``lab.upgrade_story``, a minute of slow AWS on the active, a rolling replacement of both
gateways: ``lab.pair_stories``) and its failover, then (issue 23, a lab of its own:
``lab.partners_story``; ``--no-partners`` skips it) three partners from one partners file, and
checks each step with real packets.
Everything is removed on exit, on Ctrl-C and on failure. Exit status 0 only when every step
passed.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import textwrap
import time
from typing import Any

from lab import topology as topo
from lab.controller import LabController
from lab.partners_lab import BANK, CARD, CLEARING, SITES
from lab.partners_story import PartnersStory, partners_lab
from lab.story import Story

TOOLS = (
    "ip",
    "nft",
    "swanctl",
    "charon-systemd",
    "tcpdump",
    "curl",
    "socat",
    "nsenter",
    "unshare",
    "ping",
)


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
    parser.add_argument(
        "--burst", type=int, default=20, help="Auto Scaling launches at once (0: none)"
    )
    parser.add_argument("--keep-going", action="store_true", help="run every step after a failure")
    parser.add_argument(
        "--no-partners",
        dest="partners",
        action="store_false",
        help="skip the three-partner lab (issue 23) after the single-partner story",
    )
    args = parser.parse_args(argv)
    problems = missing_requirements()
    if problems:
        print("demo: cannot run:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    # web-1 and the burst each need an address of the lab's pool.
    most = len(topo.POOL) - 1
    if not 0 <= args.burst <= most or not 2 <= args.instances <= 50:
        print(f"demo: --instances 2..50, --burst 0..{most} (the pool's size)", file=sys.stderr)
        return 2
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    # A TERM (a CI timeout, kill) unwinds like Ctrl-C, so the lab is removed on the way out.
    signal.signal(signal.SIGTERM, _interrupt)
    print("tunnelnat demo: building the lab (namespaces tn-*, strongSwan, moto) ...", flush=True)
    started = time.monotonic()
    failed = 0
    results: dict[str, Any] = {}
    seconds: dict[str, float] = {}  # step number -> its time
    lab = topo.Lab(instances_count=max(2, args.instances))
    try:
        with lab:
            names = ", ".join(f"{i.name}={i.private_ip}" for i in lab.instances)
            if lab.private_instances:
                names += "; behind the VPC router (tn-vpcrtr), in the private subnet: " + ", ".join(
                    f"{i.name}={i.private_ip}" for i in lab.private_instances
                )
            print(
                f"  lab ready in {lab.timings['build']:.1f}s (the gateway booted through its "
                f"units in {lab.timings['gateway_boot']:.1f}s: ENI attached, G on "
                f"{topo.ENI_LINK}): gateway G={topo.GW_ENI} "
                f"E={topo.GW_PUBLIC}, partner T={topo.PARTNER_ENDPOINT} A={topo.APP}, "
                f"instances {names}\n"
            )
            with LabController(lab) as controller:
                story = Story(lab, controller)
                failed, number = run_steps(
                    story.all_steps(burst=args.burst), 1, results, seconds, args.keep_going
                )
        labs = [lab]
        if args.partners and (not failed or args.keep_going):
            # Issue 23: a lab of its own (three partners from a partners file); today's story
            # above stays the single-partner deployment it always was.
            print("\ntunnelnat demo: three partners on one gateway (partners file) ...", flush=True)
            with partners_lab() as (plab, pcontroller):
                labs.append(plab)
                print(
                    f"  partners lab ready in {plab.timings.get('build', 0.0):.1f}s: card "
                    f"T={SITES[CARD].endpoint} (IKEv2, AWS-like), bank T={SITES[BANK].endpoint} "
                    f"(IKEv1 main mode), clearing T={SITES[CLEARING].endpoint} (IKEv2; its app "
                    f"server is card's {SITES[CLEARING].app})\n",
                    flush=True,
                )
                pstory = PartnersStory(plab, pcontroller)
                more, number = run_steps(
                    pstory.all_steps(peer_killed=True), number, results, seconds, args.keep_going
                )
                failed += more
    except KeyboardInterrupt:
        print("\ninterrupted: lab removed", file=sys.stderr)
        return 130
    # Judged by the lab's own cleanup, under its lock: another lab may start right after ours.
    cleaned = all(one.cleaned for one in labs)
    left = [] if cleaned else topo.lab_namespaces() or ["(cleanup did not finish)"]
    print()
    for line in headline(results):
        print(line)
    slowest = sorted(seconds.items(), key=lambda kv: -kv[1])[:5]
    waited = sum(one.timings.get("lock_wait", 0.0) for one in labs)
    print(
        "time: lab built in "
        f"{lab.timings.get('build', 0.0):.0f}s"
        + (f" after {waited:.0f}s waiting for another lab" if waited >= 1 else "")
        + "; slowest steps: "
        + ", ".join(f"{n}. {s:.0f}s" for n, s in slowest)
    )
    print(
        f"{'all steps passed' if not failed else f'{failed} step(s) failed'}; "
        f"{time.monotonic() - started - waited:.1f}s; cleaned up "
        f"({'no namespaces left' if not left else 'LEFT: ' + ', '.join(left)})"
    )
    return 0 if not failed and not left else 1


def run_steps(
    steps: list[Any],
    first: int,
    results: dict[str, Any],
    seconds: dict[str, float],
    keep_going: bool,
) -> tuple[int, int]:
    """Run and print ``steps``, numbered from ``first``: (steps failed, the next number). Stops
    at the first failure unless ``keep_going``."""
    failed = 0
    number = first
    for step_fn in steps:
        step_started = time.monotonic()
        step = step_fn()
        seconds[f"{number}"] = time.monotonic() - step_started
        mark = "\u2713" if step.ok else "\u2717"
        print(f"{mark} {number}. {step.title}\n     {step.figure}", flush=True)
        if "output" in step.data:
            # The operator's command as it printed itself.
            text = step.data["output"].rstrip("\n")
            print(textwrap.indent(text, "       | ", lambda _line: True))
        results[step.title] = step
        number += 1
        if not step.ok:
            failed += 1
            if not keep_going:
                print(f"\n  stopping; logs were in {topo.LOGS} (removed on exit)")
                break
    return failed, number


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def headline(results: dict[str, Any]) -> list[str]:
    """The figures the issues ask for, once more at the end of the report."""
    lines = []
    private_seconds = sum(s.data.get("step_seconds", 0.0) for s in results.values())
    if private_seconds:
        lines.append(f"private subnet: its four steps took {private_seconds:.1f}s")
    for step in results.values():
        burst = step.data.get("report") if "burst" in step.title.lower() else None
        if burst is not None:
            lines.append(
                f"Auto Scaling burst: {len(burst.instances)} instances converged in "
                f"{burst.converge_seconds:.1f}s ({burst.wall_seconds:.1f}s from launch, namespaces "
                f"booted included) at {burst.syncs} gateway sync(s) for {len(burst.batches)} "
                "SQS batch(es)"
            )
        scale_in = step.data.get("scale_in")
        if scale_in is not None:
            lines.append(
                f"Auto Scaling scale-in: {len(scale_in.instances)} terminations released in "
                f"{scale_in.seconds:.1f}s at {scale_in.syncs} gateway sync(s), every address "
                f"back in the pool: {'yes' if not scale_in.claimed else 'NO'}"
            )
        if step.data.get("kill_to_restored") is not None:
            lines.append(
                f"healing: kill -9 of the gateway's charon to traffic restored "
                f"{step.data['kill_to_restored']:.1f}s (agent, alarm, healer, RestartTunnel)"
            )
        if step.data.get("boot_to_a") is not None:
            lines.append(
                f"gateway reboot: boot start to the first packet at A as S "
                f"{step.data['boot_to_a']:.2f}s; {step.data['clear']} clear-text packets"
            )
        if "make_before_break" in step.data:
            lines.append(
                f"rekeys: {step.data['sent']} packets to A across {step.data['ours']} CHILD_SA "
                f"rekeys by us, {step.data['theirs']} by the partner, {step.data['ike']} IKE_SA: "
                f"{step.data['lost']} lost, {step.data['clear']} clear-text"
            )
        if "before_at_g" in step.data:  # the private subnet (route-table mode)
            lines.append(
                f"private subnet: an instance with no SSM agent reached A as "
                f"S={step.data['outcome'].get('public_ip')} through its route table "
                f"({step.data['target']}) in {step.data['seconds']:.2f}s, "
                f"{len(step.data['asked'])} documents sent to it"
            )
        if "at_g" in step.data and "dropped" in step.data:
            lines.append(
                f"private subnet: the untagged neighbour's {step.data['at_g']} packets reached G, "
                f"{step.data['dropped']} dropped there (dropped_unenrolled)"
            )
        if "target_after_leave" in step.data:
            lines.append(
                f"private subnet: a foreign route -> {step.data['outcome'].get('status')}, left "
                f"alone (still -> {step.data['target_after_leave']} after the instance left)"
            )
        failover = step.data.get("failover")
        if failover is not None:
            seconds = failover.failover_seconds
            lines.append(
                "gateway failover: "
                + (f"{seconds:.2f}s" if seconds is not None else "NEVER")
                + f" from the last packet through the old active to the first through the new "
                f"({failover.lost} of {failover.sent} lost, {len(failover.clear)} clear-text; "
                f"E and G {'unchanged' if failover.e_and_g.get('unchanged') else 'CHANGED'}, "
                f"{len(failover.commands_after)} commands to instances)"
            )
        switchover = step.data.get("switchover")
        if switchover is not None:
            lines.append(
                f"planned switchover: {switchover.loss_seconds:.2f}s of loss ({switchover.lost} "
                f"of {switchover.sent} lost), {len(switchover.clear)} clear-text"
            )
        upgrade = step.data.get("upgrade")
        if upgrade is not None:
            lines.append(
                f"gateway software upgrade {upgrade.version_before} -> {upgrade.version_after} on "
                f"both gateways: {upgrade.loss_seconds:.2f}s of loss ({upgrade.lost} of "
                f"{upgrade.sent} lost), {len(upgrade.clear)} clear-text"
            )
        rolling = step.data.get("rolling")
        if rolling is not None:
            lines.append(
                f"rolling replacement of both gateways: {len(rolling.clear)} clear-text, "
                f"{rolling.loss_seconds:.2f}s of loss in all ({rolling.lost} of {rolling.sent} "
                f"lost) in {rolling.seconds:.0f}s"
            )
        slow = step.data.get("slow_aws")
        if slow is not None:
            lines.append(
                f"slow AWS on the active: {slow.failovers} failovers, widest heartbeat gap "
                f"{slow.max_heartbeat_gap:.2f}s, {slow.lost} lost"
            )
        heal = step.data.get("partners_heal")
        if heal is not None:
            lines.append(
                f"three partners: bank's connection cut -> only bank healed (RestartTunnel "
                f"TunnelName={','.join(r.get('TunnelName', '?') for r in heal['restarts'])}) in "
                + (
                    f"{heal['healed_seconds']:.1f}s"
                    if heal["healed_seconds"] is not None
                    else "NEVER"
                )
                + f"; card {heal['lost']['card']} of {heal['sent']['card']} lost, clearing "
                f"{heal['lost']['clearing']} of {heal['sent']['clearing']} lost, "
                f"{heal['clear']} clear-text"
            )
        if "shared_reqids" in step.data:  # bank's daemon killed
            d = step.data
            healed = d["healed_seconds"]
            reqids = sorted(str(r) for r in d["after"].get("bank", {}).get("reqids", {}).values())
            lines.append(
                f"three partners: bank's daemon killed (-9) -> our DPD re-established bank alone "
                f"in {'NEVER' if healed is None else f'{healed:.1f}s'}; card {d['lost']['card']} "
                f"of {d['sent']['card']} lost, clearing {d['lost']['clearing']} of "
                f"{d['sent']['clearing']} lost, {d['clear']} clear-text; bank's CHILD_SAs on "
                f"reqids {', '.join(reqids) or 'none'}"
                + (f" (SHARED: {d['shared_reqids']})" if d["shared_reqids"] else "")
            )
        if "overlap" in step.data:
            lines.append(f"three partners: {step.data['overlap']}")
        if "diagnosis" in step.data:
            lines.append(f"broken partner: {step.data['diagnosis']}")
        if "summary" in step.data:
            lines.append(f"tunnelnat doctor: {step.data['summary']}")
    return lines


if __name__ == "__main__":
    sys.exit(main())
