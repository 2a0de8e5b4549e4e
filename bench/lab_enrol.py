"""Part 5: tag -> traffic, end to end in the namespace lab (issue 16).

The lab (lab.topology.Lab: real strongSwan, nftables, the SSM documents run as the agent runs
them, moto for AWS) is built once with ``instances`` instances and the tunnel configured. Then,
one instance at a time: a sender in the instance's namespace sends a UDP datagram to the
partner's app server A every ``interval`` seconds, each from a fresh socket (a new flow, NATed by
the table as it is at that moment); the enrolment tag is written and the tag-change event handed
to the real controller handler (``LabController.tag_changed``: EC2 tag in moto, the handler, its
SyncNatTable and AddHostRoute documents run in the gateway's and the instance's namespaces); a
capture on A's interface records when the first datagram arrives with the instance's S as its
source. Tag -> traffic = that arrival time - the time just before the tag was written (both the
host's clock). Median and max over the instances.

Only the lab's public API is used (Lab, LabController, capture, instance, machine_argv); the lab
takes its own lock, so a running lab (a test, the demo) makes this part wait.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import time


def default_config(quick: bool = False) -> dict:
    return {"instances": 4 if quick else 10, "interval": 0.01, "settle": 1.0}


SENDER = (
    "import socket, sys, time\n"
    "target, interval = sys.argv[1], float(sys.argv[2])\n"
    "while True:\n"
    "    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    "    try:\n"
    "        s.sendto(b'tag', (target, 9))\n"
    "    except OSError:\n"
    "        pass  # no route to A yet\n"
    "    s.close()\n"
    "    time.sleep(interval)\n"
)


def run(config: dict) -> dict:
    from lab import topology as topo
    from lab.controller import LabController

    count = int(config["instances"])
    interval = float(config["interval"])
    samples: list[dict] = []
    started = time.monotonic()
    with topo.Lab(instances_count=count) as lab:
        build = time.monotonic() - started
        tunnel = lab.configure_gateway()
        if not tunnel.ok:
            raise RuntimeError(f"ConfigureGateway {tunnel.status}: {tunnel.stderr[-300:]}")
        with LabController(lab) as controller:
            for inst in lab.instances:
                samples.append(_one(lab, controller, topo, inst, interval, config["settle"]))
    seconds = [s["seconds"] for s in samples if s["seconds"] is not None]
    return {
        "config": config,
        "lab_build_seconds": build,
        "samples": samples,
        "reached": len(seconds),
        "median": statistics.median(seconds) if seconds else None,
        "max": max(seconds) if seconds else None,
        "min": min(seconds) if seconds else None,
        "handler_median": statistics.median(s["handler_seconds"] for s in samples),
    }


def _one(lab: object, controller: object, topo: object, inst: object, interval: float,
         settle: float) -> dict:  # fmt: skip
    argv = topo.machine_argv(inst.ns, [sys.executable, "-c", SENDER, topo.APP, str(interval)])  # type: ignore[attr-defined]
    with lab.capture("tn-app", "eth0", "udp and dst port 9", epoch=True) as arrived:  # type: ignore[attr-defined]
        proc = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        try:
            time.sleep(0.3)  # sending (into nowhere) before the tag
            tagged = time.time()
            reply = controller.tag_changed(inst.name, enrol=True)  # type: ignore[attr-defined]
            handled = time.time() - tagged
            outcome = (reply.get("outcomes") or [{}])[0]
            public = outcome.get("public_ip")
            time.sleep(settle)  # the handler returns with the route and the mapping in place
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=5)
    times = sorted(
        float(line.split()[0])
        for line in arrived
        if public and f" {public}." in line and float(line.split()[0]) >= tagged
    )
    return {
        "instance": inst.name,  # type: ignore[attr-defined]
        "status": outcome.get("status"),
        "public_ip": public,
        "handler_seconds": handled,
        "seconds": times[0] - tagged if times else None,
    }
