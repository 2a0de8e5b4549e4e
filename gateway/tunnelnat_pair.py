#!/usr/bin/env python3
"""The gateway pair's agent: the standby takes G's ENI when the active falls silent.

Runs on both gateways of a pair (unit ``tunnelnat-pair``, after ``tunnelnat-boot`` and
strongSwan), with the distribution's python3 and boto3 (standard library + boto3 only):

    tunnelnat_pair.py run [--config /etc/tunnelnat/pair.json]
    tunnelnat_pair.py check-config [--config FILE]

EC2 is the truth (docs: the pair): the **active** is the instance G's ENI is attached to, the
other is the **standby**. Every ``interval_seconds`` each sends the other one UDP heartbeat
(``heartbeat_port``, JSON: ``v, instance, role, seq, generation, sas, sent``). The standby
counts the intervals since it last heard the active; after ``misses`` (at start: ``misses``
intervals plus ``startup_grace_seconds`` without ever hearing it) it takes over:

  1. the ENI attached here: nothing to take. Attached elsewhere for less than
     ``hold_down_seconds``: refused (someone just took it; no flapping).
  2. DetachNetworkInterface(Force) of the attachment it saw, wait for ``available``,
     AttachNetworkInterface(DeviceIndex 1), wait for ``attached`` here. A refused attach, or
     the ENI found on the other instance: it lost the race and stays standby (AWS allows one
     attachment at a time: the attachment decides, and fences the old active).
  3. G on the link with the ENI's MAC and the route to T (tunnelnat_boot's Links), then
     ``swanctl --initiate --child C`` for each CHILD_SA (charon sends INITIAL_CONTACT, see
     ``initiate``), so the partner drops the dead gateway's SAs.
  4. DynamoDB ``meta/pair``, CloudWatch ``Failovers``/``FailoverSeconds`` (dimension
     Deployment), SNS when ``topic_arn`` is set. One line ``takeover {JSON}`` on stderr.

The active checks every interval that the ENI's link is still here, and every
``check_seconds`` (or at once when the other one also claims to be active) the ENI's
attachment: fenced, it becomes the standby. There is no fail-back. Both write their readiness
(``gateway/<instance-id>``) every ``check_seconds`` and their role to ``role_file`` (the
health agent publishes the tunnel's metrics only while it reads ``active`` there).

The decisions are ``PairMachine``'s (pure: time, heartbeats and ENI readings in, actions out);
``Agent`` does the I/O. ``TUNNELNAT_IMDS_URL`` and ``AWS_ENDPOINT_URL`` as for the boot program.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # installed side by side
import tunnelnat_boot as boot  # noqa: E402

CONFIG_FILE = Path("/etc/tunnelnat/pair.json")
ROLE_FILE = Path("/run/tunnelnat/pair-role")
ACTIVE, STANDBY = "active", "standby"
HEARTBEAT_VERSION = 1
MAX_DATAGRAM = 1024
NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")  # tunnel and CHILD_SA names (swanctl.py's)
DEPLOYMENT = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
TABLE = re.compile(r"^[A-Za-z0-9_.-]{3,255}$")
NAMESPACE = re.compile(r"^[A-Za-z0-9_.#:/-]{1,255}$")
TOPIC_ARN = re.compile(
    r"^arn:aws[a-z-]*:sns:[a-z]{2}(-[a-z]+)+-[0-9]:[0-9]{12}:[A-Za-z0-9_-]{1,256}$"
)
ROLE_PATH = re.compile(r"^/[A-Za-z0-9_][A-Za-z0-9_/.-]{0,200}$")
PEER_TAGS = {"tunnelnat:role": "gateway"}  # and tunnelnat:deployment = the deployment
READINESS_KEEP_SECONDS = 3600  # the gateway/<id> item's TTL
STATUS_SECONDS = 5.0  # how often the heartbeat's generation and SA count are re-read


class PairError(RuntimeError):
    pass


def log(message: str) -> None:
    print(f"tunnelnat-pair: {message}", file=sys.stderr, flush=True)


def event(name: str, **fields: Any) -> None:
    """One machine-readable line (the lab reads ``takeover`` and ``tunnel_up``)."""
    log(f"{name} {json.dumps({'event': name, **fields}, sort_keys=True)}")


# -- configuration ------------------------------------------------------------------------------


def _number(data: dict[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise PairError(f"{key} must be a number, not {value!r}")
    if not low <= value <= high:
        raise PairError(f"{key} must be within {low:g}..{high:g}, not {value!r}")
    return float(value)


def _address(data: dict[str, Any], key: str) -> IPv4Address | None:
    value = data.get(key)
    if value in (None, ""):
        return None
    try:
        return IPv4Address(str(value))
    except ValueError:
        raise PairError(f"{key} must be an IPv4 address, not {value!r}") from None


@dataclass(frozen=True)
class PairConfig:
    region: str
    eni_id: str
    gateway: IPv4Interface  # G with its subnet's prefix length
    deployment: str
    table: str
    tunnel: str
    children: tuple[str, ...]
    heartbeat_port: int = 7465
    interval_seconds: float = 0.5
    misses: int = 4
    hold_down_seconds: float = 60.0
    startup_grace_seconds: float = 10.0
    check_seconds: float = 30.0
    topic_arn: str | None = None
    namespace: str = "tunnelnat"
    partner_endpoint: IPv4Address | None = None
    subnet_router: IPv4Address | None = None
    peer_address: IPv4Address | None = None
    role_file: Path = ROLE_FILE

    KEYS = frozenset(
        "region eni_id gateway deployment table tunnel children heartbeat_port interval_seconds "
        "misses hold_down_seconds startup_grace_seconds check_seconds topic_arn namespace "
        "partner_endpoint subnet_router peer_address role_file".split()
    )

    @classmethod
    def from_json(cls, data: object) -> PairConfig:
        """Every value checked (they reach ``ip``, ``swanctl`` and AWS); unknown keys refused."""
        if not isinstance(data, dict):
            raise PairError("the pair configuration must be a JSON object")
        unknown = sorted(set(data) - cls.KEYS)
        if unknown:
            raise PairError(f"unknown configuration keys: {', '.join(unknown)}")
        # The boot program's checks for what the two share (region, ENI, G, T and the router).
        shared = {k: data.get(k) for k in ("region", "eni_id", "gateway")}
        shared |= {k: data.get(k) for k in ("partner_endpoint", "subnet_router")}
        try:
            base = boot.BootConfig.from_json(shared)
        except boot.BootError as exc:
            raise PairError(str(exc)) from None
        for key, pattern in (("deployment", DEPLOYMENT), ("table", TABLE), ("tunnel", NAME)):
            if not isinstance(data.get(key), str) or not pattern.fullmatch(data[key]):
                raise PairError(f"invalid {key} {data.get(key)!r}")
        children = data.get("children", [data["tunnel"]])
        if (
            not isinstance(children, list)
            or not 1 <= len(children) <= 256
            or not all(isinstance(c, str) and NAME.fullmatch(c) for c in children)
        ):
            raise PairError(f"children must be 1-256 CHILD_SA names, not {children!r}")
        topic = data.get("topic_arn") or None
        if topic is not None and not (isinstance(topic, str) and TOPIC_ARN.fullmatch(topic)):
            raise PairError(f"invalid topic_arn {topic!r}")
        namespace = data.get("namespace", "tunnelnat")
        if not isinstance(namespace, str) or not NAMESPACE.fullmatch(namespace):
            raise PairError(f"invalid namespace {namespace!r}")
        role_file = data.get("role_file", str(ROLE_FILE))
        if (
            not isinstance(role_file, str)
            or not ROLE_PATH.fullmatch(role_file)
            or ".." in role_file
        ):
            raise PairError(f"invalid role_file {role_file!r}")
        port = _number(data, "heartbeat_port", 7465, 1, 65535)
        misses = _number(data, "misses", 4, 1, 100)
        if port != int(port) or misses != int(misses):
            raise PairError("heartbeat_port and misses are whole numbers")
        return cls(
            region=base.region,
            eni_id=base.eni_id,
            gateway=base.gateway,
            deployment=data["deployment"],
            table=data["table"],
            tunnel=data["tunnel"],
            children=tuple(children),
            heartbeat_port=int(port),
            interval_seconds=_number(data, "interval_seconds", 0.5, 0.05, 10),
            misses=int(misses),
            hold_down_seconds=_number(data, "hold_down_seconds", 60, 0, 3600),
            startup_grace_seconds=_number(data, "startup_grace_seconds", 10, 0, 600),
            check_seconds=_number(data, "check_seconds", 30, 1, 600),
            topic_arn=topic,
            namespace=namespace,
            partner_endpoint=base.partner_endpoint,
            subnet_router=base.subnet_router,
            peer_address=_address(data, "peer_address"),
            role_file=Path(role_file),
        )

    def boot_config(self) -> boot.BootConfig:
        return boot.BootConfig(
            region=self.region,
            eni_id=self.eni_id,
            gateway=self.gateway,
            partner_endpoint=self.partner_endpoint,
            subnet_router=self.subnet_router,
        )


def load_config(path: Path) -> PairConfig:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PairError(f"cannot read {path}: {exc}") from None
    return PairConfig.from_json(data)


# -- heartbeats ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Heartbeat:
    instance: str
    role: str
    seq: int
    generation: int | None  # the NAT table generation applied here (None: not synced)
    sas: int  # CHILD_SAs of the tunnel INSTALLED here
    sent: float  # the sender's wall clock (informative only: clocks differ)

    def encode(self) -> bytes:
        body = {"v": HEARTBEAT_VERSION, "instance": self.instance, "role": self.role}
        body |= {"seq": self.seq, "generation": self.generation, "sas": self.sas}
        body["sent"] = round(self.sent, 3)
        return json.dumps(body, separators=(",", ":")).encode()

    @classmethod
    def parse(cls, data: bytes) -> Heartbeat:
        """A heartbeat, or ValueError: anything else on the port is junk, never half-read."""
        if len(data) > MAX_DATAGRAM:
            raise ValueError("datagram too long")
        body = json.loads(data.decode("utf-8"))  # ValueError (UnicodeDecodeError included)
        if not isinstance(body, dict) or body.get("v") != HEARTBEAT_VERSION:
            raise ValueError("not a version 1 heartbeat")
        instance, role = body.get("instance"), body.get("role")
        seq, generation, sas, sent = (body.get(k) for k in ("seq", "generation", "sas", "sent"))
        if not isinstance(instance, str) or not boot.INSTANCE_ID.fullmatch(instance):
            raise ValueError(f"bad instance {instance!r}")
        if role not in (ACTIVE, STANDBY):
            raise ValueError(f"bad role {role!r}")
        for key, value in (("seq", seq), ("sas", sas)):
            if type(value) is not int or value < 0:
                raise ValueError(f"bad {key} {value!r}")
        if generation is not None and (type(generation) is not int or generation < 0):
            raise ValueError(f"bad generation {generation!r}")
        if isinstance(sent, bool) or not isinstance(sent, int | float) or not math.isfinite(sent):
            raise ValueError(f"bad sent {sent!r}")
        return cls(instance, role, seq, generation, sas, float(sent))


# -- the decisions (pure) -------------------------------------------------------------------------


@dataclass(frozen=True)
class TakeOver:
    reason: str
    silent_seconds: float  # since the active was last heard (or since the count started)


@dataclass(frozen=True)
class StepDown:
    reason: str


@dataclass(frozen=True)
class CheckEni:
    reason: str


@dataclass(frozen=True)
class Report:
    """Write the readiness item (gateway/<id>)."""


Action = TakeOver | StepDown | CheckEni | Report


@dataclass
class PairMachine:
    """What a gateway of the pair does next, from the time (monotonic seconds), the heartbeats it
    heard, its ENI link and EC2's word on the ENI. No I/O: ``Agent`` carries the actions out and
    reports a takeover's outcome back (``took_over`` / ``takeover_failed``)."""

    instance_id: str
    role: str
    now: float
    interval: float = 0.5
    misses: int = 4
    startup_grace: float = 10.0
    check_seconds: float = 30.0
    counting_since: float = field(init=False)  # the silence counts from here until first heard
    active_heard_at: float | None = field(default=None, init=False)
    active_instance: str | None = field(default=None, init=False)  # who it was
    peer_heard_at: float | None = field(default=None, init=False)
    not_before: float = field(default=0.0, init=False)  # no takeover attempt before this
    next_check: float = field(init=False)
    next_report: float = field(init=False)
    next_split_check: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        if self.role not in (ACTIVE, STANDBY):
            raise ValueError(f"role {self.role!r}")
        self.counting_since = self.now
        self.next_check = self.now + self.check_seconds
        self.next_report = self.now  # at once, then every check_seconds

    @property
    def limit(self) -> float:
        """Seconds of silence that make the active dead: misses intervals, plus the startup
        grace while it was never heard (the other gateway may still be booting)."""
        grace = 0.0 if self.active_heard_at is not None else self.startup_grace
        return self.misses * self.interval + grace

    def heard(self, heartbeat: Heartbeat, now: float) -> list[Action]:
        if heartbeat.instance == self.instance_id:
            return []  # our own datagram looped back: not the peer
        self.peer_heard_at = now
        if heartbeat.role != ACTIVE:
            return []
        self.active_heard_at = now
        self.active_instance = heartbeat.instance
        if self.role == ACTIVE and now >= self.next_split_check:
            # Both claim the ENI: EC2 says which one holds it; the other steps down.
            self.next_split_check = now + max(self.misses * self.interval, 1.0)
            return [CheckEni(f"{heartbeat.instance} also claims to be active")]
        return []

    def tick(self, now: float, *, link_present: bool) -> list[Action]:
        actions: list[Action] = []
        if now >= self.next_report:
            self.next_report = now + self.check_seconds
            actions.append(Report())
        if self.role == ACTIVE:
            if not link_present:
                actions.append(self._step_down(now, "the ENI's link is gone from this instance"))
            elif now >= self.next_check:
                self.next_check = now + self.check_seconds
                actions.append(CheckEni("periodic"))
            return actions
        since = self.active_heard_at if self.active_heard_at is not None else self.counting_since
        silent = now - since
        if silent >= self.limit and now >= self.not_before:
            misses = int(silent / self.interval + 1e-9)
            if self.active_heard_at is None:
                reason = f"no active heard for {silent:.1f} s (start or step-down)"
            else:
                reason = (
                    f"active {self.active_instance} silent for {silent:.1f} s ({misses} misses)"
                )
            actions.append(TakeOver(reason, silent))
        return actions

    def eni_seen(self, now: float, holder: str | None) -> list[Action]:
        """EC2's answer to CheckEni: the instance holding the ENI (None: nobody)."""
        if self.role == ACTIVE and holder != self.instance_id:
            return [self._step_down(now, f"the ENI is attached to {holder or 'no instance'}")]
        return []

    def took_over(self, now: float) -> None:
        self.role = ACTIVE
        self.next_check = now + self.check_seconds
        self.next_report = now  # the new role is written at once

    def takeover_failed(self, now: float, retry_after: float | None = None) -> None:
        """Refused (hold-down), lost the race, or failed: stay standby, try again no sooner
        than ``retry_after`` seconds (or a full count of misses) from now."""
        wait = self.misses * self.interval if retry_after is None else retry_after
        self.not_before = now + max(wait, self.interval)

    def _step_down(self, now: float, reason: str) -> StepDown:
        # Fenced: count the silence from here, with the startup grace, as at a start. The new
        # active's heartbeats reset it; it is never taken back while they are heard.
        self.role = STANDBY
        self.counting_since = now
        self.active_heard_at = None
        self.next_report = now
        return StepDown(reason)


