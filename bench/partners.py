"""Issue 23: the several-partner NAT table (``render_partners_table``) under load, side by side.

    python -m bench.partners [--quick] [--rounds R] [--seconds S] [--json PATH]

``make bench`` runs it (10 paired rounds, about two minutes; ``--quick``: 3, whose median
swings with this machine's samples); on its own, as root, with the options above.

**New flows/s, 50 partners x 10,000 mappings vs 1 partner x 10,000.** Identical chains of
namespaces, built once and kept loaded, so the conditions alternate within one run without a
reload between them (a 50 x 10,000 load takes seconds):

    tn-bench-<pid>-cli1 ── tn-bench-<pid>-gw1  ── tn-bench-<pid>-srv1     1 partner
    tn-bench-<pid>-cli50 ─ tn-bench-<pid>-gw50 ── tn-bench-<pid>-srv50    50 partners
    tn-bench-<pid>-cli50d  tn-bench-<pid>-gw50d   tn-bench-<pid>-srv50d   50, none aliased

In each, the measured partner is ``bench.tables``' 192.0.2.0/24 (app 192.0.2.80) with 10,000
mappings, the 254 measured sources 10.20.1.k -> 203.0.113.k among them (the rest fillers). In the
50-partner gateway it is declared LAST (the highest mark), beside 49 others with 10,000 mappings
each: 25 reached directly (172.16.i.0/24) and 24 through aliases (all on the real 10.0.0.0/24,
each with its own S: overlapping partners are told apart by their S, through one interface):
the classifier maps and verdict maps are as full as in production. A third chain holds
50 x 10,000 with no aliases: the difference is what the aliases' prefix NAT and the S-keyed
classifier cost. The load is ``bench.flows``' generator (one
UDP datagram per new 5-tuple, from sockets bound to the measured sources, ONE process: the
gateway's hooks then run in its softirq on one core, veth delivering in the sender's context):
every datagram is a new conntrack entry, so a walk of the NAT hooks (classify, dstnat dispatch,
forward dispatch, srcnat dispatch and ``snat_<name>``, the guard). The server counts, before
its own conntrack, what arrives with its S as source (NATed); conntrack at the gateways is
flushed before each measurement; the conditions alternate, rotated each round. Ratio: the
median over rounds of flows/s (50) / flows/s (1) within the round (paired), beside the ratio of
the medians. This machine's two cores are shared: single samples swing by up to 2x.

**A one-mapping change for one partner, 50 partners x 1,000 mappings.** A fourth gateway
namespace holds that table. A worker inside it times, alternately and many times over: the
gateway's work (``render_partner_delta`` for partner p07: one mapping added, with its applied
state, then ``nft -f`` of it) and the raw change (``nft -f`` of the same three element additions,
text prepared beforehand). Ratio: median (render + apply) / median (raw).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from bench.common import PYTHON, REPO, ratio, summary

LARGE = 10_000
DELTA_SIZE = 1_000
PARTNERS = 50
MEASURED = "meas"


def default_config(quick: bool = False) -> dict:
    if quick:
        return {"rounds": 3, "seconds": 1.0, "max_flows": 60_000, "delta_iterations": 15}
    return {"rounds": 10, "seconds": 1.5, "max_flows": 150_000, "delta_iterations": 40}


# ------------------------------------------------------------------------------------------------
# The tables


def partner_set(
    count: int, mappings_each: int, aliased: bool = True
) -> tuple[object, dict, list[str]]:
    """(base, tables, dummy interfaces): ``count - 1`` others, then the measured partner."""
    from bench import tables as bt
    from tunnelnat.core.nat import MultiPartnerBase, NatTable, PartnerNat

    # The data path decided for issue 23 (notes/plan-23b.md): overlapping partners are told
    # apart by their S (IPsec policies on one interface; inbound by ip daddr . ip saddr), so
    # each aliased partner declares its own S (RFC 2544's benchmarking range) and no policy
    # routing is involved: ``dummies`` stays empty (it was one stand-in tunnel and fib rule per
    # aliased partner while XFRM interfaces were the plan).
    others, dummies = [], []
    for i in range(count - 1):
        if i % 2 == 0 or not aliased:
            others.append(PartnerNat(f"p{i:02d}", (IPv4Network(f"172.16.{i}.0/24"),)))
        else:
            others.append(
                PartnerNat(
                    f"p{i:02d}",
                    (IPv4Network("10.0.0.0/24"),),
                    aliases=(IPv4Network(f"100.64.{i}.0/24"),),
                    public_addresses=(IPv4Address(f"198.18.0.{i}"),),
                )
            )
    measured = PartnerNat(MEASURED, (bt.PARTNER_NET,))
    base = MultiPartnerBase((*others, measured), tunnel_interfaces=("eth1", *dummies))
    filler = [(str(m.private_ip), str(m.public_ip)) for m in bt.filler_mappings(mappings_each)]
    measured_rows = [(str(m.private_ip), str(m.public_ip)) for m in bt.mappings(mappings_each)]
    tables = {p.name: NatTable.from_rows(1, filler) for p in others}
    tables[MEASURED] = NatTable.from_rows(1, measured_rows)
    return base, tables, dummies


# ------------------------------------------------------------------------------------------------
# Root namespace side


class Chain:
    """cli ── gw ── srv, as bench.flows' topology, the gateway running the partners table."""

    def __init__(
        self, box: object, tag: str, partners: int, aliased: bool = True, sources: int = 254
    ) -> None:
        from bench import tables as bt
        from tunnelnat.core.nat import out_mark, render_partners_table

        self.box, self.bt = box, bt
        self.cli = box.netns(f"cli{tag}")  # type: ignore[attr-defined]
        self.gw = box.netns(f"gw{tag}")  # type: ignore[attr-defined]
        self.srv = box.netns(f"srv{tag}")  # type: ignore[attr-defined]
        box.veth(self.cli, "eth0", self.gw, "eth0")  # type: ignore[attr-defined]
        box.veth(self.gw, "eth1", self.srv, "eth0")  # type: ignore[attr-defined]
        box.ip_batch(self.cli, [  # type: ignore[attr-defined]
            "addr add 10.20.0.2/16 dev eth0",
            *[f"addr add 10.20.1.{k}/16 dev eth0" for k in range(1, sources + 1)],
            f"route add default via {bt.GW_CLIENT_SIDE}",
        ])  # fmt: skip
        base, tables, dummies = partner_set(partners, LARGE, aliased)
        gw_cmds = [
            f"addr add {bt.GW_CLIENT_SIDE}/16 dev eth0",
            f"addr add {bt.GW_PARTNER_SIDE}/24 dev eth1",
        ]
        for name in dummies:
            index = base.index(f"p{name[1:]}")  # type: ignore[attr-defined]
            gw_cmds += [
                # No dummy module here: a veth pair inside the namespace plays the tunnel device.
                f"link add {name} type veth peer name u{name[1:]}",
                f"link set {name} up",
                f"route add 10.0.0.0/24 dev {name} table {100 + index}",
                f"rule add fwmark {out_mark(index):#x} table {100 + index}",
            ]
        box.ip_batch(self.gw, gw_cmds)  # type: ignore[attr-defined]
        box.ip_batch(self.srv, [  # type: ignore[attr-defined]
            f"addr add {bt.APP}/24 dev eth0",
            f"route add default via {bt.GW_PARTNER_SIDE}",
        ])  # fmt: skip
        for key, value in (
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
        ):
            box.sysctl(self.gw, key, value)  # type: ignore[attr-defined]
        sink = (
            "table ip sink {\n  counter natted { }\n  counter other { }\n  chain pre {\n"
            "    type filter hook prerouting priority -300; policy accept;\n"
            f"    ip daddr {bt.APP} ip saddr 203.0.113.0/24 udp dport 1024-65535 "
            "counter name natted drop\n"
            f"    ip daddr {bt.APP} udp dport 1024-65535 counter name other drop\n  }}\n}}\n"
        )
        box.run(self.srv, ["nft", "-f", "-"], input=sink)  # type: ignore[attr-defined]
        started = time.perf_counter()
        text = render_partners_table(base, tables)
        self.render_seconds = time.perf_counter() - started
        started = time.perf_counter()
        box.run(self.gw, ["nft", "-f", "-"], input=text, timeout=900)  # type: ignore[attr-defined]
        self.load_seconds = time.perf_counter() - started
        self.sources = [f"10.20.1.{k}" for k in range(1, sources + 1)]
        self.partners = partners

    def env(self) -> dict:
        return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "lambdas")])}

    def ctflush(self) -> None:
        self.box.run(self.gw, [PYTHON, "-m", "bench.flows", "ctflush"], env=self.env())  # type: ignore[attr-defined]

    def counters(self, ns: str, table: str) -> dict:
        proc = self.box.run(ns, ["nft", "-j", "list", "counters"])  # type: ignore[attr-defined]
        out = {}
        for entry in json.loads(proc.stdout)["nftables"]:
            c = entry.get("counter")
            if c and c.get("table") == table:
                out[c["name"]] = c["packets"]
        return out

    def gen_argv(self, seconds: float, max_flows: int, workers: int) -> list[str]:
        return [PYTHON, "-m", "bench.flows", "gen", "--sources", ",".join(self.sources),
                "--dst", str(self.bt.APP), "--seconds", str(seconds), "--max", str(max_flows),
                "--workers", str(workers), "--sockets", str(len(self.sources))]  # fmt: skip

    def measure(self, seconds: float, max_flows: int, workers: int) -> dict:
        # Warm-up (ARP, caches), then forget its flows.
        self.box.run(self.cli, self.gen_argv(0.2, 5_000, workers), env=self.env(), timeout=120)  # type: ignore[attr-defined]
        self.ctflush()
        self.box.run(self.srv, ["nft", "reset", "counters", "table", "ip", "sink"])  # type: ignore[attr-defined]
        argv = self.gen_argv(seconds, max_flows, workers)
        proc = self.box.run(self.cli, argv, env=self.env(), timeout=seconds + 120)  # type: ignore[attr-defined]
        gen = json.loads(proc.stdout.strip().splitlines()[-1])
        sink = self.counters(self.srv, "sink")
        return {
            "sent": gen["sent"],
            "seconds": gen["seconds"],
            "delivered_natted": sink.get("natted", 0),
            "delivered_not_natted": sink.get("other", 0),
            "flows_per_second": sink.get("natted", 0) / gen["seconds"],
            "gateway_counters": {k: v for k, v in self.counters(self.gw, "tunnelnat").items() if v},
        }


