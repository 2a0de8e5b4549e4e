"""CDK context -> validated settings.

Two models: ``TunnelnatConfig`` (the controller's own, reused unchanged, so a value that
synthesizes is a value the controller accepts) and ``StackSettings`` (what only the stack needs:
names, network placement, alarm tuning). Every error names the context key at fault.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from tunnelnat.core.config import (
    NOT_PUBLIC,
    ConfigError,
    NatMode,
    TunnelnatConfig,
    describe_validation_error,
    special_range,
)
from tunnelnat.core.crypto import (
    DEFAULT_CHILD_LIFETIMES,
    DEFAULT_ESP_PROPOSALS,
    DEFAULT_IKE_LIFETIMES,
    DEFAULT_IKE_PROPOSALS,
    lifetime_problems,
    proposal_problems,
)
from tunnelnat.core.crypto import IDENTITY as IKE_IDENTITY
from tunnelnat.core.lanes import Lane, LaneError
from tunnelnat.core.partners import Partners
from tunnelnat.events import hook_names

SOURCE = "CDK context"

# Tags the stack puts on the gateway (and the controller relies on).
ROLE_TAG = "tunnelnat:role"
ROLE_GATEWAY = "gateway"
DEPLOYMENT_TAG = "tunnelnat:deployment"
# One tag whose value names the deployment: the State Manager association's single target.
GATEWAY_TAG = "tunnelnat:gateway"
# The controller's own marker on instances it has put a route on (see docs/stack.md, IAM).
STATUS_TAG = "tunnelnat:status"
# The tag EC2 Auto Scaling puts on every instance it launches: the aws: prefix is reserved, so no
# user can set or change it (EC2 User Guide, Tag restrictions). Gateways are known by it.
GROUP_NAME_TAG = "aws:autoscaling:groupName"
# A network owner opts a route table in for route-table mode: tunnelnat:routes=<deployment>.
ROUTES_TAG = "tunnelnat:routes"
DEFAULT_DEPLOYMENT = "tunnelnat"
# The enrolment key of the default deployment (backward compatible); any other deployment's
# default is tunnelnat:<deployment>, so two deployments never enrol one instance by default.
DEFAULT_ENROLMENT_KEY = "tunnelnat"

# Retention periods CloudWatch Logs accepts, and their names in aws_logs.RetentionDays.
LOG_RETENTION_DAYS = {
    1: "ONE_DAY", 3: "THREE_DAYS", 5: "FIVE_DAYS", 7: "ONE_WEEK", 14: "TWO_WEEKS",
    30: "ONE_MONTH", 60: "TWO_MONTHS", 90: "THREE_MONTHS", 120: "FOUR_MONTHS",
    150: "FIVE_MONTHS", 180: "SIX_MONTHS", 365: "ONE_YEAR", 400: "THIRTEEN_MONTHS",
    545: "EIGHTEEN_MONTHS", 731: "TWO_YEARS", 1096: "THREE_YEARS", 1827: "FIVE_YEARS",
    2192: "SIX_YEARS", 2557: "SEVEN_YEARS", 2922: "EIGHT_YEARS", 3288: "NINE_YEARS",
    3653: "TEN_YEARS",
}  # fmt: skip

_EMAIL = re.compile(r"^[^@\s,;]+@[^@\s,;]+\.[^@\s,;]+$")
# What Auto Scaling accepts in a group name (no ARN, no commas: the key is a CSV list).
_GROUP_NAME = re.compile(r"^[A-Za-z0-9_.:/ +=@-]{1,255}$")
_SUBNET_ID = re.compile(r"^subnet-[0-9a-f]{8,17}$")
_ROUTE_TABLE_ID = re.compile(r"^rtb-[0-9a-f]{8,17}$")
_ROLE_ARN = re.compile(r"^arn:aws[a-z-]*:iam::[0-9]{12}:role/[A-Za-z0-9+=,.@_/-]{1,512}$")
# Context keys that belong to the CDK itself (feature flags, CLI settings) rather than to us;
# ours are snake_case, or namespaced ``tunnelnat:`` (the key the gateway pair's design names).
_OURS = re.compile(r"^([a-z][a-z0-9_]*|tunnelnat:.*)$")
GATEWAY_PAIR_KEY = "tunnelnat:gatewayPair"
# A relative partners_file is read from the app's directory (where app.py and cdk.json are).
APP_DIR = Path(__file__).resolve().parents[1]
PARTNERS_KEY = "partners_file"


class StackSettings(BaseModel):
    """Stack-only settings (names, placement, tuning); see docs/stack.md for each key."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    deployment: str = Field(
        default="tunnelnat",
        pattern=r"^[a-z][a-z0-9-]{1,28}[a-z0-9]$",
        description="name of this deployment: prefixes the documents, tags the gateway",
    )
    stack_name: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z][A-Za-z0-9-]{0,127}$",
        description="CloudFormation stack name (default: the deployment name)",
    )
    account: str | None = Field(
        default=None, pattern=r"^[0-9]{12}$", description="pin the stack to this account"
    )
    region: str | None = Field(
        default=None,
        pattern=r"^[a-z]{2}(-[a-z]+)+-[0-9]$",
        description="pin the stack to this region (default: the CLI profile's)",
    )
    availability_zone: str | None = Field(
        default=None,
        pattern=r"^[a-z]{2}(-[a-z]+)+-[0-9][a-z]$",
        description="AZ of the created VPC's subnet (default: the region's first)",
    )
    vpc_id: str | None = Field(
        default=None, pattern=r"^vpc-[0-9a-f]{8,17}$", description="use this existing VPC"
    )
    gateway_subnet_id: str | None = Field(
        default=None,
        pattern=r"^subnet-[0-9a-f]{8,17}$",
        description="existing public subnet for the gateway (its CIDR is gateway_subnet_cidr)",
    )
    vpc_cidr: IPv4Network = Field(
        default=IPv4Network("10.80.0.0/16"), description="CIDR of the VPC the stack creates"
    )
    # -- several partners on one gateway pair (issue 23; docs/partners.md) ----------------------
    partners_file: str | None = Field(
        default=None,
        pattern=r"^[^\x00]{1,1024}$",
        description="the partners file (YAML; relative to the app's directory): each partner "
        "its own tunnel, S, keys and lane, instead of the single-partner keys",
    )
    # -- route-table mode and the user's own groups (issue 13; docs/stack.md) -----------------
    route_table_mode: bool = Field(
        default=True,
        description="serve instances in other subnets of the VPC through their subnets' route "
        "tables (the controller adds a route for each partner network to G's ENI)",
    )
    vpc_cidrs: list[IPv4Network] = Field(
        default_factory=list,
        max_length=5,
        description="with vpc_id: the VPC's IPv4 CIDR blocks, primary and secondary (the "
        "gateway admits forwarded packets from them)",
    )
    private_subnet_ssm_endpoints: bool = Field(
        default=False,
        description="the created VPC's private subnet gets interface endpoints for SSM "
        "(ssm, ssmmessages, ec2messages); tunnelnat itself does not need them",
    )
    auto_scaling_groups: list[str] = Field(
        default_factory=list,
        max_length=20,
        description="existing Auto Scaling groups that get tunnelnat's launch and terminate "
        "lifecycle hooks",
    )
    # -- who may be enrolled, and where routes may change (issue 21; docs/security.md) ---------
    enrolment_subnets: list[str] = Field(
        default_factory=list,
        max_length=50,
        description="allow-list: only instances in these subnets are enrolled (empty: any "
        "subnet); a tagged instance elsewhere is not-allowed",
    )
    enrolment_groups: list[str] = Field(
        default_factory=list,
        max_length=50,
        description="allow-list: only instances of these Auto Scaling groups are enrolled "
        "(empty: any instance); a tagged instance outside them is not-allowed",
    )
    route_tables: list[str] = Field(
        default_factory=list,
        max_length=100,
        description="route-table mode: route tables the controller may change besides those "
        "tagged tunnelnat:routes=<deployment> by their owner",
    )
    enrolment_role_arn: str | None = Field(
        default=None,
        description="the role reserved to enrol instances: an EventBridge rule pages when any "
        "other principal tags an instance with the enrolment key (needs a CloudTrail trail)",
    )
    psk_writer_arns: list[str] = Field(
        default_factory=list,
        max_length=10,
        description="the only principals (role ARNs, * allowed) that may write the created PSK "
        "secret (tunnelnat psk set); empty: whoever IAM allows",
    )
    # -- the gateway pair (issue 15; docs/stack.md, Gateway pair) --------------------------------
    gateway_pair: bool = Field(
        default=True,
        alias=GATEWAY_PAIR_KEY,
        description="two gateways in G's subnet, one active (holding G's ENI) and a warm standby "
        "that takes the ENI over in seconds; false: the single self-healing gateway",
    )
    gateway_instance_type: str = Field(
        default="t3.small",
        pattern=r"^[a-z][a-z0-9-]*\.[a-z0-9]+$",
        description="EC2 instance type of the gateway",
    )
    gateway_ami_id: str | None = Field(
        default=None,
        pattern=r"^ami-[0-9a-f]{8,17}$",
        description="pin the gateway's AMI (default: latest Amazon Linux 2023 at each deploy)",
    )
    gateway_eip_allocation_id: str | None = Field(
        default=None,
        pattern=r"^eipalloc-[0-9a-f]{8,17}$",
        description="existing Elastic IP to use as E (with gateway_eip_address)",
    )
    gateway_eip_address: IPv4Address | None = Field(
        default=None, description="the public address of gateway_eip_allocation_id"
    )
    psk_secret_name: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9/_+=.@-]{1,512}$",
        description="existing Secrets Manager secret holding the PSK (default: stack creates one)",
    )
    tunnel_name: str = Field(
        default="partner",
        pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,31}$",
        description="the swanctl connection's name; the TunnelUp alarm's Tunnel dimension",
    )
    tunnel_alarm_period_seconds: int = Field(
        default=60, description="TunnelUp alarm period (10, 30 or a multiple of 60)"
    )
    tunnel_alarm_evaluation_periods: int = Field(
        default=3, ge=1, le=60, description="TunnelUp alarm: periods evaluated (M of N of M)"
    )
    tunnel_alarm_datapoints: int = Field(
        default=2, ge=1, le=60, description="TunnelUp alarm: down periods that alarm (N of N of M)"
    )
    dlq_alarm_threshold: int = Field(
        default=1, ge=1, description="dead-letter messages that raise the DLQ alarm"
    )
    queue_age_alarm_seconds: int = Field(
        default=3600, ge=60, description="age of the oldest queued event that raises an alarm"
    )
    alarm_email: str | None = Field(
        default=None, description="subscribe this address to the alarm topic"
    )
    reconcile_schedule: str = Field(
        default="rate(15 minutes)",
        pattern=r"^(rate|cron)\(.+\)$",
        description="EventBridge schedule of full reconciles",
    )
    controller_timeout_seconds: int = Field(
        default=300, ge=60, le=900, description="controller Lambda timeout"
    )
    controller_max_concurrency: int = Field(
        default=5, ge=2, le=1000, description="most concurrent controller invocations from SQS"
    )
    # SQS's redrive is only the backstop for events that crash every attempt. A wait for another
    # worker's gateway sync does not count: the handler sends such an event again as a new message.
    queue_max_receive_count: int = Field(
        default=12, ge=2, le=1000, description="deliveries of an event before it goes to the DLQ"
    )
    controller_max_attempts: int = Field(
        default=8,
        ge=1,
        le=999,
        description="attempts after which the controller parks an event in the DLQ with its reason",
    )
    controller_batch_size: int = Field(
        default=10, ge=1, le=100, description="most events per controller invocation"
    )
    controller_batch_window_seconds: int = Field(
        default=5, ge=0, le=300, description="how long the queue gathers a batch (bursts coalesce)"
    )
    health_interval_seconds: int = Field(
        default=60, ge=10, le=3600, description="seconds between the gateway health agent's runs"
    )
    health_probe_target: str | None = Field(
        default=None,
        pattern=r"^((25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])\.){3}"
        r"(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9]):[0-9]{1,5}$",
        description="ADDRESS:PORT behind the tunnel the health agent probes over TCP",
    )
    health_probe_source: IPv4Address | None = Field(
        default=None, description="the probe's source: one of our public addresses S"
    )
    healer_backoff_base_seconds: int = Field(
        default=60, ge=0, le=86_400, description="healer: wait after the first restart"
    )
    healer_backoff_factor: float = Field(
        default=2.0, ge=1, le=10, description="healer: each further wait is this times longer"
    )
    healer_backoff_max_seconds: int = Field(
        default=900, ge=0, le=86_400, description="healer: longest wait between restarts"
    )
    healer_max_restarts: int = Field(
        default=3, ge=1, le=100, description="healer: restarts per window before it pages instead"
    )
    healer_window_seconds: int = Field(
        default=3600, ge=60, le=86_400, description="healer: the window the cap counts restarts in"
    )
    healer_restart_wait_seconds: int = Field(
        default=30, ge=1, le=120, description="RestartTunnel's WaitSeconds for the child SA"
    )
    healer_command_timeout_seconds: int = Field(
        default=150, ge=30, le=800, description="healer: how long it waits for RestartTunnel"
    )
    healer_sweep_schedule: str = Field(
        default="rate(1 minute)",
        pattern=r"^(rate|cron)\(.+\)$",
        description="EventBridge schedule of the healer's sweep of alarms still in ALARM",
    )
    log_retention_days: int = Field(default=30, description="CloudWatch Logs retention")
    # -- the partner's tunnel (docs/stack.md, Partner worksheet; core/crypto.py) ---------------
    ike_proposals: list[str] = Field(
        default=list(DEFAULT_IKE_PROPOSALS),
        min_length=1,
        max_length=8,
        description="IKE proposals we offer (each with a DH group of 14/19 or stronger)",
    )
    esp_proposals: list[str] = Field(
        default=list(DEFAULT_ESP_PROPOSALS),
        min_length=1,
        max_length=8,
        description="ESP proposals we offer (each with a DH group: PFS)",
    )
    ike_lifetimes: tuple[int, int, int] = Field(
        default=DEFAULT_IKE_LIFETIMES, description="IKE SA rekey_time,over_time,rand_time (s)"
    )
    child_lifetimes: tuple[int, int, int] = Field(
        default=DEFAULT_CHILD_LIFETIMES, description="CHILD SA rekey_time,life_time,rand_time (s)"
    )
    dpd_delay_seconds: int = Field(default=10, ge=5, le=300, description="DPD after this silence")
    dpd_timeout_seconds: int = Field(
        default=30, ge=10, le=600, description="the partner is dead after this without an answer"
    )
    local_id: str | None = Field(
        default=None, description="our IKE identity (default: E, the gateway's Elastic IP)"
    )
    remote_id: str | None = Field(
        default=None, description="the partner's IKE identity (default: partner_endpoint)"
    )
    selector_layout: Literal["single", "per-pair"] = Field(
        default="single", description="one CHILD_SA, or one per (S, partner network)"
    )
    keyingtries: int = Field(default=0, ge=0, le=100, description="0: never stop initiating")
    start_action: Literal["start", "none"] = Field(
        default="start", description="start: we initiate; none: only the partner does"
    )

    @field_validator("ike_proposals", "esp_proposals", mode="before")
    @classmethod
    def _csv(cls, value: Any) -> Any:
        return (
            [p.strip() for p in value.split(",") if p.strip()] if isinstance(value, str) else value
        )

    @field_validator(
        "vpc_cidrs",
        "auto_scaling_groups",
        "enrolment_subnets",
        "enrolment_groups",
        "route_tables",
        "psk_writer_arns",
        mode="before",
    )
    @classmethod
    def _list(cls, value: Any) -> Any:
        return (
            [p.strip() for p in value.split(",") if p.strip()] if isinstance(value, str) else value
        )

    @field_validator("enrolment_subnets")
    @classmethod
    def _subnet_ids(cls, value: list[str]) -> list[str]:
        return _each(value, _SUBNET_ID, "a subnet ID (subnet-...)")

    @field_validator("route_tables")
    @classmethod
    def _route_table_ids(cls, value: list[str]) -> list[str]:
        return _each(value, _ROUTE_TABLE_ID, "a route table ID (rtb-...)")

    @field_validator("psk_writer_arns")
    @classmethod
    def _writer_arns(cls, value: list[str]) -> list[str]:
        pattern = re.compile(_ROLE_ARN.pattern.replace("+=,.@_/-]", "+=,.@_/*-]"))
        return _each(value, pattern, "an IAM role ARN (arn:aws:iam::<account>:role/<name>)")

    @field_validator("enrolment_role_arn")
    @classmethod
    def _role_arn(cls, value: str | None) -> str | None:
        if value is not None and not _ROLE_ARN.fullmatch(value):
            raise ValueError(
                f"{value!r} is not an IAM role ARN (arn:aws:iam::<account>:role/<name>)"
            )
        return value

    @field_validator("auto_scaling_groups", "enrolment_groups")
    @classmethod
    def _group_names(cls, value: list[str]) -> list[str]:
        bad = [n for n in value if not _GROUP_NAME.fullmatch(n)]
        if bad:
            raise ValueError(f"not an Auto Scaling group name: {', '.join(map(repr, bad))}")
        if len(set(value)) != len(value):
            raise ValueError("a group is named twice")
        return value

    @field_validator("ike_lifetimes", "child_lifetimes", mode="before")
    @classmethod
    def _triple(cls, value: Any) -> Any:
        return tuple(v.strip() for v in value.split(",")) if isinstance(value, str) else value

    @field_validator("ike_proposals", "esp_proposals")
    @classmethod
    def _strong(cls, value: list[str], info: ValidationInfo) -> list[str]:
        problems = [
            m for p in value for m in proposal_problems(p, esp=info.field_name == "esp_proposals")
        ]
        if problems:
            raise ValueError("; ".join(problems))
        return value

    @field_validator("local_id", "remote_id")
    @classmethod
    def _identity(cls, value: str | None) -> str | None:
        if value is not None and not IKE_IDENTITY.fullmatch(value):
            raise ValueError("must be an IPv4 address, an FQDN, user@FQDN or @#hex key ID")
        if value is not None and value.replace(".", "").isdigit():
            IPv4Address(value)  # a dotted quad is an address
        return value

    @field_validator("tunnel_alarm_period_seconds")
    @classmethod
    def _period(cls, value: int) -> int:
        if value not in (10, 30) and (value < 60 or value % 60):
            raise ValueError("must be 10, 30 or a multiple of 60")
        return value

    @field_validator("log_retention_days")
    @classmethod
    def _retention(cls, value: int) -> int:
        if value not in LOG_RETENTION_DAYS:
            raise ValueError(f"must be one of {', '.join(map(str, LOG_RETENTION_DAYS))}")
        return value

    @field_validator("alarm_email")
    @classmethod
    def _email(cls, value: str | None) -> str | None:
        if value is not None and not _EMAIL.fullmatch(value):
            raise ValueError("must be one e-mail address")
        return value

    @model_validator(mode="after")
    def _pairs(self) -> StackSettings:
        if (self.vpc_id is None) != (self.gateway_subnet_id is None):
            raise ValueError("vpc_id and gateway_subnet_id go together: give both or neither")
        if (self.gateway_eip_allocation_id is None) != (self.gateway_eip_address is None):
            raise ValueError(
                "gateway_eip_allocation_id and gateway_eip_address go together: "
                "give both or neither"
            )
        if self.tunnel_alarm_datapoints > self.tunnel_alarm_evaluation_periods:
            raise ValueError(
                "tunnel_alarm_datapoints cannot exceed tunnel_alarm_evaluation_periods"
            )
        if self.vpc_cidrs and self.vpc_id is None:
            raise ValueError(
                "vpc_cidrs describes an existing VPC (vpc_id); the created VPC's is vpc_cidr"
            )
        if self.route_table_mode and self.vpc_id is not None and not self.vpc_cidrs:
            raise ValueError(
                "vpc_cidrs: with vpc_id and route_table_mode, give the VPC's IPv4 CIDR blocks "
                "(aws ec2 describe-vpcs --vpc-ids <vpc_id> --query "
                "'Vpcs[0].CidrBlockAssociationSet[].CidrBlock'), or -c route_table_mode=false"
            )
        if self.private_subnet_ssm_endpoints and self.vpc_id is not None:
            raise ValueError(
                "private_subnet_ssm_endpoints applies to the VPC the stack creates, not vpc_id"
            )
        if self.gateway_ami_id and not self.region:
            raise ValueError("gateway_ami_id needs region (an AMI ID belongs to one region)")
        if self.queue_max_receive_count <= self.controller_max_attempts:
            # The controller dead-letters an event itself at its last attempt, with the reason;
            # SQS's own redrive is only the backstop for crashes and must come later.
            raise ValueError(
                f"queue_max_receive_count ({self.queue_max_receive_count}) must exceed "
                f"controller_max_attempts ({self.controller_max_attempts})"
            )
        if self.health_interval_seconds > self.tunnel_alarm_period_seconds:
            # A period without a datapoint is missing data, which the alarm treats as down.
            raise ValueError(
                f"health_interval_seconds ({self.health_interval_seconds}) cannot exceed "
                f"tunnel_alarm_period_seconds ({self.tunnel_alarm_period_seconds})"
            )
        if (self.health_probe_target is None) != (self.health_probe_source is None):
            raise ValueError(
                "health_probe_target and health_probe_source go together: give both or neither"
            )
        if self.health_probe_target is not None:
            port = int(self.health_probe_target.rpartition(":")[2])
            if not 0 < port < 65536:
                raise ValueError(f"health_probe_target: port {port} is not between 1 and 65535")
        if self.healer_backoff_max_seconds < self.healer_backoff_base_seconds:
            raise ValueError(
                "healer_backoff_max_seconds cannot be less than healer_backoff_base_seconds"
            )
        problems = lifetime_problems("IKE", *self.ike_lifetimes)
        problems += lifetime_problems("CHILD", *self.child_lifetimes)
        if problems:
            raise ValueError("ike_lifetimes/child_lifetimes: " + "; ".join(problems))
        if self.healer_restart_wait_seconds + 30 > self.healer_command_timeout_seconds:
            # RestartTunnel waits WaitSeconds inside the command; the healer must outwait it.
            raise ValueError(
                f"healer_command_timeout_seconds ({self.healer_command_timeout_seconds}) must be "
                f"at least healer_restart_wait_seconds + 30 "
                f"({self.healer_restart_wait_seconds + 30})"
            )
        return self

    @property
    def name(self) -> str:
        return self.stack_name or self.deployment

    @property
    def document_prefix(self) -> str:
        return f"{self.deployment}-"

    @property
    def creates_vpc(self) -> bool:
        return self.vpc_id is None

    @property
    def vpc_networks(self) -> list[IPv4Network]:
        """The VPC's IPv4 CIDR blocks as far as the stack knows them."""
        return [self.vpc_cidr] if self.creates_vpc else list(self.vpc_cidrs)

    @property
    def gateway_group_name(self) -> str:
        """The gateway group's explicit name: known without a reference to the group, so the
        associations can target it (``tag:aws:autoscaling:groupName``) and the group can still
        depend on them; every identity check of a gateway uses it."""
        return f"{self.deployment}-gateway"

    @property
    def gateway_metric_namespace(self) -> str:
        """Where this deployment's gateways publish (TunnelUp, the health agent's and the pair's
        series): the gateway role may put metrics in this namespace and no other."""
        return f"tunnelnat/{self.deployment}"

    @property
    def hook_prefix(self) -> str:
        """Every lifecycle hook of this deployment's instances' groups starts with this, and no
        other deployment's: the trailing ``-`` keeps ``acme`` from matching ``acme-2``."""
        return f"tunnelnat-{self.deployment}-"

    def hook_name(self, transition: str) -> str:
        """tunnelnat's lifecycle hook names, one of ``hook_names`` (the controller's rule and
        code take exactly these: a prefix would also take ``<deployment>-2``'s)."""
        name = f"{self.hook_prefix}{transition}"
        assert name in self.hook_names, name
        return name

    @property
    def hook_names(self) -> tuple[str, ...]:
        return hook_names(self.deployment)

    @property
    def tunnel_alarm_prefix(self) -> str:
        """The names of this deployment's TunnelUp alarms start with this, and only theirs:
        ``TunnelUp-`` after the deployment keeps ``acme`` from matching ``acme-2``."""
        return f"tunnelnat-{self.deployment}-TunnelUp-"

    @property
    def queue_visibility_timeout_seconds(self) -> int:
        """The queue's visibility timeout: six times the function's timeout (AWS's guidance for
        an SQS event source, so a throttled or retried invocation never sees its batch reappear)."""
        return 6 * self.controller_timeout_seconds

    @property
    def healer_timeout_seconds(self) -> int:
        """The healer outlives its longest wait for RestartTunnel, with room for the rest."""
        return min(900, max(300, self.healer_command_timeout_seconds + 60))


