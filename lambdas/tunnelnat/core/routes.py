"""Route-table mode, decided without AWS: which route table serves a subnet, and what must change
in a table for the instances enrolled behind it.

An instance outside the gateway's subnet cannot use a host route via G (G is not on-link), so
the VPC's router carries its partner-bound packets instead: the route table of its subnet gets one
route per partner network to the gateway's ENI. The route belongs to the table, not to one
instance: it is created with the first enrolled instance behind the table and removed with the
last. tunnelnat never overwrites or deletes a route it did not create; such a route is a conflict,
reported with the table and the route, and left alone.

What tunnelnat created is what its record says (``owned``: destination -> the ENI it pointed the
route at). The record is written before a route is created, so a crash between the two never
leaves a route tunnelnat made but does not know about.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Network

# A network owner opts a route table in for one deployment with this tag (value: the
# deployment's name); the controller's IAM allows route changes only on such tables (or those
# listed in context ``route_tables``). Every other table is read, never changed.
ROUTES_TAG = "tunnelnat:routes"
DEFAULT_ROUTE = IPv4Network("0.0.0.0/0")


class DefaultRouteRefused(ValueError):
    """tunnelnat never creates, re-points or deletes a 0.0.0.0/0 route (issue 21, finding 7)."""


def refuse_default_route(destination: str) -> None:
    """Raise DefaultRouteRefused for 0.0.0.0/0 (the last guard before an EC2 call)."""
    if IPv4Network(destination, strict=False).prefixlen == 0:
        raise DefaultRouteRefused(
            f"refusing to change the route for {destination}: tunnelnat never touches the "
            "default route"
        )


# The keys of a DescribeRouteTables route that name its target, in the order we look.
TARGET_KEYS = (
    "NetworkInterfaceId",
    "GatewayId",
    "NatGatewayId",
    "TransitGatewayId",
    "VpcPeeringConnectionId",
    "InstanceId",
    "LocalGatewayId",
    "CarrierGatewayId",
    "EgressOnlyInternetGatewayId",
    "VpcEndpointId",
    "CoreNetworkArn",
)


@dataclass(frozen=True)
class ObservedRoute:
    """One IPv4 route of a table as EC2 reports it."""

    destination: str
    target: str  # eni-…, igw-…, local, tgw-…, … ("unknown" when EC2 names none we know)
    origin: str = "CreateRoute"  # or CreateRouteTable (local), EnableVgwRoutePropagation
    state: str = "active"  # or blackhole (the target is gone)

    def describe(self) -> str:
        extra = "" if self.origin == "CreateRoute" else f", {self.origin}"
        extra += "" if self.state == "active" else f", {self.state}"
        return f"{self.destination} -> {self.target}{extra}"


@dataclass(frozen=True)
class RouteTableView:
    """A route table as EC2 reports it: its subnets (explicit associations), whether it is the
    VPC's main table, and its IPv4 routes by destination."""

    table_id: str
    vpc_id: str
    main: bool = False
    subnets: frozenset[str] = frozenset()
    routes: Mapping[str, ObservedRoute] = field(default_factory=dict)
    tags: Mapping[str, str] = field(default_factory=dict)


def opted_in(table: RouteTableView, deployment: str, listed: Collection[str] = ()) -> bool:
    """Whether the network owner let this deployment change ``table``: it carries
    ``tunnelnat:routes=<deployment>``, or the deployment's context lists it."""
    return table.table_id in listed or table.tags.get(ROUTES_TAG) == deployment


def route_from_describe(raw: Mapping) -> ObservedRoute | None:
    """An IPv4 route of DescribeRouteTables' reply (None for IPv6 and prefix-list routes)."""
    destination = raw.get("DestinationCidrBlock")
    if not destination:
        return None
    target = next((str(raw[k]) for k in TARGET_KEYS if raw.get(k)), "unknown")
    return ObservedRoute(
        destination=str(destination),
        target=target,
        origin=str(raw.get("Origin", "CreateRoute")),
        state=str(raw.get("State", "active")),
    )


def table_from_describe(raw: Mapping) -> RouteTableView:
    associations = raw.get("Associations", [])
    routes = [route_from_describe(r) for r in raw.get("Routes", [])]
    return RouteTableView(
        table_id=str(raw["RouteTableId"]),
        vpc_id=str(raw.get("VpcId", "")),
        main=any(a.get("Main") for a in associations),
        subnets=frozenset(str(a["SubnetId"]) for a in associations if a.get("SubnetId")),
        routes={r.destination: r for r in routes if r is not None},
        tags={str(t["Key"]): str(t.get("Value", "")) for t in raw.get("Tags", []) if "Key" in t},
    )


def table_for_subnet(subnet_id: str, tables: Iterable[RouteTableView]) -> str | None:
    """The table that routes ``subnet_id``'s traffic: the one explicitly associated with the
    subnet, else the VPC's main table (what the VPC router uses); None when neither is seen."""
    main: str | None = None
    for table in tables:
        if subnet_id in table.subnets:
            return table.table_id
        if table.main:
            main = table.table_id
    return main


