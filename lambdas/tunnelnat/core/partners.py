"""The partners file: several partners on one gateway pair (issue 23), validated and resolved.

One YAML file declares every partner: its endpoint T, networks, IKE version, authentication,
proposals, lifetimes, DPD, IDs, selector layout, NAT (its own pool of S or a shared S) and, when
its networks overlap another partner's or our VPC, the alias range instances address it through.
Like ``TunnelnatConfig`` it reports every problem at once, one a line, each naming its key as
``partners[i] (name).key``. Used by the CDK app and the CLI (``tunnelnat partners check``); not
part of the gateway archive (pydantic, PyYAML).

Today's single-partner context keys stay a shorthand: ``Partners.from_single`` maps them to one
partner. Nothing here is wired into the stack or the controller yet (issue 23 continues).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
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
    NOT_UNICAST,
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
    IDENTITY,
    lifetime_problems,
    proposal_problems,
)
from tunnelnat.core.lanes import Lane

# A partner's name is its tunnel's (swanctl connection) name, part of file names on the gateway
# (conf.d/tunnelnat-<name>.conf), the suffix of its tag key and a metric dimension: lower case,
# no dots or slashes, at most 24 characters (plan-23, Contracts).
PARTNER_NAME = re.compile(r"^[a-z][a-z0-9-]{0,22}[a-z0-9]$")
# Secrets Manager names (as stacks/settings.py's psk_secret_name) or a secret's ARN.
SECRET = re.compile(
    r"^[A-Za-z0-9/_+=.@-]{1,512}$"
    r"|^arn:aws[a-z-]*:secretsmanager:[a-z0-9-]+:[0-9]{12}:secret:[A-Za-z0-9/_+=.@-]{1,512}$"
)
ACM_PCA_ARN = re.compile(
    r"^arn:aws[a-z-]*:acm-pca:[a-z0-9-]+:[0-9]{12}:certificate-authority/[0-9a-f-]{36}$"
)
SOURCE = "partners file"
# per-pair renders a CHILD_SA per (S, network); the gateway's renderer refuses more than this.
MAX_CHILD_SAS = 256


def partner_tag_key(enrolment_tag_key: str, name: str) -> str:
    """The tag an instance carries to join partner ``name``: one key per partner, so an
    instance may join several (a key holds one value) and an IAM policy can allow exactly some
    partners' keys with the ``aws:TagKeys`` condition key."""
    return f"{enrolment_tag_key}:partner:{name}"


# -- the model --------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Certificate(_Strict):
    """Certificate authentication (model and validation only; not rendered yet)."""

    secret: str | None = Field(
        default=None, description="Secrets Manager secret holding our private key and certificate"
    )
    acm_pca_arn: str | None = Field(
        default=None, description="or: the ACM Private CA that issues our certificate"
    )
    ca: str = Field(description="secret holding the partner's CA certificate (PEM)")

    @field_validator("secret", "ca")
    @classmethod
    def _secret(cls, value: str | None) -> str | None:
        if value is not None and not SECRET.fullmatch(value):
            raise ValueError("must be a Secrets Manager secret name or ARN")
        return value

    @field_validator("acm_pca_arn")
    @classmethod
    def _pca(cls, value: str | None) -> str | None:
        if value is not None and not ACM_PCA_ARN.fullmatch(value):
            raise ValueError(
                "must be an ACM Private CA ARN "
                "(arn:aws:acm-pca:<region>:<account>:certificate-authority/<id>)"
            )
        return value

    @model_validator(mode="after")
    def _one_source(self) -> Certificate:
        if (self.secret is None) == (self.acm_pca_arn is None):
            raise ValueError("give exactly one of secret (our key and certificate) or acm_pca_arn")
        return self


class Auth(_Strict):
    psk_secret: str | None = Field(default=None, description="secret holding this partner's PSK")
    certificate: Certificate | None = None

    @field_validator("psk_secret")
    @classmethod
    def _secret(cls, value: str | None) -> str | None:
        if value is not None and not SECRET.fullmatch(value):
            raise ValueError("must be a Secrets Manager secret name or ARN")
        return value

    @model_validator(mode="after")
    def _one(self) -> Auth:
        if (self.psk_secret is None) == (self.certificate is None):
            raise ValueError("give exactly one of psk_secret or certificate")
        return self

    @property
    def kind(self) -> Literal["psk", "certificate"]:
        return "psk" if self.psk_secret is not None else "certificate"


