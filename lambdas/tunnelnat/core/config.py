"""The validated configuration shared by the CDK app and the controller.

One model, so a value that synthesizes is a value the controller accepts, and a bad value is
reported with the name of its key wherever it comes from (CDK context or the Lambda's
environment).
"""

from __future__ import annotations

import ipaddress
import re
from enum import StrEnum
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# AWS tag keys/values allow letters, digits, spaces and _.:/=+-@; we accept exactly that set so a
# configured value can never carry shell metacharacters.
TAG_TEXT = re.compile(r"^[A-Za-z0-9 _.:/=+@-]{1,128}$")
INSTANCE_ID = re.compile(r"^i-[0-9a-f]{8,17}$")
# The stack's deployment names (stacks/settings.py): they name files on instances
# (/etc/tunnelnat/routes.d/<deployment>) and hooks, so never "." or "..", never a "/".
DEPLOYMENT = re.compile(r"^[a-z][a-z0-9-]{1,28}[a-z0-9]$")
DEFAULT_DEPLOYMENT = "tunnelnat"


def default_enrolment_tag_key(deployment: str) -> str:
    """The enrolment tag key when none is configured: ``tunnelnat`` for the default deployment
    (what every earlier version used), ``tunnelnat:<deployment>`` for any other, so two
    deployments in one account never enrol one instance both (issue 21, finding 4)."""
    return "tunnelnat" if deployment == DEFAULT_DEPLOYMENT else f"tunnelnat:{deployment}"


# Networks no unicast peer lives in: the partner's endpoint T cannot be here, and routing a
# partner network that overlaps them via G would capture the instance's own loopback, its metadata
# service (169.254.169.254) or multicast.
NOT_UNICAST: tuple[tuple[IPv4Network, str], ...] = (
    (IPv4Network("169.254.0.0/16"), "link-local (RFC 3927: the instance metadata service)"),
    (IPv4Network("127.0.0.0/8"), "loopback (RFC 1122)"),
    (IPv4Network("0.0.0.0/8"), "'this network' (RFC 791; 0.0.0.0 is the unspecified address)"),
    (IPv4Network("224.0.0.0/4"), "multicast (RFC 5771)"),
    (IPv4Network("240.0.0.0/4"), "reserved (RFC 1112; 255.255.255.255 is broadcast)"),
)
# Our public addresses S are Elastic IPs: none of them lies in a private or special-purpose range.
# The documentation ranges of RFC 5737 (192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24) are allowed
# on purpose: the lab, the tests and the examples use them, and AWS never hands them out, so a
# real deployment cannot use them by accident (its Elastic IPs are real addresses).
NOT_PUBLIC: tuple[tuple[IPv4Network, str], ...] = (
    *NOT_UNICAST,
    (IPv4Network("10.0.0.0/8"), "private (RFC 1918)"),
    (IPv4Network("172.16.0.0/12"), "private (RFC 1918)"),
    (IPv4Network("192.168.0.0/16"), "private (RFC 1918)"),
    (IPv4Network("100.64.0.0/10"), "shared address space for carrier-grade NAT (RFC 6598)"),
    (IPv4Network("192.0.0.0/24"), "IETF protocol assignments (RFC 6890)"),
    (IPv4Network("198.18.0.0/15"), "benchmarking (RFC 2544)"),
)


class NatMode(StrEnum):
    """How an enrolled instance's public source address S is chosen (see DESIGN, NAT modes)."""

    DEDICATED = "dedicated"  # one address per instance from a pool of Elastic IPs we own
    INSTANCE = "instance"  # the instance's own public IP
    SHARED = "shared"  # one address for every instance, port-translated


class ConfigError(ValueError):
    """A configuration value is missing or invalid; the message names the key."""


