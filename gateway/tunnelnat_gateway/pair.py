#!/usr/bin/env python3
"""The gateway pair's agent: the standby takes G's ENI when the active falls silent, and the
active hands G over when asked (a switchover) or before it is terminated.

Runs on both gateways of a pair (unit ``tunnelnat-pair``, after ``tunnelnat-boot`` and
strongSwan), with the distribution's python3 and boto3 (standard library + boto3 only):

    tunnelnat_pair.py run [--config /etc/tunnelnat/pair.json]
    tunnelnat_pair.py check-config [--config FILE]

EC2 is the truth (docs/health.md, the pair): the **active** is the instance G's ENI is attached
to, the other is the **standby**.

**The heart** (``Heart``, a thread of its own) sends a heartbeat to the other gateway every
``interval_seconds`` and receives the other's, whatever the main loop is doing: no AWS call, no
``swanctl`` or ``ip`` ever delays or silences it (issue 20: one slow call used to make the
standby force-detach a healthy active). Heartbeats v2 are JSON behind an HMAC-SHA256 with the
pair's key (``key_secret``, cached in ``key_file``); one is heard only with a valid HMAC, a fresh
``sent`` (30 s), a seq above the last one of the sender's epoch, and from a member of the
gateway group (``aws:autoscaling:groupName``; while discovery never succeeded, any authenticated
sender). Everything else is dropped and counted. The heart records the gaps between heartbeats
it hears (readiness: max and p99).

**The main loop** reads what the heart heard (under its lock) and feeds ``PairMachine`` (pure:
time, heartbeats and ENI readings in, actions out). The standby counts the silence of the active;
after ``misses`` intervals (at start: plus ``startup_grace_seconds``) it takes over:

  1. the ENI attached here: nothing to take. Attached elsewhere for less than
     ``hold_down_seconds``: refused (someone just took it; no flapping).
  2. A second opinion: DescribeInstanceStatus of the holder (not running: go on) and an ICMP
     echo to its primary IP: an answer means the instance is up and forwarding, only its agent
     is silent: no force (retried after the silence budget again).
  3. DetachNetworkInterface(Force) of the attachment it saw, wait for ``available``,
     AttachNetworkInterface (device index 1, the next one when EC2 says that index is still in
     use), wait for ``attached`` here. A refused attach, or the ENI found on the other
     instance: it lost the race and stays standby (one attachment at a time: the attachment
     decides, and fences the old active).
  4. G on the link with the ENI's MAC and the route to T (tunnelnat_boot's Links), then
     ``swanctl --initiate --ike NAME --child C`` for each CHILD_SA of each tunnel (INITIAL_CONTACT,
     see ``initiate``; several partners: every tunnel ConfigureTunnel configured, ``tunnels_dir``).
  5. DynamoDB ``meta/pair``, CloudWatch ``Failovers``/``FailoverSeconds``, SNS when
     ``topic_arn`` is set. One line ``takeover {JSON}`` on stderr.

The active checks every interval that the ENI's link is still here, and every ``check_seconds``
(or at once when the other also claims to be active) the ENI's attachment. Its link gone, or two
EC2 readings at least ``CONFIRM_SECONDS`` apart naming another holder (never within
``SETTLE_SECONDS`` of its own attach: DescribeNetworkInterfaces is eventually consistent), it is
**fenced**: it steps down and marks itself Unhealthy in Auto Scaling, which replaces it with a
clean standby (after a forced detach EC2 may refuse that device index until a stop/start).

**Planned handover** (``request_file`` appears, or IMDS ``target-lifecycle-state`` is
``Terminated`` with ``lifecycle_hook`` set): with a ready standby heard (standby, tunnel loaded,
NAT generation >= its own) the active sends ``handover`` until acknowledged, detaches its
attachment without Force, drops its SAs and becomes a healthy standby; the standby attaches as
soon as the ENI is ``available`` (no hold-down, no Force). ``meta/pair`` gets
``last_switchover`` and ``switchovers``; no Failovers metric, no page. Then the lifecycle action
is completed (CONTINUE), also after a bounded wait when no standby was ready.

**Ready signal**: with ``signal_stack``/``signal_resource`` set, CloudFormation SignalResource
(SUCCESS) once per instance when the role is confirmed, the tunnel loaded and the NAT table at
the table's generation (the rolling update waits for it).

The decisions are ``PairMachine``'s; ``Agent`` does the I/O. ``TUNNELNAT_IMDS_URL`` and
``AWS_ENDPOINT_URL`` as for the boot program.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import math
import os
import re
import select
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path
from typing import Any

from tunnelnat_gateway import boot as boot  # noqa: E402
from tunnelnat_gateway import health as agent
from tunnelnat_gateway import software

CONFIG_FILE = Path("/etc/tunnelnat/pair.json")
ROLE_FILE = Path("/run/tunnelnat/pair-role")
KEY_FILE = Path("/var/lib/tunnelnat/pair.key")
ACTIVE, STANDBY = "active", "standby"
HEARTBEAT_VERSION = 2
KINDS = ("beat", "handover", "handover_ack")
MAX_DATAGRAM = 1024
MAC_HEX = 64  # the datagram starts with the HMAC-SHA256 of the rest, in hex
FRESH_SECONDS = 30.0  # |receiver's wall clock - sent| (both sync to the Amazon Time Sync Service)
MIN_KEY_CHARS = 32
INSECURE_KEY = b"tunnelnat-insecure-heartbeats"  # "insecure_heartbeats": the unit tests only
NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")  # tunnel and CHILD_SA names (swanctl.py's)
DEPLOYMENT = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
TABLE = re.compile(r"^[A-Za-z0-9_.-]{3,255}$")
NAMESPACE = re.compile(r"^[A-Za-z0-9_.#:/-]{1,255}$")
TOPIC_ARN = re.compile(
    r"^arn:aws[a-z-]*:sns:[a-z]{2}(-[a-z]+)+-[0-9]:[0-9]{12}:[A-Za-z0-9_-]{1,256}$"
)
ROLE_PATH = re.compile(r"^/[A-Za-z0-9_][A-Za-z0-9_/.-]{0,200}$")
SECRET_ID = re.compile(r"^[A-Za-z0-9/_+=.@:-]{1,2048}$")  # a name or an ARN
HOOK_NAME = re.compile(r"^[A-Za-z0-9_./-]{1,255}$")  # PutLifecycleHook's LifecycleHookName
GROUP_NAME = re.compile(r"^[A-Za-z0-9_+=,.@/:-]{1,255}$")
STACK_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9-]{0,127}$")
LOGICAL_ID = re.compile(r"^[A-Za-z0-9]{1,255}$")
GROUP_TAG = "aws:autoscaling:groupName"  # set by Auto Scaling; users cannot set aws:* tags
READINESS_KEEP_SECONDS = 3600  # the gateway/<id> item's TTL
STATUS_SECONDS = 5.0  # how often the heartbeat's generation and SA count are re-read
STRANGER_DISCOVERY_SECONDS = 5.0  # an authenticated non-member: the group looked up again
LINK_POLL_SECONDS = 0.02  # the ENI's link, looked for after an attach
SETTLE_SECONDS = 5.0  # after its own attach, EC2's word on the ENI may still be the old one
CONFIRM_SECONDS = 2.0  # two readings naming another holder, at least this far apart
HANDOVER_ACK_SECONDS = 1.0  # the standby acknowledges a handover within this, or none
HANDOVER_ENI_SECONDS = 60.0  # the new active waits this long for the ENI to be available
LIFECYCLE_POLL_SECONDS = 5.0
LIFECYCLE_WAIT_SECONDS = 300.0  # terminating without a ready standby: complete after this
SIGNAL_POLL_SECONDS = 5.0
CONFIRM_RETRY_SECONDS = 2.0  # a failed confirmation of the role is retried after this
ERROR_LOG_SECONDS = 60.0  # the same failing step is logged at most this often
GAPS_KEPT = 2000  # heartbeat gaps kept for max/p99 (~17 min at 0.5 s)
DEPLOYED_SECONDS = 60.0  # the deployed software's parameter, read again this often (a thread)


class PairError(RuntimeError):
    pass


def log(message: str) -> None:
    print(f"tunnelnat-pair: {message}", file=sys.stderr, flush=True)


def event(name: str, **fields: Any) -> None:
    """One machine-readable line (the lab reads ``takeover``, ``handover``, ``tunnel_up``...)."""
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


def _path(data: dict[str, Any], key: str, default: Path | None) -> Path | None:
    value = data.get(key)
    if value in (None, ""):
        return default
    if not isinstance(value, str) or not ROLE_PATH.fullmatch(value) or ".." in value:
        raise PairError(f"invalid {key} {value!r}")
    return Path(value)


def _name(data: dict[str, Any], key: str, pattern: re.Pattern[str]) -> str | None:
    value = data.get(key)
    if value in (None, ""):
        return None
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise PairError(f"invalid {key} {value!r}")
    return value


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
    key_secret: str | None = None
    key_file: Path = KEY_FILE
    insecure_heartbeats: bool = False
    lifecycle_hook: str | None = None
    signal_stack: str | None = None
    signal_resource: str | None = None
    request_file: Path | None = None  # None: role_file's directory / "switchover"
    group_name: str | None = None
    # The deployed gateway software's SSM parameter (default: /tunnelnat/<deployment>/...).
    software_parameter: str | None = None
    # Several partners (issue 23): every tunnel ConfigureTunnel configured here, read from its
    # <tunnel>.json in this directory (``connections``). None: the one ``tunnel`` above.
    tunnels_dir: Path | None = None

    KEYS = frozenset(
        "region eni_id gateway deployment table tunnel children heartbeat_port interval_seconds "
        "misses hold_down_seconds startup_grace_seconds check_seconds topic_arn namespace "
        "partner_endpoint subnet_router peer_address role_file key_secret key_file "
        "insecure_heartbeats lifecycle_hook signal_stack signal_resource request_file "
        "group_name software_parameter tunnels_dir".split()
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
        role_file = _path(data, "role_file", ROLE_FILE)
        port = _number(data, "heartbeat_port", 7465, 1, 65535)
        misses = _number(data, "misses", 4, 1, 100)
        if port != int(port) or misses != int(misses):
            raise PairError("heartbeat_port and misses are whole numbers")
        insecure = data.get("insecure_heartbeats", False)
        if not isinstance(insecure, bool):
            raise PairError(f"insecure_heartbeats must be true or false, not {insecure!r}")
        stack = _name(data, "signal_stack", STACK_NAME)
        resource = _name(data, "signal_resource", LOGICAL_ID)
        if (stack is None) != (resource is None):
            raise PairError("signal_stack and signal_resource go together")
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
            role_file=role_file or ROLE_FILE,
            key_secret=_name(data, "key_secret", SECRET_ID),
            key_file=_path(data, "key_file", KEY_FILE) or KEY_FILE,
            insecure_heartbeats=insecure,
            lifecycle_hook=_name(data, "lifecycle_hook", HOOK_NAME),
            signal_stack=stack,
            signal_resource=resource,
            request_file=_path(data, "request_file", None),
            group_name=_name(data, "group_name", GROUP_NAME),
            software_parameter=_name(data, "software_parameter", software.PARAMETER_NAME)
            or software.parameter_for(data["deployment"]),
            tunnels_dir=_path(data, "tunnels_dir", None),
        )

    @property
    def switchover_file(self) -> Path:
        return self.request_file or self.role_file.parent / "switchover"

    @property
    def state_file(self) -> Path:
        """What a restart needs before any AWS call (the ENI's MAC, the peers): beside
        role_file, in /run: a reboot starts from the boot program's attach anyway."""
        return self.role_file.with_name(f"{self.role_file.name}.state")

    @property
    def signal_marker(self) -> Path:
        return self.key_file.with_name("pair.signalled")

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


def load_key(config: PairConfig, secrets: Callable[[], Any] | None) -> bytes:
    """The heartbeat key: ``key_file`` when a previous run cached it (no AWS call before the
    first heartbeat), else GetSecretValue(``key_secret``), cached with mode 0600.
    ``secrets`` makes the Secrets Manager client (only called when needed)."""
    try:
        cached = config.key_file.read_text().strip()
    except OSError:
        cached = ""
    if len(cached) >= MIN_KEY_CHARS:
        return cached.encode()
    if config.key_secret is None or secrets is None:
        if config.insecure_heartbeats:
            log("WARNING: insecure_heartbeats: anyone on the subnet can forge heartbeats")
            return INSECURE_KEY
        raise PairError("no heartbeat key: key_secret is not set (insecure_heartbeats is false)")
    reply = secrets().get_secret_value(SecretId=config.key_secret)
    key = str(reply.get("SecretString") or "").strip()
    if len(key) < MIN_KEY_CHARS:
        raise PairError(f"the secret {config.key_secret} holds no key of {MIN_KEY_CHARS}+ chars")
    try:
        config.key_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(config.key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(key + "\n")
        os.chmod(config.key_file, 0o600)
    except OSError as exc:  # the next start asks Secrets Manager again
        log(f"cannot cache the heartbeat key in {config.key_file}: {exc}")
    return key.encode()


# -- heartbeats ---------------------------------------------------------------------------------


class AuthError(ValueError):
    """A datagram whose HMAC is not the pair key's: a forgery, or a key that differs."""


@dataclass(frozen=True)
class Heartbeat:
    instance: str
    role: str
    seq: int
    generation: int | None  # the NAT table generation applied here (None: not synced)
    sas: int  # CHILD_SAs of the tunnel INSTALLED here
    sent: float  # the sender's wall clock (freshness: within FRESH_SECONDS of the receiver's)
    epoch: int = 0  # the sender's run (ms since 1970 at its start): seq counts within it
    tunnel_loaded: bool | None = None
    kind: str = "beat"  # beat, handover (to: take G now), handover_ack
    to: str | None = None  # handover and handover_ack: the instance it is meant for
    fenced: bool = False  # the sender was fenced (Auto Scaling replaces it): never ready
    retiring: bool = False  # the sender is being terminated: never ready

    def body(self) -> dict[str, Any]:
        body = {"v": HEARTBEAT_VERSION, "kind": self.kind, "instance": self.instance}
        body |= {"role": self.role, "seq": self.seq, "epoch": self.epoch}
        body |= {"generation": self.generation, "sas": self.sas, "sent": round(self.sent, 3)}
        body |= {"tunnel_loaded": self.tunnel_loaded, "fenced": self.fenced}
        body |= {"retiring": self.retiring, "to": self.to}
        return body

    def encode(self, key: bytes = INSECURE_KEY) -> bytes:
        payload = json.dumps(self.body(), separators=(",", ":"), sort_keys=True).encode()
        return hmac.new(key, payload, hashlib.sha256).hexdigest().encode() + payload

    @classmethod
    def parse(cls, data: bytes, key: bytes = INSECURE_KEY) -> Heartbeat:
        """A heartbeat, AuthError (bad HMAC) or ValueError: never half-read."""
        if len(data) > MAX_DATAGRAM or len(data) <= MAC_HEX:
            raise ValueError("datagram too long or too short")
        mac, payload = data[:MAC_HEX], data[MAC_HEX:]
        if not hmac.compare_digest(
            mac, hmac.new(key, payload, hashlib.sha256).hexdigest().encode()
        ):
            raise AuthError("bad HMAC")
        body = json.loads(payload.decode("utf-8"))  # ValueError (UnicodeDecodeError included)
        if not isinstance(body, dict) or body.get("v") != HEARTBEAT_VERSION:
            raise ValueError("not a version 2 heartbeat")
        instance, role, kind, to = (body.get(k) for k in ("instance", "role", "kind", "to"))
        seq, epoch, generation, sas, sent = (
            body.get(k) for k in ("seq", "epoch", "generation", "sas", "sent")
        )
        if not isinstance(instance, str) or not boot.INSTANCE_ID.fullmatch(instance):
            raise ValueError(f"bad instance {instance!r}")
        if role not in (ACTIVE, STANDBY) or kind not in KINDS:
            raise ValueError(f"bad role or kind {role!r} {kind!r}")
        if to is not None and not (isinstance(to, str) and boot.INSTANCE_ID.fullmatch(to)):
            raise ValueError(f"bad to {to!r}")
        for name, value in (("seq", seq), ("sas", sas), ("epoch", epoch)):
            if type(value) is not int or value < 0:
                raise ValueError(f"bad {name} {value!r}")
        if generation is not None and (type(generation) is not int or generation < 0):
            raise ValueError(f"bad generation {generation!r}")
        if isinstance(sent, bool) or not isinstance(sent, int | float) or not math.isfinite(sent):
            raise ValueError(f"bad sent {sent!r}")
        flags = [body.get(k) for k in ("tunnel_loaded", "fenced", "retiring")]
        if flags[0] is not None and not isinstance(flags[0], bool):
            raise ValueError("bad tunnel_loaded")
        if not all(isinstance(f, bool) for f in flags[1:]):
            raise ValueError("bad fenced or retiring")
        return cls(
            instance, role, seq, generation, sas, float(sent), epoch, flags[0], kind, to,
            flags[1], flags[2],
        )  # fmt: skip


def percentile(values: Sequence[float], share: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(share * len(ordered)) - 1)]


class Heart:
    """Sends this gateway's heartbeat every ``interval`` and receives the other's, on a thread
    of its own: the main loop's AWS calls and subprocesses never delay it. The main loop sets
    what the heartbeat says (``update``), whom it goes to (``set_peers``), and takes what was
    heard (``drain``); everything shared is under ``lock``."""

    def __init__(
        self,
        instance_id: str,
        key: bytes,
        port: int,
        interval: float,
        *,
        bind: str = "0.0.0.0",  # noqa: S104 - the peer sends to our primary IP
        epoch: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.instance_id, self.key, self.port, self.interval = instance_id, key, port, interval
        self.bind, self.clock, self.wall = bind, clock, wall
        self.epoch = int(wall() * 1000) if epoch is None else epoch
        self.lock = threading.Lock()
        self.status: dict[str, Any] = {"role": STANDBY, "generation": None, "sas": 0}
        self.status |= {"tunnel_loaded": None, "fenced": False, "retiring": False}
        self.peers: list[IPv4Address] = []
        self.members: dict[str, IPv4Address | None] | None = None  # None: anyone with the key
        self.seq = 0
        self.inbox: deque[tuple[Heartbeat, float]] = deque(maxlen=512)
        self.acks: dict[str, float] = {}  # handover_ack: sender -> when
        self.last: dict[str, tuple[int, int]] = {}  # sender -> (epoch, seq) last accepted
        self.last_beat: dict[str, tuple[int, float]] = {}  # sender -> (epoch, arrival)
        self.gaps: deque[float] = deque(maxlen=GAPS_KEPT)
        self.counts: Counter[str] = Counter()
        self.sock: socket.socket | None = None
        self.thread: threading.Thread | None = None
        self.stopping = threading.Event()
        self.wake = threading.Event()  # set on a handover for us: the main loop acts at once

    # -- the main loop's side ----------------------------------------------------------------

    def open(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.bind, self.port))
        sock.setblocking(False)
        self.sock = sock
        return sock

    def start(self) -> None:
        if self.sock is None:
            self.open()
        self.stopping.clear()
        self.thread = threading.Thread(target=self._run, name="tunnelnat-heart", daemon=True)
        self.thread.start()

    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def stop(self) -> None:
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(timeout=5)
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def update(self, **status: Any) -> None:
        with self.lock:
            self.status |= status

    def set_peers(
        self, peers: Sequence[IPv4Address], members: dict[str, IPv4Address | None] | None
    ) -> None:
        with self.lock:
            self.peers = sorted(set(peers))
            if members is not None:
                self.members = dict(members)

    def drain(self) -> list[tuple[Heartbeat, float]]:
        with self.lock:
            heard = list(self.inbox)
            self.inbox.clear()
        return heard

    def acked(self, sender: str, since: float) -> bool:
        with self.lock:
            return self.acks.get(sender, -math.inf) >= since

    def stats(self) -> dict[str, Any]:
        with self.lock:
            gaps = list(self.gaps)
            counts = dict(self.counts)
        p99 = percentile(gaps, 0.99)
        return {
            "gaps": len(gaps),
            "gap_max": round(max(gaps), 3) if gaps else None,
            "gap_p99": None if p99 is None else round(p99, 3),
            **{k: counts.get(k, 0) for k in ("sent", "heard", "auth_failures", "junk")},
            **{k: counts.get(k, 0) for k in ("stale", "replayed", "strangers")},
        }

    def send(self, kind: str = "beat", to: str | None = None) -> None:
        """One heartbeat (or handover message) to every peer; safe from any thread."""
        with self.lock:
            self.seq += 1
            status, peers, seq = dict(self.status), list(self.peers), self.seq
        message = Heartbeat(
            self.instance_id, status["role"], seq, status["generation"], status["sas"],
            self.wall(), self.epoch, status["tunnel_loaded"], kind, to, status["fenced"],
            status["retiring"],
        ).encode(self.key)  # fmt: skip
        self._send(message, peers)

    def _send(self, message: bytes, peers: Sequence[IPv4Address]) -> None:
        sock = self.sock
        if sock is None:
            return
        for peer in peers:
            try:
                sock.sendto(message, (str(peer), self.port))
                with self.lock:
                    self.counts["sent"] += 1
            except OSError as exc:  # the peer's network is down: it is not heard either
                with self.lock:
                    self.counts["send_errors"] += 1
                    first = self.counts["send_errors"] % 100 == 1
                if first:
                    log(f"heartbeat to {peer}: {exc}")

    # -- the heart's own thread ------------------------------------------------------------------

    def _run(self) -> None:
        next_send = self.clock()
        while not self.stopping.is_set():
            try:
                now = self.clock()
                if now >= next_send:
                    self.send()
                    next_send += self.interval
                    if next_send <= now:  # the machine was suspended: no burst of beats
                        next_send = now + self.interval
                sock = self.sock
                if sock is None:
                    return
                ready, _, _ = select.select([sock], [], [], max(0.0, next_send - self.clock()))
                if ready:
                    self._read(sock)
            except Exception as exc:  # noqa: BLE001 - the heart never stops for one bad round
                log(f"heart: {type(exc).__name__}: {exc}")
                time.sleep(min(self.interval, 0.5))

    def _read(self, sock: socket.socket) -> None:
        while True:
            try:
                data, (host, _port) = sock.recvfrom(MAX_DATAGRAM + 1)
            except (BlockingIOError, InterruptedError):
                return
            self.receive(data, host, self.clock())

    def receive(self, data: bytes, host: str, now: float) -> Heartbeat | None:
        """Check one datagram; a heard one goes to the inbox (and a handover is acknowledged
        at once). Returns it, or None when dropped (counted by why)."""
        try:
            beat = Heartbeat.parse(data, self.key)
        except AuthError:
            self._count("auth_failures")
            return None
        except ValueError:
            self._count("junk")
            return None
        if beat.instance == self.instance_id:
            return None  # our own, looped back
        if abs(self.wall() - beat.sent) > FRESH_SECONDS:
            self._count("stale")
            return None
        with self.lock:
            if self.members is not None and beat.instance not in self.members:
                self.counts["strangers"] += 1
                return None
            last = self.last.get(beat.instance)
            if last is not None and (beat.epoch, beat.seq) <= last:
                self.counts["replayed"] += 1
                return None
            self.last[beat.instance] = (beat.epoch, beat.seq)
            self.counts["heard"] += 1
            if beat.kind == "beat":
                before = self.last_beat.get(beat.instance)
                if before is not None and before[0] == beat.epoch:
                    self.gaps.append(now - before[1])
                self.last_beat[beat.instance] = (beat.epoch, now)
            if beat.kind == "handover_ack" and beat.to == self.instance_id:
                self.acks[beat.instance] = now
            else:
                self.inbox.append((beat, now))
            source = _ip(host)
            if source is not None and source not in self.peers:
                # Discovery failed or is behind: answer an authenticated member where it is.
                self.peers = sorted({*self.peers, source})
        if beat.kind == "handover" and beat.to == self.instance_id:
            with self.lock:
                status = dict(self.status)
                if status["role"] != STANDBY or status["retiring"] or status["fenced"]:
                    return beat  # not acknowledged: the active keeps G
                self.seq += 1
                seq = self.seq
            ack = Heartbeat(
                self.instance_id, status["role"], seq, status["generation"], status["sas"],
                self.wall(), self.epoch, status["tunnel_loaded"], "handover_ack", beat.instance,
            ).encode(self.key)  # fmt: skip
            self._send(ack, [_ip(host) or IPv4Address("127.0.0.1")])
            self.wake.set()
        return beat

    def _count(self, what: str) -> None:
        with self.lock:
            self.counts[what] += 1


def _ip(host: str) -> IPv4Address | None:
    try:
        return IPv4Address(host)
    except ValueError:
        return None


# -- the decisions (pure) -------------------------------------------------------------------------


@dataclass(frozen=True)
class TakeOver:
    reason: str
    silent_seconds: float  # since the active was last heard (or since the count started)


@dataclass(frozen=True)
class StepDown:
    """Fenced: the ENI was taken from under this active (it did not hand it over)."""

    reason: str


@dataclass(frozen=True)
class CheckEni:
    reason: str


@dataclass(frozen=True)
class Report:
    """Write the readiness item (gateway/<id>)."""


@dataclass(frozen=True)
class HandOver:
    """The active gives G to ``to``, a ready standby (a planned switchover)."""

    to: str
    reason: str


@dataclass(frozen=True)
class NoHandover:
    reason: str


@dataclass(frozen=True)
class AcceptHandover:
    """The standby takes G from ``previous``, which is letting go of it (no Force)."""

    previous: str


Action = TakeOver | StepDown | CheckEni | Report | HandOver | NoHandover | AcceptHandover


@dataclass
class PairMachine:
    """What a gateway of the pair does next, from the time (monotonic seconds), the heartbeats it
    heard, its ENI link and EC2's word on the ENI. No I/O: ``Agent`` carries the actions out and
    reports their outcomes back (``took_over``, ``takeover_failed``, ``handed_over``)."""

    instance_id: str
    role: str
    now: float
    interval: float = 0.5
    misses: int = 4
    startup_grace: float = 10.0
    check_seconds: float = 30.0
    settle: float = SETTLE_SECONDS
    confirm: float = CONFIRM_SECONDS
    counting_since: float = field(init=False)  # the silence counts from here until first heard
    active_heard_at: float | None = field(default=None, init=False)
    active_instance: str | None = field(default=None, init=False)  # who it was
    peer_heard_at: float | None = field(default=None, init=False)
    beats: dict[str, tuple[Heartbeat, float]] = field(default_factory=dict, init=False)
    not_before: float = field(default=0.0, init=False)  # no takeover attempt before this
    next_check: float = field(init=False)
    next_report: float = field(init=False)
    next_split_check: float = field(default=0.0, init=False)
    attached_at: float | None = field(default=None, init=False)  # its own attach (took_over)
    disagreed: tuple[float, str | None] | None = field(default=None, init=False)
    fenced: bool = field(default=False, init=False)
    retiring: bool = field(default=False, init=False)  # being terminated: never takes G
    handover_at: float = field(default=-math.inf, init=False)

    def __post_init__(self) -> None:
        if self.role not in (ACTIVE, STANDBY):
            raise ValueError(f"role {self.role!r}")
        self.counting_since = self.now
        self.next_check = self.now + self.check_seconds
        self.next_report = self.now  # at once, then every check_seconds

    @property
    def budget(self) -> float:
        """The silence budget: ``misses`` intervals (docs/health.md: why 4 x 0.5 s)."""
        return self.misses * self.interval

    @property
    def limit(self) -> float:
        """Seconds of silence that make the active dead: the budget, plus the startup grace
        while it was never heard (the other gateway may still be booting)."""
        grace = 0.0 if self.active_heard_at is not None else self.startup_grace
        return self.budget + grace

    def heard(self, heartbeat: Heartbeat, now: float) -> list[Action]:
        if heartbeat.instance == self.instance_id:
            return []  # our own datagram looped back: not the peer
        if heartbeat.kind == "handover":
            return self._handover_heard(heartbeat, now)
        if heartbeat.kind != "beat":
            return []
        self.peer_heard_at = now
        self.beats[heartbeat.instance] = (heartbeat, now)
        if heartbeat.role != ACTIVE:
            return []
        self.active_heard_at = now
        self.active_instance = heartbeat.instance
        if self.role == ACTIVE and now >= self.next_split_check:
            # Both claim the ENI: EC2 says which one holds it; the other steps down.
            self.next_split_check = now + max(self.budget, 1.0)
            return [CheckEni(f"{heartbeat.instance} also claims to be active")]
        return []

    def _handover_heard(self, message: Heartbeat, now: float) -> list[Action]:
        # Only from the active it hears, addressed to it, once: anyone else's is not ours.
        if (
            self.role != STANDBY
            or self.retiring
            or message.to != self.instance_id
            or message.instance != self.active_instance
            or now - self.handover_at < max(self.budget, 1.0)
        ):
            return []
        self.handover_at = now
        return [AcceptHandover(message.instance)]

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
        if self.retiring:
            return actions  # being terminated: it never takes G
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
        """EC2's answer to CheckEni: the instance holding the ENI (None: nobody). One reading
        is not enough to step down: DescribeNetworkInterfaces is eventually consistent
        (https://docs.aws.amazon.com/ec2/latest/devguide/eventual-consistency.html), so a read
        right after our own attach may still show the old attachment. Stepping down takes two
        readings naming the same other holder ``confirm`` seconds apart, none within ``settle``
        seconds of our attach (the link gone from this instance needs no EC2 at all)."""
        if self.role != ACTIVE:
            return []
        if holder == self.instance_id:
            self.disagreed = None
            return []
        if self.attached_at is not None and now - self.attached_at < self.settle:
            self.next_check = min(self.next_check, self.attached_at + self.settle)
            return []
        if self.disagreed is None or self.disagreed[1] != holder:
            self.disagreed = (now, holder)
        if now - self.disagreed[0] < self.confirm:
            self.next_check = min(self.next_check, self.disagreed[0] + self.confirm)
            return []
        return [self._step_down(now, f"the ENI is attached to {holder or 'no instance'}")]

    def took_over(self, now: float) -> None:
        self.role = ACTIVE
        self.fenced = False
        self.attached_at = now
        self.disagreed = None
        self.next_check = now + self.check_seconds
        self.next_report = now  # the new role is written at once

    def confirmed_here(self, now: float) -> None:
        """At start: EC2 says the ENI is here (the provisional role was standby)."""
        self.took_over(now)
        self.attached_at = None  # not a fresh attach of ours: no settle window

    def takeover_failed(self, now: float, retry_after: float | None = None) -> None:
        """Refused (hold-down), lost the race, spared (the holder answers), or failed: stay
        standby, try again no sooner than ``retry_after`` seconds (or the budget) from now."""
        wait = self.budget if retry_after is None else retry_after
        self.not_before = now + max(wait, self.interval)

    def handover_wanted(self, now: float, reason: str, generation: int | None) -> Action:
        """The active is asked to hand G over: to the standby heard most recently within the
        budget that is ready (tunnel loaded, NAT generation >= ours, not fenced or retiring)."""
        if self.role != ACTIVE:
            return NoHandover("this gateway is not the active")
        ready = []
        for instance, (beat, at) in self.beats.items():
            fresh = now - at <= self.budget
            synced = beat.generation is not None and (
                generation is None or beat.generation >= generation
            )
            if (
                fresh and synced and beat.role == STANDBY and beat.tunnel_loaded is True
                and not beat.fenced and not beat.retiring
            ):  # fmt: skip
                ready.append((at, instance))
        if not ready:
            heard = ", ".join(
                f"{i} ({b.role}, generation {b.generation}, tunnel_loaded {b.tunnel_loaded}, "
                f"{now - at:.1f} s ago)"
                for i, (b, at) in sorted(self.beats.items())
            )
            return NoHandover(f"no ready standby heard (heard: {heard or 'nobody'})")
        return HandOver(max(ready)[1], reason)

    def handed_over(self, now: float) -> None:
        """The active let go of G (a handover): a healthy standby, not fenced. The new active
        says so only once G is up on it (seconds of detach, attach and hot-plug on AWS): no
        takeover back before the standby's own handover deadline has passed; the new
        active's heartbeats reset the count."""
        self.role = STANDBY
        self.counting_since = now
        self.active_heard_at = None
        self.attached_at = None
        self.disagreed = None
        self.not_before = now + HANDOVER_ENI_SECONDS + self.budget
        self.next_report = now

    def _step_down(self, now: float, reason: str) -> StepDown:
        # Fenced: count the silence from here, with the startup grace, as at a start. The new
        # active's heartbeats reset it; it is never taken back while they are heard.
        self.role = STANDBY
        self.fenced = True
        self.counting_since = now
        self.active_heard_at = None
        self.attached_at = None
        self.disagreed = None
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
    outcome: str  # won, already (attached here before), refused, spared, lost, failed
    detail: str
    previous: str | None = None  # the instance that held the ENI
    retry_after: float | None = None
    mac: str = ""
    device_index: int | None = None


DEVICE_INDEXES = 7  # tried from boot.DEVICE_INDEX on: more than any gateway type's ENIs in use


@dataclass
class Takeover:
    """Take the ENI: force-detach what holds it, attach here; the attachment decides a race.
    ``second_opinion(holder)`` returns why not to force (the holder is up), or None."""

    config: PairConfig
    ec2: Any
    instance_id: str
    wall: Callable[[], float] = time.time
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    poll_seconds: float = 0.2
    timeout_seconds: float = 120.0
    second_opinion: Callable[[str], str | None] | None = None

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
            alive = self.second_opinion(previous) if self.second_opinion is not None else None
            if alive is not None:
                return TakeoverResult("spared", alive, previous)
            try:
                # The attachment we saw, never a newer one: a rival that attached since keeps it.
                self.ec2.detach_network_interface(AttachmentId=seen.attachment_id, Force=True)
                log(f"force-detached {eni} from {previous} ({seen.attachment_id})")
            except (ClientError, BotoCoreError) as exc:
                log(f"detach of {seen.attachment_id} failed ({exc}); reading the ENI again")
        deadline = self.clock() + self.timeout_seconds
        free = self.wait_available(previous, deadline)
        if free is not None:
            return free
        return self.attach_here(previous, deadline)

    def wait_available(self, previous: str | None, deadline: float) -> TakeoverResult | None:
        """Until the ENI is ``available``: None, or how it ended otherwise."""
        me, eni = self.instance_id, self.config.eni_id
        while True:
            now_seen = self.describe()
            if now_seen.holder == me:
                return TakeoverResult("won", f"{eni} attached here", previous, mac=now_seen.mac)
            if now_seen.holder is not None and now_seen.holder != previous:
                return self._lost(now_seen, previous)
            if now_seen.holder is None and now_seen.status == "available":
                return None
            if self.clock() >= deadline:
                return TakeoverResult("failed", f"{eni} not released: {now_seen}", previous)
            self.sleep(self.poll_seconds)

    def attach_here(self, previous: str | None, deadline: float) -> TakeoverResult:
        """Attach the available ENI here (device index 1, or the next free one when EC2 says
        an index is still in use) and wait until EC2 says it is attached here."""
        from botocore.exceptions import BotoCoreError, ClientError

        me, eni = self.instance_id, self.config.eni_id
        index = boot.DEVICE_INDEX
        while True:
            try:
                self.ec2.attach_network_interface(
                    NetworkInterfaceId=eni, InstanceId=me, DeviceIndex=index
                )
                break
            except (ClientError, BotoCoreError) as exc:
                now_seen = self.describe()
                if now_seen.holder not in (None, me):
                    return self._lost(now_seen, previous)
                if boot.index_in_use(exc) and index < boot.DEVICE_INDEX + DEVICE_INDEXES - 1:
                    log(f"device index {index} refused ({exc}); trying {index + 1}")
                    index += 1
                    continue
                return TakeoverResult("failed", f"attach failed: {exc}", previous)
        while True:  # until it is attached here (or the other one has it: lost)
            now_seen = self.describe()
            if now_seen.holder == me and now_seen.status == "in-use":
                return TakeoverResult(
                    "won", f"{eni} attached here", previous, mac=now_seen.mac, device_index=index
                )
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


def ping(address: IPv4Address) -> bool:
    """Whether ``address`` answers an ICMP echo within about half a second: iputils ``ping``
    (Debian 12's 20221126, Ubuntu 24.04's 20240117): two echoes 0.2 s apart (-i 0.2 is allowed
    to any user), -W 0.3 s for an answer after the last (sub-second -W since iputils' "add
    support for sub-second timeouts", iputils/iputils#153, fixed by #306); ping exits 0 when any
    echo was answered, 1 when none was: 0.5 s at most for a dead holder, one lost echo allowed.
    The security group must admit ICMP echo between the two gateways."""
    argv = ["ping", "-n", "-q", "-c", "2", "-i", "0.2", "-W", "0.3", str(address)]
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=3, check=False)  # noqa: S603
    except (OSError, subprocess.TimeoutExpired) as exc:
        log(f"ping {address}: {exc}")
        return False
    return proc.returncode == 0


