"""Several partners on one gateway (issue 23): ConfigureGateway with PartnersPath and the sync of
each lane, against the real nft in a private network namespace.

Three lanes published as the stack publishes them (one SSM String parameter each under
``/tunnelnat/<deployment>/partners``, moto), each with its own DynamoDB table written by the real
store (its change log and checksum): ``bank-a`` (10.0.0.0/24, its own pool), ``bee``
(172.20.0.0/24, one shared S) and ``clear`` (10.0.0.0/24 too, reached through its alias
100.64.1.0/24, its own pool). Each lane syncs on its own: every step records the kernel's sets and
maps before and after, and the tests assert that a lane's delta, gap, drift or forced rebuild
changed that lane's elements only, and that each lane ends with exactly what a full rebuild of its
table holds. One script runs every step in order in one namespace (one moto start).
"""

from __future__ import annotations

import json
import textwrap

import pytest

from tests.unit.test_gateway_program import PRELUDE, REPO, pytestmark, run  # noqa: F401

BODY = textwrap.dedent(
    """
    import contextlib, io
    from ipaddress import IPv4Network as N
    from tunnelnat.core.lanes import Lane, parameter_path
    from tunnelnat.core.nat import partner_set_names
    from tunnelnat_gateway import configure_gateway as cg
    g.SOURCE_FILE = g.STATE_DIR / "source.json"
    cg.SYSCTL_FILE = g.STATE_DIR / "sysctl.d" / "90-tunnelnat.conf"
    cg.LOCK_FILE = g.STATE_DIR / "configure.lock"
    os.environ["TN_CLOUD_INIT"] = "done"
    ssm = boto3.client("ssm")
    DEPLOYMENT = "tnlab"

    # The tunnels ConfigureTunnel recorded for the three partners, under a root of their own
    # with swanctl and ip shims (never this machine's /etc or a real charon's vici socket).
    from tunnelnat_gateway import tunnel as tn
    ROOT, SHIMS = g.STATE_DIR / "gwroot", g.STATE_DIR / "shims"
    SHIMS.mkdir()
    (SHIMS / "swanctl").write_text(f'#!/bin/sh\\necho "$*" >> {g.STATE_DIR}/swanctl-calls\\n')
    (SHIMS / "ip").write_text("#!/bin/sh\\nexit 0\\n")
    for shim in SHIMS.iterdir():
        shim.chmod(0o755)
    for d in ("etc/swanctl/conf.d", "etc/strongswan.d", "etc/tunnelnat/tunnels"):
        (ROOT / d).mkdir(parents=True)
    for i, name in enumerate(("bank-a", "bee", "clear"), 1):
        (ROOT / f"etc/swanctl/conf.d/tunnelnat-{name}.conf").write_text("connections {}\\n")
        (ROOT / f"etc/swanctl/conf.d/tunnelnat-{name}.secret.conf").write_text("secrets {}\\n")
        facts = {"children": [name], "partner_endpoint": f"198.51.100.{i}"}
        (ROOT / f"etc/tunnelnat/tunnels/{name}.json").write_text(json.dumps(facts))
        charon = {"dpd_timeout": 30, "log": "/var/log/tunnelnat/charon.log"}
        (ROOT / f"etc/tunnelnat/tunnels/{name}.charon").write_text(json.dumps(charon))
    cg.TUNNEL_HOST = lambda: tn.Host(root=ROOT, env={"PATH": f"{SHIMS}:/usr/bin:/bin"})

    def tunnels_left():
        return sorted(p.name for p in (ROOT / "etc/tunnelnat/tunnels").iterdir())

    def lane(name, index, nets, mode, pool=(), shared=None, aliases=()):
        return Lane(deployment=DEPLOYMENT, name=name, index=index,
                    endpoint=A(f"198.51.100.{index}"), networks=tuple(map(N, nets)),
                    aliases=tuple(map(N, aliases)), nat_mode=mode, pool=tuple(map(A, pool)),
                    shared_address=A(shared) if shared else None,
                    tag_key=f"tunnelnat:enrolled:partner:{name}")

    LANES = [
        lane("bank-a", 1, ["10.0.0.0/24"], "dedicated", [f"203.0.113.{i}" for i in range(10, 16)]),
        lane("bee", 2, ["172.20.0.0/24"], "shared", shared="203.0.113.30"),
        lane("clear", 3, ["10.0.0.0/24"], "dedicated", [f"203.0.113.{i}" for i in range(20, 26)],
             aliases=["100.64.1.0/24"]),
    ]
    BY = {x.name: x for x in LANES}
    for x in LANES:
        ssm.put_parameter(Name=x.parameter, Value=x.to_json(), Type="String")
        db.create_table(TableName=x.table, BillingMode="PAY_PER_REQUEST",
            KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"},
                       {"AttributeName": "sk", "KeyType": "RANGE"}],
            AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"},
                                  {"AttributeName": "sk", "AttributeType": "S"}])
    # Another deployment's lane beside ours: never read (GetParametersByPath of our path only).
    other = Lane.from_dict({**LANES[0].as_dict(), "deployment": "other"})
    ssm.put_parameter(Name=other.parameter, Value=other.to_json(), Type="String")
    db.create_table(TableName="tnlab", BillingMode="PAY_PER_REQUEST",
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"},
                   {"AttributeName": "sk", "KeyType": "RANGE"}],
        AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"},
                              {"AttributeName": "sk", "AttributeType": "S"}])
    stores = {x.name: EnrolmentStore(db, x.table) for x in LANES}
    gens = {x.name: 0 for x in LANES}
    held = {x.name: {} for x in LANES}  # instance number -> StoredMapping

    def put(name, i, p, s):
        old = held[name].get(i)
        new = m(i, p, s)
        gens[name] = stores[name].write_mappings([MappingChange(new.instance_id, new, old)],
            generation=gens[name], claim=BY[name].nat_mode != "shared")
        held[name][i] = new

    def drop(name, i):
        old = held[name].pop(i)
        gens[name] = stores[name].write_mappings([MappingChange(old.instance_id, None, old)],
            generation=gens[name], claim=BY[name].nat_mode != "shared")

    def handle():
        if nft("list", "table", "ip", "tunnelnat").returncode:
            return None
        for e in json.loads(nft("-j", "list", "table", "ip", "tunnelnat").stdout)["nftables"]:
            if "table" in e:
                return e["table"]["handle"]

    def desired():
        # What a full rebuild of each lane's table holds, read independently of the sync.
        out = {}
        for x in LANES:
            try:
                t = g.read_desired(db, x.table, "shared" if x.nat_mode == "shared" else "dedicated")
            except Exception:
                continue
            enrolled, snat, dnat, _ = partner_set_names(x.name)
            out[enrolled] = sorted(json.dumps(p) for p, _ in t.rows)
            if x.nat_mode != "shared":
                out[snat] = sorted(json.dumps([p, s]) for p, s in t.rows)
                out[dnat] = sorted(json.dumps([s, p]) for p, s in t.rows)
            out["state:" + x.name] = [t.generation, t.checksum, len(t.rows)]
        return out

    def kernel():
        if nft("list", "table", "ip", "tunnelnat").returncode:
            return {}  # no table yet
        sets = listing()
        for x in LANES:
            applied = sets.get(partner_set_names(x.name)[3], [])
            states = sorted(json.loads(e)["concat"] for e in applied)
            sets["state:" + x.name] = states[-1] if states else None
        return sets

    def cli(*argv):
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = g.main(list(argv))
        line = stdout.getvalue().strip()
        return {"code": code, "report": json.loads(line) if line else None,
                "stderr": stderr.getvalue()}

    def step(name, action):
        before, h = kernel(), handle()
        result = action()
        out.append({"step": name, "result": result, "before": before, "after": kernel(),
                    "wanted": desired(), "handle_before": h, "handle_after": handle()})

    def configure(*extra, path=parameter_path(DEPLOYMENT)):
        stdout, stderr = io.StringIO(), io.StringIO()
        argv = ["--partner-networks", "192.0.2.0/24", "--table", "tnlab", "--region", "us-east-1",
                "--backend", "libipsec", "--partners-path", path, "--partners-digest", "ab" * 32,
                *extra]
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = cg.main(argv, client=db, ssm=ssm)
        line = stdout.getvalue().strip()
        return {"code": code, "report": json.loads(line) if line else None,
                "stderr": stderr.getvalue(),
                "forwarding": Path("/proc/sys/net/ipv4/ip_forward").read_text().strip()}

    put("bank-a", 1, "10.10.1.21", "203.0.113.10")
    put("bank-a", 2, "10.10.1.22", "203.0.113.11")
    put("bee", 1, "10.10.1.21", "203.0.113.30")
    put("clear", 1, "10.10.1.21", "203.0.113.20")
    put("clear", 2, "10.10.1.22", "203.0.113.21")

    step("configure", configure)
    out.append({"files": {"base": json.loads(g.BASE_FILE.read_text()),
                          "source": json.loads(g.SOURCE_FILE.read_text()),
                          "boot": g.BOOT_RULESET.read_text(),
                          "guard": nft("list", "chain", "ip", "tunnelnat", "guard").stdout,
                          "classify": nft("list", "chain", "ip", "tunnelnat", "classify").stdout}})

    # boot: the kernel forgot everything; the restore unit loaded the saved (empty) ruleset.
    def boot():
        nft("flush", "ruleset")
        assert nft("-f", str(g.BOOT_RULESET)).returncode == 0
        booted, h = kernel(), handle()
        return {"booted": booted, "handle_booted": h, **cli("sync")}
    step("boot", boot)

    put("bee", 2, "10.10.1.23", "203.0.113.30")
    step("delta-bee", lambda: cli("sync", "--table", "tnlab-bee", "--region", "us-east-1"))

    step("unchanged-bank-a",
         lambda: cli("sync", "--table", "tnlab-bank-a", "--region", "us-east-1"))

    # gap: clear's next change-log entry expired and was deleted.
    put("clear", 3, "10.10.1.23", "203.0.113.22")
    db.delete_item(TableName="tnlab-clear",
                   Key={"pk": {"S": "change"}, "sk": {"S": f"{gens['clear']:020d}"}})
    step("gap-clear", lambda: cli("sync", "--table", "tnlab-clear", "--region", "us-east-1"))

    # drift behind the program's back, bank-a's generation unchanged.
    def by_hand():
        nft("delete", "element", "ip", "tunnelnat", "snat_bank_a", "{ 10.10.1.22 }")
        return cli("sync", "--table", "tnlab-bank-a", "--region", "us-east-1")
    step("drift-bank-a", by_hand)

    def forced():
        nft("delete", "element", "ip", "tunnelnat", "enrolled_clear", "{ 10.10.1.23 }")
        return cli("sync", "--table", "tnlab-clear", "--region", "us-east-1", "--full")
    step("forced-clear", forced)

    # The deployment's own table, or any other, is no lane's: refused, nothing applied.
    step("refused", lambda: [cli("sync", "--table", t, "--region", "us-east-1")
                             for t in ("tnlab", "tnlab-nobody")])

    # Many one-mapping changes: applied_<name> grows by one each and is retired in batches.
    def many():
        reports = []
        for k in range(g.RETIRE_AT + 6):
            if k % 2:
                drop("bank-a", 9)
            else:
                put("bank-a", 9, "10.10.1.29", "203.0.113.15")
            reports.append(cli("sync", "--table", "tnlab-bank-a", "--region", "us-east-1"))
        return {"actions": sorted({r["report"]["action"] for r in reports}),
                "applied": len(json.loads(nft("-j", "list", "set", "ip", "tunnelnat",
                                               "applied_bank_a").stdout)["nftables"][1]["set"]["elem"])}
    step("many-bank-a", many)

    # One lane's table gone: every other lane still syncs, the run fails naming that lane.
    def one_lane_fails():
        db.delete_table(TableName="tnlab-clear")
        put("bee", 3, "10.10.1.24", "203.0.113.30")
        return cli("sync")
    step("clear-missing", one_lane_fails)

    # ConfigureGateway while clear's table is gone: the others loaded and served, clear empty
    # with nothing applied, the run failing naming it.
    step("configure-clear-missing", configure)

    # A lane set that contradicts itself (clear2 overlaps bank-a's network with bank-a's S):
    # ConfigureGateway refuses it whole, the table stays as it was.
    bad = lane("clear2", 4, ["10.0.0.0/24"], "dedicated", ["203.0.113.10"],
               aliases=["100.64.2.0/24"])
    ssm.put_parameter(Name=bad.parameter, Value=bad.to_json(), Type="String")
    step("configure-refused", configure)
    refused_left = tunnels_left()

    # bee removed from the partners file (its parameter gone; clear's table back): the next
    # ConfigureGateway (a new PartnersDigest) rebuilds the table from the two lanes left, so
    # bee's sets are gone with its lane, and removes bee's tunnel, the others' kept.
    ssm.delete_parameter(Name=bad.parameter)
    ssm.delete_parameter(Name=BY["bee"].parameter)
    # The partners file's order gives the indexes (Partners.lanes): clear moves up to 2.
    import dataclasses
    moved = dataclasses.replace(BY["clear"], index=2)
    ssm.put_parameter(Name=moved.parameter, Value=moved.to_json(), Type="String", Overwrite=True)
    db.create_table(TableName="tnlab-clear", BillingMode="PAY_PER_REQUEST",
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"},
                   {"AttributeName": "sk", "KeyType": "RANGE"}],
        AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"},
                              {"AttributeName": "sk", "AttributeType": "S"}])
    for n in list(held["clear"]):
        held["clear"].pop(n)
    put("clear", 1, "10.10.1.21", "203.0.113.20")
    def bee_removed():
        result = configure()
        log = g.STATE_DIR / "swanctl-calls"
        calls = log.read_text().splitlines() if log.exists() else []
        return {**result, "tunnels_left": tunnels_left(), "refused_left": refused_left,
                "swanctl": calls, "lanes_after": sorted(json.loads(
                    g.SOURCE_FILE.read_text())["lanes"])}
    step("bee-removed", bee_removed)
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def steps(tmp_path_factory) -> dict[str, dict]:
    tmp = tmp_path_factory.mktemp("sync-partners")
    script = PRELUDE.format(repo=str(REPO), tmp=str(tmp)) + BODY
    record = run(script, tmp)
    return {s.get("step", "files"): s for s in record}


LANE_SETS = {
    "bank-a": {"enrolled_bank_a", "snat_bank_a", "dnat_bank_a", "applied_bank_a"},
    "bee": {"enrolled_bee", "snat_bee", "dnat_bee", "applied_bee"},
    "clear": {"enrolled_clear", "snat_clear", "dnat_clear", "applied_clear"},
}


def changed(step: dict) -> set[str]:
    before, after = step["before"], step["after"]
    return {k for k in set(before) | set(after) if before.get(k) != after.get(k)}


def converged(step: dict, lanes=("bank-a", "bee", "clear")) -> None:
    """Each lane's live sets hold exactly what a full rebuild of its table holds."""
    after, wanted = step["after"], step["wanted"]
    for lane in lanes:
        keys = [k for k in wanted if k == f"state:{lane}" or k in LANE_SETS[lane]]
        assert keys
        for key in keys:
            assert after.get(key, []) == wanted[key], (lane, key, after.get(key), wanted[key])


def test_configure_gateway_reads_the_lanes_and_applies_every_one(steps):
    step = steps["configure"]
    result = step["result"]
    assert result["code"] == 0, result["stderr"]
    assert result["forwarding"] == "1"
    lanes = result["report"]["nat"]["lanes"]
    assert set(lanes) == {"bank-a", "bee", "clear"}
    for name, mappings in (("bank-a", 2), ("bee", 1), ("clear", 2)):
        assert lanes[name] == {**lanes[name], "action": "full", "reason": "forced",
                               "mappings": mappings, "table": f"tnlab-{name}"}  # fmt: skip
    converged(step)
    assert step["after"]["applied_generation"] == ["5"]  # every lane applied: 2 + 1 + 2
    files = steps["files"]["files"]
    assert files["base"]["layout"] == "partners"
    assert [x["name"] for x in files["base"]["lanes"]] == ["bank-a", "bee", "clear"]
    assert files["source"] == {
        "table": "tnlab",
        "region": "us-east-1",
        "lanes": {"bank-a": "tnlab-bank-a", "bee": "tnlab-bee", "clear": "tnlab-clear"},
    }
    # Fail closed for every partner's networks, through libipsec's device.
    assert 'oifname != "ipsec0"' in files["guard"] and "drop" in files["guard"]
    assert "ip daddr . ip saddr" in files["classify"]
    # The boot ruleset: chains, nothing applied by any lane.
    assert files["boot"].endswith(
        "flush set ip tunnelnat applied_generation\nflush set ip tunnelnat applied_bank_a\n"
        "flush set ip tunnelnat applied_bee\nflush set ip tunnelnat applied_clear\n"
    )


def test_boot_applies_every_lane_from_the_empty_boot_ruleset(steps):
    step = steps["boot"]
    result = step["result"]
    booted = result["booted"]
    assert booted["applied_generation"] == [] and booted["state:bee"] is None
    assert result["code"] == 0, result["stderr"]
    for name, report in result["report"]["lanes"].items():
        assert report == {**report, "action": "full", "reason": "boot"}, name
        assert report["previous_generation"] is None
    assert result["report"]["failed"] == []
    assert step["after"]["applied_generation"] == ["5"]
    converged(step)
    assert result["handle_booted"] == step["handle_after"]  # maps only: the boot's chains stay


def test_a_delta_for_one_lane_touches_only_its_elements(steps):
    step = steps["delta-bee"]
    report = step["result"]["report"]
    assert step["result"]["code"] == 0
    assert report == {**report, "lane": "bee", "action": "delta", "added": 1, "removed": 0}
    assert report["items_read"] == 2  # the lane's generation and one change-log entry
    assert report["applied_generation"] == report["previous_generation"] + 1
    assert changed(step) == {"enrolled_bee", "applied_bee", "state:bee"}  # shared: no map elements
    converged(step)


def test_an_unchanged_lane_is_verified_and_left_alone(steps):
    step = steps["unchanged-bank-a"]
    report = step["result"]["report"]
    assert report == {**report, "lane": "bank-a", "action": "unchanged", "verified": True}
    assert changed(step) == set()


def test_a_gap_in_one_lanes_change_log_rebuilds_its_maps_only(steps):
    step = steps["gap-clear"]
    report = step["result"]["report"]
    assert report == {**report, "lane": "clear", "action": "full", "reason": "gap", "mappings": 3}
    assert changed(step) <= LANE_SETS["clear"] | {"state:clear"}
    assert step["handle_before"] == step["handle_after"]
    converged(step)


def test_drift_in_one_lane_is_found_and_repaired_there(steps):
    step = steps["drift-bank-a"]
    report = step["result"]["report"]
    assert report == {**report, "lane": "bank-a", "action": "full", "reason": "drift"}
    assert report["detail"] == "snat_bank_a holds 1 elements, 2 were applied"
    assert report["applied_generation"] == report["previous_generation"]
    assert changed(step) <= LANE_SETS["bank-a"] | {"state:bank-a"}
    converged(step)


def test_a_forced_lane_sync_reports_and_repairs_its_drift_only(steps):
    step = steps["forced-clear"]
    report = step["result"]["report"]
    assert report == {**report, "lane": "clear", "action": "full", "reason": "forced"}
    assert report["drift"].startswith("enrolled_clear is not the set of snat_clear's")
    assert changed(step) <= LANE_SETS["clear"] | {"state:clear"}
    assert step["handle_before"] == step["handle_after"]
    converged(step)


def test_only_a_lanes_table_is_synced(steps):
    step = steps["refused"]
    for result, table in zip(step["result"], ("tnlab", "tnlab-nobody"), strict=True):
        assert result["code"] == 1 and result["report"] is None
        assert result["stderr"].startswith(f"tunnelnat: {table} is not one partner's table")
        assert "tnlab-bank-a, tnlab-bee, tnlab-clear" in result["stderr"]
    assert changed(step) == set()


def test_applied_states_are_retired_in_batches(steps):
    step = steps["many-bank-a"]
    assert step["result"]["actions"] == ["delta"]
    from tunnelnat_gateway.nat_sync import RETIRE_AT

    assert 1 <= step["result"]["applied"] <= RETIRE_AT
    assert changed(step) <= LANE_SETS["bank-a"] | {"state:bank-a"}
    converged(step)


def test_one_lanes_failure_never_stops_another(steps):
    step = steps["clear-missing"]
    result = step["result"]
    assert result["code"] == 1
    report = result["report"]
    assert report["failed"] == ["clear"]
    assert "ResourceNotFoundException" in report["lanes"]["clear"]["error"]
    assert report["lanes"]["bee"]["action"] == "delta"
    assert report["lanes"]["bank-a"]["action"] == "unchanged"
    assert changed(step) == {"enrolled_bee", "applied_bee", "state:bee"}
    converged(step, lanes=("bank-a", "bee"))


def test_configure_refuses_lanes_that_contradict_each_other(steps):
    step = steps["configure-refused"]
    result = step["result"]
    assert result["code"] == 1 and result["report"] is None
    assert result["stderr"].startswith("ConfigureGateway: ")
    assert "their IPsec policies would be the same" in result["stderr"]
    assert changed(step) == set()
    assert step["handle_before"] == step["handle_after"]


def test_the_bodies_never_named_another_lanes_sets():
    """Every nft transaction of a lane's sync names its own sets only (the renderers')."""
    from tunnelnat.core.nat import NatTable, render_partner_delta, render_partner_map_update

    text = render_partner_map_update("bee", NatTable.from_rows(3, [("10.0.0.1", "203.0.113.30")]))
    text += render_partner_delta("bee", [], [("10.0.0.2", "203.0.113.30")], (4, 1, 2), "shared")
    names = {w for line in text.splitlines() for w in line.split() if "_" in w}
    assert names <= {"enrolled_bee", "snat_bee", "dnat_bee", "applied_bee"}, names
    assert json.dumps(sorted(names))


def test_configure_serves_the_other_lanes_when_one_lanes_table_is_missing(steps):
    step = steps["configure-clear-missing"]
    result = step["result"]
    assert result["code"] == 1 and result["forwarding"] == "1"
    assert result["stderr"].startswith("ConfigureGateway: partners not applied (clear: ")
    nat = result["report"]["nat"]
    assert nat["failed"] == ["clear"]
    assert {nat["lanes"][n]["reason"] for n in ("bank-a", "bee")} == {"forced"}
    after = step["after"]
    assert after["enrolled_clear"] == [] and after["state:clear"] is None
    assert after["applied_generation"] == []  # not every lane applied since boot
    converged(step, lanes=("bank-a", "bee"))


def test_a_removed_partners_sets_and_tunnel_go_with_its_lane(steps):
    """Issue 23, a partner removed by redeploy: its lane is no longer published, so the next
    ConfigureGateway rebuilds the table from the lanes left (real nft: no set of bee's remains,
    the others' hold what their tables hold) and removes bee's tunnel, only bee's."""
    step = steps["bee-removed"]
    result = step["result"]
    assert result["code"] == 0, result["stderr"]
    report = result["report"]
    assert report["removed_tunnels"] == ["bee"]
    assert set(report["nat"]["lanes"]) == {"bank-a", "clear"}
    assert not LANE_SETS["bee"] & set(step["after"]), sorted(step["after"])
    assert LANE_SETS["bee"] <= set(step["before"])  # they were there until then
    converged(step, lanes=("bank-a", "clear"))
    assert result["lanes_after"] == ["bank-a", "clear"]  # source.json: bee's table not synced
    # Earlier runs (every lane declared, or a lane set refused whole) removed no tunnel.
    assert result["refused_left"] == [
        f"{n}.{x}" for n in ("bank-a", "bee", "clear") for x in ("charon", "json")
    ]
    assert result["tunnels_left"] == [
        f"{n}.{x}" for n in ("bank-a", "clear") for x in ("charon", "json")
    ]
    # charon told once to load what is left (bee's connection and key unloaded), nothing
    # terminated or initiated for the others.
    assert result["swanctl"].count("--load-all --noprompt") == 1
    assert not [c for c in result["swanctl"] if "bank-a" in c or "clear" in c]


RANDOM_BODY = textwrap.dedent(
    """
    import random
    from ipaddress import IPv4Network as N
    from tunnelnat.core.lanes import Lane, parameter_path
    from tunnelnat.core.nat import partner_set_names
    from tunnelnat_gateway import configure_gateway as cg
    g.SOURCE_FILE = g.STATE_DIR / "source.json"
    cg.SYSCTL_FILE = g.STATE_DIR / "sysctl.d" / "90-tunnelnat.conf"
    cg.LOCK_FILE = g.STATE_DIR / "configure.lock"
    ssm = boto3.client("ssm")
    rng = random.Random(SEED)
    POOLS = {"p-one": [f"203.0.113.{k}" for k in range(10, 20)],
             "p-two": [f"203.0.113.{k}" for k in range(20, 30)]}
    LANES = [Lane(deployment="tnrand", name=n, index=i, endpoint=A(f"198.51.100.{i}"),
                  networks=(N("10.0.0.0/24"),), aliases=(N(f"100.64.{i}.0/24"),) if i == 2 else (),
                  nat_mode="dedicated", pool=tuple(map(A, POOLS[n])), shared_address=None,
                  tag_key=f"k:partner:{n}") for i, n in enumerate(POOLS, 1)]
    held, gens, stores = {}, {}, {}
    for x in LANES:
        ssm.put_parameter(Name=x.parameter, Value=x.to_json(), Type="String")
        db.create_table(TableName=x.table, BillingMode="PAY_PER_REQUEST",
            KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"},
                       {"AttributeName": "sk", "KeyType": "RANGE"}],
            AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"},
                                  {"AttributeName": "sk", "AttributeType": "S"}])
        held[x.name], gens[x.name], stores[x.name] = {}, 0, EnrolmentStore(db, x.table)
    assert cg.main(["--partner-networks", "192.0.2.0/24", "--table", "tnrand", "--region",
                    "us-east-1", "--partners-path", parameter_path("tnrand")],
                   client=db, ssm=ssm) == 0

    def lane_view(x):
        sets = listing()
        enrolled, snat, dnat, applied = partner_set_names(x.name)
        states = sorted(json.loads(e)["concat"] for e in sets[applied])
        return {"enrolled": sets[enrolled], "snat": sets[snat], "dnat": sets[dnat],
                "state": states[-1] if states else None}

    def wanted(x):
        t = g.read_desired(db, x.table, "dedicated")
        return {"enrolled": sorted(json.dumps(p) for p, _ in t.rows),
                "snat": sorted(json.dumps([p, s]) for p, s in t.rows),
                "dnat": sorted(json.dumps([s, p]) for p, s in t.rows),
                "state": [t.generation, t.checksum, len(t.rows)]}

    mismatches, actions = [], {}
    for step in range(STEPS):
        x = rng.choice(LANES)
        mine = held[x.name]
        taken_p = {str(v.private_ip) for v in mine.values()}
        taken_s = {str(v.public_ip) for v in mine.values()}
        changes = []
        for i in rng.sample(range(6), rng.randint(1, 3)):
            old = mine.get(i)
            if old is not None and rng.random() < 0.4:
                changes.append(MappingChange(old.instance_id, None, old)); del mine[i]
                continue
            p = str(old.private_ip) if old is not None else next(
                (f"10.10.1.{k}" for k in rng.sample(range(21, 31), 10)
                 if f"10.10.1.{k}" not in taken_p), None)
            s = next((a for a in rng.sample(POOLS[x.name], 10) if a not in taken_s), None)
            if p is None or s is None:
                continue
            taken_p.add(p); taken_s.add(s)
            new = m(i, p, s)
            changes.append(MappingChange(new.instance_id, new, old)); mine[i] = new
        if not changes:
            continue
        gens[x.name] = stores[x.name].write_mappings(changes, generation=gens[x.name], claim=True)
        others = {y.name: lane_view(y) for y in LANES if y is not x}
        report = g.sync_any(db, x.table, False, rng.random() < 0.2)
        actions[report["action"]] = actions.get(report["action"], 0) + 1
        if lane_view(x) != wanted(x):
            mismatches.append({"step": step, "lane": x.name, "report": report})
        for y in LANES:
            if y is not x and lane_view(y) != others[y.name]:
                mismatches.append({"step": step, "touched": y.name, "by": x.name})
    print(json.dumps([{"mismatches": mismatches, "actions": actions}]))
    """
)


@pytest.mark.parametrize("seed", [3, 17])
def test_random_changes_per_lane_land_where_a_full_rebuild_would(tmp_path, seed):
    """Random mapping changes (moves, removals, additions, several per generation) on two lanes
    whose networks overlap, each synced by its delta (sometimes verified): after every sync the
    lane holds what a full rebuild of its table holds, and the other lane is untouched."""
    script = PRELUDE.format(repo=str(REPO), tmp=str(tmp_path))
    body = RANDOM_BODY.replace("SEED", str(seed)).replace("STEPS", "40")
    (result,) = run(script + body, tmp_path)
    assert result["mismatches"] == []
    assert result["actions"].get("delta", 0) >= 30, result["actions"]


def _lanes(count: int, deployment: str = "tnpage"):
    from ipaddress import IPv4Address, IPv4Network

    from tunnelnat.core.lanes import Lane

    return [
        Lane(
            deployment=deployment,
            name=f"p{i:02d}",
            index=i,
            endpoint=IPv4Address(f"198.51.100.{i}"),
            networks=(IPv4Network(f"172.16.{i}.0/24"),),
            aliases=(),
            nat_mode="dedicated",
            pool=(IPv4Address(f"203.0.113.{i}"),),
            shared_address=None,
            tag_key=f"k:partner:p{i:02d}",
        )
        for i in range(1, count + 1)
    ]


def test_read_lanes_pages_and_checks_each_parameter_holds_its_own_lane(monkeypatch):
    """GetParametersByPath answers at most 10 a page (moto as SSM): all 25 lanes are read, in
    index order; a parameter holding another lane, or none under the path, is refused."""
    import boto3
    from moto import mock_aws

    from tunnelnat.core.lanes import parameter_path
    from tunnelnat_gateway import nat_sync

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(key, "x")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with mock_aws():
        ssm = boto3.client("ssm", region_name="us-east-1")
        lanes = _lanes(25)
        for lane in reversed(lanes):
            ssm.put_parameter(Name=lane.parameter, Value=lane.to_json(), Type="String")
        read = nat_sync.read_lanes(ssm, parameter_path("tnpage"))
        assert read == tuple(lanes)
        base = nat_sync.partners_base(read, 1360, None)
        assert [p.name for p in base.partners] == [x.name for x in lanes]
        ssm.put_parameter(
            Name=f"{parameter_path('tnpage')}/p99", Value=lanes[0].to_json(), Type="String"
        )
        with pytest.raises(nat_sync.GatewayError, match="p99 holds the lane /tunnelnat/tnpage"):
            nat_sync.read_lanes(ssm, parameter_path("tnpage"))
        with pytest.raises(nat_sync.GatewayError, match="no partners under /tunnelnat/empty"):
            nat_sync.read_lanes(ssm, parameter_path("empty"))


def test_partners_base_refuses_lanes_out_of_order_or_of_two_deployments():
    from tunnelnat_gateway import nat_sync

    one, two, three = _lanes(3)
    with pytest.raises(nat_sync.GatewayError, match=r"indexes are not 1\.\.2"):
        nat_sync.partners_base((one, three))
    other = _lanes(2, "other")[1]
    with pytest.raises(nat_sync.GatewayError, match="more than one deployment"):
        nat_sync.partners_base((one, other))
    assert nat_sync.partners_base((one, two)).index("p02") == 2
