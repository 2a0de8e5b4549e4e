"""``tunnelnat-gateway install-health``: the InstallHealthAgent document's verb (docs/health.md).

Installs the health agent's systemd timer, every ``--interval`` seconds:

1. a probe proves the tunnel only if it crosses it: from an S (``--public-addresses``) to an
   address behind T (``--partner-networks``), both given or neither;
2. the probe's source on lo (the unit re-adds it every run); an old one goes, unless
   ConfigureGateway keeps it (/etc/tunnelnat/lo-addresses);
3. one dry run of the agent with these arguments: a mistake fails the document now, not a
   timer nobody watches;
4. tunnelnat-health.service and .timer, rewritten only when they differ; enabled and (re)started
   when systemd is PID 1, else said so ("timer": "skipped": the lab's namespaces).

The unit runs the installed gateway software through its stable link,
``/etc/tunnelnat/lib/tunnelnat-gateway.pyz health once --gateway-id auto ...``: an upgrade
(InstallGatewaySoftware) moves the link and the next run is the new agent, with no copy of the
agent to keep in step. Prints one JSON line; exits 1 with ``InstallHealthAgent: <why>``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunnelnat_gateway import activate, health, software

DOCUMENT = "InstallHealthAgent"
STATE_DIR = Path("/etc/tunnelnat")
UNITS_DIR = Path("/etc/systemd/system")
DEFAULT_LIB = "/etc/tunnelnat/lib"  # install_package.py's; TUNNELNAT_LIB overrides both
LINK_NAME = activate.CURRENT  # the current software (LIB/tunnelnat-gateway.pyz): what units run
SERVICE, TIMER = "tunnelnat-health.service", "tunnelnat-health.timer"
HEADER = "# Written by tunnelnat InstallHealthAgent; changes here are overwritten.\n"
# The document's allowedPatterns, checked again: these values reach a unit file and argv.
REGION = re.compile(r"^[a-z]{2}(-[a-z]+)+-[0-9]$")
DEPLOYMENT = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
MIN_INTERVAL, MAX_INTERVAL = 10, 3600
HIGH_RESOLUTION_BELOW = 60  # standard resolution keeps one datapoint a minute
MAX_TUNNELS = 100  # several partners: 50 is the figure; the unit's command line stays short

Runner = Callable[..., subprocess.CompletedProcess]


class Failed(Exception):
    """The document fails with this message."""


@dataclass(frozen=True)
class Options:
    tunnel: str
    region: str
    deployment: str = "tunnelnat"
    namespace: str = ""
    interval: int = 60
    probe: str = ""
    probe_source: str = ""
    partner_networks: str = ""
    public_addresses: str = ""


def lib_dir() -> Path:
    return Path(os.environ.get("TUNNELNAT_LIB") or DEFAULT_LIB)


def parse(argv: list[str]) -> Options:
    parser = argparse.ArgumentParser(prog="tunnelnat-gateway install-health")
    parser.add_argument("--tunnel", required=True)
    parser.add_argument("--region", required=True)
    parser.add_argument("--deployment", default="tunnelnat")
    parser.add_argument("--namespace", default="")
    parser.add_argument("--interval", default="60")
    parser.add_argument("--probe", default="")
    parser.add_argument("--probe-source", default="")
    parser.add_argument("--partner-networks", default="")
    parser.add_argument("--public-addresses", default="")
    args = parser.parse_args(argv)
    # One tunnel, or several partners' (issue 23): comma-separated, each a connection's name;
    # the agent reports TunnelUp etc. for each.
    names = args.tunnel.split(",")
    if not all(health.TUNNEL_NAME.fullmatch(n) for n in names) or len(set(names)) != len(names):
        raise Failed(f"invalid TunnelName {args.tunnel!r}")
    if len(names) > MAX_TUNNELS:
        raise Failed(f"TunnelName lists {len(names)} tunnels, more than {MAX_TUNNELS}")
    if not REGION.fullmatch(args.region):
        raise Failed(f"invalid Region {args.region!r}")
    if not DEPLOYMENT.fullmatch(args.deployment):
        raise Failed(f"invalid Deployment {args.deployment!r}")
    if args.namespace and not health.NAMESPACE_RE.fullmatch(args.namespace):
        raise Failed(f"invalid Namespace {args.namespace!r}")
    interval = args.interval
    if not (interval.isdigit() and MIN_INTERVAL <= int(interval) <= MAX_INTERVAL):
        raise Failed(f"HealthInterval must be {MIN_INTERVAL}-{MAX_INTERVAL}, not {interval!r}")
    return Options(
        tunnel=args.tunnel,
        region=args.region,
        deployment=args.deployment,
        namespace=args.namespace,
        interval=int(interval),
        probe=args.probe,
        probe_source=args.probe_source,
        partner_networks=args.partner_networks,
        public_addresses=args.public_addresses,
    )


def check_probe(opts: Options) -> None:
    """A probe proves the tunnel only if it crosses it: from an S, to an address behind T."""
    if bool(opts.probe) != bool(opts.probe_source):
        raise Failed("ProbeTarget and ProbeSource go together: give both or neither")
    if not opts.probe:
        return
    if "," in opts.tunnel:
        raise Failed("a probe crosses one tunnel: with several tunnels leave ProbeTarget empty")
    if not opts.partner_networks or not opts.public_addresses:
        raise Failed("a probe needs PartnerNetworks and PublicAddresses to check it against")
    try:
        probe = health.Probe.parse(opts.probe, opts.probe_source)
    except ValueError as exc:
        raise Failed(f"invalid ProbeTarget/ProbeSource: {exc}") from None
    try:
        nets = [ipaddress.IPv4Network(n) for n in opts.partner_networks.split(",")]
        public = [ipaddress.IPv4Network(p) for p in opts.public_addresses.split(",")]
    except ValueError as exc:
        raise Failed(f"invalid PartnerNetworks/PublicAddresses: {exc}") from None
    if not any(probe.host in n for n in nets):
        raise Failed(f"ProbeTarget {probe.host} is not inside PartnerNetworks")
    if not any(probe.source in p for p in public):
        raise Failed(f"ProbeSource {probe.source} is not among PublicAddresses")


def agent_args(opts: Options) -> list[str]:
    """The health agent's arguments, after ``once --gateway-id ...``."""
    args = ["--tunnels", opts.tunnel, "--region", opts.region, "--deployment", opts.deployment]
    if opts.namespace:
        args += ["--namespace", opts.namespace]
    if opts.probe:
        args += ["--probe", opts.probe, "--probe-source", opts.probe_source]
    # Standard resolution keeps one datapoint a minute: a shorter interval needs 1-s storage.
    if opts.interval < HIGH_RESOLUTION_BELOW:
        args.append("--high-resolution")
    parameter = software.parameter_for(opts.deployment)
    if parameter:
        args += ["--software-parameter", parameter]
    return args


