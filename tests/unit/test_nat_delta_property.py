"""Property: the gateway's delta path and its full path end with the same ruleset (issue 16).

Random sequences of mapping changes, per instance, are written as the store writes them: each
generation's change-log entry from ``store.change_ops`` and the checksum moved by the same ops.
Addresses come from small pools and are NOT kept unique, so a P or an S is sometimes mapped twice
(a table written before claims, shared mode); some entries are lost (expired) and the gateway
sometimes falls several generations behind. The gateway's real catch-up
(``tunnelnat_delta.catch_up``) runs against an in-memory table and a model of the kernel that
executes the rendered ``nft -f`` text with nft's element semantics (``create`` refuses an element
that exists, ``delete`` one that does not, a transaction applies whole or not at all); when it
asks for a full rebuild the model loads ``render_nat_table``'s table. After every sync the
model's table, rendered, equals the rendering of ``NatTable.from_rows`` of the desired rows, and
its ``applied_state`` equals the full table's. tests/unit/test_gateway_program.py checks the same
against the real nft.
"""

from __future__ import annotations

import os
import re
import sys
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunnelnat.adapters.store import (
    GENERATION_DIGITS,
    MappingChange,
    StoredMapping,
    change_ops,
)
from tunnelnat.core.nat import M32, GatewayBase, NatTable, render_nat_table, state_element

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "gateway"))
from tunnelnat_gateway import nat_delta as tunnelnat_delta  # noqa: E402

CI = bool(os.environ.get("CI"))
PRIVATE = [f"10.10.1.{k}" for k in range(21, 27)]
PUBLIC = [f"203.0.113.{k}" for k in range(10, 16)]
ELEMENT = re.compile(r"^(create|delete|add) element ip tunnelnat (\w+) \{ (.*) \}$")


class Kernel:
    """The ``ip tunnelnat`` table's sets and maps, changed only by executing nft text."""

    def __init__(self) -> None:
        self.sets: dict[str, dict[str, str | None]] = {}

    def load(self, table: NatTable) -> None:
        shared = table.nat_mode == "shared"
        self.sets = {
            "enrolled": {p: None for p, _ in table.rows},
            "snat_map": {} if shared else {p: s for p, s in table.rows},
            "dnat_map": {} if shared else {s: p for p, s in table.rows},
            "applied_generation": {str(table.generation): None},
            "applied_state": {state_element(table): None},
        }

    def apply(self, text: str) -> None:
        work = {name: dict(elements) for name, elements in self.sets.items()}
        for line in text.strip().splitlines():
            if line.startswith("flush set ip tunnelnat "):
                work[line.rsplit(" ", 1)[1]].clear()
                continue
            verb, name, body = ELEMENT.match(line).groups()
            for element in body.split(", "):
                key, _, value = element.partition(" : ")
                present = key in work[name]
                if verb == "delete" and not present:
                    raise RuntimeError(f"nft: no such element {key} in {name}")
                if verb == "create" and present:
                    raise RuntimeError(f"nft: element {key} exists in {name}")
                if verb == "delete":
                    del work[name][key]
                else:
                    work[name][key] = value or None
        self.sets = work  # all or nothing, as nft's transaction

    def table(self, nat_mode: str) -> NatTable:
        """What the kernel holds, as a table (and its own consistency checked)."""
        enrolled = set(self.sets["enrolled"])
        if nat_mode == "shared":
            rows = [(p, PUBLIC[0]) for p in enrolled]
        else:
            snat, dnat = self.sets["snat_map"], self.sets["dnat_map"]
            assert set(snat) == enrolled and {v: k for k, v in snat.items()} == dnat
            rows = list(snat.items())
        [generation] = self.sets["applied_generation"]
        table = NatTable.from_rows(int(generation), rows, nat_mode)
        assert not table.rejected
        return table


