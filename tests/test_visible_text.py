"""Agent-written text shown to people: folded into one visible line, or escaped."""

from __future__ import annotations

import pytest

from taskfiles.visible_text import escaped, visible_line


@pytest.mark.parametrize(("text", "shown"), [
    ("ops-bot\x1b[31m\u202eecnatpecca ksir", "ops-bot [31mecnatpecca ksir"),
    ("line one\nline two\r\x00end", "line one line two end"),
    ("zero\u200bwidth and\u2066isolate\u2069", "zerowidth andisolate"),
    ("\uff1cfullwidth\uff1e", "<fullwidth>"),
    ("  spaced \t out  ", "spaced out"),
])
def test_visible_line_keeps_only_what_a_reader_sees(text: str, shown: str) -> None:
    assert visible_line(text, 100) == shown


def test_visible_line_is_cut_with_an_ellipsis_within_its_limit() -> None:
    assert visible_line("x" * 50, 10) == "x" * 9 + "…"
    assert visible_line("x" * 10, 10) == "x" * 10


def test_escaped_shows_every_character_a_terminal_would_act_on() -> None:
    text = "ok é ✓ \x1b[2K\r\n\u202e\u200b\t end"
    assert escaped(text) == "ok é ✓ \\x1b[2K\\r\\n\\u202e\\u200b\\t end"
    assert escaped(text).isprintable()
