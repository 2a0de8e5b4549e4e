"""ssm_documents/Switchover.yaml (``tunnelnat switchover``), run as the SSM agent runs it (the
lab's runner) in a throwaway directory: pair.json names the role file there, and a thread plays
the active's pair agent as gateway/tunnelnat_pair.py answers a request (``check_request``: the
handover, ``standby`` in the role file, ``<request>.result``, the request removed)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from lab.ssm_runner import InvalidParameters, run_document

DOCUMENT = Path(__file__).resolve().parents[2] / "ssm_documents" / "Switchover.yaml"


@pytest.fixture
def gateway(tmp_path):
    """pair.json with the role file in tmp; the agent says this gateway is the active."""
    (tmp_path / "pair.json").write_text(json.dumps({"role_file": str(tmp_path / "pair-role")}))
    (tmp_path / "pair-role").write_text("active\n")
    return tmp_path


def switchover(gateway: Path, **parameters: str):
    env = {"TUNNELNAT_PAIR_CONFIG": str(gateway / "pair.json")}
    return run_document(DOCUMENT, parameters, env=env, timeout=60)


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


def test_the_active_hands_over_and_the_document_says_so_in_one_line(gateway):
    (gateway / "switchover.result").write_text('{"outcome": "done"}')  # an old answer: ignored
    thread = agent(gateway)
    run = switchover(gateway)
    thread.join(5)
    assert run.status == "Success", run.stderr
    (line,) = run.stdout.splitlines()
    doc = json.loads(line)
    assert doc["switched"] is True and doc["role"] == "standby"
    assert doc["to"] == "i-0bbbbbbbbbbbb" and doc["outcome"] == "done"
    assert 0 <= doc["seconds"] < 10
    assert not (gateway / "switchover").exists()


def test_a_standby_refuses_before_asking_anything(gateway):
    (gateway / "pair-role").write_text("standby\n")
    run = switchover(gateway)
    assert run.exit_code != 0
    assert "not the active (its agent says: standby)" in run.stderr
    assert not (gateway / "switchover").exists()


def test_no_ready_standby_the_agent_says_why_and_the_document_fails(gateway):
    thread = agent(gateway, outcome="failed", role="active")
    run = switchover(gateway)
    thread.join(5)
    assert run.exit_code != 0
    doc = json.loads(run.stdout)
    assert (doc["switched"], doc["outcome"], doc["role"]) == (False, "failed", "active")


def test_an_agent_that_never_answers_is_a_bounded_wait_and_leaves_no_request(gateway):
    started = time.monotonic()
    run = switchover(gateway, WaitSeconds="1")
    assert time.monotonic() - started < 10
    assert run.exit_code != 0
    doc = json.loads(run.stdout)
    assert (doc["switched"], doc["outcome"]) == (False, "no_answer")
    assert not (gateway / "switchover").exists()  # a late agent does not hand over by surprise


def test_not_a_pair_gateway(tmp_path):
    run = run_document(
        DOCUMENT, {}, env={"TUNNELNAT_PAIR_CONFIG": str(tmp_path / "none.json")}, timeout=30
    )
    assert run.exit_code != 0 and "not a gateway of a pair" in run.stderr


@pytest.mark.parametrize("value", ["0", "121", "30; reboot", "", "3O"])
def test_wait_seconds_is_1_to_120(gateway, value):
    with pytest.raises(InvalidParameters, match="WaitSeconds"):
        switchover(gateway, WaitSeconds=value)