class Proposals(_Strict):
    ike: tuple[str, ...] = Field(default=DEFAULT_IKE_PROPOSALS, min_length=1, max_length=8)
    esp: tuple[str, ...] = Field(default=DEFAULT_ESP_PROPOSALS, min_length=1, max_length=8)

    @field_validator("ike", "esp", mode="before")
    @classmethod
    def _csv(cls, value: Any) -> Any:
        return _split_csv(value)

    @field_validator("ike", "esp")
    @classmethod
    def _strong(cls, value: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        # The same policy as the single-partner keys (core/crypto.py): a DH group of 14/19 or
        # stronger on IKE and on ESP (PFS), nothing weak.
        problems = [m for p in value for m in proposal_problems(p, esp=info.field_name == "esp")]
        if problems:
            raise ValueError("; ".join(problems))
        return value


class Lifetimes(_Strict):
    ike: tuple[int, int, int] = Field(
        default=DEFAULT_IKE_LIFETIMES, description="rekey_time, over_time, rand_time (s)"
    )
    child: tuple[int, int, int] = Field(
        default=DEFAULT_CHILD_LIFETIMES, description="rekey_time, life_time, rand_time (s)"
    )

    @field_validator("ike", "child", mode="before")
    @classmethod
    def _csv(cls, value: Any) -> Any:
        return _split_csv(value)

    @field_validator("ike", "child")
    @classmethod
    def _order(cls, value: tuple[int, int, int], info: ValidationInfo) -> tuple[int, int, int]:
        problems = lifetime_problems("IKE" if info.field_name == "ike" else "CHILD", *value)
        if problems:
            raise ValueError("; ".join(problems))
        return value


class Dpd(_Strict):
    delay: int = Field(default=10, ge=5, le=300, description="DPD after this silence (s)")
    timeout: int = Field(default=30, ge=10, le=600, description="dead after this (s)")

    @model_validator(mode="after")
    def _order(self) -> Dpd:
        if self.timeout <= self.delay:
            raise ValueError(f"timeout {self.timeout} must exceed delay {self.delay}")
        return self


class Nat(_Strict):
    """How this partner sees our instances: its own pool of S (one per instance), the instances'
    own public addresses (listed: the selectors), or one shared S, port-translated."""

    mode: NatMode = NatMode.DEDICATED
    pool: tuple[IPv4Address, ...] = ()
    address: IPv4Address | None = None

    @field_validator("pool", mode="before")
    @classmethod
    def _csv(cls, value: Any) -> Any:
        return _split_csv(value)

    @model_validator(mode="after")
    def _complete(self) -> Nat:
        if self.mode is NatMode.SHARED:
            if self.address is None:
                raise ValueError("mode 'shared' needs address (the one S)")
            if self.pool:
                raise ValueError("mode 'shared' takes address, not pool")
        else:
            if not self.pool:
                raise ValueError(f"mode '{self.mode.value}' needs pool: a list of public addresses")
            if self.address is not None:
                raise ValueError(f"mode '{self.mode.value}' takes pool, not address")
            if len(set(self.pool)) != len(self.pool):
                raise ValueError("pool lists an address twice")
        return self

    @property
    def addresses(self) -> tuple[IPv4Address, ...]:
        """Every S this partner may see (its traffic selectors on our side)."""
        return (self.address,) if self.address is not None else self.pool


class Partner(_Strict):
    name: str = Field(description="the tunnel's name, its tag key's suffix")
    endpoint: IPv4Address = Field(description="the partner's VPN endpoint T")
    networks: tuple[IPv4Network, ...] = Field(description="the partner's networks (real)")
    ike_version: Literal[1, 2] = 2
    auth: Auth
    proposals: Proposals = Proposals()
    lifetimes: Lifetimes = Lifetimes()
    dpd: Dpd = Dpd()
    local_id: str | None = Field(default=None, description="our IKE identity (default: E)")
    remote_id: str | None = Field(default=None, description="theirs (default: T)")
    # None: the version's default (IKEv2 single, IKEv1 per-pair: see _ikev1_problems).
    selector_layout: Literal["single", "per-pair"] | None = None
    start_action: Literal["start", "none"] = "start"
    nat: Nat
    alias: tuple[IPv4Network, ...] = Field(
        default=(), description="local alias ranges, one per network in the networks' order"
    )

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not PARTNER_NAME.fullmatch(value):
            raise ValueError(
                "must be 2-24 characters: a lower-case letter, then lower-case letters, digits "
                "or '-', not ending in '-' (it names the tunnel, files and a tag key)"
            )
        return value

    @field_validator("networks", "alias", mode="before")
    @classmethod
    def _list(cls, value: Any) -> Any:
        return () if value is None else _split_csv(value)

    @field_validator("networks")
    @classmethod
    def _not_empty(cls, value: tuple[IPv4Network, ...]) -> tuple[IPv4Network, ...]:
        if not value:
            raise ValueError("lists no network: give the partner's CIDRs (its app servers A)")
        return value

    @field_validator("local_id", "remote_id")
    @classmethod
    def _identity(cls, value: str | None) -> str | None:
        if value is not None and not IDENTITY.fullmatch(value):
            raise ValueError("must be an IPv4 address, an FQDN, user@FQDN or @#hex key ID")
        if value is not None and value.replace(".", "").isdigit():
            IPv4Address(value)  # a dotted quad is an address
        return value

    @property
    def layout(self) -> Literal["single", "per-pair"]:
        """The selector layout in effect: IKEv1 defaults to per-pair (one pair per SA)."""
        if self.selector_layout is not None:
            return self.selector_layout
        return "per-pair" if self.ike_version == 1 else "single"


@dataclass(frozen=True)
class NetworkPlan:
    """One partner network: ``real`` is what the selectors carry (the partner's own address),
    ``local`` what instances route and connect to (the alias, or ``real`` when none)."""

    real: IPv4Network
    local: IPv4Network
    alias: Literal["declared", "chosen"] | None = None


@dataclass(frozen=True)
class ResolvedPartner:
    partner: Partner
    networks: tuple[NetworkPlan, ...]

    @property
    def name(self) -> str:
        return self.partner.name

    @property
    def local_networks(self) -> tuple[IPv4Network, ...]:
        """What instances use: their host routes / route-table routes point these at G."""
        return tuple(n.local for n in self.networks)

    @property
    def real_networks(self) -> tuple[IPv4Network, ...]:
        """What the tunnel's selectors carry (the partner's side)."""
        return tuple(n.real for n in self.networks)


class _File(_Strict):
    alias_block: IPv4Network | None = None
    partners: list[Any]

    @field_validator("partners")
    @classmethod
    def _some(cls, value: list[Any]) -> list[Any]:
        if not value:
            raise ValueError("lists no partner")
        return value


@dataclass(frozen=True)
class Partners:
    """A validated partners file, with each partner's addressing resolved."""

    partners: tuple[Partner, ...]
    alias_block: IPv4Network | None
    plan: tuple[ResolvedPartner, ...]
    vpc_cidrs: tuple[IPv4Network, ...] = ()
    gateway_subnet: IPv4Network | None = None

    def resolved(self) -> tuple[ResolvedPartner, ...]:
        """Per partner, in file order: the networks instances use (alias or real) and the real
        ones (selectors). Aliases not declared were chosen deterministically at validation:
        the first free aligned block of the network's size in alias_block, in partner order."""
        return self.plan

    def __getitem__(self, name: str) -> ResolvedPartner:
        for resolved in self.plan:
            if resolved.name == name:
                return resolved
        raise KeyError(name)

    def lanes(self, deployment: str, enrolment_tag_key: str) -> tuple[Lane, ...]:
        """Each partner as a lane of ``deployment`` (core/lanes.py): what the stack publishes
        for the controller, the gateway and the CLI. Its index is its place in the file."""
        return tuple(
            Lane(
                deployment=deployment,
                name=r.name,
                index=i,
                endpoint=r.partner.endpoint,
                networks=r.real_networks,
                # One alias per network or none (a network without one maps to itself).
                aliases=r.local_networks if any(n.alias for n in r.networks) else (),
                nat_mode=r.partner.nat.mode.value,
                pool=r.partner.nat.pool,
                shared_address=r.partner.nat.address,
                tag_key=partner_tag_key(enrolment_tag_key, r.name),
                ike_version=r.partner.ike_version,
            )
            for i, r in enumerate(self.plan, 1)
        )

    # -- loading -------------------------------------------------------------------------------

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        *,
        vpc_cidr: _Networks = None,
        gateway_subnet: IPv4Network | str | None = None,
    ) -> Partners:
        """Load and validate a YAML partners file; ConfigError names every problem."""
        import yaml  # the CDK app and the CLI have it; the Lambda never loads a file

        where = f"{SOURCE} {path}"
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{where}: no such file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{where}: cannot be read: {exc}") from None
        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or str(exc)
            raise ConfigError(f"{where}: not valid YAML{at}: {problem}") from None
        return cls.from_mapping(
            values, vpc_cidr=vpc_cidr, gateway_subnet=gateway_subnet, source=where
        )

    @classmethod
    def from_mapping(
        cls,
        values: Any,
        *,
        vpc_cidr: _Networks = None,
        gateway_subnet: IPv4Network | str | None = None,
        source: str = SOURCE,
    ) -> Partners:
        """Validate ``values`` (the file's content); ConfigError lists every problem, each
        naming ``partners[i] (name).key``."""
        vpcs = _networks(vpc_cidr)
        subnet = IPv4Network(gateway_subnet) if gateway_subnet is not None else None
        if not isinstance(values, Mapping):
            raise ConfigError(
                f"invalid {source}:\n  the file must be a mapping with 'partners:' (a list) and "
                f"optionally 'alias_block:' (got {type(values).__name__})"
            )
        lines: list[str] = []
        try:
            top = _File.model_validate(values)
        except ValidationError as exc:
            detail = describe_validation_error(exc, source).splitlines()[1:]
            lines += [line.replace(": Value error, ", ": ", 1) for line in detail]
            top = None
        raw = values.get("partners")
        raw_list = raw if isinstance(raw, list) else []
        partners: list[tuple[int, Partner]] = []
        for i, item in enumerate(raw_list):
            try:
                partners.append((i, Partner.model_validate(item)))
            except ValidationError as exc:
                detail = describe_validation_error(exc, source).splitlines()[1:]
                prefix = _label(i, item.get("name") if isinstance(item, Mapping) else None)
                lines += [_prefixed(line, prefix) for line in detail]
                # Every problem at once: without its bad optional keys (their defaults instead)
                # the partner still takes part in the checks across keys and partners; one
                # whose required keys are bad cannot.
                bad = {str(e["loc"][0]) for e in exc.errors() if e["loc"]}
                if isinstance(item, Mapping) and not bad & _REQUIRED:
                    try:
                        rest = {k: v for k, v in item.items() if k not in bad}
                        partners.append((i, Partner.model_validate(rest)))
                    except ValidationError:
                        pass
        alias_block = top.alias_block if top is not None else _maybe_network(values)
        problems, plan = _check(partners, alias_block, vpcs, subnet)
        lines += problems
        if lines:
            raise ConfigError("\n  ".join([f"invalid {source}:", *(ln.strip() for ln in lines)]))
        return cls(
            partners=tuple(p for _, p in partners),
            alias_block=alias_block,
            plan=tuple(plan),
            vpc_cidrs=vpcs,
            gateway_subnet=subnet,
        )

    @classmethod
    def from_single(
        cls,
        config: TunnelnatConfig,
        tunnel_name: str,
        psk_secret: str,
        *,
        vpc_cidr: _Networks = None,
        **tunnel: Any,
    ) -> Partners:
        """Today's single-partner keys as one partner (the shorthand). ``tunnel`` takes the
        stack's tunnel keys by their context names: ike_proposals, esp_proposals,
        ike_lifetimes, child_lifetimes, dpd_delay_seconds, dpd_timeout_seconds, local_id,
        remote_id, selector_layout, start_action (absent or None: the default)."""
        known = {
            "ike_proposals": ("proposals", "ike"),
            "esp_proposals": ("proposals", "esp"),
            "ike_lifetimes": ("lifetimes", "ike"),
            "child_lifetimes": ("lifetimes", "child"),
            "dpd_delay_seconds": ("dpd", "delay"),
            "dpd_timeout_seconds": ("dpd", "timeout"),
        }
        flat = ("local_id", "remote_id", "selector_layout", "start_action")
        unknown = sorted(set(tunnel) - set(known) - set(flat))
        if unknown:
            raise TypeError(f"from_single: unknown tunnel keys {unknown}")
        partner: dict[str, Any] = {
            "name": tunnel_name,
            "endpoint": str(config.partner_endpoint),
            "networks": [str(n) for n in config.partner_networks],
            "auth": {"psk_secret": psk_secret},
            "nat": (
                {"mode": "shared", "address": str(config.shared_address)}
                if config.nat_mode is NatMode.SHARED
                else {"mode": config.nat_mode.value, "pool": [str(a) for a in config.address_pool]}
            ),
        }
        for key, value in tunnel.items():
            if value is None:
                continue
            if key in known:
                group, field = known[key]
                partner.setdefault(group, {})[field] = value
            else:
                partner[key] = value
        return cls.from_mapping(
            {"partners": [partner]},
            vpc_cidr=vpc_cidr,
            gateway_subnet=config.gateway_subnet_cidr,
            source="single-partner configuration (tunnel_name is the partner's name)",
        )


