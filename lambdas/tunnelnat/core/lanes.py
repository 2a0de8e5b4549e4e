"""Lanes: what every part of a several-partner deployment knows about one partner (issue 23).

A deployment with a partners file serves each partner as a *lane*: its own enrolment tag key,
DynamoDB table of mappings, status tag, instance route scope and NAT maps on the shared gateway
pair. A lane is published once by the stack as one SSM parameter per partner under
``parameter_path(deployment)`` (each well under the 4 KB of a standard parameter, so any number
of partners fits; GetParametersByPath reads them all), and read by the controller, the gateway
(ConfigureGateway, the sync) and the CLI. The lab writes the same parameters.

Standard library only: the gateway archive carries this module (tools/gateway_package.py).
Names are derived here and nowhere else, so the stack's IAM conditions, the controller's writes
and the gateway's reads cannot disagree.

A deployment without a partners file has no lanes: today's single-partner names stay as they are.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any

LANE_VERSION = 1
PARTNER_NAME = re.compile(r"^[a-z][a-z0-9-]{0,22}[a-z0-9]$")
DEPLOYMENT_NAME = re.compile(r"^[a-z][a-z0-9-]{1,28}[a-z0-9]$")
NAT_MODES = ("dedicated", "instance", "shared")  # core/config.NatMode's values
# Tag keys as TunnelnatConfig allows them (letters, digits, spaces and _.:/=+@-).
TAG_KEY = re.compile(r"^[A-Za-z0-9 _.:/=+@-]{1,128}$")


class LaneError(ValueError):
    """A lane that must not be used: every problem, one per line."""


def parameter_path(deployment: str) -> str:
    """Where the stack publishes the lanes: ``/tunnelnat/<deployment>/partners``."""
    return f"/tunnelnat/{_deployment(deployment)}/partners"


def parameter_name(deployment: str, partner: str) -> str:
    return f"{parameter_path(deployment)}/{_partner(partner)}"


def partner_table(deployment: str, partner: str) -> str:
    """The lane's DynamoDB table of mappings: ``<deployment>-<partner>`` (the deployment's own
    table, named ``<deployment>``, keeps the pair's state)."""
    return f"{_deployment(deployment)}-{_partner(partner)}"


def partner_status_prefix(deployment: str) -> str:
    """How every lane's status tag key starts: ``tunnelnat:status:<deployment>:``."""
    return f"tunnelnat:status:{_deployment(deployment)}:"


def partner_status_tag(deployment: str, partner: str) -> str:
    """The lane's status tag key: ``tunnelnat:status:<deployment>:<partner>``."""
    return partner_status_prefix(deployment) + _partner(partner)


def route_scope(deployment: str, partner: str) -> str:
    """What the instance documents' ``Deployment`` parameter carries for a lane: it names the
    instance's drop-in and state file, so each lane's routes are its own.
    ``<deployment>.<partner>``: a deployment's name never has a dot, so no lane's scope is
    another deployment's."""
    return f"{_deployment(deployment)}.{_partner(partner)}"