# -- the takeover (EC2) ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Holding:
    holder: str | None  # the instance the ENI is attached to (None: available/detaching)
    attachment_id: str | None
    attached_at: float | None  # epoch seconds
    status: str
    mac: str


def holding(eni: dict[str, Any]) -> Holding:
    attachment = eni.get("Attachment") or {}
    state = attachment.get("Status")
    holder = attachment.get("InstanceId") if state in ("attaching", "attached") else None
    when = attachment.get("AttachTime")
    attached_at = when.timestamp() if isinstance(when, datetime) else None
    return Holding(
        holder,
        attachment.get("AttachmentId") if holder else None,
        attached_at,
        str(eni.get("Status", "")),
        str(eni.get("MacAddress", "")).lower(),
    )


@dataclass(frozen=True)
class TakeoverResult:
    outcome: str  # won, already (attached here before), refused, lost, failed
    detail: str
    previous: str | None = None  # the instance that held the ENI
    retry_after: float | None = None
    mac: str = ""


@dataclass
class Takeover:
    """Take the ENI: force-detach what holds it, attach here; the attachment decides a race."""

    config: PairConfig
    ec2: Any
    instance_id: str
    wall: Callable[[], float] = time.time
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    poll_seconds: float = 0.2
    timeout_seconds: float = 120.0

    def describe(self) -> Holding:
        reply = self.ec2.describe_network_interfaces(NetworkInterfaceIds=[self.config.eni_id])
        return holding(reply["NetworkInterfaces"][0])

    def run(self) -> TakeoverResult:
        from botocore.exceptions import BotoCoreError, ClientError

        me, eni = self.instance_id, self.config.eni_id
        seen = self.describe()
        if seen.holder == me:
            return TakeoverResult("already", f"{eni} is attached here", me, mac=seen.mac)
        previous = seen.holder
        if previous is not None:
            age = self.wall() - seen.attached_at if seen.attached_at is not None else math.inf
            if age < self.config.hold_down_seconds:
                return TakeoverResult(
                    "refused",
                    f"{eni} was attached to {previous} {age:.1f} s ago "
                    f"(hold-down {self.config.hold_down_seconds:g} s)",
                    previous,
                    retry_after=self.config.hold_down_seconds - age,
                )
            try:
                # The attachment we saw, never a newer one: a rival that attached since keeps it.
                self.ec2.detach_network_interface(AttachmentId=seen.attachment_id, Force=True)
                log(f"force-detached {eni} from {previous} ({seen.attachment_id})")
            except (ClientError, BotoCoreError) as exc:
                log(f"detach of {seen.attachment_id} failed ({exc}); reading the ENI again")
        deadline = self.clock() + self.timeout_seconds
        while True:  # until it is free
            now_seen = self.describe()
            if now_seen.holder == me:
                return TakeoverResult("won", f"{eni} attached here", previous, mac=now_seen.mac)
            if now_seen.holder is not None and now_seen.holder != previous:
                return self._lost(now_seen, previous)
            if now_seen.holder is None and now_seen.status == "available":
                break
            if self.clock() >= deadline:
                return TakeoverResult("failed", f"{eni} not released: {now_seen}", previous)
            self.sleep(self.poll_seconds)
        try:
            self.ec2.attach_network_interface(
                NetworkInterfaceId=eni, InstanceId=me, DeviceIndex=boot.DEVICE_INDEX
            )
        except (ClientError, BotoCoreError) as exc:
            now_seen = self.describe()
            if now_seen.holder not in (None, me):
                return self._lost(now_seen, previous)
            return TakeoverResult("failed", f"attach failed: {exc}", previous)
        while True:  # until it is attached here (or the other one has it: lost)
            now_seen = self.describe()
            if now_seen.holder == me and now_seen.status == "in-use":
                return TakeoverResult("won", f"{eni} attached here", previous, mac=now_seen.mac)
            if now_seen.holder not in (None, me):
                return self._lost(now_seen, previous)
            if self.clock() >= deadline:
                return TakeoverResult("failed", f"{eni} not attached here: {now_seen}", previous)
            self.sleep(self.poll_seconds)

    def _lost(self, seen: Holding, previous: str | None) -> TakeoverResult:
        return TakeoverResult(
            "lost",
            f"{self.config.eni_id} went to {seen.holder}: lost the race",
            previous,
            retry_after=self.config.hold_down_seconds,
        )


