"""The controller's run-time settings, read once from the Lambda's environment."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tunnelnat.core.config import (
    DEFAULT_DEPLOYMENT,
    DEPLOYMENT,
    ConfigError,
    TunnelnatConfig,
    default_enrolment_tag_key,
)
from tunnelnat.core.enrolment import AllowList

SUBNET_ID = r"^subnet-[0-9a-f]{8,17}$"
ROUTE_TABLE_ID = r"^rtb-[0-9a-f]{8,17}$"
# Auto Scaling group names as the controller accepts them elsewhere (events.LifecycleDetail).
GROUP_NAME = r"^[A-Za-z0-9_.:/ +=@-]{1,255}$"


class ControllerSettings(BaseModel):
    model_config = ConfigDict(frozen=True)

    config: TunnelnatConfig
    table_name: str = Field(pattern=r"^[A-Za-z0-9_.-]{3,255}$")
    # The stack's own pattern: the name reaches file names on instances and hook names.
    deployment: str = Field(default=DEFAULT_DEPLOYMENT, pattern=DEPLOYMENT.pattern)
    document_prefix: str = Field(default="tunnelnat-", pattern=r"^[A-Za-z0-9_.-]{0,100}$")
    region: str = Field(pattern=r"^[a-z]{2}(-[a-z]+)+-[0-9]$")
    # The gateway's VPC: instances elsewhere are never enrolled (the stack always sets it).
    vpc_id: str | None = Field(default=None, pattern=r"^vpc-[0-9a-f]{8,17}$")
    # The gateway's Auto Scaling group: the gateway is the member of it that holds G.
    gateway_group: str | None = Field(default=None, pattern=GROUP_NAME)
    # The standalone ENI that holds G. With it (and vpc_id), route-table mode is on: instances in
    # other subnets of the VPC are served by a route in their subnet's route table to this ENI.
    gateway_eni_id: str | None = Field(default=None, pattern=r"^eni-[0-9a-f]{8,17}$")
    # Who may enrol (context enrolment_subnets / enrolment_groups): empty, no restriction.
    allowed_subnets: tuple[str, ...] = ()
    allowed_groups: tuple[str, ...] = ()
    # Route-table mode: route tables the network owner opted in by list (context route_tables),
    # besides those tagged tunnelnat:routes=<deployment>.
    route_tables: tuple[str, ...] = ()

    @property
    def route_table_mode(self) -> bool:
        return self.vpc_id is not None and self.gateway_eni_id is not None

    @property
    def allow_list(self) -> AllowList:
        return AllowList(frozenset(self.allowed_subnets), frozenset(self.allowed_groups))

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> ControllerSettings:
        env = os.environ if environ is None else environ
        missing = [k for k in ("TUNNELNAT_CONFIG", "TUNNELNAT_TABLE_NAME") if not env.get(k)]
        if missing:
            raise ConfigError(f"missing environment variable(s): {', '.join(missing)}")
        try:
            raw = json.loads(env["TUNNELNAT_CONFIG"])
        except ValueError as exc:
            raise ConfigError(f"TUNNELNAT_CONFIG is not JSON: {exc}") from None
        deployment = env.get("TUNNELNAT_DEPLOYMENT", DEFAULT_DEPLOYMENT)
        if isinstance(raw, dict) and "enrolment_tag_key" not in raw:
            # No key configured: this deployment's own (never another deployment's default).
            raw = {**raw, "enrolment_tag_key": default_enrolment_tag_key(deployment)}
        config = TunnelnatConfig.from_mapping(raw, source="TUNNELNAT_CONFIG")
        lists = {
            "allowed_subnets": ("TUNNELNAT_ALLOWED_SUBNETS", SUBNET_ID),
            "allowed_groups": ("TUNNELNAT_ALLOWED_GROUPS", GROUP_NAME),
            "route_tables": ("TUNNELNAT_ROUTE_TABLES", ROUTE_TABLE_ID),
        }
        values = {key: _csv(env, name, pattern) for key, (name, pattern) in lists.items()}
        try:
            return cls(
                config=config,
                table_name=env["TUNNELNAT_TABLE_NAME"],
                deployment=deployment,
                document_prefix=env.get("TUNNELNAT_DOCUMENT_PREFIX", "tunnelnat-"),
                region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
                vpc_id=env.get("TUNNELNAT_VPC_ID") or None,
                gateway_group=env.get("TUNNELNAT_GATEWAY_GROUP") or None,
                gateway_eni_id=env.get("TUNNELNAT_GATEWAY_ENI_ID") or None,
                **values,
            )
        except ValidationError as exc:
            fields = ", ".join(".".join(str(p) for p in e["loc"]) for e in exc.errors())
            raise ConfigError(f"invalid controller settings ({fields}): {exc}") from None


def _csv(env: Mapping[str, str], name: str, pattern: str) -> tuple[str, ...]:
    """A comma-separated list (empty: none); a malformed item fails the whole setting, so a
    typo never widens an allow-list to 'unrestricted'."""
    items = tuple(dict.fromkeys(p.strip() for p in env.get(name, "").split(",") if p.strip()))
    bad = [i for i in items if not re.fullmatch(pattern, i)]
    if bad:
        raise ConfigError(f"{name}: not a valid entry: {', '.join(repr(b[:80]) for b in bad)}")
    return items