# Keys without a default: a partner missing one (or with a bad one) is left out of the checks
# across partners.
_REQUIRED = frozenset(n for n, f in Partner.model_fields.items() if f.is_required())
_Networks = IPv4Network | str | Iterable[IPv4Network | str] | None


# -- the checks across keys and partners ------------------------------------------------------


def _check(
    partners: list[tuple[int, Partner]],
    alias_block: IPv4Network | None,
    vpcs: tuple[IPv4Network, ...],
    subnet: IPv4Network | None,
) -> tuple[list[str], list[ResolvedPartner]]:
    """Every problem across keys and partners, and the plan when there is none."""
    problems: list[str] = []
    ours = [(v, f"our VPC {v}") for v in vpcs]
    if subnet is not None:
        ours.append((subnet, f"the gateway's subnet {subnet}"))
    for i, p in partners:
        problems += [f"{_label(i, p.name)}.{line}" for line in _partner_problems(p, ours)]
    problems += _duplicates(partners)
    problems += _child_name_clashes(partners)
    for i, p in partners:
        for j, q in partners:
            inside = [n for n in q.networks if p.endpoint in n]
            if j != i and inside:
                problems.append(
                    f"{_label(i, p.name)}.endpoint: {p.endpoint} lies inside {_label(j, q.name)}'s "
                    f"network {inside[0]}: instances would route T into that partner's tunnel"
                )
    problems += _public_problems(partners, ours)
    local, alias_problems = _aliases(partners, alias_block, ours)
    problems += alias_problems
    plan = [ResolvedPartner(p, tuple(local[i])) for i, p in partners] if not problems else []
    return problems, plan


