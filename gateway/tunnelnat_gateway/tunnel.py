"""The partner's tunnel on the gateway: the verbs of ConfigureTunnel and RestartTunnel.

    tunnelnat-gateway configure-tunnel --partner-endpoint T --partner-networks A,.. \\
        --public-addresses S,.. --local-id ID --psk-secret-name NAME --region R [...]
    tunnelnat-gateway restart-tunnel [--tunnel-name N] [--wait-seconds 20] [--quiet-seconds 120]

``configure-tunnel`` writes strongSwan's connection and charon's settings (rendered by
tunnelnat.core.swanctl), the PSK read from Secrets Manager (never printed, never an argument),
the addresses on lo that userspace ESP needs; a changed key or connection restarts the tunnel's
IKE SA at once, an unchanged one is left as it is. One run at a time (a lock, 240 s).
Several tunnels share a gateway (issue 23): each has its own files (conf.d/tunnelnat-NAME.conf,
conf.d/tunnelnat-NAME.secret.conf, its facts and lo addresses under /etc/tunnelnat/tunnels), so a
run for one never rewrites another's; charon's settings, which are global, are rendered from
every tunnel's record; only the named tunnel's SAs are ever terminated or initiated.
``restart-tunnel`` starts charon again if it is dead, leaves a healthy tunnel alone, otherwise
terminates the tunnel's IKE SA and initiates its CHILD_SAs, and reports whether it came back.

Each prints one JSON line on stdout, exits 0, or writes one line starting with its document's
name ("ConfigureTunnel: ", "RestartTunnel: ") on stderr and exits non-zero. The documents pass
their parameters, which SSM has matched against their allowedPatterns; every value is checked
again here, and reaches a program only as one argument of a list, never through a shell.
Standard library and the image's boto3 only.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tunnelnat.core import swanctl

CONFIGURE = "ConfigureTunnel"
RESTART = "RestartTunnel"
LOCK_FILE = "/run/lock/tunnelnat-configure-tunnel.lock"
LOCK_SECONDS = 240.0
STATE = "/etc/tunnelnat"
# Pinned CHILD_SA reqids (core/swanctl.py): tunnel k's child n has REQID_FLOOR + REQID_SPAN * k + n,
# far above charon's own (it counts up from 1), readable in --list-sas (1002003: tunnel 2, child 3).
REQID_FLOOR, REQID_SPAN = 1_000_000, 1_000
BOOT_CONFIG = "/etc/tunnelnat/boot.json"  # the boot program's: G, its subnet's router, first T
LOG_DIR = "/var/log/tunnelnat"
LIBIPSEC_CONF = "kernel-libipsec {\n    load = yes\n}\n"

# The documents' allowedPatterns, checked again (re.fullmatch: `$` would let a newline through).
_OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_IDENTITY = (
    r"@?[A-Za-z0-9]([A-Za-z0-9-]{0,62}\.)*[A-Za-z0-9-]{1,63}"
    r"|[A-Za-z0-9._+-]{1,64}@[A-Za-z0-9-]{1,63}(\.[A-Za-z0-9-]{1,63})+"
    r"|@#[0-9a-fA-F]{2,128}"
)
_PROPOSALS = r"[a-z0-9]{2,24}(-[a-z0-9]{2,24}){1,7}(,[a-z0-9]{2,24}(-[a-z0-9]{2,24}){1,7}){0,7}"
PATTERNS = {
    "LocalId": _IDENTITY,
    "RemoteId": f"|{_IDENTITY}",
    "PskSecretName": r"[A-Za-z0-9/_+=.@-]{1,512}",
    "TunnelName": r"[A-Za-z][A-Za-z0-9_-]{0,31}",
    "IkeProposals": _PROPOSALS,
    "EspProposals": _PROPOSALS,
    "IkeLifetimes": r"[0-9]{1,6},[0-9]{1,6},[0-9]{1,6}",
    "ChildLifetimes": r"[0-9]{1,6},[0-9]{1,6},[0-9]{1,6}",
    "Dpd": r"[0-9]{1,3},[0-9]{2,3}",
    "KeyingTries": r"[0-9]{1,3}",
    "CharonLog": r"/var/log/tunnelnat/[A-Za-z0-9_-]{1,64}\.log",
    "Region": r"[a-z]{2}(-[a-z]+)+-[0-9]",
    "WaitSeconds": r"([1-9]|[1-9][0-9]|1[01][0-9]|120)",
    "QuietSeconds": r"(0|[1-9][0-9]{0,2}|[1-2][0-9]{3}|3[0-5][0-9]{2}|3600)",
}
ADDRESS = re.compile(rf"({_OCTET}\.){{3}}{_OCTET}")
# How many entries the documents' patterns allow.
MAX_PARTNER_NETWORKS = 32
MAX_PUBLIC_ADDRESSES = 64


class Failed(Exception):  # noqa: N818 - what the document's fail() said: the message, no prefix
    def __init__(self, message: str, report: dict[str, object] | None = None) -> None:
        super().__init__(message)
        self.report = report  # the JSON line printed before the failure, if any


def fetch_secret(name: str, region: str) -> str:
    """The PSK, stripped. Errors name the secret, never its value."""
    try:
        import boto3  # here, not above: restart-tunnel never needs it

        client = boto3.client("secretsmanager", region_name=region)
        reply = client.get_secret_value(SecretId=name)
    except Exception as exc:  # any failure: say which secret, never its value
        raise Failed(f"cannot read secret {name}: {type(exc).__name__}: {exc}") from None
    text = reply.get("SecretString")
    if text is None:
        try:
            text = reply["SecretBinary"].decode()
        except UnicodeDecodeError:  # its message would quote the key's bytes
            raise Failed(f"secret {name} is not text") from None
    psk = text.strip()
    if len(psk) < 20:
        raise Failed(f"secret {name} is shorter than 20 characters")
    return psk


@dataclass
class Host:
    """The machine the verbs act on: its files (under ``root``; "/" on a gateway), its programs
    (found on PATH), its clock. Tests give a temporary root, PATH shims and a fake clock."""

    root: Path = Path("/")
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic
    secret: Callable[[str, str], str] = fetch_secret
    timeout: float = 120.0  # any one program; SSM's step timeout bounds the whole run
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))

    def path(self, absolute: str) -> Path:
        return self.root / absolute.lstrip("/")

    def which(self, program: str) -> str | None:
        return shutil.which(program, path=self.env.get("PATH"))

    def run(
        self, argv: Sequence[str], *, timeout: float | None = None, merge: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """``argv`` with its output captured (stderr into stdout with ``merge``); a missing
        program is exit 127, one that overran ``timeout`` exit 124, as a shell would say."""
        try:
            return subprocess.run(  # noqa: S603 - an argument list, never a shell
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT if merge else subprocess.PIPE,
                text=True,
                check=False,
                timeout=timeout or self.timeout,
                env=self.env,
            )
        except FileNotFoundError as exc:
            return subprocess.CompletedProcess(list(argv), 127, "", str(exc))
        except subprocess.TimeoutExpired:
            return subprocess.CompletedProcess(list(argv), 124, "", f"{argv[0]} timed out")

    def ok(self, argv: Sequence[str]) -> bool:
        return self.run(argv).returncode == 0

    def systemd(self) -> bool:
        """sd_booted(): systemd manages services only when it is PID 1 of this system."""
        try:
            comm = self.path("/proc/1/comm").read_text().strip()
        except OSError:
            return False
        return self.path("/run/systemd/system").is_dir() and comm == "systemd"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise Failed(message)


def _check(name: str, value: str) -> str:
    if not re.fullmatch(PATTERNS[name], value):
        raise Failed(f"{name} {value!r}: not a valid value")
    return value


def _address(name: str, value: str) -> str:
    if not ADDRESS.fullmatch(value):
        raise Failed(f"{name} {value!r}: not an IPv4 address")
    return value


def _networks(name: str, value: str, most: int, *, prefix: bool) -> str:
    items = value.split(",")
    if not 1 <= len(items) <= most:
        raise Failed(f"{name}: 1 to {most} entries")
    for item in items:
        address, slash, length = item.partition("/")
        if not ADDRESS.fullmatch(address) or (
            (slash or prefix) and not re.fullmatch(r"3[0-2]|[12]?[0-9]", length)
        ):
            raise Failed(f"{name} {item!r}: not an IPv4 {'network' if prefix else 'address'}")
    return value


def _charon_log(host: Host, path: str) -> str:
    """charon appends to CharonLog as root: a file directly in /var/log/tunnelnat, nothing else
    (no ``..``, no other directory, no symbolic link out of it), whatever the parameter's
    allowedPattern let through (issue 21, 2)."""
    shown = path if path.isprintable() else repr(path)  # one line on stderr, whatever it holds
    if ".." in path or not re.fullmatch(PATTERNS["CharonLog"], path):
        raise Failed(f"CharonLog {shown}: only {LOG_DIR}/NAME.log")
    if host.path(LOG_DIR).is_symlink() or host.path(path).is_symlink():
        raise Failed(f"CharonLog {shown}: {LOG_DIR} or the log is a symbolic link")
    return path


# -- ConfigureTunnel ------------------------------------------------------------------------------


def configure_parser() -> argparse.ArgumentParser:
    """The document's parameters as options; the defaults are the document's (a test keeps them
    equal)."""
    p = _Parser(prog="tunnelnat-gateway configure-tunnel", add_help=False)
    p.add_argument("--partner-endpoint", required=True)
    p.add_argument("--partner-networks", required=True)
    p.add_argument("--public-addresses", required=True)
    p.add_argument("--local-id", required=True)
    p.add_argument("--remote-id", default="")
    p.add_argument("--psk-secret-name", required=True)
    p.add_argument("--ipsec-backend", default="kernel", choices=("kernel", "libipsec"))
    p.add_argument("--tunnel-name", default="partner")
    p.add_argument("--ike-proposals", default="aes256-sha256-modp2048")
    p.add_argument("--esp-proposals", default="aes256-sha256-modp2048")
    p.add_argument("--ike-lifetimes", default="28260,540,540")
    p.add_argument("--child-lifetimes", default="3060,3600,540")
    p.add_argument("--dpd", default="10,30")
    p.add_argument("--selector-layout", default="single", choices=("single", "per-pair"))
    p.add_argument("--keying-tries", default="0")
    p.add_argument("--start-action", default="start", choices=("start", "none"))
    p.add_argument("--charon-log", default="/var/log/tunnelnat/charon.log")
    p.add_argument("--local-address", default="")
    p.add_argument("--region", required=True)
    # Not a document parameter yet (issue 23 wires partners later): IKEv2 unless told.
    p.add_argument("--ike-version", default="2", choices=("1", "2"))
    return p


def tunnel_from_args(host: Host, a: argparse.Namespace) -> swanctl.Tunnel:
    """Every value checked, then the tunnel as core/swanctl.py renders it (its own checks:
    overlaps, DPD and lifetime ranges, a dotted-quad ID that is an address)."""
    _charon_log(host, a.charon_log)
    for name, value in (
        ("TunnelName", a.tunnel_name),
        ("LocalId", a.local_id),
        ("RemoteId", a.remote_id),
        ("PskSecretName", a.psk_secret_name),
        ("IkeProposals", a.ike_proposals),
        ("EspProposals", a.esp_proposals),
        ("IkeLifetimes", a.ike_lifetimes),
        ("ChildLifetimes", a.child_lifetimes),
        ("Dpd", a.dpd),
        ("KeyingTries", a.keying_tries),
        ("Region", a.region),
    ):
        _check(name, value)
    _address("PartnerEndpoint", a.partner_endpoint)
    _networks("PartnerNetworks", a.partner_networks, MAX_PARTNER_NETWORKS, prefix=True)
    _networks("PublicAddresses", a.public_addresses, MAX_PUBLIC_ADDRESSES, prefix=False)
    if a.local_address:
        _address("LocalAddress", a.local_address)
    env = {
        "TN_PARTNER": a.partner_endpoint,
        "TN_NETS": a.partner_networks,
        "TN_PUBLIC": a.public_addresses,
        "TN_LOCAL_ID": a.local_id,
        "TN_REMOTE_ID": a.remote_id,
        "TN_IKE": a.ike_proposals,
        "TN_ESP": a.esp_proposals,
        "TN_IKE_LIFE": a.ike_lifetimes,
        "TN_CHILD_LIFE": a.child_lifetimes,
        "TN_DPD": a.dpd,
        "TN_LAYOUT": a.selector_layout,
        "TN_KEYINGTRIES": a.keying_tries,
        "TN_START": a.start_action,
        "TN_LOG": a.charon_log,
        "TN_LOCAL_ADDR": a.local_address,
        "TN_TUNNEL": a.tunnel_name,
        "TN_BACKEND": a.ipsec_backend,
        "TN_IKE_VERSION": a.ike_version,
    }
    try:
        return swanctl.from_environ(env)
    except (ValueError, KeyError) as exc:
        raise Failed(str(exc)) from None


def write_if_changed(path: Path, text: str, mode: int) -> bool:
    """``path`` holds ``text`` with ``mode`` afterwards; True when its content changed. Written
    beside itself and renamed: a reader (charon, the health agent) never sees half a file."""
    try:
        if path.read_text() == text:
            if path.stat().st_mode & 0o777 != mode:
                path.chmod(mode)
            return False
    except (FileNotFoundError, UnicodeDecodeError):
        pass
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)  # whatever the umask
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return True


def take_lock(host: Host, seconds: float = LOCK_SECONDS) -> int:
    """One run at a time: the association's and the PskRollout rule's runs queue here rather
    than interleave their loads, terminates and initiates. flock(2), as flock(1) takes it; the
    kernel drops it with the process."""
    lock = host.path(LOCK_FILE)
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_WRONLY | os.O_CREAT, 0o644)
    deadline = host.clock() + seconds
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if host.clock() >= deadline:
                os.close(fd)
                raise Failed(
                    f"another {CONFIGURE} run still holds the lock after {seconds:g}s"
                ) from None
            host.sleep(0.05)


def strongswan_dirs(host: Host) -> tuple[str, str]:
    """(strongSwan's etc, swanctl's directory): Debian/Ubuntu read /etc/swanctl; Fedora/RHEL/
    Amazon Linux /etc/strongswan/swanctl."""
    if host.path("/etc/strongswan/swanctl").is_dir():
        return "/etc/strongswan", "/etc/strongswan/swanctl"
    if host.path("/etc/swanctl").is_dir():
        return "/etc", "/etc/swanctl"
    raise Failed(
        "no swanctl configuration directory (/etc/swanctl or /etc/strongswan/swanctl): "
        "is strongSwan's swanctl installed?"
    )


def secret_conf(ids: str, psk: str, section: str = "ike-tunnelnat") -> str:
    """The key for the tunnel's two IKE IDs, as hex: no character of it can break the file's
    syntax. ``section``: its name in swanctl's secrets, unique per tunnel (sections of the same
    name in two files would merge, one key overwriting the other)."""
    local_id, remote_id = ids.split()
    return (
        f"secrets {{\n  {section} {{\n"
        f'    id-1 = "{local_id}"\n    id-2 = "{remote_id}"\n'
        f"    secret = 0x{psk.encode().hex()}\n  }}\n}}\n"
    )


# Before issue 23 one tunnel had conf.d/tunnelnat.conf and conf.d/tunnelnat-secret.conf (its key
# in section ike-tunnelnat). Each tunnel now has its own two files. A name of the form
# ``tunnelnat-NAME-secret.conf`` would collide for a tunnel named ``x-secret`` (its connection
# file is tunnel x's secret file); a dot never appears in a TunnelName, so ``.secret.conf``
# cannot.
LEGACY_CONF, LEGACY_SECRET = "tunnelnat.conf", "tunnelnat-secret.conf"


def tunnel_files(name: str) -> tuple[str, str]:
    """The tunnel's connection and secret files in conf.d."""
    return f"tunnelnat-{name}.conf", f"tunnelnat-{name}.secret.conf"