@dataclass(frozen=True)
class Settings:
    """The validated context. With a partners file, ``partners`` and its ``lanes`` (one per
    partner, core/lanes.py) and ``config`` is the deployment's base: the gateway's placement,
    the enrolment key and value, the MSS clamp, with the first partner's addressing in the
    partner keys (the controller derives each lane's own from its lane)."""

    config: TunnelnatConfig
    stack: StackSettings
    partners: Partners | None = None
    lanes: tuple[Lane, ...] = ()


CONFIG_KEYS = tuple(TunnelnatConfig.model_fields)
# A field with an alias is given by its alias (the context key), never by the field's name.
STACK_KEYS = tuple(field.alias or name for name, field in StackSettings.model_fields.items())
ALL_KEYS = CONFIG_KEYS + STACK_KEYS
# Field name -> its context key, for the hint when someone types the field's name.
_ALIASED = {n: f.alias for n, f in StackSettings.model_fields.items() if f.alias}
# No default can be right for anyone: every deployment gives these (docs/stack.md has examples),
# and a deploy that forgets one stops instead of using someone else's addresses.
REQUIRED_KEYS = (
    "partner_endpoint",
    "partner_networks",
    "gateway_subnet_cidr",
    "gateway_private_ip",
)
# ... and the public addresses its NAT mode hands out.
REQUIRED_BY_MODE = {
    NatMode.DEDICATED: "address_pool",
    NatMode.INSTANCE: "address_pool",
    NatMode.SHARED: "shared_address",
}