def _partner_problems(p: Partner, ours: list[tuple[IPv4Network, str]]) -> list[str]:
    """One partner's own consistency; each line starts with its key."""
    problems = []
    if reserved := special_range(p.endpoint, NOT_UNICAST):
        problems.append(f"endpoint: {p.endpoint} is {reserved}: not a VPN peer")
    for net, what in ours:
        if p.endpoint in net:
            problems.append(f"endpoint: {p.endpoint} lies inside {what}: T is the partner's")
    for k, net in enumerate(p.networks):
        key = f"networks[{k}]"
        if net.prefixlen == 0:
            # Routed via G this would take every destination (the internet and AWS's endpoints
            # included) into the tunnel.
            problems.append(f"{key}: {net} is the default route: list the partner's networks")
            continue
        if p.endpoint in net:
            problems.append(f"endpoint: {p.endpoint} lies inside networks[{k}] {net}")
        special = next(((n, w) for n, w in NOT_UNICAST if net.overlaps(n)), None)
        if special:
            problems.append(
                f"{key}: {net} overlaps {special[0]}, {special[1]}: a route to it via G would "
                "take that range away from every enrolled instance"
            )
        for m in range(k):
            if net.overlaps(p.networks[m]):
                problems.append(f"{key}: {net} overlaps networks[{m}] {p.networks[m]}")
    if p.alias and len(p.alias) != len(p.networks):
        problems.append(
            f"alias: {len(p.alias)} given for {len(p.networks)} networks: one alias per network, "
            "in the networks' order"
        )
    for k, (net, alias) in enumerate(zip(p.networks, p.alias, strict=False)):
        if alias.prefixlen != net.prefixlen:
            # The gateway maps alias <-> real 1:1 (prefix DNAT / netmap keeps the host part).
            problems.append(
                f"alias[{k}]: {alias} is a /{alias.prefixlen}, networks[{k}] {net} a "
                f"/{net.prefixlen}: an alias maps its network 1:1, so it has the same size"
            )
    problems += _ikev1_problems(p)
    return problems


