"""Parsing the security agent's triage-output.yml: what is accepted, what is refused and why."""

from __future__ import annotations

from pathlib import Path

import pytest

from activities.triage import (
    MAX_DEPTH,
    MAX_DESCRIPTION_CHARS,
    MAX_FINDINGS,
    MAX_FINDINGS_BYTES,
    MAX_TRIAGE_BYTES,
    read_triage,
)
from exceptions import TriageInvalidError, TriageMissingError
from vocabulary import AUDIT_REQUESTS_DIR


def triage_file(tmp_path: Path, content: str | bytes) -> Path:
    path = tmp_path / AUDIT_REQUESTS_DIR / "b" / "triage-output.yml"
    path.parent.mkdir(parents=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def test_both_item_forms_and_extra_keys(tmp_path: Path) -> None:
    path = triage_file(tmp_path, """\
blocks:
  - description: Token logged in plain text
    severity: high
    file: worker.py
    lines: [10, 12]
flags:
  - Pin the dependency versions
  - description: "Quote the shell argument"
info:
  - café — ünïcode is fine
""")
    result = read_triage(path)

    assert result.triage_path == str(path)
    assert [b.model_dump() for b in result.blocks] == [{
        "description": "Token logged in plain text", "severity": "high", "file": "worker.py",
        "lines": [10, 12]}]
    assert [f.model_dump() for f in result.flags] == [
        {"description": "Pin the dependency versions"},
        {"description": "Quote the shell argument"}]
    assert [i.description for i in result.info] == ["café — ünïcode is fine"]


@pytest.mark.parametrize("content", ["", "\n", "# nothing found\n", "blocks:\nflags: []\n"])
def test_empty_file_is_an_empty_result(tmp_path: Path, content: str) -> None:
    result = read_triage(triage_file(tmp_path, content))
    assert (result.blocks, result.flags, result.info) == ([], [], [])


def test_missing_file_is_retryable_kind(tmp_path: Path) -> None:
    path = tmp_path / AUDIT_REQUESTS_DIR / "b" / "triage-output.yml"
    with pytest.raises(TriageMissingError) as caught:
        read_triage(path)
    assert str(path) in str(caught.value)


ALIAS_BOMB = """\
a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
info: [*c, *c, *c, *c, *c, *c, *c, *c, *c]
"""


@pytest.mark.parametrize(("content", "problem"), [
    ("flags:\n  - &f Pin it\n  - *f\n", "anchors/aliases are not allowed"),
    (ALIAS_BOMB, "anchors/aliases are not allowed"),
    ("blocks:\n  - !!python/object/apply:os.system ['touch /tmp/pwned']\n",
     "unsafe or invalid YAML"),
    ("blocks:\n  - !!python/name:os.system\n", "unsafe or invalid YAML"),
    ("blocks: !!python/object:collections.OrderedDict {}\n", "unsafe or invalid YAML"),
    ("info:\n  - " + "[" * (MAX_DEPTH + 5) + "]" * (MAX_DEPTH + 5) + "\n",
     f"nesting deeper than {MAX_DEPTH}"),
    ("info:\n  - " + "[" * 50_000 + "]" * 50_000 + "\n", f"nesting deeper than {MAX_DEPTH}"),
    ("blocks: [unclosed\n", "unsafe or invalid YAML"),
    ("- just a list\n", "top level must be a mapping"),
    ("blocks: a string\n", "'blocks' must be a list"),
    ("flags:\n  - 42\n", "flags[0]: item must be a string or a mapping"),
    ("info:\n  - [nested, list]\n", "info[0]: item must be a string or a mapping"),
    ("blocks:\n  - severity: high\n", "blocks[0]: mapping has no 'description'"),
    ("blocks:\n  - description: 7\n", "blocks[0]: description must be a string"),
    ("flags:\n  - '   '\n", "flags[0]: description is empty"),
    ("blockers:\n  - typo in the key\n", "unknown top-level keys ['blockers']"),
    # Valid YAML under 1 MiB, but too much for the pipeline to hold or Temporal to record.
    ("info:\n" + "  - a\n" * 90_000, "more than 20000 values"),
    ("flags:\n" + "  - a\n" * (MAX_FINDINGS - 1) + "info:\n  - a\n  - b\n",
     f"{MAX_FINDINGS + 1} findings; at most {MAX_FINDINGS}"),
    ("info:\n" + f"  - {'x' * MAX_DESCRIPTION_CHARS}\n" * 7,
     f"; at most {MAX_FINDINGS_BYTES}"),
])
def test_refused_with_file_and_problem(tmp_path: Path, content: str, problem: str) -> None:
    path = triage_file(tmp_path, content)
    with pytest.raises(TriageInvalidError) as caught:
        read_triage(path)
    message = str(caught.value)
    assert str(path) in message
    assert problem in message
    assert len(message) < 1000  # one readable line, not a dump of the document


def test_python_tag_is_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = triage_file(tmp_path, f"blocks:\n  - !!python/object/apply:os.system "
                                 f"['touch {marker}']\n")
    with pytest.raises(TriageInvalidError):
        read_triage(path)
    assert not marker.exists()


def test_not_utf8_is_refused(tmp_path: Path) -> None:
    path = triage_file(tmp_path, b"info:\n  - caf\xe9 latin-1\n")
    with pytest.raises(TriageInvalidError) as caught:
        read_triage(path)
    assert str(path) in str(caught.value)
    assert "not UTF-8" in str(caught.value)


def test_over_one_mib_is_refused(tmp_path: Path) -> None:
    path = triage_file(tmp_path, "info:\n  - " + "x" * MAX_TRIAGE_BYTES + "\n")
    with pytest.raises(TriageInvalidError) as caught:
        read_triage(path)
    assert str(path) in str(caught.value)
    assert "larger than" in str(caught.value)
    assert "1 MiB" in str(caught.value)


def test_exactly_one_mib_is_accepted(tmp_path: Path) -> None:
    head = "info:\n  - ok\n# "
    path = triage_file(tmp_path, head + "x" * (MAX_TRIAGE_BYTES - len(head) - 1) + "\n")
    assert path.stat().st_size == MAX_TRIAGE_BYTES
    assert [i.description for i in read_triage(path).info] == ["ok"]


def test_the_most_findings_allowed_are_accepted(tmp_path: Path) -> None:
    extra = "    severity: high\n    files: [a.py, b.py]\n"
    path = triage_file(tmp_path, "blocks:\n" + f"  - description: {'d' * 400}\n{extra}"
                       * MAX_FINDINGS)
    triage = read_triage(path)
    assert len(triage.blocks) == MAX_FINDINGS
    assert len(triage.model_dump_json()) <= MAX_FINDINGS_BYTES


def test_symlink_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "elsewhere.yml"
    real.write_text("info:\n  - from elsewhere\n")
    path = tmp_path / "triage-output.yml"
    path.symlink_to(real)
    with pytest.raises(TriageInvalidError) as caught:
        read_triage(path)
    assert str(path) in str(caught.value)
    assert "symlink" in str(caught.value)


def test_directory_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "triage-output.yml"
    path.mkdir()
    with pytest.raises(TriageInvalidError) as caught:
        read_triage(path)
    assert str(path) in str(caught.value)
