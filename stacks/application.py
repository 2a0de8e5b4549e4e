"""Build the CDK app: context (cdk.json, then overrides) -> validated settings -> the stack.

Used by ``app.py`` (``make synth`` and the CDK CLI) and by ``tests/infra``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from aws_cdk import App, Environment, Validations
from cdk_nag import AwsSolutionsChecks

from stacks.settings import Settings, load_settings
from stacks.tunnelnat_stack import DOCUMENTS_DIR, LAMBDA_CODE_DIR, ROOT, TunnelnatStack
from tools.gateway_package import GatewayPackage
from tunnelnat.core.config import ConfigError

CDK_JSON = ROOT / "cdk.json"


def cdk_json_context(path: Path = CDK_JSON) -> dict[str, Any]:
    """The quick-start defaults: the ``context`` of cdk.json."""
    return dict(json.loads(path.read_text()).get("context", {}))


def build_app(
    context: Mapping[str, Any] | None = None,
    *,
    outdir: str | None = None,
    documents_dir: Path = DOCUMENTS_DIR,
    code_dir: Path = LAMBDA_CODE_DIR,
    nag: bool = True,
    gateway_package: GatewayPackage | None = None,
) -> tuple[App, TunnelnatStack]:
    """The app and its one stack. Raises ConfigError (naming the key) on a bad context value.

    ``context`` is the base (normally cdk.json's); under the CDK CLI its own context (cdk.json
    plus ``-c`` overrides) takes precedence, as the App reads it from the environment.
    ``gateway_package``: the gateway software to ship (default: built from this repository).
    """
    app = App(context=dict(context or {}), outdir=outdir)
    settings = load_settings(app.node.get_all_context())
    stack_settings = settings.stack
    env = None
    if stack_settings.account or stack_settings.region:
        env = Environment(account=stack_settings.account, region=stack_settings.region)
    stack = TunnelnatStack(
        app,
        stack_settings.name,
        settings=settings,
        documents_dir=documents_dir,
        code_dir=code_dir,
        gateway_package=gateway_package,
        env=env,
        description=(
            f"tunnelnat ({stack_settings.deployment}): IPsec gateway that NATs enrolled "
            "instances to our public addresses, its controller, documents and alarms"
        ),
    )
    if nag:
        Validations.of(app).add_plugins(AwsSolutionsChecks(app))
    return app, stack


def add_deployment(
    app: App,
    context: Mapping[str, Any],
    *,
    documents_dir: Path = DOCUMENTS_DIR,
    code_dir: Path = LAMBDA_CODE_DIR,
) -> TunnelnatStack:
    """Another deployment's stack in ``app`` (its own context, e.g. ``deployment``), checked
    against the deployments already there (``check_apart``)."""
    settings = load_settings(context)
    others = [c for c in app.node.children if isinstance(c, TunnelnatStack)]
    check_apart([*(o.settings for o in others), settings])
    env = None
    if settings.stack.account or settings.stack.region:
        env = Environment(account=settings.stack.account, region=settings.stack.region)
    return TunnelnatStack(
        app,
        settings.stack.name,
        settings=settings,
        documents_dir=documents_dir,
        code_dir=code_dir,
        env=env,
    )


def check_apart(deployments: list[Settings]) -> None:
    """Two deployments in one app must never share a name or, in one VPC, an enrolment key (one
    tagged instance would be enrolled by both): ConfigError naming every clash."""
    problems = []
    for i, a in enumerate(deployments):
        for b in deployments[i + 1 :]:
            if a.stack.deployment == b.stack.deployment:
                problems.append(f"deployment {a.stack.deployment!r} is given twice")
            same_vpc = a.stack.vpc_id is not None and a.stack.vpc_id == b.stack.vpc_id
            if same_vpc and a.config.enrolment_tag_key == b.config.enrolment_tag_key:
                problems.append(
                    f"enrolment_tag_key {a.config.enrolment_tag_key!r} is both "
                    f"{a.stack.deployment!r}'s and {b.stack.deployment!r}'s in {a.stack.vpc_id}: "
                    "one tagged instance would be enrolled twice (leave the key unset: each "
                    "deployment's default is tunnelnat:<deployment>)"
                )
    if problems:
        raise ConfigError("\n  ".join(["invalid CDK context:", *problems]))
