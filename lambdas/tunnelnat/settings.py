"""The controller's run-time settings, read once from the Lambda's environment."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field

from tunnelnat.core.config import ConfigError, TunnelnatConfig


class ControllerSettings(BaseModel):
    model_config = ConfigDict(frozen=True)

    config: TunnelnatConfig
    table_name: str = Field(pattern=r"^[A-Za-z0-9_.-]{3,255}$")
    deployment: str = Field(default="tunnelnat", pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    document_prefix: str = Field(default="tunnelnat-", pattern=r"^[A-Za-z0-9_.-]{0,100}$")
    region: str = Field(pattern=r"^[a-z]{2}(-[a-z]+)+-[0-9]$")
    # The gateway's VPC: instances elsewhere are never enrolled (the stack always sets it).
    vpc_id: str | None = Field(default=None, pattern=r"^vpc-[0-9a-f]{8,17}$")
    # The gateway's Auto Scaling group: the gateway is the member of it that holds G.
    gateway_group: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.:/ +=@-]{1,255}$")
    # The standalone ENI that holds G. With it (and vpc_id), route-table mode is on: instances in
    # other subnets of the VPC are served by a route in their subnet's route table to this ENI.
    gateway_eni_id: str | None = Field(default=None, pattern=r"^eni-[0-9a-f]{8,17}$")

    @property
    def route_table_mode(self) -> bool:
        return self.vpc_id is not None and self.gateway_eni_id is not None

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
        config = TunnelnatConfig.from_mapping(raw, source="TUNNELNAT_CONFIG")
        return cls(
            config=config,
            table_name=env["TUNNELNAT_TABLE_NAME"],
            deployment=env.get("TUNNELNAT_DEPLOYMENT", "tunnelnat"),
            document_prefix=env.get("TUNNELNAT_DOCUMENT_PREFIX", "tunnelnat-"),
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
            vpc_id=env.get("TUNNELNAT_VPC_ID") or None,
            gateway_group=env.get("TUNNELNAT_GATEWAY_GROUP") or None,
            gateway_eni_id=env.get("TUNNELNAT_GATEWAY_ENI_ID") or None,
        )