@dataclass(frozen=True)
class RouteConflict:
    """A route in a table that tunnelnat did not create (or that someone changed after tunnelnat
    created it) for a partner network, inside one, or around one: reported, never touched.

    ``partner`` is the partner network it overlaps; ``relation`` how: ``equal`` (the same
    destination: ours cannot be created), ``narrower`` (inside a partner network: by longest
    prefix match that part of the partner's network goes to its target, not the tunnel), or
    ``broader`` (around one: our route would take the partner's part of the traffic it
    carries)."""

    table_id: str
    route: ObservedRoute
    changed: bool = False  # it was ours, and someone pointed it elsewhere
    partner: str | None = None
    relation: str = "equal"

    def describe(self) -> str:
        if self.relation == "narrower":
            return (
                f"route table {self.table_id} has {self.route.describe()}, inside partner "
                f"network {self.partner}: {self.route.destination} of it would go to "
                f"{self.route.target}, not the tunnel; left alone"
            )
        if self.relation == "broader":
            return (
                f"route table {self.table_id} has {self.route.describe()}, around partner "
                f"network {self.partner}: a route of ours would take {self.partner} from "
                f"{self.route.target}; left alone"
            )
        how = "changed since tunnelnat created it" if self.changed else "not created by tunnelnat"
        return f"route table {self.table_id} has {self.route.describe()}, {how}: left alone"


def overlapping(
    table: RouteTableView, destinations: Iterable[str], owned: Mapping[str, str], eni: str
) -> list[RouteConflict]:
    """Routes of ``table`` narrower or broader than a partner network that tunnelnat did not
    create (equal destinations are ``plan_table``'s own case).

    Not counted: routes to the gateway's ENI (ours, or the same as ours), routes the record
    owns, and the default route 0.0.0.0/0: partner traffic follows it only while no route of
    ours exists, and taking the partner's networks from it is what route-table mode is for."""
    wanted = [IPv4Network(d, strict=False) for d in dict.fromkeys(str(d) for d in destinations)]
    found: list[RouteConflict] = []
    for route in table.routes.values():
        try:
            net = IPv4Network(route.destination, strict=False)
        except ValueError:
            continue
        if net.prefixlen == 0 or route.target == eni or route.destination in owned:
            continue
        for partner in wanted:
            if net == partner or not net.overlaps(partner):
                continue
            relation = "narrower" if net.subnet_of(partner) else "broader"
            found.append(RouteConflict(table.table_id, route, partner=str(partner),
                                       relation=relation))  # fmt: skip
    return sorted(found, key=lambda c: (c.partner or "", c.route.destination))


@dataclass(frozen=True)
class TableChanges:
    """What one table needs: routes to create, to re-point (ours, at an old ENI), to delete
    (ours, still as we left them), the conflicts, and what the record owns once they are done."""

    table_id: str
    create: tuple[str, ...] = ()
    replace: tuple[str, ...] = ()
    delete: tuple[str, ...] = ()
    conflicts: tuple[RouteConflict, ...] = ()
    owned: Mapping[str, str] = field(default_factory=dict)
    # What the record must own while the calls run: ``owned`` plus the routes still to delete
    # (a route is forgotten only once it is gone, so a crash never orphans one of ours).
    owned_during: Mapping[str, str] = field(default_factory=dict)

    @property
    def calls(self) -> bool:
        return bool(self.create or self.replace or self.delete)


def plan_table(
    table: RouteTableView,
    *,
    members: Collection[str],
    owned: Mapping[str, str],
    destinations: Iterable[str],
    eni: str,
) -> TableChanges:
    """What ``table`` needs so that, while it has ``members``, each of ``destinations`` goes to
    ``eni``, and without members no route of ours is left. ``owned`` is what the record says
    tunnelnat created (destination -> ENI)."""
    destinations = list(dict.fromkeys(str(d) for d in destinations))
    for destination in destinations:
        refuse_default_route(destination)
    wanted = destinations if members else []
    # A foreign route inside or around a partner network: that network's route is never
    # created (nor re-pointed) while it is there; one of ours in place stays (others use it).
    around = overlapping(table, wanted, owned, eni)
    blocked = {c.partner for c in around}
    create: list[str] = []
    replace: list[str] = []
    delete: list[str] = []
    conflicts: list[RouteConflict] = []
    after: dict[str, str] = {}
    for destination in wanted:
        route = table.routes.get(destination)
        mine = owned.get(destination)
        if route is None:
            if destination not in blocked:
                create.append(destination)  # the first member, or ours was deleted under us
                after[destination] = eni
        elif mine is not None and route.target == eni:
            after[destination] = eni
        elif mine is not None and route.target == mine:
            if destination in blocked:
                after[destination] = mine  # ours still, left where it points
            else:
                replace.append(destination)  # ours, at the ENI of an earlier setting
                after[destination] = eni
        else:
            # Someone else's (or ours, pointed elsewhere since): theirs now, never touched.
            conflicts.append(RouteConflict(table.table_id, route, changed=mine is not None,
                                           partner=destination))  # fmt: skip
    conflicts.extend(around)
    for destination, mine in owned.items():
        if destination in wanted:
            continue
        route = table.routes.get(destination)
        if route is not None and route.target == mine:
            delete.append(destination)  # ours, as we left it: the last member is gone
        # else: gone already, or someone else's now: nothing of ours to remove.
    return TableChanges(
        table.table_id,
        create=tuple(create),
        replace=tuple(replace),
        delete=tuple(delete),
        conflicts=tuple(conflicts),
        owned=after,
        owned_during={**after, **{d: owned[d] for d in delete}},
    )


def describe_routes(table_id: str, destinations: Iterable[str], eni: str) -> str:
    return f"route table {table_id} sends {', '.join(destinations)} to {eni}"
