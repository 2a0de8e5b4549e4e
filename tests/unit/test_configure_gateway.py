"""``tunnelnat-gateway configure-gateway`` (ConfigureGateway's verb) in a private network
namespace: real nft, real sysctl (net.* is per namespace), DynamoDB from moto in the process.

The point of the order: on a new gateway ip_forward is off until ConfigureGateway, so forwarding
must never run ahead of the table with its guard, whichever document runs first; a failed apply
leaves forwarding off.
"""

from __future__ import annotations

import json
import textwrap

from tests.unit.test_gateway_program import PRELUDE, REPO, pytestmark, run  # noqa: F401

SCRIPT = PRELUDE + textwrap.dedent(
    """
    import contextlib, io
    from tunnelnat_gateway import configure_gateway as cg
    g.SOURCE_FILE = g.STATE_DIR / "source.json"
    cg.SYSCTL_FILE = g.STATE_DIR / "sysctl.d" / "90-tunnelnat.conf"
    cg.LOCK_FILE = g.STATE_DIR / "configure.lock"
    os.environ["TN_CLOUD_INIT"] = "done"

    # The document's TableName pattern wants 3 characters at least: a table of its own.
    db.create_table(TableName="tn-table", BillingMode="PAY_PER_REQUEST",
        KeySchema=[{{"AttributeName": "pk", "KeyType": "HASH"}},
                   {{"AttributeName": "sk", "KeyType": "RANGE"}}],
        AttributeDefinitions=[{{"AttributeName": "pk", "AttributeType": "S"}},
                              {{"AttributeName": "sk", "AttributeType": "S"}}])
    store = EnrolmentStore(db, "tn-table")

    def forwarding():
        return Path("/proc/sys/net/ipv4/ip_forward").read_text().strip()

    def guard():
        return nft("list", "chain", "ip", "tunnelnat", "guard").stdout

    seen = []
    real_forwarding_on = cg.forwarding_on
    def watched(*a, **kw):
        # What the kernel holds at the moment forwarding is turned on.
        seen.append({{"guard": guard(), "forwarding": forwarding()}})
        return real_forwarding_on(*a, **kw)
    cg.forwarding_on = watched

    def verb(*argv, client=db):
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = cg.main(list(argv), client=client)
        return {{"code": code, "stdout": stdout.getvalue(), "stderr": stderr.getvalue(),
                "forwarding": forwarding(), "seen": list(seen)}}

    ARGS = ["--partner-networks", "192.0.2.0/24,198.51.100.0/28", "--table",
            "tn-table", "--region", "us-east-1"]
    store.write_mappings([MappingChange("i-1", m(1, "10.10.1.21", "203.0.113.10"), None)],
                         generation=0, claim=True)
    out.append({{"before": forwarding()}})
    # DynamoDB refuses (no such table): nothing turned on.
    out.append(verb("--partner-networks", "192.0.2.0/24", "--table", "missing",
                    "--region", "us-east-1"))
    out.append(verb("--partner-networks", "192.0.2.1/24", "--table", "tn-table",
                    "--region", "us-east-1"))
    # Several partners: no lane under the path (SSM answers nothing), or not a lanes path at all:
    # refused before anything is applied, forwarding still off.
    out.append(verb(*ARGS, "--partners-path", "/tunnelnat/nobody/partners"))
    out.append(verb(*ARGS, "--partners-path", "/etc/tunnelnat/partners"))
    out.append(verb(*ARGS, "--backend", "libipsec", "--mss", "1300"))
    out.append({{"sysctl": cg.SYSCTL_FILE.read_text(), "source": g.SOURCE_FILE.read_text(),
                "base": json.loads(g.BASE_FILE.read_text())}})
    # Another run holds the lock: refused after the wait, nothing changed.
    cg.LOCK_WAIT = 0.3
    import fcntl
    with cg.LOCK_FILE.open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        out.append(verb(*ARGS))
    out.append(verb(*ARGS, "--backend", "kernel"))
    out.append({{"guard": guard()}})
    print(json.dumps(out))
    """
)


def test_configure_gateway_loads_the_guard_before_forwarding(tmp_path):
    record = run(SCRIPT.format(repo=str(REPO), tmp=str(tmp_path)), tmp_path)
    before, missing, host_bits, no_lanes, bad_path, configured, files, locked, kernel, guard = (
        record
    )
    assert before == {"before": "0"}
    # A failed apply: one line saying so, forwarding still off, sysctl never reached.
    assert missing["code"] == 1 and missing["stdout"] == ""
    assert missing["stderr"].startswith("ConfigureGateway: applying the nftables table failed:")
    assert missing["forwarding"] == "0" and missing["seen"] == []
    assert host_bits["code"] == 1 and host_bits["forwarding"] == "0"
    assert host_bits["stderr"] == "ConfigureGateway: 192.0.2.1/24 has host bits set\n"
    assert no_lanes["code"] == 1 and no_lanes["forwarding"] == "0" and no_lanes["seen"] == []
    assert no_lanes["stderr"] == (
        "ConfigureGateway: reading the partners under /tunnelnat/nobody/partners failed: "
        "no partners under /tunnelnat/nobody/partners\n"
    )
    assert bad_path["code"] == 1 and bad_path["forwarding"] == "0"
    assert bad_path["stderr"].startswith("ConfigureGateway: invalid partners path")
    # Success: the guard was in the kernel (and forwarding still off) when forwarding came on.
    assert configured["code"] == 0, configured["stderr"]
    (at,) = configured["seen"]
    assert at["forwarding"] == "0"
    assert 'oifname != "ipsec0"' in at["guard"] and "drop" in at["guard"]
    assert configured["forwarding"] == "1"
    line = json.loads(configured["stdout"])
    assert list(line) == ["configured", "forwarding", "cloud_init", "nat"]
    assert line["configured"] is True and line["forwarding"] is True
    assert line["cloud_init"] == "done"
    assert line["nat"] == {**line["nat"], "action": "full", "reason": "forced", "mappings": 1}
    assert files["sysctl"] == (
        "net.ipv4.ip_forward = 1\nnet.ipv4.conf.all.rp_filter = 2\n"
        "net.ipv4.conf.default.rp_filter = 2\n"
    )
    assert json.loads(files["source"]) == {"table": "tn-table", "region": "us-east-1"}
    assert files["base"]["mss"] == 1300 and files["base"]["tunnel_interface"] == "ipsec0"
    assert locked["code"] == 1
    assert locked["stderr"] == (
        "ConfigureGateway: another ConfigureGateway run still holds the lock after 0s\n"
    )
    assert kernel["code"] == 0, kernel["stderr"]
    assert "rt ipsec missing" in guard["guard"]  # kernel backend: the policy check
