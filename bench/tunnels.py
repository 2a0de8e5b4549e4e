"""Issue 23: ConfigureTunnel on a gateway with 50 partners, real charon: the time to reload one
partner's change, and the SAs of the untouched partners re-keyed or dropped.

    python -m bench.tunnels [--partners N] [--rounds R] [--json PATH]     (root)

Two charons (``charon-systemd``, kernel-libipsec: the kernel here has no ESP, ESP in UDP; the
technique of tests/unit/test_tunnel_isolation.py) in throwaway namespaces
``tn-bench-<pid>-tgw`` and ``tn-bench-<pid>-tpeer``, each with its own vici socket under
``/run/tn-bench-<pid>``. The peer charon plays every partner: partner i is
``198.51.100.(10+i)`` (RFC 5737) with network ``10.3.i.0/24``, our S for it ``203.0.113.(100+i)``,
its own pre-shared key. The gateway is configured by ConfigureTunnel's own verb
(``tunnel.configure_main``, in process) against a temporary root under the run directory, with
the real ``swanctl`` (at the gateway charon's socket) and ``ip`` (in the gateway's namespace) on
PATH, exactly as the document runs it; one run per partner, as one association per partner does.

Steps, with N-1 partners configured and up:

- **add**: the Nth partner's first run;
- **change** (``--rounds`` times, a different partner each time): the partner's key rotated
  (its side first, as agreed), then its run: the verb rewrites its two files, reloads charon
  (``swanctl --load-all``: every partner's connection and secret) and starts that partner over;
  the figure is the run's time, until the partner's CHILD_SA is INSTALLED again;
- **unchanged**: a run with nothing changed (a re-applied association);
- **removed**: the Nth partner removed (``remove-tunnel``, a partner dropped by redeploy);
- **raw reload**: ``swanctl --load-all`` alone, N-1 partners loaded (what charon itself costs).

Around each run: every other partner's IKE SA and CHILD_SA unique ids (read with the health
agent's own parser, each tunnel's SAs within its own connection) must be the same after it
(re-keyed or re-established: a new id; dropped: none), and a steady ping (every 20 ms) from
partner 0's S to its network crosses partner 0's tunnel throughout (the last 1.2 s before the
interrupt are not counted: a request still on its way is the interrupt's). Targets: reload
<= 2 s, 0 dropped.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import REPO, summary

sys.path.insert(0, str(REPO / "gateway"))
from tunnelnat_gateway import health, tunnel  # noqa: E402

PARTNERS = 50
ROUNDS = 3
GW = "198.51.100.1"  # the gateway's outer address (its IKE ID too)
PLUGIN = Path("/usr/lib/ipsec/plugins/libstrongswan-kernel-libipsec.so")
PING_INTERVAL = 0.02
PING_AFTER = 1.0  # seconds of ping counted after the action
PING_TAIL = 1.2  # seconds before the interrupt not counted (see the module's docstring)
TARGET_RELOAD_SECONDS = 2.0


@dataclass(frozen=True)
class Partner:
    """One partner as the bench plays it. ``layout`` per-pair: one CHILD_SA per S (and a peer
    child per S, as a policy-based peer negotiates)."""

    name: str
    index: int  # 0-based: its addresses
    publics: tuple[str, ...] = ()
    layout: str = "single"

    @property
    def endpoint(self) -> str:
        return f"198.51.100.{10 + self.index}"

    @property
    def network(self) -> str:
        return f"10.3.{self.index}.0/24"

    @property
    def host(self) -> str:
        return f"10.3.{self.index}.1"

    @property
    def s(self) -> tuple[str, ...]:
        return self.publics or (f"203.0.113.{100 + self.index}",)

    @property
    def children(self) -> int:
        return len(self.s) if self.layout == "per-pair" else 1


def partners(n: int) -> list[Partner]:
    if not 2 <= n <= 150:  # addresses: 198.51.100.(10+i), 203.0.113.(100+i)
        raise ValueError("2-150 partners")
    return [Partner(f"p{i:03d}", i) for i in range(n)]


def available() -> str | None:
    """Why this bench cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for program in ("charon-systemd", "swanctl", "ping"):
        if not shutil.which(program):
            return f"needs {program}"
    if not PLUGIN.exists():
        return f"needs strongSwan's kernel-libipsec plugin ({PLUGIN})"
    return None


