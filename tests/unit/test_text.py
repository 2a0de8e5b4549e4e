"""core/text.py: what an instance wrote, made safe for a terminal or a page (issue 21, 7)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunnelnat.core.text import printable


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("plain text\nline two\tcol", "plain text\nline two\tcol"),
        ("\x1b[31mred\x1b[0m", "red"),  # SGR colour, whole
        ("a\x1b[2J\x1b[Hb", "ab"),  # clear screen, cursor home
        ("\x1b[?1049h\x1b[1;1Hhidden", "hidden"),  # private parameters
        ("\x1b]0;pwned title\x07after", "after"),  # OSC window title ended by BEL
        ("\x1b]8;;http://evil\x1b\\link\x1b]8;;\x1b\\", "link"),  # OSC 8 hyperlink ended by ST
        ("\x1bP+q544e\x1b\\x", "x"),  # DCS (request termcap) answered on input by some terminals
        ("\x1b]52;c;ZWNobyBvd25lZA==\nnext", "\nnext"),  # open OSC 52 (clipboard) ends at \n
        ("\x1bcreset", "reset"),  # RIS, two-byte escape
        ("\x1b(0box", "box"),  # charset designation with an intermediate
        ("\x9b31mC1 CSI\x9b0m", "C1 CSI"),
        ("\x9d0;title\x9ckept", "kept"),  # 8-bit OSC ended by 8-bit ST
        ("progress 10%\rprogress 99%", "progress 10%progress 99%"),  # \r cannot overwrite
        ("bell\x07 nul\x00 bs\x08 del\x7f vt\x0b ff\x0c", "bell nul bs del vt ff"),
        ("tail\x1b", "tail"),  # a lone ESC
        ("a\x85b\x8fc", "abc"),  # C1 controls (NEL, SS3)
        ("user\u202egnp.exe", "usergnp.exe"),  # bidi override (Trojan Source)
        ("caf\u00e9 \u2713 \u65e5\u672c", "caf\u00e9 \u2713 \u65e5\u672c"),  # Unicode kept
    ],
)
def test_printable_strips_controls_and_escape_sequences_whole(raw, shown):
    assert printable(raw) == shown


@given(st.text())
def test_printable_leaves_nothing_a_terminal_obeys_and_is_idempotent(text):
    out = printable(text)
    assert printable(out) == out
    assert not any((ord(c) < 0x20 and c not in "\n\t") or 0x7F <= ord(c) <= 0x9F for c in out)


@given(
    st.text(
        alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E) | st.sampled_from("\n\t")
    )
)
def test_printable_text_is_unchanged(text):
    assert printable(text) == text