def run_flows(box: object, config: dict) -> dict:
    # One generator process: the gateway's hooks then run in that process's softirq on one
    # core (veth delivers in the sender's context), so the figure is per-flow work, less
    # exposed to whatever else the shared cores are running.
    workers = int(config.get("workers") or 1)
    chains = {
        "1x10k": Chain(box, "1", 1),
        "50x10k": Chain(box, "50", PARTNERS),
        "50x10k-direct": Chain(box, "50d", PARTNERS, aliased=False),
    }
    samples: dict[str, list[dict]] = {c: [] for c in chains}
    names = list(chains)
    for rnd in range(config["rounds"]):
        order = names[rnd % len(names) :] + names[: rnd % len(names)]
        for cond in order:
            sample = chains[cond].measure(config["seconds"], config["max_flows"], workers)
            samples[cond].append(sample)
            sys.stderr.write(
                f"  [partners] round {rnd} {cond:13s} {sample['flows_per_second']:9.0f} flows/s "
                f"(sent {sample['sent']}, delivered {sample['delivered_natted']})\n"
            )
    out: dict = {"workers": workers, "conditions": {}}
    for cond, chain in chains.items():
        out["conditions"][cond] = {
            "partners": chain.partners,
            "mappings": chain.partners * LARGE,
            "render_seconds": round(chain.render_seconds, 3),
            "load_seconds": round(chain.load_seconds, 3),
            "flows_per_second": summary([s["flows_per_second"] for s in samples[cond]]),
            "samples": samples[cond],
        }
    fps = {c: out["conditions"][c]["flows_per_second"]["median"] for c in chains}
    # Paired: each round's back-to-back samples, so a slow spell of the shared machine
    # weighs on both sides of one ratio, not on one condition's median.
    for cond in ("50x10k", "50x10k-direct"):
        paired = [
            b["flows_per_second"] / a["flows_per_second"]
            for a, b in zip(samples["1x10k"], samples[cond], strict=True)
            if a["flows_per_second"]
        ]
        out["conditions"][cond]["ratio_of_medians"] = ratio(fps[cond], fps["1x10k"])
        out["conditions"][cond]["paired_ratios"] = [round(r, 3) for r in paired]
        out["conditions"][cond]["ratio"] = statistics.median(paired) if paired else None
    return out


