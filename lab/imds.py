"""The gateway machine's instance metadata service (IMDSv2 only), for the lab's boot.

EC2 serves IMDS on the link-local 169.254.169.254; the lab adds no such address anywhere and
serves it on the gateway namespace's loopback instead (the boot program reads the base URL from
``TUNNELNAT_IMDS_URL``). Like an instance launched with ``HttpTokens=required``, a request
without a session token is refused.

It also serves the Auto Scaling target lifecycle state
(``/latest/meta-data/autoscaling/target-lifecycle-state``), which EC2 Auto Scaling sets on
instances in a group: ``InService`` while in service, ``Terminated`` once the group decided to
terminate the instance (its termination lifecycle hook then holds it in Terminating:Wait), per
https://docs.aws.amazon.com/autoscaling/ec2/userguide/retrieving-target-lifecycle-state-through-imds.html
The lab plays Auto Scaling: it writes the state into ``--lifecycle-file`` (a file in the lab's
/run, read at every request; absent or empty = ``InService``); nothing else can change it.

    python -m lab.imds --port 5001 --instance-id i-0123456789abcdef0 \
        --lifecycle-file /run/tn-lab/imds/tn-gw.lifecycle
"""

from __future__ import annotations

import argparse
import re
import secrets
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

LIFECYCLE_PATH = "/latest/meta-data/autoscaling/target-lifecycle-state"
DEFAULT_LIFECYCLE_STATE = "InService"


def lifecycle_state(path: Path | None) -> str:
    """The target lifecycle state the lab set for this machine (``InService`` by default)."""
    if path is None:
        return DEFAULT_LIFECYCLE_STATE
    try:
        return path.read_text().strip() or DEFAULT_LIFECYCLE_STATE
    except OSError:
        return DEFAULT_LIFECYCLE_STATE


def make_handler(
    instance_id: str, lifecycle_file: Path | None = None
) -> type[BaseHTTPRequestHandler]:
    tokens: set[str] = set()

    class Imds(BaseHTTPRequestHandler):
        def do_PUT(self) -> None:  # noqa: N802 - http.server's naming
            if self.path != "/latest/api/token":
                self.send_error(404)
                return
            if not self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                self.send_error(400)
                return
            token = secrets.token_urlsafe(24)
            tokens.add(token)
            self._reply(token)

        def do_GET(self) -> None:  # noqa: N802
            if self.headers.get("X-aws-ec2-metadata-token") not in tokens:
                self.send_error(401)
                return
            if self.path == "/latest/meta-data/instance-id":
                self._reply(instance_id)
            elif self.path == LIFECYCLE_PATH:
                self._reply(lifecycle_state(lifecycle_file))
            else:
                self.send_error(404)

        def _reply(self, body: str) -> None:
            data = body.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    return Imds


def main() -> None:
    parser = argparse.ArgumentParser(prog="lab.imds")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--instance-id", required=True)
    parser.add_argument("--lifecycle-file", type=Path, default=None)
    args = parser.parse_args()
    if not re.fullmatch(r"i-[0-9a-f]{8,17}", args.instance_id):
        parser.error(f"invalid instance ID {args.instance_id!r}")
    server = ThreadingHTTPServer(
        ("127.0.0.1", args.port), make_handler(args.instance_id, args.lifecycle_file)
    )
    server.serve_forever()


if __name__ == "__main__":
    main()
