"""Documents: one ``AWS::SSM::Document`` per ``ssm_documents/*.yaml``, loaded from the file.

The deployed documents are the tested ones: the content is the YAML file, parsed, never
rewritten. It is deployed as JSON: SSM refuses a document over 64 KB, and JSON is the smaller and
the predictable serialization of the same content (the YAML file's indentation of embedded code
alone is kilobytes). Synthesis fails on a document over 48 KB as deployed, rather than the
deploy failing at 64 KB: the headroom is for the next change (issue 11), and a document that
grows past it is split (the health agent has its own, InstallHealthAgent).

Gateway documents (those that embed gateway/package_check.sh, and InstallGatewaySoftware) run the
gateway software's package: their placeholders are bound at synthesis to the package the stack
ships (``GatewaySoftware.bind``: its SHA-256, the asset's bucket and key, the region), and
synthesis fails on a placeholder left unbound. A gateway document is a short invocation of one
verb of the package, at most 8 KB as deployed (measured with the longest bucket, key and region
the tokens can become); the instance documents (AddHostRoute, RemoveHostRoute: instances are not
ours to install a package on) keep the 48 KB limit.

A parameter value the stack itself passes (the State Manager association's, the healer's) is
checked at synthesis against the document's declared parameters and ``allowedPattern``s.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from aws_cdk import ArnFormat, Stack, Token
from aws_cdk import aws_ssm as ssm
from constructs import Construct

from tools import gateway_package
from tunnelnat.core.config import ConfigError

if TYPE_CHECKING:
    from stacks.gateway_software import GatewaySoftware

# SSM's limit on a document's content (CreateDocument/UpdateDocument: MaxDocumentSizeExceeded).
SSM_DOCUMENT_LIMIT_BYTES = 64 * 1024
# Ours, for every document as deployed: a quarter of SSM's limit kept free.
MAX_DOCUMENT_BYTES = 48 * 1024
# A gateway document's: the invocation of a verb of the package, its logic in the package (issue
# 22). Room for the preamble and the installer it embeds, and for the document's own parameters.
MAX_GATEWAY_DOCUMENT_BYTES = 8 * 1024
# What marks a gateway document: it embeds the package check (tools/build_documents.py).
PACKAGE_CHECK_EMBED = "# >>> embed gateway/package_check.sh"
INSTALL_DOCUMENT = "InstallGatewaySoftware"
# The documents instances run (not gateways): no package there.
INSTANCE_DOCUMENTS = frozenset({"AddHostRoute", "RemoveHostRoute"})
# Documents only an operator sends (``tunnelnat switchover``): deployed like the others, never in
# a role's SendCommand statement (``arns``): no Lambda of the stack moves G on its own.
OPERATOR_ONLY = frozenset({"Switchover"})


class DocumentError(ConfigError):
    """A document is missing, unreadable, or does not accept the parameters the stack passes."""


class Documents(Construct):
    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        directory: Path,
        prefix: str,
        software: GatewaySoftware | None = None,
    ) -> None:
        super().__init__(scope, construct_id)
        self.directory = directory
        self.prefix = prefix
        self.contents: dict[str, dict[str, Any]] = {}
        self.resources: dict[str, ssm.CfnDocument] = {}
        self.sizes: dict[str, int] = {}
        self.gateway_documents: set[str] = set()
        paths = sorted(directory.glob("*.yaml"))
        if not paths:
            raise DocumentError(f"no SSM documents (*.yaml) in {directory}")
        for path in paths:
            content = load_document(path)
            if PACKAGE_CHECK_EMBED in json.dumps(content) or path.stem == INSTALL_DOCUMENT:
                self.gateway_documents.add(path.stem)
            self.contents[path.stem] = content
            measured = content
            if software is not None:
                measured = software.bind_longest(content)
                content = software.bind(content)
            if not gateway_package.is_bound(content):
                raise DocumentError(
                    f"{path.name}: a gateway software placeholder is left unbound "
                    f"({', '.join(gateway_package.PLACEHOLDERS.values())}): the stack binds "
                    "them to the package it ships"
                )
            self.sizes[path.stem] = deployed_size(measured)
            limit = self.limit(path.stem)
            if self.sizes[path.stem] > limit:
                raise DocumentError(
                    f"{path.name}: {self.sizes[path.stem]} bytes as deployed, over tunnelnat's "
                    f"{limit}-byte limit (SSM's is {SSM_DOCUMENT_LIMIT_BYTES}): "
                    + (
                        "move its logic into the gateway package's verb"
                        if path.stem in self.gateway_documents
                        else "move a part into a document of its own"
                    )
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

    def limit(self, stem: str) -> int:
        """The most bytes ``stem`` may take as deployed."""
        if stem in self.gateway_documents:
            return MAX_GATEWAY_DOCUMENT_BYTES
        return MAX_DOCUMENT_BYTES

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

    def accepts(self, stem: str, parameter: str, value: str) -> bool:
        """Whether ``stem`` declares ``parameter`` and its allowedPattern (if any) takes
        ``value``."""
        declared = (self.contents.get(stem, {}).get("parameters") or {}).get(parameter)
        if declared is None:
            return False
        pattern = declared.get("allowedPattern")
        return not pattern or re.search(pattern, value) is not None

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