def run_delta(box: object, config: dict) -> dict:
    from tunnelnat.core.nat import render_partners_table

    gw = box.netns("dgw")  # type: ignore[attr-defined]
    base, tables, dummies = partner_set(PARTNERS, DELTA_SIZE)
    box.ip_batch(
        gw, [f"link add {d} type veth peer name u{d[1:]}" for d in dummies] or ["link show lo"]
    )  # type: ignore[attr-defined]
    box.run(gw, ["nft", "-f", "-"], input=render_partners_table(base, tables), timeout=900)  # type: ignore[attr-defined]
    t = tables["p07"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "lambdas")])}
    argv = [PYTHON, "-m", "bench.partners", "delta-worker", "--iterations",
            str(config["delta_iterations"]), "--generation", str(t.generation),
            "--checksum", str(t.checksum), "--count", str(len(t))]  # fmt: skip
    proc = box.run(gw, argv, env=env, timeout=600)  # type: ignore[attr-defined]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["mappings"] = PARTNERS * DELTA_SIZE
    result["ratio"] = ratio(result["gateway"]["median"], result["raw"]["median"])
    return result


# ------------------------------------------------------------------------------------------------
# Inside the delta gateway namespace


def delta_worker(iterations: int, generation: int, checksum: int, count: int) -> dict:
    """Alternately: the gateway's render + ``nft -f`` of one added mapping for p07, and the raw
    ``nft -f`` of one prepared mapping (the same three elements). Each adds a mapping never
    seen before, so neither is refused."""
    from tunnelnat.core.nat import M32, TABLE, ipv4_int, mapping_digest, render_partner_delta

    gateway, raw, render = [], [], []
    fresh_p, fresh_s = int(IPv4Address("10.99.0.0")), int(IPv4Address("198.19.0.0"))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "change.nft"
        for k in range(iterations * 2):
            p, s = str(IPv4Address(fresh_p + k)), str(IPv4Address(fresh_s + k))
            if k % 2 == 0:
                started = time.perf_counter()
                checksum = (checksum + mapping_digest(ipv4_int(p), ipv4_int(s))) & M32
                count += 1
                generation += 1
                text = render_partner_delta("p07", [], [(p, s)], (generation, checksum, count))
                rendered = time.perf_counter()
                path.write_text(text)
                subprocess.run(["nft", "-f", str(path)], check=True)
                gateway.append(time.perf_counter() - started)
                render.append(rendered - started)
            else:
                path.write_text(
                    f"add element ip {TABLE} enrolled_p07 {{ {p} }}\n"
                    f"add element ip {TABLE} snat_p07 {{ {p} : {s} }}\n"
                    f"add element ip {TABLE} dnat_p07 {{ {s} : {p} }}\n"
                )
                started = time.perf_counter()
                subprocess.run(["nft", "-f", str(path)], check=True)
                raw.append(time.perf_counter() - started)
    return {"gateway": summary(gateway), "raw": summary(raw), "render": summary(render)}


