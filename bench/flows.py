"""Part 2: new-connection rate through a gateway namespace, 1 vs 10,000 mappings, nft vs iptables.

    tn-bench-<pid>-cli ── eth0 ═ eth0 ── tn-bench-<pid>-gw ── eth1 ═ eth0 ── tn-bench-<pid>-srv
    10.20.0.2 + 10.20.1.1-254          10.20.0.1 | 192.0.2.1                192.0.2.80 (A)

The gateway holds, in turn: tunnelnat's whole table rendered by ``render_nat_table`` (maps, the
forward chain's enrolled-only filter and the fail-closed guard, with ``tunnel_interface`` set to
eth1, the egress device, so the guard passes NATed traffic), or the seed's linear iptables rules
(one SNAT + one DNAT per mapping), at 1 and at 10,000 mappings. The measured sources are the LAST
rules of the linear lists.

Load: ``python -m bench.flows gen`` inside the client namespace, one process per core, each with
sockets bound to the measured source addresses, sending one small UDP datagram per
(socket, destination port) pair: every datagram is a new 5-tuple, so a new conntrack entry and
a walk of the NAT table at the gateway. Bounded by time and by count. The server namespace
counts what arrives (an nft counter at raw priority, before any conntrack there) and drops it;
conntrack at the gateway is flushed (netlink, ``python -m bench.flows ctflush``) before each
measurement. The conditions alternate, rotated each round, in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import sys
import time
from pathlib import Path

from bench.common import PYTHON, REPO, median, ratio, summary

CONDITIONS = ("nft-1", "nft-10k", "iptables-1", "iptables-10k")
SINK_PORTS = (1024, 65535)


def default_config(quick: bool = False) -> dict:
    if quick:
        return {"rounds": 1, "seconds": 1.0, "max_flows": 60_000, "large": 10_000, "sources": 254}
    return {"rounds": 3, "seconds": 2.5, "max_flows": 200_000, "large": 10_000, "sources": 254}


# ------------------------------------------------------------------------------------------------
# Root namespace side


class Topology:
    def __init__(self, box: object, sources: int) -> None:
        from bench import tables

        self.box = box
        self.tables = tables
        self.sources = sources
        self.cli = box.netns("cli")  # type: ignore[attr-defined]
        self.gw = box.netns("gw")  # type: ignore[attr-defined]
        self.srv = box.netns("srv")  # type: ignore[attr-defined]
        box.veth(self.cli, "eth0", self.gw, "eth0")  # type: ignore[attr-defined]
        box.veth(self.gw, "eth1", self.srv, "eth0")  # type: ignore[attr-defined]
        box.ip_batch(self.cli, [  # type: ignore[attr-defined]
            "addr add 10.20.0.2/16 dev eth0",
            *[f"addr add 10.20.1.{k}/16 dev eth0" for k in range(1, sources + 1)],
            f"route add default via {tables.GW_CLIENT_SIDE}",
        ])  # fmt: skip
        box.ip_batch(self.gw, [  # type: ignore[attr-defined]
            f"addr add {tables.GW_CLIENT_SIDE}/16 dev eth0",
            f"addr add {tables.GW_PARTNER_SIDE}/24 dev eth1",
        ])  # fmt: skip
        box.ip_batch(self.srv, [  # type: ignore[attr-defined]
            f"addr add {tables.APP}/24 dev eth0",
            f"route add default via {tables.GW_PARTNER_SIDE}",
        ])  # fmt: skip
        for key, value in (
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
        ):
            box.sysctl(self.gw, key, value)  # type: ignore[attr-defined]
        lo, hi = SINK_PORTS
        sink = f"""table ip sink {{
  counter natted {{ }}
  counter other {{ }}
  chain pre {{
    type filter hook prerouting priority -300; policy accept;
    ip daddr {tables.APP} ip saddr 203.0.113.0/24 udp dport {lo}-{hi} counter name natted drop
    ip daddr {tables.APP} udp dport {lo}-{hi} counter name other drop
  }}
}}
"""
        box.run(self.srv, ["nft", "-f", "-"], input=sink)  # type: ignore[attr-defined]

    def env(self) -> dict:
        return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "lambdas")])}

    def load(self, condition: str, large: int) -> dict:
        kind, size = condition.split("-")
        n = large if size == "10k" else 1
        maps = self.tables.mappings(n, measured=self.sources)
        self.box.run(self.gw, ["nft", "flush", "ruleset"])  # type: ignore[attr-defined]
        started = time.perf_counter()
        if kind == "nft":
            text = self.tables.render_nft(maps, 1, tunnel="eth1")
            self.box.run(self.gw, ["nft", "-f", "-"], input=text)  # type: ignore[attr-defined]
        else:
            text = self.tables.iptables_restore_text(self.tables.linear_rules(maps))
            self.box.run(self.gw, ["iptables-restore"], input=text)  # type: ignore[attr-defined]
        load_seconds = time.perf_counter() - started
        measured = [str(m.private_ip) for m in maps if str(m.private_ip).startswith("10.20.1.")]
        return {"mappings": n, "sources": measured, "load_seconds": load_seconds}

    def ctflush(self) -> int:
        proc = self.box.run(  # type: ignore[attr-defined]
            self.gw, [PYTHON, "-m", "bench.flows", "ctflush"], env=self.env()
        )
        return int(proc.stdout.strip() or 0)

    def conntrack_count(self) -> int:
        proc = self.box.run(  # type: ignore[attr-defined]
            self.gw, ["cat", "/proc/sys/net/netfilter/nf_conntrack_count"], check=False
        )
        return int(proc.stdout.strip() or 0)

    def sink_counters(self) -> dict:
        proc = self.box.run(self.srv, ["nft", "-j", "list", "counters"])  # type: ignore[attr-defined]
        out = {}
        for entry in json.loads(proc.stdout)["nftables"]:
            c = entry.get("counter")
            if c:
                out[c["name"]] = c["packets"]
        return out

    def reset_sink(self) -> None:
        self.box.run(self.srv, ["nft", "reset", "counters", "table", "ip", "sink"])  # type: ignore[attr-defined]

    def gw_drop_counters(self) -> dict:
        proc = self.box.run(self.gw, ["nft", "-j", "list", "counters"], check=False)  # type: ignore[attr-defined]
        out = {}
        if proc.returncode == 0 and proc.stdout.strip():
            for entry in json.loads(proc.stdout)["nftables"]:
                c = entry.get("counter")
                if c and c.get("table") == "tunnelnat":
                    out[c["name"]] = c["packets"]
        return out

    def generate(self, sources: list[str], seconds: float, max_flows: int, workers: int) -> dict:
        argv = [PYTHON, "-m", "bench.flows", "gen", "--sources", ",".join(sources),
                "--dst", str(self.tables.APP), "--seconds", str(seconds),
                "--max", str(max_flows), "--workers", str(workers),
                "--sockets", str(self.sources)]  # fmt: skip
        proc = self.box.run(self.cli, argv, env=self.env(), timeout=seconds + 60)  # type: ignore[attr-defined]
        return json.loads(proc.stdout.strip().splitlines()[-1])


def run(box: object, config: dict) -> dict:
    topo = Topology(box, config["sources"])
    workers = int(config.get("workers") or os.cpu_count() or 1)
    samples: dict[str, list[dict]] = {c: [] for c in CONDITIONS}
    order_log = []
    for rnd in range(config["rounds"]):
        order = CONDITIONS[rnd % len(CONDITIONS) :] + CONDITIONS[: rnd % len(CONDITIONS)]
        for condition in order:
            loaded = topo.load(condition, config["large"])
            # Warm-up: ARP, caches, the first-use cost of the table; then forget its flows.
            topo.generate(loaded["sources"], 0.2, 5_000, workers)
            topo.ctflush()
            before_ct = topo.conntrack_count()
            topo.reset_sink()
            gen = topo.generate(loaded["sources"], config["seconds"], config["max_flows"], workers)
            counters = topo.sink_counters()
            sample = {
                "round": rnd,
                "sent": gen["sent"],
                "seconds": gen["seconds"],
                "delivered_natted": counters.get("natted", 0),
                "delivered_not_natted": counters.get("other", 0),
                "conntrack_entries": topo.conntrack_count() - before_ct,
                "flows_per_second": counters.get("natted", 0) / gen["seconds"],
                "sent_per_second": gen["sent"] / gen["seconds"],
                "gateway_drops": topo.gw_drop_counters(),
                "load_seconds": loaded["load_seconds"],
                "sources": len(set(loaded["sources"])),
            }
            samples[condition].append(sample)
            order_log.append(condition)
            sys.stderr.write(
                f"  [flows] round {rnd} {condition:13s} {sample['flows_per_second']:9.0f} flows/s "
                f"(sent {gen['sent']}, delivered {sample['delivered_natted']}, "
                f"conntrack {sample['conntrack_entries']})\n"
            )
    topo.ctflush()
    result: dict = {"config": {**config, "workers": workers}, "order": order_log, "conditions": {}}
    for condition, rows in samples.items():
        result["conditions"][condition] = {
            "flows_per_second": summary([r["flows_per_second"] for r in rows]),
            "samples": rows,
        }
    fps = {c: result["conditions"][c]["flows_per_second"]["median"] for c in CONDITIONS}
    result["ratios"] = {
        "nft_10k_over_1": ratio(fps["nft-10k"], fps["nft-1"]),
        "iptables_10k_over_1": ratio(fps["iptables-10k"], fps["iptables-1"]),
        "nft_10k_over_iptables_10k": ratio(fps["nft-10k"], fps["iptables-10k"]),
        "nft_1_over_iptables_1": ratio(fps["nft-1"], fps["iptables-1"]),
    }
    result["namespaces"] = [topo.cli, topo.gw, topo.srv]
    return result


# ------------------------------------------------------------------------------------------------
# Inside the namespaces


def ctflush() -> int:
    """Flush this namespace's conntrack table over ctnetlink (no conntrack tool needed);
    prints how many entries are left."""
    netlink_netfilter = 12
    msg_type = (1 << 8) | 2  # NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_DELETE
    flags = 0x1 | 0x4  # NLM_F_REQUEST | NLM_F_ACK
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, netlink_netfilter) as s:
        s.bind((0, 0))
        payload = struct.pack("=BBH", socket.AF_INET, 0, 0)  # nfgenmsg: no tuple = flush
        s.send(struct.pack("=IHHII", 16 + len(payload), msg_type, flags, 1, 0) + payload)
        reply = s.recv(4096)
        if len(reply) >= 20:
            (error,) = struct.unpack_from("=i", reply, 16)
            if error not in (0, -2):  # -ENOENT: nothing to flush
                raise OSError(-error, f"conntrack flush failed: {os.strerror(-error)}")
    try:
        return int(Path("/proc/sys/net/netfilter/nf_conntrack_count").read_text())
    except OSError:
        return 0


def _worker(sources: list[str], dst: str, deadline: float, limit: int, conn: object) -> None:
    socks = []
    for src in sources:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        s.bind((src, 0))
        socks.append(s)
    payload = b"x" * 16
    sent = 0
    lo, hi = SINK_PORTS
    port = lo
    started = time.perf_counter()
    clock = time.perf_counter
    try:
        while sent < limit:
            for s in socks:
                try:
                    s.sendto(payload, (dst, port))
                except OSError:
                    continue
                sent += 1
                # A slow table can make one pass over the sockets take long: look at the clock
                # every 32 datagrams, not once a pass.
                if (sent & 31) == 0 and (clock() >= deadline or sent >= limit):
                    break
            else:
                port = port + 1 if port < hi else lo
                continue
            break
    finally:
        elapsed = time.perf_counter() - started
        for s in socks:
            s.close()
    conn.send((sent, elapsed))  # type: ignore[attr-defined]


def generate(sources: list[str], dst: str, seconds: float, limit: int, workers: int,
             sockets: int) -> dict:  # fmt: skip
    """Send new UDP flows for ``seconds`` (at most ``limit``) from ``sockets`` sockets spread over
    ``sources``, in ``workers`` processes; returns {"sent", "seconds"}."""
    import multiprocessing as mp

    bound = [sources[i % len(sources)] for i in range(max(sockets, len(sources)))]
    workers = max(1, min(workers, len(bound)))
    shares = [bound[i::workers] for i in range(workers)]
    ctx = mp.get_context("fork")
    started = time.perf_counter()
    deadline = started + seconds
    pipes, procs = [], []
    for share in shares:
        parent, child = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_worker, args=(share, dst, deadline, limit // workers, child))
        p.start()
        pipes.append(parent)
        procs.append(p)
    results = [pipe.recv() for pipe in pipes]
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
    # Each worker times its own sending (from its first datagram to the deadline).
    elapsed = max(r[1] for r in results) or (time.perf_counter() - started)
    return {"sent": sum(r[0] for r in results), "seconds": elapsed, "workers": workers}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.flows")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("gen")
    g.add_argument("--sources", required=True)
    g.add_argument("--dst", required=True)
    g.add_argument("--seconds", type=float, default=1.0)
    g.add_argument("--max", type=int, default=100_000)
    g.add_argument("--workers", type=int, default=1)
    g.add_argument("--sockets", type=int, default=254)
    sub.add_parser("ctflush")
    args = parser.parse_args(argv)
    if args.command == "ctflush":
        print(ctflush())
        return 0
    seconds = min(max(args.seconds, 0.05), 60.0)
    limit = min(max(args.max, 1), 1_000_000)
    out = generate(args.sources.split(","), args.dst, seconds, limit, args.workers, args.sockets)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["CONDITIONS", "default_config", "generate", "median", "run"]
