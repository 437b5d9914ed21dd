"""Parse the security agent's triage-output.yml safely.

Accepted: a mapping with optional `blocks`, `flags`, `info` lists; each item is a
`{description: ...}` mapping (other keys kept) or a plain string. Refused, naming the
file and the problem: a link, FIFO or any other non-regular file (checked on the open
descriptor, never waited on), over 1 MiB, not UTF-8, YAML tags beyond the plain ones,
anchors or aliases (alias bombs), nesting deeper than MAX_DEPTH, a non-mapping top
level, and items of any other shape.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from exceptions import TaskFileError, TriageInvalidError, TriageMissingError
from models import Finding, TriageResult
from taskfiles.bounded_yaml import MAX_YAML_NODES, load_agent_yaml
from taskfiles.safe_io import read_agent_file

MAX_TRIAGE_BYTES = 1024 * 1024
MAX_DEPTH = 16
MAX_DESCRIPTION_CHARS = 20_000
# The pipeline holds its findings in workflow state, sends them to stages 5 and 6 and
# writes them into the summary: a cap on their number and on their size as JSON keeps one
# triage from costing the worker megabytes per parked pipeline, or from making a result
# too large for Temporal to record (its limit is 2 MiB per payload).
MAX_FINDINGS = 200
MAX_FINDINGS_BYTES = 128 * 1024
SECTIONS = ("blocks", "flags", "info")


def limits_text() -> str:
    """What read_triage accepts, in words for the agent that writes the file."""
    return (f"Each list is optional. Items are `{{description: ...}}` mappings (other keys "
            f"are kept) or\nplain strings, at most {MAX_DESCRIPTION_CHARS:,} characters per "
            f"description; at most {MAX_FINDINGS} findings in\nall, taking at most "
            f"{MAX_FINDINGS_BYTES // 1024} KiB as JSON. The file must be UTF-8, at most "
            f"{MAX_TRIAGE_BYTES // 2**20} MiB, plain\nYAML in one document (no tags, anchors "
            f"or aliases, nesting at most {MAX_DEPTH} levels, at most\n{MAX_YAML_NODES:,} "
            f"values, no integer of more than 4300 digits) and a regular file, not a link;\n"
            f"anything else fails the pipeline with an error naming the problem.")


def _item(path: Path, section: str, index: int, raw: Any) -> Finding:
    where = f"{path}: {section}[{index}]"
    if isinstance(raw, str):
        description = raw
        extra: dict[str, Any] = {}
    elif isinstance(raw, dict):
        if "description" not in raw:
            raise TriageInvalidError(f"{where}: mapping has no 'description' key")
        description = raw["description"]
        if not isinstance(description, str):
            raise TriageInvalidError(f"{where}: description must be a string, got "
                                     f"{type(description).__name__}")
        extra = {str(k): v for k, v in raw.items() if k != "description"}
    else:
        raise TriageInvalidError(f"{where}: item must be a string or a mapping with "
                                 f"'description', got {type(raw).__name__}")
    if not description.strip():
        raise TriageInvalidError(f"{where}: description is empty")
    if len(description) > MAX_DESCRIPTION_CHARS:
        raise TriageInvalidError(f"{where}: description longer than {MAX_DESCRIPTION_CHARS}")
    return Finding(description=description, **extra)


def parse_triage_text(path: Path, text: str) -> TriageResult:
    try:
        document = load_agent_yaml(text, MAX_DEPTH)  # triage needs less than a task file
    except yaml.YAMLError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TriageInvalidError(f"{path}: unsafe or invalid YAML: {first}") from None
    if document is None:
        document = {}
    if not isinstance(document, dict):
        raise TriageInvalidError(f"{path}: top level must be a mapping with blocks/flags/info, "
                                 f"got {type(document).__name__}")
    unknown = sorted(str(key) for key in document if key not in SECTIONS)
    if unknown:
        raise TriageInvalidError(f"{path}: unknown top-level keys {unknown}; "
                                 f"expected {list(SECTIONS)}")
    lists: dict[str, list[Any]] = {}
    for section in SECTIONS:
        items = document.get(section)
        if items is None:
            items = []
        if not isinstance(items, list):
            raise TriageInvalidError(f"{path}: '{section}' must be a list, got "
                                     f"{type(items).__name__}")
        lists[section] = items
    count = sum(len(items) for items in lists.values())
    if count > MAX_FINDINGS:
        raise TriageInvalidError(f"{path}: {count} findings; at most {MAX_FINDINGS}")
    result = TriageResult(triage_path=str(path), **{
        section: [_item(path, section, i, raw) for i, raw in enumerate(items)]
        for section, items in lists.items()})
    size = len(result.model_dump_json().encode())
    if size > MAX_FINDINGS_BYTES:
        raise TriageInvalidError(f"{path}: findings take {size} bytes as JSON; at most "
                                 f"{MAX_FINDINGS_BYTES}")
    return result


def read_triage(path: Path, *, base: Path | None = None) -> TriageResult:
    """Read and validate triage-output.yml; TriageMissingError if it is not there yet.
    With `base` (the audit root), no folder link below it is followed either."""
    try:
        raw = read_agent_file(path, MAX_TRIAGE_BYTES, base=base)
    except FileNotFoundError:
        raise TriageMissingError(f"{path}: not written yet") from None
    except TaskFileError as err:
        raise TriageInvalidError(str(err)) from None
    if len(raw) > MAX_TRIAGE_BYTES:
        raise TriageInvalidError(f"{path}: larger than {MAX_TRIAGE_BYTES} bytes (1 MiB)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise TriageInvalidError(f"{path}: not UTF-8 (byte {err.start})") from None
    return parse_triage_text(path, text)
