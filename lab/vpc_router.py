"""The VPC's implicit router, in namespace tn-vpcrtr, routing by what EC2's route tables hold.

On AWS every subnet's ``.1`` is the VPC router: traffic an instance sends to it (its default
gateway) is routed by the route table of the subnet it comes from (the subnet's explicit table,
else the VPC's main one). The lab's router has one link per lab subnet (``.1`` there too) and one
kernel routing table per subnet, chosen by the link the packet came in on (``ip rule iif``); the
mirror here fills those tables from moto's ``DescribeRouteTables``, so a route the controller
creates or deletes with EC2's API changes where packets go:

- ``local`` (the VPC's CIDR) -> each lab subnet on its link;
- a network interface -> ``via`` its private address on its subnet's link, if the ENI is attached
  and its source/destination check is off; otherwise dropped (``blackhole``): an ENI whose check
  is on drops packets not addressed to itself, and a route to an unattached ENI is in state
  ``blackhole`` on AWS;
- any other target (Internet gateway, NAT gateway, peering, ...) -> dropped: the lab has none;
- no matching route -> dropped (``blackhole default``): AWS drops what no route matches. Silently,
  as AWS does (no ICMP unreachable).

The mirror is level-triggered: every ``sync()`` reads the tables whole and makes each kernel table
exactly match (``ip -batch``: replace what differs, delete what EC2 no longer holds). It runs on a
polling thread (every ``interval`` seconds), because on AWS a route change takes effect without
anybody telling the router, whoever made it (the controller, the lab playing another team, a test);
a step that has just changed a table calls ``sync()`` itself rather than wait for the next poll.
"""

from __future__ import annotations

import ipaddress
import json
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lab.poller import Polled, Poller

FIRST_TABLE = 101  # kernel table of the router's first link; the next link gets 102, ...
RULE_PREF = 1000


@dataclass(frozen=True)
class RouterLink:
    """The router's interface on one lab subnet."""

    cidr: str  # the subnet's CIDR, e.g. 10.10.2.0/24
    link: str  # the router's interface there
    address: str  # the router's address there: the subnet's base + 1, as on AWS
    table: int  # the kernel table standing for this subnet's route table


@dataclass(frozen=True)
class KernelRoute:
    """One route of a kernel table, and the EC2 route it stands for."""

    destination: str  # a CIDR, or "default"
    via: str | None = None
    dev: str | None = None
    blackhole: bool = False
    because: str = ""  # the EC2 route (or the rule) it comes from, for the report

    @classmethod
    def from_json(cls, entry: Mapping[str, Any]) -> KernelRoute:
        """One entry of ``ip -j route show``."""
        destination = str(entry.get("dst", ""))
        if "/" not in destination and destination != "default":
            destination += "/32"
        blackhole = entry.get("type") == "blackhole"
        return cls(
            destination,
            via=None if blackhole else entry.get("gateway"),
            dev=None if blackhole else entry.get("dev"),
            blackhole=blackhole,
        )

    def key(self) -> tuple[str, str | None, str | None, bool]:
        return (self.destination, self.via, self.dev, self.blackhole)

    def spec(self) -> str:
        if self.blackhole:
            return f"blackhole {self.destination}"
        if self.via is not None:
            return f"{self.destination} via {self.via} dev {self.dev}"
        return f"{self.destination} dev {self.dev} scope link"


@dataclass(frozen=True)
class MirroredTable:
    """What a subnet's route table held at the last sync, and what the router made of it."""

    subnet_id: str
    cidr: str
    route_table_id: str | None  # None: no table at all (the VPC has no main table in moto)
    main: bool  # the subnet uses the VPC's main table (no explicit association)
    routes: tuple[KernelRoute, ...]

    def route_for(self, destination: str) -> KernelRoute | None:
        return next((r for r in self.routes if r.destination == destination), None)


