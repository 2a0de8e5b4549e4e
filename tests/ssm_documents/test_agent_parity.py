"""Every shipped document runs under the SSM agent as the agent runs it, and the lab's runner
really runs documents that way (``sh -c _script.sh`` with dash as ``sh``, the agent's parameter
substitution, timeouts and output truncation). Sources: docs/parity.md."""

from __future__ import annotations

import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
import yaml

from lab.ssm_runner import (
    AGENT_PATH,
    MAX_OUTPUT_BYTES,
    MAX_STDERR_CHARACTERS,
    TIMED_OUT_EXIT_CODE,
    TRUNCATED_SUFFIX,
    agent_shell,
    load_document,
    render_scripts,
    run_document,
    step_timeout,
    truncate_output,
)
from tests.ssm_documents.test_documents import DOCS, valid_parameters

BASH = shutil.which("bash")
DASH = shutil.which("dash")
pytestmark = pytest.mark.skipif(not BASH or not DASH, reason="needs bash and dash")


def _rendered(path: Path) -> list[str]:
    return render_scripts(load_document(path), valid_parameters(path.stem))


def _parse(shell: str, script: str, tmp_path: Path) -> subprocess.CompletedProcess:
    target = tmp_path / "_script.sh"
    target.write_text(script)
    return subprocess.run([shell, "-n", str(target)], capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.stem)
def test_every_step_names_its_shell_on_line_one(path, tmp_path):
    """The agent runs ``sh -c _script.sh``: the kernel honours line 1's ``#!``; without one the
    script runs under /bin/sh, which is dash on Debian and Ubuntu."""
    for index, script in enumerate(_rendered(path)):
        first = script.split("\n", 1)[0]
        if first == "#!/bin/bash":
            result = _parse(BASH, script, tmp_path)
            assert result.returncode == 0, f"step {index}: bash -n: {result.stderr}"
        elif first == "#!/bin/sh":
            result = _parse(DASH, script, tmp_path)
            assert result.returncode == 0, f"step {index}: POSIX sh, but dash -n: {result.stderr}"
        else:
            pytest.fail(f"step {index} starts with {first!r}, not #!/bin/bash (or #!/bin/sh)")


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.stem)
def test_every_step_has_a_timeout_the_agent_accepts(path):
    """Outside 5..172800 seconds (or unparsable) the agent silently uses 3600 instead."""
    for step in load_document(path)["mainSteps"]:
        raw = (step.get("inputs") or {}).get("timeoutSeconds")
        assert raw is not None, f"{step['name']}: set timeoutSeconds (the default is an hour)"
        assert str(step_timeout(raw)) == str(raw), f"{step['name']}: the agent ignores {raw!r}"


def _document(tmp_path: Path, commands: list[str], *, timeout: str = "30") -> Path:
    document = {
        "schemaVersion": "2.2",
        "description": "a test document",
        "parameters": {
            "Word": {
                "type": "String",
                "description": "a word",
                "default": "tunnel",
                "allowedPattern": "^[a-z]{1,16}$",
            }
        },
        "mainSteps": [
            {
                "action": "aws:runShellScript",
                "name": "only",
                "inputs": {"timeoutSeconds": timeout, "runCommand": commands},
            }
        ],
    }
    path = tmp_path / "Test.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


BASH_ONLY = textwrap.dedent(
    """\
    set -o pipefail
    words=({{ Word }} b)
    read -r first <<< "${words[0]}"
    echo "got $first"
    """
)


def test_the_runner_uses_dash_so_bash_syntax_needs_the_shebang(tmp_path):
    assert Path(agent_shell()).resolve() == Path(DASH).resolve()  # as on Debian/Ubuntu
    without = run_document(_document(tmp_path, [BASH_ONLY]), {"Word": "alpha"})
    assert without.status == "Failed"
    # dash's complaint, as "PATH: LINE: ...": the first bash-ism it meets.
    assert "_script.sh: 1: set: Illegal option -o pipefail" in without.stderr
    with_shebang = run_document(_document(tmp_path, ["#!/bin/bash", BASH_ONLY]), {"Word": "alpha"})
    assert with_shebang.ok, with_shebang.stderr
    assert with_shebang.stdout == "got alpha\n"


def test_the_script_is_underscore_script_sh_in_an_orchestration_folder(tmp_path):
    commands = [
        "#!/bin/sh",
        'echo "$0"',
        "pwd",
        'echo "$SSM_COMMAND_ID"',
        'stat -c %a "$0"',
        'echo "{{Word}}/{{ Word }}"',
    ]
    inv = run_document(_document(tmp_path, commands), {})
    assert inv.ok, inv.stderr
    script, cwd, command_id, mode, words = inv.stdout.splitlines()
    assert script.endswith(f"/document/orchestration/{command_id}/only/_script.sh")
    assert cwd == "/" and mode == "700"
    assert words == "tunnel/tunnel"  # the default, both spellings substituted
    assert not Path(script).exists()  # the lab removes its orchestration folders


