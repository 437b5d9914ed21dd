"""Task files found by id (a file per id, archives and dead letters included), and
updated under a per-id lock so two writers never lose each other's change."""

from __future__ import annotations

import fcntl
import fnmatch
import glob
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from exceptions import (
    AmbiguousTaskError,
    TaskFileError,
    TaskNotFoundError,
)
from policies import TASK_LOCK_WAIT
from taskfiles.documents import (
    MAX_TASK_FILE_BYTES,
    created_at,
    dump_task,
    parse_task,
    read_task,
    task_filename,
)
from taskfiles.safe_io import (
    DIR_FLAGS,
    folder_descriptor,
    is_link_error,
    read_capped,
    shown_path,
    write_private_atomic,
)
from vocabulary import LOCKS_DIR, TASK_SEARCH_SUBDIRS

log = logging.getLogger(__name__)

# How many unreadable or skipped entries a failed lookup names.
MAX_REPORTED_PROBLEMS = 5
# Files named for one id prefix a lookup reads at most: a task has one, two ids sharing
# eight characters are one in four billion; more are planted, and reading each (up to
# 1 MiB) for every lookup would let a few hundred of them stall the worker.
MAX_PREFIX_CANDIDATES = 16


def task_file_path(queue_dir: Path, task: dict[str, Any], created: datetime | None = None, *,
                   may_exist: bool = True) -> Path:
    """Where `write_task` puts `task`: the file already carrying its id, else a new name.

    Known before the write, so a task can name its own file (its completion command)."""
    if may_exist:
        try:
            return find_task(queue_dir, task["id"], search_archives=False, full_scan=False)
        except TaskNotFoundError:
            pass
    return queue_dir / task_filename(task["id"], created or created_at(task))


def write_task(queue_dir: Path, task: dict[str, Any], created: datetime | None = None, *,
               may_exist: bool = True, path: Path | None = None) -> Path:
    """Write a new task file; a file already carrying this id is rewritten in place.

    `may_exist=False` skips that lookup (a directory listing) when the caller knows the id
    is new, e.g. the first attempt of a dispatch. `path` is a `task_file_path` result the
    caller already holds."""
    target = path or task_file_path(queue_dir, task, created, may_exist=may_exist)
    return write_private_atomic(target, dump_task(task), base=queue_dir)


_TOP_ID_LINE = re.compile(rb"^id:[ \t]*['\"]?([^'\"\s#]*)", re.MULTILINE)


def _names_another_id(raw: bytes, needle: bytes) -> bool:
    """Whether a block-style file's own top-level `id:` line names another task, though
    `needle` (a task id) is in it: tasks name their pipeline's originating task in the
    payload, so a full scan for that task would otherwise parse each of them."""
    if not needle:
        return False
    ids = _TOP_ID_LINE.findall(raw)
    # A needle may be an id's prefix (a lookup by the 8 characters a file is named for).
    return len(ids) == 1 and not ids[0].startswith(needle)


