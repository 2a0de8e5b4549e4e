"""The least-privilege table of docs/security.md, printed from a synthesized template.

    .venv/bin/python -m tools.iam_table cdk.out/tunnelnat.template.json

prints one Markdown row per policy statement of each role of the stack (and each resource policy
of its secrets): principal, effect, actions, resources, condition, as the template says them, with
CloudFormation's functions written readably (``Ref``/``GetAtt`` as ``<LogicalId>``, pseudo
parameters as ``${AWS::Region}``). tests/infra/test_security_doc.py keeps docs/security.md's
table equal to this output for the documented example deployment.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# The stack's roles, by the construct path their logical IDs start with.
PRINCIPALS = (
    ("Controller", "controller"),
    ("Healer", "healer"),
    ("Gateway", "gateway"),
    ("PskRollout", "psk rollout"),
)
BEGIN = "<!-- BEGIN least-privilege table: tools/iam_table.py -->"
END = "<!-- END least-privilege table -->"


def _short(logical: str) -> str:
    # CDK's logical IDs end in an 8-hex-digit hash; the readable part is what comes before it.
    return re.sub(r"[0-9A-F]{8}$", "", logical)


def render(value: Any) -> str:
    """A template value as one readable string."""
    if isinstance(value, str):
        # An asset's object key is its content's SHA-256: it changes with every edit of the file.
        return re.sub(r"\b[0-9a-f]{64}\b", "<asset sha256>", value)
    if isinstance(value, list):
        return ", ".join(render(v) for v in value)
    if isinstance(value, Mapping) and len(value) == 1:
        ((fn, arg),) = value.items()
        if fn == "Ref":
            return "${" + arg + "}" if arg.startswith("AWS::") else f"<{_short(arg)}>"
        if fn == "Fn::GetAtt":
            name, attribute = arg
            return f"<{_short(name)}.{attribute}>"
        if fn == "Fn::Join":
            separator, parts = arg
            return separator.join(render(p) for p in parts)
        if fn == "Fn::Select":
            index, items = arg
            return f"select({index}, {render(items)})"
        if fn == "Fn::Split":
            separator, text = arg
            return f"split('{separator}', {render(text)})"
        if fn == "Fn::Sub":
            return render(arg if isinstance(arg, str) else arg[0])
    return json.dumps(value, sort_keys=True)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _condition(condition: Mapping[str, Any] | None) -> str:
    if not condition:
        return ""
    parts = []
    for operator, keys in sorted(condition.items()):
        for key, expected in sorted(keys.items()):
            values = expected if isinstance(expected, list) else [expected]
            parts.append(f"{operator} `{key}` = {', '.join(f'`{render(v)}`' for v in values)}")
    return "; ".join(parts)


def _row(principal: str, statement: Mapping[str, Any]) -> str:
    actions = statement.get("Action", statement.get("NotAction"))
    actions = actions if isinstance(actions, list) else [actions]
    resources = statement.get("Resource", statement.get("NotResource"))
    resources = resources if isinstance(resources, list) else [resources]
    who = principal
    if "Principal" in statement:
        who += f" (for {render(statement['Principal'].get('AWS', statement['Principal']))})"
    cells = [
        who,
        statement.get("Sid", "") or "",
        statement["Effect"],
        "<br>".join(f"`{a}`" for a in actions),
        "<br>".join(f"`{render(r)}`" for r in resources),
        _condition(statement.get("Condition")),
    ]
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def table(template: Mapping[str, Any]) -> str:
    """The Markdown table: every statement of the stack's roles, then of its secrets' policies."""
    resources = template["Resources"]
    lines = [
        "| principal | statement | effect | actions | resources | condition |",
        "|---|---|---|---|---|---|",
    ]
    for prefix, name in PRINCIPALS:
        roles = sorted(
            k
            for k, v in resources.items()
            if v["Type"] == "AWS::IAM::Role" and re.fullmatch(rf"{prefix}Role[0-9A-F]{{8}}", k)
        )
        for role in roles:
            props = resources[role]["Properties"]
            for arn in props.get("ManagedPolicyArns", []):
                lines.append(f"| {name} | managed policy | Allow | {render(arn)} | | |")
            statements = [
                s for p in props.get("Policies", []) for s in p["PolicyDocument"]["Statement"]
            ]
            for resource in resources.values():
                if resource["Type"] == "AWS::IAM::Policy" and {"Ref": role} in resource[
                    "Properties"
                ].get("Roles", []):
                    statements += resource["Properties"]["PolicyDocument"]["Statement"]
            lines += [_row(name, s) for s in statements]
    for _logical, resource in sorted(resources.items()):
        if resource["Type"] != "AWS::SecretsManager::ResourcePolicy":
            continue
        secret = render(resource["Properties"]["SecretId"])
        for statement in resource["Properties"]["ResourcePolicy"]["Statement"]:
            lines.append(_row(f"secret {secret}", statement))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("template", type=Path, help="a synthesized template (cdk.out/*.json)")
    args = parser.parse_args(argv)
    print(table(json.loads(args.template.read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
