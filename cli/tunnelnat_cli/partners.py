"""``tunnelnat partners check FILE``: validate a partners file and show the plan it resolves to.

Runs on the operator's machine with no AWS at all (no credentials, no region): the file, our
VPC's CIDRs and the gateway's subnet are everything it needs. Exit 0 with the resolved plan
(each partner's tunnel, endpoint, IKE version, networks -> what instances use, its S and its
tag key); exit 1 with every problem, one a line; exit 2 when the file cannot be read.
"""

from __future__ import annotations

import argparse
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any, TextIO

from tunnelnat.core.config import ConfigError, default_enrolment_tag_key
from tunnelnat.core.partners import Partners, ResolvedPartner, partner_tag_key
from tunnelnat_cli.aws import EXIT_ERROR, CliError
from tunnelnat_cli.context import Printable, Runtime
from tunnelnat_cli.render import dump_json, table

SCHEMA = "tunnelnat.partners/v1"
EXIT_PROBLEMS = 1


def network(value: str) -> IPv4Network:
    """argparse type: an IPv4 CIDR (host bits must be zero, as in the context keys)."""
    try:
        return IPv4Network(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value[:40]!r} is not an IPv4 network (a.b.c.d/n)"
        ) from None


def run(args: argparse.Namespace, runtime: Runtime) -> int:
    out: TextIO = Printable(runtime.out)  # type: ignore[assignment] - a TextIO's write
    path = Path(args.file)
    if not path.is_file():
        raise CliError(f"partners file {args.file}: no such file", code=EXIT_ERROR)
    tag_key = args.enrolment_tag_key or default_enrolment_tag_key(args.deployment)
    try:
        partners = Partners.from_file(
            path, vpc_cidr=args.vpc_cidr or None, gateway_subnet=args.gateway_subnet
        )
    except ConfigError as exc:
        lines = str(exc).splitlines()
        if args.json:
            dump_json(_document(args, tag_key, None, [ln.strip() for ln in lines[1:]]), out)
        else:
            out.write("\n".join(lines) + "\n")
        return EXIT_PROBLEMS
    if args.json:
        dump_json(_document(args, tag_key, partners, []), out)
    else:
        out.write(_text(args, tag_key, partners))
    return 0


def _text(args: argparse.Namespace, tag_key: str, partners: Partners) -> str:
    plan = partners.resolved()
    checked = ", ".join(
        [f"VPC {v}" for v in partners.vpc_cidrs]
        + ([f"gateway subnet {partners.gateway_subnet}"] if partners.gateway_subnet else [])
    )
    lines = [
        f"{args.file}: {len(plan)} partner{'s' if len(plan) != 1 else ''}, no problems"
        + (
            f" (checked against {checked})"
            if checked
            else " (not checked against our VPC: pass --vpc-cidr and --gateway-subnet)"
        ),
    ]
    if partners.alias_block is not None:
        lines.append(f"alias_block {partners.alias_block}")
    lines.append("")
    rows = []
    for r in plan:
        p = r.partner
        # One row per network, every column filled: a partner's rows grep together.
        for n in r.networks:
            rows.append(
                [
                    p.name,
                    str(p.endpoint),
                    f"IKEv{p.ike_version} {p.layout}",
                    str(n.real),
                    f"{n.local} ({n.alias} alias)" if n.alias else f"{n.local}",
                    _nat(r),
                    partner_tag_key(tag_key, p.name),
                ]
            )
    headers = ["TUNNEL", "ENDPOINT", "IKE", "NETWORK", "INSTANCES USE", "S", "TAG KEY"]
    lines.append(table(headers, rows))
    lines.append("")
    lines.append(
        "Not deployable yet: the stack and the controller serve one partner (issue 23 "
        "continues); this checks the file and shows the plan."
    )
    return "\n".join(lines) + "\n"


def _nat(r: ResolvedPartner) -> str:
    nat = r.partner.nat
    return f"{nat.mode.value} " + ",".join(str(a) for a in nat.addresses)


def _document(
    args: argparse.Namespace, tag_key: str, partners: Partners | None, problems: list[str]
) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "file": str(args.file),
        "valid": partners is not None,
        "problems": problems,
        "vpc_cidrs": [str(v) for v in args.vpc_cidr or []],
        "gateway_subnet": str(args.gateway_subnet) if args.gateway_subnet else None,
        "enrolment_tag_key": tag_key,
        "alias_block": (
            str(partners.alias_block) if partners and partners.alias_block is not None else None
        ),
        "partners": [_partner(r, tag_key) for r in partners.resolved()] if partners else [],
    }


def _partner(r: ResolvedPartner, tag_key: str) -> dict[str, Any]:
    p = r.partner
    return {
        "name": p.name,
        "tunnel": p.name,
        "endpoint": str(p.endpoint),
        "ike_version": p.ike_version,
        "auth": p.auth.kind,
        "selector_layout": p.layout,
        "start_action": p.start_action,
        "networks": [
            {"real": str(n.real), "local": str(n.local), "alias": n.alias} for n in r.networks
        ],
        "nat": {"mode": p.nat.mode.value, "addresses": [str(a) for a in p.nat.addresses]},
        "tag_key": partner_tag_key(tag_key, p.name),
    }
