"""The seed's network, built from Linux network namespaces on this machine.

    tn-web-N ─┐                          ┌───────── tn-inet ─────────┐
    tn-web-2 ─┼─ br0 (tn-vpc) ─ tn-gw ───┤ 198.51.100.1   .33        ├── tn-pvpn ── tn-app
    tn-web-1 ─┘  10.10.1.0/24   G, E     └───────────────────────────┘    T   192.0.2.1   A
                 │ .1
             tn-vpcrtr (the VPC router: routes by moto's route tables, lab/vpc_router.py)
                 │ .1
    tn-priv-1 ─┬─ br1 (tn-vpc)  10.10.2.0/24, the private subnet (no SSM agent stand-in)
    tn-priv-2 ─┘

Every "machine" is a network namespace plus a persistent mount namespace whose /etc is an overlay
of the host's: what a document or daemon writes under /etc stays on that machine (in
/run/tn-lab/machines/NS/etc), and the host's /etc, routes and addresses are never touched. The
host's /run/systemd is hidden inside, so documents see no systemd, as in a container.

Addresses are documentation ranges only; no packet leaves the machine. ``Lab`` is a context
manager; ``cleanup()`` removes everything any earlier run left behind (namespaces, processes,
mounts, /run/tn-lab) and is safe to call at any time.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lab import partners
from lab.autoscaling import create_group
from lab.aws import LabAws
from lab.commands import LabCommands
from lab.constants import (
    APP,
    APP_PORT,
    CHARON_LOG,
    DEPLOYMENT,
    ENI_LINK,
    GATEWAY_DIR,
    GATEWAY_MACHINES,
    GATEWAY_TERMINATE_HOOK,
    GATEWAY_UNITS,
    GW_ENI,
    GW_PRIMARY,
    GW_PUBLIC,
    HEARTBEAT_PORT,
    IMDS_NS_PORT,
    IMDS_STATE,
    INET_GW_SIDE,
    INET_PARTNER_SIDE,
    INSTANCE_PORT,
    KEY_FILE,
    LOGS,
    MACHINES,
    MNT,
    MOTO_NS_PORT,
    PAIR_KEY_SECRET,
    PAIR_UNIT,
    PARTNER_ENDPOINT,
    PARTNER_INSIDE,
    PARTNER_NET,
    PIDS,
    POOL,
    PREFIX,
    PRIVATE_CIDR,
    PRIVATE_ROUTER,
    PSK_SECRET,
    PUBLIC_LINK,
    REGION,
    REPLACEMENT_MACHINES,
    REQUEST_FILE,
    ROLE_FILE,
    ROUTER_NS,
    RUN,
    SHARED,
    SIGNAL_RESOURCE,
    SIGNAL_STACK,
    STANDBY_NS,
    STANDBY_PRIMARY,
    SUBNET_CIDR,
    TABLE,
    TUNNEL,
    UNIT_SOURCE,
    VPC_CIDR,
    VPC_ROUTER,
    Instance,
    LabError,
    gateway_access_key,
    instance_ip,
    mount_ns_path,
    private_instance_ip,
)
from lab.eni_mirror import PARKING_NS, EniMirror, run_ip_batch
from lab.gateway_boot import GatewayBoot, net_sysctls, parse_unit, read_machine_file
from lab.package import (
    INSTALLER,
    INSTALLER_SOURCE,
    MARKER,
    MARKER_SOURCE,
    installer_argv,
    publish,
)
from lab.ssm_runner import REPO, default_env, load_document, netns_argv
from lab.vpc_router import FIRST_TABLE, RouterLink, VpcRouter


def _unit_text(name: str) -> str:
    """A unit as the user data writes it (gateway/systemd/, the same file)."""
    return (UNIT_SOURCE / name).read_text()


def sh(
    argv: Sequence[str], *, check: bool = True, input: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        list(argv), input=input, capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def machine_argv(ns: str, argv: Sequence[str]) -> list[str]:
    """``argv`` run on lab machine ``ns``: its network namespace and its private /etc."""
    return netns_argv(ns, argv, mount_ns=mount_ns_path(ns))


def in_ns(ns: str, argv: Sequence[str], *, check: bool = True, timeout: float = 60) -> str:
    return sh(machine_argv(ns, argv), check=check, timeout=timeout).stdout


# ---------------------------------------------------------------------------------------------
# Teardown: works from any state, including a crashed earlier run.


FIXED_MACHINES = ("tn-vpc", "tn-gw", "tn-inet", "tn-pvpn", "tn-app", ROUTER_NS)


def is_lab_namespace(name: str) -> bool:
    """The lab's own names only: other tools (bench) run their own tn-* namespaces meanwhile."""
    if name in (*FIXED_MACHINES, STANDBY_NS, *REPLACEMENT_MACHINES):
        return True
    if re.fullmatch(r"tn-(web|priv)-[0-9]{1,3}", name) is not None:
        return True
    # The three-partner lab's other partners (lab.partners_lab): bank's and clearing's machines.
    return re.fullmatch(r"tn-(pvpn|app)-[bc]", name) is not None


def lab_namespaces() -> list[str]:
    out = sh(["ip", "netns", "list"], check=False).stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [n for n in names if is_lab_namespace(n)]


