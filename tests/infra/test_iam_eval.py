"""The IAM evaluator of tests/infra/iam_eval.py against IAM's documented semantics (IAM User
Guide: Policy evaluation logic; Condition operators; Single-valued vs. multivalued keys)."""

from __future__ import annotations

import pytest

from tests.infra.iam_eval import (
    Call,
    Resolver,
    UnsupportedPolicy,
    condition_holds,
    decide,
    is_allowed,
)

ARN = "arn:aws:ec2:eu-west-1:123456789012:instance/i-0123"


def allow(**extra):
    return {"Effect": "Allow", "Action": "ec2:CreateTags", "Resource": "*", **extra}


def test_implicit_deny_allow_and_explicit_deny_wins():
    call = Call("ec2:CreateTags", ARN)
    assert decide([], call) == "ImplicitDeny"
    assert decide([allow()], call) == "Allow"
    assert decide([allow(), {**allow(), "Effect": "Deny"}], call) == "ExplicitDeny"


@pytest.mark.parametrize(
    ("pattern", "action", "hit"),
    [
        ("ec2:CreateTags", "ec2:createtags", True),  # actions are case-insensitive
        ("ec2:*", "ec2:DeleteTags", True),
        ("ec2:Create?ags", "ec2:CreateTags", True),
        ("ec2:Create*", "ec2:DeleteTags", False),
        ("ssm:*", "ec2:CreateTags", False),
    ],
)
def test_action_wildcards(pattern, action, hit):
    statement = {"Effect": "Allow", "Action": pattern, "Resource": "*"}
    assert (decide([statement], Call(action, ARN)) == "Allow") is hit


def test_not_action_and_not_resource():
    statement = {"Effect": "Deny", "NotAction": "ec2:Describe*", "NotResource": ARN}
    assert decide([statement], Call("ec2:CreateTags", ARN + "x")) == "ExplicitDeny"
    assert decide([statement], Call("ec2:CreateTags", ARN)) == "ImplicitDeny"
    assert decide([statement], Call("ec2:DescribeInstances", ARN + "x")) == "ImplicitDeny"


def test_resource_wildcards_are_case_sensitive_and_cross_segments():
    statement = {"Effect": "Allow", "Action": "*", "Resource": "arn:aws:ec2:*:*:instance/*"}
    assert decide([statement], Call("ec2:X", ARN)) == "Allow"
    assert decide([statement], Call("ec2:X", ARN.replace("instance", "Instance"))) != "Allow"


@pytest.mark.parametrize(
    ("operator", "expected", "context", "holds"),
    [
        ("StringEquals", "a", {"k": "a"}, True),
        ("StringEquals", "a", {"k": "A"}, False),
        ("StringEquals", ["a", "b"], {"k": "b"}, True),  # values OR
        ("StringEquals", "a", {}, False),  # missing key: a positive operator fails
        ("StringNotEquals", "a", {}, True),  # ... a negated one passes
        ("StringNotEquals", ["a", "b"], {"k": "b"}, False),  # NOR
        ("StringEqualsIgnoreCase", "SourceDestCheck", {"k": "sourcedestcheck"}, True),
        ("StringEqualsIfExists", "a", {}, True),
        ("StringEqualsIfExists", "a", {"k": "b"}, False),
        ("StringEqualsIgnoreCaseIfExists", "x", {"k": "X"}, True),
        ("StringLike", "*", {"k": "anything"}, True),
        ("StringLike", "*", {}, False),
        ("StringLike", "tunnelnat-*", {"k": "tunnelnat-a"}, True),
        ("StringNotLike", "tunnelnat-*", {"k": "tunnelnat-a"}, False),
        ("ArnEquals", "arn:aws:ec2:*:1:vpc/vpc-1", {"k": "arn:aws:ec2:eu:1:vpc/vpc-1"}, True),
        ("ArnEquals", "arn:aws:ec2:*:1:vpc/vpc-1", {"k": "arn:aws:ec2:eu:1:vpc/vpc-2"}, False),
        ("ArnEqualsIfExists", "arn:aws:ec2:eu:1:vpc/vpc-1", {}, True),
        ("ArnNotEquals", "arn:aws:iam::1:role/r", {"k": "arn:aws:iam::1:role/r"}, False),
        ("ArnNotEquals", "arn:aws:iam::1:role/r", {"k": "arn:aws:iam::1:role/x"}, True),
        ("ArnNotLike", ["arn:aws:iam::1:role/ops-*"], {"k": "arn:aws:iam::1:role/ops-a"}, False),
        ("ArnLike", "arn:aws:iam::1:role/*", {"k": "arn:aws:iam::1:role/a"}, True),
        ("Bool", "true", {"k": True}, True),
        ("Bool", "false", {"k": "true"}, False),
        ("Null", "false", {"k": "x"}, True),
        ("Null", "false", {}, False),
        ("Null", "true", {}, True),
        ("ForAllValues:StringEquals", ["s"], {"k": ["s"]}, True),
        ("ForAllValues:StringEquals", ["s"], {"k": ["s", "other"]}, False),
        ("ForAllValues:StringEquals", ["s"], {}, True),  # vacuously true: hence Null
        ("ForAllValues:StringEquals", ["s"], {"k": []}, True),
        ("ForAnyValue:StringEquals", ["s"], {"k": ["x", "s"]}, True),
        ("ForAnyValue:StringEquals", ["s"], {}, False),
    ],
)
def test_condition_operators(operator, expected, context, holds):
    assert condition_holds(operator, "k", expected, context) is holds


