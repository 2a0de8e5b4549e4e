"""X-Ray through Powertools' Tracer, imported only when traces are really sent: the X-Ray SDK
costs ~150-250 ms of import (it builds a botocore client), a cold start's worth of nothing when
tracing is off."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])
_TRUE = ("1", "true", "y", "yes", "t", "on")


def tracing_enabled(env: dict[str, str] | None = None) -> bool:
    """Powertools' own rule (Tracer._is_tracer_disabled): on in Lambda unless disabled, off
    outside it."""
    env = dict(os.environ) if env is None else env
    if env.get("POWERTOOLS_TRACE_DISABLED", "false").strip().lower() in _TRUE:
        return False
    if not env.get("LAMBDA_TASK_ROOT"):
        return False
    return not (env.get("AWS_SAM_LOCAL") or env.get("AWS_CHALICE_CLI_MODE"))


class OptionalTracer:
    """``capture_method`` / ``capture_lambda_handler`` of a Powertools Tracer when tracing is on;
    the function unchanged when it is off."""

    def __init__(self, service: str) -> None:
        self.tracer: Any = None
        if tracing_enabled():
            from aws_lambda_powertools import Tracer

            self.tracer = Tracer(service=service)

    def capture_method(self, fn: F) -> F:
        return self.tracer.capture_method(fn) if self.tracer is not None else fn

    def capture_lambda_handler(self, fn: F) -> F:
        return self.tracer.capture_lambda_handler(fn) if self.tracer is not None else fn