# -- the gateway's own state (swanctl, nft) -------------------------------------------------------

Runner = Callable[..., subprocess.CompletedProcess]
_INSTALLED = re.compile(r"\{name=([A-Za-z0-9_-]+) [^{}]*?\bstate=INSTALLED\b")
Connections = tuple[tuple[str, tuple[str, ...]], ...]  # (tunnel, its CHILD_SA names), ...


def connections(config: PairConfig) -> Connections:
    """The tunnels this gateway carries, each with its CHILD_SA names.

    Without ``tunnels_dir``: the configuration's one tunnel. With it (several partners): every
    ``<tunnel>.json`` ConfigureTunnel wrote there, read each time. Not from pair.json: that is
    the launch template's user data, and a partner added by redeploy must not replace the
    gateways (issue 23: the others' SAs stay up); ConfigureTunnel's association for the new
    partner writes its file on both gateways. None found (before the first ConfigureTunnel
    run): the configuration's tunnel."""
    if config.tunnels_dir is None:
        return ((config.tunnel, config.children),)
    found = []
    try:
        paths = sorted(config.tunnels_dir.glob("*.json"), key=lambda p: p.stem)
    except OSError:
        paths = []
    for path in paths:
        if not NAME.fullmatch(path.stem):
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = None
        children = data.get("children") if isinstance(data, dict) else None
        if not (
            isinstance(children, list)
            and 1 <= len(children) <= 256
            and all(isinstance(c, str) and NAME.fullmatch(c) for c in children)
        ):
            children = [path.stem]  # core/swanctl.py's single layout: the child is the tunnel
        found.append((path.stem, tuple(children)))
    return tuple(found) or ((config.tunnel, config.children),)