def legacy_tunnel(conf_d: Path) -> str | None:
    """The tunnel in the single-tunnel layout's conf.d/tunnelnat.conf, if that file is ours."""
    try:
        text = (conf_d / LEGACY_CONF).read_text()
    except (FileNotFoundError, UnicodeDecodeError):
        return None
    found = re.match(r"connections \{\n  ([A-Za-z][A-Za-z0-9_-]{0,31}) \{\n", text)
    return found[1] if found else None


def _is_legacy_secret(path: Path) -> bool:
    try:
        return path.read_text().startswith("secrets {\n  ike-tunnelnat {\n")
    except (FileNotFoundError, UnicodeDecodeError):
        return False


def loaded_plugins(host: Host) -> list[str]:
    for line in host.run(["swanctl", "--stats"]).stdout.splitlines():
        if line.startswith("loaded plugins: "):
            return line.removeprefix("loaded plugins: ").split()
    return []


def charon_answers(host: Host, tries: int, pause: float) -> bool:
    for _ in range(tries):
        if host.ok(["swanctl", "--stats"]):
            return True
        host.sleep(pause)
    return False


def _lines(path: Path) -> list[str]:
    try:
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return []


def sync_lo(
    host: Host, wanted: list[str], tunnel: str = "partner", owns_legacy: bool = True
) -> None:
    """libipsec: our public addresses on lo (a local address inside local_ts for its routes);
    those an earlier run of this tunnel added and no longer listed are removed, unless another
    tunnel still wants them. Each tunnel's list is /etc/tunnelnat/tunnels/NAME.lo-addresses; the
    boot restores their union (``restore`` reads /etc/tunnelnat/lo-addresses, one per line).
    The single-tunnel layout had only the union: its entries no tunnel's list claims belong to
    that layout's tunnel (``owns_legacy``: this one, or no other is named there), and stay for
    it on any other tunnel's run. The health probe's source (/etc/tunnelnat/probe-source) is
    InstallHealthAgent's: never removed here."""
    listed = host.path(f"{STATE}/lo-addresses")
    tunnels = host.path(f"{STATE}/tunnels")
    own = tunnels / f"{tunnel}.lo-addresses"
    lists = sorted(tunnels.glob("*.lo-addresses")) if tunnels.is_dir() else []
    others = {a for path in lists if path != own for a in _lines(path)}
    claimed = others | set(_lines(own))
    unclaimed = {a for a in _lines(listed) if a not in claimed}
    if own.exists():
        before = _lines(own)
    else:
        before = sorted(unclaimed) if owns_legacy else []
    if not owns_legacy:
        others |= unclaimed  # the single-tunnel layout's tunnel's, until its own run
    keep = set(_lines(host.path(f"{STATE}/probe-source"))) | others
    for old in before:
        if old in keep or old in wanted:
            continue
        if ADDRESS.fullmatch(old):  # a hand-edited line never reaches ip as anything else
            host.run(["ip", "addr", "del", f"{old}/32", "dev", "lo"])
    for address in wanted:
        done = host.run(["ip", "addr", "replace", f"{address}/32", "dev", "lo"])
        if done.returncode != 0:
            raise Failed(f"ip addr replace {address}/32 dev lo: {done.stderr.strip()}")
    tunnels.mkdir(parents=True, exist_ok=True)
    write_if_changed(own, "".join(f"{a}\n" for a in wanted), 0o644)
    union = sorted(others | set(wanted))
    write_if_changed(listed, "".join(f"{a}\n" for a in union), 0o644)


