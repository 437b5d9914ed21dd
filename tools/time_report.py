"""`tools/time-report`: where recent builds' time went, read from their summaries in
SUMMARY_DIR (the `time` section each summary has since pickup and work limits): the
slowest agent stages, the pickup waits by agent, the block decision waits. Text for
people, `--json` for scripts; summaries from before that section are counted, not read."""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

from tools.common import EXIT_OK, worker_config

MAX_SUMMARY_BYTES = 4 * 1024 * 1024
OPTIONS: list[tuple[tuple[str, ...], dict[str, Any]]] = [
    (("--days",), {"type": float, "default": 7.0, "help": "builds ended this recently"}),
    (("--limit",), {"type": int, "default": 1000, "help": "most summaries read (newest)"}),
    (("--top",), {"type": int, "default": 10, "help": "slowest stages listed"}),
    (("--json",), {"action": "store_true", "help": "one JSON document on stdout"}),
]


def _when(value: Any) -> datetime | None:
    try:
        moment = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def read_summaries(folder: Path, since: datetime, limit: int) -> tuple[list[dict[str, Any]], int]:
    """(summaries ended since `since`, newest first; how many could not be read)."""
    from exceptions import TaskFileError
    from taskfiles.bounded_yaml import load_agent_yaml
    from taskfiles.safe_io import read_agent_file

    def modified(path: Path) -> float:
        try:
            return path.lstat().st_mtime
        except OSError:
            return 0.0

    paths = sorted((p for p in folder.glob("*/*.yml") if not p.name.startswith(".")),
                   key=modified, reverse=True)[:limit]
    found, unreadable = [], 0
    for path in paths:
        try:
            document = load_agent_yaml(read_agent_file(path, MAX_SUMMARY_BYTES).decode())
        except (OSError, ValueError, TaskFileError, yaml.YAMLError):
            unreadable += 1
            continue
        ended = _when(document.get("ended_at")) if isinstance(document, dict) else None
        if ended is None:
            unreadable += 1
        elif ended >= since:
            found.append(document)
    return found, unreadable


def stage_rows(summaries: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per agent task: its build, stage, agent, pickup, work and total seconds."""
    rows = []
    for summary in summaries:
        time = summary.get("time")
        for stage in (time.get("stages") or []) if isinstance(time, dict) else []:
            if not isinstance(stage, dict):
                continue
            written, done = _when(stage.get("written_at")), _when(stage.get("done_at"))
            rows.append({
                "build_name": summary.get("build_name"), "workflow_id": summary.get("workflow_id"),
                "stage": stage.get("stage"), "agent": stage.get("agent"),
                "attempt": stage.get("attempt"), "outcome": stage.get("outcome"),
                "pickup_seconds": stage.get("pickup_seconds"),
                "work_seconds": stage.get("work_seconds"),
                "total_seconds": (round((done - written).total_seconds(), 3)
                                  if written and done else None),
                "reminders": stage.get("reminders", 0)})
    return rows


def _figures(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"count": 0, "median_seconds": None, "max_seconds": None}
    return {"count": len(values), "median_seconds": round(statistics.median(values), 3),
            "max_seconds": round(max(values), 3)}


def by_agent(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pickup waits per agent: tasks, how many were seen claimed, median and max wait."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[str(row["agent"])].append(row)
    report = []
    for agent, tasks in groups.items():
        waits = [float(r["pickup_seconds"]) for r in tasks if r["pickup_seconds"] is not None]
        figures = _figures(waits)
        report.append({"agent": agent, "tasks": len(tasks), "claims_seen": figures["count"],
                       "median_pickup_seconds": figures["median_seconds"],
                       "max_pickup_seconds": figures["max_seconds"],
                       "reminders": sum(int(r["reminders"] or 0) for r in tasks)})
    return sorted(report, key=lambda r: -(r["max_pickup_seconds"] or 0))


def decision_waits(summaries: Iterable[dict[str, Any]]) -> dict[str, Any]:
    waits = []
    for summary in summaries:
        time = summary.get("time")
        for wait in (time.get("decision_waits") or []) if isinstance(time, dict) else []:
            if isinstance(wait, dict) and wait.get("seconds") is not None:
                waits.append(float(wait["seconds"]))
    return _figures(waits)


def report(folder: Path, days: float, limit: int, top: int) -> dict[str, Any]:
    since = datetime.now(UTC) - timedelta(days=days)
    summaries, unreadable = read_summaries(folder, since, limit)
    timed = [s for s in summaries if isinstance(s.get("time"), dict)]
    rows = stage_rows(timed)
    slowest = sorted((r for r in rows if r["total_seconds"] is not None),
                     key=lambda r: -r["total_seconds"])[:top]
    return {"summary_dir": str(folder), "since": since.isoformat(timespec="seconds"),
            "builds": len(summaries), "builds_without_times": len(summaries) - len(timed),
            "unreadable": unreadable, "agent_tasks": len(rows), "slowest_stages": slowest,
            "pickup_by_agent": by_agent(rows), "decision_waits": decision_waits(timed)}


def _s(value: Any) -> str:
    return "-" if value is None else f"{float(value):.1f}s"


def print_text(found: dict[str, Any], days: float) -> None:
    print(f"time-report: {found['builds']} build(s) ended in the last {days:g} day(s), "
          f"{found['agent_tasks']} agent task(s) ({found['summary_dir']}"
          + (f"; {found['builds_without_times']} without times" if found[
              "builds_without_times"] else "")
          + (f"; {found['unreadable']} unreadable" if found["unreadable"] else "") + ")")
    print("\nSlowest stages (task written -> done):")
    print(f"{'BUILD':<24} {'STAGE':<24} {'AGENT':<18} {'PICKUP':>9} {'WORK':>9} "
          f"{'TOTAL':>9}  OUTCOME")
    for row in found["slowest_stages"]:
        print(f"{str(row['build_name'])[:24]:<24} {str(row['stage'])[:24]:<24} "
              f"{str(row['agent'])[:18]:<18} {_s(row['pickup_seconds']):>9} "
              f"{_s(row['work_seconds']):>9} {_s(row['total_seconds']):>9}  {row['outcome']}")
    print("\nPickup waits by agent:")
    print(f"{'AGENT':<24} {'TASKS':>6} {'CLAIMED':>8} {'MEDIAN':>9} {'MAX':>9} {'REMINDED':>9}")
    for row in found["pickup_by_agent"]:
        print(f"{row['agent'][:24]:<24} {row['tasks']:>6} {row['claims_seen']:>8} "
              f"{_s(row['median_pickup_seconds']):>9} {_s(row['max_pickup_seconds']):>9} "
              f"{row['reminders']:>9}")
    waits = found["decision_waits"]
    print(f"\nBlock decisions: {waits['count']}, median {_s(waits['median_seconds'])}, "
          f"max {_s(waits['max_seconds'])}")


def time_report(_settings: Any, args: argparse.Namespace) -> int:
    config = worker_config()
    found = report(config.summary_dir, args.days, args.limit, args.top)
    if args.json:
        print(json.dumps(found, indent=2))
    else:
        print_text(found, args.days)
    return EXIT_OK
