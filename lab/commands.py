"""The lab's command port: the controller's commands run as the real documents in namespaces.

Where SSM Run Command would deliver a document to an instance's agent, ``LabCommands`` runs the
same YAML through the document runner inside the instance's network namespace (and its private
/etc). The gateway's runs get the environment that reaches moto. Every run is recorded, so the
demo and the tests can show what the controller asked for.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from lab.constants import mount_ns_path
from lab.ssm_runner import REPO, InvalidParameters, Invocation, run_document
from tunnelnat.adapters.commands import DOCUMENTS, CommandError, CommandResult

DOCUMENT_DIR = REPO / "ssm_documents"


@dataclass(frozen=True)
class Run:
    instance_id: str
    document: str
    parameters: dict[str, str]
    status: str
    seconds: float


# Documents only a State Manager association (or ConfigureTunnel's PskRollout rule) runs, no
# Lambda: the lab runs them on the gateway as the association would (Lab.configure_gateway).
ASSOCIATED_ONLY = ("InstallHealthAgent", "ConfigureTunnel", "InstallGatewaySoftware")
# Documents only an operator sends (``tunnelnat switchover`` sends Switchover to the active).
OPERATOR_ONLY = ("Switchover",)


@dataclass
class LabCommands:
    """``CommandPort`` for the lab: instance id -> namespace, document name -> its YAML."""

    namespaces: dict[str, str]  # instance id -> network namespace
    gateway_id: str
    gateway_env: dict[str, str]
    timeout: float = 120.0
    history: list[Run] = field(default_factory=list)
    # Every (instance id, document) the controller asked for, run or not: an instance without
    # an agent (the private subnet's) must never be asked.
    asked: list[tuple[str, str]] = field(default_factory=list)
    parallel: int = 16  # instances a multi-instance command runs on at once (SSM: 50 per call)
    # The pair's standby (issue 15): a gateway too, its runs reach moto like the first's.
    other_gateways: set[str] = field(default_factory=set)
    # A gateway's own environment (its access key id: the strict fakes tell callers apart by
    # it), where it differs from ``gateway_env``.
    gateway_envs: dict[str, dict[str, str]] = field(default_factory=dict)
    # The gateway software every document is bound to (lab.package.LabPackage.binding), as
    # synthesis binds the deployed documents; a document left unbound is refused.
    binding: dict[str, str] | None = None

    def document_path(self, document: str) -> Path:
        if document not in (*DOCUMENTS, *ASSOCIATED_ONLY, *OPERATOR_ONLY):
            raise ValueError(f"unknown document {document!r}")
        return DOCUMENT_DIR / f"{document}.yaml"

    def run_many(
        self, instance_ids: Sequence[str], document: str, parameters: Mapping[str, str]
    ) -> dict[str, CommandResult | CommandError]:
        """One command for many instances, as SendCommand with several InstanceIds: every
        instance's agent runs it at the same time. The controller uses this when a port has it
        (as SsmCommands does), so the lab drives the controller's production path."""
        ids = list(dict.fromkeys(instance_ids))

        def one(instance_id: str) -> CommandResult | CommandError:
            try:
                return self.run(instance_id, document, parameters)
            except CommandError as exc:
                return exc

        if len(ids) <= 1:
            return {i: one(i) for i in ids}
        with ThreadPoolExecutor(max_workers=min(len(ids), self.parallel)) as pool:
            return dict(zip(ids, pool.map(one, ids), strict=True))

    def run(self, instance_id: str, document: str, parameters: Mapping[str, str]) -> CommandResult:
        self.asked.append((instance_id, document))
        path = self.document_path(document)
        ns = self.namespaces.get(instance_id)
        if ns is None:
            # What SSM says for an instance without a registered agent.
            raise CommandError(
                f"{instance_id}: no lab machine (InvalidInstanceId)", retryable=False
            )
        gateway = instance_id == self.gateway_id or instance_id in self.other_gateways
        env = self.gateway_envs.get(instance_id, self.gateway_env) if gateway else {}
        started = time.monotonic()
        try:
            inv = run_document(
                path,
                parameters,
                netns=ns,
                mount_ns=mount_ns_path(ns),
                env=env,
                timeout=self.timeout,
                binding=self.binding,
            )
        except InvalidParameters as exc:
            # SendCommand refuses these before anything runs; so does the lab.
            raise CommandError(f"{document}: {exc}", retryable=False) from exc
        self.history.append(
            Run(instance_id, document, dict(parameters), inv.status, time.monotonic() - started)
        )
        return to_result(instance_id, document, inv)


def to_result(instance_id: str, document: str, inv: Invocation) -> CommandResult:
    return CommandResult(
        instance_id=instance_id,
        document=document,
        status=inv.status,
        stdout=inv.stdout,
        stderr=inv.stderr,
    )
