"""The platform's event log (agent-bus), written the platform's way.

The platform's agents and dashboards follow one append-only log of JSON lines per UTC
day, `<comms dir>/logs/<date>-cross-agent.jsonl`, which several processes append to.
Each line after a file's first carries `prev_hash`, the SHA-256 of the line before it;
the platform's chain check fails at the first line whose writer did not hold the log's
lock while it read the last line and appended its own. So every append here takes
flock(LOCK_EX) on the log file, reads its last line, sets `prev_hash`, writes with
O_APPEND and fsyncs before it lets go (task-queue/PROTOCOL.md §7).

Unlike the platform's own writers, this one never waits long: the lock is tried for
LOCK_WAIT_SECONDS, then the append gives up with EventLogError. Everything here is
blocking file I/O; callers run it off the event loop.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import socket
import stat
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from exceptions import EventLogError
from policies import EVENT_LOG_LOCK_WAIT
from vocabulary import BUS_LOGS_DIR, BUS_SCOPE

LOCK_WAIT_SECONDS = EVENT_LOG_LOCK_WAIT.total_seconds()
LOCK_RETRY_SECONDS = 0.01
TAIL_CHUNK_BYTES = 8192
# A last line longer than this cannot be one of the platform's events: refuse to chain
# onto it rather than read a planted gigabyte.
MAX_LAST_LINE_BYTES = 1024 * 1024
FILE_MODE = 0o644  # as the platform's writers create it (umask applies)


def log_path(comms_dir: Path, now: datetime | None = None) -> Path:
    """Today's (UTC) cross-agent log under `comms_dir`."""
    day = (now or datetime.now(UTC)).astimezone(UTC).strftime("%Y-%m-%d")
    return comms_dir / BUS_LOGS_DIR / f"{day}-{BUS_SCOPE}.jsonl"


def new_record(event: str, source: str, summary: str, *, target: str | None = None,
               artifact_path: str | None = None,
               metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """An event in the platform's record shape and key order; `prev_hash` is added when
    it is appended."""
    return {
        "id": str(uuid.uuid4()),
        "ts": datetime.now(UTC).isoformat(),
        "event": event,
        "scope": BUS_SCOPE,
        "source": source,
        "target": target,
        "artifact_path": artifact_path,
        "summary": summary,
        "hostname": socket.gethostname(),
        "metadata": metadata or {},
    }


def line_hash(line: bytes) -> str:
    """What the next line's `prev_hash` must be: the SHA-256 of the line as the platform
    hashes it (decoded as UTF-8 with replacement, without its newline)."""
    return hashlib.sha256(line.decode("utf-8", errors="replace").encode()).hexdigest()


def append(comms_dir: Path, records: list[dict[str, Any]],
           lock_wait: float | None = None) -> Path:
    """Append `records` in order to today's log, each chained onto the line before it,
    under one lock; the log's path. EventLogError when the log cannot be used or its lock
    stays taken for `lock_wait` seconds (default LOCK_WAIT_SECONDS); nothing is written
    then."""
    path = log_path(comms_dir)
    fd = _open_log(path)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise EventLogError(f"{path}: not a regular file")
        _lock(fd, path, LOCK_WAIT_SECONDS if lock_wait is None else lock_wait)
        try:
            _append_locked(fd, path, records)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    except OSError as err:
        raise EventLogError(f"{path}: cannot append: {err.strerror}") from None
    finally:
        os.close(fd)
    return path


def _open_log(path: Path) -> int:
    """The log file, opened for reading and appending (created if missing). Agents can
    write below the comms folder: a link in place of `logs/` or of the file redirects
    nothing, and a FIFO stalls nothing (refused by the caller once open)."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                         | os.O_CLOEXEC)
    except OSError as err:
        raise EventLogError(f"{path.parent}: cannot use: {_reason(err)}") from None
    try:
        return os.open(path.name, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                       | os.O_NONBLOCK | os.O_CLOEXEC, FILE_MODE, dir_fd=folder)
    except OSError as err:
        raise EventLogError(f"{path}: cannot open: {_reason(err)}") from None
    finally:
        os.close(folder)


def _reason(err: OSError) -> str:
    return "a symlink" if err.errno == errno.ELOOP else str(err.strerror)


def _lock(fd: int, path: Path, lock_wait: float) -> None:
    """LOCK_EX, tried until `lock_wait` has passed: a writer that keeps the lock (or a
    stuck filesystem) costs the caller that long at most."""
    deadline = time.monotonic() + lock_wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise EventLogError(f"{path}: still locked by another writer after "
                                    f"{lock_wait:g}s") from None
            time.sleep(LOCK_RETRY_SECONDS)


def _append_locked(fd: int, path: Path, records: list[dict[str, Any]]) -> None:
    size = os.fstat(fd).st_size
    last, ends_with_newline = _last_line(fd, size, path)
    # A writer died mid-line: ours start on a line of their own, chained onto that one.
    data = b"" if ends_with_newline else b"\n"
    for record in records:
        line = {key: value for key, value in record.items() if key != "prev_hash"}
        if last is not None:
            line["prev_hash"] = line_hash(last)
        last = json.dumps(line, ensure_ascii=False).encode("utf-8")
        data += last + b"\n"
    while data:
        written = os.write(fd, data)
        data = data[written:]
    os.fsync(fd)


def _last_line(fd: int, size: int, path: Path) -> tuple[bytes | None, bool]:
    """The file's last non-blank line (read backwards from the end) and whether the file
    ends with a newline."""
    if size == 0:
        return None, True
    ends_with_newline = os.pread(fd, 1, size - 1) == b"\n"
    tail = b""
    pos = size
    while pos > 0:
        step = min(TAIL_CHUNK_BYTES, pos)
        pos -= step
        tail = os.pread(fd, step, pos) + tail
        lines = tail.split(b"\n")
        # Unless the read reached the file's start, the first piece may be part of a line.
        whole = lines if pos == 0 else lines[1:]
        for line in reversed(whole):
            if line.strip():
                return line, ends_with_newline
        if len(tail) > MAX_LAST_LINE_BYTES:
            raise EventLogError(f"{path}: last line longer than {MAX_LAST_LINE_BYTES} bytes")
    return None, ends_with_newline