def subnet_tables(
    route_tables: Iterable[Mapping[str, Any]], subnet_ids: Iterable[str]
) -> dict[str, tuple[Mapping[str, Any] | None, bool]]:
    """Each subnet's route table: its explicit association, else the main table (AWS's rule)."""
    tables = list(route_tables)
    main = next(
        (t for t in tables for a in t.get("Associations", []) if a.get("Main")),
        None,
    )
    chosen: dict[str, tuple[Mapping[str, Any] | None, bool]] = {}
    for subnet_id in subnet_ids:
        explicit = next(
            (
                t
                for t in tables
                for a in t.get("Associations", [])
                if a.get("SubnetId") == subnet_id
                and a.get("AssociationState", {}).get("State", "associated") == "associated"
            ),
            None,
        )
        chosen[subnet_id] = (explicit, False) if explicit is not None else (main, True)
    return chosen


def kernel_routes(
    table: Mapping[str, Any] | None,
    links: Mapping[str, RouterLink],
    interfaces: Mapping[str, Mapping[str, Any]],
) -> list[KernelRoute]:
    """The kernel routes standing for one EC2 route table (``links``: subnet id -> link;
    ``interfaces``: ENI id -> DescribeNetworkInterfaces' record). Local routes come first: the
    ``via`` routes' next hops are on them."""
    local: list[KernelRoute] = []
    other: list[KernelRoute] = []
    for route in (table or {}).get("Routes", []):
        destination = route.get("DestinationCidrBlock")
        if not destination:
            continue  # IPv6 and prefix lists: the lab is IPv4 only
        network = ipaddress.ip_network(destination)
        label = f"{destination} -> {_target(route)}"
        if route.get("GatewayId") == "local":
            for link in links.values():
                if ipaddress.ip_network(link.cidr).subnet_of(network):  # type: ignore[arg-type]
                    local.append(KernelRoute(link.cidr, dev=link.link, because=label))
            continue
        if route.get("State") == "blackhole":
            other.append(KernelRoute(destination, blackhole=True, because=f"{label} (blackhole)"))
            continue
        eni_id = route.get("NetworkInterfaceId")
        if eni_id is None:
            other.append(
                KernelRoute(destination, blackhole=True, because=f"{label} (not in the lab)")
            )
            continue
        eni = interfaces.get(eni_id)
        link = links.get(str(eni.get("SubnetId"))) if eni else None
        if eni is None or link is None:
            why = "no such ENI" if eni is None else "ENI outside the lab's subnets"
            other.append(KernelRoute(destination, blackhole=True, because=f"{label} ({why})"))
        elif eni.get("Attachment", {}).get("Status") != "attached":
            why = "ENI attached to no instance: blackhole on AWS"
            other.append(KernelRoute(destination, blackhole=True, because=f"{label} ({why})"))
        elif eni.get("SourceDestCheck", True):
            why = "source/dest check on: the ENI drops what is not addressed to it"
            other.append(KernelRoute(destination, blackhole=True, because=f"{label} ({why})"))
        else:
            via = eni["PrivateIpAddress"]
            other.append(KernelRoute(destination, via=via, dev=link.link, because=label))
    # One route per destination, as in EC2; a route more specific than local that names a
    # subnet's own CIDR (AWS allows it, to put a middlebox in between) wins over local's part.
    routes: dict[str, KernelRoute] = {}
    for r in local + other:
        destination = "default" if r.destination == "0.0.0.0/0" else r.destination
        routes[destination] = KernelRoute(destination, r.via, r.dev, r.blackhole, r.because)
    if "default" not in routes:
        routes["default"] = KernelRoute("default", blackhole=True, because="no route matches")
    return list(routes.values())


def _target(route: Mapping[str, Any]) -> str:
    for key in (
        "NetworkInterfaceId",
        "GatewayId",
        "NatGatewayId",
        "TransitGatewayId",
        "VpcPeeringConnectionId",
        "InstanceId",
    ):
        if route.get(key):
            return str(route[key])
    return "?"


def parse_kernel_table(entries: Iterable[Mapping[str, Any]]) -> dict[str, KernelRoute]:
    """``ip -j route show table N`` as KernelRoutes by destination (what the router has now)."""
    routes = (KernelRoute.from_json(entry) for entry in entries)
    return {route.destination: route for route in routes}


