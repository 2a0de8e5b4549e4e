"""``tunnelnat status`` and ``doctor`` per partner when the deployment has lanes (issue 23).

The lanes are published as the stack does (one SSM parameter per partner, core/lanes.py), each
with its own DynamoDB table; the items are written in the store's schema (what the controller
writes). A deployment without lanes prints what it printed before (tests/cli/test_status.py).
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import jsonschema

from tests.cli.conftest import DEPLOYMENT
from tunnelnat.core.lanes import Lane
from tunnelnat_cli.schemas import DOCTOR, STATUS

KEY = "tunnelnat"


def lane(name: str, index: int, network: str, pool: tuple[str, ...], **kw) -> Lane:
    return Lane(
        deployment=DEPLOYMENT,
        name=name,
        index=index,
        endpoint=IPv4Address(f"198.51.100.{index}"),
        networks=(IPv4Network(network),),
        aliases=kw.pop("aliases", ()),
        nat_mode="dedicated",
        pool=tuple(IPv4Address(a) for a in pool),
        shared_address=None,
        tag_key=f"{KEY}:partner:{name}",
        **kw,
    )


BANK = lane("bank-a", 1, "10.0.0.0/24", ("203.0.113.20", "203.0.113.21"))
LEGACY = lane("legacy-b", 2, "172.16.5.0/24", ("203.0.113.30",), ike_version=1)
OVERLAP = lane(
    "overlap-c", 3, "10.0.0.0/24", ("203.0.113.40",), aliases=(IPv4Network("100.64.3.0/24"),)
)
LANES = (BANK, LEGACY, OVERLAP)


def publish(dep, lanes=LANES, tables=True) -> None:
    ssm = dep.session.client("ssm", endpoint_url=dep.url)
    for ln in lanes:
        ssm.put_parameter(Name=ln.parameter, Type="String", Value=ln.to_json())
        if tables:
            dep.dynamodb.create_table(
                TableName=ln.table,
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


def enrol(dep, ln: Lane, instance: str, private: str, public: str, status="enrolled") -> None:
    put = dep.dynamodb.put_item
    put(TableName=ln.table, Item={
        "pk": {"S": "instance"}, "sk": {"S": instance}, "status": {"S": status},
        "private_ip": {"S": private}, "public_ip": {"S": public},
        "route_installed": {"BOOL": status == "enrolled"}, "updated_at": {"N": "1"},
    })  # fmt: skip
    if status == "enrolled":
        put(TableName=ln.table, Item={
            "pk": {"S": "mapping"}, "sk": {"S": instance},
            "private_ip": {"S": private}, "public_ip": {"S": public},
        })  # fmt: skip


def generations(dep, ln: Lane, desired: int, applied: int) -> None:
    put = dep.dynamodb.put_item
    put(TableName=ln.table, Item={"pk": {"S": "meta"}, "sk": {"S": "generation"},
                                  "generation": {"N": str(desired)}})  # fmt: skip
    put(TableName=ln.table, Item={"pk": {"S": "meta"}, "sk": {"S": "gateway"},
                                  "applied_generation": {"N": str(applied)}})  # fmt: skip


def test_status_without_lanes_has_no_partners(dep):
    result = dep.run("status", "--json")
    assert result.code == 0, result.err
    assert "partners" not in result.json() and "partners unknown" not in result.err
    assert "PARTNER" not in dep.run("status").out


def test_status_per_partner_tunnel_networks_s_and_enrolments(dep):
    publish(dep)
    enrol(dep, BANK, "i-0aaaaaaaaaaaaaaa1", "10.10.1.21", "203.0.113.20")
    enrol(dep, BANK, "i-0aaaaaaaaaaaaaaa2", "10.10.1.22", "203.0.113.21")
    enrol(dep, OVERLAP, "i-0aaaaaaaaaaaaaaa1", "10.10.1.21", "203.0.113.40")
    enrol(dep, OVERLAP, "i-0aaaaaaaaaaaaaaa3", "10.10.1.23", "", status="pool-exhausted")
    generations(dep, BANK, 2, 2)
    generations(dep, OVERLAP, 4, 3)
    dep.put_metric("bank-a", 1)
    dep.put_metric("legacy-b", 0)
    result = dep.run("status", "--json")
    assert result.code == 0, result.err
    doc = result.json()
    jsonschema.validate(doc, STATUS)
    by = {p["partner"]: p for p in doc["partners"]}
    assert list(by) == ["bank-a", "legacy-b", "overlap-c"]
    assert (by["bank-a"]["tunnel_state"], by["legacy-b"]["tunnel_state"]) == ("up", "down")
    assert by["overlap-c"]["tunnel_state"] == "unknown"  # no TunnelUp: not blamed on another
    assert by["bank-a"]["enrolled"] == 2 and by["bank-a"]["pending"] == 0
    assert by["overlap-c"]["enrolled"] == 1 and by["overlap-c"]["pending"] == 1
    assert by["overlap-c"]["local_networks"] == ["100.64.3.0/24"]
    assert by["overlap-c"]["networks"] == ["10.0.0.0/24"]
    assert by["legacy-b"]["ike_version"] == 1 and by["legacy-b"]["enrolled"] == 0
    assert by["overlap-c"]["applied_generation"] == 3
    text = dep.run("status").out
    rows = {line.split()[0]: line for line in text.splitlines() if line.split()}
    assert "PARTNER" in text and "alias->real" in text
    assert "IKEv2" in rows["bank-a"] and "203.0.113.20,203.0.113.21" in rows["bank-a"]
    assert "10.0.0.0/24" in rows["bank-a"] and "2 (0 pending)" in rows["bank-a"]
    assert "100.64.3.0/24->10.0.0.0/24" in rows["overlap-c"] and "3/4 BEHIND" in rows["overlap-c"]
    assert "IKEv1" in rows["legacy-b"] and "down" in rows["legacy-b"]


def test_a_lane_whose_table_is_missing_is_that_partners_problem_only(dep):
    publish(dep, tables=False)
    result = dep.run("status", "--json")
    assert result.code == 0, result.err
    by = {p["partner"]: p for p in result.json()["partners"]}
    assert all("ResourceNotFoundException" in (p["problem"] or "") for p in by.values())
    assert by["bank-a"]["enrolled"] is None


def test_doctor_gives_a_finding_per_partner(dep):
    publish(dep)
    generations(dep, BANK, 2, 2)
    generations(dep, OVERLAP, 4, 3)
    dep.dynamodb.delete_table(TableName=LEGACY.table)
    dep.put_metric("bank-a", 1)
    result = dep.run("doctor", "--json")
    doc = result.json()
    jsonschema.validate(doc, DOCTOR)
    mine = [f for f in doc["findings"] if f["check"] == "partner"]
    by = {f["resource"]: f for f in mine}
    assert set(by) == {"bank-a", "legacy-b", "overlap-c"}
    assert by["bank-a"]["status"] == "ok"
    assert by["legacy-b"]["status"] == "fail" and "legacy-b" in by["legacy-b"]["summary"]
    assert "table" in by["legacy-b"]["summary"]
    assert by["overlap-c"]["status"] == "fail" and "behind" in by["overlap-c"]["summary"]
    assert "bank-a" not in by["overlap-c"]["summary"] and "bank-a" not in by["legacy-b"]["summary"]


def test_tunnels_lists_each_partners_sas_under_it(dep, tmp_path):
    """The gateway's listing (the real ShowTunnels document on the captured SAs of tunnel
    'partner') split per partner: 'partner' has its SAs, 'other' none (its own line says so)."""
    from tests.cli.test_tunnels import GatewayDocuments, rows

    first = lane("partner", 1, "192.0.2.0/24", ("203.0.113.231", "203.0.113.232"))
    other = lane(
        "other", 2, "10.0.0.0/24", ("203.0.113.50",), aliases=(IPv4Network("100.64.9.0/24"),)
    )
    publish(dep, (first, other), tables=False)
    (tmp_path / "gw").mkdir()
    result = dep.run("tunnels", commands=GatewayDocuments(tmp_path / "gw"))
    assert result.code == 0, result.err
    text = result.out
    head, rest = text.split("== partner partner: ", 1)
    mine, theirs = rest.split("== partner other: ", 1)
    assert mine.startswith("IKEv2 to 198.51.100.1; instances address 192.0.2.0/24; S ")
    assert [r[0] for r in rows(mine, "partner")] == [
        "partner",
        "partner-1",
        "partner-2",
        "partner-2",
    ]
    assert theirs.startswith("IKEv2 to 198.51.100.2; instances address 100.64.9.0/24 (alias of ")
    assert "no SA: this partner's tunnel is down" in theirs and "partner-1" not in theirs
    # --json is the gateway's listing as before (every SA names its IKE SA: its partner).
    assert (
        "partners" not in dep.run("tunnels", "--json", commands=GatewayDocuments(tmp_path)).json()
    )


def test_doctor_names_instances_still_marked_for_a_partner_no_longer_declared(dep):
    """bank-a taken out of the file (its parameter gone): its instances keep their status tag
    and host routes, no lane reconciles them, the gateway drops their traffic. doctor names
    them, per retired partner; a declared partner's instances are not named."""
    publish(dep, lanes=(LEGACY, OVERLAP))
    retired = dep.launch("10.10.1.31", tags={BANK.status_tag: "enrolled", BANK.tag_key: "enabled"})
    also = dep.launch("10.10.1.32", tags={BANK.status_tag: "enrolled"})
    declared = dep.launch("10.10.1.33", tags={LEGACY.status_tag: "enrolled"})
    doc = dep.run("doctor", "--json").json()
    jsonschema.validate(doc, DOCTOR)
    mine = [f for f in doc["findings"] if f["check"] == "partner-retired"]
    assert len(mine) == 1, mine
    finding = mine[0]
    assert finding["status"] == "fail" and finding["resource"] == "bank-a"
    assert retired in finding["summary"] and also in finding["summary"]
    assert declared not in finding["summary"]
    assert f"Deployment={DEPLOYMENT}.bank-a" in finding["fix"]
    assert BANK.status_tag in finding["fix"] and BANK.tag_key in finding["fix"]
    # Without any lane (the file dropped altogether) the leftovers are still named.
    ssm = dep.session.client("ssm", endpoint_url=dep.url)
    for ln in (LEGACY, OVERLAP):
        ssm.delete_parameter(Name=ln.parameter)
    doc = dep.run("doctor", "--json").json()
    names = {f["resource"] for f in doc["findings"] if f["check"] == "partner-retired"}
    assert names == {"bank-a", "legacy-b"}