def installed_children(raw: str, children: Sequence[str], tunnel: str | None = None) -> int:
    """How many of ``children`` have an INSTALLED CHILD_SA in ``swanctl --list-sas --raw``;
    with ``tunnel``, only within that connection's IKE SAs: a CHILD_SA's name is unique only
    within its connection (tunnel ``x-2``'s child ``x-2`` beside tunnel ``x``'s per-pair
    ``x-2``)."""
    if tunnel is None:
        found = set(_INSTALLED.findall(raw))
        return sum(1 for c in children if c in found)
    try:
        sas = agent.parse_list_sas_raw(raw)
    except agent.ParseError:
        return 0
    installed = {
        c.name for ike in sas if ike.name == tunnel for c in ike.children if c.state == "INSTALLED"
    }
    return sum(1 for c in children if c in installed)


def read_sas(children: Sequence[str] | Connections, run: Runner = subprocess.run) -> int:
    """INSTALLED CHILD_SAs here: of ``children`` (any connection), or of each connection's own
    children (``connections()``)."""
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
    if proc.returncode != 0:
        return 0
    if all(isinstance(c, str) for c in children):
        return installed_children(proc.stdout, children)  # type: ignore[arg-type]
    return sum(
        installed_children(proc.stdout, kids, tunnel)
        for tunnel, kids in children  # type: ignore[misc]
    )


