"""Plain-text output: aligned tables, times, and the progress line of ``--wait``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

from tunnelnat.core.text import printable


def iso(epoch: float | None) -> str | None:
    """An epoch time as ISO 8601 UTC (``2026-11-25T19:38:51Z``), or None."""
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def ago(epoch: float | None, now: float) -> str:
    if epoch is None:
        return "-"
    seconds = max(0, int(now - epoch))
    if seconds < 60:
        text = f"{seconds}s"
    elif seconds < 3600:
        text = f"{seconds // 60}m"
    elif seconds < 86400:
        text = f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"
    else:
        text = f"{seconds // 86400}d"
    return f"{iso(epoch)} ({text} ago)"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[("-" if c is None or c == "" else str(c)) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    for row in cells:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


def dump_json(value: Any, out: TextIO) -> None:
    out.write(json.dumps(value, indent=2, sort_keys=True) + "\n")


class Progress:
    """``--wait``'s display on stderr: one rewritten line on a terminal, else a line per change."""

    def __init__(self, err: TextIO, *, enabled: bool = True) -> None:
        # The stream itself (Ctx's is a Printable, which would strip the \r); the text is made
        # printable here instead.
        self._err = getattr(err, "raw", err)
        self._tty = bool(getattr(err, "isatty", lambda: False)())
        self._enabled = enabled
        self._last = ""
        self._width = 0

    def update(self, elapsed: float, text: str) -> None:
        if not self._enabled:
            return
        text = printable(text)
        if self._tty:
            line = f"[{elapsed:5.0f}s] {text}"
            self._err.write("\r" + line.ljust(self._width))
            self._width = len(line)
            self._err.flush()
        elif text != self._last:
            self._err.write(f"[{elapsed:5.0f}s] {text}\n")
        self._last = text

    def done(self) -> None:
        if self._enabled and self._tty and self._width:
            self._err.write("\n")
            self._width = 0
