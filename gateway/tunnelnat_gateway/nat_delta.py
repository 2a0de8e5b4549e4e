"""The gateway's delta sync: what changed since the generation it applied, from the change log.

Part of the gateway package, used by ``nat_sync.sync`` on every sync that is not a full one;
standard library only. The store writes one entry per generation, ``change/<generation, 20
digits>``, in the transaction that bumps it, listing the rows removed and added. A sync reads
the entries after the applied generation up to the desired one (one Query: a one-mapping change
reads one item), folds them into the net removals and additions per private address, and
renders them as element deletions and creations in one ``nft -f`` transaction with the new
``applied_generation`` and ``applied_state``.

Anything that makes the delta unsafe raises ``DeltaUnusable`` with the reason the caller falls
back to a full rebuild for: ``gap`` (an entry missing or expired, or too many to be worth it) or
``drift`` (the log contradicts itself, or the checksum after the delta would not be the desired
one). nft itself is the last check: ``create`` refuses an element that exists and ``delete`` one
that does not, so a delta that would map a P or an S twice, or that does not fit what the kernel
holds, is refused whole, and the full rebuild then leaves out and reports the ambiguous rows as
``NatTable.from_rows`` does: the delta path and the full path always end with the same ruleset.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from tunnelnat.core.nat import LB, M32, RB, TABLE, ipv4_int, mapping_digest

CHANGE_PK = "change"
GENERATION_DIGITS = 20
# Beyond this many generations behind, one read of the whole table is the cheaper catch-up.
MAX_GENERATIONS = 1000


class DeltaUnusable(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class NatDelta:
    """The net change from ``generation - len(entries)`` to ``generation``."""

    generation: int
    removes: tuple[tuple[str, str], ...]  # (private, public) as applied before
    adds: tuple[tuple[str, str], ...]
    moved: int  # what the checksum moves by, mod 2**32
    entries: int  # change-log items read

    def state_after(self, checksum: int, count: int) -> tuple[int, int, int]:
        return (
            self.generation,
            (checksum + self.moved) & M32,
            count - len(self.removes) + len(self.adds),
        )


def sort_key(generation: int) -> str:
    return f"{generation:0{GENERATION_DIGITS}d}"


def query_items(client: object, **params: object) -> Iterator[dict]:
    """Every item of a Query, page after page. Not boto3's paginator: a sync is a process of its
    own, and the paginator's first use in a process loads its model (~10 ms, a third of a
    one-mapping delta's own work)."""
    while True:
        page = client.query(**params)  # type: ignore[attr-defined]
        yield from page.get("Items", ())
        last = page.get("LastEvaluatedKey")
        if not last:
            return
        params = {**params, "ExclusiveStartKey": last}


def read_entries(client: object, table_name: str, after: int, upto: int) -> list[dict]:
    """The change-log items of generations ``after + 1 .. upto``, in order (consistent)."""
    if upto - after > MAX_GENERATIONS:
        raise DeltaUnusable("gap", f"{upto - after} generations behind")
    return list(
        query_items(
            client,
            TableName=table_name,
            KeyConditionExpression="pk = :pk AND sk BETWEEN :lo AND :hi",
            ExpressionAttributeValues={
                ":pk": {"S": CHANGE_PK},
                ":lo": {"S": sort_key(after + 1)},
                ":hi": {"S": sort_key(upto)},
            },
            ProjectionExpression="sk, #c, #e",
            ExpressionAttributeNames={"#c": "changes", "#e": "expiration"},
            ConsistentRead=True,
        )
    )


