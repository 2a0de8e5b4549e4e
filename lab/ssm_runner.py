"""Run an SSM Command document (schemaVersion 2.2, aws:runShellScript) the way SSM would.

The lab and the tests run the YAML that ships, not a copy: this module parses it, validates the
parameters as SSM's SendCommand does (reject, never sanitise), then runs each step the way the SSM
agent's runShellScript plugin does (amazon-ssm-agent, agent/plugins/runscript/runshellscript.go
and runscript.go): the step's runCommand lines, parameters substituted, joined with newlines into
``_script.sh`` (mode 0700) in a per-step orchestration directory, run as ``sh -c <that path>`` with
``sh`` found on the agent's PATH (dash on Debian and Ubuntu: a script without a ``#!/bin/bash``
first line runs under dash), from ``/``, in a process group that is SIGKILLed when the step's
``timeoutSeconds`` (default 3600) runs out, its output truncated as the agent truncates it.
Optionally inside a network namespace. It returns what an invocation reports: status, exit code,
stdout, stderr. docs/parity.md lists where the lab still differs from the agent.

Validation happens before anything runs; a bad parameter raises InvalidParameters, just as
SendCommand raises its InvalidParameters error and never reaches an instance.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tools.gateway_package import bind, is_bound

REPO = Path(__file__).resolve().parent.parent
# The agent substitutes {{ Name }} and {{Name}} (agent/framework/docparser/parameters, Go's \s:
# space, tab, newline, form feed, carriage return); parameter names are letters, digits and _.
REFERENCE = re.compile(r"\{\{[ \t\n\f\r]*([A-Za-z0-9_]+)[ \t\n\f\r]*\}\}")
# Anything else that looks like a reference ({{ ssm:/x }}, {{ a-b }}) is refused: SSM would
# resolve it against Parameter Store or fail, and the lab must not silently leave it in a script.
ANY_REFERENCE = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)
SHELL_ACTION = "aws:runShellScript"
# A step's name becomes a directory name under the orchestration folder.
STEP_NAME = re.compile(r"[A-Za-z0-9_.-]{1,100}")
# The agent's timeoutSeconds rules (agent/plugins/pluginutil/pluginutil.go): missing, unparsable
# or outside 5..172800 means the default, 3600.
DEFAULT_STEP_TIMEOUT = 3600
MIN_STEP_TIMEOUT = 5
MAX_STEP_TIMEOUT = 172800
# What the agent runs (runshellscript.go: ShellCommand "sh", ShellArguments ["-c"], ScriptName
# "_script.sh"); exec.Command finds "sh" on the agent's own PATH, which is systemd's default
# PATH for a service (amazon-ssm-agent.service sets none).
AGENT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SCRIPT_NAME = "_script.sh"
# A step killed at its timeout: SIGKILL to the group, exit code 128 + 9, status TimedOut
# (agent/appconfig/constants_unix.go CommandStoppedPreemptivelyExitCode, pluginutil GetStatus).
TIMED_OUT_EXIT_CODE = 137
# Output limits. The agent cuts each step's stdout and stderr to 24,000 bytes, the last 20 of
# them replaced by "--output truncated--" (runpluginutil.go truncates both streams with
# MaxStdoutLength, pluginutil.StringPrefix; input of exactly 24,000 bytes is cut too).
# GetCommandInvocation documents StandardErrorContent as "the first 8,000 characters": the lab
# applies that stricter limit to stderr on top, so nothing the lab reads could be missing on AWS.
MAX_OUTPUT_BYTES = 24000
TRUNCATED_SUFFIX = "--output truncated--"
MAX_STDERR_CHARACTERS = 8000


class DocumentError(ValueError):
    """The document itself is not one this runner (or SSM) would accept."""


class InvalidParameters(ValueError):
    """A parameter is undeclared, missing, not a string or does not match its allowedPattern."""


@dataclass(frozen=True)
class Invocation:
    status: str  # "Success" | "Failed" | "TimedOut", as GetCommandInvocation reports it
    exit_code: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.status == "Success"


def load_document(path: str | Path) -> dict:
    """Parse and check a Command document; raise DocumentError naming what is wrong."""
    path = Path(path)
    try:
        document = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise DocumentError(f"{path.name}: not valid YAML: {exc}") from None
    check_document(document, name=path.name)
    return document


def check_document(document: Any, *, name: str = "document") -> None:
    """The structural rules load_document enforces, for a document already parsed."""
    if not isinstance(document, dict):
        raise DocumentError(f"{name}: top level must be a mapping")
    # A bare 2.2 in YAML is a float; SSM wants the string, so we do too.
    if document.get("schemaVersion") != "2.2":
        raise DocumentError(
            f"{name}: schemaVersion must be the string '2.2', got {document.get('schemaVersion')!r}"
        )
    params = document.get("parameters") or {}
    if not isinstance(params, dict):
        raise DocumentError(f"{name}: parameters must be a mapping")
    for pname, spec in params.items():
        if not isinstance(pname, str) or not re.fullmatch(r"[A-Za-z0-9_]+", pname):
            raise DocumentError(f"{name}: invalid parameter name {pname!r}")
        if not isinstance(spec, dict):
            raise DocumentError(f"{name}: parameter {pname} must be a mapping")
        if spec.get("type", "String") != "String":
            raise DocumentError(f"{name}: parameter {pname}: only type String is supported")
        pattern = spec.get("allowedPattern")
        # Our rule, stricter than SSM's: an unconstrained parameter is a shell injection waiting.
        if not isinstance(pattern, str) or not pattern:
            raise DocumentError(f"{name}: parameter {pname} has no allowedPattern")
        try:
            compiled = re.compile(pattern)
        except re.error as exc:
            raise DocumentError(f"{name}: parameter {pname}: bad allowedPattern: {exc}") from None
        if "default" in spec:
            default = spec["default"]
            if not isinstance(default, str) or not compiled.fullmatch(default):
                raise DocumentError(
                    f"{name}: parameter {pname}: default {default!r} does not match "
                    f"allowedPattern {pattern}"
                )
    steps = document.get("mainSteps")
    if not isinstance(steps, list) or not steps:
        raise DocumentError(f"{name}: mainSteps must be a non-empty list")
    for index, step in enumerate(steps):
        label = f"{name}: mainSteps[{index}]"
        if not isinstance(step, dict) or step.get("action") != SHELL_ACTION:
            raise DocumentError(f"{label}: action must be {SHELL_ACTION}")
        step_name = step.get("name")
        if not isinstance(step_name, str) or not STEP_NAME.fullmatch(step_name):
            raise DocumentError(f"{label}: name must match {STEP_NAME.pattern}")
        commands = (step.get("inputs") or {}).get("runCommand")
        if not isinstance(commands, list) or not all(isinstance(c, str) for c in commands):
            raise DocumentError(f"{label}: inputs.runCommand must be a list of strings")
        for command in commands:
            for ref in ANY_REFERENCE.findall(command):
                match = REFERENCE.fullmatch("{{" + ref + "}}")
                if not match or match.group(1) not in params:
                    raise DocumentError(
                        f"{label}: references {{{{{ref}}}}}, which is not a declared parameter"
                    )


def bound_document(
    document: dict, binding: Mapping[str, str] | None, *, name: str = "document"
) -> dict:
    """``document`` with the gateway software's placeholders filled from ``binding``; refused
    (DocumentError) when one is left: run unbound, it would install and run nothing, quietly."""
    if binding is not None:
        document = bind(document, **binding)
    if not is_bound(document):
        raise DocumentError(
            f"{name}: not bound to a gateway software package (its __TUNNELNAT_PACKAGE_*__ "
            "placeholders are unfilled: run it with binding=, as tools.gateway_package.bind)"
        )
    return document


def render_scripts(document: dict, parameters: Mapping[str, str]) -> list[str]:
    """One bash script per step with the parameters substituted, after validating every value."""
    declared: dict[str, dict] = document.get("parameters") or {}
    for pname in parameters:
        if pname not in declared:
            raise InvalidParameters(f"parameter {pname!r} is not declared by the document")
    values: dict[str, str] = {}
    for pname, spec in declared.items():
        pattern = spec.get("allowedPattern")
        if not isinstance(pattern, str) or not pattern:
            raise InvalidParameters(f"parameter {pname} has no allowedPattern")
        if pname in parameters:
            value = parameters[pname]
        elif "default" in spec:
            value = spec["default"]
        else:
            raise InvalidParameters(f"parameter {pname} is required and has no default")
        if not isinstance(value, str):
            kind = type(value).__name__
            raise InvalidParameters(f"parameter {pname} must be a string, got {kind}")
        if not re.fullmatch(pattern, value):
            # The value is shown with repr so a newline or control character is visible.
            raise InvalidParameters(
                f"parameter {pname} value {value!r} does not match allowedPattern {pattern}"
            )
        values[pname] = value

    def substitute(command: str) -> str:
        def one(match: re.Match[str]) -> str:
            inner = REFERENCE.fullmatch(match.group(0))
            if not inner or inner.group(1) not in values:
                raise InvalidParameters(
                    f"document references {match.group(0)}, which is not a declared parameter"
                )
            # The agent turns "$$" in a value into "$" (parameters.go ReplaceParameter, kept
            # for users of an old workaround); our patterns refuse "$", but the runner mirrors it.
            return values[inner.group(1)].replace("$$", "$")

        # One pass: a value is never itself searched for references.
        return ANY_REFERENCE.sub(one, command)

    scripts = []
    for step in document.get("mainSteps") or []:
        commands = (step.get("inputs") or {}).get("runCommand") or []
        scripts.append("\n".join(substitute(c) for c in commands) + "\n")
    return scripts


def default_env() -> dict[str, str]:
    """A minimal environment like the SSM agent's, with the repo's venv first for boto3."""
    venv_bin = REPO / ".venv" / "bin"
    return {
        "PATH": f"{venv_bin}:{AGENT_PATH}",
        "HOME": "/root",
        "LANG": "C.UTF-8",
    }


def agent_shell() -> str:
    """The ``sh`` the agent would start: the first on the agent's PATH (here: dash)."""
    found = shutil.which("sh", path=AGENT_PATH)
    if found is None:
        raise RuntimeError(f"no sh on the agent's PATH {AGENT_PATH}")
    return found