_CONN = re.compile(r"^([A-Za-z0-9_-]+): IKEv", re.MULTILINE)


def read_tunnel_loaded(tunnel: str | Sequence[str], run: Runner = subprocess.run) -> bool | None:
    """Whether charon has the tunnel's connection (every one of ``tunnel`` when a list) loaded
    (``swanctl --list-conns``): a standby with it loaded only has to initiate at a takeover.
    None: charon did not answer."""
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
    loaded = set(_CONN.findall(proc.stdout))
    wanted = [tunnel] if isinstance(tunnel, str) else list(tunnel)
    return all(name in loaded for name in wanted)


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
    """Start every tunnel from here. A half-open IKE SA charon kept retrying while G was not on
    this instance goes first (its retransmits would delay the new one). The new IKE_AUTH carries
    INITIAL_CONTACT: strongSwan's ike_auth.c (build_i) adds it when the peer's identity has no
    wildcards, it is the first authentication round, the connection's ``unique`` is not ``never``
    and ``ike_sa_manager->has_contact()`` finds no IKE SA with the same identities; the standby
    holds none, so the partner deletes the dead gateway's SAs (RFC 7296, 2.4).

    ``--ike NAME --child C``: a CHILD_SA's name is unique only within its connection (tunnel
    ``x-2``'s child ``x-2`` beside tunnel ``x``'s per-pair child ``x-2``); ``--ike`` names the
    child's connection (``swanctl --initiate --help``, strongSwan 5.9.8: "--ike (-i) initiate an
    IKE_SA, or name of child's parent"). Failed: ``tunnel/child`` with several tunnels, the
    child's name with one (as before)."""
    drop_sas(config, run)
    failed = []
    conns = connections(config)
    for tunnel, children in conns:
        for child in children:
            proc = _swanctl(run, "--initiate", "--ike", tunnel, "--child", child, "--timeout", "-1")
            if proc.returncode != 0:
                failed.append(child if len(conns) == 1 else f"{tunnel}/{child}")
    return failed


