"""A small IAM policy evaluator for the synthesized template's policies (issue 21).

Why our own: moto's IAM access control (moto/iam/access_control.py, 5.2.5) evaluates Condition
blocks only for role trust policies and only with StringEquals (moto/iam/policy_conditions.py);
no maintained PyPI library evaluates identity and resource policies with conditions offline. This
evaluates exactly the subset the stack's policies use, as the IAM User Guide describes it
(Policy evaluation logic; IAM JSON policy elements: Condition operators):

- Effect Allow/Deny; an explicit Deny in any policy wins, then any Allow, else an implicit deny.
- Action/NotAction with ``*`` and ``?`` (case-insensitive); Resource/NotResource ARNs with
  ``*`` and ``?``; Principal ``*`` or ARNs (resource policies).
- Condition operators String(Not)Equals, String(Not)EqualsIgnoreCase, String(Not)Like,
  Arn(Not)Equals, Arn(Not)Like, Bool, Null, each with ``IfExists``; ForAllValues:/ForAnyValue:
  for multivalued keys. Keys of one operator AND, operators AND, values of one key OR (NOR for
  the negated operators). A missing key fails a positive operator and passes a negated one;
  IfExists passes when the key is missing; ForAllValues passes on a missing or empty key,
  ForAnyValue fails on it.
- A call on several resources (SendCommand: the document and each instance) is allowed only when
  each resource is (the Service Authorization Reference's resource types of the action).

Template values (Ref, Fn::GetAtt, Fn::Join, Fn::Sub, Fn::Select, Fn::Split) are resolved by
``Resolver`` to stable made-up physical IDs, so a test names a resource exactly as the policy does.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

ACCOUNT = "123456789012"
REGION = "eu-west-1"
PARTITION = "aws"

Context = Mapping[str, Any]


class UnsupportedPolicy(ValueError):
    """The policy uses something this evaluator does not implement: never guess."""


# -- matching ----------------------------------------------------------------------------------
def _wild(pattern: str, value: str, *, case: bool = True) -> bool:
    """IAM's wildcards: ``*`` any run of characters (``:`` and ``/`` included), ``?`` one."""
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, value, 0 if case else re.IGNORECASE) is not None


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _lookup(context: Context, key: str) -> tuple[bool, list[str]]:
    """(present, values) of ``key``; condition key names are case-insensitive."""
    for name, value in context.items():
        if name.lower() == key.lower():
            if value is None:
                return False, []
            values = _as_list(value)
            return True, [str(v).lower() if isinstance(v, bool) else str(v) for v in values]
    return False, []


_BASE = {
    "StringEquals": (lambda p, v: p == v, False),
    "StringNotEquals": (lambda p, v: p == v, True),
    "StringEqualsIgnoreCase": (lambda p, v: p.lower() == v.lower(), False),
    "StringNotEqualsIgnoreCase": (lambda p, v: p.lower() == v.lower(), True),
    "StringLike": (lambda p, v: _wild(p, v), False),
    "StringNotLike": (lambda p, v: _wild(p, v), True),
    "ArnEquals": (lambda p, v: _wild(p, v), False),
    "ArnLike": (lambda p, v: _wild(p, v), False),
    "ArnNotEquals": (lambda p, v: _wild(p, v), True),
    "ArnNotLike": (lambda p, v: _wild(p, v), True),
    "Bool": (lambda p, v: p.lower() == v.lower(), False),
}