def load_settings(context: Mapping[str, Any]) -> Settings:
    """Validate the CDK context; raise ConfigError naming every bad or unknown key."""
    unknown = sorted(k for k in context if _OURS.fullmatch(k) and k not in ALL_KEYS)
    if unknown:
        lines = [f"invalid {SOURCE}:"]
        for key in unknown:
            close = [_ALIASED[key]] if key in _ALIASED else []
            close = close or difflib.get_close_matches(key, ALL_KEYS, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            lines.append(f"  {key}: unknown context key{hint}")
        raise ConfigError("\n".join(lines))
    given = {k: _clean(context[k]) for k in ALL_KEYS if k in context}
    given = {k: v for k, v in given.items() if v is not None}
    if PARTNERS_KEY in given:
        return _load_with_partners(given)
    _check_required(given)
    deployment = given.get("deployment", DEFAULT_DEPLOYMENT)
    if "enrolment_tag_key" not in given and deployment != DEFAULT_DEPLOYMENT:
        # A deployment of its own enrols by a key of its own (issue 21): one instance tagged for
        # one deployment is never enrolled in another by default.
        given["enrolment_tag_key"] = default_enrolment_key(deployment)
    config = TunnelnatConfig.from_mapping(
        {k: v for k, v in given.items() if k in CONFIG_KEYS}, source=SOURCE
    )
    try:
        stack = StackSettings.model_validate({k: v for k, v in given.items() if k in STACK_KEYS})
    except ValidationError as exc:
        raise ConfigError(_name_pairs(describe_validation_error(exc, SOURCE))) from None
    _check_placement(config, stack)
    _check_addresses(config, stack)
    return Settings(config=config, stack=stack)


# The single-partner keys: with a partners file each partner's own are in the file. cdk.json
# gives nat_mode and tunnel_name their defaults (the quick start's); those values are no choice.
SINGLE_PARTNER_KEYS: dict[str, str | None] = {
    "partner_endpoint": None,
    "partner_networks": None,
    "address_pool": None,
    "shared_address": None,
    "nat_mode": NatMode.DEDICATED.value,
    "tunnel_name": "partner",
    "psk_secret_name": None,
    "ike_proposals": None,
    "esp_proposals": None,
    "ike_lifetimes": None,
    "child_lifetimes": None,
    "dpd_delay_seconds": None,
    "dpd_timeout_seconds": None,
    "local_id": None,
    "remote_id": None,
    "selector_layout": None,
    "start_action": None,
}
# Not per partner yet: the health agent's probe names one partner's network and S.
NOT_WITH_PARTNERS = ("health_probe_target", "health_probe_source")
REQUIRED_WITH_PARTNERS = ("gateway_subnet_cidr", "gateway_private_ip")


def partners_path(value: str) -> Path:
    """Where ``partners_file`` is read: as given when absolute, else from the app's directory."""
    path = Path(value)
    return path if path.is_absolute() else APP_DIR / path


def _load_with_partners(given: dict[str, Any]) -> Settings:
    """The context with a partners file: every problem at once (the keys that conflict with
    it, route-table mode, the file's own problems), then the settings and the lanes."""
    problems: list[str] = []
    for key, allowed in SINGLE_PARTNER_KEYS.items():
        if key in given and (allowed is None or str(given[key]) != allowed):
            problems.append(
                f"{key}: a single-partner key; with {PARTNERS_KEY} each partner's own is in the "
                "file (docs/partners.md): remove it from the context"
            )
    for key in NOT_WITH_PARTNERS:
        if key in given:
            problems.append(f"{key}: not supported with {PARTNERS_KEY} yet (one partner's probe)")
    for key in REQUIRED_WITH_PARTNERS:
        if key not in given:
            problems.append(f"{key}: missing; {TunnelnatConfig.model_fields[key].description}")
    # Route-table mode is not served per partner yet: off by default with a partners file,
    # refused when asked for.
    given = {k: v for k, v in given.items() if k not in SINGLE_PARTNER_KEYS}
    given.setdefault("route_table_mode", False)
    deployment = given.get("deployment", DEFAULT_DEPLOYMENT)
    if "enrolment_tag_key" not in given and deployment != DEFAULT_DEPLOYMENT:
        given["enrolment_tag_key"] = default_enrolment_key(deployment)
    stack: StackSettings | None = None
    try:
        stack = StackSettings.model_validate({k: v for k, v in given.items() if k in STACK_KEYS})
    except ValidationError as exc:
        problems += _lines(_name_pairs(describe_validation_error(exc, SOURCE)))
    if str(given["route_table_mode"]).lower() in ("true", "1", "yes", "on", "t", "y"):
        problems.append(
            f"route_table_mode: not supported with {PARTNERS_KEY} yet (instances are served by "
            "host routes, one set per partner they join): -c route_table_mode=false"
        )
    partners: Partners | None = None
    try:
        subnet: IPv4Network | None = IPv4Network(given.get("gateway_subnet_cidr", ""))
    except ValueError:
        subnet = None  # the config's own check names it
    try:
        partners = Partners.from_file(
            partners_path(str(given[PARTNERS_KEY])),
            # A bad stack key is reported above; the file is still checked, against the VPC as
            # far as the context says it.
            vpc_cidr=stack.vpc_networks if stack is not None else _vpc_networks(given),
            gateway_subnet=subnet,
        )
    except ConfigError as exc:
        problems += [f"{PARTNERS_KEY}: {line.strip()}" for line in str(exc).splitlines()]
    if partners is not None:
        problems += _undeployable(partners)
    config: TunnelnatConfig | None = None
    if partners is not None:
        # The base config carries the first partner's addressing: its keys must be valid, and
        # the controller derives each lane's own from the lane (what instances use: the alias).
        first = partners.plan[0]
        nat = first.partner.nat
        base = {k: v for k, v in given.items() if k in CONFIG_KEYS}
        base |= {
            "partner_endpoint": str(first.partner.endpoint),
            "partner_networks": [str(n) for n in first.local_networks],
            "nat_mode": nat.mode.value,
            "address_pool": [str(a) for a in nat.pool],
            "shared_address": None if nat.address is None else str(nat.address),
        }
        try:
            config = TunnelnatConfig.from_mapping(base, source=SOURCE)
        except ConfigError as exc:
            problems += _lines(str(exc))
    if problems or config is None or stack is None or partners is None:
        raise ConfigError("\n  ".join([f"invalid {SOURCE}:", *problems]))
    _check_placement(config, stack)
    try:
        lanes = partners.lanes(stack.deployment, config.enrolment_tag_key)
    except LaneError as exc:
        raise ConfigError(f"invalid {SOURCE}:\n  {PARTNERS_KEY}: {exc}") from None
    return Settings(config=config, stack=stack, partners=partners, lanes=lanes)


def _vpc_networks(given: Mapping[str, Any]) -> list[IPv4Network]:
    """The VPC's CIDRs from a context whose stack keys did not validate: what parses of them."""
    raw = given.get("vpc_cidrs") if given.get("vpc_id") else given.get("vpc_cidr", "10.80.0.0/16")
    values = raw.split(",") if isinstance(raw, str) else list(raw or [])
    networks = []
    for value in values:
        try:
            networks.append(IPv4Network(str(value).strip()))
        except ValueError:
            continue  # the stack's own check names it
    return networks


def _undeployable(partners: Partners) -> list[str]:
    """What the file may say but a deployment cannot do yet (docs/partners.md)."""
    problems = []
    for i, partner in enumerate(partners.partners):
        where = f"{PARTNERS_KEY}: partners[{i}] ({partner.name})"
        if partner.auth.certificate is not None:
            problems.append(
                f"{where}.auth: certificate authentication is not deployable yet (the gateway "
                "renders PSK tunnels only): use psk_secret"
            )
        elif partner.auth.psk_secret is not None and partner.auth.psk_secret.startswith("arn:"):
            problems.append(
                f"{where}.auth.psk_secret: give the secret's name, not its ARN (ConfigureTunnel "
                "reads the secret by name, in the stack's account and region)"
            )
    return problems


def _lines(message: str) -> list[str]:
    """A ConfigError's lines without its ``invalid ...:`` heading."""
    lines = [line.strip() for line in message.splitlines()]
    return [line for line in lines[1:] if line] if len(lines) > 1 else lines


def default_enrolment_key(deployment: str) -> str:
    """The enrolment tag key a deployment uses when the context gives none."""
    return DEFAULT_ENROLMENT_KEY if deployment == DEFAULT_DEPLOYMENT else f"tunnelnat:{deployment}"


def _each(values: list[str], pattern: re.Pattern[str], what: str) -> list[str]:
    bad = [v for v in values if not pattern.fullmatch(v)]
    if bad:
        raise ValueError(f"not {what}: {', '.join(map(repr, bad))}")
    if len(set(values)) != len(values):
        raise ValueError("a value is given twice")
    return values


def missing_keys(context: Mapping[str, Any]) -> list[str]:
    """The required keys ``context`` lacks (an empty value counts as missing), in REQUIRED_KEYS
    order, then the one its NAT mode needs."""
    given = {k for k in ALL_KEYS if k in context and _clean(context[k]) not in (None, [], "")}
    missing = [k for k in REQUIRED_KEYS if k not in given]
    try:
        mode = NatMode(_clean(context.get("nat_mode")) or NatMode.DEDICATED)
    except ValueError:
        return missing  # the model names the bad nat_mode
    if REQUIRED_BY_MODE[mode] not in given:
        missing.append(REQUIRED_BY_MODE[mode])
    return missing


def _check_required(given: Mapping[str, Any]) -> None:
    missing = missing_keys(given)
    if missing:
        lines = [
            f"invalid {SOURCE}: required keys missing; give each with -c KEY=VALUE "
            "(examples in docs/stack.md):"
        ]
        for key in missing:
            lines.append(f"  {key}: missing; {TunnelnatConfig.model_fields[key].description}")
        raise ConfigError("\n".join(lines))


def _clean(value: Any) -> Any:
    """``-c key=`` (an empty string) means "not set"; lists may come as one CSV string."""
    if isinstance(value, str) and not value.strip():
        return None
    if isinstance(value, str):
        return value.strip()
    return value


def _name_pairs(message: str) -> str:
    # A model-level error has no key of its own: name the keys its message is about.
    return message.replace("  (model): Value error, ", "  ").replace("  : Value error, ", "  ")


def _error(key: str, message: str) -> ConfigError:
    return ConfigError(f"invalid {SOURCE}:\n  {key}: {message}")


def _check_placement(config: TunnelnatConfig, stack: StackSettings) -> None:
    """AWS-specific consistency the controller's model cannot know about."""
    subnet = config.gateway_subnet_cidr
    if subnet.prefixlen > 28 or subnet.prefixlen < 16:
        raise _error(
            "gateway_subnet_cidr",
            f"{subnet}: an AWS subnet is between /16 and /28",
        )
    # AWS keeps the first four addresses and the last one of every subnet.
    reserved = {subnet.network_address + i for i in range(4)} | {subnet.broadcast_address}
    if config.gateway_private_ip in reserved:
        raise _error(
            "gateway_private_ip",
            f"{config.gateway_private_ip} is reserved by AWS in {subnet} "
            "(the first four addresses and the last one)",
        )
    if stack.creates_vpc:
        vpc = stack.vpc_cidr
        if vpc.prefixlen < 16 or vpc.prefixlen > 28:
            raise _error("vpc_cidr", f"{vpc}: an AWS VPC is between /16 and /28")
        if not subnet.subnet_of(vpc):
            raise _error("gateway_subnet_cidr", f"{subnet} is not inside vpc_cidr {vpc}")
        if subnet.network_address != vpc.network_address:
            first = IPv4Network(f"{vpc.network_address}/{subnet.prefixlen}")
            raise _error(
                "gateway_subnet_cidr",
                f"when the stack creates the VPC its subnet is the first /{subnet.prefixlen} of "
                f"vpc_cidr: use {first} (or set vpc_id and gateway_subnet_id)",
            )
    if not config.public_addresses:
        raise _error(
            "address_pool",
            f"nat_mode '{config.nat_mode.value}' still needs the public addresses our traffic "
            "leaves with (the tunnel's traffic selectors, ConfigureGateway's PublicAddresses)",
        )
    if stack.health_probe_target is not None:
        # The probe proves the tunnel only if it crosses it: from an S, to an address behind T.
        target = IPv4Address(stack.health_probe_target.rpartition(":")[0])
        if not any(target in network for network in config.partner_networks):
            raise _error("health_probe_target", f"{target} is not inside partner_networks")
        if stack.health_probe_source not in config.public_addresses:
            raise _error(
                "health_probe_source",
                f"{stack.health_probe_source} is not one of our public addresses "
                "(address_pool or shared_address): the tunnel carries only those",
            )


def _check_addresses(config: TunnelnatConfig, stack: StackSettings) -> None:
    """Addresses that cannot work against our VPC and E (every problem at once, keys named).

    The VPC's CIDR is known when the stack creates the VPC, and given as ``vpc_cidrs`` for an
    existing one (``vpc_id``); without them the controller's model has checked the same against
    the gateway's subnet.
    """
    problems = []
    where = "vpc_cidr" if stack.creates_vpc else "vpc_cidrs"
    for vpc in stack.vpc_networks:
        if config.partner_endpoint in vpc:
            problems.append(
                f"partner_endpoint {config.partner_endpoint} lies inside {where} {vpc}: "
                "T is the partner's, not an address of our VPC"
            )
        for net in config.partner_networks:
            if net.overlaps(vpc):
                problems.append(
                    f"partner_networks {net} overlaps {where} {vpc}: the VPC's own route "
                    "claims those addresses"
                )
        for key, address in _public(config):
            if address in vpc:
                problems.append(
                    f"{key} {address} lies inside {where} {vpc}: S must be a public address "
                    "(an Elastic IP we own)"
                )
    eip = stack.gateway_eip_address
    if eip is not None:
        if eip == config.partner_endpoint:
            problems.append(
                f"gateway_eip_address {eip} is partner_endpoint: E is our end of the tunnel, "
                "T the partner's"
            )
        inside = [vpc for vpc in stack.vpc_networks if eip in vpc]
        if inside:
            problems.append(f"gateway_eip_address {eip} lies inside {where} {inside[0]}")
        elif reserved := special_range(eip, NOT_PUBLIC):
            problems.append(f"gateway_eip_address {eip} is {reserved}: E is an Elastic IP")
    if problems:
        raise ConfigError("\n  ".join([f"invalid {SOURCE}:", *problems]))


def _public(config: TunnelnatConfig) -> list[tuple[str, IPv4Address]]:
    pairs = [("address_pool", address) for address in config.address_pool]
    if config.shared_address is not None:
        pairs.append(("shared_address", config.shared_address))
    return pairs