@dataclass(frozen=True)
class FromG:
    """How this machine routes partners' endpoints from G (boot.json): only while G is here."""

    gateway: ipaddress.IPv4Interface
    router: ipaddress.IPv4Address
    dev: str
    first: ipaddress.IPv4Address | None  # boot.json's T: the boot routes it at every boot


def from_g(host: Host) -> FromG | None:
    """G's link on this machine, from boot.json's G and subnet router; None on the pair's
    standby (G is the active's), without boot.json, or when boot.json routes no T (the lab:
    E sits on G's link itself)."""
    try:
        data = json.loads(host.path(BOOT_CONFIG).read_text())
        gateway = ipaddress.IPv4Interface(str(data["gateway"]))
        router = data.get("subnet_router")
        router = ipaddress.IPv4Address(str(router)) if router else None
        first = data.get("partner_endpoint")
        first = ipaddress.IPv4Address(str(first)) if first else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if router is None or router not in gateway.network:
        return None
    shown = host.run(["ip", "-o", "-4", "addr", "show", "to", f"{gateway.ip}/32"]).stdout.split()
    if len(shown) < 2 or not re.fullmatch(r"[A-Za-z0-9_.-]{1,15}", shown[1]):
        return None
    return FromG(gateway, router, shown[1], first)


def routable_endpoint(value: object, gateway: ipaddress.IPv4Interface) -> str | None:
    """``value`` as a T worth a host route via the subnet's router (boot.routable_endpoint's
    rule: no loopback, link-local (IMDS), multicast, reserved address or G's own subnet)."""
    try:
        t = ipaddress.IPv4Address(str(value))
    except ValueError:
        return None
    bad = t.is_loopback or t.is_link_local or t.is_multicast or t.is_unspecified
    return None if bad or t.is_reserved or t in gateway.network else str(t)