def _kill_pids(pids: set[int]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = set()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
                # A powered-off machine's processes are stopped: a TERM waits for a CONT.
                os.kill(pid, signal.SIGCONT)
                alive.add(pid)
        deadline = time.monotonic() + 2
        while alive and time.monotonic() < deadline:
            alive = {p for p in alive if Path(f"/proc/{p}").exists() and not _zombie(p)}
            time.sleep(0.05)
        pids = alive
        if not pids:
            return


def stop_group(proc: subprocess.Popen, sig: int = signal.SIGTERM, wait: float = 5) -> None:
    """Stop a process started in a group of its own (``start_new_session``): ``sig`` to the
    group, KILL after ``wait`` seconds."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=wait)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


LOCK = Path("/run/lock/tn-lab.lock")


@contextlib.contextmanager
def lab_lock(wait: float = 900) -> Iterator[None]:
    """One lab per machine (the tn-* names are fixed): wait for another run to finish.

    The lock is released by the kernel when its holder dies, so a crashed run never blocks
    the next; the lock file is removed by whoever holds it last.
    """
    deadline = time.monotonic() + wait
    announced = False
    while True:
        LOCK.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if time.monotonic() > deadline:
                raise LabError(f"another lab holds {LOCK}; gave up after {wait:.0f}s") from None
            if not announced:
                print(f"lab: waiting for another lab run to finish ({LOCK})", file=sys.stderr)
                announced = True
            time.sleep(0.5)
            continue
        # The holder before us may have unlinked the file: then our lock is on a stale inode.
        try:
            same = os.stat(LOCK).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            LOCK.unlink()
        os.close(fd)


def cleanup() -> None:
    """Remove the lab's namespaces, the processes in them, our mounts and /run/tn-lab."""
    pids: set[int] = set()
    for ns in lab_namespaces():
        out = sh(["ip", "netns", "pids", ns], check=False).stdout
        pids |= {int(p) for p in out.split()}
    # Root-namespace helpers (the moto bridge) recorded their pid; check it is still ours.
    if PIDS.is_dir():
        for pidfile in PIDS.glob("*.pid"):
            with contextlib.suppress(ValueError, OSError):
                pid = int(pidfile.read_text())
                if str(RUN) in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                    pids.add(pid)
    pids.discard(os.getpid())
    _kill_pids(pids)
    # Persistent mount namespaces are bind mounts of nsfs files under MNT, deepest first.
    mounts = sh(["findmnt", "-rn", "-o", "TARGET"], check=False).stdout.split()
    for target in sorted((m for m in mounts if m.startswith(str(RUN))), reverse=True):
        sh(["umount", "-l", target], check=False)
    for ns in lab_namespaces():
        sh(["ip", "netns", "del", ns], check=False)
    sh(["rm", "-rf", str(RUN)], check=False)
    netns_etc = Path("/etc/netns")
    if netns_etc.is_dir():
        for d in netns_etc.glob(f"{PREFIX}*"):
            if is_lab_namespace(d.name):
                sh(["rm", "-rf", str(d)], check=False)
    left = lab_namespaces()
    if left:
        raise LabError(f"could not remove namespaces: {', '.join(left)}")


# Issue 20's pair.json keys: optional for the agent, which refuses keys it does not know.
ISSUE20_PAIR_KEYS = (
    "key_secret",
    "key_file",
    "lifecycle_hook",
    "signal_stack",
    "signal_resource",
    "request_file",
)


def agent_config(config: Mapping[str, Any], program: str) -> dict[str, Any]:
    """``config`` without the issue-20 keys the pair agent's ``program`` does not read yet (it
    refuses unknown keys; the lab runs whichever agent the tree holds)."""
    return {k: v for k, v in config.items() if k not in ISSUE20_PAIR_KEYS or f'"{k}"' in program}


# ---------------------------------------------------------------------------------------------


@dataclass
class Lab:
    """The whole lab; ``with Lab(instances=2) as lab:`` builds it and always tears it down."""

    instances_count: int = 2
    listeners: int = 1  # instances (from web-1) that run the listener the partner connects to
    psk: str = field(default_factory=lambda: secrets.token_hex(24))
    partner: str = "aws"  # the partner's profile (lab/partners.py)
    private_count: int = 2  # instances priv-1..N in the private subnet (no SSM agent stand-in)
    instances: list[Instance] = field(default_factory=list)
    # In the private subnet: EC2 knows them, but they have no agent: the lab's command port has
    # no namespace for them, so a document sent there would fail (and is recorded as asked).
    private_instances: list[Instance] = field(default_factory=list)
    vpc_router: Any = None  # lab.vpc_router.VpcRouter once moto runs
    _procs: list[tuple[str, subprocess.Popen]] = field(default_factory=list)
    moto_endpoint: str = ""
    _moto: object | None = None
    aws: Any = None  # lab.aws.LabAws once moto runs
    commands: Any = None  # lab.commands.LabCommands
    timings: dict[str, float] = field(default_factory=dict)
    # Set by close() once cleanup() found none of the lab's namespaces left, under the lock: a
    # later look could see the next lab run's namespaces.
    cleaned: bool = False
    _lock: Any = None
    # The gateway pair (issue 15): ``pair=True`` builds the standby tn-gw2 with the lab (or
    # ``add_standby_gateway()`` later); only labs that ask pay for it.
    pair: bool = False
    standby_id: str = ""  # the standby's instance ID in moto, once built
    eni_mirror: Any = None  # lab.eni_mirror.EniMirror once the pair is built
    standby_boot: Any = None  # the standby's GatewayBoot (its units' runs)
    # Instance ID -> machine of every gateway running now (the pair's two; a rolling
    # replacement changes them).
    gateways: dict[str, str] = field(default_factory=dict)
    # Gateway machine -> when its pair agent last started (time.time()): its startup grace.
    agent_started: dict[str, float] = field(default_factory=dict)
    # Gateway machine -> primary address (machines a rolling replacement adds join it).
    gateway_primary: dict[str, str] = field(default_factory=lambda: dict(GATEWAY_MACHINES))
    # The pair agents' heartbeat key (Secrets Manager PAIR_KEY_SECRET; >= 32 characters).
    psk_for_heartbeats: str = field(default_factory=lambda: secrets.token_hex(32))
    frozen: set[int] = field(default_factory=set)  # processes of powered-off machines
    software: Any = None  # lab.package.LabPackage: the gateway software deployed now

    # -- lifecycle ----------------------------------------------------------------------------
    def __enter__(self) -> Lab:
        waiting = time.monotonic()
        self._lock = lab_lock()
        self._lock.__enter__()
        self.timings["lock_wait"] = time.monotonic() - waiting  # another lab ran meanwhile
        try:
            cleanup()
            self.build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.vpc_router is not None:
            self.vpc_router.stop()  # before moto goes: it polls moto
        if self.eni_mirror is not None:
            self.eni_mirror.stop()
        self.thaw()  # a stopped process never acts on TERM
        for _name, proc in reversed(self._procs):
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
        for _name, proc in reversed(self._procs):
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._procs.clear()
        if self._moto is not None:
            with contextlib.suppress(Exception):
                self.reset_moto()  # leave no state to whoever uses moto next in this process
                self._moto.stop()  # type: ignore[attr-defined]
            self._moto = None
        try:
            cleanup()  # raises when a namespace could not be removed
            self.cleaned = True
        finally:
            if self._lock is not None:
                self._lock.__exit__(None, None, None)
                self._lock = None

    def build(self) -> None:
        started = time.monotonic()
        for d in (MACHINES, MNT, PIDS, LOGS):
            d.mkdir(parents=True, exist_ok=True)
        # Mount namespaces can only be pinned (bind-mounted) below a private mount.
        sh(["mount", "--bind", str(MNT), str(MNT)])
        sh(["mount", "--make-private", str(MNT)])
        self.instances = [
            Instance(f"web-{n}", f"{PREFIX}web-{n}", instance_ip(n))
            for n in range(1, self.instances_count + 1)
        ]
        self.private_instances = [
            Instance(f"priv-{n}", f"{PREFIX}priv-{n}", private_instance_ip(n))
            for n in range(1, self.private_count + 1)
        ]
        self._build_network()
        self.timings["network"] = time.monotonic() - started
        self._configure_partner()
        self._start_charon("tn-pvpn")
        in_ns("tn-pvpn", ["swanctl", "--load-all"])
        self.start_moto()
        self._seed_aws()
        self._start_vpc_router()
        # The gateway boots as on AWS: its boot units attach the ENI and start strongSwan.
        self.install_gateway_boot()
        boot = self.boot_gateway()
        self.timings["gateway_boot"] = sum(r.seconds for r in boot.runs)
        attach = boot.unit("tunnelnat-boot.service")
        if attach is None or attach.state != "done":
            raise LabError(f"the gateway's boot failed: {attach}")
        self._start_servers()
        if self.pair:
            self.add_standby_gateway()
        self.timings["build"] = time.monotonic() - started

    # -- network ------------------------------------------------------------------------------
    def machines(self) -> list[str]:
        return [*FIXED_MACHINES, *[i.ns for i in (*self.instances, *self.private_instances)]]

    def _build_network(self) -> None:
        for ns in self.machines():
            self._new_machine(ns)
        vpc = "tn-vpc"
        sh(["ip", "-n", vpc, "link", "add", "br0", "type", "bridge"])
        sh(["ip", "-n", vpc, "link", "set", "br0", "up"])
        veth, on_bridge = self._veth, self._on_bridge

        # Gateway: VPC side (primary, and the ENI's link: G is the boot program's to configure
        # once it has attached the ENI, as on AWS) and public side E.
        on_bridge("tn-gw", "p-gw")
        sh(["ip", "-n", "tn-gw", "addr", "add", f"{GW_PRIMARY}/24", "dev", "eth0"])
        sh(["ip", "-n", vpc, "link", "add", "p-gw-eni", "type", "veth", "peer", "name", ENI_LINK])
        sh(["ip", "-n", vpc, "link", "set", ENI_LINK, "netns", "tn-gw"])
        sh(["ip", "-n", vpc, "link", "set", "p-gw-eni", "master", "br0", "up"])
        veth("tn-gw", "eth1", "tn-inet", "to-gw")
        sh(["ip", "-n", "tn-gw", "addr", "add", f"{GW_PUBLIC}/28", "dev", "eth1"])
        sh(["ip", "-n", "tn-gw", "route", "add", "default", "via", INET_GW_SIDE])
        self._gateway_vpc_route()
        # Internet router between our E and the partner's T.
        sh(["ip", "-n", "tn-inet", "addr", "add", f"{INET_GW_SIDE}/28", "dev", "to-gw"])
        veth("tn-inet", "to-pvpn", "tn-pvpn", "eth0")
        sh(["ip", "-n", "tn-inet", "addr", "add", f"{INET_PARTNER_SIDE}/28", "dev", "to-pvpn"])
        sh(["ip", "netns", "exec", "tn-inet", "sysctl", "-qw", "net.ipv4.ip_forward=1"])
        # Partner: VPN endpoint T, and app server A behind it.
        sh(["ip", "-n", "tn-pvpn", "addr", "add", f"{PARTNER_ENDPOINT}/28", "dev", "eth0"])
        sh(["ip", "-n", "tn-pvpn", "route", "add", "default", "via", INET_PARTNER_SIDE])
        veth("tn-pvpn", "eth1", "tn-app", "eth0")
        sh(["ip", "-n", "tn-pvpn", "addr", "add", f"{PARTNER_INSIDE}/24", "dev", "eth1"])
        sh(["ip", "netns", "exec", "tn-pvpn", "sysctl", "-qw", "net.ipv4.ip_forward=1"])
        sh(["ip", "-n", "tn-app", "addr", "add", f"{APP}/24", "dev", "eth0"])
        sh(["ip", "-n", "tn-app", "route", "add", "default", "via", PARTNER_INSIDE])
        # Instances: on the subnet, no default route. Only the host route the controller
        # installs (A via G) makes the partner reachable.
        for inst in self.instances:
            self._wire_instance(inst)
        self._build_private_subnet()

    def _build_private_subnet(self) -> None:
        """The VPC router between the two subnets, and the private subnet's instances behind it.

        Its links carry each subnet's base + 1; what it forwards is decided by the route tables
        (lab.vpc_router fills them from moto). Private instances get the router as their default
        gateway, as AWS's DHCP gives every instance its subnet's router."""
        vpc, rtr = "tn-vpc", ROUTER_NS
        sh(["ip", "-n", vpc, "link", "add", "br1", "type", "bridge"])
        sh(["ip", "-n", vpc, "link", "set", "br1", "up"])
        self._veth(vpc, "p-rtr-1", rtr, "sn-1")
        sh(["ip", "-n", vpc, "link", "set", "p-rtr-1", "master", "br0"])
        self._veth(vpc, "p-rtr-2", rtr, "sn-2")
        sh(["ip", "-n", vpc, "link", "set", "p-rtr-2", "master", "br1"])
        sh(["ip", "-n", rtr, "addr", "add", f"{VPC_ROUTER}/24", "dev", "sn-1"])
        sh(["ip", "-n", rtr, "addr", "add", f"{PRIVATE_ROUTER}/24", "dev", "sn-2"])
        for setting in (
            "net.ipv4.ip_forward=1",
            # The router is not a host: no redirects, and the tables decide, not the source.
            "net.ipv4.conf.all.send_redirects=0",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
        ):
            sh(["ip", "netns", "exec", rtr, "sysctl", "-qw", setting])
        for inst in self.private_instances:
            self._wire_private_instance(inst)

    def _wire_private_instance(self, inst: Instance) -> None:
        self._veth("tn-vpc", f"p-{inst.name}", inst.ns, "eth0")
        sh(["ip", "-n", "tn-vpc", "link", "set", f"p-{inst.name}", "master", "br1"])
        sh(["ip", "-n", inst.ns, "addr", "add", f"{inst.private_ip}/24", "dev", "eth0"])
        sh(["ip", "-n", inst.ns, "route", "add", "default", "via", PRIVATE_ROUTER])

    def _gateway_vpc_route(self, ns: str = "tn-gw") -> None:
        # On AWS the gateway's default route goes to its subnet's router, which also reaches the
        # VPC's other subnets. The lab's gateway sends its default to its public link (E sits on
        # it, no Internet gateway), so the VPC's CIDR goes to the VPC router explicitly: replies
        # to the private subnet leave through the same gateway and the VPC router, as on AWS.
        in_ns(ns, ["ip", "route", "replace", VPC_CIDR, "via", VPC_ROUTER, "dev", "eth0"])

    def _start_vpc_router(self) -> None:
        """The route-table mirror: moto's route tables -> the router's kernel tables, now and
        then every second (lab.vpc_router)."""

        def run_ip(argv: list[str], input: str | None = None) -> str:
            return sh(["ip", "-n", ROUTER_NS, *argv], input=input).stdout

        links = {
            self.aws.subnet_id: RouterLink(SUBNET_CIDR, "sn-1", VPC_ROUTER, FIRST_TABLE),
            self.aws.private_subnet_id: RouterLink(
                PRIVATE_CIDR, "sn-2", PRIVATE_ROUTER, FIRST_TABLE + 1
            ),
        }
        self.vpc_router = VpcRouter(self.aws.client("ec2"), self.aws.vpc_id, links, run_ip)
        self.vpc_router.install_rules()
        self.vpc_router.sync()
        self.vpc_router.start()

    @staticmethod
    def _veth(ns_a: str, if_a: str, ns_b: str, if_b: str) -> None:
        sh(
            [
                "ip",
                "-n",
                ns_a,
                "link",
                "add",
                if_a,
                "type",
                "veth",
                "peer",
                "name",
                if_b,
                "netns",
                ns_b,
            ]
        )
        sh(["ip", "-n", ns_a, "link", "set", if_a, "up"])
        sh(["ip", "-n", ns_b, "link", "set", if_b, "up"])

    def _on_bridge(self, ns: str, port: str) -> None:
        self._veth("tn-vpc", port, ns, "eth0")
        sh(["ip", "-n", "tn-vpc", "link", "set", port, "master", "br0"])

    def _wire_instance(self, inst: Instance) -> None:
        self._on_bridge(inst.ns, f"p-{inst.name}")
        sh(["ip", "-n", inst.ns, "addr", "add", f"{inst.private_ip}/24", "dev", "eth0"])

    def _new_machine(self, ns: str) -> None:
        sh(["ip", "netns", "add", ns])
        self._make_machine(ns)
        sh(["ip", "-n", ns, "link", "set", "lo", "up"])
        # Quiet and fast: no IPv6 (no DAD, no router solicitations) in the lab.
        sh(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"])

    def add_instances(self, numbers: Sequence[int]) -> list[Instance]:
        """Boot more instance machines (tn-web-N at ``instance_ip(N)``) in the running lab.

        For instances launched after the lab was built (an Auto Scaling burst). They are lab
        names, so ``cleanup()`` removes them with the rest, also after a failure.
        """
        taken = {i.name for i in self.instances}
        added = []
        for n in numbers:
            inst = Instance(f"web-{n}", f"{PREFIX}web-{n}", instance_ip(n))
            if inst.name in taken:
                raise LabError(f"{inst.name} already exists in the lab")
            # Appended first: a failure half-way still leaves it known to the lab.
            self.instances.append(inst)
            self._new_machine(inst.ns)
            self._wire_instance(inst)
            added.append(inst)
        return added

    def _make_machine(self, ns: str) -> None:
        """Pin a mount namespace for ``ns`` whose /etc is a private overlay of the host's."""
        root = MACHINES / ns
        for sub in ("etc", "work", "lock"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        pin = mount_ns_path(ns)
        pin.touch()
        setup = (
            "set -e; "
            # sysfs mounted from inside the netns shows its interfaces (as ip netns exec does).
            "umount -l /sys && mount -t sysfs tn-sys /sys; "
            "mount -t overlay tn-etc "
            f"-o lowerdir=/etc,upperdir={root}/etc,workdir={root}/work /etc; "
            "if [ -d /run/systemd ]; then mount -t tmpfs tn-nosystemd /run/systemd; fi; "
            # Each machine its own /var/log (charon's log: ConfigureTunnel's CharonLog), gone
            # with the machine; never the host's.
            "mount -t tmpfs tn-log /var/log; "
            f"if [ -d /run/lock ]; then mount --bind {root}/lock /run/lock; fi"
        )
        # unshare runs in the host's mount namespace so the pin (a bind mount of the new
        # namespace) lands there; slave propagation: nothing mounted inside reaches the host.
        sh(
            [
                "unshare",
                f"--mount={pin}",
                "--propagation",
                "slave",
                "nsenter",
                f"--net=/run/netns/{ns}",
                "bash",
                "-c",
                setup,
            ]
        )

    def write_etc(self, ns: str, relpath: str, text: str, mode: int = 0o644) -> None:
        """Write a file into machine ``ns``'s /etc (through its mount namespace)."""
        target = f"/etc/{relpath}"
        sh(
            machine_argv(
                ns,
                [
                    "bash",
                    "-c",
                    f'mkdir -p "$(dirname {target})" && cat > {target} && chmod {mode:o} {target}',
                ],
            ),
            input=text,
        )

    # -- strongSwan ---------------------------------------------------------------------------
    @staticmethod
    def vici(ns: str) -> str:
        return f"unix://{RUN}/{ns}.vici"

    def _strongswan_conf(self, ns: str) -> str:
        # What this machine's strongSwan package would ship, plus the lab's facts: the kernel
        # has no ESP (kernel-libipsec), and each daemon needs its own sockets (LAB-NOTES).
        return f"""\
include /etc/strongswan.d/*.conf
charon-systemd {{
  load_modular = yes
  plugins {{
    include /etc/strongswan.d/charon/*.conf
    kernel-libipsec {{
      load = yes
    }}
    # Would relay multicast/broadcast into the tunnel; noise in the lab.
    forecast {{
      load = no
    }}
    vici {{
      socket = {self.vici(ns)}
    }}
    lookip {{
      socket = unix://{RUN}/{ns}.lkp
    }}
    error-notify {{
      socket = unix://{RUN}/{ns}.enfy
    }}
  }}
  filelog {{
    lab {{
      path = {LOGS}/{ns}-charon.log
      time_format = %H:%M:%S
      default = 1
      ike = 1
    }}
  }}
}}
swanctl {{
  socket = {self.vici(ns)}
}}
"""

    def _configure_partner(self) -> None:
        self.write_etc("tn-pvpn", "strongswan.conf", self._strongswan_conf("tn-pvpn"))
        self.write_etc("tn-gw", "strongswan.conf", self._strongswan_conf("tn-gw"))
        self.write_partner(self.partner)

    def write_partner(self, profile: str, **lifetimes: int) -> None:
        """The third party's side, configured by hand as they would (lab/partners.py)."""
        conf = partners.render(
            partners.PROFILES[profile],
            psk=self.psk,
            endpoint=PARTNER_ENDPOINT,
            gateway=GW_PUBLIC,
            partner_net=PARTNER_NET,
            our_selectors=[f"{s}/32" for s in (*POOL, SHARED)],
            tunnel=TUNNEL,
            **lifetimes,
        )
        self.write_etc("tn-pvpn", "swanctl/conf.d/tunnelnat.conf", conf, mode=0o600)

    def reconfigure_partner(self, profile: str, *, start: bool = True, **lifetimes: int) -> None:
        """Give the partner another profile: its daemon restarted from scratch (no SA left), or
        left stopped (``start=False``: a partner that is down)."""
        self.stop_partner_charon()
        self.write_partner(profile, **lifetimes)
        if start:
            self.start_partner_charon()

    def stop_partner_charon(self) -> None:
        """kill -9 the partner's IKE daemon (its SAs vanish without a word to us)."""
        for name, proc in list(self._procs):
            if name == "tn-pvpn-charon":
                proc.kill()
                proc.wait()
                self._procs.remove((name, proc))

    def start_partner_charon(self) -> None:
        self._start_charon("tn-pvpn")
        in_ns("tn-pvpn", ["swanctl", "--load-all", "--noprompt"])

    def _start_charon(self, ns: str) -> None:
        self.spawn(f"{ns}-charon", ns, ["charon-systemd"])
        deadline = time.monotonic() + 15
        while True:
            # The socket file outlives a killed daemon: ask it, don't stat it (LAB-NOTES).
            if sh(machine_argv(ns, ["swanctl", "--stats"]), check=False).returncode == 0:
                return
            if time.monotonic() > deadline:
                raise LabError(f"charon in {ns} did not answer; see {LOGS}/{ns}-charon.log")
            time.sleep(0.05)

    def kill_gateway_charon(self, ns: str = "tn-gw") -> None:
        """kill -9 the gateway's IKE daemon (a crash: no orderly SA deletion)."""
        for name, proc in list(self._procs):
            if name == f"{ns}-charon":
                proc.kill()
                proc.wait()
                self._procs.remove((name, proc))
        # RestartTunnel may have started one itself (detached, so not ours to wait for).
        pids = sh(["ip", "netns", "pids", ns], check=False).stdout.split()
        for pid in pids:
            with contextlib.suppress(OSError, ValueError):
                if Path(f"/proc/{pid}/comm").read_text().strip() == "charon-systemd":
                    os.kill(int(pid), signal.SIGKILL)

    def start_gateway_charon(self, ns: str = "tn-gw") -> None:
        """Start the gateway's charon as its strongswan.service would, config loaded after."""
        self._start_charon(ns)
        # The unit's ExecStartPost: the daemon itself remembers nothing of the configuration.
        in_ns(ns, ["swanctl", "--load-all", "--noprompt"])

    # -- the gateway's boot (gateway/systemd/ units, lab.gateway_boot) -------------------------
    def install_gateway_boot(self, ns: str = "tn-gw", instance_id: str = "") -> None:
        """What the gateway's user data does (stacks/gateway.py): the gateway software installed
        by the installer from the deployed package, the boot configuration, the units; its IMDS;
        the ENI's link gets the MAC moto reports."""
        if self.has_link(ns, ENI_LINK):
            sh(["ip", "-n", ns, "link", "set", ENI_LINK, "address", self.aws.eni_mac])
        self.install_software(ns)
        self._write_boot_files(ns)
        py = str(REPO / ".venv" / "bin" / "python")
        argv = [py, "-m", "lab.imds", "--port", str(IMDS_NS_PORT)]
        name = "imds-gw" if ns == "tn-gw" else f"imds-{ns.removeprefix(PREFIX)}"
        IMDS_STATE.mkdir(parents=True, exist_ok=True)
        argv += ["--lifecycle-file", str(IMDS_STATE / f"{ns}.lifecycle")]
        self.spawn(name, ns, [*argv, "--instance-id", instance_id or self.aws.gateway_id])
        self.wait_listening(ns, IMDS_NS_PORT)

    def set_target_lifecycle_state(self, ns: str, state: str) -> None:
        """What Auto Scaling sets in machine ``ns``'s IMDS (``InService``, ``Terminated``, ...)."""
        IMDS_STATE.mkdir(parents=True, exist_ok=True)
        path = IMDS_STATE / f"{ns}.lifecycle"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(state + "\n")
        tmp.replace(path)  # the IMDS reads it whole or not at all

    def _write_boot_files(self, ns: str) -> None:
        # No partner route in the lab: E sits on the gateway's public link itself (on AWS the
        # Internet gateway maps G to E, so IKE must leave from G; docs/stack.md).
        config: dict[str, Any] = {
            "region": REGION,
            "eni_id": self.aws.eni_id,
            "gateway": f"{GW_ENI}/24",
        }
        if self.standby_id:
            config["pair"] = True  # a standby finds the ENI held and boots as the standby
        self.write_etc(ns, "tunnelnat/boot.json", json.dumps(config, indent=1) + "\n")
        for unit in GATEWAY_UNITS:
            text = _unit_text(unit)
            self.write_etc(ns, f"systemd/system/{unit}", text)

    def boot_gateway(self, ns: str = "tn-gw") -> Any:
        """Run the gateway's boot units in their order (``lab.gateway_boot.GatewayBoot``)."""

        def run(argv: Sequence[str], env: Mapping[str, str] | None = None) -> Any:
            return subprocess.run(
                machine_argv(ns, argv),
                capture_output=True,
                text=True,
                timeout=180,
                env=dict(env) if env is not None else None,
                check=False,
            )

        boot = GatewayBoot(
            run_on_machine=run,
            read_file=lambda path: read_machine_file(run, path),
            path_exists=lambda path: run(["test", "-e", path]).returncode == 0,
            milestones={
                "systemd-sysctl.service": lambda: self._gateway_sysctl(ns),
                "network-pre.target": lambda: None,
                "network-online.target": lambda: self._gateway_network_up(ns),
                "strongswan.service": lambda: self.start_gateway_charon(ns),
            },
            env={**self.gateway_env(ns), "TUNNELNAT_IMDS_URL": f"http://127.0.0.1:{IMDS_NS_PORT}"},
            unit_names=GATEWAY_UNITS,
        )
        boot.run()
        return boot

    def power_off_gateway(self, ns: str = "tn-gw") -> None:
        """What a reboot takes from gateway ``ns``, short of its disk (/etc stays): the IKE
        daemon, the ruleset, forwarding (a fresh kernel's default), the links and the addresses
        the boot adds (G on the ENI, ours on lo). The ENI stays attached, as through a reboot on
        AWS. In a pair the ENI's and E's links may be elsewhere (or move meanwhile: the mirror)."""
        # Links and forwarding first: a machine that is off forwards nothing, so the lab's
        # power-off must not open a window between flushing the ruleset and going quiet.
        for link in ("eth0", ENI_LINK, "eth1"):
            in_ns(ns, ["ip", "link", "set", link, "down"], check=link == "eth0")
        in_ns(ns, ["sysctl", "-qw", "net.ipv4.ip_forward=0"])
        self.kill_gateway_charon(ns)
        in_ns(ns, ["nft", "flush", "ruleset"])
        in_ns(ns, ["ip", "-4", "addr", "flush", "dev", ENI_LINK], check=False)
        for line in in_ns(ns, ["ip", "-4", "-o", "addr", "show", "dev", "lo"]).splitlines():
            address = line.split()[3]
            if address != "127.0.0.1/8":
                in_ns(ns, ["ip", "addr", "del", address, "dev", "lo"])

    def stop_spawned(self, name: str) -> bool:
        """Kill the process the lab spawned as ``name`` (a machine's daemon, as a reboot does);
        whether one ran."""
        found = False
        for n, proc in list(self._procs):
            if n == name and proc.poll() is None:
                stop_group(proc, signal.SIGKILL)
                found = True
        self._procs = [(n, p) for n, p in self._procs if not (n == name and p.poll() is not None)]
        return found

    # -- the gateway pair (issue 15) ------------------------------------------------------------
    def add_standby_gateway(self, *, agents: bool = True) -> str:
        """The second gateway, tn-gw2, next to the running lab, as the pair's Auto Scaling group
        launches it: tagged as the stack tags gateways, its own IMDS, its boot units (the ENI is
        held: it boots as the standby), its own charon, configured by the same documents the
        first gateway gets, its NAT table synced from DynamoDB. Then the ENI mirror (EC2's
        hypervisor) and, with ``agents``, both gateways' pair agents. Returns its instance ID."""
        if self.standby_id:
            return self.standby_id
        started = time.monotonic()
        self.build_standby_machine()
        boot = self.boot_gateway(STANDBY_NS)
        self.standby_boot = boot
        failed = [r for r in boot.runs if r.state not in ("done", "skipped")]
        if failed:
            raise LabError(f"the standby's boot failed: {failed}")
        self.timings["standby_boot"] = sum(r.seconds for r in boot.runs)
        for result in self.configure_standby():
            if not result.ok:
                raise LabError(
                    f"{result.document} on the standby: {result.status}: {result.stderr[-800:]}"
                )
        if agents:
            self.start_pair_agents()
        self.timings["standby"] = time.monotonic() - started
        return self.standby_id

    def build_standby_machine(self) -> None:
        """tn-gw2 on the VPC bridge, in moto, with its IMDS, moto bridge and boot files; the
        ENI mirror running. Not booted (``add_standby_gateway`` does the rest)."""
        ns = STANDBY_NS
        self._new_machine(ns)
        self._on_bridge(ns, "p-gw2")
        sh(["ip", "-n", ns, "addr", "add", f"{STANDBY_PRIMARY}/24", "dev", "eth0"])
        self.write_etc(ns, "strongswan.conf", self._strongswan_conf(ns))
        self.standby_id = self.aws.add_gateway(STANDBY_PRIMARY)
        self.gateways[self.standby_id] = ns
        self.commands.namespaces[self.standby_id] = ns
        self.commands.other_gateways.add(self.standby_id)
        self.commands.gateway_envs[self.standby_id] = self.gateway_env(ns)
        # The pair's heartbeat key and the gateway group with its termination hook, as the
        # stack creates them (the group holds both gateways: SetInstanceHealth and the hook's
        # CompleteLifecycleAction name it).
        self.aws.seed_pair(self.psk_for_heartbeats, [self.aws.gateway_id, self.standby_id])
        self._bridge_moto(ns)
        self._write_boot_files("tn-gw")  # the pair's user data: both in pair mode
        self.install_gateway_boot(ns, self.standby_id)
        self.eni_mirror = EniMirror(
            ec2=self.aws.client("ec2"),
            eni_id=self.aws.eni_id,
            namespaces=self.gateways,  # live: machines a rolling replacement adds are seen
            location=self.eni_holder_ns() or "tn-gw",
            eni_link=ENI_LINK,
            public_link=PUBLIC_LINK,
            public_address=f"{GW_PUBLIC}/28",
            public_router=INET_GW_SIDE,
        )
        self.eni_mirror.sync()
        self.eni_mirror.start()

    def gateway_namespaces(self) -> dict[str, str]:
        """Instance ID -> machine, for both gateways (the pair) or the one."""
        return dict(self.gateways)

    def launch_gateway(self, ns: str) -> tuple[str, Any]:
        """A new gateway of the pair (as the group launches a replacement): machine ``ns`` (one
        of REPLACEMENT_MACHINES) on the VPC bridge, in moto and the gateway group, booted through
        its units, given the associations' documents and SyncNatTable, its pair agent started.
        Returns (its instance ID, its GatewayBoot)."""
        primary = REPLACEMENT_MACHINES[ns]
        self._new_machine(ns)
        self._on_bridge(ns, f"p-{ns.removeprefix(PREFIX)}")
        sh(["ip", "-n", ns, "addr", "add", f"{primary}/24", "dev", "eth0"])
        self.write_etc(ns, "strongswan.conf", self._strongswan_conf(ns))
        instance_id = self.aws.add_gateway(primary)
        self.gateway_primary[ns] = primary
        self.gateways[instance_id] = ns
        self.commands.namespaces[instance_id] = ns
        self.commands.other_gateways.add(instance_id)
        self.commands.gateway_envs[instance_id] = self.gateway_env(ns)
        self.aws.join_gateway_group([instance_id])
        self._bridge_moto(ns)
        self.install_gateway_boot(ns, instance_id)
        boot = self.boot_gateway(ns)
        failed = [r for r in boot.runs if r.state not in ("done", "skipped")]
        if failed:
            raise LabError(f"{ns}'s boot failed: {failed}")
        for result in self.configure_gateway_machine(instance_id):
            if not result.ok:
                raise LabError(
                    f"{result.document} on {ns}: {result.status}: {result.stderr[-800:]}"
                )
        self.start_pair_agent(ns)
        return instance_id, boot

    def retire_gateway(self, ns: str) -> str:
        """Auto Scaling's termination of gateway ``ns`` once its lifecycle action is over: the
        machine powered off and removed, the instance terminated in EC2. Returns its ID."""
        instance_id = next(i for i, n in self.gateways.items() if n == ns)
        self.power_off(ns)
        # Whatever EC2 still had attached there goes back to the hypervisor, never away with
        # the namespace (E's and G's links are veths the lab keeps).
        moving = [link for link in (ENI_LINK, PUBLIC_LINK) if self.has_link(ns, link)]
        if moving:
            run_ip_batch(ns, [f"link set dev {link} netns {PARKING_NS}" for link in moving])
            if self.eni_mirror is not None and self.eni_mirror.location == ns:
                self.eni_mirror.location = PARKING_NS
        del self.gateways[instance_id]
        self.commands.namespaces.pop(instance_id, None)
        pids = {int(p) for p in sh(["ip", "netns", "pids", ns], check=False).stdout.split()}
        self.frozen -= pids
        _kill_pids(pids)
        prefix = f"{ns.removeprefix(PREFIX)}"
        self._procs = [(n, p) for n, p in self._procs if p.poll() is None or not n.endswith(prefix)]
        # Out of the group first, its desired capacity with it: moto's group would otherwise
        # launch an instance of its own for the one gone (a phantom peer with no machine); the
        # lab launches the replacement itself (launch_gateway).
        self.aws.leave_gateway_group(instance_id)
        self.aws.client("ec2").terminate_instances(InstanceIds=[instance_id])
        sh(["umount", "-l", str(mount_ns_path(ns))], check=False)
        sh(["ip", "netns", "del", ns])
        return instance_id

    def gateway_primaries(self) -> dict[str, str]:
        """Gateway machine -> its primary address, for the pair's machines now."""
        return {ns: self.gateway_primary[ns] for ns in self.gateway_namespaces().values()}

    def eni_holder(self) -> str | None:
        """The instance G's ENI is attached to, as EC2 (moto) says: the active gateway."""
        reply = self.aws.client("ec2").describe_network_interfaces(
            NetworkInterfaceIds=[self.aws.eni_id]
        )
        attachment = reply["NetworkInterfaces"][0].get("Attachment") or {}
        return attachment.get("InstanceId")

    def eni_holder_ns(self) -> str | None:
        holder = self.eni_holder()
        return self.gateway_namespaces().get(holder) if holder else None

    def configure_standby(self) -> list[Any]:
        """The stack's associations on the standby (ConfigureGateway, ConfigureTunnel,
        InstallHealthAgent, the same parameters as the first gateway's), then SyncNatTable as
        the controller sends it to every running gateway. Returns their CommandResults."""
        return self.configure_gateway_machine(self.standby_id)

    def configure_gateway_machine(self, instance_id: str) -> list[Any]:
        """``configure_standby`` for any gateway of the pair (a replacement too)."""
        params = self.configure_gateway_parameters()
        results = []
        for document in ("ConfigureGateway", "ConfigureTunnel"):
            declared = load_document(REPO / "ssm_documents" / f"{document}.yaml")["parameters"]
            own = {k: v for k, v in params.items() if k in declared}
            results.append(self.commands.run(instance_id, document, own))
            if not results[-1].ok:
                return results
        health = self.health_agent_parameters()
        results.append(self.commands.run(instance_id, "InstallHealthAgent", health))
        params = {"TableName": TABLE, "Region": REGION}
        results.append(self.commands.run(instance_id, "SyncNatTable", params))
        return results

    def sync_standby(self) -> Any:
        """SyncNatTable on the standby (its table from DynamoDB, as the active's)."""
        params = {"TableName": TABLE, "Region": REGION}
        return self.commands.run(self.standby_id, "SyncNatTable", params)

    def pair_config(self) -> dict[str, Any]:
        """pair.json for the lab's gateways (PAIR.md): fast heartbeats on the VPC bridge."""
        return {
            "region": REGION,
            "eni_id": self.aws.eni_id,
            "gateway": f"{GW_ENI}/24",
            "deployment": DEPLOYMENT,
            "table": TABLE,
            "heartbeat_port": HEARTBEAT_PORT,
            "interval_seconds": 0.5,
            "misses": 4,
            # An ENI attached less than this ago is not taken (no flapping). The lab's test
            # powers the active off seconds after the build attached the ENI: 10 s, not the
            # default 60, so it needs no minute's wait. The failover time does not depend on it.
            "hold_down_seconds": 10,
            "tunnel": TUNNEL,
            "children": [TUNNEL],
            "namespace": "tunnelnat",
            # The lab's /run is shared by its machines (docs/parity.md): each its own file.
            "role_file": ROLE_FILE,
            # Issue 20: the heartbeat key (cached on the machine's own /etc), the gateway
            # group's termination hook (the agent hands G over before it goes), the rolling
            # update's signal and the switchover request file. No group_name: the agent reads
            # its aws:autoscaling:groupName tag, as on AWS.
            "key_secret": PAIR_KEY_SECRET,
            "key_file": KEY_FILE,
            "lifecycle_hook": GATEWAY_TERMINATE_HOOK,
            "signal_stack": SIGNAL_STACK,
            "signal_resource": SIGNAL_RESOURCE,
            "request_file": REQUEST_FILE,
            # No partner_endpoint/subnet_router: E sits on the moved link itself (no route to T
            # from G, as the lab's boot.json).
        }

    def start_pair_agents(self) -> None:
        """Both gateways' pair agents, as their tunnelnat-pair.service runs them."""
        for ns in self.gateway_namespaces().values():
            self.start_pair_agent(ns)

    def start_pair_agent(self, ns: str) -> subprocess.Popen:
        """Machine ``ns``'s pair agent, as its tunnelnat-pair.service runs it (after a reboot
        too: the unit starts it again): the pair's user data writes pair.json and the unit, the
        lab runs the unit's ExecStart (the installed package's ``pair run``)."""
        program = (GATEWAY_DIR / "tunnelnat_gateway" / "pair.py").read_text()
        config = json.dumps(agent_config(self.pair_config(), program), indent=1) + "\n"
        self.write_etc(ns, "tunnelnat/pair.json", config)
        unit_text = _unit_text(PAIR_UNIT)
        self.write_etc(ns, f"systemd/system/{PAIR_UNIT}", unit_text)
        (argv,) = parse_unit(PAIR_UNIT, unit_text).execs
        env = {**self.gateway_env(ns), "TUNNELNAT_IMDS_URL": f"http://127.0.0.1:{IMDS_NS_PORT}"}
        self.agent_started[ns] = time.time()
        name = f"pair-{ns.removeprefix(PREFIX)}"
        return self.spawn(name, ns, list(argv), env=env, pythonpath=False)

    def restart_pair_agent(self, ns: str) -> bool:
        """systemd's ``try-restart`` of machine ``ns``'s tunnelnat-pair.service: a running agent
        stopped as systemd stops a unit (TERM to its group, KILL after 5 s) and started again
        from the unit; nothing when none runs. Whether it restarted one."""
        name = f"pair-{ns.removeprefix(PREFIX)}"
        running = [proc for n, proc in self._procs if n == name and proc.poll() is None]
        if not running:
            return False
        for proc in running:
            stop_group(proc, signal.SIGTERM, wait=5)
        self._procs = [(n, p) for n, p in self._procs if not (n == name and p.poll() is not None)]
        self.start_pair_agent(ns)
        return True

    def power_off(self, ns: str) -> float:
        """Pull the plug on machine ``ns``: every link down, every process in it stopped
        (SIGSTOP: frozen mid-step, nothing orderly). Returns when it started (time.time()).
        ``thaw()`` (and the lab's cleanup) let them go again to be killed."""
        at = time.time()
        for attempt in range(3):
            links = json.loads(sh(["ip", "-n", ns, "-j", "link", "show"]).stdout or "[]")
            try:
                run_ip_batch(ns, [f"link set dev {link['ifname']} down" for link in links])
                break
            except RuntimeError as exc:
                # The ENI mirror moved a link away between the listing and the batch (a
                # handover just ended): the links still here, listed again.
                if "Cannot find device" not in str(exc) or attempt == 2:
                    raise
        # Twice: a process forked while the first round ran is caught by the second.
        for _ in range(2):
            for pid in sh(["ip", "netns", "pids", ns], check=False).stdout.split():
                with contextlib.suppress(OSError, ValueError):
                    # The lab's own `ip -n` calls reach in for milliseconds; they are not the
                    # machine's (the ENI mirror's move must not freeze with it).
                    if Path(f"/proc/{pid}/comm").read_text().strip() == "ip":
                        continue
                    os.kill(int(pid), signal.SIGSTOP)
                    self.frozen.add(int(pid))
        return at

    def thaw(self) -> None:
        """SIGCONT to every process a power-off stopped (before the cleanup kills them)."""
        for pid in sorted(self.frozen):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self.frozen.clear()

    def _gateway_sysctl(self, ns: str = "tn-gw") -> None:
        proc = sh(machine_argv(ns, ["cat", "/etc/sysctl.d/90-tunnelnat.conf"]), check=False)
        for setting in net_sysctls(proc.stdout if proc.returncode == 0 else ""):
            in_ns(ns, ["sysctl", "-qw", setting])

    def _gateway_network_up(self, ns: str = "tn-gw") -> None:
        # networkd's part on AWS: the primary interfaces and the default route. In a pair, the
        # public link (E's) is only on the machine holding the ENI (lab.eni_mirror).
        in_ns(ns, ["ip", "link", "set", "eth0", "up"])
        if self.has_link(ns, PUBLIC_LINK):
            in_ns(ns, ["ip", "link", "set", PUBLIC_LINK, "up"])
            in_ns(ns, ["ip", "route", "replace", "default", "via", INET_GW_SIDE])
        self._gateway_vpc_route(ns)

    @staticmethod
    def has_link(ns: str, link: str) -> bool:
        return sh(["ip", "-n", ns, "link", "show", "dev", link], check=False).returncode == 0

    # -- processes ----------------------------------------------------------------------------
    def spawn(
        self,
        name: str,
        ns: str | None,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        *,
        pythonpath: bool = True,
    ) -> subprocess.Popen:
        """Start ``argv`` on machine ``ns`` (the host: None), logged under LOGS. ``pythonpath``:
        the repository's modules importable (the lab's own programs); a gateway's program runs
        from its installed package alone."""
        log = (LOGS / f"{name}.log").open("ab")
        full = machine_argv(ns, argv) if ns else list(argv)
        path = {"PYTHONPATH": f"{REPO}:{REPO / 'lambdas'}"} if pythonpath else {}
        env = {**default_env(), **path, **(env or {})}
        proc = subprocess.Popen(
            full,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=REPO,
            start_new_session=True,
        )
        log.close()
        self._procs.append((name, proc))
        (PIDS / f"{name}.pid").write_text(str(proc.pid))
        return proc

    def spawned(self, name: str) -> bool:
        """Whether the lab runs a process it spawned as ``name``."""
        return any(n == name and proc.poll() is None for n, proc in self._procs)

    def _start_servers(self) -> None:
        py = str(REPO / ".venv" / "bin" / "python")
        server = [py, "-m", "lab.app_server"]
        app_argv = [*server, "--name", "app", "--port", str(APP_PORT), "--log", str(self.app_log)]
        self.spawn("app", "tn-app", app_argv)
        for inst in self.instances[: self.listeners]:
            log = LOGS / f"{inst.name}-listener.log"
            argv = [*server, "--name", inst.name, "--port", str(INSTANCE_PORT), "--log", str(log)]
            self.spawn(f"{inst.name}-listener", inst.ns, argv)
        for ns, port in [("tn-app", APP_PORT)] + [
            (i.ns, INSTANCE_PORT) for i in self.instances[: self.listeners]
        ]:
            self.wait_listening(ns, port)

    def wait_listening(self, ns: str, port: int, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = sh(["ip", "netns", "exec", ns, "ss", "-Hltn", f"sport = :{port}"]).stdout
            if out.strip():
                return
            time.sleep(0.05)
        raise LabError(f"nothing listens on port {port} in {ns}")

    @property
    def app_log(self) -> Path:
        return LOGS / "app-peers.log"

    def listener_log(self, name: str) -> Path:
        return LOGS / f"{name}-listener.log"

    # -- AWS (moto) ---------------------------------------------------------------------------
    def start_moto(self) -> None:
        from tools.moto_server import SerialMotoServer

        server = SerialMotoServer()
        server.start()
        self._moto = server
        host, port = server.get_host_and_port()
        self.moto_endpoint = f"http://{host}:{port}"
        # moto's backends are per process, not per server: start from an empty AWS.
        self.reset_moto()
        # The gateway's scripts reach moto through a unix socket: a file crosses namespaces,
        # no address or route is added anywhere, and the traffic stays on loopback.
        sock = RUN / "moto.sock"
        listen_unix = f"UNIX-LISTEN:{sock},fork,mode=600"
        self.spawn("moto-bridge-root", None, ["socat", listen_unix, f"TCP:127.0.0.1:{port}"])
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        self._bridge_moto("tn-gw")

    def _bridge_moto(self, ns: str) -> None:
        """moto on ``ns``'s own loopback, port MOTO_NS_PORT, through the root bridge's socket."""
        sock = RUN / "moto.sock"
        listen_tcp = f"TCP-LISTEN:{MOTO_NS_PORT},bind=127.0.0.1,fork,reuseaddr"
        name = "moto-bridge-gw" if ns == "tn-gw" else f"moto-bridge-{ns.removeprefix(PREFIX)}"
        self.spawn(name, ns, ["socat", listen_tcp, f"UNIX-CONNECT:{sock}"])
        self.wait_listening(ns, MOTO_NS_PORT)

    def _seed_aws(self) -> None:
        self.aws = LabAws(self.moto_endpoint)
        self.aws.seed(self.instances, self.private_instances, self.psk)
        create_group(self.aws)
        self.gateways[self.aws.gateway_id] = "tn-gw"
        namespaces = {i.instance_id: i.ns for i in self.instances}
        namespaces[self.aws.gateway_id] = "tn-gw"
        self.commands = LabCommands(namespaces, self.aws.gateway_id, self.gateway_env("tn-gw"))
        self.publish_software()

    def publish_software(self, root: Path = REPO) -> Any:
        """Build the gateway software from ``root`` (the repository: what the stack ships), put
        it in the lab's asset bucket, point the deployment's SSM parameter at it and bind every
        document the lab runs from now on to it. Returns the lab.package.LabPackage."""
        started = time.monotonic()
        self.software = publish(
            self.aws.client,
            deployment=DEPLOYMENT,
            region=REGION,
            out_dir=RUN / "package",
            root=root,
        )
        self.commands.binding = self.software.binding()
        self.timings["package"] = self.timings.get("package", 0.0) + time.monotonic() - started
        return self.software

    def install_software(self, ns: str) -> dict[str, Any]:
        """What the gateway's user data does first (stacks/gateway.py): write the installer to
        /etc/tunnelnat/lib and run it, with the machine's own AWS credentials, to install the
        deployed package (the SSM parameter's) and make it the current one. Its JSON line."""
        self.write_etc(ns, INSTALLER.removeprefix("/etc/"), INSTALLER_SOURCE.read_text(), 0o755)
        self.write_etc(ns, MARKER.removeprefix("/etc/"), MARKER_SOURCE.read_text(), 0o755)
        proc = subprocess.run(
            machine_argv(ns, installer_argv(self.software)),
            capture_output=True,
            text=True,
            timeout=120,
            env={**default_env(), **self.gateway_env(ns)},
            check=False,
        )
        if proc.returncode != 0:
            raise LabError(f"installing the gateway software on {ns}: {proc.stderr.strip()[-800:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def configure_gateway_parameters(self, **overrides: str) -> dict[str, str]:
        """ConfigureGateway's and ConfigureTunnel's parameters for the lab, together (dedicated
        pool plus the shared address); each document is given those it declares."""
        return {
            "PartnerEndpoint": PARTNER_ENDPOINT,
            "PartnerNetworks": PARTNER_NET,
            "PublicAddresses": ",".join([*POOL, SHARED]),
            "LocalId": GW_PUBLIC,
            "PskSecretName": PSK_SECRET,
            "IpsecBackend": "libipsec",
            "NatMode": "dedicated",
            "TunnelName": TUNNEL,
            "TableName": TABLE,
            "Region": REGION,
            "CharonLog": CHARON_LOG,  # on the machine's own /var/log, not the host's
            # A pair: IKE leaves only from the address on the moved link (on AWS G, the Internet
            # gateway maps it to E; in the lab E itself sits on that link). The standby, without
            # it, never initiates from its own address.
            **({"LocalAddress": GW_PUBLIC} if self.standby_id else {}),
            **overrides,
        }

    def health_agent_parameters(self, **overrides: str) -> dict[str, str]:
        """InstallHealthAgent's parameters for the lab: this deployment's series, the probe from
        the shared address (on lo, inside the tunnel's selectors, mapped to no instance) to A."""
        return {
            "TunnelName": TUNNEL,
            "Region": REGION,
            "Deployment": DEPLOYMENT,
            "HealthInterval": "10",
            "ProbeTarget": f"{APP}:{APP_PORT}",
            "ProbeSource": SHARED,
            "PartnerNetworks": PARTNER_NET,
            "PublicAddresses": ",".join([*POOL, SHARED]),
            **overrides,
        }

    def configure_gateway(self, **overrides: str) -> Any:
        """Run the real ConfigureGateway (NAT, guard, forwarding), then the real ConfigureTunnel
        (strongSwan, the PSK), then the real InstallHealthAgent: the stack's three associations
        (in AWS in no set order: docs/stack.md). Returns ConfigureTunnel's CommandResult (its
        JSON says whether the tunnel is up), or the first that failed; each is kept as
        ``gateway_configure``, ``tunnel_configure`` and ``health_install``."""
        params = self.configure_gateway_parameters(**overrides)
        results = []
        for document in ("ConfigureGateway", "ConfigureTunnel"):
            declared = load_document(REPO / "ssm_documents" / f"{document}.yaml")["parameters"]
            own = {k: v for k, v in params.items() if k in declared}
            results.append(self.commands.run(self.aws.gateway_id, document, own))
            if not results[-1].ok:
                return results[-1]
        self.gateway_configure, self.tunnel_configure = results
        self.health_install = self.install_health_agent()
        return self.tunnel_configure if self.health_install.ok else self.health_install

    def install_health_agent(self, **overrides: str) -> Any:
        """Run the real InstallHealthAgent document on the gateway; returns its CommandResult."""
        params = self.health_agent_parameters(**overrides)
        return self.commands.run(self.aws.gateway_id, "InstallHealthAgent", params)

    def reset_moto(self) -> None:
        url = f"{self.moto_endpoint}/moto-api/reset"  # always http://127.0.0.1:PORT
        request = urllib.request.Request(url, method="POST")  # noqa: S310
        with urllib.request.urlopen(request, timeout=10) as reply:  # noqa: S310 - loopback
            reply.read()

    def aws_env(self) -> dict[str, str]:
        """Environment for boto3 in this (root) namespace: moto, dummy credentials."""
        return {
            "AWS_ENDPOINT_URL": self.moto_endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",  # noqa: S105 - moto's dummy credentials
            "AWS_DEFAULT_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def gateway_env(self, ns: str = "tn-gw") -> dict[str, str]:
        """Environment for gateway ``ns``'s programs and document runs: moto through the
        bridge, with the machine's own access key id (``gateway_access_key``)."""
        return {
            **self.aws_env(),
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{MOTO_NS_PORT}",
            "AWS_ACCESS_KEY_ID": gateway_access_key(ns),
        }

    # -- observation helpers ------------------------------------------------------------------
    def instance(self, name: str) -> Instance:
        for inst in (*self.instances, *self.private_instances):
            if inst.name == name:
                return inst
        raise KeyError(name)

    def child_sas_installed(self, ns: str = "tn-gw", name: str = TUNNEL) -> int:
        """How many INSTALLED child SAs named ``name`` (rekeying briefly makes two)."""
        out = in_ns(ns, ["swanctl", "--list-sas"], check=False)
        pattern = re.compile(rf"^\s+{re.escape(name)}: #\d+, reqid \d+, INSTALLED", re.MULTILINE)
        return len(pattern.findall(out))

    def http(self, ns: str, url: str, timeout: float = 3) -> tuple[bool, str]:
        """GET ``url`` from machine ``ns``: (answered, body or curl's error)."""
        proc = sh(
            machine_argv(ns, ["curl", "-sS", "-m", str(timeout), url]),
            check=False,
            timeout=timeout + 10,
        )
        return proc.returncode == 0, (proc.stdout if proc.returncode == 0 else proc.stderr).strip()

    def app_peers(self) -> list[str]:
        """The peer addresses the partner's app server logged, oldest first."""
        if not self.app_log.exists():
            return []
        return [line.split()[1] for line in self.app_log.read_text().splitlines() if line]

    def nft_elements(self, kind: str, name: str, ns: str = "tn-gw") -> list[str]:
        """Elements of a set or map in the gateway's ``ip tunnelnat`` table, as text."""
        proc = sh(machine_argv(ns, ["nft", "list", kind, "ip", "tunnelnat", name]), check=False)
        if proc.returncode != 0:
            return []
        text = " ".join(proc.stdout.split())
        if "elements = {" not in text:
            return []
        inner = text.split("elements = {", 1)[1].split("}", 1)[0]
        return [e.strip() for e in inner.split(",") if e.strip()]

    def nft_counter(self, name: str, ns: str = "tn-gw") -> int:
        """Packets counted by a named counter of the gateway's table."""
        out = in_ns(ns, ["nft", "list", "counter", "ip", "tunnelnat", name], check=False)
        match = re.search(r"packets (\d+)", out)
        return int(match.group(1)) if match else 0

    def routes(self, ns: str) -> list[str]:
        return [" ".join(line.split()) for line in in_ns(ns, ["ip", "-4", "route"]).splitlines()]

    @contextlib.contextmanager
    def capture(self, ns: str, iface: str, bpf: str, *, epoch: bool = False) -> Iterator[list[str]]:
        """tcpdump on ``iface`` in ``ns`` while the block runs; the list fills with its lines
        (each starting with its time in seconds since the epoch when ``epoch``)."""
        pcap = LOGS / f"capture-{ns}-{iface}-{time.monotonic_ns()}.pcap"
        argv = ["tcpdump", "-i", iface, "-n", "--immediate-mode", "-U", "-w", str(pcap), bpf]
        proc = subprocess.Popen(
            machine_argv(ns, argv),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        lines: list[str] = []
        try:
            # tcpdump says "listening on" once its socket is open; packets before are lost.
            assert proc.stderr is not None
            ready = proc.stderr.readline()
            if ready.startswith("tcpdump: data link type"):  # -i any says this first
                ready = proc.stderr.readline()
            if "listening on" not in ready:
                raise LabError(f"tcpdump in {ns} did not start: {ready.strip()}")
            yield lines
            time.sleep(0.2)  # let the last packets reach the file
        finally:
            stop_group(proc, signal.SIGINT)
        if pcap.exists():
            read = ["tcpdump", "-r", str(pcap), "-n", *(["-tt"] if epoch else [])]
            out = sh(read, check=False).stdout
            lines.extend(out.splitlines())
            pcap.unlink()

    def ipsec_counters(self, ns: str = "tn-gw") -> dict[str, int]:
        """Packets and bytes through the gateway's child SAs (strongSwan's own counters)."""
        out = in_ns(ns, ["swanctl", "--list-sas", "--raw"], check=False)
        totals = {"packets-in": 0, "packets-out": 0, "bytes-in": 0, "bytes-out": 0}
        for key in totals:
            for part in out.split(f"{key}=")[1:]:
                with contextlib.suppress(ValueError):
                    totals[key] += int(part.split()[0])
        return totals


if __name__ == "__main__":
    # `python -m lab.topology cleanup` removes whatever a crashed run left behind.
    # `make lab-clean` runs it.
    if sys.argv[1:] == ["cleanup"]:
        try:
            with lab_lock(wait=0):
                found = lab_namespaces()
                cleanup()
        except LabError as exc:
            # Most likely a lab is running right now: its own exit removes it.
            print(f"lab: not cleaned up: {exc}", file=sys.stderr)
            sys.exit(1)
        print(f"lab: cleaned up ({', '.join(found) if found else 'no namespaces were left'})")
    else:
        print("usage: python -m lab.topology cleanup", file=sys.stderr)
        sys.exit(2)
