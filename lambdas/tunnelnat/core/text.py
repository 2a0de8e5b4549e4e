"""Text an instance wrote, made safe to show: `printable` strips what a terminal would obey.

Command output (StandardErrorContent), status reasons and DLQ records carry bytes a root process
on an instance chose. Shown raw in an operator's terminal (`tunnelnat status`, `dlq`) or in a
page, an ANSI/ECMA-48 escape sequence can rewrite the screen, hide lines, set the window title
or (on some terminals) answer back with input; a bidirectional override can make text read
differently from what it is. Everything an instance wrote passes through `printable` before the
controller records it, and the CLI passes it again before printing (both are cheap and
idempotent).
"""

from __future__ import annotations

import re

# ECMA-48 (ISO 6429) shapes, matched whole so no parameter bytes are left behind:
# - CSI: ESC [ (or the 8-bit 0x9B), parameter bytes 0x30-0x3F, intermediates 0x20-0x2F, a final
#   byte 0x40-0x7E (colours, cursor movement, erase line/screen);
# - control strings: OSC (ESC ] / 0x9D), DCS (ESC P / 0x90), SOS (ESC X / 0x98), PM (ESC ^ /
#   0x9E), APC (ESC _ / 0x9F), ended by ST (ESC \ or 0x9C) or, as xterm accepts for OSC, BEL;
#   one left open is dropped to the end of its line (a terminal would swallow it too);
# - any other escape: ESC, intermediates 0x20-0x2F, a final byte 0x30-0x7E (e.g. ESC c, reset).
_ESCAPE = re.compile(
    r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]"
    r"|(?:\x1b[\]PX^_]|[\x90\x98\x9d\x9e\x9f])[^\n]*?(?:\x07|\x1b\\|\x9c|(?=\n)|\Z)"
    r"|\x1b[ -/]*[0-~]"
)
# What is left: C0 controls but \t and \n (\r included: it lets a line overwrite itself), DEL,
# the C1 controls 0x80-0x9F, and the Unicode bidirectional embeddings/overrides/isolates
# (U+202A-U+202E, U+2066-U+2069) that reorder what a reader sees.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """``text`` without escape sequences (whole) and control characters, \\n and \\t kept."""
    return _CONTROL.sub("", _ESCAPE.sub("", text))