def condition_holds(operator: str, key: str, expected: Any, context: Context) -> bool:
    """One key of one condition operator against the request context."""
    qualifier = None
    if ":" in operator:
        qualifier, operator = operator.split(":", 1)
        if qualifier not in ("ForAllValues", "ForAnyValue"):
            raise UnsupportedPolicy(f"set operator {qualifier}")
    if_exists = operator.endswith("IfExists")
    base = operator.removesuffix("IfExists")
    present, values = _lookup(context, key)
    wanted = [str(e).lower() if isinstance(e, bool) else str(e) for e in _as_list(expected)]
    if base == "Null":
        if if_exists or qualifier:
            raise UnsupportedPolicy("Null takes neither IfExists nor a set operator")
        return (not present) == (wanted[0].lower() == "true")
    if base not in _BASE:
        raise UnsupportedPolicy(f"condition operator {operator}")
    match, negated = _BASE[base]

    def one(value: str) -> bool:
        hit = any(match(w, value) for w in wanted)
        return not hit if negated else hit

    if qualifier == "ForAllValues":
        return all(one(v) for v in values)
    if qualifier == "ForAnyValue":
        return any(one(v) for v in values)
    if not present:
        return if_exists or negated
    if len(values) != 1:
        raise UnsupportedPolicy(f"{key} is multivalued: use ForAllValues/ForAnyValue")
    return one(values[0])


def conditions_hold(conditions: Mapping[str, Mapping[str, Any]], context: Context) -> bool:
    return all(
        condition_holds(operator, key, expected, context)
        for operator, keys in conditions.items()
        for key, expected in keys.items()
    )


# -- statements ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Call:
    """One authorization: an action on one resource, the request context, the principal."""

    action: str
    resource: str
    context: Mapping[str, Any] = field(default_factory=dict)
    principal: str = ""


def _matches_action(statement: Mapping[str, Any], action: str) -> bool:
    if "Action" in statement:
        return any(_wild(a, action, case=False) for a in _as_list(statement["Action"]))
    if "NotAction" in statement:
        return not any(_wild(a, action, case=False) for a in _as_list(statement["NotAction"]))
    raise UnsupportedPolicy("statement without Action or NotAction")


def _matches_resource(statement: Mapping[str, Any], resource: str) -> bool:
    if "Resource" in statement:
        return any(_wild(r, resource) for r in _as_list(statement["Resource"]))
    if "NotResource" in statement:
        return not any(_wild(r, resource) for r in _as_list(statement["NotResource"]))
    raise UnsupportedPolicy("statement without Resource or NotResource")


def _matches_principal(statement: Mapping[str, Any], principal: str) -> bool:
    if "NotPrincipal" in statement:
        raise UnsupportedPolicy("NotPrincipal")
    if "Principal" not in statement:
        return True  # an identity policy: the principal is whoever holds it
    allowed = statement["Principal"]
    if allowed == "*":
        return True
    if isinstance(allowed, Mapping):
        for kind, values in allowed.items():
            if kind != "AWS":
                continue
            if any(v == "*" or v == principal for v in _as_list(values)):
                return True
    return False


def applies(statement: Mapping[str, Any], call: Call) -> bool:
    return (
        _matches_action(statement, call.action)
        and _matches_resource(statement, call.resource)
        and _matches_principal(statement, call.principal)
        and conditions_hold(statement.get("Condition", {}), call.context)
    )


def decide(statements: Iterable[Mapping[str, Any]], call: Call) -> str:
    """``Allow``, ``ExplicitDeny`` or ``ImplicitDeny`` for one resource."""
    allowed = False
    for statement in statements:
        if not applies(statement, call):
            continue
        if statement["Effect"] == "Deny":
            return "ExplicitDeny"
        if statement["Effect"] != "Allow":
            raise UnsupportedPolicy(f"Effect {statement['Effect']}")
        allowed = True
    return "Allow" if allowed else "ImplicitDeny"


def is_allowed(
    identity: Iterable[Mapping[str, Any]],
    action: str,
    resources: Mapping[str, Context],
    *,
    principal: str = "",
    resource_policies: Mapping[str, Iterable[Mapping[str, Any]]] | None = None,
    shared_context: Context | None = None,
) -> bool:
    """Whether ``principal`` (holding ``identity``) may ``action`` on every resource of
    ``resources`` (ARN -> that resource's context). Within one account an Allow in either the
    identity policy or the resource's policy suffices, and an explicit Deny in either wins."""
    identity = list(identity)
    for arn, context in resources.items():
        full = {**(shared_context or {}), **context}
        if principal:
            full.setdefault("aws:PrincipalArn", principal)
        call = Call(action, arn, full, principal)
        decisions = [decide(identity, call)]
        if resource_policies and arn in resource_policies:
            decisions.append(decide(resource_policies[arn], call))
        if "ExplicitDeny" in decisions or "Allow" not in decisions:
            return False
    return True