class _Lookup:
    """One lookup's open folders (queue, then archive/ and dead-letters/ unless they are
    links) and what it had to skip."""

    def __init__(self, queue_dir: Path, search_archives: bool) -> None:
        self.known = {queue_dir, *(queue_dir / sub for sub in TASK_SEARCH_SUBDIRS)}
        self.problems: list[str] = []
        self.folders: list[tuple[Path, int]] = []
        try:
            queue_fd = os.open(queue_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            return
        self.folders.append((queue_dir, queue_fd))
        for sub in TASK_SEARCH_SUBDIRS if search_archives else ():
            try:
                self.folders.append((queue_dir / sub, os.open(sub, DIR_FLAGS, dir_fd=queue_fd)))
            except FileNotFoundError:
                continue
            except OSError as err:
                reason = ("is a symlink; not searched" if is_link_error(err, sub, queue_fd)
                          else "is not a directory; not searched")
                self.report(queue_dir / sub, reason)

    def close(self) -> None:
        for _, fd in self.folders:
            os.close(fd)
        self.folders.clear()

    def report(self, path: Path, reason: str) -> None:
        self.problems.append(f"{shown_path(path)}: {reason}")
        log.warning("task_file_skipped", extra={"path": shown_path(path), "reason": reason})

    def candidates(self, pattern: str) -> Iterator[tuple[Path, int, str]]:
        for folder, fd in self.folders:
            try:
                names = sorted(os.listdir(fd))
            except OSError as err:
                self.report(folder, f"cannot list: {err.strerror}")
                continue
            for name in names:
                if not name.startswith(".") and fnmatch.fnmatchcase(name, pattern):
                    yield folder, fd, name

    def read(self, folder: Path, fd: int, name: str,
             needle: bytes = b"") -> dict[str, Any] | None:
        """The task in `folder/name`; None when unreadable, or when its bytes do not
        contain `needle` (most files of a full scan are other tasks: no YAML parse).
        No Path per file: a miss reads every file, and a Path each was an eighth of it."""
        shown = shown_path(os.path.join(folder, name))
        try:
            raw = read_capped(name, MAX_TASK_FILE_BYTES, shown, fd)
            if needle not in raw or _names_another_id(raw, needle):
                return None
            return parse_task(shown, raw)
        except FileNotFoundError:
            return None
        except TaskFileError as err:
            self.report(folder / name, str(err).removeprefix(f"{shown}: "))
            return None

    def matching(self, pattern: str, task_id: str) -> list[Path]:
        return self.matching_among(self.candidates(pattern), task_id)

    def matching_among(self, names: Iterable[tuple[Path, int, str]], task_id: str
                       ) -> list[Path]:
        found = []
        for folder, fd, name in names:
            task = self.read(folder, fd, name, task_id.encode())
            if task is not None and task.get("id") == task_id:
                found.append(folder / name)
        return found

    def read_hint(self, hint: Path) -> dict[str, Any] | None:
        for folder, fd in self.folders:
            if hint.parent == folder:
                return self.read(folder, fd, hint.name)
        if hint.parent in self.known:
            return None  # a task folder that is missing, or a link this lookup skipped
        try:
            return read_task(hint)
        except TaskFileError:
            return None


def find_task(queue_dir: Path, task_id: str, *, hint: Path | None = None,
              search_archives: bool = True, full_scan: bool = True) -> Path:
    """Locate the one task file with `task_id`.

    Order: the hinted path; files named with the id's 8-char prefix (no file reads
    beyond those candidates); then a full scan of the queue, archive/ and dead-letters/.
    Folders that are links are skipped and reported, never followed. Two files carrying
    the id raise AmbiguousTaskError naming both: a planted copy is never picked silently;
    so do more than MAX_PREFIX_CANDIDATES files named for the prefix, unread.
    """
    lookup = _Lookup(queue_dir, search_archives)
    try:
        if hint is not None:
            task = lookup.read_hint(hint)
            if task is not None and task.get("id") == task_id:
                return hint
        named = list(lookup.candidates(f"*-{glob.escape(task_id[:8])}.yml"))
        if len(named) > MAX_PREFIX_CANDIDATES:
            raise AmbiguousTaskError(
                f"task {task_id!r}: {len(named)} files are named for its prefix "
                f"{task_id[:8]!r} (at most {MAX_PREFIX_CANDIDATES} are read); refusing: "
                f"remove the stray files")
        found = lookup.matching_among(named, task_id)
        if not found and full_scan:
            found = lookup.matching("*.yml", task_id)
    finally:
        lookup.close()
    if len(found) > 1:
        raise AmbiguousTaskError(
            f"task {task_id!r}: {len(found)} files carry this id "
            f"({', '.join(shown_path(path) for path in found[:MAX_REPORTED_PROBLEMS])}); "
            f"refusing to pick one: remove or rename the stray copy")
    if found:
        return found[0]
    skipped = ""
    if lookup.problems:
        more = len(lookup.problems) - MAX_REPORTED_PROBLEMS
        skipped = ("; skipped " + "; ".join(lookup.problems[:MAX_REPORTED_PROBLEMS])
                   + (f"; and {more} more" if more > 0 else ""))
    raise TaskNotFoundError(f"task {task_id!r} not found in {shown_path(queue_dir)} "
                            f"(nor in {', '.join(TASK_SEARCH_SUBDIRS)}){skipped}")


def find_by_prefix(queue_dir: Path, prefix: str, accept: Callable[[dict[str, Any]], bool],
                   *, search_archives: bool = False) -> list[tuple[Path, dict[str, Any]]]:
    """The task files named `*-<prefix>.yml` whose id starts with `prefix` and that
    `accept` takes: for a caller that knows only an id's first 8 characters (the
    dispatcher's workflow id). No full scan; more than MAX_PREFIX_CANDIDATES files named
    for the prefix raise AmbiguousTaskError, unread."""
    lookup = _Lookup(queue_dir, search_archives)
    try:
        named = list(lookup.candidates(f"*-{glob.escape(prefix)}.yml"))
        if len(named) > MAX_PREFIX_CANDIDATES:
            raise AmbiguousTaskError(
                f"{len(named)} files are named for the id prefix {prefix!r} (at most "
                f"{MAX_PREFIX_CANDIDATES} are read); refusing: remove the stray files")
        found = []
        for folder, fd, name in named:
            task = lookup.read(folder, fd, name, prefix.encode())
            if (task is not None and str(task.get("id", "")).startswith(prefix)
                    and accept(task)):
                found.append((folder / name, task))
        return found
    finally:
        lookup.close()


def update_task(path: Path, mutate: Callable[[dict[str, Any]], None], *,
                base: Path | None = None) -> dict[str, Any]:
    """Read, change and atomically rewrite a task file (mode stays 0600). With `base`
    (the task folder it was found in), no link below `base` is followed. Done under the
    lock task-queue-mcp takes for the same task (`.locks/<id>.lock`), when its folder is
    there: an operator's Approve or Cancel is never overwritten by a rewrite of ours."""
    task_id = read_task(path, base=base).get("id")
    with _queue_lock(path, base, task_id if isinstance(task_id, str) else ""):
        task = read_task(path, base=base)
        mutate(task)
        write_private_atomic(path, dump_task(task), base=base)
    return task


_LOCK_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


@contextmanager
def _queue_lock(path: Path, base: Path | None, task_id: str) -> Iterator[None]:
    """flock on `<queue>/.locks/<task_id>.lock` (created as the tools create it), waited
    for at most TASK_LOCK_WAIT; without the folder, or past the wait, no lock (logged)."""
    root = Path(base) if base is not None else path.parent
    if root.name in TASK_SEARCH_SUBDIRS:
        root = root.parent
    if not _LOCK_NAME_RE.fullmatch(task_id):
        yield
        return
    try:
        with folder_descriptor(root / LOCKS_DIR, root, create=False) as dir_fd:
            fd = os.open(f"{task_id}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW
                         | os.O_NONBLOCK | os.O_CLOEXEC, 0o666, dir_fd=dir_fd)
    except (FileNotFoundError, TaskFileError, OSError):
        yield  # no lock folder (no task-queue-mcp here), or not one we can use
        return
    try:
        locked = _flock_within(fd, TASK_LOCK_WAIT.total_seconds())
        if not locked:
            log.warning("task_lock_not_taken", extra={"task_id": task_id,
                                                      "waited_seconds": TASK_LOCK_WAIT.seconds})
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _flock_within(fd: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        except OSError:
            return False