def drop_sas(config: PairConfig, run: Runner = subprocess.run) -> None:
    """A fenced active holds no SA: the standby never has one with any partner."""
    for tunnel, _children in connections(config):
        _swanctl(run, "--terminate", "--ike", tunnel, "--force")


def _swanctl(run: Runner, *args: str) -> subprocess.CompletedProcess:
    argv = ["swanctl", *args]
    try:
        return run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:  # charon hung or gone: said, not raised
        log(f"{' '.join(argv)}: {exc}")
        return subprocess.CompletedProcess(argv, 1, "", str(exc))


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

    def switchover(self, previous: str, winner: str, timing: dict[str, Any]) -> None:
        """A planned handover: meta/pair names the new active and the switchover; not a
        failover (no Failovers metric, no page)."""
        at = timing["at"]
        last = {
            "from": {"S": previous},
            "to": {"S": winner},
            "at": {"N": f"{at:.3f}"},
            "seconds": {"N": f"{timing['seconds']:.3f}"},
            "reason": {"S": timing_reason(timing)},
        }
        self.dynamodb.update_item(
            TableName=self.config.table,
            Key={"pk": {"S": "meta"}, "sk": {"S": "pair"}},
            UpdateExpression="SET active = :to, active_since = :at, last_switchover = :last "
            "ADD switchovers :one",
            ExpressionAttributeValues={
                ":to": {"S": winner},
                ":at": {"N": f"{at:.3f}"},
                ":last": {"M": last},
                ":one": {"N": "1"},
            },
        )

    def desired_generation(self) -> int:
        """The table's meta/generation (absent: 0), what a ready standby must have applied."""
        reply = self.dynamodb.get_item(
            TableName=self.config.table,
            Key={"pk": {"S": "meta"}, "sk": {"S": "generation"}},
            ConsistentRead=True,
        )
        value = reply.get("Item", {}).get("generation", {}).get("N")
        return int(value) if value is not None else 0

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
        epoch: int | None = None,
        fenced: bool = False,
        heart: dict[str, Any] | None = None,
        software: dict[str, Any] | None = None,
    ) -> None:
        def number(value: float | None) -> dict[str, Any]:
            return {"NULL": True} if value is None else {"N": f"{value:.3f}"}

        loaded = {"NULL": True} if tunnel_loaded is None else {"BOOL": tunnel_loaded}
        item: dict[str, Any] = {
            "pk": {"S": "gateway"},
            "sk": {"S": instance_id},
            "role": {"S": role},
            "applied_generation": number(generation),
            "sas": {"N": str(sas)},
            "tunnel_loaded": loaded,
            "peer_heard_at": number(peer_heard_at),
            "updated_at": number(now),
            "expiration": {"N": str(int(now + READINESS_KEEP_SECONDS))},
            "fenced": {"BOOL": fenced},
            "heartbeat_version": {"N": str(HEARTBEAT_VERSION)},
        }
        if epoch is not None:
            item["epoch"] = {"N": str(epoch)}
        if heart is not None:
            item["heartbeat_gap_max"] = number(heart.get("gap_max"))
            item["heartbeat_gap_p99"] = number(heart.get("gap_p99"))
            item["heartbeat_gaps"] = {"N": str(heart.get("gaps", 0))}
            item["auth_failures"] = {"N": str(heart.get("auth_failures", 0))}
            dropped = sum(heart.get(k, 0) for k in ("junk", "stale", "replayed", "strangers"))
            item["heartbeats_dropped"] = {"N": str(dropped)}
        if software is not None:
            item["software"] = {"M": software_item(software)}
        self.dynamodb.put_item(TableName=self.config.table, Item=item)


def software_item(report: dict[str, Any]) -> dict[str, Any]:
    """software.report() as DynamoDB attributes: the running agent's version and SHA-256, the
    deployed SHA-256 and whether they are the same (NULL: unknown)."""

    def text(value: Any) -> dict[str, Any]:
        return {"NULL": True} if value is None else {"S": str(value)}

    deployed = report.get("deployed")
    return {
        "version": text(report.get("version")),
        "sha256": text(report.get("sha256")),
        "deployed_sha256": text(report.get("deployed_sha256")),
        "deployed": {"NULL": True} if deployed is None else {"BOOL": bool(deployed)},
    }


class DeployedSoftware:
    """The deployed package (its SSM parameter), read by a thread every DEPLOYED_SECONDS: a
    slow or failing GetParameter never holds the agent's loop (detection, takeover)."""

    def __init__(self, parameter: str, region: str, client: Any) -> None:
        self.parameter, self.region, self.client = parameter, region, client
        self.value: dict[str, Any] | None = None
        self.failed = False
        self.stopped = threading.Event()

    def read(self) -> None:
        found = software.read_deployed(
            self.parameter, self.region, client=self.client, log=self._log
        )
        self.value, self.failed = found, found is None

    def _log(self, message: str) -> None:
        if not self.failed:  # said once per outage, not every minute
            log(message)

    def start(self) -> None:
        def loop() -> None:
            while not self.stopped.is_set():
                try:
                    self.read()
                except Exception as exc:  # noqa: BLE001 - unknown until the next read
                    log(f"deployed software: {type(exc).__name__}: {exc}")
                self.stopped.wait(DEPLOYED_SECONDS)

        threading.Thread(target=loop, name="deployed-software", daemon=True).start()

    def __call__(self) -> dict[str, Any] | None:
        return self.value


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


