"""The names in vocabulary.py (and the failure types of exceptions.py) against every
place that must state them by value: the tables of the manual (docs/pipeline.md,
docs/configuration.md) and AGENTS.md, the task-file schema, and the models' Literals (a
Literal needs literal values, so it is checked here instead of built from the module)."""

from __future__ import annotations

import json
import re
import typing
from pathlib import Path

import exceptions
import models
import vocabulary as v

REPO = Path(__file__).resolve().parent.parent
PIPELINE = REPO / "docs" / "pipeline.md"
CONFIGURATION = REPO / "docs" / "configuration.md"
AGENTS = REPO / "AGENTS.md"
SCHEMA = REPO / "schemas" / "task-file.schema.json"
CODE = re.compile(r"`([^`]+)`")
FAILURE_TYPE_NAMES = {kind.failure_type for kind in exceptions.FAILURE_TYPES}


def table(doc: Path, first_header: str) -> list[list[str]]:
    """The body rows (cells stripped) of the markdown table whose header row starts with
    `| first_header |`; fails if the document has no such table."""
    lines = doc.read_text(encoding="utf-8").splitlines()
    for at, line in enumerate(lines):
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_header:
            rows = []
            for row in lines[at + 2:]:
                if not row.startswith("|"):
                    break
                rows.append([cell.strip() for cell in row.strip().strip("|").split("|")])
            return rows
    raise AssertionError(f"{doc.name}: no table with header {first_header!r}")


def paragraph(doc: Path, start: str) -> str:
    """The paragraph of `doc` that begins with `start` (up to the next blank line)."""
    text = doc.read_text(encoding="utf-8")
    at = text.index(start)
    end = text.find("\n\n", at)
    return text[at:end if end >= 0 else None]


def codes(text: str) -> list[str]:
    return CODE.findall(text)


def test_pipeline_stage_table_is_the_nine_stages_in_order() -> None:
    rows = table(PIPELINE, "#")
    assert {codes(row[1])[0]: int(row[0]) for row in rows} == v.STAGE_NUMBERS
    assert [codes(row[1])[0] for row in rows] == list(v.STAGES)
    for row in rows:
        stage, who = codes(row[1])[0], row[2]
        if stage in v.INLINE_STAGES:
            local = stage in (v.PROCESS_TRIAGE_OUTPUT, v.SUMMARIZE_WORKFLOW)
            assert who == ("inline (local activity)" if local else "inline"), stage
        else:
            assert stage in v.AGENT_STAGES, stage
            assert codes(who)[-1] == v.STAGE_TASK_TYPES[stage], stage


def test_settings_table_names_the_default_queue_and_audit_folder() -> None:
    settings = {codes(row[0])[0]: row for row in table(CONFIGURATION, "Variable")}
    assert codes(settings["TASK_QUEUE"][1]) == [v.DEFAULT_TASK_QUEUE]
    assert codes(settings["TEMPORAL_AUDIT_DIR"][2]) == [f"{v.AUDIT_REQUESTS_DIR}/<build>/"]


def test_pipeline_outcomes_table_matches_the_outcome_type() -> None:
    rows = table(PIPELINE, "Outcome")
    assert [codes(row[0])[0] for row in rows] == list(typing.get_args(models.Outcome))
    for row in rows:
        for name in re.findall(r"\b[A-Z][A-Za-z]+Error\b", row[2]):
            assert name in FAILURE_TYPE_NAMES, name


def test_agents_task_type_field_lists_every_agent_task_type() -> None:
    fields = {codes(row[0])[0]: row[1] for row in table(AGENTS, "Field") if codes(row[0])}
    assert codes(fields["task_type"]) == list(v.AGENT_TASK_TYPES)


def test_agents_task_type_table_names_each_type_and_its_stage() -> None:
    rows = table(AGENTS, "task_type")
    stage_of = {task_type: stage for stage, task_type in v.STAGE_TASK_TYPES.items()}
    stage_of[v.TASK_BUILD_PHASE] = v.BUILD_PHASE
    assert {codes(row[0])[0]: codes(row[1])[0] for row in rows} == stage_of
    assert [codes(row[0])[0] for row in rows] == list(v.AGENT_TASK_TYPES)


def test_agents_statuses_are_the_agent_task_statuses() -> None:
    text = paragraph(AGENTS, "**Statuses** of a task written for you")
    statuses = [name for name in codes(text) if " " not in name]
    assert statuses == list(v.AGENT_TASK_STATUSES)


def test_agents_originating_task_decisions_and_folders() -> None:
    approve = paragraph(AGENTS, "- `approved` →").splitlines()
    assert codes(approve[0]) == [v.APPROVED]
    assert set(codes(approve[1])) == v.REJECTING_STATUSES
    where = paragraph(AGENTS, "In `TASK_QUEUE_DIR`")
    assert [name.rstrip("/") for name in codes(where) if name.endswith("/")] == list(
        v.TASK_SEARCH_SUBDIRS)
    assert f"`{v.INPUT_REQUIRED}`" in paragraph(AGENTS, "A pipeline is started for")


def test_schema_enums_match_the_vocabulary() -> None:
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    task = schema["$defs"]["agentTask"]["properties"]
    assert task["task_type"]["enum"] == list(v.AGENT_TASK_TYPES)
    assert task["status"]["enum"] == list(v.AGENT_TASK_STATUSES)
    payload = schema["$defs"]["payload"]["properties"]
    assert payload["activity_type"]["enum"] == list(v.AGENT_ACTIVITIES)
    assert payload["audit_folder"]["pattern"].startswith(f"^{v.AUDIT_REQUESTS_DIR}/")


def test_model_literals_match_the_vocabulary() -> None:
    status = models.OpenTask.model_fields["status"].annotation
    assert set(typing.get_args(status)) == {v.CANCELLED, v.EXPIRED}
    # A decision is named by the originating task status that makes it, or by the
    # originating task field that requests changes.
    assert set(typing.get_args(models.Decision)) == {v.APPROVED, v.REJECTED,
                                                    v.CHANGES_REQUESTED}


def test_pipeline_failure_types_table_is_the_failure_type_classes() -> None:
    """docs/pipeline.md's failure-type table: every class of exceptions.FAILURE_TYPES, in
    order, by its failure_type, and "no" under Retried exactly when it is non-retryable."""
    rows = table(PIPELINE, "Failure type")
    assert [codes(row[0])[0] for row in rows] == [kind.failure_type
                                                  for kind in exceptions.FAILURE_TYPES]
    for row, kind in zip(rows, exceptions.FAILURE_TYPES, strict=True):
        assert row[1].startswith("no") == kind.non_retryable, kind.failure_type


def test_no_failure_type_is_left_in_the_vocabulary() -> None:
    """A failure type is a class (exceptions.py); the vocabulary names none of them."""
    values = {value for value in vars(v).values() if isinstance(value, str)}
    assert values & FAILURE_TYPE_NAMES == set()


def test_every_name_is_defined_once() -> None:
    """Two names with one value would let a reader pick either; only the deliberate
    aliases (a stage that is also its activity, build_phase as activity and task type)."""
    values: dict[str, list[str]] = {}
    for name, value in vars(v).items():
        if name.isupper() and isinstance(value, str):
            values.setdefault(value, []).append(name)
    doubles = {value: names for value, names in values.items() if len(names) > 1}
    assert doubles == {v.BUILD_PHASE: ["BUILD_PHASE", "TASK_BUILD_PHASE"]}