# ------------------------------------------------------------------------------------------------


def markdown(flows: dict, delta: dict) -> str:
    conds = flows["conditions"]
    c1 = conds["1x10k"]
    f1 = c1["flows_per_second"]["median"]
    rows = [
        "| figure | measured | ratio | target |",
        "|---|---|---|---|",
    ]
    for cond, what in (
        ("50x10k", "24 of them through aliases, told apart by their S"),
        ("50x10k-direct", "none aliased"),
    ):
        c = conds[cond]
        r = c["ratio"]
        rows.append(
            f"| new flows/s, 50 partners x 10,000 ({what}) / 1 partner x 10,000 | "
            f"{c['flows_per_second']['median']:,.0f} / {f1:,.0f} (medians; their ratio "
            f"{c['ratio_of_medians']:.3f}) | {r:.3f} (median of {len(c['paired_ratios'])} "
            f"paired rounds) | >= 0.90 {'ok' if r >= 0.90 else 'MISSED'} |"
        )
    ms = 1000.0
    r2 = delta["ratio"]
    rows += [
        f"| one-mapping change, 50 x 1,000: render + nft -f / raw nft -f | "
        f"{delta['gateway']['median'] * ms:.2f} ms / {delta['raw']['median'] * ms:.2f} ms "
        f"(render {delta['render']['median'] * ms:.3f} ms) | {r2:.2f}x "
        f"| <= 2x {'ok' if r2 <= 2 else 'MISSED'} |",
        "",
        f"loads: 1 x 10k {c1['load_seconds']} s, 50 x 10k {conds['50x10k']['load_seconds']} s "
        f"(render {conds['50x10k']['render_seconds']} s); {flows['workers']} generator "
        f"process(es); samples per condition: {c1['flows_per_second']['runs']}",
    ]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.partners", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command")
    w = sub.add_parser("delta-worker")
    w.add_argument("--iterations", type=int, required=True)
    w.add_argument("--generation", type=int, required=True)
    w.add_argument("--checksum", type=int, required=True)
    w.add_argument("--count", type=int, required=True)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--seconds", type=float)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.command == "delta-worker":
        out = delta_worker(args.iterations, args.generation, args.checksum, args.count)
        print(json.dumps(out))
        return 0
    if os.geteuid() != 0:
        print("bench.partners needs root (network namespaces)", file=sys.stderr)
        return 2
    from bench.netns import Sandbox, remove_stale

    config = default_config(args.quick)
    if args.rounds:
        config["rounds"] = args.rounds
    if args.seconds:
        config["seconds"] = args.seconds
    remove_stale()
    started = time.perf_counter()
    with Sandbox() as box:
        delta = run_delta(box, config)
        flows = run_flows(box, config)
    result = {
        "config": config,
        "flows": flows,
        "delta": delta,
        "seconds": round(time.perf_counter() - started, 1),
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(flows, delta))
    print(f"\n(run time {result['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["default_config", "delta_worker", "main", "partner_set"]