def route_partner(host: Host, endpoint: str) -> str | None:
    """``T via <subnet router> dev <G's link> src G`` when G is on this machine (the active):
    IKE and ESP to this partner leave with source G, which the Internet gateway translates to
    E. boot.json names the first partner's T only (user data: adding a partner must not
    replace the gateways); the boot and the pair agent's takeover route the others from each
    tunnel's NAME.json (boot.partner_routes). ``ip route replace``: idempotent."""
    g = from_g(host)
    t = routable_endpoint(endpoint, g.gateway) if g is not None else None
    if g is None or t is None:
        return None
    argv = ["route", "replace", f"{t}/32", "via", str(g.router), "dev", g.dev]
    done = host.run(["ip", *argv, "src", str(g.gateway.ip)])
    if done.returncode != 0:
        raise Failed(f"ip {' '.join(argv)}: {done.stderr.strip()}")
    return f"{t} via {g.router} dev {g.dev}"


def unroute_partner(host: Host, endpoint: object) -> bool:
    """A removed tunnel's T is no longer routed from G, unless boot.json's T (routed at every
    boot) or another tunnel's recorded T; True when the route was deleted."""
    g = from_g(host)
    t = routable_endpoint(endpoint, g.gateway) if g is not None else None
    if g is None or t is None or t == str(g.first):
        return False
    tunnels = host.path(f"{STATE}/tunnels")
    if t in {_recorded_endpoint(p) for p in tunnels.glob("*.json")}:
        return False
    argv = ["ip", "route", "del", f"{t}/32", "via", str(g.router), "dev", g.dev]
    return host.ok([*argv, "src", str(g.gateway.ip)])  # failing: not there any more


def _recorded_endpoint(path: Path) -> object:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data.get("partner_endpoint") if isinstance(data, dict) else None


