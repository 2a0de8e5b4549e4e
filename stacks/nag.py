"""Acknowledging a reviewed cdk-nag finding (cdk-nag 3.x: CDK's own Validations API)."""

from __future__ import annotations

from aws_cdk import Acknowledgment, Validations
from constructs import IConstruct


def acknowledge(scope: IConstruct, rule: str, reason: str) -> None:
    """Acknowledge ``rule`` (e.g. ``AwsSolutions-IAM5[Resource::*]``) on ``scope``, with why."""
    if len(reason) < 40:
        raise ValueError(f"{rule}: give a reason a reviewer would accept, not {reason!r}")
    Validations.of(scope).acknowledge(Acknowledgment(id=rule, reason=reason))