def write_json(path: Path, data: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(data, sort_keys=True) + "\n")
        tmp.replace(path)
    except OSError as exc:
        log(f"cannot write {path}: {exc}")


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def address_is_local(address: IPv4Address) -> bool:
    """Whether ``address`` is on one of this machine's links: binding to it succeeds only then
    (net.ipv4.ip_nonlocal_bind is 0 by default). No ``ip``, no AWS: usable before both."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((str(address), 0))
        except OSError:
            return False
    return True


def imds_get(path: str, base: str | None = None, timeout: float = 1.0) -> str | None:
    """One IMDSv2 read (None: 404, e.g. no Auto Scaling lifecycle state outside a group)."""
    base = base or os.environ.get("TUNNELNAT_IMDS_URL", boot.IMDS)
    try:
        return boot.imds_read(base, path, timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise


LIFECYCLE_STATE = "/latest/meta-data/autoscaling/target-lifecycle-state"


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
    heart: Heart | None = None  # None: one that is never started (tests drive it by hand)
    autoscaling: Any = None
    cloudformation: Any = None
    pinger: Callable[[IPv4Address], bool] = ping  # the second opinion's ICMP echo
    imds: Callable[[str], str | None] = imds_get
    # This agent's software (the archive it runs from) and the deployed one (None: unknown).
    running_software: dict[str, str | None] = field(default_factory=software.identity)
    deployed: Callable[[], dict[str, Any] | None] = lambda: None
    machine: PairMachine | None = None
    peers: list[IPv4Address] = field(default_factory=list)
    members: dict[str, IPv4Address | None] | None = None  # the group's, at the last discovery
    group: str | None = None
    generation: int | None = None
    sas: int = 0
    tunnel_loaded: bool | None = None  # charon has the tunnel's connection (None: unknown)
    mac: str = ""
    confirmed: bool = False  # EC2 has confirmed (or corrected) the provisional role
    awaiting_tunnel: float | None = None  # monotonic time of the takeover while no SA yet
    next_status: float = 0.0
    next_peers: float = 0.0
    strangers_seen: int = 0  # the heart's count of authenticated non-members at the last look
    next_stranger_discovery: float = 0.0
    next_lifecycle: float = 0.0
    next_signal: float = 0.0
    next_confirm: float = 0.0
    terminating_since: float | None = None
    lifecycle_done: bool = False
    signalled: bool = False
    fenced_reason: str | None = None
    errors: dict[str, tuple[float, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.heart is None:
            cfg = self.config
            self.heart = Heart(
                self.instance_id, INSECURE_KEY, cfg.heartbeat_port, cfg.interval_seconds,
                clock=self.clock, wall=self.wall,
            )  # fmt: skip

    # -- start ---------------------------------------------------------------------------------

    def start(self, *, confirm: bool = True) -> PairMachine:
        """The provisional role from this machine alone (no AWS call), the heart beating with
        it, then (``confirm``) EC2's word. ``run`` confirms in the loop instead: an agent
        restarted on the active sends its first heartbeat before any AWS call."""
        cfg = self.config
        role = self.provisional_role()
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
        assert self.heart is not None
        self.heart.update(role=role)
        self.heart.set_peers(self.peers, None)
        if self.heart.sock is not None and not self.heart.alive():
            self.heart.start()
        log(
            f"{role} (provisional): heartbeats v{HEARTBEAT_VERSION} every "
            f"{cfg.interval_seconds:g} s to {', '.join(map(str, self.peers)) or 'no peer yet'}, "
            f"takeover after {cfg.misses} misses"
        )
        if confirm:
            self.confirm()
        return self.machine

    def provisional_role(self) -> str:
        """Active when G's ENI is on a link here: its MAC (cached by the previous run) or G's
        address on a local link. The peers the previous run knew come back too."""
        state = read_json(self.config.state_file)
        mac = str(state.get("mac", ""))
        self.mac = mac if boot.MAC.fullmatch(mac) else ""
        if self.config.peer_address is not None:
            self.peers = [self.config.peer_address]
        else:
            self.peers = sorted({IPv4Address(p) for p in state.get("peers", []) if _ip(str(p))})
        local = False
        if self.mac:
            try:
                local = self.links.by_mac(self.mac) is not None
            except Exception as exc:  # noqa: BLE001 - then G's address decides
                log(f"cannot list the links: {exc}")
        return ACTIVE if local or address_is_local(self.config.gateway.ip) else STANDBY

    def save_state(self) -> None:
        write_json(self.config.state_file, {"mac": self.mac, "peers": list(map(str, self.peers))})

    def confirm(self) -> None:
        """EC2's word on the provisional role (DescribeNetworkInterfaces)."""
        assert self.machine is not None
        seen = self.takeover().describe()
        self.mac = seen.mac or self.mac
        now = self.clock()
        if seen.holder == self.instance_id:
            if self.machine.role != ACTIVE:
                self.machine.confirmed_here(now)
                self.set_role(ACTIVE)
            self.bring_up(seen.mac)  # idempotent: the boot did it, a restart may follow a change
        elif self.machine.role == ACTIVE:
            # Two readings apart before stepping down (eni_seen); the link check is at once.
            self.execute(self.machine.eni_seen(now, seen.holder))
        self.confirmed = True
        log(f"{self.machine.role}: {self.config.eni_id} held by {seen.holder or 'nobody'}")
        self.save_state()
        self.next_peers = now + self.config.check_seconds
        self.guard("discover", self.discover)

    def set_role(self, role: str) -> None:
        write_role(self.config.role_file, role)
        assert self.heart is not None
        self.heart.update(role=role)

    def group_name(self) -> str | None:
        if self.group is None:
            self.group = self.config.group_name
        if self.group is None:
            reply = self.ec2.describe_instances(InstanceIds=[self.instance_id])
            for reservation in reply.get("Reservations", []):
                for instance in reservation.get("Instances", []):
                    for tag in instance.get("Tags", []):
                        if tag.get("Key") == GROUP_TAG:
                            self.group = str(tag.get("Value"))
        return self.group

    def discover(self) -> None:
        """The gateway group's members (Auto Scaling's own tag) and the peers' primary IPs.
        Failing, the heart keeps what it had (and, never having had any, hears anyone with
        the key)."""
        group = self.group_name()
        if group is None:
            self.warn("discover", f"no {GROUP_TAG} tag on {self.instance_id}: no membership")
            return
        reply = self.ec2.describe_instances(
            Filters=[
                {"Name": f"tag:{GROUP_TAG}", "Values": [group]},
                {"Name": "instance-state-name", "Values": ["pending", "running"]},
            ]
        )
        members: dict[str, IPv4Address | None] = {}
        for reservation in reply.get("Reservations", []):
            for instance in reservation.get("Instances", []):
                address = instance.get("PrivateIpAddress")
                members[instance["InstanceId"]] = IPv4Address(address) if address else None
        found = sorted(a for i, a in members.items() if i != self.instance_id and a is not None)
        if self.config.peer_address is not None:
            found = [self.config.peer_address]
        if found != self.peers or self.members is None:
            log(f"group {group}: peers {', '.join(map(str, found)) or 'none'}")
        self.peers, self.members = found, members
        assert self.heart is not None
        self.heart.set_peers(found, members)
        self.save_state()

    # -- one round -----------------------------------------------------------------------------

    def look_again_for_strangers(self, now: float) -> None:
        """A heartbeat with a valid HMAC from an instance that is not a member we know: only
        the gateway role can read the key, so it is most likely a gateway launched since our
        last discovery (a rolling replacement's new standby). Discover now rather than at the
        next check, at most every STRANGER_DISCOVERY_SECONDS: until then its heartbeats are
        dropped and ours do not reach it."""
        assert self.heart is not None
        with self.heart.lock:
            strangers = self.heart.counts["strangers"]
        if strangers > self.strangers_seen and now >= self.next_stranger_discovery:
            self.strangers_seen = strangers
            self.next_stranger_discovery = now + STRANGER_DISCOVERY_SECONDS
            self.next_peers = now

    def handle_datagram(self, data: bytes, host: str) -> None:
        """One datagram through the heart's checks, then to the machine (tests)."""
        assert self.heart is not None
        self.heart.receive(data, host, self.clock())
        self.hear()

    def hear(self) -> None:
        assert self.heart is not None and self.machine is not None
        for beat, at in self.heart.drain():
            self.execute(self.machine.heard(beat, at))

    def step(self) -> None:
        """One interval: what the heart heard, EC2's word when due, the machine's tick and
        its actions, the switchover request, the lifecycle, the ready signal. Each part is
        guarded: a failing ``ip`` or AWS call is logged (rate-limited), never raised."""
        assert self.machine is not None and self.heart is not None
        if self.heart.sock is not None and not self.heart.alive():
            log("the heart had stopped: restarting it")
            self.heart.start()
        self.guard("hear", self.hear)
        now = self.clock()
        if not self.confirmed:
            if now >= self.next_confirm:  # EC2 failing or throttled: not twice a second
                self.next_confirm = now + CONFIRM_RETRY_SECONDS
                self.guard("confirm", self.confirm)
        else:
            self.look_again_for_strangers(now)
            if now >= self.next_peers:
                self.next_peers = now + self.config.check_seconds
                self.guard("discover", self.discover)
        if now >= self.next_status:
            self.guard("status", lambda: self.refresh_status(now))
        link = self.link_present()
        self.guard("tick", lambda: self.execute(self.machine.tick(now, link_present=link)))  # type: ignore[union-attr]
        self.guard("switchover", self.check_request)
        self.guard("lifecycle", self.check_lifecycle)
        self.guard("signal", self.maybe_signal)
        self.heart.update(
            role=self.machine.role, generation=self.generation, sas=self.sas,
            tunnel_loaded=self.tunnel_loaded, fenced=self.machine.fenced,
            retiring=self.machine.retiring,
        )  # fmt: skip

    def link_present(self) -> bool:
        """The ENI's link here; unknown (no MAC yet, ``ip`` failing) counts as present: only
        a link seen gone makes the active step down at once."""
        if not self.mac:
            return True
        try:
            return self.links.by_mac(self.mac) is not None
        except Exception as exc:  # noqa: BLE001 - boot.BootError, bad JSON: unknown
            self.error("ip link", exc)
            return True

    def guard(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - the loop goes on; the next round retries
            self.error(what, exc)
            return None

    def error(self, what: str, exc: Exception) -> None:
        self.warn(what, f"{what} failed: {type(exc).__name__}: {exc}")

    def warn(self, what: str, message: str) -> None:
        """Logged at once, then at most every ERROR_LOG_SECONDS with how many were not."""
        now = self.clock()
        last, quiet = self.errors.get(what, (-math.inf, 0))
        if now - last < ERROR_LOG_SECONDS:
            self.errors[what] = (last, quiet + 1)
            return
        log(message + (f" ({quiet} more since the last report)" if quiet else ""))
        self.errors[what] = (now, 0)

    def refresh_status(self, now: float) -> None:
        fast = self.awaiting_tunnel is not None
        self.next_status = now + (self.config.interval_seconds if fast else STATUS_SECONDS)
        self.generation = read_generation(self.run_cmd)
        conns = connections(self.config)
        self.sas = read_sas(conns, self.run_cmd)
        self.tunnel_loaded = read_tunnel_loaded([t for t, _ in conns], self.run_cmd)
        wanted = sum(len(children) for _, children in conns)
        if self.awaiting_tunnel is not None and self.sas >= wanted:
            event("tunnel_up", seconds=round(now - self.awaiting_tunnel, 3), sas=self.sas)
            self.awaiting_tunnel = None
        elif self.awaiting_tunnel is not None and now - self.awaiting_tunnel > 120:
            log(f"tunnel not up 120 s after the takeover ({self.sas} SAs)")
            self.awaiting_tunnel = None

    def execute(self, actions: Sequence[Action]) -> None:
        for action in actions:
            try:
                if isinstance(action, TakeOver):
                    self.take_over(action)
                elif isinstance(action, StepDown):
                    log(f"active: {action.reason}: fenced, stepping down to standby")
                    self.set_role(STANDBY)
                    assert self.heart is not None
                    self.heart.update(fenced=True)
                    self.fence(action.reason)
                    drop_sas(self.config, self.run_cmd)
                    self.report()
                elif isinstance(action, CheckEni):
                    seen = self.takeover().describe()
                    self.execute(self.machine.eni_seen(self.clock(), seen.holder))  # type: ignore[union-attr]
                elif isinstance(action, Report):
                    self.report()
                elif isinstance(action, HandOver):
                    self.hand_over(action)
                elif isinstance(action, NoHandover):
                    log(f"no handover: {action.reason}")
                elif isinstance(action, AcceptHandover):
                    self.accept_handover(action)
            except Exception as exc:  # noqa: BLE001 - the loop goes on; the next round retries
                self.error(type(action).__name__, exc)

    def report(self) -> None:
        assert self.machine is not None and self.heart is not None
        heard = self.machine.peer_heard_at
        now_wall, now = self.wall(), self.clock()
        heard_wall = None if heard is None else now_wall - (now - heard)
        self.records.readiness(
            self.instance_id, self.machine.role, self.generation, self.sas, heard_wall, now_wall,
            tunnel_loaded=self.tunnel_loaded, epoch=self.heart.epoch,
            fenced=self.machine.fenced, heart=self.heart.stats(),
            software=software.report(self.running_software, self.deployed()),
        )  # fmt: skip

    def takeover(self) -> Takeover:
        return Takeover(
            self.config, self.ec2, self.instance_id, self.wall, self.clock, self.sleep,
            second_opinion=self.second_opinion,
        )  # fmt: skip

    # -- failover -----------------------------------------------------------------------------

    def second_opinion(self, holder: str) -> str | None:
        """Before Force: is the silent holder really down? DescribeInstanceStatus
        (IncludeAllInstances: a stopped one too): not running -> force. Running -> an ICMP
        echo to its primary IP: an answer means the kernel is up and forwarding (only the
        agent is silent): no force. A failed DescribeInstanceStatus: the ping alone decides.
        Returns why not to force, or None (force)."""
        try:
            reply = self.ec2.describe_instance_status(
                InstanceIds=[holder], IncludeAllInstances=True
            )
            statuses = reply.get("InstanceStatuses", [])
            state = statuses[0].get("InstanceState", {}).get("Name") if statuses else None
            if state != "running":
                event("second_opinion", holder=holder, state=state, ping=None, force=True)
                return None
        except Exception as exc:  # noqa: BLE001 - the ping alone
            log(f"DescribeInstanceStatus({holder}) failed ({exc}): the ping decides")
            state = "unknown"
        address = self.address_of(holder)
        answered = address is not None and self.pinger(address)
        event(
            "second_opinion", holder=holder, state=state, address=str(address),
            ping=answered, force=not answered,
        )  # fmt: skip
        if answered:
            return (
                f"{holder} is {state} and {address} answers ICMP echo: its agent is silent "
                "but the instance is up (no force; asked again after the silence budget)"
            )
        return None

    def address_of(self, holder: str) -> IPv4Address | None:
        if self.members is not None and self.members.get(holder) is not None:
            return self.members[holder]
        try:
            reply = self.ec2.describe_instances(InstanceIds=[holder])
            for reservation in reply.get("Reservations", []):
                for instance in reservation.get("Instances", []):
                    if instance.get("PrivateIpAddress"):
                        return IPv4Address(instance["PrivateIpAddress"])
        except Exception as exc:  # noqa: BLE001 - no address: no ping, force as before
            log(f"cannot find {holder}'s address: {exc}")
        return None

    def take_over(self, action: TakeOver) -> None:
        assert self.machine is not None
        log(f"standby: {action.reason}: taking over")
        decided = self.clock()
        try:
            result = self.takeover().run()
        except Exception as exc:  # noqa: BLE001
            result = TakeoverResult("failed", f"{type(exc).__name__}: {exc}")
        if result.outcome in ("refused", "spared", "lost", "failed"):
            log(f"standby: takeover {result.outcome}: {result.detail}; staying standby")
            self.machine.takeover_failed(self.clock(), result.retry_after)
            return
        attached = self.clock()
        failed = self.become_active(result.mac)
        if failed is None:
            return
        switched = self.clock()
        self.awaiting_tunnel = decided
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
            device_index=result.device_index,
            wall=round(timing["at"], 3),
        )
        try:
            if result.outcome == "won":
                self.records.failover(self.instance_id, result, timing)
            else:
                self.records.claim(self.instance_id, timing["at"])
        except Exception as exc:  # noqa: BLE001 - the takeover stands; the record is lost
            log(f"recording the takeover failed: {type(exc).__name__}: {exc}")

    def become_active(self, mac: str) -> list[str] | None:
        """G up on the ENI's link, the tunnel initiated, the role active. None: G could not
        be brought up (the machine retries after the budget; it finds the ENI here)."""
        assert self.machine is not None
        self.mac = mac or self.mac
        try:
            self.bring_up(self.mac)
            failed = initiate(self.config, self.run_cmd)
        except Exception as exc:  # noqa: BLE001 - level-triggered: the next attempt finds it here
            log(f"standby: holds {self.config.eni_id} but cannot bring G up ({exc}); retrying")
            self.machine.takeover_failed(self.clock())
            return None
        self.machine.took_over(self.clock())
        self.set_role(ACTIVE)
        assert self.heart is not None
        self.heart.update(fenced=False)
        self.next_status = self.clock()
        self.save_state()
        return failed

    def fence(self, reason: str) -> None:
        """Fenced (its ENI taken by a forced detach it did not ask for): Auto Scaling replaces
        this instance with a clean standby. After a forced detach EC2 may refuse the device
        index until a stop/start and the metadata may still show the old ENI
        (https://docs.aws.amazon.com/AWSEC2/latest/APIReference/API_DetachNetworkInterface.html);
        SetInstanceHealth (https://docs.aws.amazon.com/autoscaling/ec2/APIReference/API_SetInstanceHealth.html)."""
        self.fenced_reason = reason
        marked = False
        if self.autoscaling is not None:
            try:
                self.autoscaling.set_instance_health(
                    InstanceId=self.instance_id,
                    HealthStatus="Unhealthy",
                    ShouldRespectGracePeriod=False,
                )
                marked = True
            except Exception as exc:  # noqa: BLE001 - said in the event; it stays a standby
                log(f"could not mark {self.instance_id} Unhealthy: {type(exc).__name__}: {exc}")
        event(
            "fenced", instance=self.instance_id, reason=reason, marked_unhealthy=marked,
            wall=round(self.wall(), 3),
        )  # fmt: skip

    def bring_up(self, mac: str) -> None:
        """G on the ENI's link and the route to T, as the boot program does."""
        if not boot.MAC.fullmatch(mac):
            raise PairError(f"{self.config.eni_id} has no usable MAC address ({mac!r})")
        cfg = self.config
        helper = boot.Boot(
            cfg.boot_config(), self.ec2, self.instance_id, self.links, self.sleep, self.clock
        )
        # Polled every 20 ms: each poll is one local `ip -j link show` (no AWS call), and the
        # link's arrival is on the switchover's critical path (the standby's EC2 polls stay at
        # 0.1 s: Describe calls share the account's request rate).
        dev = helper.wait_for_link(mac, seconds=60.0, poll=LINK_POLL_SECONDS)
        self.links.configure(dev, cfg.gateway)
        # Every partner's T (issue 23): pair.json's, and with tunnels_dir each T ConfigureTunnel
        # recorded there (pair.json names the first partner only: adding one must not replace
        # the gateways). The boot program's helper: the same routes whoever brings G up.
        boot.partner_routes(self.links, cfg.boot_config(), dev, cfg.tunnels_dir)
        log(f"G {cfg.gateway} up on {dev}")

    # -- planned handover -----------------------------------------------------------------------

    def hand_over(self, action: HandOver) -> tuple[bool, str]:
        """The active's side: ``handover`` until the standby acknowledges (1 s at most), then
        DetachNetworkInterface without Force of its own attachment, its SAs dropped, a
        healthy standby. Returns (handed over, what happened)."""
        assert self.machine is not None and self.heart is not None
        started = self.clock()
        log(f"active: handing G over to {action.to} ({action.reason})")
        acked = False
        for _ in range(10):  # 10 x 0.1 s: HANDOVER_ACK_SECONDS
            self.heart.send("handover", to=action.to)
            for _ in range(5):
                if self.heart.acked(action.to, started):
                    acked = True
                    break
                self.sleep(HANDOVER_ACK_SECONDS / 50)
            if acked or self.clock() - started > HANDOVER_ACK_SECONDS:
                break
        if not acked:
            detail = f"{action.to} did not acknowledge the handover: still active"
            log(detail)
            return False, detail
        seen = self.takeover().describe()
        if seen.holder != self.instance_id or seen.attachment_id is None:
            return False, f"{self.config.eni_id} is not attached here ({seen.holder})"
        acked_at = self.clock()
        # No Force: the instance is healthy, the detach is orderly (the device index stays
        # usable, unlike after a forced detach).
        self.ec2.detach_network_interface(AttachmentId=seen.attachment_id)
        detached = self.clock()
        self.machine.handed_over(detached)
        self.set_role(STANDBY)
        drop_sas(self.config, self.run_cmd)
        event(
            "handover_sent", instance=self.instance_id, to=action.to, reason=action.reason,
            ack_seconds=round(acked_at - started, 3),
            detach_call_seconds=round(detached - acked_at, 3),
            seconds=round(self.clock() - started, 3), wall=round(self.wall(), 3),
        )  # fmt: skip
        self.report()
        return True, f"handed over to {action.to}"

    def accept_handover(self, action: AcceptHandover) -> None:
        """The standby's side: no hold-down, no Force: the ENI polled every 0.1 s until
        available, attached here, G up, the tunnel initiated."""
        assert self.machine is not None
        started = self.clock()
        log(f"standby: {action.previous} hands G over: taking it")
        takeover = self.takeover()
        takeover.poll_seconds = 0.1
        deadline = started + HANDOVER_ENI_SECONDS
        result = takeover.wait_available(action.previous, deadline)
        detached = self.clock()
        if result is None:
            result = takeover.attach_here(action.previous, deadline)
        if result.outcome not in ("won", "already"):
            log(f"standby: handover {result.outcome}: {result.detail}; staying standby")
            self.machine.takeover_failed(self.clock(), result.retry_after)
            return
        attached = self.clock()
        failed = self.become_active(result.mac)
        if failed is None:
            return
        switched = self.clock()
        self.awaiting_tunnel = started
        at = self.wall()
        event(
            "handover", instance=self.instance_id, previous=action.previous,
            detached_seconds=round(detached - started, 3),
            attach_seconds=round(attached - started, 3),
            switch_seconds=round(switched - started, 3), initiate_failed=failed,
            device_index=result.device_index, wall=round(at, 3),
        )  # fmt: skip
        try:
            timing = {"at": at, "seconds": switched - started, "reason": "planned handover"}
            self.records.switchover(action.previous, self.instance_id, timing)
        except Exception as exc:  # noqa: BLE001 - the handover stands; the record is lost
            log(f"recording the switchover failed: {type(exc).__name__}: {exc}")

    def check_request(self) -> None:
        """The switchover request file (root writes it): the active hands over within one
        interval; either way the request is answered in ``<request>.result`` and removed."""
        assert self.machine is not None
        request = self.config.switchover_file
        if not request.exists():
            return
        result: dict[str, Any] = {"instance": self.instance_id, "at": round(self.wall(), 3)}
        if self.machine.role != ACTIVE:
            result |= {"outcome": "not_active", "detail": f"{self.instance_id} is the standby"}
        else:
            action = self.machine.handover_wanted(
                self.clock(), "switchover requested", self.generation
            )
            if isinstance(action, HandOver):
                done, detail = self.hand_over(action)
                result |= {"outcome": "done" if done else "failed", "detail": detail}
                result["to"] = action.to
            else:
                result |= {"outcome": "failed", "detail": action.reason}  # type: ignore[union-attr]
        log(f"switchover request: {result['outcome']}: {result['detail']}")
        write_json(request.with_name(f"{request.name}.result"), result)
        try:
            request.unlink()
        except OSError as exc:
            log(f"cannot remove {request}: {exc}")

    def check_lifecycle(self) -> None:
        """IMDS says this instance is being terminated (the group's termination hook holds it
        in Terminating:Wait): hand G over, then CompleteLifecycleAction(CONTINUE); without a
        ready standby, after LIFECYCLE_WAIT_SECONDS all the same (a deploy never hangs)."""
        assert self.machine is not None and self.heart is not None
        hook = self.config.lifecycle_hook
        now = self.clock()
        if hook is None or self.lifecycle_done or now < self.next_lifecycle:
            return
        self.next_lifecycle = now + LIFECYCLE_POLL_SECONDS
        if self.terminating_since is None:
            # https://docs.aws.amazon.com/autoscaling/ec2/userguide/retrieving-target-lifecycle-state-through-imds.html
            if self.imds(LIFECYCLE_STATE) != "Terminated":
                return
            self.terminating_since = now
            self.machine.retiring = True
            self.heart.update(retiring=True)
            event("terminating", instance=self.instance_id, role=self.machine.role)
        self.next_lifecycle = now + self.config.interval_seconds
        waited = now - self.terminating_since
        if self.machine.role == ACTIVE:
            action = self.machine.handover_wanted(now, "terminating", self.generation)
            done = isinstance(action, HandOver) and self.hand_over(action)[0]
            if not done and waited < LIFECYCLE_WAIT_SECONDS:
                self.warn("lifecycle wait", f"terminating: no handover yet: {action}")
                return
        self.autoscaling.complete_lifecycle_action(
            LifecycleHookName=hook,
            AutoScalingGroupName=self.group_name(),
            LifecycleActionResult="CONTINUE",
            InstanceId=self.instance_id,
        )
        self.lifecycle_done = True
        event(
            "lifecycle_complete", instance=self.instance_id, role=self.machine.role,
            waited_seconds=round(waited, 3),
        )  # fmt: skip

    def maybe_signal(self) -> None:
        """SignalResource(SUCCESS) once per instance when it is ready: role confirmed, the
        tunnel loaded, the NAT table at the table's generation (the rolling update waits)."""
        cfg = self.config
        now = self.clock()
        if cfg.signal_stack is None or self.signalled or now < self.next_signal:
            return
        self.next_signal = now + SIGNAL_POLL_SECONDS
        try:
            if cfg.signal_marker.read_text().strip() == self.instance_id:
                self.signalled = True
                return
        except OSError:
            pass
        if not self.confirmed or self.tunnel_loaded is not True or self.generation is None:
            return
        desired = self.records.desired_generation()
        if self.generation < desired:
            return
        # https://docs.aws.amazon.com/AWSCloudFormation/latest/APIReference/API_SignalResource.html
        self.cloudformation.signal_resource(
            StackName=cfg.signal_stack,
            LogicalResourceId=cfg.signal_resource,
            UniqueId=self.instance_id,
            Status="SUCCESS",
        )
        self.signalled = True
        try:
            cfg.signal_marker.parent.mkdir(parents=True, exist_ok=True)
            cfg.signal_marker.write_text(f"{self.instance_id}\n")
        except OSError as exc:
            log(f"cannot write {cfg.signal_marker}: {exc}")
        event(
            "ready_signal", instance=self.instance_id, role=self.machine.role,  # type: ignore[union-attr]
            generation=self.generation, desired_generation=desired,
        )  # fmt: skip

    def wait(self, seconds: float) -> None:
        """Until the next round, or until the heart hears a handover for this gateway (the
        standby must not leave G detached for the rest of an interval)."""
        assert self.heart is not None
        if self.heart.alive():
            if self.heart.wake.wait(max(seconds, 0.0)):
                self.heart.wake.clear()
        else:
            self.sleep(seconds)

    def run_forever(self, rounds: int | None = None) -> None:
        assert self.machine is not None
        interval = self.config.interval_seconds
        next_round = self.clock()
        done = 0
        while rounds is None or done < rounds:
            self.guard("step", self.step)
            done += 1
            next_round += interval
            now = self.clock()
            if next_round < now:  # a takeover or a slow call: start counting again from now
                next_round = now
            self.wait(next_round - now)