class Sas:
    """The tunnel's SAs as swanctl lists them: its CHILD_SAs are NAME, or NAME-1..N with
    SelectorLayout per-pair."""

    def __init__(self, host: Host, tunnel: str) -> None:
        self.host, self.tunnel = host, tunnel
        name = re.escape(tunnel)
        # Only the lines of this connection: another tunnel may be named "x-2", which is also
        # the name of tunnel x's second per-pair child. A child's line names its mode.
        self._conn = re.compile(rf"^{name}: .*\n((?:[ \t].*\n?)*)", re.MULTILINE)
        self._child_conn = re.compile(rf"^  ({name}(-[0-9]+)?): (TUNNEL|TRANSPORT)", re.MULTILINE)
        self._installed = re.compile(
            rf"^[ \t]+{name}(-[0-9]+)?: #[0-9]+, reqid [0-9]+, INSTALLED", re.MULTILINE
        )

    def children(self) -> list[str]:
        listed = self.host.run(["swanctl", "--list-conns"]).stdout
        conn = self._conn.search(listed)
        block = conn.group(1) if conn else ""
        return [m.group(1) for m in self._child_conn.finditer(block)] or [self.tunnel]

    def initiate(self, child: str, timeout: str) -> subprocess.CompletedProcess[str]:
        """``--ike`` too: a CHILD_SA's name is only unique within its connection (swanctl
        --initiate takes the first child of that name in any connection without it)."""
        argv = ["swanctl", "--initiate", "--child", child, "--ike", self.tunnel]
        return self.host.run([*argv, "--timeout", timeout], timeout=max(int(timeout), 0) + 30)

    def listing(self) -> str:
        return self.host.run(["swanctl", "--list-sas", "--ike", self.tunnel]).stdout

    def has_ike_sa(self) -> bool:
        return any(line.startswith(f"{self.tunnel}: #") for line in self.listing().splitlines())

    def installed(self) -> int:
        """How many CHILD_SAs of the tunnel are INSTALLED."""
        return len(self._installed.findall(self.listing()))

    def wait_up(self, seconds: float, pause: float = 0.2) -> bool:
        """Up to ``seconds`` for an INSTALLED CHILD_SA."""
        deadline = self.host.clock() + seconds
        while self.host.clock() < deadline:
            if self.installed() >= 1:
                return True
            self.host.sleep(pause)
        return self.installed() >= 1


def charon_records(tunnels: Path, skip: str | None = None) -> list[tuple[int, str]]:
    """Every tunnel's (DPD timeout, CharonLog), as its ConfigureTunnel run recorded them in
    ``NAME.charon`` (not ``.json``: the health agent and ShowTunnels read NAME.json as a
    tunnel's facts); but ``skip``'s (a tunnel being removed)."""
    found = []
    for path in sorted(tunnels.glob("*.charon")):
        if path.stem == skip:
            continue
        try:
            record = json.loads(path.read_text())
            found.append((int(record["dpd_timeout"]), str(record["log"])))
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            continue  # a damaged record: this run's own tunnel is always there
    return found


def reqid_base(tunnels: Path, name: str) -> int:
    """The tunnel's reqid base: the one its NAME.charon records, else the lowest no other tunnel
    holds. Kept for the tunnel's life: a new base would change its connection (a restart)."""
    taken: dict[str, int] = {}
    for path in tunnels.glob("*.charon"):
        try:
            base = json.loads(path.read_text()).get("reqid_base")
        except (ValueError, AttributeError, UnicodeDecodeError):
            continue
        if isinstance(base, int) and base >= REQID_FLOOR and base % REQID_SPAN == 0:
            taken[path.stem] = base
    if name in taken and list(taken.values()).count(taken[name]) == 1:
        return taken[name]
    others = {b for stem, b in taken.items() if stem != name}
    base = REQID_FLOOR
    while base in others:
        base += REQID_SPAN
    return base


_REQID_LINE = re.compile(r"^ +reqid = [0-9]+\n", re.MULTILINE)


def unpinned_and_up(host: Host, name: str, loaded: Path, rendered: str) -> bool:
    """Whether the loaded connection differs from the rendered one only by lacking pinned reqids
    (a gateway from before them) while its IKE SA is up. charon re-establishes the SAs of a
    connection whose configuration a load replaces, and pinned reqids would only reach CHILD_SAs
    set up later anyway: such a tunnel keeps its connection until it changes for another reason
    or is down, so pinning costs no outage."""
    if not loaded.is_file():
        return False
    text = loaded.read_text()
    if _REQID_LINE.search(text) or text != _REQID_LINE.sub("", rendered):
        return False
    return Sas(host, name).has_ike_sa()


def start_strongswan(host: Host) -> None:
    if host.ok(["systemctl", "enable", "--now", "strongswan"]):
        return
    other = host.run(["systemctl", "enable", "--now", "strongswan-swanctl"])
    if other.returncode != 0:
        sys.stderr.write(other.stderr)
        raise Failed("cannot start the strongswan service")


def configure(host: Host, a: argparse.Namespace) -> dict[str, object]:
    """ConfigureTunnel's work; its JSON line as a dict."""
    tunnel = tunnel_from_args(host, a)
    cloud_init = host.env.get("TN_CLOUD_INIT", "none")
    for tool in ("swanctl", "ip"):
        if not host.which(tool):
            raise Failed(f"{tool} is not installed (cloud-init: {cloud_init})")
    lock = take_lock(host)
    try:
        return apply(host, a, tunnel, cloud_init)
    finally:
        os.close(lock)  # the lock goes with it (as it would with the process)