def step_timeout(value: object) -> int:
    """A step's ``timeoutSeconds`` as the agent reads it (pluginutil.ValidateExecutionTimeout)."""
    seconds: int
    if isinstance(value, bool) or value is None:
        seconds = DEFAULT_STEP_TIMEOUT
    elif isinstance(value, int):
        seconds = value
    elif isinstance(value, float):
        seconds = int(value)
    elif isinstance(value, str):
        try:
            seconds = int(value, 10)
        except ValueError:
            try:
                seconds = int(float(value))
            except (ValueError, OverflowError):
                seconds = DEFAULT_STEP_TIMEOUT
    else:
        seconds = DEFAULT_STEP_TIMEOUT
    if not MIN_STEP_TIMEOUT <= seconds <= MAX_STEP_TIMEOUT:
        return DEFAULT_STEP_TIMEOUT
    return seconds


def truncate_output(data: bytes) -> str:
    """One step's stream as the agent reports it: at most 24,000 bytes, the suffix marking a cut
    (pluginutil.StringPrefix counts bytes and cuts input of exactly the limit too)."""
    if len(data) < MAX_OUTPUT_BYTES:
        return data.decode("utf-8", errors="replace")
    keep = data[: MAX_OUTPUT_BYTES - len(TRUNCATED_SUFFIX)]
    return keep.decode("utf-8", errors="replace") + TRUNCATED_SUFFIX


