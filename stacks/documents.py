"""Documents: one ``AWS::SSM::Document`` per ``ssm_documents/*.yaml``, loaded from the file.

The deployed documents are the tested ones: the content is the YAML file, parsed, never
rewritten. It is deployed as JSON: SSM refuses a document over 64 KB, and JSON is the smaller and
the predictable serialization of the same content (the YAML file's indentation of embedded code
alone is kilobytes). Synthesis fails on a document over 48 KB as deployed, rather than the
deploy failing at 64 KB: the headroom is for the next change (issue 11), and a document that
grows past it is split (the health agent has its own, InstallHealthAgent).

A parameter value the stack itself passes (the State Manager association's, the healer's) is
checked at synthesis against the document's declared parameters and ``allowedPattern``s.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from aws_cdk import ArnFormat, Stack, Token
from aws_cdk import aws_ssm as ssm
from constructs import Construct

from tunnelnat.core.config import ConfigError

# SSM's limit on a document's content (CreateDocument/UpdateDocument: MaxDocumentSizeExceeded).
SSM_DOCUMENT_LIMIT_BYTES = 64 * 1024
# Ours, for every document as deployed: a quarter of SSM's limit kept free.
MAX_DOCUMENT_BYTES = 48 * 1024
# Documents only an operator sends (``tunnelnat switchover``): deployed like the others, never in
# a role's SendCommand statement (``arns``): no Lambda of the stack moves G on its own.
OPERATOR_ONLY = frozenset({"Switchover"})


class DocumentError(ConfigError):
    """A document is missing, unreadable, or does not accept the parameters the stack passes."""


class Documents(Construct):
    def __init__(
        self, scope: Construct, construct_id: str, *, directory: Path, prefix: str
    ) -> None:
        super().__init__(scope, construct_id)
        self.directory = directory
        self.prefix = prefix
        self.contents: dict[str, dict[str, Any]] = {}
        self.resources: dict[str, ssm.CfnDocument] = {}
        self.sizes: dict[str, int] = {}
        paths = sorted(directory.glob("*.yaml"))
        if not paths:
            raise DocumentError(f"no SSM documents (*.yaml) in {directory}")
        for path in paths:
            content = load_document(path)
            self.contents[path.stem] = content
            self.sizes[path.stem] = deployed_size(content)
            if self.sizes[path.stem] > MAX_DOCUMENT_BYTES:
                raise DocumentError(
                    f"{path.name}: {self.sizes[path.stem]} bytes as deployed, over tunnelnat's "
                    f"{MAX_DOCUMENT_BYTES}-byte limit (SSM's is {SSM_DOCUMENT_LIMIT_BYTES}): "
                    "move a part into a document of its own"
                )
            self.resources[path.stem] = ssm.CfnDocument(
                self,
                path.stem,
                name=f"{prefix}{path.stem}",
                document_type="Command",
                document_format="JSON",
                content=content,
                # A fixed name cannot be replaced in place; a new version can.
                update_method="NewVersion",
            )

    @property
    def stems(self) -> list[str]:
        return list(self.resources)

    def name(self, stem: str) -> str:
        self.require(stem)
        return f"{self.prefix}{stem}"

    def require(self, stem: str) -> ssm.CfnDocument:
        if stem not in self.resources:
            raise DocumentError(f"{self.directory}/{stem}.yaml is missing")
        return self.resources[stem]

    def arns(self) -> list[str]:
        """The ARNs of exactly these documents (for IAM), built from their fixed names; not the
        operator's own (OPERATOR_ONLY)."""
        stack = Stack.of(self)
        return [
            stack.format_arn(
                service="ssm",
                resource="document",
                resource_name=f"{self.prefix}{stem}",
                arn_format=ArnFormat.SLASH_RESOURCE_NAME,
            )
            for stem in self.resources
            if stem not in OPERATOR_ONLY
        ]

    def check_parameters(self, stem: str, values: Mapping[str, str]) -> dict[str, list[str]]:
        """``values`` as the document accepts them, or DocumentError naming what does not fit.

        Unresolved tokens (a table name, an Elastic IP) are only known at deploy time; every
        literal value must match the parameter's allowedPattern as SSM will match it.
        """
        self.require(stem)
        declared: dict[str, Any] = self.contents[stem].get("parameters") or {}
        unknown = sorted(set(values) - set(declared))
        if unknown:
            raise DocumentError(f"{stem} declares no parameter(s) {', '.join(unknown)}")
        missing = sorted(k for k, p in declared.items() if "default" not in p and k not in values)
        if missing:
            raise DocumentError(f"{stem} needs parameter(s) {', '.join(missing)}")
        for key, value in values.items():
            pattern = declared[key].get("allowedPattern")
            if pattern and not Token.is_unresolved(value) and not re.search(pattern, value):
                raise DocumentError(
                    f"{stem} parameter {key}={value!r} does not match its allowedPattern {pattern}"
                )
        return {k: [v] for k, v in values.items()}

    def declares(self, stem: str, parameter: str) -> bool:
        return parameter in (self.contents.get(stem, {}).get("parameters") or {})


def deployed_size(content: Mapping[str, Any]) -> int:
    """Bytes of the content as the stack deploys it (JSON, with the usual separators)."""
    return len(json.dumps(content).encode())


def load_document(path: Path) -> dict[str, Any]:
    try:
        content = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise DocumentError(f"{path}: cannot load: {exc}") from None
    if not isinstance(content, dict) or content.get("schemaVersion") != "2.2":
        raise DocumentError(f"{path}: not a schemaVersion 2.2 Command document")
    return content