def apply(
    host: Host, a: argparse.Namespace, tunnel: swanctl.Tunnel, cloud_init: str
) -> dict[str, object]:
    """The tunnel's files, charon, the SAs: under the lock."""
    name, backend, libipsec = a.tunnel_name, a.ipsec_backend, tunnel.encap
    tunnels = host.path(f"{STATE}/tunnels")
    tunnels.mkdir(parents=True, exist_ok=True)
    tunnel = dataclasses.replace(tunnel, reqid_base=reqid_base(tunnels, name))
    files = swanctl.render_files(tunnel)
    # -- strongSwan.
    ss_etc, swanctl_dir = strongswan_dirs(host)
    systemd = host.systemd()
    libipsec_conf = f"{ss_etc}/strongswan.d/charon/kernel-libipsec.conf"
    if libipsec:
        host.path(libipsec_conf).parent.mkdir(parents=True, exist_ok=True)
        write_if_changed(host.path(libipsec_conf), LIBIPSEC_CONF, 0o644)
    else:
        # Kernel ESP: fail now rather than with NO_PROPOSAL_CHOSEN at the first IKE exchange.
        host.run(["modprobe", "esp4"])
        if not host.path("/sys/module/esp4").is_dir():
            raise Failed("the kernel has no ESP (esp4); use IpsecBackend libipsec")
    # The pre-shared key: fetched by name, written only into a root-only file.
    psk = host.secret(a.psk_secret_name, a.region)
    secret = secret_conf(files["ids"], psk, f"ike-tunnelnat-{name}")
    conf_d = host.path(f"{swanctl_dir}/conf.d")
    conf_d.mkdir(parents=True, exist_ok=True)
    conf_name, secret_name = tunnel_files(name)
    legacy = legacy_tunnel(conf_d)
    if legacy is not None and legacy != name and _is_legacy_secret(conf_d / conf_name):
        # Only a tunnel named "secret": its file would be the single-tunnel layout's key file.
        raise Failed(f"conf.d/{conf_name} holds tunnel {legacy}'s key: configure {legacy} first")
    loaded = conf_d / (LEGACY_CONF if legacy == name else conf_name)
    if unpinned_and_up(host, name, loaded, files["tunnel.conf"]):
        files["tunnel.conf"] = loaded.read_text()
    conf_changed = write_if_changed(conf_d / conf_name, files["tunnel.conf"], 0o644)
    secret_changed = write_if_changed(conf_d / secret_name, secret, 0o600)
    owns_legacy = legacy in (None, name)
    if legacy == name:
        # The single-tunnel layout held this tunnel: its files move to the tunnel's own. What
        # counts as a change is a difference from what charon loaded from them; the connection
        # keeps its name, so an unchanged one keeps its SAs through the load below.
        conf_changed = (conf_d / LEGACY_CONF).read_text() != files["tunnel.conf"]
        legacy_secret = conf_d / LEGACY_SECRET
        secret_changed = not legacy_secret.exists() or (
            legacy_secret.read_text() != secret_conf(files["ids"], psk)
        )
        (conf_d / LEGACY_CONF).unlink()
        if _is_legacy_secret(legacy_secret):
            legacy_secret.unlink()
    # DPD's timeout (IKEv2 retransmissions) and the log the health agent diagnoses from:
    # charon's settings are shared by every tunnel, rendered from each tunnel's record.
    for directory in (host.path(f"{ss_etc}/strongswan.d"), host.path(LOG_DIR)):
        directory.mkdir(parents=True, exist_ok=True)
    record = {"dpd_timeout": tunnel.dpd[1], "log": tunnel.log, "reqid_base": tunnel.reqid_base}
    write_if_changed(tunnels / f"{name}.charon", json.dumps(record) + "\n", 0o644)
    settings = host.path(f"{ss_etc}/strongswan.d/tunnelnat.conf")
    shared = swanctl.render_shared_charon_settings(charon_records(tunnels))
    settings_changed = write_if_changed(settings, shared, 0o644)
    # The facts with the partner's T: the boot and the pair agent's takeover route every
    # tunnel's T from G (boot.json and pair.json name the first partner's only).
    facts = {**json.loads(files["tunnel.json"]), "partner_endpoint": a.partner_endpoint}
    write_if_changed(tunnels / f"{name}.json", json.dumps(facts) + "\n", 0o644)
    # The tunnel's configuration token (docs/health.md): new whenever its connection or key
    # changed, so TunnelEstablished starts over. Written before loading.
    changed = conf_changed or secret_changed
    config_id = tunnels / f"{name}.config-id"
    if changed or not _lines(config_id):
        write_if_changed(config_id, f"{uuid.uuid4()}\n", 0o644)
    if systemd:
        start_strongswan(host)
    if not charon_answers(host, 50, 0.2):
        raise Failed("charon does not answer on its vici socket (is strongSwan running?)")
    if libipsec and "kernel-libipsec" not in loaded_plugins(host):
        if not systemd:
            raise Failed(
                f"charon runs without kernel-libipsec; restart it so it reads {libipsec_conf}"
            )
        if not host.ok(["systemctl", "restart", "strongswan"]) and not host.ok(
            ["systemctl", "restart", "strongswan-swanctl"]
        ):
            raise Failed("cannot restart the strongswan service")
        host.sleep(1)
        if "kernel-libipsec" not in loaded_plugins(host):
            raise Failed("kernel-libipsec did not load")
    host.path(STATE).mkdir(parents=True, exist_ok=True)
    lo = sorted(set(files["lo_addresses"].split())) if libipsec else []
    sync_lo(host, lo, name, owns_legacy)
    if settings_changed and not host.ok(["swanctl", "--reload-settings"]):
        raise Failed("charon did not reload strongswan.conf")
    # Before the load: start_action start initiates at once, and IKE must leave from G.
    partner_route = route_partner(host, a.partner_endpoint)
    # The tunnel's IKE SAs before the load: authenticated with the key and connection that were
    # loaded until now.
    sas = Sas(host, name)
    had_sa = sas.has_ike_sa()
    load = host.run(["swanctl", "--load-all", "--noprompt"], merge=True)
    if load.returncode != 0:
        sys.stderr.write(load.stdout)
        raise Failed("swanctl --load-all failed")
    # -- The tunnel's SAs.
    children = sas.children()

    def initiate_all() -> None:
        """Every CHILD_SA, as start_action does at a load: without waiting. swanctl's --timeout
        is the seconds before it detaches (docs.strongswan.org, swanctl --initiate); a negative
        one detaches at once: the SAs are watched below, by their listing."""
        for child in children:
            sas.initiate(child, "-1")

    restarted = False
    if changed and had_sa:
        # A new key or connection does not reach an IKE SA that is up: --load-all keeps it, and
        # IKEv2 rekeys without authenticating again, so the old key would stay in use. Start
        # over now: the partner accepts the new key or refuses it at once. Meanwhile the NAT
        # table's guard drops partner-bound packets (fail closed).
        host.run(["swanctl", "--terminate", "--ike", name, "--force"])
        initiate_all()
        restarted = True
    # A pair's standby lacks LocalAddress (G is on the ENI the active holds): nothing to wait
    # for, the pair agent initiates when it takes the ENI over.
    standby = (
        bool(a.local_address)
        and not host.run(
            ["ip", "-o", "-4", "addr", "show", "to", f"{a.local_address}/32"]
        ).stdout.strip()
    )
    # Unchanged and up: nothing is touched. Down with StartAction start: initiated.
    up = False
    if standby:
        pass
    elif sas.wait_up(5):
        up = True
    elif a.start_action == "start" or restarted:
        if not restarted:
            initiate_all()
        up = sas.wait_up(15)
    report: dict[str, object] = {
        "configured": True,
        "tunnel": name,
        "up": up,
        "installed": sas.installed(),
        "standby": standby,
        "backend": backend,
        "swanctl_changed": changed,
        "restarted": restarted,
        "config_id": _lines(config_id)[0],
        "cloud_init": cloud_init,
    }
    if partner_route is not None:  # only on the active with a routed T: as the boot reports it
        report["partner_route"] = partner_route
    return report


