"""Tracing is on exactly where Powertools would send traces, and costs nothing where it is off."""

from __future__ import annotations

import pytest

from tunnelnat.handlers.tracing import OptionalTracer, tracing_enabled


@pytest.mark.parametrize(
    ("env", "on"),
    [
        ({"LAMBDA_TASK_ROOT": "/var/task"}, True),
        ({"LAMBDA_TASK_ROOT": "/var/task", "POWERTOOLS_TRACE_DISABLED": "true"}, False),
        ({"LAMBDA_TASK_ROOT": "/var/task", "POWERTOOLS_TRACE_DISABLED": "1"}, False),
        ({"LAMBDA_TASK_ROOT": "/var/task", "AWS_SAM_LOCAL": "true"}, False),
        ({}, False),  # outside Lambda: no daemon to send to
    ],
)
def test_tracing_follows_powertools_rule(env, on):
    assert tracing_enabled(env) is on


def test_without_tracing_functions_are_left_as_they_are(monkeypatch):
    monkeypatch.delenv("LAMBDA_TASK_ROOT", raising=False)

    def work() -> int:
        return 1

    tracer = OptionalTracer("tunnelnat")
    assert tracer.tracer is None
    assert tracer.capture_method(work) is work
    assert tracer.capture_lambda_handler(work) is work


def test_with_tracing_a_powertools_tracer_wraps_them(monkeypatch):
    monkeypatch.setenv("LAMBDA_TASK_ROOT", "/var/task")
    monkeypatch.delenv("POWERTOOLS_TRACE_DISABLED", raising=False)
    tracer = OptionalTracer("tunnelnat")
    assert type(tracer.tracer).__name__ == "Tracer"
