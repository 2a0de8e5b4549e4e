"""Whether an instance should be enrolled, and with which public address: pure decisions."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from ipaddress import IPv4Address

from tunnelnat.core.config import TAG_TEXT, NatMode, TunnelnatConfig

# A label only (issue 21): nothing trusts it. Who is a gateway is decided by the gateway's Auto
# Scaling group, which users cannot set: tag keys with the aws: prefix are reserved for AWS
# ("You can't edit or delete tag keys with this prefix", EC2 User Guide, Tag restrictions).
GATEWAY_ROLE_TAG = "tunnelnat:role"
GROUP_TAG = "aws:autoscaling:groupName"  # Auto Scaling puts it on every instance it launches
# The shared key of earlier versions; each deployment now writes its own (``status_tag``).
STATUS_TAG = "tunnelnat:status"


def status_tag(deployment: str) -> str:
    """The status tag's key for one deployment: ``tunnelnat:status:<deployment>``. Keyed per
    deployment so two deployments in one account never read (or are authorised by) each
    other's marks; the controller's IAM conditions name the same key."""
    return f"{STATUS_TAG}:{deployment}"


class Status(StrEnum):
    """What the controller last concluded about an instance (stored, and shown to operators)."""

    ENROLLED = "enrolled"
    NOT_TAGGED = "not-tagged"
    NOT_RUNNING = "not-running"
    GONE = "gone"
    INVALID_TAG = "invalid-tag"
    NO_PRIVATE_IP = "no-private-ip"
    NO_PUBLIC_IP = "no-public-ip"
    UNSUPPORTED_SUBNET = "unsupported-subnet"
    POOL_EXHAUSTED = "pool-exhausted"
    IS_GATEWAY = "is-gateway"
    # Tagged, but in another VPC than the gateway's: never ours, whatever its address.
    OTHER_VPC = "other-vpc"
    # Its private address is mapped for another instance already: never both (a human looks).
    CONFLICT = "conflict"
    # Route-table mode: its subnet's route table has a route for a partner network that
    # tunnelnat did not create (or someone changed ours): left alone, reported, not retried.
    ROUTE_CONFLICT = "route-conflict"
    # Tagged, but outside the allow-list of subnets / Auto Scaling groups: never enrolled.
    NOT_ALLOWED = "not-allowed"
    # Route-table mode: its subnet's route table is not one the network owner opted in
    # (tag tunnelnat:routes=<deployment>, or listed): never changed, never enrolled.
    ROUTE_TABLE_NOT_OPTED_IN = "route-table-not-opted-in"


# Statuses of instances that cannot be served: none keeps a pool address (issue 21, finding 6;
# docs/operations.md, "An instance that cannot be served").
UNSERVED = frozenset(
    {
        Status.NOT_ALLOWED,
        Status.ROUTE_TABLE_NOT_OPTED_IN,
        Status.ROUTE_CONFLICT,
        Status.UNSUPPORTED_SUBNET,
        Status.CONFLICT,
    }
)


@dataclass(frozen=True)
class AllowList:
    """Where a tagged instance may be enrolled: in one of ``subnets`` and a member of one of
    ``groups`` (its aws:autoscaling:groupName, which only Auto Scaling sets). An empty set
    restricts nothing; with both given, both must hold."""

    subnets: frozenset[str] = frozenset()
    groups: frozenset[str] = frozenset()

    def refusal(self, instance: ObservedInstance) -> str | None:
        """Why ``instance`` is outside the allow-list; None when it may be enrolled."""
        reasons = []
        if self.subnets and instance.subnet_id not in self.subnets:
            reasons.append(
                f"its subnet {instance.subnet_id or '(none)'} is not one of the allowed subnets "
                f"({', '.join(sorted(self.subnets))})"
            )
        group = instance.tags.get(GROUP_TAG)
        if self.groups and group not in self.groups:
            where = f"its Auto Scaling group {group}" if group else "it is in no Auto Scaling group"
            reasons.append(
                f"{where}, not one of the allowed groups ({', '.join(sorted(self.groups))})"
            )
        return "; ".join(reasons) or None


class Mode(StrEnum):
    """How an enrolled instance's partner-bound packets reach the gateway."""

    # In the gateway's subnet: a host route via G on the instance (AddHostRoute).
    HOST_ROUTE = "host-route"
    # Any other subnet of the gateway's VPC: a route in the subnet's route table to the
    # gateway's ENI, shared by every instance behind that table; nothing on the instance.
    ROUTE_TABLE = "route-table"


@dataclass(frozen=True)
class ObservedInstance:
    """An instance as EC2 reports it right now (the controller never trusts an event's copy)."""

    instance_id: str
    state: str
    private_ip: IPv4Address | None
    public_ip: IPv4Address | None = None
    subnet_id: str | None = None
    tags: Mapping[str, str] = field(default_factory=dict)
    vpc_id: str | None = None


@dataclass(frozen=True)
class Decision:
    enrol: bool
    status: Status
    reason: str
    mode: Mode = Mode.HOST_ROUTE