def _ikev1_problems(p: Partner) -> list[str]:
    """IKEv1 negotiates one pair of traffic selectors per CHILD_SA: strongSwan interprets only
    the first local_ts/remote_ts with IKEv1 (swanctl.conf(5), connections.<conn>.children.
    <child>.local_ts: "When IKEv1 is used only the first selector is interpreted [...] a
    limitation of the IKEv1 protocol, which only allows a single pair of selectors per
    CHILD_SA"; https://docs.strongswan.org/docs/latest/swanctl/swanctlConf.html). A single
    CHILD_SA with several S or networks would silently carry only the first pair, so IKEv1
    needs one CHILD_SA per (S, network): per-pair."""
    pairs = len(p.nat.addresses) * len(p.networks)
    if p.layout == "per-pair" and pairs > MAX_CHILD_SAS:
        return [
            f"selector_layout: 'per-pair' with {pairs} selector pairs (S x networks): at most "
            f"{MAX_CHILD_SAS} CHILD_SAs a tunnel (core/swanctl.py refuses more)"
        ]
    if p.ike_version != 1 or p.layout != "single" or pairs <= 1:
        return []
    return [
        f"selector_layout: 'single' with ike_version 1 and {pairs} selector pairs: IKEv1 "
        "carries one selector pair per SA (strongSwan uses only the first), use 'per-pair'"
    ]