def run_document(
    path: str | Path,
    parameters: Mapping[str, str],
    *,
    netns: str | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 120.0,
    mount_ns: str | Path | None = None,
    binding: Mapping[str, str] | None = None,
) -> Invocation:
    """Validate, then run each step in order; stop at the first failing step, like SSM's report.

    ``env`` entries are added to (and override) the minimal default environment. ``timeout``
    bounds the whole document (the lab's own bound); a step's own ``timeoutSeconds`` bounds that
    step. ``mount_ns`` (with ``netns``) is a persistent mount namespace to enter as well: the lab
    gives each machine one with a private /etc, so what a document writes there stays on that
    machine. Each step's stdout and stderr are truncated as the agent truncates them; stderr is
    then held to GetCommandInvocation's 8,000 characters. ``binding`` fills the gateway
    software's placeholders (tools.gateway_package.bind's keywords), as synthesis does; a document
    still carrying one is refused (``bound_document``).
    """
    document = bound_document(load_document(path), binding, name=Path(path).name)
    scripts = render_scripts(document, parameters)  # raises before anything runs
    if mount_ns is not None and netns is None:
        raise ValueError("mount_ns needs netns")
    shell = agent_shell()
    command_id = str(uuid.uuid4())
    full_env = default_env()
    full_env["SSM_COMMAND_ID"] = command_id  # runscript.go sets it for every step
    full_env.update(env or {})
    deadline = time.monotonic() + timeout
    out: list[str] = []
    err: list[str] = []
    exit_code = 0
    status = "Success"
    # The agent's layout: <data>/<instance>/document/orchestration/<command id>/<step>/_script.sh
    # (docparser.go, runscript.go). /tmp is shared with the lab's machines; /etc is not.
    with tempfile.TemporaryDirectory(prefix="tn-ssm-") as data_dir:
        orchestration = Path(data_dir) / "document" / "orchestration" / command_id
        for step, script in zip(document["mainSteps"], scripts, strict=True):
            inputs = step.get("inputs") or {}
            limit = min(
                float(step_timeout(inputs.get("timeoutSeconds"))), deadline - time.monotonic()
            )
            step_dir = orchestration / step["name"]
            step_dir.mkdir(parents=True, mode=0o700)
            script_path = step_dir / SCRIPT_NAME
            script_path.write_text(script)
            script_path.chmod(0o700)  # appconfig.ReadWriteExecuteAccess
            argv = [shell, "-c", str(script_path)]
            if netns is not None:
                argv = netns_argv(netns, argv, mount_ns=mount_ns)
            for _ in range(5):
                status, exit_code, stdout, stderr = _run(argv, full_env, max(limit, 0.0))
                if not _text_file_busy(script_path, status, stdout, stderr):
                    break
                time.sleep(0.05)
            out.append(truncate_output(stdout))
            err.append(truncate_output(stderr))
            if status != "Success":
                break
    return Invocation(status, exit_code, "".join(out), "".join(err)[:MAX_STDERR_CHARACTERS])


