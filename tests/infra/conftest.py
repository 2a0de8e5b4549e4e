"""Synthesizing the stack for the infra tests: once per module (a synth takes seconds)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from aws_cdk import CfnElement
from aws_cdk.assertions import Template

from stacks.application import build_app, cdk_json_context
from stacks.tunnelnat_stack import TunnelnatStack
from tools.gateway_package import GatewayPackage

os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS_DIR = ROOT / "ssm_documents"

# The documented example deployment (docs/stack.md; `make synth` passes the same values): the
# required keys, in documentation address ranges. cdk.json has no defaults for them, so every
# synthesis here gives them explicitly, as a deploy must.
EXAMPLE_CONTEXT: dict[str, Any] = {
    "partner_endpoint": "203.0.113.1",
    "partner_networks": ["198.51.100.0/28"],
    "address_pool": ["192.0.2.10", "192.0.2.11"],
    "gateway_subnet_cidr": "10.80.0.0/24",
    "gateway_private_ip": "10.80.0.10",
}


def example_context(overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """cdk.json's context (the feature flags), the example's keys, then ``overrides``."""
    return cdk_json_context() | EXAMPLE_CONTEXT | dict(overrides or {})


class Synthesized:
    """One synthesized app: the stack, its Template, the raw template and the assembly dir."""

    def __init__(self, stack: TunnelnatStack, outdir: Path) -> None:
        self.stack = stack
        self.outdir = outdir
        self.template = Template.from_stack(stack)
        self.json: dict[str, Any] = self.template.to_json()
        self.template_file = outdir / f"{stack.stack_name}.template.json"

    def resources(self, type_: str) -> dict[str, dict[str, Any]]:
        return {k: v for k, v in self.json["Resources"].items() if v["Type"] == type_}

    def one(self, type_: str) -> tuple[str, dict[str, Any]]:
        found = self.resources(type_)
        assert len(found) == 1, f"expected one {type_}, found {sorted(found)}"
        return next(iter(found.items()))

    def logical_id(self, construct: Any) -> str:
        element = construct if isinstance(construct, CfnElement) else construct.node.default_child
        return self.stack.get_logical_id(element)

    def ref(self, construct: Any) -> dict[str, str]:
        return {"Ref": self.logical_id(construct)}

    def arn(self, construct: Any) -> dict[str, list[str]]:
        return {"Fn::GetAtt": [self.logical_id(construct), "Arn"]}


def synthesize(
    outdir: Path,
    overrides: Mapping[str, Any] | None = None,
    *,
    documents_dir: Path = DOCUMENTS_DIR,
    nag: bool = True,
    gateway_package: GatewayPackage | None = None,
) -> Synthesized:
    context = example_context(overrides)
    app, stack = build_app(
        context,
        outdir=str(outdir),
        documents_dir=documents_dir,
        nag=nag,
        gateway_package=gateway_package,
    )
    app.synth()
    return Synthesized(stack, outdir)


def statements(policy: Mapping[str, Any]) -> list[dict[str, Any]]:
    return list(policy["Properties"]["PolicyDocument"]["Statement"])


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True)
