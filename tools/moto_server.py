"""moto's server on loopback, answering one DynamoDB request at a time.

moto's DynamoDB undoes a cancelled transaction by putting back a copy of the whole table taken when
the transaction started; a write another thread made in between is silently lost with it. Real
DynamoDB never does that (each item is linearizable), and the controller's concurrency tests found
the loss as a "stale mapping". Serving one DynamoDB request at a time gives every call the
atomicity DynamoDB gives it, while the clients stay as concurrent as before: their calls still
interleave in any order, only never inside one another. Other services are left concurrent (an SQS
long poll must not hold everyone up).

Every request first meets ``tools/aws_strict.py``'s ``StrictMiddleware``: the refusals and delays of
AWS that moto lacks (always-on refusals; delays, stale reads and throttling through its control
API under ``/_strict/``). It sits outside the DynamoDB lock, so a delayed caller holds no one up.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any

from moto.moto_server.threaded_moto_server import ThreadedMotoServer
from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import make_server

from tools.aws_strict import StrictMiddleware


class _OneAtATime:
    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self.app = app
        self.lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if not environ.get("HTTP_X_AMZ_TARGET", "").startswith("DynamoDB_"):
            return self.app(environ, start_response)
        with self.lock:
            # Read the whole body under the lock: a streamed reply would run moto outside it.
            return list(self.app(environ, start_response))


class SerialMotoServer(ThreadedMotoServer):
    """``ThreadedMotoServer`` whose DynamoDB requests never overlap inside moto."""

    def __init__(self, ip_address: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(ip_address=ip_address, port=port, verbose=False)
        self.strict = StrictMiddleware(_OneAtATime(DomainDispatcherApplication(create_backend_app)))

    def _server_entry(self) -> None:
        app = self.strict
        self._server = make_server(
            self._ip_address, self._port, app, True, request_handler=MotoRequestHandler
        )
        self._server_ready_event.set()
        self._server.serve_forever()

    @property
    def url(self) -> str:
        host, port = self.get_host_and_port()
        return f"http://{host}:{port}"
