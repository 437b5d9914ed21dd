"""Logging (JSON lines) and opt-in telemetry. Nothing is configured at import time."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# Keys of LogRecord itself; anything else passed via `extra=` is ours to print.
_RECORD_KEYS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName"}
CONTEXT_KEYS = ("worker_id", "workflow_id", "activity", "build_name")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, event, worker_id, workflow_id, activity,
    build_name, plus any extra fields."""

    def __init__(self, worker_id: str) -> None:
        super().__init__()
        self.worker_id = worker_id

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "event": record.getMessage(),
            "logger": record.name,
            "worker_id": self.worker_id,
            "workflow_id": None,
            "activity": None,
            "build_name": None,
        }
        temporal = getattr(record, "temporal_activity", None) or getattr(
            record, "temporal_workflow", None)
        if isinstance(temporal, dict):
            entry["workflow_id"] = temporal.get("workflow_id")
            entry["activity"] = temporal.get("activity_type")
        for key, value in vars(record).items():
            if key not in _RECORD_KEYS and not key.startswith("temporal_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str, log_file: Path | None, worker_id: str) -> None:
    formatter = JsonFormatter(worker_id)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(level)