def _clients(region: str) -> dict[str, Any]:
    import boto3  # the distribution's
    from botocore.config import Config

    # Fast failure, a few retries: a takeover must not sit in a long back-off. The heart does
    # not wait for any of these.
    config = Config(
        retries={"mode": "standard", "max_attempts": 4}, connect_timeout=3, read_timeout=10
    )
    session = boto3.session.Session(region_name=region)
    names = ("ec2", "dynamodb", "cloudwatch", "sns", "autoscaling", "cloudformation", "ssm")
    return {name: session.client(name, config=config) for name in (*names, "secretsmanager")}


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
    # Which archive this is, before anything else: an upgrade may move the link meanwhile.
    running = software.identity()
    try:
        instance_id = boot.instance_id_from_imds(os.environ.get("TUNNELNAT_IMDS_URL", boot.IMDS))
        # The key first: cached, it needs no client (boto3 resolves credentials when it makes
        # one); then the clients, which make no AWS call until used.
        key = load_key(config, lambda: _clients(config.region)["secretsmanager"])
        clients = _clients(config.region)
        heart = Heart(instance_id, key, config.heartbeat_port, config.interval_seconds)
        heart.open()
        records = Records(config, clients["dynamodb"], clients["cloudwatch"], clients["sns"])
        deployed = None
        if config.software_parameter:
            deployed = DeployedSoftware(config.software_parameter, config.region, clients["ssm"])
        agent = Agent(
            config, instance_id, clients["ec2"], records, heart=heart,
            autoscaling=clients["autoscaling"], cloudformation=clients["cloudformation"],
            running_software=running,
        )  # fmt: skip
        if deployed is not None:
            agent.deployed = deployed
            deployed.start()
        agent.start(confirm=False)  # the first heartbeat goes before any AWS call
    except PairError as exc:
        log(f"FAILED: {exc}")
        return 2
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