def _duplicates(partners: list[tuple[int, Partner]]) -> list[str]:
    problems = []
    names: dict[str, int] = {}
    endpoints: dict[IPv4Address, tuple[int, str]] = {}
    for i, p in partners:
        if p.name in names:
            problems.append(
                f"{_label(i, p.name)}.name: {p.name!r} is also partners[{names[p.name]}]'s: "
                "a name is a tunnel and a tag key, one partner each"
            )
        else:
            names[p.name] = i
        if p.endpoint in endpoints:
            j, other = endpoints[p.endpoint]
            problems.append(
                f"{_label(i, p.name)}.endpoint: {p.endpoint} is also {_label(j, other)}'s: "
                "charon tells partners apart by their endpoint (one IKE peer, one partner)"
            )
        else:
            endpoints[p.endpoint] = (i, p.name)
    return problems


def _child_name_clashes(partners: list[tuple[int, Partner]]) -> list[str]:
    """core/swanctl.py names a per-pair tunnel's CHILD_SAs ``<name>-1``, ``<name>-2`` ... and a
    single one ``<name>``: partner ``x-2`` beside a per-pair ``x`` would share a child name,
    and the health agent and the pair agent still find children by name alone."""
    problems = []
    owner: dict[str, tuple[int, str]] = {}
    for i, p in partners:
        pairs = len(p.nat.addresses) * len(p.networks)
        names = [p.name] if p.layout == "single" else [f"{p.name}-{k}" for k in range(1, pairs + 1)]
        for child in names:
            if child in owner and owner[child][1] != p.name:  # a same name: _duplicates
                j, other = owner[child]
                problems.append(
                    f"{_label(i, p.name)}.name: its CHILD_SA {child!r} is also one of "
                    f"{_label(j, other)}'s (per-pair children are <name>-1, <name>-2 ...): "
                    "choose another name"
                )
                break
            owner.setdefault(child, (i, p.name))
    return problems


