"""Part 1: applying the gateway's NAT table, tunnelnat's way vs raw nft vs the seed's way.

``run(box, ...)`` (root namespace) builds the gateway package (tools.gateway_package.build(): the
archive the stack ships), creates one throwaway namespace with a private /etc and runs ``python -m
bench.gateway_apply --driver CONFIG`` inside it. The driver starts moto's server on the
namespace's own loopback, puts the archive in a moto bucket and installs it with the production
installer (gateway/install_package.py, into /etc/tunnelnat/lib/gateway/<sha256>.pyz), seeds the
DynamoDB table, and for each size, interleaved:

* ``document``: the real SyncNatTable document bound to that archive
  (``lab.ssm_runner.run_document``: the YAML's script as the SSM agent runs it: bash, the
  package check, ``exec python3 <archive> sync``), end to end, from an empty ruleset (so the
  sync renders and applies the whole table);
* ``archive``: ``python3 <archive> sync`` as the document execs it, its own report's timings:
  ``seconds`` (the sync), ``dynamodb.seconds`` (its DynamoDB calls: moto), ``nft_seconds``;
  the process's wall time beside it;
* ``raw_nft``: ``nft -f`` of the very text the gateway renders;
* ``iptables_restore``: ``iptables-restore`` of the same mappings as linear rules;
* ``seed``: the seed's way, one ``iptables -t nat -A`` process per rule (a shell script inside
  the namespace). Run in full up to ``seed_full_max_rules``; beyond that the per-process cost is
  sampled at several table sizes and summed (the script's total is the sum of its processes).

Then a one-mapping change on the largest table (SyncNatTable's delta vs alternatives), and what
the archive costs at start-up: the same ``sync`` (and ``version``, no boto3) run from the archive
and from the source tree (``python3 -m tunnelnat_gateway``), interleaved.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import PYTHON, REPO, median, ratio, summary

REGION = "us-east-1"
TABLE = "tunnelnat-bench"
DOCUMENT = REPO / "ssm_documents" / "SyncNatTable.yaml"
MOTO_PORT = 5000
BUCKET = "tunnelnat-bench-software"
INSTALLER = REPO / "gateway" / "install_package.py"


def default_config(quick: bool = False) -> dict:
    if quick:
        return {
            "sizes": [1, 100, 1000],
            "reps": 2,
            "seed_full_max_rules": 400,
            "seed_sample_rules": [0, 1000, 1980],
            "seed_sample_calls": 10,
            "change_reps": 2,
        }
    return {
        "sizes": [1, 1000, 10000],
        "reps": 3,
        "seed_full_max_rules": 2000,
        "seed_sample_rules": [0, 2000, 5000, 10000, 15000, 19950],
        "seed_sample_calls": 25,
        "change_reps": 3,
    }


# ------------------------------------------------------------------------------------------------
# Root namespace side


def run(box: object, config: dict) -> dict:
    from tools.gateway_package import build

    package = build()  # the bytes the stack ships (reproducible)
    config = {**config, "package": str(package.path), "sha256": package.sha256,
              "version": package.version}  # fmt: skip
    ns = box.netns("apply")  # type: ignore[attr-defined]
    box.private_etc(ns)  # type: ignore[attr-defined]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "lambdas"), str(REPO / "gateway")]),
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    proc = box.run(  # type: ignore[attr-defined]
        ns, [PYTHON, "-m", "bench.gateway_apply", "--driver", json.dumps(config)],
        env=env, timeout=900,
    )  # fmt: skip
    if proc.stderr.strip():
        sys.stderr.write(proc.stderr)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["namespace"] = ns
    return result


# ------------------------------------------------------------------------------------------------
# Inside the namespace


def _sh(argv: list[str], *, input: str | None = None, check: bool = True) -> str:
    proc = subprocess.run(argv, input=input, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)[:120]}: {proc.stderr.strip()[-500:]}")
    return proc.stdout


def _timed_sh(argv: list[str], *, input: str | None = None) -> float:
    started = time.perf_counter()
    _sh(argv, input=input)
    return time.perf_counter() - started


def _timed_sh_env(argv: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd="/", check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)[:120]}: {proc.stderr.strip()[-500:]}")
    return time.perf_counter() - started


def _flush() -> None:
    _sh(["nft", "flush", "ruleset"])


def _log(msg: str) -> None:
    sys.stderr.write(f"  [apply] {msg}\n")
    sys.stderr.flush()


class Driver:
    def __init__(self, config: dict, workdir: Path) -> None:
        import boto3

        self.config = config
        self.workdir = workdir
        self.endpoint = f"http://127.0.0.1:{config.get('moto_port', MOTO_PORT)}"
        self.env = {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        self.db = boto3.session.Session().client(
            "dynamodb",
            region_name=REGION,
            endpoint_url=self.endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",  # noqa: S106 - moto's dummy credentials
        )
        self.stored: dict[str, tuple[str, str]] = {}  # instance id -> (private, public)
        self.generation = 0
        self.sha256 = str(config["sha256"])
        self.package = ""  # where the installer put it
        from lab.ssm_runner import default_env

        # python3 as the document finds it (the agent's PATH: the venv's, with boto3, first).
        self.python3 = shutil.which("python3", path=default_env()["PATH"]) or "python3"

    def install_package(self, path: str) -> None:
        """The archive into a moto bucket, then onto this "gateway" by the production installer,
        as the user data does: the documents find it installed."""
        s3 = __import__("boto3").session.Session().client(
            "s3", region_name=REGION, endpoint_url=self.endpoint,
            aws_access_key_id="testing", aws_secret_access_key="testing",  # noqa: S106
        )  # fmt: skip
        s3.create_bucket(Bucket=BUCKET)
        s3.put_object(Bucket=BUCKET, Key=Path(path).name, Body=Path(path).read_bytes())
        argv = [self.python3, str(INSTALLER), "--bucket", BUCKET, "--key", Path(path).name,
                "--sha256", self.sha256, "--region", REGION]  # fmt: skip
        out = subprocess.run(argv, capture_output=True, text=True, env=self.agent_env())
        if out.returncode != 0:
            raise RuntimeError(f"install_package: {out.stderr.strip()[-500:]}")
        self.package = out.stdout.strip().splitlines()[-1]
        self.bucket_key = Path(path).name

    # -- DynamoDB ------------------------------------------------------------------------------
    def create_table(self) -> None:
        self.db.create_table(
            TableName=TABLE,
            KeySchema=[
                {"AttributeName": "pk", "KeyType": "HASH"},
                {"AttributeName": "sk", "KeyType": "RANGE"},
            ],
            AttributeDefinitions=[
                {"AttributeName": "pk", "AttributeType": "S"},
                {"AttributeName": "sk", "AttributeType": "S"},
            ],
            BillingMode="PAY_PER_REQUEST",
        )

    @staticmethod
    def instance_id(private_ip: object) -> str:
        import ipaddress

        return f"i-{int(ipaddress.IPv4Address(str(private_ip))):017x}"

    def store(self, maps: list) -> None:
        """Make the table's mappings exactly ``maps`` and bump the generation."""
        wanted = {
            self.instance_id(m.private_ip): (str(m.private_ip), str(m.public_ip)) for m in maps
        }
        requests = []
        for iid in set(self.stored) - set(wanted):
            requests.append({"DeleteRequest": {"Key": {"pk": {"S": "mapping"}, "sk": {"S": iid}}}})
        for iid, (p, s) in wanted.items():
            if self.stored.get(iid) != (p, s):
                item = {
                    "pk": {"S": "mapping"},
                    "sk": {"S": iid},
                    "private_ip": {"S": p},
                    "public_ip": {"S": s},
                    "generation": {"N": str(self.generation + 1)},
                }
                requests.append({"PutRequest": {"Item": item}})
        for k in range(0, len(requests), 25):
            reply = self.db.batch_write_item(RequestItems={TABLE: requests[k : k + 25]})
            if reply.get("UnprocessedItems"):
                raise RuntimeError("moto left items unprocessed")
        self.stored = wanted
        self.bump()

    def bump(self) -> None:
        """A bulk load's generation, with the checksum of what is stored (as the store keeps
        it); no change-log entry: a gateway that had an older table rebuilds it (gap)."""
        from ipaddress import IPv4Address

        from tunnelnat.core.nat import mapping_digest

        self.generation += 1
        checksum = sum(
            mapping_digest(int(IPv4Address(p)), int(IPv4Address(s)))
            for p, s in self.stored.values()
        )
        self.db.put_item(
            TableName=TABLE,
            Item={
                "pk": {"S": "meta"},
                "sk": {"S": "generation"},
                "generation": {"N": str(self.generation)},
                "checksum": {"N": str(checksum)},
                "checksum_from": {"N": "0"},
            },
        )

    def change(self, old: object, new: object) -> None:
        """One mapping's change as the controller writes it: the store's transaction (the
        mapping, its private claim, the change-log entry, the generation and checksum)."""
        from tunnelnat.adapters.store import EnrolmentStore, MappingChange, StoredMapping

        iid = self.instance_id(old.private_ip)  # type: ignore[attr-defined]
        before = StoredMapping(iid, old.private_ip, old.public_ip)  # type: ignore[attr-defined]
        after = StoredMapping(iid, new.private_ip, new.public_ip)  # type: ignore[attr-defined]
        store = EnrolmentStore(self.db, TABLE)
        self.generation = store.write_mappings(
            [MappingChange(iid, after, before, release_private=False)],
            generation=self.generation,
            claim=False,
        )
        self.stored[iid] = (str(new.private_ip), str(new.public_ip))  # type: ignore[attr-defined]

    # -- the apply paths -----------------------------------------------------------------------
    def document(self, expect: str) -> dict:
        from lab.ssm_runner import run_document

        binding = {"sha256": self.sha256, "bucket": BUCKET, "key": self.bucket_key,
                   "region": REGION}  # fmt: skip
        started = time.perf_counter()
        inv = run_document(DOCUMENT, {"TableName": TABLE, "Region": REGION}, env=self.env,
                           timeout=300, binding=binding)  # fmt: skip
        seconds = time.perf_counter() - started
        if not inv.ok:
            raise RuntimeError(f"SyncNatTable {inv.status}: {inv.stderr.strip()[-800:]}")
        report = json.loads(inv.stdout.strip().splitlines()[-1])
        self._expect("SyncNatTable", report, expect)
        return {"seconds": seconds, "report": report}

    def _expect(self, what: str, report: dict, expect: str) -> None:
        if report.get("action") != expect or report.get("applied_generation") != self.generation:
            raise RuntimeError(f"{what} reported {report}, expected {expect} @{self.generation}")

    def archive(self, expect: str, *, source: bool = False) -> dict:
        """``python3 <archive> sync`` as the document execs it (``source``: the same code from
        the source tree, ``python3 -m tunnelnat_gateway``), timed by its own report. The
        document's environment (the agent's), whatever the bench's own holds."""
        env = self.agent_env()
        if source:
            argv = [self.python3, "-m", "tunnelnat_gateway"]
            env["PYTHONPATH"] = os.pathsep.join([str(REPO / "gateway"), str(REPO / "lambdas")])
        else:
            argv = [self.python3, self.package]
        argv += ["sync", "--table", TABLE, "--region", REGION]
        started = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd="/")
        wall = time.perf_counter() - started
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:3])} sync: {proc.stderr.strip()[-800:]}")
        report = json.loads(proc.stdout.strip().splitlines()[-1])
        self._expect("sync", report, expect)
        api = float(report["dynamodb"]["seconds"])
        total = float(report["seconds"])
        nft = float(report.get("nft_seconds", 0.0))
        return {
            "process": wall,
            "start_up": wall - total,  # python3, imports, boto3's client, the JSON line
            "total": total,
            "dynamodb_api": api,
            "dynamodb_calls": report["dynamodb"]["calls"],
            "dynamodb_items": report["items_read"],  # the meta item + rows or change entries
            "nft_apply": nft,
            "other": total - api - nft,  # building the table, rendering, reading the kernel
            "apply_excl_api": total - api,
        }

    def agent_env(self) -> dict[str, str]:
        from lab.ssm_runner import default_env

        return {**default_env(), **self.env}

    def version_wall(self, *, source: bool) -> float:
        """Python's start-up and the package's import alone (``version``: no boto3)."""
        env = self.agent_env()
        if source:
            argv = [self.python3, "-m", "tunnelnat_gateway", "version"]
            env["PYTHONPATH"] = os.pathsep.join([str(REPO / "gateway"), str(REPO / "lambdas")])
        else:
            argv = [self.python3, self.package, "version"]
        return _timed_sh_env(argv, env)

    def raw_nft(self, text: str) -> float:
        path = self.workdir / "ruleset.nft"
        path.write_text(text)
        return _timed_sh(["nft", "-f", str(path)])

    def restore(self, text: str) -> float:
        path = self.workdir / "rules.v4"
        path.write_text(text)
        started = time.perf_counter()
        with path.open() as f:
            subprocess.run(["iptables-restore"], stdin=f, check=True, capture_output=True)
        return time.perf_counter() - started

    def seed_script(self, text: str) -> float:
        path = self.workdir / "seed.sh"
        path.write_text(text)
        return _timed_sh(["bash", str(path)])

    def count_elements(self, name: str) -> int:
        out = _sh(["nft", "-j", "list", "map", "ip", "tunnelnat", name])
        for entry in json.loads(out)["nftables"]:
            if "map" in entry:
                return len(entry["map"].get("elem", []))
        return 0

    def count_iptables_rules(self) -> int:
        out = _sh(["iptables-save", "-t", "nat"])
        return sum(1 for line in out.splitlines() if line.startswith("-A "))


