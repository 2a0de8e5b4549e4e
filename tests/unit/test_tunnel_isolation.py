"""Several tunnels on one gateway, each isolated (issue 23), with real charon.

One gateway charon carries two tunnels to two partner charons: ``alpha`` (IKEv2, one CHILD_SA)
and ``bank`` (IKEv1 main mode, per-pair: one CHILD_SA per (S, partner network), as a
policy-based peer negotiates). Each charon runs in a private network namespace of this test
(``tnp-<pid>-*``) with kernel-libipsec (the kernel has no ESP; ESP in UDP, ``encap = yes``:
../shared/LAB-NOTES.md). The gateway is configured by ConfigureTunnel's own verb
(tunnel.configure_main) against a temporary root, as test_tunnel_verb.py does, with the real
``swanctl`` (pointed at the gateway charon's vici socket and at the root's swanctl.conf) and the
real ``ip`` (in the gateway's namespace) on PATH. A steady ping from alpha's S to alpha's
network runs through alpha's tunnel while bank is changed, broken and restarted: alpha's IKE SA
and CHILD_SA keep their unique ids (never re-established), its counters keep growing, and no
ping is lost. alpha starts in the single-tunnel layout (conf.d/tunnelnat.conf) and moves to its
own files under traffic. The figures are printed (``pytest -s``).
"""

from __future__ import annotations

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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "gateway"))
from tunnelnat.core import swanctl  # noqa: E402
from tunnelnat_gateway import tunnel  # noqa: E402

PLUGIN = Path("/usr/lib/ipsec/plugins/libstrongswan-kernel-libipsec.so")
pytestmark = pytest.mark.skipif(
    os.geteuid() != 0
    or not shutil.which("charon-systemd")
    or not shutil.which("swanctl")
    or not PLUGIN.exists(),
    reason="needs root, charon-systemd, swanctl and the kernel-libipsec plugin",
)

TAG = f"tnp-{os.getpid()}"
RUN = Path("/run")
LOG = f"/var/log/tunnelnat/{TAG}.log"  # CharonLog: what the verb's settings make charon write
PSK_ALPHA = "alpha-pre-shared-key-0123456789"
PSK_BANK = "bank-pre-shared-key-0123456789ab"
# Documentation ranges (RFC 5737) for the public side; the partners' private networks.
GW_A, ALPHA = "198.51.100.1", "198.51.100.2"
GW_B, BANK = "198.51.100.5", "198.51.100.6"
S_ALPHA, S_BANK = "203.0.113.10", ("203.0.113.20", "203.0.113.21")
NET_ALPHA, NET_BANK = "10.1.0.0/24", "10.2.0.0/24"
# 48 more partners (50 tunnels in all) behind one more partner charon: endpoints in
# 198.51.100.64/26, networks 10.3.i.0/24, one S each.
GW_M, MANY_PEER, MANY = "198.51.100.9", "198.51.100.10", 48


def sh(argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False, **kw)  # noqa: S603


def must(argv: list[str]) -> str:
    done = sh(argv)
    assert done.returncode == 0, f"{argv}: {done.stdout}{done.stderr}"
    return done.stdout


def strongswan_conf(name: str, log: Path, extra_include: str = "") -> str:
    """charon's and swanctl's settings for one daemon: its own sockets (two daemons would
    collide on the default ones), kernel-libipsec (LAB-NOTES)."""
    vici = f"unix://{RUN}/{TAG}-{name}.vici"
    return f"""\
{extra_include}
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
      socket = unix://{RUN}/{TAG}-{name}.lkp
    }}
    error-notify {{
      socket = unix://{RUN}/{TAG}-{name}.enfy
    }}
  }}
  filelog {{
    test {{
      path = {log}
      time_format = %H:%M:%S
      ike_name = yes
      default = 1
    }}
  }}
}}
swanctl {{
  socket = {vici}
}}
"""


