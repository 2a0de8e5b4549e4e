"""Numbered UDP datagrams, sent at a steady rate and logged where they arrive (the failover step).

    python -m lab.seq_probe send --to 192.0.2.80 --port 9 --interval 0.05 --log FILE
    python -m lab.seq_probe receive --port 9 --log FILE

Each side writes one line per datagram, ``<time.time()> <sequence number>``, flushed at once, so
the lab can read how many were sent, which arrived and when (the gap around a failover). The
sender keeps one socket (one flow); a send that fails (no route for a moment) is logged as
``<time> <n> error`` and the next one follows on schedule.
"""

from __future__ import annotations

import argparse
import ipaddress
import signal
import socket
import sys
import time
from pathlib import Path


def send(to: str, port: int, interval: float, log: Path) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    started = time.monotonic()
    n = 0
    with log.open("a", buffering=1) as out:
        while True:
            try:
                sock.sendto(n.to_bytes(4, "big"), (to, port))
                out.write(f"{time.time():.6f} {n}\n")
            except OSError:
                out.write(f"{time.time():.6f} {n} error\n")
            n += 1
            time.sleep(max(0.0, started + n * interval - time.monotonic()))


def receive(port: int, log: Path) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", port))  # noqa: S104 - inside the lab's namespace only
    with log.open("a", buffering=1) as out:
        while True:
            data, _peer = sock.recvfrom(64)
            if len(data) == 4:
                out.write(f"{time.time():.6f} {int.from_bytes(data, 'big')}\n")


def read_log(path: Path) -> list[tuple[float, int]]:
    """(time, sequence number) of each datagram a side logged (failed sends left out)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2:
            rows.append((float(parts[0]), int(parts[1])))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lab.seq_probe")
    sub = parser.add_subparsers(dest="command", required=True)
    sender = sub.add_parser("send")
    sender.add_argument("--to", required=True)
    sender.add_argument("--port", type=int, required=True)
    sender.add_argument("--interval", type=float, default=0.05)
    sender.add_argument("--log", type=Path, required=True)
    receiver = sub.add_parser("receive")
    receiver.add_argument("--port", type=int, required=True)
    receiver.add_argument("--log", type=Path, required=True)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if args.command == "send":
        ipaddress.IPv4Address(args.to)  # an address, nothing else
        send(args.to, args.port, args.interval, args.log)
    else:
        receive(args.port, args.log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