# -- the synthesized template ----------------------------------------------------------------
def _id(kind: str, logical: str, length: int = 17) -> str:
    return f"{kind}-{hashlib.sha256(logical.encode()).hexdigest()[:length]}"


class Resolver:
    """Template values -> strings, with made-up but stable physical IDs."""

    def __init__(self, template: Mapping[str, Any]) -> None:
        self.resources: Mapping[str, Any] = template.get("Resources", {})
        self.parameters: Mapping[str, Any] = template.get("Parameters", {})
        self.pseudo = {
            "AWS::AccountId": ACCOUNT,
            "AWS::Region": REGION,
            "AWS::Partition": PARTITION,
            "AWS::URLSuffix": "amazonaws.com",
            "AWS::StackName": "tunnelnat",
            "AWS::StackId": f"arn:aws:cloudformation:{REGION}:{ACCOUNT}:stack/tunnelnat/x",
            "AWS::NoValue": "",
        }

    def arn(self, service: str, resource: str, *, region: str = REGION) -> str:
        return f"arn:{PARTITION}:{service}:{region}:{ACCOUNT}:{resource}"

    def ref(self, name: str) -> str:
        if name in self.pseudo:
            return self.pseudo[name]
        if name in self.parameters:
            return str(self.parameters[name].get("Default", f"<{name}>"))
        resource = self.resources[name]
        kind, props = resource["Type"], resource.get("Properties", {})
        simple = {
            "AWS::EC2::NetworkInterface": "eni",
            "AWS::EC2::VPC": "vpc",
            "AWS::EC2::Subnet": "subnet",
            "AWS::EC2::SecurityGroup": "sg",
            "AWS::EC2::RouteTable": "rtb",
            "AWS::EC2::LaunchTemplate": "lt",
            "AWS::EC2::EIP": "eipalloc",
        }
        if kind in simple:
            return _id(simple[kind], name)
        named = {
            "AWS::DynamoDB::Table": "TableName",
            "AWS::SSM::Document": "Name",
            "AWS::AutoScaling::AutoScalingGroup": "AutoScalingGroupName",
            "AWS::Lambda::Function": "FunctionName",
            "AWS::IAM::Role": "RoleName",
        }
        if kind in named:
            return str(self.resolve(props.get(named[kind], name)))
        if kind == "AWS::SecretsManager::Secret":
            return self.arn("secretsmanager", f"secret:{self._secret_name(name)}-AbCdEf")
        if kind == "AWS::KMS::Key":
            return hashlib.sha256(name.encode()).hexdigest()[:32]
        if kind == "AWS::SNS::Topic":
            return self.arn("sns", name)
        if kind == "AWS::SQS::Queue":
            return f"https://sqs.{REGION}.amazonaws.com/{ACCOUNT}/{props.get('QueueName', name)}"
        if kind == "AWS::Logs::LogGroup":
            return str(self.resolve(props.get("LogGroupName", name)))
        return name

    def _secret_name(self, logical: str) -> str:
        props = self.resources[logical].get("Properties", {})
        return str(self.resolve(props["Name"])) if "Name" in props else logical

    def get_att(self, name: str, attribute: str) -> str:
        resource = self.resources[name]
        kind, props = resource["Type"], resource.get("Properties", {})
        if attribute != "Arn":
            return f"{self.ref(name)}.{attribute}"
        if kind == "AWS::IAM::Role":
            return f"arn:{PARTITION}:iam::{ACCOUNT}:role/{self.ref(name)}"
        if kind == "AWS::DynamoDB::Table":
            return self.arn("dynamodb", f"table/{self.ref(name)}")
        if kind == "AWS::KMS::Key":
            return self.arn("kms", f"key/{self.ref(name)}")
        if kind == "AWS::SQS::Queue":
            return self.arn("sqs", str(self.resolve(props.get("QueueName", name))))
        if kind == "AWS::Logs::LogGroup":
            return self.arn("logs", f"log-group:{self.ref(name)}:*")
        if kind == "AWS::Lambda::Function":
            return self.arn("lambda", f"function:{self.ref(name)}")
        if kind == "AWS::Events::Rule":
            return self.arn("events", f"rule/{name}")
        if kind == "AWS::SNS::Topic":
            return self.ref(name)
        raise UnsupportedPolicy(f"GetAtt {kind}.Arn")

    def resolve(self, value: Any) -> Any:
        if isinstance(value, list):
            return [self.resolve(v) for v in value]
        if not isinstance(value, Mapping):
            return value
        if len(value) != 1:
            return {k: self.resolve(v) for k, v in value.items()}
        ((fn, arg),) = value.items()
        if fn == "Ref":
            return self.ref(arg)
        if fn == "Fn::GetAtt":
            name, attribute = arg if isinstance(arg, list) else arg.split(".", 1)
            return self.get_att(name, attribute)
        if fn == "Fn::Join":
            separator, parts = arg
            return separator.join(str(self.resolve(p)) for p in parts)
        if fn == "Fn::Select":
            index, items = arg
            return self.resolve(items)[int(index)]
        if fn == "Fn::Split":
            separator, text = arg
            return str(self.resolve(text)).split(separator)
        if fn == "Fn::Sub":
            text, variables = (arg, {}) if isinstance(arg, str) else arg

            def sub(match: re.Match[str]) -> str:
                name = match.group(1)
                if name in variables:
                    return str(self.resolve(variables[name]))
                if "." in name:
                    return self.get_att(*name.split(".", 1))
                return self.ref(name)

            return re.sub(r"\$\{([^}!]+)\}", sub, text)
        return {fn: self.resolve(arg)}


