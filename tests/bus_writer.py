"""ANOTHER WRITER of the platform's event log, for the tests: appends events the way the
platform's own writers do (task-queue/PROTOCOL.md §7: flock LOCK_EX, read the last line,
prev_hash, O_APPEND, fsync), written apart from telemetry/event_log.py so the two are checked
against each other, not against themselves.

    python -m tests.bus_writer LOG_FILE STOP_FILE SEED

appends `task.completed` events from source `bus-writer` to LOG_FILE, pausing a seeded
random 0-20 ms between them, until STOP_FILE exists; prints how many it wrote.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

SOURCE = "bus-writer"
TAIL = 64 * 1024


def last_line(handle: BinaryIO) -> str | None:
    """The last non-blank line, from the file's last TAIL bytes (the test's lines are
    short; the whole file would be read again on every append otherwise)."""
    size = handle.seek(0, os.SEEK_END)
    start = max(0, size - TAIL)
    handle.seek(start)
    pieces = handle.read().split(b"\n")
    lines = [line for line in (pieces if start == 0 else pieces[1:]) if line.strip()]
    return lines[-1].decode("utf-8", errors="replace") if lines else None


def append_one(path: Path, number: int) -> None:
    event = {"id": str(uuid.uuid4()), "ts": datetime.now(UTC).isoformat(),
             "event": "task.completed", "scope": "cross-agent", "source": SOURCE,
             "target": None, "artifact_path": None, "summary": f"other writer {number}",
             "hostname": os.uname().nodename, "metadata": {"n": number}}
    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            previous = last_line(handle)
            if previous is not None:
                event["prev_hash"] = hashlib.sha256(previous.encode()).hexdigest()
            handle.write((json.dumps(event, ensure_ascii=False) + "\n").encode())
            handle.flush()
            os.fsync(handle.fileno())
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def main(argv: list[str]) -> int:
    log, stop, seed = Path(argv[0]), Path(argv[1]), int(argv[2])
    rng = random.Random(seed)
    log.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    while not stop.exists():
        written += 1
        append_one(log, written)
        time.sleep(rng.uniform(0, 0.02))  # pacing, not synchronisation
    print(written)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
