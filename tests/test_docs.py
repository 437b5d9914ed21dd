"""Docs that can drift from the tree: the project layout (docs/development.md), the
settings table (docs/configuration.md), links between the documents, README's length and
CHANGELOG's bullets."""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from functools import cache
from pathlib import Path

import config

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
README_MAX_LINES = 150
# Folders that are not the project's: tooling state and installs, never committed.
NOT_PROJECT = {"__pycache__", "node_modules"}
# [text](target) outside code spans; images too. Absolute URLs and mail links are skipped.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
CODE_SPAN = re.compile(r"`[^`\n]*`")
FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.MULTILINE | re.DOTALL)


def layout_paths() -> list[str]:
    """The paths docs/development.md's "Project layout" block names (each line's first
    column; a line may name several, comma-separated, as `Makefile, .ci/run` does)."""
    text = (DOCS / "development.md").read_text(encoding="utf-8")
    block = text.split("## Project layout\n", 1)[1].split("```\n", 2)[1]
    paths = []
    for line in block.splitlines():
        if not line or line.startswith(" "):
            continue  # a description continued from the line above
        names = re.split(r"\s{2,}", line, maxsplit=1)[0]
        paths += [name.strip() for name in names.split(",")]
    return paths


def test_layout_lists_every_top_level_module_and_folder() -> None:
    listed = {path.rstrip("/").split("/")[0] for path in layout_paths()}
    present = {entry.name for entry in REPO.iterdir()
               if not entry.name.startswith(".") and entry.name not in NOT_PROJECT
               and (entry.is_dir() or entry.suffix == ".py")}
    assert present - listed == set(), "docs/development.md's project layout omits these"


def test_layout_names_nothing_that_is_gone() -> None:
    stale = [path for path in layout_paths() if not any(REPO.glob(path))]
    assert stale == [], "docs/development.md's project layout names paths that do not exist"


def test_settings_table_names_every_setting_and_no_other() -> None:
    text = (DOCS / "configuration.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `([A-Z][A-Z0-9_]*)` \|", text, re.MULTILINE)
    assert Counter(rows) == Counter(set(config.ENV_FIELDS)), "docs/configuration.md's table"


def test_readme_is_short() -> None:
    """The README says what this is and where to read on; the manual lives in docs/."""
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES


def linked_documents() -> list[Path]:
    return sorted([*REPO.glob("*.md"), *DOCS.glob("*.md"), REPO / "bench" / "README.md"])


def anchor(heading: str) -> str:
    """A heading's anchor as GitHub makes it: lower case, punctuation dropped (hyphens and
    underscores kept), each space a hyphen."""
    text = CODE_SPAN.sub(lambda span: span.group(0).strip("`"), heading.strip()).lower()
    kept = "".join(char for char in text
                   if char in " -_" or unicodedata.category(char)[0] in "LN")
    return kept.replace(" ", "-")


@cache
def anchors(document: Path) -> frozenset[str]:
    text = FENCE.sub("", document.read_text(encoding="utf-8"))
    seen: Counter[str] = Counter()
    found = set()
    for heading in re.findall(r"^#{1,6} (.+)$", text, re.MULTILINE):
        base = anchor(heading)
        found.add(f"{base}-{seen[base]}" if seen[base] else base)
        seen[base] += 1
    return frozenset(found)


def relative_links(document: Path) -> list[str]:
    text = CODE_SPAN.sub("", FENCE.sub("", document.read_text(encoding="utf-8")))
    return [target for target in LINK.findall(text)
            if not re.match(r"[a-z][a-z0-9+.-]*:", target)]


def test_every_relative_link_resolves() -> None:
    """Each link between the documents names a file that exists and, with a `#fragment`
    into a markdown file, a heading that file has."""
    broken = []
    for document in linked_documents():
        for target in relative_links(document):
            path, _, fragment = target.partition("#")
            resolved = (document.parent / path).resolve() if path else document
            if not resolved.exists():
                broken.append(f"{document.relative_to(REPO)}: {target} (no such file)")
            elif fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
                broken.append(f"{document.relative_to(REPO)}: {target} (no such heading)")
    assert broken == []


def test_readme_links_every_page_of_the_manual() -> None:
    readme = set(relative_links(REPO / "README.md"))
    unlinked = [page.name for page in sorted(DOCS.glob("*.md"))
                if f"docs/{page.name}" not in {link.partition("#")[0] for link in readme}]
    assert unlinked == [], "pages of docs/ that README's reader cannot reach"


def changelog_bullets() -> list[tuple[int, str]]:
    """(line number, text with its continuation lines joined) of every bullet."""
    bullets: list[tuple[int, str]] = []
    lines = (REPO / "CHANGELOG.md").read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if line.startswith("- "):
            bullets.append((number, line[2:].strip()))
        elif bullets and line.startswith("  ") and line.strip() and lines[number - 2].strip():
            at, text = bullets[-1]
            bullets[-1] = (at, f"{text} {line.strip()}")
    return bullets


def test_changelog_has_no_duplicate_bullets() -> None:
    bullets = changelog_bullets()
    assert len(bullets) > 10
    counts = Counter(" ".join(text.lower().split()) for _, text in bullets)
    doubles = [(at, text) for at, text in bullets if counts[" ".join(text.lower().split())] > 1]
    assert doubles == []
