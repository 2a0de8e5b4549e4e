"""ssm_documents/Switchover.yaml (``tunnelnat switchover``), run as the SSM agent runs it (the
lab's runner), bound to the gateway software built from this tree and installed in a throwaway
TUNNELNAT_LIB: the document checks the archive and execs its ``switchover`` verb
(gateway/tunnelnat_gateway/switchover.py). pair.json names the role file in a throwaway
directory, and a thread plays the active's pair agent as pair.py's ``check_request`` answers a
request (the handover, ``standby`` in the role file, ``<request>.result``, the request removed)."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest

from lab.ssm_runner import InvalidParameters, load_document, render_scripts, run_document
from tools.gateway_package import build
from tunnelnat_gateway import switchover as verb

DOCUMENT = Path(__file__).resolve().parents[2] / "ssm_documents" / "Switchover.yaml"


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """The archive, installed where the document looks (LIB/gateway/<sha256>.pyz)."""
    built = build(tmp_path_factory.mktemp("out"))
    lib = tmp_path_factory.mktemp("lib")
    (lib / "gateway").mkdir()
    shutil.copy(built.path, lib / "gateway" / f"{built.sha256}.pyz")
    return built, lib


@pytest.fixture
def gateway(tmp_path):
    """pair.json with the role file in tmp; the agent says this gateway is the active."""
    (tmp_path / "pair.json").write_text(json.dumps({"role_file": str(tmp_path / "pair-role")}))
    (tmp_path / "pair-role").write_text("active\n")
    return tmp_path


def switchover(package, gateway: Path, **parameters: str):
    built, lib = package
    env = {"TUNNELNAT_PAIR_CONFIG": str(gateway / "pair.json"), "TUNNELNAT_LIB": str(lib)}
    binding = {"sha256": built.sha256, "bucket": "b", "key": "k", "region": "us-east-1"}
    return run_document(DOCUMENT, parameters, env=env, timeout=60, binding=binding)


def agent(gateway: Path, outcome: str = "done", role: str = "standby") -> threading.Thread:
    """The active's agent: answers the request within an interval, as check_request does."""

    def answer() -> None:
        request = gateway / "switchover"
        deadline = time.monotonic() + 20
        while not request.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        (gateway / "pair-role").write_text(f"{role}\n")
        result = {"instance": "i-0aaaaaaaaaaaaaaaa", "outcome": outcome, "detail": "handed over"}
        (gateway / "switchover.result").write_text(json.dumps({**result, "to": "i-0bbbbbbbbbbbb"}))
        request.unlink()

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    return thread


# -- the document, run -------------------------------------------------------------------------


def test_the_active_hands_over_and_the_document_says_so_in_one_line(package, gateway):
    (gateway / "switchover.result").write_text('{"outcome": "done"}')  # an old answer: ignored
    thread = agent(gateway)
    run = switchover(package, gateway)
    thread.join(5)
    assert run.status == "Success", run.stderr
    (line,) = run.stdout.splitlines()
    doc = json.loads(line)
    assert doc["switched"] is True and doc["role"] == "standby"
    assert doc["to"] == "i-0bbbbbbbbbbbb" and doc["outcome"] == "done"
    assert 0 <= doc["seconds"] < 10
    assert not (gateway / "switchover").exists()


def test_a_standby_refuses_before_asking_anything(package, gateway):
    (gateway / "pair-role").write_text("standby\n")
    run = switchover(package, gateway)
    assert run.exit_code != 0
    assert "Switchover: this gateway is not the active (its agent says: standby)" in run.stderr
    assert not (gateway / "switchover").exists()


def test_no_ready_standby_the_agent_says_why_and_the_document_fails(package, gateway):
    thread = agent(gateway, outcome="failed", role="active")
    run = switchover(package, gateway)
    thread.join(5)
    assert run.exit_code != 0
    doc = json.loads(run.stdout)
    assert (doc["switched"], doc["outcome"], doc["role"]) == (False, "failed", "active")


def test_an_agent_that_never_answers_is_a_bounded_wait_and_leaves_no_request(package, gateway):
    started = time.monotonic()
    run = switchover(package, gateway, WaitSeconds="1")
    assert time.monotonic() - started < 10
    assert run.exit_code != 0
    doc = json.loads(run.stdout)
    assert (doc["switched"], doc["outcome"]) == (False, "no_answer")
    assert not (gateway / "switchover").exists()  # a late agent does not hand over by surprise


def test_not_a_pair_gateway(package, tmp_path):
    run = switchover(package, tmp_path / "nowhere")
    assert run.exit_code != 0 and "Switchover: no " in run.stderr
    assert "this is not a gateway of a pair" in run.stderr


@pytest.mark.parametrize("value", ["0", "121", "30; reboot", "", "3O"])
def test_wait_seconds_is_1_to_120(package, gateway, value):
    with pytest.raises(InvalidParameters, match="WaitSeconds"):
        switchover(package, gateway, WaitSeconds=value)


def test_the_document_is_the_package_check_and_one_verb():
    """No logic of its own: the archive it was synthesized with (installed if missing), then
    ``exec``: the verb's exit code and output are the document's."""
    (script,) = render_scripts(load_document(DOCUMENT), {"WaitSeconds": "7"})
    assert script.startswith("#!/bin/bash\n")
    assert script.index("if ! pkg_installed; then") < script.index("exec python3")
    assert script.rstrip().splitlines()[-1] == ('exec python3 "$pkg" switchover --wait-seconds "7"')
    assert "mapfile" not in script and "pair-role" not in script


# -- the verb, as the document runs it ----------------------------------------------------------


def test_the_verb_checks_wait_seconds_again(gateway, capsys, monkeypatch):
    monkeypatch.setenv("TUNNELNAT_PAIR_CONFIG", str(gateway / "pair.json"))
    for value in ("0", "121", "x", "5;reboot"):
        assert verb.main(["--wait-seconds", value]) == 1
        assert "Switchover: WaitSeconds must be 1-120" in capsys.readouterr().err
    assert not (gateway / "switchover").exists()


def test_the_request_file_where_pair_json_puts_it(tmp_path, capsys):
    """``request_file`` in pair.json: the agent's request and answer are there."""
    config = tmp_path / "pair.json"
    role, request = tmp_path / "role", tmp_path / "req" / "ask"
    request.parent.mkdir()
    config.write_text(json.dumps({"role_file": str(role), "request_file": str(request)}))
    role.write_text("active\n")
    assert verb.paths(config) == (role, request)
    seen: list[str] = []

    def sleep(_seconds: float) -> None:  # the agent answers at the first poll
        seen.append(request.read_text())
        request.unlink()
        role.write_text("standby\n")
        request.with_name("ask.result").write_text(json.dumps({"outcome": "done", "to": "i-b"}))

    line = verb.switchover(role, request, 5, command_id="cmd-1", sleep=sleep)
    assert seen == ["cmd-1\n"]
    assert line["switched"] is True and line["to"] == "i-b" and line["role"] == "standby"


def test_pair_json_defaults_to_the_agents_role_file(tmp_path):
    config = tmp_path / "pair.json"
    config.write_text("{}")
    assert verb.paths(config) == (
        Path("/run/tunnelnat/pair-role"),
        Path("/run/tunnelnat/switchover"),
    )
    config.write_text("[1]")
    with pytest.raises(verb.Refused, match="not a JSON object"):
        verb.paths(config)