def _public_problems(
    partners: list[tuple[int, Partner]], ours: list[tuple[IPv4Network, str]]
) -> list[str]:
    """Our public addresses S: public, ours, never a partner's, and each pool address one
    partner's (a partner whitelists its own S: one S in two pools would let an instance of one
    partner reach the other's whitelist)."""
    problems = []
    owners: dict[IPv4Address, tuple[int, str, NatMode]] = {}
    every_network = [(q.name, j, net) for j, q in partners for net in q.networks]
    for i, p in partners:
        key = "nat.address" if p.nat.mode is NatMode.SHARED else "nat.pool"
        label = f"{_label(i, p.name)}.{key}"
        for s in p.nat.addresses:
            for name, j, net in every_network:
                if s in net:
                    problems.append(f"{label}: {s} lies inside {_label(j, name)}'s network {net}")
            for j, q in partners:
                if s == q.endpoint:
                    problems.append(
                        f"{label}: {s} is {_label(j, q.name)}'s endpoint: S is ours, T theirs"
                    )
            inside = [what for net, what in ours if s in net]
            if inside:
                problems.append(f"{label}: {s} lies inside {inside[0]}: S is an Elastic IP")
            elif reserved := special_range(s, NOT_PUBLIC):
                problems.append(
                    f"{label}: {s} is {reserved}: S must be a public address (an Elastic IP we "
                    "own) the partner can whitelist"
                )
            if s in owners:
                j, other, mode = owners[s]
                if mode is p.nat.mode and mode is not NatMode.DEDICATED:
                    # One shared S, or an instance's own address, may face several partners,
                    # unless their networks overlap: both tunnels would need the same kernel
                    # policy S -> network, and the kernel keeps one.
                    clash = [n for n in p.networks for m in _nets(partners, j) if n.overlaps(m)]
                    if clash:
                        problems.append(
                            f"{label}: {s} is also {_label(j, other)}'s and both partners have "
                            f"{clash[0]}: their IPsec policies would be the same; give one of "
                            "them its own S"
                        )
                else:
                    problems.append(
                        f"{label}: {s} is also in {_label(j, other)}'s nat: a dedicated pool "
                        "address belongs to one partner (each partner whitelists its own S)"
                    )
            else:
                owners[s] = (i, p.name, p.nat.mode)
    return problems


def _nets(partners: list[tuple[int, Partner]], index: int) -> tuple[IPv4Network, ...]:
    return next(p.networks for i, p in partners if i == index)


def _aliases(
    partners: list[tuple[int, Partner]],
    alias_block: IPv4Network | None,
    ours: list[tuple[IPv4Network, str]],
) -> tuple[dict[int, list[NetworkPlan]], list[str]]:
    """What instances use for each partner network, in partner order.

    The first partner to claim a range keeps its real network; a later one that overlaps it,
    or any partner that overlaps our VPC or the gateway's subnet, is addressed through an
    alias: its own (declared), else the first free aligned block of its size in alias_block.
    An alias collides with nothing: not our VPC, not another alias, not any partner's real
    network (the gateway must tell alias from real by address alone), not a special range.
    """
    problems: list[str] = []
    real = [(n, f"{_label(i, p.name)}'s network {n}") for i, p in partners for n in p.networks]
    declared = [
        (a, f"{_label(i, p.name)}.alias[{k}] {a}", i, k)
        for i, p in partners
        for k, a in enumerate(p.alias)
    ]
    for a, what, i, k in declared:
        label = what.rsplit(" ", 1)[0]
        for net, other in ours:
            if a.overlaps(net):
                problems.append(f"{label}: {a} overlaps {other}")
        for net, other in real:
            if a.overlaps(net):
                problems.append(
                    f"{label}: {a} overlaps {other}: aliases are ranges no partner uses"
                )
        for b, other, j, m in declared:
            if (j, m) < (i, k) and a.overlaps(b):
                problems.append(f"{label}: {a} overlaps {other}")
        special = next(((n, w) for n, w in NOT_UNICAST if a.overlaps(n)), None)
        if special:
            problems.append(f"{label}: {a} overlaps {special[0]}, {special[1]}")
    # Ranges instances already use: ours, then each local range as it is settled.
    used: list[tuple[IPv4Network, str]] = list(ours)
    # Never chosen as an alias: everything used, every real network, every declared alias.
    avoid: list[IPv4Network] = (
        [n for n, _ in ours]
        + [n for n, _ in real]
        + [a for a, *_ in declared]
        + [n for n, _ in NOT_UNICAST]
    )
    if alias_block is not None:
        special = next(((n, w) for n, w in NOT_UNICAST if alias_block.overlaps(n)), None)
        if special:
            problems.append(f"alias_block: {alias_block} overlaps {special[0]}, {special[1]}")
    plans: dict[int, list[NetworkPlan]] = {}
    for i, p in partners:
        plans[i] = []
        for k, net in enumerate(p.networks):
            if k < len(p.alias):
                plans[i].append(NetworkPlan(net, p.alias[k], "declared"))
                used.append((p.alias[k], f"{_label(i, p.name)}.alias[{k}] {p.alias[k]}"))
                continue
            clash = next((what for n, what in used if net.overlaps(n)), None)
            if clash is None:
                plans[i].append(NetworkPlan(net, net))
                used.append((net, f"{_label(i, p.name)}'s network {net}"))
                continue
            label = f"{_label(i, p.name)}.networks[{k}]"
            if alias_block is None:
                problems.append(
                    f"{label}: {net} overlaps {clash}: declare alias (a free range of the same "
                    "size instances address this partner by) or set alias_block to choose one from"
                )
                continue
            chosen = _first_free(alias_block, net.prefixlen, avoid)
            if chosen is None:
                problems.append(
                    f"{label}: {net} overlaps {clash} and alias_block {alias_block} has no free "
                    f"/{net.prefixlen} left: declare alias or widen alias_block"
                )
                continue
            plans[i].append(NetworkPlan(net, chosen, "chosen"))
            used.append((chosen, f"{_label(i, p.name)}'s chosen alias {chosen}"))
            avoid.append(chosen)
    return plans, problems


