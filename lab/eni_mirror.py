"""EC2's hypervisor and Internet gateway for G's ENI, in the lab: the ENI's links follow moto.

On AWS an attached ENI appears in its instance as a hot-plugged NIC; a detached one is gone from
it, whatever that instance's software thinks (a force-detach fences a hung active). The Internet
gateway maps E to whichever instance holds the ENI. The lab's gateway pair has two machines
(``tn-gw``, ``tn-gw2``); the ENI is the veth ``eni0`` on the VPC bridge, and E sits on the public
link ``eth1`` towards ``tn-inet`` (the lab has no Internet gateway translating G to E).

``EniMirror`` polls moto's ``DescribeNetworkInterfaces`` for the ENI (every ``interval``, 50 ms)
and, when the attachment's holder changes, moves both links into the holder's namespace
(``ip link set dev X netns Y``: they arrive down, without addresses, as a hot-plugged NIC does).
A detached ENI's links wait, down, in the hypervisor's namespace (``tn-vpc``). On the holder it
puts E and the default route back on ``eth1`` (the Internet gateway's part) and nothing else: G
on ``eni0`` is the production code's to configure (the pair agent or the boot program finds the
link by the ENI's MAC). Nobody tells the mirror anything: the production code's
Detach/AttachNetworkInterface against moto drive it, as they drive EC2.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lab.poller import Polled, Poller

PARKING_NS = "tn-vpc"  # where a detached ENI's links wait: no instance's


@dataclass(frozen=True)
class Move:
    at: float  # time.time() when the links had arrived
    holder: str | None  # the instance moto said holds the ENI (None: detached)
    source: str  # namespace the links left
    target: str  # namespace they arrived in
    seconds: float  # how long the move took (ip calls)


def run_ip_batch(ns: str, commands: list[str]) -> None:
    """``ip -n NS -batch -``: several changes in one process (a move is a few milliseconds)."""
    proc = subprocess.run(
        ["ip", "-n", ns, "-batch", "-"],
        input="\n".join(commands) + "\n",
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"ip -n {ns} -batch: {proc.stderr.strip()}")


@dataclass
class EniMirror(Polled):
    """Keep ``links`` in the namespace of the instance moto says holds ``eni_id``."""

    poller_name = "eni-mirror"

    ec2: Any  # a boto3 EC2 client on moto
    eni_id: str
    namespaces: Mapping[str, str]  # instance id -> its machine's namespace
    location: str  # where the links are now
    eni_link: str  # G's side (moves, configured by the production code)
    public_link: str  # E's side (moves, configured here: the Internet gateway's stand-in)
    public_address: str  # E with its prefix length
    public_router: str  # the default route's next hop on the public link
    interval: float = 0.05
    run_batch: Callable[[str, list[str]], None] = run_ip_batch
    moves: list[Move] = field(default_factory=list)
    polls: int = 0
    last_error: str | None = None
    _poller: Poller | None = None

    def holder(self) -> str | None:
        """The instance the ENI is attached to (attaching or attached), as EC2 reports it."""
        reply = self.ec2.describe_network_interfaces(NetworkInterfaceIds=[self.eni_id])
        attachment = reply["NetworkInterfaces"][0].get("Attachment") or {}
        # Only an attached ENI carries packets: while EC2 says attaching (seconds with the
        # strict fakes' AWS-like delays, tools/aws_strict.py) the links stay parked, as the
        # device has not appeared in the instance yet; detaching parks them at once.
        if attachment.get("Status", "attached") in ("attaching", "detaching", "detached"):
            return None
        return attachment.get("InstanceId")

    def wanted(self, holder: str | None) -> str:
        if holder is None:
            return PARKING_NS
        # An instance with no lab machine (none should hold it): the hypervisor keeps the links.
        return self.namespaces.get(holder, PARKING_NS)

    def sync(self) -> Move | None:
        """One look at EC2; move the links when their holder changed. Level-triggered."""
        holder = self.holder()
        self.polls += 1
        target = self.wanted(holder)
        if target == self.location:
            return None
        started = time.monotonic()
        source = self.location
        self.run_batch(
            source,
            [
                f"link set dev {self.eni_link} netns {target}",
                f"link set dev {self.public_link} netns {target}",
            ],
        )
        self.location = target
        if target != PARKING_NS:
            # The Internet gateway's side: E reaches this instance again. G is not ours to set.
            self.run_batch(
                target,
                [
                    f"address replace {self.public_address} dev {self.public_link}",
                    f"link set dev {self.public_link} up",
                    f"route replace default via {self.public_router} dev {self.public_link}",
                ],
            )
        move = Move(time.time(), holder, source, target, time.monotonic() - started)
        self.moves.append(move)
        return move