@dataclass(frozen=True)
class Lane:
    """One partner as the controller and the gateway see it.

    ``networks`` are the partner's real networks (the tunnel's selectors); ``aliases`` are empty
    or one per network, same prefix length (what instances address instead). ``index`` is the
    partner's 1-based place in the partners file: its packet marks on the gateway (core/nat.py)."""

    deployment: str
    name: str
    index: int
    endpoint: IPv4Address
    networks: tuple[IPv4Network, ...]
    aliases: tuple[IPv4Network, ...]
    nat_mode: str
    pool: tuple[IPv4Address, ...]
    shared_address: IPv4Address | None
    tag_key: str
    ike_version: int = 2

    def __post_init__(self) -> None:
        problems = _problems(self)
        if problems:
            raise LaneError("\n".join(f"lane {self.name!r}: {p}" for p in problems))

    @property
    def table(self) -> str:
        return partner_table(self.deployment, self.name)

    @property
    def status_tag(self) -> str:
        return partner_status_tag(self.deployment, self.name)

    @property
    def scope(self) -> str:
        return route_scope(self.deployment, self.name)

    @property
    def parameter(self) -> str:
        return parameter_name(self.deployment, self.name)

    @property
    def local_networks(self) -> tuple[IPv4Network, ...]:
        """What instances route to G and connect to: the aliases, or the real networks."""
        return self.aliases or self.networks

    @property
    def public_addresses(self) -> tuple[IPv4Address, ...]:
        """Every S this partner may see: its pool, or its shared address."""
        return (self.shared_address,) if self.shared_address is not None else self.pool

    def to_json(self) -> str:
        """The parameter's value: compact, keys sorted (the same lane, the same bytes)."""
        return json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))

    def as_dict(self) -> dict[str, Any]:
        return {
            "version": LANE_VERSION,
            "deployment": self.deployment,
            "name": self.name,
            "index": self.index,
            "endpoint": str(self.endpoint),
            "networks": [str(n) for n in self.networks],
            "aliases": [str(n) for n in self.aliases],
            "nat_mode": self.nat_mode,
            "pool": [str(a) for a in self.pool],
            "shared_address": None if self.shared_address is None else str(self.shared_address),
            "tag_key": self.tag_key,
            "ike_version": self.ike_version,
        }

    @classmethod
    def from_json(cls, text: str) -> Lane:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise LaneError(f"lane is not JSON: {exc}") from None
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Lane:
        if not isinstance(data, Mapping):
            raise LaneError("lane is not an object")
        if data.get("version") != LANE_VERSION:
            raise LaneError(f"lane version {data.get('version')!r} is not {LANE_VERSION}")
        try:
            shared = data.get("shared_address")
            return cls(
                deployment=str(data["deployment"]),
                name=str(data["name"]),
                index=_int(data["index"]),
                endpoint=IPv4Address(data["endpoint"]),
                networks=tuple(IPv4Network(n) for n in data["networks"]),
                aliases=tuple(IPv4Network(n) for n in data.get("aliases") or ()),
                nat_mode=str(data["nat_mode"]),
                pool=tuple(IPv4Address(a) for a in data.get("pool") or ()),
                shared_address=None if shared is None else IPv4Address(shared),
                tag_key=str(data["tag_key"]),
                ike_version=_int(data.get("ike_version", 2)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, LaneError):
                raise
            raise LaneError(f"lane {data.get('name')!r}: bad or missing field: {exc}") from None


def load_lanes(values: Iterable[str]) -> tuple[Lane, ...]:
    """Lanes from their parameters' values, in index order; refuses a set that contradicts
    itself (two lanes with one name, index, table or tag key; not one deployment)."""
    lanes = sorted((Lane.from_json(v) for v in values), key=lambda lane: lane.index)
    problems = []
    for attr in ("name", "index", "tag_key"):
        seen: set[Any] = set()
        for lane in lanes:
            value = getattr(lane, attr)
            if value in seen:
                problems.append(f"two lanes share the {attr} {value!r}")
            seen.add(value)
    if len({lane.deployment for lane in lanes}) > 1:
        problems.append("lanes of more than one deployment")
    if problems:
        raise LaneError("\n".join(problems))
    return tuple(lanes)


def _problems(lane: Lane) -> list[str]:
    problems = []
    if not DEPLOYMENT_NAME.fullmatch(lane.deployment):
        problems.append(f"deployment {lane.deployment[:40]!r} is not a deployment name")
    if not PARTNER_NAME.fullmatch(lane.name):
        problems.append("name is not a partner name")
    if not 1 <= lane.index <= 0xFFFF:
        problems.append(f"index {lane.index} is outside 1-65535")
    if not lane.networks:
        problems.append("no networks")
    if lane.aliases:
        if len(lane.aliases) != len(lane.networks):
            problems.append("aliases must be one per network")
        elif any(
            a.prefixlen != n.prefixlen for a, n in zip(lane.aliases, lane.networks, strict=True)
        ):
            problems.append("an alias is not the size of its network")
    if lane.nat_mode not in NAT_MODES:
        problems.append(f"nat_mode {lane.nat_mode!r} is not one of {', '.join(NAT_MODES)}")
    elif lane.nat_mode == "shared" and (lane.shared_address is None or lane.pool):
        problems.append("nat_mode 'shared' takes shared_address and no pool")
    elif lane.nat_mode != "shared" and (not lane.pool or lane.shared_address is not None):
        problems.append(f"nat_mode {lane.nat_mode!r} takes a pool and no shared_address")
    if not TAG_KEY.fullmatch(lane.tag_key) or lane.tag_key.lower().startswith("aws:"):
        problems.append("tag_key is not a tag key we write")
    if lane.ike_version not in (1, 2):
        problems.append(f"ike_version {lane.ike_version} is not 1 or 2")
    return problems


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise LaneError(f"{value!r} is not an integer")
    return value


def _deployment(name: str) -> str:
    if not DEPLOYMENT_NAME.fullmatch(name):
        raise LaneError(f"{name[:40]!r} is not a deployment name")
    return name


def _partner(name: str) -> str:
    if not PARTNER_NAME.fullmatch(name):
        raise LaneError(f"{name[:40]!r} is not a partner name")
    return name
