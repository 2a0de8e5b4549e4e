"""The command port: run one of the project's SSM documents on one instance and report the result.

Two adapters implement it: ``SsmCommands`` here (SSM Run Command) and the lab's, which runs the
same document's script inside the instance's network namespace. The controller only sees the port.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from botocore.exceptions import ClientError

DOCUMENTS = ("AddHostRoute", "RemoveHostRoute", "SyncNatTable", "ConfigureGateway", "RestartTunnel")


@dataclass(frozen=True)
class CommandResult:
    instance_id: str
    document: str
    status: str  # SSM's invocation status: Success, Failed, TimedOut, Cancelled, ...
    stdout: str = ""
    stderr: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "Success"


class CommandError(RuntimeError):
    """A command could not be run or did not succeed; ``retryable`` says whether to try again."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class AgentNotReady(CommandError):
    """The instance's SSM agent is not registered (yet): retry later, through the queue."""


class CommandPort(Protocol):
    def run(self, instance_id: str, document: str, parameters: Mapping[str, str]) -> CommandResult:
        """Run ``document`` (a name from DOCUMENTS) on the instance and wait for the result."""
        ...


class SsmCommands:
    """SSM Run Command: SendCommand, then poll GetCommandInvocation until the command ends."""

    TERMINAL = {
        "Success",
        "Failed",
        "TimedOut",
        "Cancelled",
        "Cancelling",
        "Undeliverable",
        "Terminated",
        "InvalidPlatform",
        "AccessDenied",
        "DeliveryTimedOut",
        "ExecutionTimedOut",
    }

    def __init__(
        self,
        ssm_client: Any,
        *,
        document_prefix: str = "tunnelnat-",
        timeout_seconds: float = 120.0,
        poll_seconds: float = 1.0,
        sleep: Any = time.sleep,
    ) -> None:
        self._ssm = ssm_client
        self._prefix = document_prefix
        self._timeout = timeout_seconds
        self._poll = poll_seconds
        self._sleep = sleep

    def document_name(self, document: str) -> str:
        if document not in DOCUMENTS:
            raise ValueError(f"unknown document {document!r}")
        return f"{self._prefix}{document}"

    def run(self, instance_id: str, document: str, parameters: Mapping[str, str]) -> CommandResult:
        try:
            sent = self._ssm.send_command(
                InstanceIds=[instance_id],
                DocumentName=self.document_name(document),
                Parameters={k: [v] for k, v in parameters.items()},
                TimeoutSeconds=max(30, int(self._timeout)),
                Comment=f"tunnelnat {document}",
            )
        except ClientError as exc:
            code = exc.response["Error"]["Code"]
            if code == "InvalidInstanceId":
                # Ambiguous by design of the API: not registered yet, or gone. The caller has
                # already observed the instance, so treat it as "not ready" and retry.
                raise AgentNotReady(f"{instance_id}: SSM agent not registered") from exc
            raise CommandError(f"{instance_id}: SendCommand {document} failed: {code}") from exc
        command_id = sent["Command"]["CommandId"]
        waited = 0.0
        while True:
            try:
                inv = self._ssm.get_command_invocation(CommandId=command_id, InstanceId=instance_id)
            except ClientError as exc:
                # Right after SendCommand the invocation may not exist yet.
                if exc.response["Error"]["Code"] != "InvocationDoesNotExist":
                    raise
                inv = {"Status": "Pending"}
            status = inv.get("Status", "Pending")
            if status in self.TERMINAL:
                return CommandResult(
                    instance_id=instance_id,
                    document=document,
                    status=status,
                    stdout=inv.get("StandardOutputContent", ""),
                    stderr=inv.get("StandardErrorContent", ""),
                )
            if waited >= self._timeout:
                raise CommandError(f"{instance_id}: {document} still {status} after {waited:.0f}s")
            self._sleep(self._poll)
            waited += self._poll