def _first_free(
    block: IPv4Network, prefixlen: int, avoid: Sequence[IPv4Network]
) -> IPv4Network | None:
    """The lowest aligned /prefixlen inside ``block`` overlapping nothing in ``avoid``. The
    obstacles are merged into sorted intervals and the search jumps past each, so a /10 full of
    /32s costs a step per run of obstacles, not one per candidate block."""
    if prefixlen < block.prefixlen:
        return None
    low, high = int(block.network_address), int(block.broadcast_address)
    spans: list[list[int]] = []
    for a, b in sorted(
        (int(n.network_address), int(n.broadcast_address)) for n in avoid if n.overlaps(block)
    ):
        if spans and a <= spans[-1][1] + 1:
            spans[-1][1] = max(spans[-1][1], b)
        else:
            spans.append([a, b])
    size = 1 << (32 - prefixlen)
    candidate = low
    for a, b in spans:
        if candidate + size - 1 < a:
            break  # the candidate ends before this obstacle (and every later one)
        if b >= candidate:
            candidate = -(-(b + 1) // size) * size  # the next aligned start after it
    if candidate + size - 1 > high:
        return None
    return IPv4Network((candidate, prefixlen))


# -- helpers -----------------------------------------------------------------------------------


def _label(index: int, name: Any) -> str:
    shown = f" ({name})" if isinstance(name, str) and name and len(name) <= 40 else ""
    return f"partners[{index}]{shown}"


_LOC = re.compile(r"^  ([A-Za-z_][\w.]*|\(model\))(?=: )")


def _prefixed(line: str, prefix: str) -> str:
    """``  networks.0: ...`` from describe_validation_error -> ``partners[i] (name).networks[0]:
    ...``; a model-level line (no key of its own) gets the partner's label."""
    match = _LOC.match(line)
    if not match:
        return f"{prefix}: {line.strip()}"
    key = re.sub(r"\.(\d+)(?=\.|$)", r"[\1]", match.group(1))
    key = "" if key == "(model)" else f".{key}"
    rest = line[match.end() :].replace(": Value error, ", ": ", 1)
    return f"{prefix}{key}{rest}"


def _split_csv(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def _networks(value: _Networks) -> tuple[IPv4Network, ...]:
    if value is None:
        return ()
    if isinstance(value, IPv4Network | str):
        return (IPv4Network(value),)
    return tuple(IPv4Network(v) for v in value)


def _maybe_network(values: Mapping[str, Any]) -> IPv4Network | None:
    try:
        return IPv4Network(values.get("alias_block")) if values.get("alias_block") else None
    except ValueError:
        return None