def partner_conf(name: str, version: int, psk: str, children: dict[str, tuple[str, str]],
                 me: str, gw: str, proposals: str = "aes256-sha256-modp2048") -> str:  # fmt: skip
    """A partner's side, as its engineer would write it: it answers, the gateway initiates."""
    out = ["connections {", f"  {name} {{", f"    version = {version}", f"    local_addrs = {me}"]
    out += [f"    remote_addrs = {gw}", "    encap = yes", f"    proposals = {proposals}"]
    out += ["    unique = replace", "    local {", "      auth = psk", f"      id = {me}", "    }"]
    out += ["    remote {", "      auth = psk", f"      id = {gw}", "    }", "    children {"]
    for child, (local_ts, remote_ts) in children.items():
        out += [f"      {child} {{", f"        local_ts = {local_ts}"]
        out += [
            f"        remote_ts = {remote_ts}",
            "        esp_proposals = aes256-sha256-modp2048",
        ]
        out += ["      }"]
    out += ["    }", "  }", "}", "secrets {", f"  ike-{name} {{", f"    id-1 = {me}"]
    out.append(f"    id-2 = {gw}")
    out += [f"    secret = 0x{psk.encode().hex()}", "  }", "}", ""]
    return "\n".join(out)


@dataclass
class Sa:
    ike_id: int
    ike_state: str
    children: dict[str, tuple[int, str, int]]  # child name -> (unique id, state, bytes-in)


@dataclass
class Lab:
    tmp: Path
    procs: list[subprocess.Popen[str]] = field(default_factory=list)
    psks: dict[str, str] = field(default_factory=dict)

    @property
    def root(self) -> Path:
        return self.tmp / "gw-root"

    def ns(self, name: str) -> str:
        return f"{TAG}-{name}"

    def uri(self, name: str) -> str:
        return f"unix://{RUN}/{TAG}-{name}.vici"

    def conf_dir(self, name: str) -> Path:
        return self.tmp / name

    def swanctl(self, name: str, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "STRONGSWAN_CONF": str(self.conf_dir(name) / "strongswan.conf")}
        return sh(["swanctl", *args, "--uri", self.uri(name)], env=env)

    def start_charon(self, name: str) -> None:
        env = {**os.environ, "STRONGSWAN_CONF": str(self.conf_dir(name) / "strongswan.conf")}
        log = open(self.conf_dir(name) / "charon.out", "w")  # noqa: SIM115 - the daemon's
        self.procs.append(
            subprocess.Popen(  # noqa: S603
                ["ip", "netns", "exec", self.ns(name), "charon-systemd"],  # noqa: S607
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                text=True,
            )  # fmt: skip
        )
        deadline = time.monotonic() + 15
        # A socket file can outlive a daemon: ask it (LAB-NOTES).
        while self.swanctl(name, "--stats").returncode != 0:
            assert time.monotonic() < deadline, f"charon in {self.ns(name)} does not answer"
            time.sleep(0.05)

    def load_partner(self, name: str, text: str) -> None:
        d = self.conf_dir(name)
        (d / "swanctl.conf").write_text(text)
        out = self.swanctl(name, "--load-all", "--noprompt", "--file", str(d / "swanctl.conf"))
        assert out.returncode == 0, out.stdout + out.stderr

    def host(self) -> tunnel.Host:
        env = {**os.environ, "PATH": f"{self.tmp / 'bin'}:{os.environ.get('PATH', '')}"}
        return tunnel.Host(root=self.root, secret=lambda name, region: self.psks[name], env=env)

    def sas(self) -> dict[str, Sa]:
        """The gateway's IKE SAs by connection name, from ``swanctl --list-sas --raw``."""
        found = {}
        for line in self.swanctl("gw", "--list-sas", "--raw").stdout.splitlines():
            head = re.match(r"list-sa event \{(\S+) \{uniqueid=(\d+) .*?state=(\w+)", line)
            if not head:
                continue
            children = {
                m[1]: (int(m[2]), m[3], int(m[4]))
                for m in re.finditer(
                    r"\{name=(\S+) uniqueid=(\d+) reqid=\d+ state=(\w+)[^{}]*?bytes-in=(\d+)", line
                )
            }
            found[head[1]] = Sa(int(head[2]), head[3], children)
        return found