def test_substitution_is_one_pass_and_dollars_follow_the_agent(tmp_path):
    path = tmp_path / "Dollar.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "schemaVersion": "2.2",
                "description": "d",
                "parameters": {
                    "Text": {
                        "type": "String",
                        "description": "t",
                        "allowedPattern": "^[A-Za-z{}$ ]{1,40}$",
                    }
                },
                "mainSteps": [
                    {
                        "action": "aws:runShellScript",
                        "name": "s",
                        "inputs": {"timeoutSeconds": "10", "runCommand": ["{{ Text }}"]},
                    }
                ],
            }
        )
    )
    (script,) = render_scripts(load_document(path), {"Text": "a {{ Text }} $$b"})
    assert script == "a {{ Text }} $b\n"  # a value is never searched again; "$$" becomes "$"


def test_the_step_timeout_kills_the_whole_group(tmp_path):
    marker = tmp_path / "survivor"
    commands = [
        "#!/bin/bash",
        "echo started",
        f"(sleep 7; touch {marker}) &",
        "sleep 60",
    ]
    inv = run_document(_document(tmp_path, commands, timeout="5"), {}, timeout=30)
    assert inv.status == "TimedOut"
    assert inv.exit_code == TIMED_OUT_EXIT_CODE
    assert inv.stdout == "started\n"
    subprocess.run(["sleep", "3"], check=True)
    assert not marker.exists()  # the background child went with the group


def test_timeout_seconds_follow_the_agent():
    assert step_timeout("60") == 60
    assert step_timeout(60) == 60
    assert step_timeout("60.9") == 60
    assert step_timeout(None) == 3600
    assert step_timeout("soon") == 3600
    assert step_timeout("4") == 3600  # below the minimum of 5
    assert step_timeout("172801") == 3600  # above the maximum of 48 hours
    assert step_timeout("172800") == 172800


def test_output_is_cut_where_the_agent_cuts_it(tmp_path):
    short = b"x" * (MAX_OUTPUT_BYTES - 1)
    assert truncate_output(short) == short.decode()
    exact = b"y" * MAX_OUTPUT_BYTES  # the agent cuts at len >= limit
    cut = truncate_output(exact)
    assert len(cut.encode()) == MAX_OUTPUT_BYTES and cut.endswith(TRUNCATED_SUFFIX)
    # Bytes, not characters: a cut through a UTF-8 sequence leaves a replacement character.
    wide = "€".encode() * MAX_OUTPUT_BYTES  # 3 bytes each; 23,980 is not a multiple of 3
    assert truncate_output(wide).endswith("\ufffd" + TRUNCATED_SUFFIX)

    commands = [
        "#!/bin/bash",
        "head -c 100000 /dev/zero | tr '\\0' o",
        "head -c 100000 /dev/zero | tr '\\0' e >&2",
    ]
    inv = run_document(_document(tmp_path, commands), {})
    assert inv.ok
    assert inv.stdout == "o" * (MAX_OUTPUT_BYTES - len(TRUNCATED_SUFFIX)) + TRUNCATED_SUFFIX
    assert inv.stderr == "e" * MAX_STDERR_CHARACTERS


def test_the_agent_path_is_systemds_default():
    assert AGENT_PATH.split(":") == [
        "/usr/local/sbin",
        "/usr/local/bin",
        "/usr/sbin",
        "/usr/bin",
        "/sbin",
        "/bin",
    ]


def test_a_script_busy_for_writing_is_recognised_from_the_shells_own_message(tmp_path):
    """The lab runs every agent in one process: a fork in another thread may hold the new
    script open for writing for a moment, and the shell's execve then fails with ETXTBSY before
    the script starts. The runner recognises dash's own message for exactly that script and runs
    it again; any other failure is the script's."""
    from lab.ssm_runner import _text_file_busy

    script = tmp_path / "_script.sh"
    script.write_text("#!/bin/sh\necho ran\n")
    script.chmod(0o700)
    with open(script, "a"):  # open for writing, as the forked child's copy would be
        busy = subprocess.run([agent_shell(), "-c", str(script)], capture_output=True)
    assert busy.returncode != 0 and b"Text file busy" in busy.stderr, busy
    assert _text_file_busy(script, "Failed", busy.stdout, busy.stderr)
    ran = subprocess.run([agent_shell(), "-c", str(script)], capture_output=True)
    assert ran.stdout == b"ran\n"
    assert not _text_file_busy(script, "Success", ran.stdout, ran.stderr)
    other = tmp_path / "other.sh"
    assert not _text_file_busy(other, "Failed", b"", busy.stderr)  # another file's message
    assert not _text_file_busy(script, "Failed", b"", busy.stderr + b"more\n")