def role_statements(template: Mapping[str, Any], role: str) -> list[dict[str, Any]]:
    """Every identity-policy statement of the role (logical ID), tokens resolved: its inline
    policies and the AWS::IAM::Policy resources attached to it. A managed policy ARN is an
    error here: its text is not in the template (the stack's roles have none)."""
    resolver = Resolver(template)
    resources = template["Resources"]
    props = resources[role].get("Properties", {})
    if props.get("ManagedPolicyArns"):
        raise UnsupportedPolicy(f"{role} has managed policies {props['ManagedPolicyArns']}")
    statements: list[dict[str, Any]] = []
    for policy in props.get("Policies", []):
        statements += policy["PolicyDocument"]["Statement"]
    for resource in resources.values():
        if resource["Type"] != "AWS::IAM::Policy":
            continue
        roles = resource["Properties"].get("Roles", [])
        if {"Ref": role} in roles:
            statements += resource["Properties"]["PolicyDocument"]["Statement"]
    return [resolver.resolve(s) for s in statements]


def resource_policy_statements(
    template: Mapping[str, Any], policy_type: str, target_property: str, target: str
) -> list[dict[str, Any]]:
    """The statements of resource policies of ``policy_type`` whose ``target_property`` refers
    to the logical ID ``target`` (e.g. AWS::SecretsManager::ResourcePolicy, SecretId)."""
    resolver = Resolver(template)
    statements: list[dict[str, Any]] = []
    for resource in template["Resources"].values():
        if resource["Type"] != policy_type:
            continue
        if resource["Properties"].get(target_property) == {"Ref": target}:
            document = resource["Properties"]["ResourcePolicy"]
            statements += document["Statement"]
    return [resolver.resolve(s) for s in statements]


def logical_ids(template: Mapping[str, Any], type_: str, contains: str = "") -> list[str]:
    return sorted(
        k for k, v in template["Resources"].items() if v["Type"] == type_ and contains in k
    )


def fnmatch_any(patterns: Iterable[str], value: str) -> bool:
    return any(fnmatch.fnmatchcase(value, p) for p in patterns)
