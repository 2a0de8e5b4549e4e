"""The store's change log and checksum (issue 16), against moto: one entry per generation, in
the transaction that bumps it; the checksum always the sum over the mapping rows; a write whose
``previous`` is not what the table holds is cancelled (the log never describes a row that was
not there), and a lost bump leaves no entry behind."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from tests.lambdas.conftest import TABLE
from tests.lambdas.events import Context, state_change
from tunnelnat.adapters.store import (
    EnrolmentStore,
    GenerationMoved,
    MappingChange,
    StoreConflict,
    StoredMapping,
)
from tunnelnat.core.nat import mapping_digest
from tunnelnat.handlers.controller import handler

TAG = {"tunnelnat": "enabled"}


def mapping(instance: str, private: str, public: str) -> StoredMapping:
    return StoredMapping(instance, IPv4Address(private), IPv4Address(public))


def log(world) -> dict[int, list[tuple[str, str, str]]]:
    return {
        int(sk): [
            (o["M"]["op"]["S"], o["M"]["private_ip"]["S"], o["M"]["public_ip"]["S"])
            for o in item["changes"]["L"]
        ]
        for sk, item in world.items("change").items()
    }


def assert_checksum_is_the_rows(world) -> None:
    meta = world.items("meta")["generation"]
    rows = world.items("mapping").values()
    expected = sum(
        mapping_digest(
            int(IPv4Address(r["private_ip"]["S"])), int(IPv4Address(r["public_ip"]["S"]))
        )
        for r in rows
    )
    assert int(meta["checksum"]["N"]) == expected and meta["checksum_from"]["N"] == "0"


def test_each_generation_has_its_entry_and_the_checksum_follows_the_rows(world):
    store = EnrolmentStore(world.dynamodb, TABLE)
    a1 = mapping("i-0aaaaaaaaaaaaaaaa", "10.10.1.21", "203.0.113.10")
    a2 = mapping("i-0aaaaaaaaaaaaaaaa", "10.10.1.21", "203.0.113.11")
    b1 = mapping("i-0bbbbbbbbbbbbbbbb", "10.10.1.22", "203.0.113.10")
    g = store.write_mappings([MappingChange(a1.instance_id, a1, None)], generation=0, claim=True)
    assert_checksum_is_the_rows(world)
    g = store.write_mappings([MappingChange(a1.instance_id, a2, a1)], generation=g, claim=True)
    g = store.write_mappings([MappingChange(b1.instance_id, b1, None)], generation=g, claim=True)
    assert_checksum_is_the_rows(world)
    g = store.write_mappings([MappingChange(a2.instance_id, None, a2)], generation=g, claim=True)
    assert_checksum_is_the_rows(world)
    assert g == 4
    assert log(world) == {
        1: [("add", "10.10.1.21", "203.0.113.10")],
        2: [("remove", "10.10.1.21", "203.0.113.10"), ("add", "10.10.1.21", "203.0.113.11")],
        3: [("add", "10.10.1.22", "203.0.113.10")],
        4: [("remove", "10.10.1.21", "203.0.113.11")],
    }
    entry = world.items("change")[f"{4:020d}"]
    assert int(entry["expiration"]["N"]) > 0, "old entries expire (the table's TTL attribute)"


def test_a_stale_previous_cancels_the_write_and_a_lost_bump_leaves_no_entry(world):
    store = EnrolmentStore(world.dynamodb, TABLE)
    a1 = mapping("i-0aaaaaaaaaaaaaaaa", "10.10.1.21", "203.0.113.10")
    a2 = mapping("i-0aaaaaaaaaaaaaaaa", "10.10.1.21", "203.0.113.11")
    g = store.write_mappings([MappingChange(a1.instance_id, a1, None)], generation=0, claim=True)
    with pytest.raises(StoreConflict):  # the table holds a1, not "nothing"
        store.write_mappings([MappingChange(a1.instance_id, a2, None)], generation=g, claim=True)
    with pytest.raises(StoreConflict):  # nor a2
        store.write_mappings([MappingChange(a1.instance_id, None, a2)], generation=g, claim=True)
    with pytest.raises(GenerationMoved):
        store.write_mappings([MappingChange(a1.instance_id, a2, a1)], generation=0, claim=True)
    assert sorted(log(world)) == [1]
    assert_checksum_is_the_rows(world)


def test_the_controller_writes_the_log_as_it_enrols_and_unenrols(world):
    web = [world.launch(f"10.10.1.{21 + k}", tags=TAG) for k in range(3)]
    for instance in web:
        handler(state_change(instance, "running"), Context())
    world.ec2.terminate_instances(InstanceIds=[web[1]])
    handler(state_change(web[1], "terminated"), Context())
    generation = int(world.items("meta")["generation"]["generation"]["N"])
    assert sorted(log(world)) == list(range(1, generation + 1))
    assert_checksum_is_the_rows(world)