def plan_delta(items: list[dict], after: int, upto: int, now: float) -> NatDelta:
    """Fold the entries of ``after + 1 .. upto`` into net removals and additions per private
    address; DeltaUnusable when one is missing, expired or malformed, or contradicts the rest."""
    net: dict[str, list[str | None]] = {}  # private -> [public before, public after]
    expected = after + 1
    for item in items:
        try:
            generation = int(item["sk"]["S"])
            expires = float(item.get("expiration", {}).get("N", "inf"))
            ops = [
                (o["M"]["op"]["S"], o["M"]["private_ip"]["S"], o["M"]["public_ip"]["S"])
                for o in item["changes"]["L"]
            ]
        except (KeyError, TypeError, ValueError):
            raise DeltaUnusable("drift", f"a malformed change-log entry after {after}") from None
        if generation != expected:
            raise DeltaUnusable("gap", f"generation {expected} is not in the change log")
        if expires < now:
            # DynamoDB deletes expired items when it gets to it: do not build on one.
            raise DeltaUnusable("gap", f"generation {generation}'s change-log entry expired")
        for op, private, public in ops:
            try:
                ipv4_int(private), ipv4_int(public)
            except ValueError as exc:
                raise DeltaUnusable("drift", f"generation {generation}: {exc}") from None
            seen = net.get(private)
            if op == "remove" and seen is None:
                net[private] = [public, None]
            elif op == "remove" and seen[1] == public:
                seen[1] = None
            elif op == "add" and seen is None:
                net[private] = [None, public]
            elif op == "add" and seen[1] is None:
                seen[1] = public
            else:
                raise DeltaUnusable(
                    "drift", f"generation {generation}: {op} {private} -> {public} does not follow"
                )
        expected += 1
    if expected != upto + 1:
        raise DeltaUnusable("gap", f"generation {expected} is not in the change log")
    removes = tuple((p, b) for p, (b, a) in net.items() if b is not None and b != a)
    adds = tuple((p, a) for p, (b, a) in net.items() if a is not None and a != b)
    moved = sum(mapping_digest(ipv4_int(p), ipv4_int(s)) for p, s in adds) - sum(
        mapping_digest(ipv4_int(p), ipv4_int(s)) for p, s in removes
    )
    return NatDelta(upto, removes, adds, moved & M32, len(items))


def render_delta(delta: NatDelta, nat_mode: str, state: tuple[int, int, int]) -> str:
    """Element deletions, then creations (an S one row lets go of may be another's now), then
    the new ``applied_generation`` and ``applied_state``: one ``nft -f`` transaction."""
    out = []
    maps = nat_mode != "shared"  # shared mode has no per-instance map elements
    for verb, rows in (("delete", delta.removes), ("create", delta.adds)):
        if not rows:
            continue
        out.append(_elements(verb, "enrolled", [p for p, _ in rows]))
        if maps and verb == "delete":
            out.append(_elements(verb, "snat_map", [p for p, _ in rows]))
            out.append(_elements(verb, "dnat_map", [s for _, s in rows]))
        elif maps:
            out.append(_elements(verb, "snat_map", [f"{p} : {s}" for p, s in rows]))
            out.append(_elements(verb, "dnat_map", [f"{s} : {p}" for p, s in rows]))
    out += [
        f"flush set ip {TABLE} applied_generation",
        _elements("add", "applied_generation", [str(state[0])]),
        f"flush set ip {TABLE} applied_state",
        _elements("add", "applied_state", [" . ".join(map(str, state))]),
    ]
    return "\n".join(out) + "\n"


def _elements(verb: str, name: str, elements: list[str]) -> str:
    return f"{verb} element ip {TABLE} {name} {LB} {', '.join(elements)} {RB}"


def catch_up(
    client: object,
    table_name: str,
    nat_mode: str,
    generation: int,
    checksum: int | None,
    state: tuple[int, int, int],
    report: dict,
    *,
    apply: Callable[[str], None],
    render: Callable[[NatDelta, str, tuple[int, int, int]], str] | None = None,
) -> str | None:
    """Bring the maps from ``state`` (applied generation, checksum, mappings) to ``generation``
    (not older) with ``apply`` (``nft -f``); None when done, else why a full rebuild is due.
    ``render``: the delta's ruleset (default ``render_delta``, the one-partner table's names;
    a several-partner sync passes one partner's, nat_sync.sync_partners)."""
    if generation == state[0]:
        if checksum is not None and checksum != state[1]:
            report["detail"] = "the applied checksum is not the desired one"
            return "drift"
        report.update(action="unchanged", mappings=state[2])
        return None
    try:
        items = read_entries(client, table_name, state[0], generation)
        report["items_read"] = report.get("items_read", 0) + len(items)
        delta = plan_delta(items, state[0], generation, time.time())
        after = delta.state_after(state[1], state[2])
        if checksum is not None and after[1] != checksum:
            raise DeltaUnusable("drift", "the checksum after the delta is not the desired one")
        apply((render or render_delta)(delta, nat_mode, after))
    except DeltaUnusable as exc:
        report["detail"] = exc.detail
        return exc.reason
    except RuntimeError as exc:  # nft refused it (GatewayError): nothing of it was applied
        report["detail"] = str(exc)[:300]
        return "drift"
    report.update(action="delta", mappings=after[2], added=len(delta.adds))
    report["removed"] = len(delta.removes)
    return None