def verb(lab: Lab, main: object, argv: list[str]) -> tuple[int, dict[str, object], str, float]:
    out, err = io.StringIO(), io.StringIO()
    started = time.monotonic()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv, lab.host())  # type: ignore[operator]
    seconds = time.monotonic() - started
    lines = out.getvalue().splitlines()
    return code, (json.loads(lines[-1]) if lines else {}), err.getvalue(), seconds


ALPHA_ARGS = {
    "--tunnel-name": "alpha",
    "--partner-endpoint": ALPHA,
    "--partner-networks": NET_ALPHA,
    "--public-addresses": S_ALPHA,
    "--local-id": GW_A,
    "--psk-secret-name": "tunnelnat/alpha",
    "--ipsec-backend": "libipsec",
    "--charon-log": LOG,
    "--region": "us-east-1",
}
BANK_ARGS = {
    "--tunnel-name": "bank",
    "--partner-endpoint": BANK,
    "--partner-networks": NET_BANK,
    "--public-addresses": ",".join(S_BANK),
    "--local-id": GW_B,
    "--psk-secret-name": "tunnelnat/bank",
    "--ipsec-backend": "libipsec",
    "--ike-version": "1",
    "--selector-layout": "per-pair",
    "--charon-log": LOG,
    "--region": "us-east-1",
}


def args(base: dict[str, str], **overrides: str) -> list[str]:
    given = base | {f"--{k.replace('_', '-')}": v for k, v in overrides.items()}
    return [x for kv in given.items() for x in kv]


def configure(lab: Lab, base: dict[str, str], **overrides: str):  # noqa: ANN201
    return verb(lab, tunnel.configure_main, args(base, **overrides))