def configure_main(argv: list[str], host: Host | None = None) -> int:
    """``configure-tunnel``: ConfigureTunnel's verb."""
    return _main(CONFIGURE, configure_parser(), configure, argv, host)


# -- RestartTunnel --------------------------------------------------------------------------------


def restart_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tunnelnat-gateway restart-tunnel", add_help=False)
    p.add_argument("--tunnel-name", default="partner")
    p.add_argument("--wait-seconds", default="20")
    p.add_argument("--quiet-seconds", default="120")
    return p


def healthy(raw: str, children: list[str], quiet: int) -> dict[str, int] | None:
    """Charon's own word on the tunnel (issue 21, 3), from ``swanctl --list-sas --raw``: every
    CHILD_SA INSTALLED under an ESTABLISHED IKE SA, and one received a packet within ``quiet``
    seconds (vici's use-in: seconds since the last inbound packet). None: not healthy."""
    want, seen, idle = set(children), set(), None
    for line in raw.splitlines():
        head, _, kids = line.partition("child-sas")
        if not re.search(r"\bstate=ESTABLISHED\b", head):
            continue
        for body in re.findall(r"\{([^{}]*)\}", kids):
            f = dict(re.findall(r"([\w-]+)=(\S+)", body))
            if f.get("state") != "INSTALLED" or f.get("name") not in want:
                continue
            seen.add(f["name"])
            if f.get("bytes-in", "0") != "0" and f.get("use-in", "").isdigit():
                idle = min(int(f["use-in"]), idle if idle is not None else quiet + 1)
    if seen == want and idle is not None and idle <= quiet:
        return {"installed": len(seen), "inbound_seconds": idle}
    return None


def restart_charon(host: Host) -> None:
    """A dead (or hung) charon is the commonest reason a tunnel is down: start it again. With
    systemd, restart the unit (its ExecStartPost loads the configuration); without (containers,
    the lab), start the daemon in a session of its own, detached from this run's process group
    (which SSM kills at the step's timeout)."""
    if host.systemd():
        if not host.ok(["systemctl", "restart", "strongswan"]) and not host.ok(
            ["systemctl", "restart", "strongswan-swanctl"]
        ):
            raise Failed("charon does not answer and the strongswan service does not restart")
    else:
        charon = host.which("charon-systemd") or str(host.path("/usr/lib/ipsec/charon"))
        if not os.access(charon, os.X_OK):
            raise Failed("charon does not answer and no charon binary was found")
        subprocess.Popen(  # noqa: S603 - a fixed program, no arguments
            [charon],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            env=host.env,
        )
    if not charon_answers(host, 100, 0.1):
        raise Failed("charon does not answer on its vici socket after a restart")
    if not host.ok(["swanctl", "--load-all", "--noprompt"]):
        raise Failed("swanctl --load-all failed after restarting charon")


def restart(host: Host, a: argparse.Namespace) -> dict[str, object]:
    """RestartTunnel's work; its JSON line as a dict (``up`` false: the caller fails)."""
    name = _check("TunnelName", a.tunnel_name)
    wait = int(_check("WaitSeconds", a.wait_seconds))
    quiet = int(_check("QuietSeconds", a.quiet_seconds))
    if not host.which("swanctl"):
        raise Failed("swanctl is not installed")
    charon_restarted = False
    if not host.ok(["swanctl", "--stats"]):
        restart_charon(host)
        charon_restarted = True
    conns = host.run(["swanctl", "--list-conns"]).stdout
    if not any(line.startswith(f"{name}: ") for line in conns.splitlines()):
        raise Failed(f"no connection named {name} is loaded (run {CONFIGURE} first)")
    sas = Sas(host, name)
    children = sas.children()
    # The alarm that sent us here watches a metric; charon's own word decides: a healthy
    # tunnel is left alone, a restart would only cut it.
    if quiet > 0:
        raw = host.run(["swanctl", "--list-sas", "--ike", name, "--raw"]).stdout
        found = healthy(raw, children, quiet)
        if found is not None:
            return {
                "tunnel": name,
                "up": True,
                "skipped": "healthy",
                **found,
                "quiet_seconds": quiet,
                "charon_restarted": charon_restarted,
            }
    started = host.clock()
    # Terminating an IKE SA that does not exist is fine: the point is a fresh one.
    out = host.run(["swanctl", "--terminate", "--ike", name, "--timeout", "10"], merge=True)
    if out.returncode != 0 and not re.search(r"no matching|not found", out.stdout, re.I):
        print(f"{RESTART}: terminate: {out.stdout.strip()}", file=sys.stderr)
    # --initiate blocks until the child is up or fails; its result is checked below.
    for child in children:
        sas.initiate(child, str(wait))
    deadline = host.clock() + wait
    count = sas.installed()
    while count < 1 and host.clock() < deadline:
        host.sleep(0.2)
        count = sas.installed()
    report: dict[str, object] = {
        "tunnel": name,
        "up": count >= 1,
        "seconds": round(host.clock() - started, 3),
        "installed": count,
        "charon_restarted": charon_restarted,
    }
    if count < 1:
        raise Failed(f"tunnel {name} did not come back within {wait}s", report)
    return report