def place_probe_source(opts: Options, state_dir: Path, ip: str, run: Runner) -> None:
    """The probe's source on lo; the previous one removed unless ConfigureGateway keeps it."""
    record = state_dir / "probe-source"
    try:
        old = record.read_text().strip()
    except OSError:
        old = ""
    try:
        kept = (state_dir / "lo-addresses").read_text().splitlines()
    except OSError:
        kept = []
    if old and old != opts.probe_source and old not in kept and _is_address(old):
        run([ip, "addr", "del", f"{old}/32", "dev", "lo"], capture_output=True, check=False)
    if opts.probe_source:
        done = run(
            [ip, "addr", "replace", f"{opts.probe_source}/32", "dev", "lo"],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            why = (done.stderr or "").strip() or f"ip exited {done.returncode}"
            raise Failed(f"cannot put {opts.probe_source} on lo: {why}")
    record.write_text(f"{opts.probe_source}\n" if opts.probe_source else "")


def _is_address(text: str) -> bool:
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True


def dry_run(args: list[str]) -> dict[str, Any]:
    """One run of the agent with these arguments, publishing nothing: its JSON line."""
    with tempfile.TemporaryDirectory(prefix="tunnelnat-health-check-") as work:
        argv = ["once", "--gateway-id", "install-check", *args, "--dry-run"]
        argv += ["--state-file", f"{work}/counters.json"]
        argv += ["--established-file", f"{work}/established.json"]
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                code = health.main(argv)
        except SystemExit as exc:  # argparse refused an argument (its message is on stderr)
            code = exc.code if isinstance(exc.code, int) else 2
        except Exception as exc:  # noqa: BLE001 - the document says so, with the reason
            print(f"{DOCUMENT}: {type(exc).__name__}: {exc}", file=sys.stderr)
            code = 1
    lines = out.getvalue().strip().splitlines()
    try:
        line = json.loads(lines[-1]) if lines else None
    except ValueError:
        line = None
    if code != 0 or not isinstance(line, dict):
        raise Failed("the health agent does not run with these parameters")
    return line


def _tunnels(names: str) -> str:
    return f"tunnel {names}" if "," not in names else f"tunnels {names.replace(',', ', ')}"


def units(opts: Options, args: list[str], *, python: str, ip: str, link: Path) -> dict[str, str]:
    """The service and the timer, as text."""
    pre = f"ExecStartPre=-{ip} addr replace {opts.probe_source}/32 dev lo\n"
    pre = pre if opts.probe_source else ""
    service = (
        f"{HEADER}[Unit]\n"
        f"Description=tunnelnat health agent: TunnelUp for {_tunnels(opts.tunnel)}\n"
        "Wants=network-online.target\n"
        "After=network-online.target strongswan.service strongswan-swanctl.service\n\n"
        "[Service]\nType=oneshot\n"
        f"{pre}"
        f"ExecStart={python} {link} health once --gateway-id auto {' '.join(args)}\n"
        "StateDirectory=tunnelnat\nTimeoutStartSec=60\n"
    )
    # AccuracySec: the default (1 min) would smear a 10 s interval.
    timer = (
        f"{HEADER}[Unit]\nDescription=tunnelnat health agent every {opts.interval}s\n\n"
        f"[Timer]\nOnActiveSec=1s\nOnUnitActiveSec={opts.interval}s\nAccuracySec=1s\n\n"
        "[Install]\nWantedBy=timers.target\n"
    )
    return {SERVICE: service, TIMER: timer}


def write_if_changed(path: Path, text: str, mode: int = 0o644) -> bool:
    """Rewrite ``path`` only when its content differs (renamed into place); True if it did."""
    try:
        if path.read_text() == text:
            return False
    except OSError:
        pass
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.chmod(mode)
    tmp.replace(path)
    return True


def link_current(lib: Path, archive: Path | None) -> bool:
    """No current software yet (a gateway older than the package, its InstallGatewaySoftware
    still to come): this document's archive becomes it, as install_package.py links it, so the
    timer has something to run. An existing link is InstallGatewaySoftware's, never moved here."""
    link = lib / LINK_NAME
    if os.path.lexists(link) or archive is None:
        return False
    archive = Path(os.path.realpath(archive))
    if archive.parent != Path(os.path.realpath(lib / "gateway")):
        return False
    activate.point_current(link, archive)
    return True


def start_timer(changed: bool, run: Runner) -> None:
    def systemctl(*args: str) -> bool:
        # systemctl's own words go to stderr: stdout is the document's one JSON line.
        done = run(["systemctl", *args], stdout=sys.stderr, check=False)
        return done.returncode == 0

    if changed and not systemctl("daemon-reload"):
        raise Failed("systemctl daemon-reload failed")
    quiet = run(
        ["systemctl", "enable", TIMER],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
    )
    if quiet.returncode != 0:
        raise Failed(f"cannot enable {TIMER}")
    if not systemctl("restart" if changed else "start", TIMER):
        raise Failed(f"cannot start {TIMER}")


def install(
    opts: Options,
    *,
    state_dir: Path = STATE_DIR,
    units_dir: Path = UNITS_DIR,
    lib: Path | None = None,
    archive: Path | None = None,
    run: Runner = subprocess.run,
    systemd: bool | None = None,
    cloud_init: str = "none",
) -> dict[str, Any]:
    """Everything the document does; returns its JSON line (raises Failed)."""
    ip = shutil.which("ip")
    if ip is None:
        raise Failed(f"ip is not installed (cloud-init: {cloud_init})")
    python = shutil.which("python3") or sys.executable
    lib = lib or lib_dir()
    check_probe(opts)
    args = agent_args(opts)
    state_dir.mkdir(parents=True, exist_ok=True)
    units_dir.mkdir(parents=True, exist_ok=True)
    place_probe_source(opts, state_dir, ip, run)
    check = dry_run(args)
    linked = link_current(lib, archive)
    texts = units(opts, args, python=python, ip=ip, link=lib / LINK_NAME)
    changed = [write_if_changed(units_dir / name, text) for name, text in texts.items()]
    if systemd is None:
        systemd = activate.systemd_is_pid1()
    if systemd:
        start_timer(any(changed) or linked, run)
        timer = "enabled"
    else:
        # The lab runs this inside network namespaces without systemd: nothing to schedule it.
        print(
            f"{DOCUMENT}: systemd is not PID 1 here: the health agent is installed "
            f"({lib / LINK_NAME}, {TIMER}) but its timer is not started",
            file=sys.stderr,
        )
        timer = "skipped"
    return {
        "installed": True,
        "tunnel": opts.tunnel,
        "timer": timer,
        "interval": opts.interval,
        "probe_source": opts.probe_source,
        "cloud_init": cloud_init,
        "agent_changed": any(changed) or linked,
        "check": check,
    }


def main(argv: list[str] | None = None) -> int:
    try:
        opts = parse(list(sys.argv[1:] if argv is None else argv))
        line = install(
            opts,
            archive=software.archive_path(),
            cloud_init=os.environ.get("TN_CLOUD_INIT") or "none",
        )
    except Failed as exc:
        print(f"{DOCUMENT}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{DOCUMENT}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
