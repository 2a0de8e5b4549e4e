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
        if self.gateway_private_ip not in self.gateway_subnet_cidr:
            raise ValueError(
                f"gateway_private_ip {self.gateway_private_ip} is outside "
                f"gateway_subnet_cidr {self.gateway_subnet_cidr}"
            )
        for net in self.partner_networks:
            if net.overlaps(self.gateway_subnet_cidr):
                raise ValueError(f"partner_networks {net} overlaps the gateway's subnet")
            if self.partner_endpoint in net:
                raise ValueError(f"partner_endpoint {self.partner_endpoint} lies inside {net}")
        if len(set(self.address_pool)) != len(self.address_pool):
            raise ValueError("address_pool lists an address twice")
        for address in (*self.address_pool, self.shared_address):
            if address is not None and any(address in net for net in self.partner_networks):
                raise ValueError(f"public address {address} lies inside partner_networks")
        if self.nat_mode is NatMode.DEDICATED and not self.address_pool:
            raise ValueError("nat_mode 'dedicated' needs address_pool: a list of public addresses")
        if self.nat_mode is NatMode.SHARED and self.shared_address is None:
            raise ValueError("nat_mode 'shared' needs shared_address")
        return self

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
        key = ".".join(str(part) for part in err["loc"]) or "(model)"
        given = err.get("input")
        shown = "" if isinstance(given, dict) else f" (got {given!r})"
        lines.append(f"  {key}: {err['msg']}{shown}")
    return "\n".join(lines)


def _split_csv(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


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