class Table:
    """The DynamoDB table as the gateway reads it: the change log, for ``read_entries``."""

    def __init__(self) -> None:
        self.log: dict[str, dict] = {}

    def query(self, **kw: object) -> dict:
        """Pages of three items, each with its LastEvaluatedKey, as DynamoDB pages."""
        values = kw["ExpressionAttributeValues"]
        lo, hi = values[":lo"]["S"], values[":hi"]["S"]  # type: ignore[index]
        start = kw.get("ExclusiveStartKey", {}).get("sk", {}).get("S", "")  # type: ignore[attr-defined]
        keys = [k for k in sorted(self.log) if lo <= k <= hi and k > start]
        page: dict = {"Items": [self.log[k] for k in keys[:3]]}
        if len(keys) > 3:
            page["LastEvaluatedKey"] = {"pk": {"S": "change"}, "sk": {"S": keys[2]}}
        return page


step = st.lists(
    st.tuples(
        st.integers(0, 5),  # instance
        st.one_of(st.none(), st.tuples(st.sampled_from(PRIVATE), st.sampled_from(PUBLIC))),
    ),
    min_size=1,
    max_size=4,
)
syncs = st.sampled_from(["sync", "sync", "sync", "behind", "lose-entry"])


@settings(
    max_examples=300 if CI else 100,
    derandomize=CI,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    nat_mode=st.sampled_from(["dedicated", "shared"]),
    steps=st.lists(st.tuples(step, syncs), min_size=1, max_size=12),
)
def test_delta_and_full_paths_render_the_same_ruleset(nat_mode, steps):
    base = GatewayBase((IPv4Network("192.0.2.0/24"),), nat_mode, IPv4Address(PUBLIC[0]))
    db, kernel = Table(), Kernel()
    held: dict[str, StoredMapping] = {}
    generation = checksum = 0
    kernel.load(NatTable(0, (), nat_mode))
    # Whether a delta is due: nothing lost and no table left out rows since the last sync.
    clean = True
    for changes, how in steps:
        generation += 1
        batch = []
        for k, value in dict(changes).items():  # one change per instance per transaction
            instance = f"i-{k:017x}"
            new = None
            if value is not None:
                new = StoredMapping(instance, IPv4Address(value[0]), IPv4Address(value[1]))
            batch.append(MappingChange(instance, new, held.get(instance)))
            if new is None:
                held.pop(instance, None)
            else:
                held[instance] = new
        ops, moved = change_ops(batch)
        checksum += moved
        key = f"{generation:0{GENERATION_DIGITS}d}"
        db.log[key] = {"sk": {"S": key}, "changes": {"L": ops}, "expiration": {"N": "9e9"}}
        if how == "lose-entry":
            del db.log[key]  # expired and deleted by DynamoDB
        rows = [(str(m.private_ip), str(m.public_ip)) for m in held.values()]
        full = NatTable.from_rows(generation, rows, nat_mode)
        # Two instances' identical rows collapse into one element: not what the checksum adds.
        unique = len(full) == len(rows)
        clean = clean and how != "lose-entry" and unique
        if how == "behind":
            continue
        # The gateway: its applied state, then the real catch-up; a full rebuild when asked.
        state = next(iter(kernel.sets["applied_state"]))
        applied = tuple(int(x) for x in state.split(" . "))
        report: dict = {}
        reason = tunnelnat_delta.catch_up(
            db, "t", nat_mode, generation, checksum & M32, applied, report, apply=kernel.apply
        )
        if clean:
            assert reason is None and report["action"] == "delta", report
        if reason is not None:
            assert reason in ("gap", "drift"), report
            kernel.load(full)
        # (In shared mode the kernel holds no S: its applied_state is compared on its own.)
        held_table = kernel.table(nat_mode)
        ours = render_nat_table(base, held_table).replace(state_element(held_table), "")
        assert ours == render_nat_table(base, full).replace(state_element(full), "")
        assert set(kernel.sets["applied_state"]) == {state_element(full)}
        clean = unique