def strongswan_conf(vici: str, log: Path, include: str = "") -> str:
    """One daemon's settings: its own sockets (two daemons would collide on the defaults),
    kernel-libipsec (the kernel has no ESP here)."""
    run = vici.removeprefix("unix://").removesuffix(".vici")
    return f"""{include}
charon-systemd {{
  load_modular = yes
  plugins {{
    include /etc/strongswan.d/charon/*.conf
    kernel-libipsec {{
      load = yes
    }}
    forecast {{
      load = no
    }}
    vici {{
      socket = {vici}
    }}
    lookip {{
      socket = unix://{run}.lkp
    }}
    error-notify {{
      socket = unix://{run}.enfy
    }}
  }}
  filelog {{
    bench {{
      path = {log}
      time_format = %s
      ike_name = yes
      default = 1
    }}
  }}
}}
swanctl {{
  socket = {vici}
}}
"""


def peer_conf(partner: Partner, psk: str) -> str:
    """The partner's side, as its engineer would write it: it answers, the gateway initiates."""
    kids = [f"      net{k} {{\n        local_ts = {partner.network}\n        remote_ts = {s}/32\n"
            "        esp_proposals = aes256-sha256-modp2048\n      }"
            for k, s in enumerate(partner.s)]  # fmt: skip
    if partner.layout == "single":
        kids = [kids[0].replace(f"{partner.s[0]}/32", ",".join(f"{s}/32" for s in partner.s))]
    return "\n".join([
        "connections {", f"  {partner.name} {{", "    version = 2",
        f"    local_addrs = {partner.endpoint}", f"    remote_addrs = {GW}", "    encap = yes",
        "    proposals = aes256-sha256-modp2048", "    unique = replace",
        f"    local {{\n      auth = psk\n      id = {partner.endpoint}\n    }}",
        f"    remote {{\n      auth = psk\n      id = {GW}\n    }}",
        "    children {", *kids, "    }", "  }", "}",
        "secrets {", f"  ike-{partner.name} {{", f"    id-1 = {partner.endpoint}",
        f"    id-2 = {GW}", f"    secret = 0x{psk.encode().hex()}", "  }", "}", "",
    ])  # fmt: skip


Ids = dict[str, tuple[str, tuple[tuple[str, str], ...]]]  # tunnel -> (IKE id, ((child, id),))