def _text_file_busy(script: Path, status: str, stdout: bytes, stderr: bytes) -> bool:
    """Whether the shell could not execute the script because it was open for writing (execve(2),
    ETXTBSY): a fork in another thread while this runner wrote the script holds a copy of its
    descriptor until that child execs (golang/go#22315 describes the race; the agent, a Go
    program, can meet it too). The lab runs every machine's agent and the controller in one
    process, far more forks than an agent on one gateway, so it runs a script that never
    started again rather than fail a test on it."""
    lines = stderr.strip().splitlines()
    return (
        status == "Failed"
        and not stdout
        and len(lines) == 1
        and lines[0].endswith(str(script).encode() + b": Text file busy")
    )


def netns_argv(netns: str, argv: Sequence[str], *, mount_ns: str | Path | None = None) -> list[str]:
    """``argv`` run inside network namespace ``netns`` (and mount namespace ``mount_ns``)."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", netns):
        raise ValueError(f"invalid network namespace name {netns!r}")
    if mount_ns is None:
        return ["ip", "netns", "exec", netns, *argv]
    return ["nsenter", f"--net=/run/netns/{netns}", f"--mount={mount_ns}", "--", *argv]


def _run(argv: list[str], env: Mapping[str, str], limit: float) -> tuple[str, int, bytes, bytes]:
    # Its own process group, as the agent's Setpgid: the script and everything it starts in that
    # group are killed together at the timeout (executers_unix.go killProcess).
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(env),
        cwd="/",  # the agent's working directory (a service's: /)
        process_group=0,
    )
    try:
        stdout, stderr = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        try:
            stdout, stderr = proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            # A process that left the group still holds the pipes; give up on its output.
            proc.kill()
            stdout, stderr = b"", b""
        return "TimedOut", TIMED_OUT_EXIT_CODE, stdout or b"", stderr or b""
    except BaseException:
        # KeyboardInterrupt and friends: never leave a script running behind us.
        _kill_group(proc.pid)
        proc.wait()
        raise
    # A script that exits but leaves background children in its group must not outlive the step
    # in the lab (the agent leaves them; docs/parity.md).
    _kill_group(proc.pid)
    return ("Success" if proc.returncode == 0 else "Failed"), proc.returncode, stdout, stderr


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
