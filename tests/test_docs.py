"""Docs that can drift from the tree: README's project layout and CHANGELOG's bullets."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Folders that are not the project's: tooling state, never committed.
NOT_PROJECT = {"__pycache__", "node_modules"}


def layout_paths() -> list[str]:
    """The paths README's "Project layout" block names (each line's first column; a
    line may name several, comma-separated, as `Makefile, .ci/run` does)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = text.split("## Project layout\n", 1)[1].split("```\n", 2)[1]
    paths = []
    for line in block.splitlines():
        if not line or line.startswith(" "):
            continue  # a description continued from the line above
        names = re.split(r"\s{2,}", line, maxsplit=1)[0]
        paths += [name.strip() for name in names.split(",")]
    return paths


def test_readme_layout_lists_every_top_level_module_and_folder() -> None:
    listed = {path.rstrip("/").split("/")[0] for path in layout_paths()}
    present = {entry.name for entry in REPO.iterdir()
               if not entry.name.startswith(".") and entry.name not in NOT_PROJECT
               and (entry.is_dir() or entry.suffix == ".py")}
    assert present - listed == set(), "README's project layout omits these"


def test_readme_layout_names_nothing_that_is_gone() -> None:
    stale = [path for path in layout_paths() if not (REPO / path).exists()]
    assert stale == [], "README's project layout names paths that do not exist"


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
