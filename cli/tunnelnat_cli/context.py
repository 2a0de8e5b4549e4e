"""What every subcommand gets: parsed options, AWS clients, the table, and the runtime's seams."""

from __future__ import annotations

import argparse
import getpass
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TextIO

from tunnelnat.core.text import printable
from tunnelnat_cli.aws import Aws
from tunnelnat_cli.table import TableReader


class Printable:
    """A text stream that passes on only what a terminal shows (issue 21, 7).

    Much of what the CLI prints was written by an instance or a gateway: command output
    (StandardErrorContent), status reasons, DLQ records, charon's diagnosis, the pair agent's
    switchover detail. Any of it may carry ANSI/ECMA-48 escape sequences or other controls that
    would rewrite the operator's screen or title bar; ``printable`` strips them at the one place
    every subcommand writes through (tables, lines, JSON alike: JSON escapes its own controls).
    ``raw`` is the stream itself, for the one control the CLI sends on purpose: ``Progress``'s
    carriage return on a terminal.
    """

    def __init__(self, raw: TextIO) -> None:
        self.raw = raw

    def write(self, text: str) -> int:
        return self.raw.write(printable(text))

    def flush(self) -> None:
        self.raw.flush()

    def isatty(self) -> bool:
        return bool(getattr(self.raw, "isatty", lambda: False)())

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)


@dataclass(frozen=True)
class Change:
    """What a command just asked for, handed to ``Runtime.after_change``."""

    action: str  # enroll | unenroll | reconcile | psk
    instance_ids: tuple[str, ...]
    message: dict | None = None  # reconcile: the event sent; psk: secret, version_id, changed_at
    queue_url: str | None = None


@dataclass
class Runtime:
    """Seams for tests and embedding; production uses the defaults.

    ``after_change`` runs right after the CLI tagged/untagged an instance or sent a reconcile
    request, before ``--wait`` polls: tests run the controller's handler there, the way the
    deployed Lambda would react to the event.
    """

    out: TextIO = field(default_factory=lambda: sys.stdout)
    err: TextIO = field(default_factory=lambda: sys.stderr)
    stdin: TextIO = field(default_factory=lambda: sys.stdin)
    getpass: Callable[[str], str] = getpass.getpass  # prompts on the terminal, never echoes
    clients: Mapping[str, Any] = field(default_factory=dict)
    session: Any = None  # a boto3 Session to reuse instead of a new one per command
    after_change: Callable[[Aws, Change], None] | None = None
    # A command port (adapters/commands.py) for documents the CLI runs itself (ShowTunnels):
    # None is SSM Run Command; tests and the lab run the real document in place.
    commands: Any = None
    sleep: Callable[[float], None] = time.sleep
    monotonic: Callable[[], float] = time.monotonic
    now: Callable[[], float] = time.time


@dataclass
class Ctx:
    args: argparse.Namespace
    aws: Aws
    runtime: Runtime

    @property
    def out(self) -> TextIO:
        return Printable(self.runtime.out)  # type: ignore[return-value] - a TextIO's write

    @property
    def err(self) -> TextIO:
        return Printable(self.runtime.err)  # type: ignore[return-value] - a TextIO's write

    @property
    def deployment(self) -> str:
        return self.args.deployment

    @property
    def reader(self) -> TableReader:
        return TableReader(self.aws.client("dynamodb"), self.args.table)

    def say(self, text: str) -> None:
        """Human-readable output: stdout normally, stderr when stdout carries JSON."""
        stream = self.err if getattr(self.args, "json", False) else self.out
        stream.write(text + "\n")

    def after_change(self, change: Change) -> None:
        if self.runtime.after_change is not None:
            self.runtime.after_change(self.aws, change)
