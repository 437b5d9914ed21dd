"""Agent-written text made safe to show a person.

Anyone who can write a task file or a triage file, or post in the chat room, chooses
these characters: terminal escapes can rewrite what an operator's screen shows, and
zero-width and bidi characters hide or reorder text. Shown to people, such text is either
folded into one visible line (notes, names, findings) or, where the exact text matters
(a failure an operator is diagnosing), shown with those characters as escapes.
"""

from __future__ import annotations

import unicodedata


def visible_line(text: str, limit: int) -> str:
    """One line of at most `limit` characters: NFKC-folded (look-alikes become what they
    look like), control characters as spaces, format characters dropped, whitespace runs
    as one space; cut with "…"."""
    folded = unicodedata.normalize("NFKC", text)
    visible = "".join(" " if unicodedata.category(ch) == "Cc" else ch for ch in folded
                      if unicodedata.category(ch) != "Cf")
    line = " ".join(visible.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def escaped(text: str) -> str:
    """`text` with every character a terminal would act on or not show (line breaks,
    escapes, bidi and zero-width characters) written as its escape: \\n, \\x1b, \\u202e."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii")
                   for ch in text)