class Ping:
    """A steady ping from alpha's S to alpha's network, through alpha's tunnel."""

    def __init__(self, lab: Lab) -> None:
        self.proc = subprocess.Popen(  # noqa: S603
            ["ip", "netns", "exec", lab.ns("gw"), "ping", "-n", "-i", "0.02", "-W", "1",  # noqa: S607
             "-I", S_ALPHA, "10.1.0.1"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip

    def stop(self) -> tuple[int, int]:
        """(checked, lost): every echo request sent until TAIL seconds before the interrupt
        (the action under test is over by then) and how many of those got no reply. The
        requests of the last TAIL seconds are not counted: ping keeps sending until SIGINT, and
        the last one may still be on its way (its loss would be the interrupt's, not ours)."""
        time.sleep(self.TAIL)
        self.proc.send_signal(signal.SIGINT)
        out = self.proc.communicate(timeout=10)[0]
        m = re.search(r"(\d+) packets transmitted", out)
        assert m, out
        checked = int(m[1]) - int(self.TAIL / 0.02)
        replied = {int(x) for x in re.findall(r"icmp_seq=(\d+) ", out)}
        assert checked > 0, out
        return checked, len(set(range(1, checked + 1)) - replied)

    TAIL = 1.2


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    lab = Lab(tmp_path_factory.mktemp("isolation"))
    created: list[str] = []
    try:
        for name in ("gw", "alpha", "bank", "many"):
            must(["ip", "netns", "add", lab.ns(name)])
            created.append(lab.ns(name))
            must(["ip", "-n", lab.ns(name), "link", "set", "lo", "up"])
            lab.conf_dir(name).mkdir()
        pid = os.getpid()
        for peer, gw_ip, peer_ip, net in (("alpha", GW_A, ALPHA, "10.1.0.1"),
                                          ("bank", GW_B, BANK, "10.2.0.1"),
                                          ("many", GW_M, MANY_PEER, "10.3.0.1")):  # fmt: skip
            g, p = f"t{pid}g{peer[0]}", f"t{pid}p{peer[0]}"
            must(["ip", "-n", lab.ns("gw"), "link", "add", g, "type", "veth", "peer", "name", p,
                  "netns", lab.ns(peer)])  # fmt: skip
            must(["ip", "-n", lab.ns("gw"), "addr", "add", f"{gw_ip}/30", "dev", g])
            must(["ip", "-n", lab.ns("gw"), "link", "set", g, "up"])
            must(["ip", "-n", lab.ns(peer), "addr", "add", f"{peer_ip}/30", "dev", p])
            must(["ip", "-n", lab.ns(peer), "link", "set", p, "up"])
            # libipsec: a default route, and a local address inside local_ts (LAB-NOTES).
            must(["ip", "-n", lab.ns(peer), "route", "add", "default", "via", gw_ip])
            must(["ip", "-n", lab.ns(peer), "addr", "add", f"{net}/32", "dev", "lo"])
        must(["ip", "-n", lab.ns("gw"), "route", "add", "default", "via", ALPHA])
        must(["ip", "-n", lab.ns("gw"), "route", "add", "198.51.100.64/26", "via", MANY_PEER])
        for i in range(MANY):
            must(["ip", "-n", lab.ns("many"), "addr", "add", f"198.51.100.{65 + i}/32",
                  "dev", f"t{pid}pm"])  # fmt: skip
            if i:
                must(["ip", "-n", lab.ns("many"), "addr", "add", f"10.3.{i}.1/32", "dev", "lo"])
        # The gateway's root: swanctl.conf including conf.d (as the package ships it), and
        # charon's settings including the verb's shared strongswan.d/tunnelnat.conf.
        etc = lab.root / "etc"
        (etc / "swanctl" / "conf.d").mkdir(parents=True)
        (etc / "swanctl" / "swanctl.conf").write_text("include conf.d/*.conf\n")
        (etc / "strongswan.d").mkdir()
        for name in ("alpha", "bank", "many"):
            (lab.conf_dir(name) / "strongswan.conf").write_text(
                strongswan_conf(name, lab.conf_dir(name) / "charon.log")
            )
        (lab.conf_dir("gw") / "strongswan.conf").write_text(
            strongswan_conf(
                "gw", lab.conf_dir("gw") / "charon.log", f"include {etc}/strongswan.d/*.conf"
            )  # fmt: skip
        )
        # The verb's programs: the real swanctl at the gateway charon's socket and the root's
        # swanctl.conf, the real ip in the gateway's namespace.
        bin_dir = lab.tmp / "bin"
        bin_dir.mkdir()
        conf = lab.conf_dir("gw") / "strongswan.conf"
        (bin_dir / "swanctl").write_text(
            "#!/bin/bash\n"
            f"export STRONGSWAN_CONF={conf}\n"
            'case "$1" in --load-*) exec /usr/sbin/swanctl "$@" '
            f"--file {etc}/swanctl/swanctl.conf --uri {lab.uri('gw')} ;; esac\n"
            f'exec /usr/sbin/swanctl "$@" --uri {lab.uri("gw")}\n'
        )
        (bin_dir / "ip").write_text(f'#!/bin/bash\nexec /usr/sbin/ip -n {lab.ns("gw")} "$@"\n')
        for program in ("swanctl", "ip"):
            (bin_dir / program).chmod(0o755)
        for name in ("gw", "alpha", "bank", "many"):
            lab.start_charon(name)
        lab.psks = {"tunnelnat/alpha": PSK_ALPHA, "tunnelnat/bank": PSK_BANK}
        lab.load_partner("alpha", partner_conf(
            "alpha", 2, PSK_ALPHA, {"net": (NET_ALPHA, f"{S_ALPHA}/32")}, ALPHA, GW_A
        ))  # fmt: skip
        lab.load_partner("bank", bank_conf(PSK_BANK))
        yield lab
    finally:
        for proc in lab.procs:
            proc.kill()
            proc.wait()
        for ns in created:
            sh(["ip", "netns", "del", ns])
        for path in RUN.glob(f"{TAG}-*"):
            path.unlink(missing_ok=True)
        Path(LOG).unlink(missing_ok=True)  # only if /var/log/tunnelnat existed: never made here


def bank_conf(psk: str, proposals: str = "aes256-sha256-modp2048") -> str:
    """The legacy peer: IKEv1 main mode, one CHILD_SA per (our S, its network)."""
    children = {f"p{i}": (NET_BANK, f"{s}/32") for i, s in enumerate(S_BANK, 1)}
    return partner_conf("bank", 1, psk, children, BANK, GW_B, proposals)


def up(lab: Lab, name: str, children: int, seconds: float = 15) -> Sa:
    deadline = time.monotonic() + seconds
    while True:
        sa = lab.sas().get(name)
        installed = [c for c in (sa.children.values() if sa else []) if c[1] == "INSTALLED"]
        if sa and sa.ike_state == "ESTABLISHED" and len(installed) >= children:
            return sa
        assert time.monotonic() < deadline, f"{name} not up: {lab.sas()}"
        time.sleep(0.1)


def same_sa(before: Sa, after: Sa) -> None:
    """The same IKE SA and CHILD_SA (unique ids), not re-established; its counters grew."""
    assert after.ike_id == before.ike_id and after.ike_state == "ESTABLISHED"
    assert {k: v[0] for k, v in after.children.items()} == {
        k: v[0] for k, v in before.children.items()
    }
    assert all(after.children[k][2] > before.children[k][2] for k in before.children)


FIGURES: dict[str, object] = {}


def test_01_alpha_in_the_single_tunnel_layout_moves_to_its_own_files_keeping_its_sa(lab):
    """What the version before issue 23 left on a gateway: alpha in conf.d/tunnelnat.conf and
    conf.d/tunnelnat-secret.conf. The first run of the new verb moves it, the SA stays."""
    t = tunnel.tunnel_from_args(lab.host(), tunnel.configure_parser().parse_args(args(ALPHA_ARGS)))
    files = swanctl.render_files(t)
    conf_d = lab.root / "etc" / "swanctl" / "conf.d"
    (conf_d / "tunnelnat.conf").write_text(files["tunnel.conf"])
    (conf_d / "tunnelnat-secret.conf").write_text(tunnel.secret_conf(files["ids"], PSK_ALPHA))
    must(["ip", "-n", lab.ns("gw"), "addr", "add", f"{S_ALPHA}/32", "dev", "lo"])
    assert lab.swanctl("gw", "--load-all", "--noprompt", "--file",
                       str(lab.root / "etc/swanctl/swanctl.conf")).returncode == 0  # fmt: skip
    before = up(lab, "alpha", 1)
    ping = Ping(lab)
    time.sleep(0.5)
    code, report, err, seconds = configure(lab, ALPHA_ARGS)
    checked, lost = ping.stop()
    assert code == 0, err
    assert report["swanctl_changed"] is False and report["restarted"] is False
    assert sorted(p.name for p in conf_d.iterdir()) == [
        "tunnelnat-alpha.conf",
        "tunnelnat-alpha.secret.conf",
    ]
    same_sa(before, up(lab, "alpha", 1))
    assert lost == 0, (checked, lost)
    FIGURES["migration"] = {
        "seconds": round(seconds, 2),
        "alpha_pings": checked,
        "lost": lost,
    }


def test_02_bank_ikev1_per_pair_comes_up_beside_alpha(lab):
    before = up(lab, "alpha", 1)
    ping = Ping(lab)
    time.sleep(0.5)
    code, report, err, seconds = configure(lab, BANK_ARGS)
    checked, lost = ping.stop()
    assert code == 0, err
    assert report["up"] is True and report["installed"] == 2, report
    bank = up(lab, "bank", 2)
    assert sorted(bank.children) == ["bank-1", "bank-2"]
    listing = lab.swanctl("gw", "--list-sas", "--ike", "bank").stdout
    assert "IKEv1" in listing, listing
    # charon's reading of the IKEv1 lifetimes: reauthentication only, no rekeying.
    conns = lab.swanctl("gw", "--list-conns").stdout
    assert "\nbank: IKEv1, reauthentication every 28260s, dpd delay 10s\n" in conns, conns
    assert conns.startswith("alpha: IKEv2, no reauthentication, rekeying every 28260s,"), conns
    same_sa(before, up(lab, "alpha", 1))
    assert lost == 0, (checked, lost)
    FIGURES["bank_added"] = {"seconds": round(seconds, 2), "alpha_lost": lost}


def test_03_reconfiguring_bank_leaves_alphas_sas(lab):
    """(a) A new key for bank, agreed with its peer, and a new DPD (charon's shared settings
    change and are reloaded): bank starts over at once, alpha is not touched."""
    before, bank_before = up(lab, "alpha", 1), up(lab, "bank", 2)
    lab.psks["tunnelnat/bank"] = PSK_BANK + "-rotated"
    lab.load_partner("bank", bank_conf(PSK_BANK + "-rotated"))
    ping = Ping(lab)
    time.sleep(0.5)
    code, report, err, seconds = configure(lab, BANK_ARGS, dpd="10,20")
    checked, lost = ping.stop()
    assert code == 0, err
    assert report["restarted"] is True and report["up"] is True, report
    settings = (lab.root / "etc/strongswan.d/tunnelnat.conf").read_text()
    assert "retransmit_timeout = 4\n" in settings  # bank's 20 s now, the smallest
    bank = up(lab, "bank", 2)
    assert bank.ike_id != bank_before.ike_id  # bank's IKE SA was replaced ...
    same_sa(before, up(lab, "alpha", 1))  # ... alpha's was not
    assert lost == 0, (checked, lost)
    FIGURES["bank_rekeyed"] = {
        "seconds": round(seconds, 2),
        "alpha_ike_id": before.ike_id,
        "alpha_child_ids": {k: v[0] for k, v in before.children.items()},
        "alpha_pings": checked,
        "alpha_lost": lost,
        "bank_ike_id": [bank_before.ike_id, bank.ike_id],
    }


@pytest.mark.parametrize(
    ("case", "overrides", "key"),
    [
        ("wrong PSK", {}, "a-key-bank-never-agreed-to-0123"),
        ("no common proposal", {"ike_proposals": "aes128-sha256-ecp256"}, None),
    ],
)
def test_04_a_misconfigured_bank_fails_alone(lab, case, overrides, key):
    """(b) bank misconfigured on the gateway (a key its peer does not have, or proposals it
    does not accept): bank's run starts it over and reports it down, alpha keeps its SAs and
    traffic; then the right settings bring bank back."""
    before = up(lab, "alpha", 1)
    good = lab.psks["tunnelnat/bank"]
    if key:
        lab.psks["tunnelnat/bank"] = key
    ping = Ping(lab)
    time.sleep(0.5)
    code, report, err, seconds = configure(lab, BANK_ARGS, dpd="10,20", **overrides)
    checked, lost = ping.stop()
    assert code == 0, err  # ConfigureTunnel reports the tunnel down; the alarm is TunnelUp's
    assert report["up"] is False and report["installed"] == 0, report
    bank = lab.sas().get("bank")
    assert bank is None or bank.ike_state != "ESTABLISHED" or not bank.children
    same_sa(before, up(lab, "alpha", 1))
    assert lost == 0, (checked, lost)
    FIGURES[f"bank_{case}"] = {"seconds": round(seconds, 2), "alpha_lost": lost}
    # Mended: the agreed key and proposals again.
    lab.psks["tunnelnat/bank"] = good
    code, report, err, _ = configure(lab, BANK_ARGS, dpd="10,20")
    assert code == 0 and report["up"] is True, (report, err)
    same_sa(before, up(lab, "alpha", 1))


def test_05_restarting_bank_leaves_alphas_sas(lab):
    """(c) RestartTunnel for bank (QuietSeconds 0: always restart): a new IKE SA for bank,
    alpha's untouched."""
    before, bank_before = up(lab, "alpha", 1), up(lab, "bank", 2)
    ping = Ping(lab)
    time.sleep(0.5)
    code, report, err, seconds = verb(
        lab, tunnel.restart_main, ["--tunnel-name", "bank", "--quiet-seconds", "0"]
    )
    checked, lost = ping.stop()
    assert code == 0 and report["up"] is True, (report, err)
    bank = up(lab, "bank", 2)
    assert bank.ike_id != bank_before.ike_id
    same_sa(before, up(lab, "alpha", 1))
    assert lost == 0, (checked, lost)
    FIGURES["bank_restarted"] = {
        "seconds": report["seconds"],
        "bank_installed": report["installed"],
        "alpha_lost": lost,
    }


def test_06_an_unchanged_rerun_of_both_touches_nothing(lab):
    before, bank_before = up(lab, "alpha", 1), up(lab, "bank", 2)
    times = {}
    ping = Ping(lab)
    time.sleep(0.5)
    for name, base, extra in (("alpha", ALPHA_ARGS, {}), ("bank", BANK_ARGS, {"dpd": "10,20"})):
        code, report, err, seconds = configure(lab, base, **extra)
        assert code == 0 and report["swanctl_changed"] is False, (report, err)
        assert report["restarted"] is False
        times[name] = round(seconds, 2)
    checked, lost = ping.stop()
    assert lost == 0, (checked, lost)
    same_sa(before, up(lab, "alpha", 1))
    bank = up(lab, "bank", 2)
    assert bank.ike_id == bank_before.ike_id
    FIGURES["unchanged_rerun_seconds"] = times


def many_args(i: int) -> dict[str, str]:
    return {
        "--tunnel-name": f"m{i:02d}",
        "--partner-endpoint": f"198.51.100.{65 + i}",
        "--partner-networks": f"10.3.{i}.0/24",
        "--public-addresses": f"203.0.113.{100 + i}",
        "--local-id": GW_M,
        "--psk-secret-name": f"tunnelnat/m{i:02d}",
        "--ipsec-backend": "libipsec",
        "--charon-log": LOG,
        "--region": "us-east-1",
    }


def many_conf(psks: dict[str, str]) -> str:
    return "".join(
        partner_conf(
            f"m{i:02d}",
            2,
            psks[f"tunnelnat/m{i:02d}"],
            {"net": (f"10.3.{i}.0/24", f"203.0.113.{100 + i}/32")},
            f"198.51.100.{65 + i}",
            GW_M,
        )  # fmt: skip
        for i in range(MANY)
    )


def ids(sa: Sa) -> tuple[int, dict[str, int]]:
    return sa.ike_id, {k: v[0] for k, v in sa.children.items()}


def test_07_fifty_tunnels_one_changed_the_others_keep_their_sas(lab):
    """The issue's figure: ConfigureTunnel on a gateway with 50 tunnels, one partner's key
    changed: the run's time, and how many of the 49 others were re-keyed or dropped (their
    IKE SA and CHILD_SA unique ids before and after)."""
    for i in range(MANY):
        lab.psks[f"tunnelnat/m{i:02d}"] = f"many-partner-{i:02d}-pre-shared-key"
    lab.load_partner("many", many_conf(lab.psks))
    started = time.monotonic()
    for i in range(MANY):
        code, report, err, _ = configure(lab, many_args(i))
        assert code == 0 and report["up"] is True, (i, report, err)
    added = time.monotonic() - started
    names = ["alpha", "bank", *(f"m{i:02d}" for i in range(MANY))]
    for name in names:
        up(lab, name, 2 if name == "bank" else 1)
    before = lab.sas()
    assert len(before) == 50
    changed = f"m{MANY - 1:02d}"
    lab.psks[f"tunnelnat/{changed}"] += "-rotated"
    lab.load_partner("many", many_conf(lab.psks))
    ping = Ping(lab)
    time.sleep(0.5)
    code, report, err, seconds = configure(lab, many_args(MANY - 1))
    checked, lost = ping.stop()
    assert code == 0 and report["restarted"] is True and report["up"] is True, (report, err)
    after = {name: up(lab, name, 2 if name == "bank" else 1) for name in names}
    touched = [n for n in names if n != changed and ids(after[n]) != ids(before[n])]
    assert touched == []
    assert after[changed].ike_id != before[changed].ike_id
    assert lost == 0, (checked, lost)
    code, report, err, unchanged = configure(lab, many_args(0))
    assert code == 0 and report["swanctl_changed"] is False, (report, err)
    assert {n: ids(s) for n, s in lab.sas().items() if n != changed} == {
        n: ids(after[n]) for n in names if n != changed
    }
    FIGURES["fifty_tunnels"] = {
        "added_48_seconds": round(added, 2),
        "one_changed_run_seconds": round(seconds, 2),
        "unchanged_run_seconds": round(unchanged, 2),
        "others_rekeyed_or_dropped": len(touched),
        "alpha_pings": checked,
        "alpha_lost": lost,
    }
    print("\nisolation figures:", json.dumps(FIGURES, indent=1))
