"""Acknowledging a reviewed cdk-nag finding (cdk-nag 3.x: CDK's own Validations API)."""

from __future__ import annotations

from aws_cdk import Acknowledgment, Stack, Token, Validations
from constructs import IConstruct


def acknowledge(scope: IConstruct, rule: str, reason: str) -> None:
    """Acknowledge ``rule`` (e.g. ``AwsSolutions-IAM5[Resource::*]``) on ``scope``, with why."""
    if len(reason) < 40:
        raise ValueError(f"{rule}: give a reason a reviewer would accept, not {reason!r}")
    Validations.of(scope).acknowledge(Acknowledgment(id=rule, reason=reason))


def wildcard_arn(scope: IConstruct, service: str, resource: str) -> str:
    """How cdk-nag spells ``arn:{partition}:{service}:{region}:{account}:{resource}`` in a
    finding's id: unresolved pseudo parameters as ``<AWS::Region>``, pinned ones literally (the
    partition too: with a pinned region, ``@aws-cdk/core:enablePartitionLiterals`` writes it)."""
    stack = Stack.of(scope)
    partition = "<AWS::Partition>" if Token.is_unresolved(stack.partition) else stack.partition
    region = "<AWS::Region>" if Token.is_unresolved(stack.region) else stack.region
    account = "<AWS::AccountId>" if Token.is_unresolved(stack.account) else stack.account
    return f"arn:{partition}:{service}:{region}:{account}:{resource}"