@dataclass
class Bed:
    """The two charons, the gateway's root and its programs; ``Sandbox`` removes it all."""

    box: object  # bench.netns.Sandbox
    members: list[Partner]
    psks: dict[str, str] = field(default_factory=dict)
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def dir(self) -> Path:
        return self.box.run_dir / "tunnels"  # type: ignore[attr-defined]

    @property
    def root(self) -> Path:
        return self.dir / "gw-root"

    def ns(self, role: str) -> str:
        return self.box.name(role)  # type: ignore[attr-defined]

    def vici(self, role: str) -> str:
        return f"unix://{self.box.run_dir}/{role}.vici"  # type: ignore[attr-defined]

    def swanctl(self, role: str, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "STRONGSWAN_CONF": str(self.dir / role / "strongswan.conf")}
        return subprocess.run(  # noqa: S603
            ["swanctl", *args, "--uri", self.vici(role)],  # noqa: S607
            capture_output=True, text=True, env=env, check=False, timeout=60,
        )  # fmt: skip

    def host(self) -> tunnel.Host:
        env = {**os.environ, "PATH": f"{self.dir / 'bin'}:{os.environ.get('PATH', '')}"}
        return tunnel.Host(root=self.root, secret=lambda name, _region: self.psks[name], env=env)

    def run_swanctl(self, argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
        """A ``Runner`` for the gateway programs that call ``swanctl`` (the pair agent)."""
        return subprocess.run([str(self.dir / "bin" / "swanctl"), *argv[1:]], **kw)  # type: ignore[call-overload]  # noqa: S603

    def reading(self) -> health.SaReading:
        return health.read_sas(run=lambda argv, **kw: self.run_swanctl(argv, **kw))

    def ids(self) -> Ids:
        """Every tunnel's IKE SA and CHILD_SA unique ids (the health agent's parser)."""
        out: Ids = {}
        reading = self.reading()
        assert reading.ok, reading.error
        for ike in reading.sas:
            kids = sorted((c.name, str(c.info.get("uniqueid"))) for c in ike.children
                          if c.state == "INSTALLED")  # fmt: skip
            out[ike.name] = (str(ike.info.get("uniqueid")), tuple(kids))
        return out

    def up(self, partner: Partner, reading: health.SaReading | None = None) -> bool:
        """The health agent's verdict for the partner's tunnel, its children within its own
        connection."""
        children = [partner.name] if partner.layout == "single" else [
            f"{partner.name}-{k}" for k in range(1, partner.children + 1)
        ]  # fmt: skip
        return health.sa_status(partner.name, reading or self.reading(), children).up

    def wait_up(self, members: list[Partner], seconds: float = 30) -> None:
        deadline = time.monotonic() + seconds
        while True:
            reading = self.reading()
            down = [p.name for p in members if not self.up(p, reading)]
            if not down:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"not up after {seconds:g} s: {', '.join(down[:10])}")
            time.sleep(0.1)

    def load_peer(self) -> None:
        conf = self.dir / "tpeer" / "swanctl.conf"
        conf.write_text("".join(peer_conf(p, self.psks[f"bench/{p.name}"]) for p in self.members))
        done = self.swanctl("tpeer", "--load-all", "--noprompt", "--file", str(conf))
        if done.returncode != 0:
            raise RuntimeError(f"the peer's swanctl --load-all: {done.stdout}{done.stderr}")

    def configure(self, partner: Partner) -> tuple[dict, float]:
        """ConfigureTunnel's verb for ``partner``, in process: its report and its run time."""
        argv = [
            "--tunnel-name", partner.name, "--partner-endpoint", partner.endpoint,
            "--partner-networks", partner.network, "--public-addresses", ",".join(partner.s),
            "--local-id", GW, "--psk-secret-name", f"bench/{partner.name}",
            "--ipsec-backend", "libipsec", "--selector-layout", partner.layout,
            "--charon-log", "/var/log/tunnelnat/bench.log", "--region", "us-east-1",
        ]  # fmt: skip
        out, err = io.StringIO(), io.StringIO()
        started = time.perf_counter()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = tunnel.configure_main(argv, self.host())
        seconds = time.perf_counter() - started
        lines = out.getvalue().splitlines()
        report = json.loads(lines[-1]) if lines else {}
        if code != 0 or not report.get("up"):
            raise RuntimeError(f"ConfigureTunnel {partner.name}: {code} {report} {err.getvalue()}")
        return report, seconds


@contextlib.contextmanager
def testbed(box: object, members: list[Partner]) -> Iterator[Bed]:
    """Namespaces, addresses and both charons; the peer loaded with every partner. The
    gateway has no tunnel yet. Everything goes with the ``Sandbox``."""
    bed = Bed(box, members)
    gw, peer = box.netns("tgw"), box.netns("tpeer")  # type: ignore[attr-defined]
    pid = os.getpid()
    box.veth(gw, f"tb{pid}g", peer, f"tb{pid}p")  # type: ignore[attr-defined]
    box.ip_batch(gw, [f"addr add {GW}/24 dev tb{pid}g",  # type: ignore[attr-defined]
                      f"route add default via {members[0].endpoint}"])  # fmt: skip
    # libipsec: a default route, and an address inside local_ts (the partner's network).
    cmds = [f"addr add {p.endpoint}/24 dev tb{pid}p" for p in members]
    cmds += [f"addr add {p.host}/32 dev lo" for p in members]
    box.ip_batch(peer, [*cmds, f"route add default via {GW}"])  # type: ignore[attr-defined]
    etc = bed.root / "etc"
    (etc / "swanctl" / "conf.d").mkdir(parents=True)
    (etc / "swanctl" / "swanctl.conf").write_text("include conf.d/*.conf\n")
    (etc / "strongswan.d").mkdir()
    for role in ("tgw", "tpeer"):
        (bed.dir / role).mkdir(parents=True)
        include = f"include {etc}/strongswan.d/*.conf" if role == "tgw" else ""
        (bed.dir / role / "strongswan.conf").write_text(
            strongswan_conf(bed.vici(role), bed.dir / role / "charon.log", include)
        )
    # The verb's programs: the real swanctl at the gateway charon's socket and the root's
    # swanctl.conf, the real ip in the gateway's namespace.
    bin_dir = bed.dir / "bin"
    bin_dir.mkdir()
    conf = bed.dir / "tgw" / "strongswan.conf"
    (bin_dir / "swanctl").write_text(
        "#!/bin/bash\n"
        f"export STRONGSWAN_CONF={conf}\n"
        'case "$1" in --load-*) exec /usr/sbin/swanctl "$@" '
        f"--file {etc}/swanctl/swanctl.conf --uri {bed.vici('tgw')} ;; esac\n"
        f'exec /usr/sbin/swanctl "$@" --uri {bed.vici("tgw")}\n'
    )
    (bin_dir / "ip").write_text(f'#!/bin/bash\nexec /usr/sbin/ip -n {gw} "$@"\n')
    for program in ("swanctl", "ip"):
        (bin_dir / program).chmod(0o755)
    for role, ns in (("tgw", gw), ("tpeer", peer)):
        env = {**os.environ, "STRONGSWAN_CONF": str(bed.dir / role / "strongswan.conf")}
        box.spawn(ns, ["charon-systemd"], env=env, log=bed.dir / role / "charon.out")  # type: ignore[attr-defined]
        deadline = time.monotonic() + 15
        # A socket file can outlive a daemon: ask it.
        while bed.swanctl(role, "--stats").returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"charon in {ns} does not answer")
            time.sleep(0.05)
    bed.psks = {f"bench/{p.name}": f"bench-partner-{p.name}-pre-shared-key" for p in members}
    bed.load_peer()
    yield bed