def decide_enrolment(
    instance: ObservedInstance | None,
    config: TunnelnatConfig,
    *,
    vpc_id: str | None = None,
    route_tables: bool = False,
    allowed: AllowList | None = None,
    gateway_group: str | None = None,
) -> Decision:
    """Should ``instance`` be enrolled, and how? Ordered so the reason given is the most useful.

    ``vpc_id`` is the gateway's VPC: an instance elsewhere is never enrolled, even when its
    address falls in the gateway subnet's range (the gateway would NAT whichever instance of
    its own VPC holds that address). ``route_tables``: route-table mode is on (the controller
    knows the VPC and the gateway's ENI), so other subnets of the VPC are served through their
    route tables; without it only the gateway's own subnet can be (a host route needs G
    on-link). ``allowed``: the allow-list a tagged instance must be inside (issue 21).
    ``gateway_group``: the gateway's Auto Scaling group, whose members (active or standby) are
    never enrolled; without it (no group known) the ``tunnelnat:role`` label stands in."""
    if instance is None or instance.state in ("terminated", "shutting-down"):
        return Decision(False, Status.GONE, "the instance no longer exists")
    if gateway_group is not None:
        if instance.tags.get(GROUP_TAG) == gateway_group:
            return Decision(False, Status.IS_GATEWAY, "the gateway itself is never enrolled")
    elif instance.tags.get(GATEWAY_ROLE_TAG) == "gateway":
        return Decision(False, Status.IS_GATEWAY, "the gateway itself is never enrolled")
    if vpc_id is not None and instance.vpc_id != vpc_id:
        return Decision(
            False,
            Status.OTHER_VPC,
            f"the instance is in {instance.vpc_id or 'no VPC'}, not the gateway's {vpc_id}",
        )
    value = instance.tags.get(config.enrolment_tag_key)
    if value is None:
        return Decision(False, Status.NOT_TAGGED, f"no {config.enrolment_tag_key} tag")
    if value != config.enrolment_tag_value:
        shown = value if TAG_TEXT.fullmatch(value) else repr(value[:40])
        return Decision(
            False,
            Status.INVALID_TAG,
            f"tag {config.enrolment_tag_key}={shown}; expected {config.enrolment_tag_value!r}",
        )
    refusal = allowed.refusal(instance) if allowed is not None else None
    if refusal is not None:
        # Whoever tagged it may not give it the partner's network: never enrolled, whatever its
        # state (and unenrolled if it was, the allow-list having narrowed since).
        return Decision(False, Status.NOT_ALLOWED, f"tagged for enrolment, but {refusal}")
    if instance.state != "running":
        return Decision(False, Status.NOT_RUNNING, f"instance is {instance.state}")
    if instance.private_ip is None:
        return Decision(False, Status.NO_PRIVATE_IP, "the instance has no private IPv4 address")
    mode = Mode.HOST_ROUTE
    if instance.private_ip not in config.gateway_subnet_cidr:
        if not route_tables or vpc_id is None or not instance.subnet_id:
            return Decision(
                False,
                Status.UNSUPPORTED_SUBNET,
                f"{instance.private_ip} is outside the gateway's subnet "
                f"{config.gateway_subnet_cidr} and route-table mode is off: a host route via "
                "the gateway cannot work there",
            )
        mode = Mode.ROUTE_TABLE
    if config.nat_mode is NatMode.INSTANCE and instance.public_ip is None:
        return Decision(False, Status.NO_PUBLIC_IP, "nat_mode 'instance' needs a public IP")
    if mode is Mode.ROUTE_TABLE:
        return Decision(
            True,
            Status.ENROLLED,
            f"tagged, running, in {instance.subnet_id} of the gateway's VPC (route-table mode)",
            Mode.ROUTE_TABLE,
        )
    return Decision(True, Status.ENROLLED, "tagged, running, in the gateway's subnet")


class AddressPool:
    """The public addresses of ``dedicated`` mode; which one is free is decided by the caller's
    view of the claims, and the claim itself is a conditional write (see the store)."""

    def __init__(self, addresses: Iterable[IPv4Address]) -> None:
        self._addresses = tuple(sorted(set(addresses)))

    def __contains__(self, address: object) -> bool:
        return address in self._addresses

    def __len__(self) -> int:
        return len(self._addresses)

    def free(self, claimed: Iterable[IPv4Address]) -> list[IPv4Address]:
        taken = set(claimed)
        return [a for a in self._addresses if a not in taken]


def public_address_for(
    instance: ObservedInstance,
    config: TunnelnatConfig,
    *,
    current: IPv4Address | None,
    claimed: Iterable[IPv4Address],
) -> IPv4Address | None:
    """The address S this instance should appear as; None when the pool has none left.

    An instance keeps the address it already has while that address is still valid, so a
    re-run never moves it (the partner may have whitelisted it)."""
    if config.nat_mode is NatMode.SHARED:
        return config.shared_address
    if config.nat_mode is NatMode.INSTANCE:
        return instance.public_ip
    pool = AddressPool(config.address_pool)
    if current is not None and current in pool:
        return current
    free = pool.free(claimed)
    return free[0] if free else None