def batch(table: int, wanted: list[KernelRoute], current: Mapping[str, KernelRoute]) -> list[str]:
    """``ip -batch`` lines that make kernel table ``table`` hold exactly ``wanted``."""
    lines = []
    wanted_keys = {r.destination for r in wanted}
    for dest, route in current.items():
        if dest not in wanted_keys:
            lines.append(f"route del {route.destination} table {table}")
    for route in wanted:
        have = current.get(route.destination)
        if have is None or have.key() != route.key():
            lines.append(f"route replace {route.spec()} table {table}")
    return lines


@dataclass
class VpcRouter(Polled):
    """The router namespace's tables, kept equal to moto's route tables."""

    poller_name = "vpc-router-mirror"

    ec2: Any  # a boto3 EC2 client on the lab's moto
    vpc_id: str
    links: dict[str, RouterLink]  # subnet id -> the router's link there
    run_ip: Any  # callable(argv: list[str], input: str | None) -> stdout (in the router's netns)
    interval: float = 1.0
    tables: dict[str, MirroredTable] = field(default_factory=dict)  # subnet id -> last sync
    syncs: int = 0
    changes: list[str] = field(default_factory=list)  # every ip -batch line applied, in order
    last_error: str | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _poller: Poller | None = None

    # -- set-up --------------------------------------------------------------------------------
    def install_rules(self) -> None:
        """One ``ip rule`` per link: a packet is routed by the table of the subnet it came from."""
        existing = self.run_ip(["-j", "rule", "show"])
        have = {(r.get("iif"), str(r.get("table"))) for r in json.loads(existing or "[]")}
        for n, link in enumerate(self.links.values()):
            if (link.link, str(link.table)) in have:
                continue
            self.run_ip(
                [
                    "rule",
                    "add",
                    "iif",
                    link.link,
                    "lookup",
                    str(link.table),
                    "pref",
                    str(RULE_PREF + n),
                ]
            )

    # -- the mirror ----------------------------------------------------------------------------
    def read(self) -> dict[str, MirroredTable]:
        """What EC2 holds now: each lab subnet's route table, as kernel routes."""
        in_vpc = [{"Name": "vpc-id", "Values": [self.vpc_id]}]
        tables = self.ec2.describe_route_tables(Filters=in_vpc).get("RouteTables", [])
        eni_ids = sorted(
            {
                r["NetworkInterfaceId"]
                for t in tables
                for r in t.get("Routes", [])
                if r.get("NetworkInterfaceId")
            }
        )
        interfaces: dict[str, Mapping[str, Any]] = {}
        if eni_ids:
            described = self.ec2.describe_network_interfaces(
                Filters=[{"Name": "network-interface-id", "Values": eni_ids}]
            )
            interfaces = {e["NetworkInterfaceId"]: e for e in described["NetworkInterfaces"]}
        mirrored = {}
        for subnet_id, (table, main) in subnet_tables(tables, self.links).items():
            mirrored[subnet_id] = MirroredTable(
                subnet_id=subnet_id,
                cidr=self.links[subnet_id].cidr,
                route_table_id=table.get("RouteTableId") if table else None,
                main=main,
                routes=tuple(kernel_routes(table, self.links, interfaces)),
            )
        return mirrored

    def sync(self) -> list[str]:
        """Make every kernel table match EC2 now; the ``ip -batch`` lines it took (none: equal)."""
        with self._lock:
            mirrored = self.read()
            lines: list[str] = []
            for subnet_id, table in mirrored.items():
                kernel_table = self.links[subnet_id].table
                current = parse_kernel_table(self._show(kernel_table))
                lines += batch(kernel_table, list(table.routes), current)
            if lines:
                self.run_ip(["-batch", "-"], "\n".join(lines) + "\n")
                self.changes += lines
            self.tables = mirrored
            self.syncs += 1
            return lines

    def _show(self, table: int) -> list[dict[str, Any]]:
        try:
            return json.loads(self.run_ip(["-j", "route", "show", "table", str(table)]) or "[]")
        except Exception as exc:
            if "does not exist" in str(exc):  # a table nothing was ever put in
                return []
            raise

    def kernel_table(self, subnet_id: str) -> list[str]:
        """The router's kernel table for a subnet, as ``ip route`` prints it."""
        return [
            KernelRoute.from_json(entry).spec() for entry in self._show(self.links[subnet_id].table)
        ]