class Ping:
    """A steady ping from a partner's S to its network, through its tunnel."""

    def __init__(self, bed: Bed, partner: Partner) -> None:
        self.proc = subprocess.Popen(  # noqa: S603
            ["ip", "netns", "exec", bed.ns("tgw"), "ping", "-n", "-i", str(PING_INTERVAL),  # noqa: S607
             "-W", "1", "-I", partner.s[0], partner.host],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        time.sleep(0.3)

    def stop(self) -> tuple[int, int]:
        """(checked, lost): one more second after the action is counted (whatever it set off,
        a peer's late delete, would show there)."""
        time.sleep(PING_AFTER + PING_TAIL)
        self.proc.send_signal(signal.SIGINT)
        out = self.proc.communicate(timeout=10)[0]
        m = re.search(r"(\d+) packets transmitted", out)
        if not m:
            raise RuntimeError(f"ping: {out[-300:]}")
        checked = int(m[1]) - int(PING_TAIL / PING_INTERVAL)
        replied = {int(x) for x in re.findall(r"icmp_seq=(\d+) ", out)}
        return checked, len(set(range(1, checked + 1)) - replied)


def isolated(bed: Bed, watched: Partner, action: Callable[[], tuple[dict, float]],
             subject: str) -> dict:  # fmt: skip
    """``action`` under a steady ping through ``watched``'s tunnel: its time and report, and
    which of the other tunnels' SAs were re-keyed/re-established (new unique ids) or dropped."""
    before = bed.ids()
    ping = Ping(bed, watched)
    try:
        report, seconds = action()
    finally:
        checked, lost = ping.stop()
    after = bed.ids()
    others = [name for name in before if name != subject]
    changed = [n for n in others if n in after and after[n] != before[n]]
    dropped = [n for n in others if n not in after]
    return {
        "seconds": round(seconds, 3),
        "restarted": report.get("restarted"),
        "swanctl_changed": report.get("swanctl_changed"),
        "others": len(others),
        "others_rekeyed": len(changed),
        "others_dropped": len(dropped),
        "touched": sorted(changed + dropped)[:10],
        "pings": checked,
        "lost": lost,
    }


def run(box: object, config: dict) -> dict:
    members = partners(config["partners"])
    rounds = max(1, min(config["rounds"], len(members) - 2))
    with testbed(box, members) as bed:
        return measure(bed, members, rounds)


def measure(bed: Bed, members: list[Partner], rounds: int) -> dict:
    first, last = members[0], members[-1]
    started = time.perf_counter()
    adds = [bed.configure(p)[1] for p in members[:-1]]
    bed.wait_up(members[:-1])
    build = time.perf_counter() - started
    add = isolated(bed, first, lambda: bed.configure(last), last.name)
    bed.wait_up(members)
    changes = []
    for k in range(rounds):
        subject = members[1 + (k * 7) % (len(members) - 1)]  # never partner 0 (the ping's)
        key = f"bench/{subject.name}"
        bed.psks[key] = f"{bed.psks[key][:40]}-rotated-{k}"
        bed.load_peer()  # the partner's side first, as agreed
        changes.append(isolated(bed, first, lambda s=subject: bed.configure(s), subject.name))
        bed.wait_up(members)
    unchanged = isolated(bed, first, lambda: bed.configure(first), first.name)

    def remove() -> tuple[dict, float]:
        started = time.perf_counter()
        report = tunnel.remove_tunnel(bed.host(), last.name)
        return report, time.perf_counter() - started

    removed = isolated(bed, first, remove, last.name)
    members = members[:-1]
    raw = []
    for _ in range(5):
        t0 = time.perf_counter()
        done = bed.run_swanctl(["swanctl", "--load-all", "--noprompt"], capture_output=True,
                               text=True, check=False)  # fmt: skip
        raw.append(time.perf_counter() - t0)
        if done.returncode != 0:
            raise RuntimeError(f"swanctl --load-all: {done.stdout}{done.stderr}")
    after_raw = bed.ids()
    bed.wait_up(members, 5)
    reload = [c["seconds"] for c in changes]
    every = [add, *changes, unchanged, removed]
    touched = sum(c["others_rekeyed"] + c["others_dropped"] for c in every)
    return {
        "partners": len(members) + 1,
        "build": {"configure_runs": summary(adds), "seconds": round(build, 2)},
        "add": add,
        "changes": changes,
        "unchanged": unchanged,
        "removed": removed,
        "raw_load_all": summary(raw),
        "raw_load_all_kept_every_sa": len(after_raw) == len(members),
        "reload_seconds": summary(reload),
        "others_touched_total": touched,
        "lost_total": sum(c["lost"] for c in every),
        "ok": max(reload) <= TARGET_RELOAD_SECONDS and touched == 0,
    }


def default_config(quick: bool = False) -> dict:
    return {"partners": PARTNERS, "rounds": 1 if quick else ROUNDS}


def markdown(result: dict) -> str:
    n = result["partners"]
    r, add, unchanged = result["reload_seconds"], result["add"], result["unchanged"]
    ch = result["changes"]
    others = sum(c["others_rekeyed"] + c["others_dropped"] for c in ch)
    rows = [
        "| figure | measured | target |",
        "|---|---|---|",
        f"| ConfigureTunnel with {n} partners, one partner's key changed: run time (files, "
        f"`swanctl --load-all`, that partner started over and INSTALLED) | median "
        f"{r['median']:.2f} s, max {r['max']:.2f} s ({r['runs']} runs) | <= 2 s "
        f"{'ok' if r['max'] <= TARGET_RELOAD_SECONDS else 'MISSED'} |",
        f"| ... SAs of the {n - 1} untouched partners re-keyed or dropped | {others} "
        f"(pings through partner 0: {sum(c['pings'] for c in ch)} sent, "
        f"{sum(c['lost'] for c in ch)} lost) | 0 {'ok' if others == 0 else 'MISSED'} |",
        f"| a partner added ({n}th) beside {n - 1} up: run time; others re-keyed/dropped | "
        f"{add['seconds']:.2f} s; {add['others_rekeyed'] + add['others_dropped']} "
        f"({add['lost']} pings lost) | 0 |",
        f"| an unchanged re-run: run time; others re-keyed/dropped | {unchanged['seconds']:.2f} s; "
        f"{unchanged['others_rekeyed'] + unchanged['others_dropped']} | 0 |",
        f"| a partner removed (remove-tunnel): run time; others re-keyed/dropped | "
        f"{result['removed']['seconds']:.2f} s; "
        f"{result['removed']['others_rekeyed'] + result['removed']['others_dropped']} "
        f"({result['removed']['lost']} pings lost) | 0 |",
        f"| raw `swanctl --load-all`, {n - 1} partners loaded | median "
        f"{result['raw_load_all']['median'] * 1000:.0f} ms | - |",
    ]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.tunnels", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one change round")
    parser.add_argument("--partners", type=int, default=PARTNERS)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    why = available()
    if why:
        print(f"bench.tunnels: skipped: {why}", file=sys.stderr)
        if args.json:
            args.json.write_text(json.dumps({"skipped": why}) + "\n")
        return 0
    from bench.netns import Sandbox, remove_stale

    config = default_config(args.quick) | {"partners": args.partners}
    if args.rounds:
        config["rounds"] = args.rounds
    remove_stale()
    started = time.perf_counter()
    with Sandbox() as box:
        box.run_dir.mkdir(parents=True, exist_ok=True)
        result = run(box, config)
    result |= {"config": config, "seconds": round(time.perf_counter() - started, 1)}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    print(f"\n(run time {result['seconds']} s)")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