def test_condition_keys_are_case_insensitive():
    assert condition_holds("StringEquals", "aws:TagKeys", "a", {"AWS:TAGKEYS": "a"})


def test_keys_and_operators_and_together():
    statement = allow(
        Condition={
            "StringEquals": {"a": "1", "b": "2"},
            "Null": {"c": "false"},
        }
    )
    ok = {"a": "1", "b": "2", "c": "x"}
    assert decide([statement], Call("ec2:CreateTags", ARN, ok)) == "Allow"
    for missing in ok:
        context = {k: v for k, v in ok.items() if k != missing}
        assert decide([statement], Call("ec2:CreateTags", ARN, context)) == "ImplicitDeny"


def test_unknown_operators_and_multivalued_misuse_are_refused_not_guessed():
    with pytest.raises(UnsupportedPolicy):
        condition_holds("NumericLessThan", "k", "1", {"k": "0"})
    with pytest.raises(UnsupportedPolicy):
        condition_holds("StringEquals", "k", "a", {"k": ["a", "b"]})
    with pytest.raises(UnsupportedPolicy):
        condition_holds("ForSomeValues:StringEquals", "k", "a", {"k": ["a"]})


def test_every_resource_of_a_call_must_be_allowed():
    doc = "arn:aws:ssm:eu-west-1:123456789012:document/d"
    policy = [{"Effect": "Allow", "Action": "ssm:SendCommand", "Resource": doc}]
    assert is_allowed(policy, "ssm:SendCommand", {doc: {}})
    assert not is_allowed(policy, "ssm:SendCommand", {doc: {}, ARN: {}})


def test_resource_policy_allow_suffices_and_its_deny_wins():
    secret = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:psk-AbCdEf"
    role = "arn:aws:iam::123456789012:role/gateway"
    identity = [{"Effect": "Allow", "Action": "secretsmanager:*", "Resource": "*"}]
    deny_others = [
        {
            "Effect": "Deny",
            "Principal": {"AWS": "*"},
            "Action": "secretsmanager:GetSecretValue",
            "Resource": "*",
            "Condition": {"ArnNotEquals": {"aws:PrincipalArn": role}},
        }
    ]
    policies = {secret: deny_others}
    action = "secretsmanager:GetSecretValue"
    assert is_allowed(identity, action, {secret: {}}, principal=role, resource_policies=policies)
    other = "arn:aws:iam::123456789012:role/admin"
    assert not is_allowed(
        identity, action, {secret: {}}, principal=other, resource_policies=policies
    )
    grant = [{"Effect": "Allow", "Principal": {"AWS": other}, "Action": "*", "Resource": "*"}]
    assert is_allowed(
        [],
        "secretsmanager:DescribeSecret",
        {secret: {}},
        principal=other,
        resource_policies={secret: grant},
    )


def test_resolver_turns_template_tokens_into_stable_arns():
    template = {
        "Resources": {
            "Table": {"Type": "AWS::DynamoDB::Table", "Properties": {"TableName": "t"}},
            "Eni": {"Type": "AWS::EC2::NetworkInterface", "Properties": {}},
        }
    }
    resolver = Resolver(template)
    arn = resolver.resolve(
        {
            "Fn::Join": [
                "",
                [
                    "arn:",
                    {"Ref": "AWS::Partition"},
                    ":ec2:",
                    {"Ref": "AWS::Region"},
                    ":",
                    {"Ref": "AWS::AccountId"},
                    ":network-interface/",
                    {"Ref": "Eni"},
                ],
            ]
        }
    )
    assert arn == resolver.arn("ec2", f"network-interface/{resolver.ref('Eni')}")
    assert resolver.resolve({"Fn::GetAtt": ["Table", "Arn"]}).endswith(":table/t")
    assert resolver.resolve({"Fn::Sub": "x-${AWS::Region}-${Table}"}) == "x-eu-west-1-t"
    assert resolver.resolve({"Fn::Select": [1, {"Fn::Split": [":", "a:b:c"]}]}) == "b"