class TunnelnatConfig(BaseModel):
    """What the gateway and the controller need to know about the partner and our addresses."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    partner_endpoint: IPv4Address = Field(description="the partner's VPN endpoint T")
    partner_networks: tuple[IPv4Network, ...] = Field(
        description="CIDRs behind the partner's endpoint (the app servers A)", min_length=1
    )
    nat_mode: NatMode = Field(default=NatMode.DEDICATED)
    address_pool: tuple[IPv4Address, ...] = Field(
        default=(), description="dedicated mode: the public addresses handed out, one per instance"
    )
    shared_address: IPv4Address | None = Field(default=None, description="shared mode: the one S")
    enrolment_tag_key: str = Field(default="tunnelnat")
    enrolment_tag_value: str = Field(default="enabled")
    gateway_private_ip: IPv4Address = Field(description="G, the fixed ENI address routes point at")
    gateway_subnet_cidr: IPv4Network = Field(
        description="the gateway's subnet; only instances inside it can route via G"
    )
    tunnel_mss: int = Field(default=1360, ge=536, le=1460, description="TCP MSS clamp")

    @field_validator("enrolment_tag_key", "enrolment_tag_value")
    @classmethod
    def _tag_text(cls, value: str) -> str:
        if not TAG_TEXT.fullmatch(value):
            raise ValueError("must be 1-128 characters of letters, digits, spaces and _.:/=+@-")
        if value.lower().startswith("aws:"):
            raise ValueError("the aws: prefix is reserved by AWS")
        return value

    @field_validator("partner_networks", mode="before")
    @classmethod
    def _split_networks(cls, value: Any) -> Any:
        return _split_csv(value)

    @field_validator("address_pool", mode="before")
    @classmethod
    def _split_pool(cls, value: Any) -> Any:
        return _split_csv(value)

    @model_validator(mode="after")
    def _consistent(self) -> TunnelnatConfig:
        # Every problem at once, one line each, each naming its keys.
        problems = [*self._placement_problems(), *self._public_address_problems()]
        if self.nat_mode is NatMode.DEDICATED and not self.address_pool:
            problems.append("nat_mode 'dedicated' needs address_pool: a list of public addresses")
        if self.nat_mode is NatMode.SHARED and self.shared_address is None:
            problems.append("nat_mode 'shared' needs shared_address")
        if problems:
            raise ValueError("\n  ".join(problems))
        return self

    def _placement_problems(self) -> list[str]:
        problems = []
        subnet = self.gateway_subnet_cidr
        if self.gateway_private_ip not in subnet:
            problems.append(
                f"gateway_private_ip {self.gateway_private_ip} is outside "
                f"gateway_subnet_cidr {subnet}"
            )
        endpoint = self.partner_endpoint
        if reserved := special_range(endpoint, NOT_UNICAST):
            problems.append(f"partner_endpoint {endpoint} is {reserved}: not a VPN peer")
        if endpoint in subnet:
            problems.append(
                f"partner_endpoint {endpoint} lies inside gateway_subnet_cidr {subnet}: "
                "T is the partner's, not an address of our VPC"
            )
        for net in self.partner_networks:
            if net.prefixlen == 0:
                # Route-table mode would replace the VPC's default route with the tunnel
                # (everything, the internet and AWS endpoints included, to the partner).
                problems.append(
                    f"partner_networks {net} is the default route: tunnelnat never routes "
                    "0.0.0.0/0 (list the partner's networks)"
                )
            if net.overlaps(subnet):
                problems.append(f"partner_networks {net} overlaps the gateway's subnet")
            if endpoint in net:
                problems.append(f"partner_endpoint {endpoint} lies inside {net}")
            special = next(((n, what) for n, what in NOT_UNICAST if net.overlaps(n)), None)
            if special:
                problems.append(
                    f"partner_networks {net} overlaps {special[0]}, {special[1]}: a route to it "
                    "via G would take that range away from every enrolled instance"
                )
        return problems

    def _public_address_problems(self) -> list[str]:
        problems = []
        if len(set(self.address_pool)) != len(self.address_pool):
            problems.append("address_pool lists an address twice")
        public = [("address_pool", a) for a in self.address_pool]
        if self.shared_address is not None:
            public.append(("shared_address", self.shared_address))
        for key, address in public:
            if any(address in net for net in self.partner_networks):
                problems.append(f"public address {address} ({key}) lies inside partner_networks")
            if address == self.partner_endpoint:
                problems.append(
                    f"{key} {address} is partner_endpoint: S is our address, T the partner's"
                )
            if address == self.gateway_private_ip:
                problems.append(
                    f"{key} {address} is gateway_private_ip: S is a public address, G a private one"
                )
            elif address in self.gateway_subnet_cidr:
                problems.append(
                    f"{key} {address} lies inside gateway_subnet_cidr {self.gateway_subnet_cidr}: "
                    "S must be a public address (an Elastic IP we own)"
                )
            elif reserved := special_range(address, NOT_PUBLIC):
                problems.append(
                    f"{key} {address} is {reserved}: S must be a public address (an Elastic IP "
                    "we own) the partner can whitelist"
                )
        return problems

    @property
    def public_addresses(self) -> tuple[IPv4Address, ...]:
        """Every address S that may appear as a source in the tunnel (its traffic selectors)."""
        if self.nat_mode is NatMode.SHARED:
            assert self.shared_address is not None
            return (self.shared_address,)
        return self.address_pool

    @classmethod
    def from_mapping(
        cls, values: dict[str, Any], *, source: str = "configuration"
    ) -> TunnelnatConfig:
        """Validate ``values``; a failure raises ConfigError naming each bad key."""
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            raise ConfigError(describe_validation_error(exc, source)) from None


def describe_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"invalid {source}:"]
    for err in exc.errors():
        if not err["loc"] and err["type"] == "value_error":
            # A check across keys: its message names the keys, one problem a line.
            lines.append(f"  {err['ctx']['error']}")
            continue
        key = ".".join(str(part) for part in err["loc"]) or "(model)"
        given = err.get("input")
        shown = "" if isinstance(given, dict) else f" (got {given!r})"
        lines.append(f"  {key}: {err['msg']}{shown}")
    return "\n".join(lines)


def _split_csv(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def special_range(address: IPv4Address, ranges: tuple[tuple[IPv4Network, str], ...]) -> str | None:
    """``"<network>, <what it is>"`` for the first of ``ranges`` holding ``address``, else None."""
    for network, what in ranges:
        if address in network:
            return f"in {network}, {what}"
    return None


def is_instance_id(value: str) -> bool:
    return bool(INSTANCE_ID.fullmatch(value))


def parse_ipv4(value: str | None) -> IPv4Address | None:
    """An IPv4 address from an AWS API field, or None when absent or not an address."""
    if not value:
        return None
    try:
        return ipaddress.IPv4Address(value)
    except ValueError:
        return None