def restart_main(argv: list[str], host: Host | None = None) -> int:
    """``restart-tunnel``: RestartTunnel's verb."""
    return _main(RESTART, restart_parser(), restart, argv, host)


# -- a partner removed -----------------------------------------------------------------------

REMOVE = "RemoveTunnel"


def remove_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tunnelnat-gateway remove-tunnel", add_help=False)
    p.add_argument("--tunnel-name", required=True)
    return p


def configured_tunnels(host: Host) -> list[str]:
    """The tunnels ConfigureTunnel configured here (its ``NAME.charon`` records)."""
    tunnels = host.path(f"{STATE}/tunnels")
    names = {p.stem for p in tunnels.glob("*.charon")} if tunnels.is_dir() else set()
    return sorted(n for n in names if re.fullmatch(PATTERNS["TunnelName"], n))


def remove_tunnel(host: Host, name: str) -> dict[str, object]:
    """Everything ConfigureTunnel wrote for tunnel ``name`` goes, and only that (issue 23: a
    partner removed by redeploy leaves the others' SAs up): its IKE SA is terminated (the
    partner gets a delete), its two conf.d files, its facts (NAME.json: the health agent, the
    pair agent and ShowTunnels no longer see it), DPD/log record (charon's shared settings
    rendered again from the others'), configuration token and lo addresses (unless another
    tunnel lists them) are removed, then ``swanctl --load-all`` loads what is left: swanctl's
    load-conns unloads a loaded connection no longer in the configuration and load-creds
    replaces the secrets, so its key goes too (checked against charon in
    test_connection_children_charon.py). Under ConfigureTunnel's lock; idempotent."""
    name = _check("TunnelName", name)
    _, swanctl_dir = strongswan_dirs(host)
    ss_etc = strongswan_dirs(host)[0]
    lock = take_lock(host)
    try:
        conf_d = host.path(f"{swanctl_dir}/conf.d")
        tunnels = host.path(f"{STATE}/tunnels")
        conf_files = [conf_d / f for f in tunnel_files(name)]
        if legacy_tunnel(conf_d) == name:  # still in the single-tunnel layout
            conf_files.append(conf_d / LEGACY_CONF)
            if _is_legacy_secret(conf_d / LEGACY_SECRET):
                conf_files.append(conf_d / LEGACY_SECRET)
        records = [tunnels / f"{name}.{ext}" for ext in ("json", "charon", "config-id")]
        lo_file = tunnels / f"{name}.lo-addresses"
        found = [f for f in [*conf_files, *records, lo_file] if f.exists()]
        endpoint = _recorded_endpoint(tunnels / f"{name}.json")  # read before it goes
        answers = charon_answers(host, 5, 0.2)
        terminated = False
        if answers and Sas(host, name).has_ike_sa():
            terminated = host.ok(["swanctl", "--terminate", "--ike", name, "--force"])
        # The connection and its key first; the tunnel's records (what prune_tunnels and the
        # agents go by) only once charon has unloaded it: a failed load leaves the tunnel
        # recorded, so the next run removes it again.
        for path in conf_files:
            path.unlink(missing_ok=True)
        settings = host.path(f"{ss_etc}/strongswan.d/tunnelnat.conf")
        others = charon_records(tunnels, skip=name) if tunnels.is_dir() else []
        settings_changed = False
        if others:
            shared = swanctl.render_shared_charon_settings(others)
            settings_changed = write_if_changed(settings, shared, 0o644)
        unloaded = False
        if answers:
            if settings_changed and not host.ok(["swanctl", "--reload-settings"]):
                raise Failed("charon did not reload strongswan.conf")
            load = host.run(["swanctl", "--load-all", "--noprompt"], merge=True)
            if load.returncode != 0:
                sys.stderr.write(load.stdout)
                raise Failed("swanctl --load-all failed")
            unloaded = f"\n{name}: " not in "\n" + host.run(["swanctl", "--list-conns"]).stdout
        for path in records:
            path.unlink(missing_ok=True)
        # Its T's route from G (ConfigureTunnel's), unless boot.json's or another tunnel's T.
        unrouted = unroute_partner(host, endpoint) if endpoint is not None else False
        if lo_file.exists() or host.path(f"{STATE}/lo-addresses").exists():
            sync_lo(host, [], name, owns_legacy=False)
            lo_file.unlink(missing_ok=True)
        return {
            "removed": bool(found),
            "tunnel": name,
            "files": sorted(str(f.relative_to(host.root)) for f in found),
            "terminated": terminated,
            "unloaded": unloaded if answers else None,
            "charon": answers,
            "route_removed": unrouted,
        }
    finally:
        os.close(lock)


def prune_tunnels(host: Host, keep: Sequence[str]) -> list[dict[str, object]]:
    """Every tunnel configured here that ``keep`` does not name removed (``remove_tunnel``):
    for ConfigureGateway with PartnersPath, whose lanes are the partners the stack declares."""
    return [remove_tunnel(host, n) for n in configured_tunnels(host) if n not in set(keep)]


def remove_main(argv: list[str], host: Host | None = None) -> int:
    """``remove-tunnel``: a partner's tunnel removed from this gateway."""
    return _main(REMOVE, remove_parser(), lambda h, a: remove_tunnel(h, a.tunnel_name), argv, host)


def _main(
    document: str,
    parser: argparse.ArgumentParser,
    work: Callable[[Host, argparse.Namespace], dict[str, object]],
    argv: list[str],
    host: Host | None,
) -> int:
    host = host or Host()
    try:
        report = work(host, parser.parse_args(argv))
    except Failed as exc:
        if exc.report is not None:
            print(json.dumps(exc.report), flush=True)
        print(f"{document}: {exc}", file=sys.stderr, flush=True)
        return 1
    except OSError as exc:  # a file or directory the run could not write: say which
        print(f"{document}: {exc}", file=sys.stderr, flush=True)
        return 1
    print(json.dumps(report), flush=True)
    return 0