# -- the gateway's own state (swanctl, nft) -------------------------------------------------------

Runner = Callable[..., subprocess.CompletedProcess]
_INSTALLED = re.compile(r"\{name=([A-Za-z0-9_-]+) [^{}]*?\bstate=INSTALLED\b")


def installed_children(raw: str, children: Sequence[str]) -> int:
    """How many of ``children`` have an INSTALLED CHILD_SA in ``swanctl --list-sas --raw``."""
    found = set(_INSTALLED.findall(raw))
    return sum(1 for c in children if c in found)


def read_sas(children: Sequence[str], run: Runner = subprocess.run) -> int:
    try:
        proc = run(
            ["swanctl", "--list-sas", "--raw", "--noblock"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return installed_children(proc.stdout, children) if proc.returncode == 0 else 0


_CONN = re.compile(r"^([A-Za-z0-9_-]+): IKEv", re.MULTILINE)


def read_tunnel_loaded(tunnel: str, run: Runner = subprocess.run) -> bool | None:
    """Whether charon has the tunnel's connection loaded (``swanctl --list-conns``): a standby
    with it loaded only has to initiate at a takeover. None: charon did not answer."""
    try:
        proc = run(
            ["swanctl", "--list-conns"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    return tunnel in _CONN.findall(proc.stdout)


def read_generation(run: Runner = subprocess.run) -> int | None:
    """The NAT table generation applied here (the ruleset's applied_generation set)."""
    argv = ["nft", "-j", "list", "set", "ip", "tunnelnat", "applied_generation"]
    try:
        proc = run(argv, capture_output=True, text=True, timeout=5, check=False)
        if proc.returncode != 0:
            return None
        for entry in json.loads(proc.stdout).get("nftables", []):
            found = entry.get("set") if isinstance(entry, dict) else None
            if isinstance(found, dict) and found.get("name") == "applied_generation":
                elements = found.get("elem") or []
                return max(int(e) for e in elements) if elements else None
    except (OSError, subprocess.TimeoutExpired, ValueError, TypeError, AttributeError):
        return None
    return None


def initiate(config: PairConfig, run: Runner = subprocess.run) -> list[str]:
    """Start the tunnel from here. A half-open IKE SA charon kept retrying while G was not on
    this instance goes first (its retransmits would delay the new one). The new IKE_AUTH carries
    INITIAL_CONTACT: strongSwan's ike_auth.c (build_i) adds it when the peer's identity has no
    wildcards, it is the first authentication round, the connection's ``unique`` is not ``never``
    and ``ike_sa_manager->has_contact()`` finds no IKE SA with the same identities; the standby
    holds none, so the partner deletes the dead gateway's SAs (RFC 7296, 2.4)."""
    drop_sas(config, run)
    failed = []
    for child in config.children:
        proc = _swanctl(run, "--initiate", "--child", child, "--timeout", "-1")
        if proc.returncode != 0:
            failed.append(child)
    return failed


def drop_sas(config: PairConfig, run: Runner = subprocess.run) -> None:
    """A fenced active holds no SA: the standby never has one with the partner."""
    _swanctl(run, "--terminate", "--ike", config.tunnel, "--force")


def _swanctl(run: Runner, *args: str) -> subprocess.CompletedProcess:
    return run(["swanctl", *args], capture_output=True, text=True, timeout=10, check=False)


# -- records ------------------------------------------------------------------------------------


@dataclass
class Records:
    """DynamoDB (meta/pair, gateway/<id>), CloudWatch and SNS: what a takeover leaves behind."""

    config: PairConfig
    dynamodb: Any
    cloudwatch: Any
    sns: Any | None

    def failover(self, winner: str, result: TakeoverResult, timing: dict[str, float]) -> None:
        cfg, at = self.config, timing["at"]
        last = {
            "from": {"S": result.previous or "none"},
            "to": {"S": winner},
            "at": {"N": f"{at:.3f}"},
            "detected_seconds": {"N": f"{timing['detected_seconds']:.3f}"},
            "switch_seconds": {"N": f"{timing['switch_seconds']:.3f}"},
            "reason": {"S": timing_reason(timing)},
        }
        self.dynamodb.update_item(
            TableName=cfg.table,
            Key={"pk": {"S": "meta"}, "sk": {"S": "pair"}},
            UpdateExpression="SET active = :to, active_since = :at, last_failover = :last "
            "ADD failovers :one",
            ExpressionAttributeValues={
                ":to": {"S": winner},
                ":at": {"N": f"{at:.3f}"},
                ":last": {"M": last},
                ":one": {"N": "1"},
            },
        )
        dims = [{"Name": "Deployment", "Value": cfg.deployment}]
        total = timing["detected_seconds"] + timing["switch_seconds"]
        self.cloudwatch.put_metric_data(
            Namespace=cfg.namespace,
            MetricData=[
                {"MetricName": "Failovers", "Dimensions": dims, "Value": 1.0, "Unit": "Count"},
                {
                    "MetricName": "FailoverSeconds",
                    "Dimensions": dims,
                    "Value": round(total, 3),
                    "Unit": "Seconds",
                },
            ],
        )
        if cfg.topic_arn and self.sns is not None:
            message = {
                "deployment": cfg.deployment,
                "from": result.previous,
                "to": winner,
                "detected_seconds": round(timing["detected_seconds"], 3),
                "switch_seconds": round(timing["switch_seconds"], 3),
                "reason": timing_reason(timing),
            }
            self.sns.publish(
                TopicArn=cfg.topic_arn,
                Subject=f"tunnelnat {cfg.deployment}: gateway failover to {winner}"[:100],
                Message=json.dumps(message, sort_keys=True),
            )

    def claim(self, winner: str, at: float) -> None:
        """The ENI was already here (no failover): meta/pair names the active all the same."""
        self.dynamodb.update_item(
            TableName=self.config.table,
            Key={"pk": {"S": "meta"}, "sk": {"S": "pair"}},
            UpdateExpression="SET active = :to, active_since = if_not_exists(active_since, :at)",
            ExpressionAttributeValues={":to": {"S": winner}, ":at": {"N": f"{at:.3f}"}},
        )

    def readiness(
        self,
        instance_id: str,
        role: str,
        generation: int | None,
        sas: int,
        peer_heard_at: float | None,
        now: float,
        *,
        tunnel_loaded: bool | None = None,
    ) -> None:
        def number(value: float | None) -> dict[str, Any]:
            return {"NULL": True} if value is None else {"N": f"{value:.3f}"}

        loaded = {"NULL": True} if tunnel_loaded is None else {"BOOL": tunnel_loaded}

        self.dynamodb.put_item(
            TableName=self.config.table,
            Item={
                "pk": {"S": "gateway"},
                "sk": {"S": instance_id},
                "role": {"S": role},
                "applied_generation": number(generation),
                "sas": {"N": str(sas)},
                "tunnel_loaded": loaded,
                "peer_heard_at": number(peer_heard_at),
                "updated_at": number(now),
                "expiration": {"N": str(int(now + READINESS_KEEP_SECONDS))},
            },
        )


def timing_reason(timing: dict[str, Any]) -> str:
    return str(timing.get("reason", ""))[:200]


# -- the agent (I/O) ----------------------------------------------------------------------------


def write_role(path: Path, role: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(f"{role}\n")
        tmp.replace(path)
    except OSError as exc:
        log(f"cannot write {path}: {exc}")


@dataclass
class Agent:
    config: PairConfig
    instance_id: str
    ec2: Any
    records: Records
    links: boot.Links = field(default_factory=boot.Links)
    run_cmd: Runner = subprocess.run
    clock: Callable[[], float] = time.monotonic
    wall: Callable[[], float] = time.time
    sleep: Callable[[float], None] = time.sleep
    sock: socket.socket | None = None
    machine: PairMachine | None = None
    peers: list[IPv4Address] = field(default_factory=list)
    seq: int = 0
    generation: int | None = None
    sas: int = 0
    tunnel_loaded: bool | None = None  # charon has the tunnel's connection (None: unknown)
    mac: str = ""
    awaiting_tunnel: float | None = None  # monotonic time of the takeover while no SA yet
    next_status: float = 0.0
    next_peers: float = 0.0

    # -- start ---------------------------------------------------------------------------------

    def start(self) -> PairMachine:
        seen = Takeover(self.config, self.ec2, self.instance_id).describe()
        self.mac = seen.mac
        role = ACTIVE if seen.holder == self.instance_id else STANDBY
        cfg = self.config
        self.machine = PairMachine(
            self.instance_id,
            role,
            self.clock(),
            interval=cfg.interval_seconds,
            misses=cfg.misses,
            startup_grace=cfg.startup_grace_seconds,
            check_seconds=cfg.check_seconds,
        )
        write_role(cfg.role_file, role)
        self.refresh_peers()
        log(
            f"{role}: {cfg.eni_id} held by {seen.holder or 'nobody'}; heartbeats every "
            f"{cfg.interval_seconds:g} s to {', '.join(map(str, self.peers)) or 'no peer yet'}, "
            f"takeover after {cfg.misses} misses"
        )
        if role == ACTIVE:
            self.bring_up(seen.mac)  # idempotent: the boot did it, a restart may follow a change
        return self.machine

    def open_socket(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", self.config.heartbeat_port))  # noqa: S104 - the peer's primary IP
        sock.setblocking(False)
        self.sock = sock
        return sock

    def refresh_peers(self) -> None:
        if self.config.peer_address is not None:
            self.peers = [self.config.peer_address]
            return
        try:
            reply = self.ec2.describe_instances(
                Filters=[
                    {"Name": "tag:tunnelnat:deployment", "Values": [self.config.deployment]},
                    *({"Name": f"tag:{k}", "Values": [v]} for k, v in PEER_TAGS.items()),
                    {"Name": "instance-state-name", "Values": ["pending", "running"]},
                ]
            )
        except Exception as exc:  # noqa: BLE001 - keep the peers we knew
            log(f"cannot list the other gateways: {type(exc).__name__}: {exc}")
            return
        found = []
        for reservation in reply.get("Reservations", []):
            for instance in reservation.get("Instances", []):
                address = instance.get("PrivateIpAddress")
                if instance.get("InstanceId") != self.instance_id and address:
                    found.append(IPv4Address(address))
        if sorted(found) != sorted(self.peers):
            log(f"peers: {', '.join(map(str, sorted(found))) or 'none'}")
        self.peers = sorted(found)

    # -- one round -----------------------------------------------------------------------------

    def receive(self, timeout: float) -> None:
        """Read datagrams for up to ``timeout`` seconds."""
        assert self.sock is not None and self.machine is not None
        deadline = self.clock() + timeout
        while True:
            left = deadline - self.clock()
            if left <= 0:
                return
            ready, _, _ = select.select([self.sock], [], [], left)
            if not ready:
                return
            while True:
                try:
                    data, (host, _port) = self.sock.recvfrom(MAX_DATAGRAM + 1)
                except BlockingIOError:
                    break
                self.handle_datagram(data, host)

    def handle_datagram(self, data: bytes, host: str) -> None:
        assert self.machine is not None
        try:
            source = IPv4Address(host)
            if source not in self.peers:
                return  # not from the other gateway: ignored
            heartbeat = Heartbeat.parse(data)
        except ValueError:
            return
        self.execute(self.machine.heard(heartbeat, self.clock()))

    def step(self) -> None:
        """One interval: the machine's tick, its actions, the heartbeat."""
        assert self.machine is not None
        now = self.clock()
        if now >= self.next_peers and self.config.peer_address is None:
            self.next_peers = now + self.config.check_seconds
            self.refresh_peers()
        if now >= self.next_status:
            self.refresh_status(now)
        link = bool(self.mac) and self.links.by_mac(self.mac) is not None
        self.execute(self.machine.tick(now, link_present=link))
        self.send_heartbeat()

    def refresh_status(self, now: float) -> None:
        self.generation = read_generation(self.run_cmd)
        self.sas = read_sas(self.config.children, self.run_cmd)
        self.tunnel_loaded = read_tunnel_loaded(self.config.tunnel, self.run_cmd)
        fast = self.awaiting_tunnel is not None
        self.next_status = now + (self.config.interval_seconds if fast else STATUS_SECONDS)
        if self.awaiting_tunnel is not None and self.sas >= len(self.config.children):
            event("tunnel_up", seconds=round(now - self.awaiting_tunnel, 3), sas=self.sas)
            self.awaiting_tunnel = None
        elif self.awaiting_tunnel is not None and now - self.awaiting_tunnel > 120:
            log(f"tunnel not up 120 s after the takeover ({self.sas} SAs)")
            self.awaiting_tunnel = None

    def send_heartbeat(self) -> None:
        assert self.machine is not None
        if self.sock is None or not self.peers:
            return
        self.seq += 1
        beat = Heartbeat(
            self.instance_id, self.machine.role, self.seq, self.generation, self.sas, self.wall()
        )
        for peer in self.peers:
            try:
                self.sock.sendto(beat.encode(), (str(peer), self.config.heartbeat_port))
            except OSError as exc:  # the peer's network is down: it is not heard either
                if self.seq % 20 == 1:
                    log(f"heartbeat to {peer}: {exc}")

    def execute(self, actions: Sequence[Action]) -> None:
        for action in actions:
            try:
                if isinstance(action, TakeOver):
                    self.take_over(action)
                elif isinstance(action, StepDown):
                    log(f"active: {action.reason}: stepping down to standby")
                    write_role(self.config.role_file, STANDBY)
                    drop_sas(self.config, self.run_cmd)
                    self.report()
                elif isinstance(action, CheckEni):
                    seen = Takeover(self.config, self.ec2, self.instance_id).describe()
                    self.execute(self.machine.eni_seen(self.clock(), seen.holder))  # type: ignore[union-attr]
                elif isinstance(action, Report):
                    self.report()
            except Exception as exc:  # noqa: BLE001 - the loop goes on; the next round retries
                log(f"{type(action).__name__} failed: {type(exc).__name__}: {exc}")

    def report(self) -> None:
        assert self.machine is not None
        heard = self.machine.peer_heard_at
        now_wall, now = self.wall(), self.clock()
        heard_wall = None if heard is None else now_wall - (now - heard)
        self.records.readiness(
            self.instance_id, self.machine.role, self.generation, self.sas, heard_wall, now_wall,
            tunnel_loaded=self.tunnel_loaded,
        )  # fmt: skip

    def take_over(self, action: TakeOver) -> None:
        assert self.machine is not None
        log(f"standby: {action.reason}: taking over")
        decided = self.clock()
        takeover = Takeover(
            self.config, self.ec2, self.instance_id, self.wall, self.clock, self.sleep
        )
        try:
            result = takeover.run()
        except Exception as exc:  # noqa: BLE001
            result = TakeoverResult("failed", f"{type(exc).__name__}: {exc}")
        if result.outcome in ("refused", "lost", "failed"):
            log(f"standby: takeover {result.outcome}: {result.detail}; staying standby")
            self.machine.takeover_failed(self.clock(), result.retry_after)
            return
        attached = self.clock()
        self.mac = result.mac or self.mac
        try:
            self.bring_up(self.mac)
            failed = initiate(self.config, self.run_cmd)
        except Exception as exc:  # noqa: BLE001 - level-triggered: the next attempt finds it here
            log(f"standby: holds {self.config.eni_id} but cannot bring G up ({exc}); retrying")
            self.machine.takeover_failed(self.clock())
            return
        switched = self.clock()
        self.machine.took_over(switched)
        write_role(self.config.role_file, ACTIVE)
        self.awaiting_tunnel = decided
        self.next_status = switched
        timing = {
            "at": self.wall(),
            "detected_seconds": action.silent_seconds,
            "switch_seconds": switched - decided,
            "attach_seconds": attached - decided,
            "reason": action.reason,
        }
        event(
            "takeover",
            outcome=result.outcome,
            instance=self.instance_id,
            previous=result.previous,
            detected_seconds=round(action.silent_seconds, 3),
            attach_seconds=round(attached - decided, 3),
            switch_seconds=round(switched - decided, 3),
            initiate_failed=failed,
            wall=round(timing["at"], 3),
        )
        try:
            if result.outcome == "won":
                self.records.failover(self.instance_id, result, timing)
            else:
                self.records.claim(self.instance_id, timing["at"])
        except Exception as exc:  # noqa: BLE001 - the takeover stands; the record is lost
            log(f"recording the takeover failed: {type(exc).__name__}: {exc}")

    def bring_up(self, mac: str) -> None:
        """G on the ENI's link and the route to T, as the boot program does."""
        if not boot.MAC.fullmatch(mac):
            raise PairError(f"{self.config.eni_id} has no usable MAC address ({mac!r})")
        cfg = self.config
        helper = boot.Boot(
            cfg.boot_config(), self.ec2, self.instance_id, self.links, self.sleep, self.clock
        )
        dev = helper.wait_for_link(mac, seconds=60.0)
        self.links.configure(dev, cfg.gateway)
        if cfg.partner_endpoint is not None and cfg.subnet_router is not None:
            self.links.route(cfg.partner_endpoint, cfg.subnet_router, dev, cfg.gateway.ip)
        log(f"G {cfg.gateway} up on {dev}")

    def run_forever(self, rounds: int | None = None) -> None:
        assert self.machine is not None
        interval = self.config.interval_seconds
        next_round = self.clock()
        done = 0
        while rounds is None or done < rounds:
            self.step()
            done += 1
            next_round += interval
            now = self.clock()
            if next_round < now:  # a takeover or a slow call: start counting again from now
                next_round = now
            self.receive(next_round - now)


def _clients(region: str) -> tuple[Any, Any, Any, Any]:
    import boto3  # the distribution's
    from botocore.config import Config

    # Fast failure, a few retries: a takeover must not sit in a long back-off.
    config = Config(
        retries={"mode": "standard", "max_attempts": 4}, connect_timeout=3, read_timeout=10
    )
    session = boto3.session.Session(region_name=region)
    return tuple(  # type: ignore[return-value]
        session.client(name, config=config) for name in ("ec2", "dynamodb", "cloudwatch", "sns")
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tunnelnat_pair", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="the daemon")
    run.add_argument("--config", type=Path, default=CONFIG_FILE)
    check = sub.add_parser("check-config", help="validate the configuration, print it")
    check.add_argument("--config", type=Path, default=CONFIG_FILE)
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except PairError as exc:
        log(f"FAILED: {exc}")
        return 2
    if args.command == "check-config":
        print(json.dumps({k: str(v) for k, v in config.__dict__.items()}, sort_keys=True))
        return 0
    try:
        instance_id = boot.instance_id_from_imds(os.environ.get("TUNNELNAT_IMDS_URL", boot.IMDS))
        ec2, dynamodb, cloudwatch, sns = _clients(config.region)
        agent = Agent(config, instance_id, ec2, Records(config, dynamodb, cloudwatch, sns))
        agent.start()
        agent.open_socket()
    except Exception as exc:  # noqa: BLE001 - systemd restarts the unit
        log(f"FAILED to start: {type(exc).__name__}: {exc}")
        return 1
    try:
        agent.run_forever()
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
