"""A tiny HTTP server that reports, and logs, the peer address it saw.

The partner's app server A runs it (it must log our public address S as the source), and so does
an instance (the partner opens a connection to S and must land there). Each request appends one
line ``<unix time> <peer address> <path>`` to the log, and the answer is
``<name> saw <peer address>``.

    python -m lab.app_server --name app --port 8080 --log /run/tn-lab/logs/app-peers.log
"""

from __future__ import annotations

import argparse
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def make_handler(name: str, log: Path) -> type[BaseHTTPRequestHandler]:
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            peer = self.client_address[0]
            with lock, log.open("a") as f:
                f.write(f"{time.time():.3f} {peer} {self.path}\n")
            body = f"{name} saw {peer}\n".encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            # The peer log above is the record; keep stderr quiet.
            return

    return Handler


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bind", default="0.0.0.0")  # noqa: S104 - inside a lab namespace
    parser.add_argument("--log", type=Path, required=True)
    args = parser.parse_args(argv)
    args.log.touch()
    server = ThreadingHTTPServer((args.bind, args.port), make_handler(args.name, args.log))
    server.serve_forever()


if __name__ == "__main__":
    main()