def drive(config: dict) -> dict:
    from bench import tables

    work = Path(tempfile.mkdtemp(prefix="tn-bench-apply-"))
    port = config.get("moto_port", MOTO_PORT)
    moto = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        _wait_port(port)
        d = Driver(config, work)
        d.create_table()
        d.install_package(config["package"])
        base = tables.gateway_base("eth1")
        Path("/etc/tunnelnat").mkdir(parents=True, exist_ok=True)
        Path("/etc/tunnelnat/gateway.json").write_text(json.dumps(base.to_json()))
        results: dict = {"sizes": {}, "config": config}
        largest = None
        for n in config["sizes"]:
            largest = n
            results["sizes"][str(n)] = _one_size(d, tables, n, config)
        results["seed_model"] = _seed_model(d, tables, config, results)
        if largest is not None:
            results["change"] = _one_change(d, tables, largest, config)
        return results
    finally:
        moto.terminate()
        try:
            moto.wait(timeout=5)
        except subprocess.TimeoutExpired:
            moto.kill()
        _flush()
        subprocess.run(["rm", "-rf", str(work)], check=False)


def _wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError("moto's server did not start")


def _one_size(d: Driver, tables: object, n: int, config: dict) -> dict:
    maps = tables.mappings(n)  # type: ignore[attr-defined]
    t0 = time.perf_counter()
    d.store(maps)
    _log(f"{n} mappings stored in moto in {time.perf_counter() - t0:.1f}s")
    text = tables.render_nft(maps, d.generation)  # type: ignore[attr-defined]
    rules = tables.linear_rules(maps)  # type: ignore[attr-defined]
    restore_text = tables.iptables_restore_text(rules)  # type: ignore[attr-defined]
    runs: dict[str, list] = {k: [] for k in ("document", "raw_nft", "iptables_restore")}
    phases: list[dict] = []
    for _ in range(config["reps"]):
        _flush()
        runs["document"].append(d.document("full")["seconds"])
        _flush()
        phases.append(d.archive("full"))
        _flush()
        runs["raw_nft"].append(d.raw_nft(text))
        _flush()
        runs["iptables_restore"].append(d.restore(restore_text))
    checks = {"iptables_rules": d.count_iptables_rules()}
    _flush()
    d.raw_nft(text)
    checks["snat_map_elements"] = d.count_elements("snat_map")
    checks["dnat_map_elements"] = d.count_elements("dnat_map")
    if checks["snat_map_elements"] != n or checks["iptables_rules"] != 2 * n:
        raise RuntimeError(f"{n} mappings: the kernel holds {checks}")
    seed: dict = {"measured": False}
    if 2 * n <= config["seed_full_max_rules"]:
        reps = max(1, config["reps"] if n <= 10 else 1)
        times = []
        for _ in range(reps):
            _flush()
            times.append(d.seed_script(tables.seed_script(rules)))  # type: ignore[attr-defined]
        seed = {"measured": True, "processes": 2 * n, **summary(times)}
    out = {
        "mappings": n,
        "ruleset_bytes": len(text),
        "document": summary(runs["document"]),
        "archive": {k: summary([p[k] for p in phases]) for k in phases[0]},
        "raw_nft": summary(runs["raw_nft"]),
        "iptables_restore": summary(runs["iptables_restore"]),
        "seed": seed,
        "checks": checks,
    }
    _log(
        f"{n}: document {median(runs['document']):.3f}s, raw nft {median(runs['raw_nft']):.3f}s, "
        f"restore {median(runs['iptables_restore']):.3f}s, seed {seed.get('median')}"
    )
    return out


