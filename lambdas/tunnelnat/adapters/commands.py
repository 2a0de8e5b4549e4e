"""The command port: run one of the project's SSM documents on one instance and report the result.

Two adapters implement it: ``SsmCommands`` here (SSM Run Command) and the lab's, which runs the
same document's script inside the instance's network namespace. The controller only sees the port.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from botocore.exceptions import ClientError

from tunnelnat.core.text import printable

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


def raise_for_status(result: CommandResult) -> CommandResult:
    """The result when it succeeded; else AgentNotReady (never delivered: retry later) or
    CommandError, naming the instance, the document and the end of its output."""
    if result.ok:
        return result
    # What the instance wrote, without the escape sequences a root process there could aim at
    # an operator's terminal or a page (issue 21, finding 7).
    detail = printable((result.stderr or result.stdout).strip())[-300:]
    where = f"{result.instance_id}: {result.document} {result.status}: {detail}"
    if result.status in ("Undeliverable", "DeliveryTimedOut"):
        raise AgentNotReady(where)
    raise CommandError(where)


SEND_MAX = 50  # SendCommand's limit on InstanceIds


class CommandPort(Protocol):
    def run(self, instance_id: str, document: str, parameters: Mapping[str, str]) -> CommandResult:
        """Run ``document`` (a name from DOCUMENTS) on the instance and wait for the result."""
        ...


class BatchCommandPort(CommandPort, Protocol):
    """Optional: one command for many instances (the controller uses it when a port has it)."""

    def run_many(
        self, instance_ids: Sequence[str], document: str, parameters: Mapping[str, str]
    ) -> dict[str, CommandResult | CommandError]:
        """Run ``document`` on every instance with the same parameters; each instance's result,
        or the CommandError (AgentNotReady) that stopped it there."""
        ...


def run_many(
    port: CommandPort,
    instance_ids: Sequence[str],
    document: str,
    parameters: Mapping[str, str],
) -> dict[str, CommandResult | CommandError]:
    """``port.run_many`` when the port has it, else one ``run`` per instance (the lab's and the
    tests' ports run documents one instance at a time)."""
    many = getattr(port, "run_many", None)
    if many is not None:
        return many(instance_ids, document, parameters)
    results: dict[str, CommandResult | CommandError] = {}
    for instance_id in instance_ids:
        try:
            results[instance_id] = port.run(instance_id, document, parameters)
        except CommandError as exc:
            results[instance_id] = exc
    return results


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
        first_poll_seconds: float | None = None,
        sleep: Any = time.sleep,
    ) -> None:
        self._ssm = ssm_client
        self._prefix = document_prefix
        self._timeout = timeout_seconds
        self._poll = poll_seconds
        # Before the first look: a command is not delivered, let alone done, the moment
        # SendCommand returns (GetCommandInvocation then answers InvocationDoesNotExist or
        # Pending), so asking at once is a call that never has the answer.
        self._first_poll = poll_seconds if first_poll_seconds is None else first_poll_seconds
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
        self._sleep(self._first_poll)
        waited = self._first_poll
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

    def run_many(
        self, instance_ids: Sequence[str], document: str, parameters: Mapping[str, str]
    ) -> dict[str, CommandResult | CommandError]:
        """One SendCommand per 50 instances, polled with ListCommands (one call per poll for
        all of them); per-instance detail is fetched only when not every invocation succeeded.
        An unregistered agent fails a whole multi-instance SendCommand, so that chunk falls back
        to one command per instance, each with its own answer."""
        results: dict[str, CommandResult | CommandError] = {}
        ids = list(dict.fromkeys(instance_ids))
        if len(ids) == 1:
            try:
                results[ids[0]] = self.run(ids[0], document, parameters)
            except CommandError as exc:
                results[ids[0]] = exc
            return results
        for start in range(0, len(ids), SEND_MAX):
            chunk = ids[start : start + SEND_MAX]
            try:
                sent = self._ssm.send_command(
                    InstanceIds=chunk,
                    DocumentName=self.document_name(document),
                    Parameters={k: [v] for k, v in parameters.items()},
                    TimeoutSeconds=max(30, int(self._timeout)),
                    Comment=f"tunnelnat {document}",
                )
            except ClientError as exc:
                if exc.response["Error"]["Code"] != "InvalidInstanceId":
                    error = CommandError(
                        f"SendCommand {document} failed: {exc.response['Error']['Code']}"
                    )
                    results.update(dict.fromkeys(chunk, error))
                    continue
                for instance_id in chunk:
                    try:
                        results[instance_id] = self.run(instance_id, document, parameters)
                    except CommandError as one:
                        results[instance_id] = one
                continue
            results.update(self._wait_many(sent["Command"]["CommandId"], chunk, document))
        return results

    COMMAND_TERMINAL = {"Success", "Cancelled", "Failed", "TimedOut"}
    # Documents whose output the controller reads (SyncNatTable's report): each invocation's
    # output is fetched even when the command as a whole succeeded.
    REPORTING = frozenset({"SyncNatTable"})

    def _wait_many(
        self, command_id: str, instance_ids: list[str], document: str
    ) -> dict[str, CommandResult | CommandError]:
        self._sleep(self._first_poll)
        waited = self._first_poll
        while True:
            reply = self._ssm.list_commands(CommandId=command_id)
            [command] = reply.get("Commands") or [{"Status": "Pending"}]
            status = command.get("Status", "Pending")
            if status == "Success" and document not in self.REPORTING:
                # Every invocation succeeded: AddHostRoute/RemoveHostRoute need no output.
                return {i: CommandResult(i, document, "Success") for i in instance_ids}
            if status in self.COMMAND_TERMINAL:
                return self._invocations(command_id, instance_ids, document)
            if waited >= self._timeout:
                error = CommandError(f"{document} still {status} after {waited:.0f}s")
                return dict.fromkeys(instance_ids, error)
            self._sleep(self._poll)
            waited += self._poll

    def _invocations(
        self, command_id: str, instance_ids: list[str], document: str
    ) -> dict[str, CommandResult | CommandError]:
        """Each instance's own status, once the command as a whole did not succeed."""
        results: dict[str, CommandResult | CommandError] = {}
        for instance_id in instance_ids:
            try:
                inv = self._ssm.get_command_invocation(CommandId=command_id, InstanceId=instance_id)
            except ClientError as exc:
                results[instance_id] = CommandError(
                    f"{instance_id}: {document}: {exc.response['Error']['Code']}"
                )
                continue
            results[instance_id] = CommandResult(
                instance_id=instance_id,
                document=document,
                status=inv.get("Status", "Failed"),
                stdout=inv.get("StandardOutputContent", ""),
                stderr=inv.get("StandardErrorContent", ""),
            )
        return results