def _seed_model(d: Driver, tables: object, config: dict, results: dict) -> dict:
    """Per-process cost of ``iptables -t nat -A`` at several table sizes, to sum the seed's
    script where running it in full would take minutes."""
    sizes = [int(k) for k in config["seed_sample_rules"]]
    calls = int(config["seed_sample_calls"])
    rules = tables.linear_rules(tables.filler_mappings((max(sizes) + calls) // 2 + 1))  # type: ignore[attr-defined]
    samples = []
    for k in sizes:
        _flush()
        d.restore(tables.iptables_restore_text(rules[:k]))  # type: ignore[attr-defined]
        seconds = d.seed_script(tables.seed_script(rules[k : k + calls]))  # type: ignore[attr-defined]
        samples.append({"rules_in_table": k, "per_process": seconds / calls})
    _flush()
    model = {"samples": samples, "calls_per_sample": calls, "predicted": {}}
    for n_text, res in results["sizes"].items():
        n = int(n_text)
        predicted = predict_seed(samples, 2 * n)
        model["predicted"][n_text] = predicted
        if not res["seed"]["measured"]:
            res["seed"] = {"measured": False, "processes": 2 * n, "median": predicted,
                           "note": "extrapolated: sum of per-process costs sampled at "
                           f"{', '.join(str(k) for k in sizes)} rules in the table"}  # fmt: skip
        else:
            res["seed"]["model_prediction"] = predicted
    return model


def predict_seed(samples: list[dict], processes: int) -> float:
    """Sum over k = 0..processes-1 of the per-process cost at k rules, linearly interpolated
    (and extrapolated from the last two samples beyond them)."""
    pts = sorted((s["rules_in_table"], s["per_process"]) for s in samples)
    if not pts:
        return 0.0
    if len(pts) == 1:
        return pts[0][1] * processes

    def cost(k: int) -> float:
        i = 0
        while i < len(pts) - 2 and k > pts[i + 1][0]:
            i += 1
        (x0, y0), (x1, y1) = pts[i], pts[i + 1]
        return y0 + (y1 - y0) * (k - x0) / (x1 - x0) if x1 != x0 else y1

    return sum(max(cost(k), 0.0) for k in range(processes))


def _one_change(d: Driver, tables: object, n: int, config: dict) -> dict:
    """Change one mapping's public address on an n-mapping table, each way, alternately."""
    from tunnelnat.core.nat import NatMapping, NatTable, render_map_update

    maps = list(tables.mappings(n))  # type: ignore[attr-defined]
    victim_index = 0  # a filler (or the only mapping): its S changes, its P stays
    _flush()
    d.store(maps)
    d.document("full")
    restore_rules = tables.linear_rules(maps)  # type: ignore[attr-defined]
    d.restore(tables.iptables_restore_text(restore_rules))  # type: ignore[attr-defined]
    ipt_maps = list(maps)  # what the iptables nat table holds (alongside ip tunnelnat)
    runs: dict[str, list] = {
        k: [] for k in ("document", "raw_nft_map_update", "raw_nft_one_element", "seed",
                        "iptables_restore")
    }  # fmt: skip
    phases: list[dict] = []
    source: list[dict] = []
    current = maps[victim_index]
    spare = list(tables.SPARE_PUBLIC)  # type: ignore[attr-defined]

    def changed(old: NatMapping) -> NatMapping:
        """The same P with the other spare S (never the one it has: a real change)."""
        return NatMapping(old.private_ip, spare[1] if old.public_ip == spare[0] else spare[0])

    def one_element(old: NatMapping, new: NatMapping) -> str:
        return "\n".join([
            f"delete element ip tunnelnat snat_map {{ {old.private_ip} }}",
            f"add element ip tunnelnat snat_map {{ {new.private_ip} : {new.public_ip} }}",
            f"delete element ip tunnelnat dnat_map {{ {old.public_ip} }}",
            f"add element ip tunnelnat dnat_map {{ {new.public_ip} : {new.private_ip} }}",
            "flush set ip tunnelnat applied_generation",
            f"add element ip tunnelnat applied_generation {{ {d.generation} }}",
        ]) + "\n"  # fmt: skip

    for _ in range(config["change_reps"]):
        # SyncNatTable document: the store's write, then the delta it really applies.
        new = changed(current)
        d.change(current, new)
        maps[victim_index] = current = new
        runs["document"].append(d.document("delta")["seconds"])
        # The archive's sync as the document execs it: its phases and items read.
        new = changed(current)
        d.change(current, new)
        maps[victim_index] = current = new
        phases.append(d.archive("delta"))
        # The same sync from the source tree: what running from the archive costs.
        new = changed(current)
        d.change(current, new)
        maps[victim_index] = current = new
        source.append(d.archive("delta", source=True))
        # Raw nft: the whole map update (flush the maps, add every element) of the same table.
        text = render_map_update(NatTable(d.generation, tuple(maps)))
        runs["raw_nft_map_update"].append(d.raw_nft(text))
        # Raw nft: only that element changed, then back (untimed): the kernel stays the store's.
        new = changed(current)
        runs["raw_nft_one_element"].append(d.raw_nft(one_element(current, new)))
        d.raw_nft(one_element(new, current))
    # iptables: the seed's way (delete the two old rules, append two new) vs a full restore.
    ipt_current = ipt_maps[victim_index]
    for _ in range(config["change_reps"]):
        new = changed(ipt_current)
        script = "\n".join([
            "set -e",
            f"iptables -t nat -D POSTROUTING {' '.join(tables.snat_spec(ipt_current))}",  # type: ignore[attr-defined]
            f"iptables -t nat -D PREROUTING {' '.join(tables.dnat_spec(ipt_current))}",  # type: ignore[attr-defined]
            f"iptables -t nat -A POSTROUTING {' '.join(tables.snat_spec(new))}",  # type: ignore[attr-defined]
            f"iptables -t nat -A PREROUTING {' '.join(tables.dnat_spec(new))}",  # type: ignore[attr-defined]
        ]) + "\n"  # fmt: skip
        runs["seed"].append(d.seed_script(script))
        ipt_current = new
        ipt_maps[victim_index] = new
        runs["iptables_restore"].append(
            d.restore(tables.iptables_restore_text(tables.linear_rules(ipt_maps)))  # type: ignore[attr-defined]
        )
    if d.count_iptables_rules() != 2 * n:
        raise RuntimeError("the iptables one-mapping change lost or duplicated rules")
    _flush()
    out = {k: summary(v) for k, v in runs.items()}
    out["archive"] = {k: summary([p[k] for p in phases]) for k in phases[0]}
    out["source"] = {k: summary([p[k] for p in source]) for k in source[0]}
    versions: dict[str, list[float]] = {"archive": [], "source": []}
    for _ in range(config.get("startup_reps", 7)):
        versions["archive"].append(d.version_wall(source=False))
        versions["source"].append(d.version_wall(source=True))
    out["version_start_up"] = {k: summary(v) for k, v in versions.items()}
    out["mappings"] = n
    out["seed"]["processes"] = 4
    _log(
        f"one change @{n}: document {median(runs['document']):.3f}s, map update "
        f"{median(runs['raw_nft_map_update']):.3f}s, one element "
        f"{median(runs['raw_nft_one_element']):.4f}s, seed {median(runs['seed']):.3f}s"
    )
    return out


def ratios(result: dict) -> dict:
    """The figures the issue's targets are about, per size."""
    out = {}
    for n, res in result["sizes"].items():
        raw = res["raw_nft"]["median"]
        doc = res["document"]["median"]
        excl = res["archive"]["apply_excl_api"]["median"]
        seed = res["seed"].get("median")
        out[n] = {
            "document_over_raw_nft": ratio(doc, raw),
            "sync_excl_api_over_raw_nft": ratio(excl, raw),
            "seed_over_document": ratio(seed, doc),
            "seed_over_sync_excl_api": ratio(seed, excl),
            "iptables_restore_over_raw_nft": ratio(res["iptables_restore"]["median"], raw),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.gateway_apply")
    parser.add_argument("--driver", required=True, help="JSON config; run inside the namespace")
    args = parser.parse_args(argv)
    result = drive(json.loads(args.driver))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
