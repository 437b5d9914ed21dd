"""Task files: the YAML contract between the worker and the agents.

Every file here can be written by an agent, so every read and write assumes the worst
(a FIFO, a link swapped in after a check, an alias bomb, a shadow copy, a huge file):

- Reads (`read_agent_file`) open without following a link and without blocking
  (O_NOFOLLOW|O_NONBLOCK), require a regular file by fstat of the open descriptor and
  read at most the cap + 1 bytes. Task YAML is parsed with no anchors/aliases, no tags
  beyond the plain ones and bounded nesting, and the fields the worker acts on are
  type-checked.
- Writes are private and atomic: folders are 0700, the file is created 0600 under a
  random temp name with O_EXCL|O_NOFOLLOW, fsynced, then renamed into place, all through
  a descriptor of the folder. Below `base` (the configured root the caller names) every
  folder is opened with O_NOFOLLOW|O_DIRECTORY, so a link planted or swapped in after a
  check cannot redirect a write or a chmod.
- A lookup by id that finds two files carrying the id is an error naming both.
- A full or read-only folder (ENOSPC, EDQUOT, EROFS) is a DiskWriteError naming the
  folder and the errno; the temp file is removed, and the file in place (if any) is the
  old one, whole: nothing half-written is ever visible under the file's name.
"""

from __future__ import annotations

import errno
import fcntl
import fnmatch
import glob
import logging
import os
import re
import secrets
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from yaml.events import (
    AliasEvent,
    CollectionEndEvent,
    CollectionStartEvent,
    DocumentStartEvent,
    NodeEvent,
    ScalarEvent,
)

from exceptions import (
    AmbiguousTaskError,
    DiskWriteError,
    TaskFileError,
    TaskNotFoundError,
    UnsafeTaskPathError,
)
from policies import TASK_LOCK_WAIT
from visible_text import visible_line
from vocabulary import LOCKS_DIR, SUBMITTED, TASK_SEARCH_SUBDIRS

log = logging.getLogger(__name__)

SOURCE_AGENT = "temporal-worker"
TASK_TTL_DAYS = 7
MAX_TASK_FILE_BYTES = 1024 * 1024
MAX_TASK_DEPTH = 32  # the schema needs 4 levels; hand edits get plenty of room
# Scalars and collections in one agent YAML document. A task file has about a hundred, a
# triage of the most findings allowed a few thousand; checking each costs the parser's
# Python loop microseconds, so a megabyte of tiny nodes would cost seconds per read.
MAX_YAML_NODES = 20_000
# Characters of text one agent YAML document may expand to through its aliases (each
# string counted once per place it appears): twice what a file may hold without any.
MAX_EXPANDED_CHARS = 2 * 1024 * 1024
TASK_SUFFIX = ".yml"
# Top-level key of an originating task while a pipeline waits on its decision:
# {workflow_id, run_id, since}, written at stage 6, removed once the decision is recorded.
AWAITING_DECISION = "awaiting_decision"
# A claimed actor as shown in decisions (BlockDecision.claimed_by).
CLAIMED_ACTOR_CHARS = 100
# The fields the worker acts on must be short strings (see check_task_fields).
MAX_STATUS_CHARS = 64
MAX_ACTOR_CHARS = 200
MAX_NOTE_CHARS = 2000
# How many unreadable or skipped entries a failed lookup names.
MAX_REPORTED_PROBLEMS = 5
# Files named for one id prefix a lookup reads at most: a task has one, two ids sharing
# eight characters are one in four billion; more are planted, and reading each (up to
# 1 MiB) for every lookup would let a few hundred of them stall the worker.
MAX_PREFIX_CANDIDATES = 16
# Explicit tags a hand-written file may use; anything else (!!python/..., !!binary,
# !!set, local !tags) is refused.
PLAIN_TAGS = frozenset({"tag:yaml.org,2002:str", "tag:yaml.org,2002:int",
                        "tag:yaml.org,2002:float", "tag:yaml.org,2002:bool",
                        "tag:yaml.org,2002:null", "tag:yaml.org,2002:seq",
                        "tag:yaml.org,2002:map", "!"})

_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_TOP_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC  # the trusted folder: links followed
_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISLNK, "a symlink"))
# Errors of a folder that is full or read-only: they pass when space returns or the
# filesystem is remounted read-write, so writes failing with them are retried.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


def utc_now() -> datetime:
    return datetime.now(UTC)


def timestamp(moment: datetime | None = None) -> str:
    return (moment or utc_now()).astimezone(UTC).isoformat(timespec="seconds").replace(
        "+00:00", "Z")


def shown_path(path: Path | str) -> str:
    """A path for a message: as is when printable, else repr() so a planted name with
    control or bidi characters cannot forge a line in a log, status or notice."""
    text = str(path)
    return text if text.isprintable() else repr(text)


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def disk_error(err: OSError, folder: Path | str, what: str) -> DiskWriteError | None:
    """A DiskWriteError naming `folder` and the errno when `err` says the folder is full or
    read-only, else None (the caller raises what it would have)."""
    if err.errno not in DISK_ERRNOS:
        return None
    code = errno.errorcode.get(err.errno, str(err.errno))
    return DiskWriteError(f"cannot write {what} to {shown_path(folder)}: "
                          f"{err.strerror or os.strerror(err.errno)} ({code})",
                          folder=str(folder), errno=err.errno)


# --- folders, opened by descriptor ------------------------------------------------------

def _is_link(err: OSError, name: str, dir_fd: int) -> bool:
    """Did opening `name` with O_NOFOLLOW fail because it is a link? Linux answers ELOOP,
    or ENOTDIR when O_DIRECTORY was asked too."""
    if err.errno == errno.ELOOP:
        return True
    if err.errno != errno.ENOTDIR:
        return False
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _deepest_existing(path: Path) -> Path:
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def _open_child(fd: int, name: str, shown: Path, *, create: bool) -> tuple[int, bool]:
    """A descriptor of folder `name` under `fd` (never through a link), and whether this
    call created it. Opened first, created only when missing: the folder nearly always
    exists, and every call here is a file write's or read's."""
    try:
        return _open_child_dir(fd, name, shown), False
    except FileNotFoundError:
        if not create:
            raise
    vanished = TaskFileError(f"{shown_path(shown)}: vanished while being created")
    try:
        os.mkdir(name, 0o700, dir_fd=fd)
        created = True
    except FileExistsError:  # made (or planted) since we looked: opened as any other
        created = False
    except FileNotFoundError:  # the folder above removed meanwhile
        raise vanished from None
    except OSError as err:
        raise _child_error(err, fd, name, shown) from None
    try:
        return _open_child_dir(fd, name, shown), created
    except FileNotFoundError:  # removed between our mkdir and open
        raise vanished from None


def _open_child_dir(fd: int, name: str, shown: Path) -> int:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=fd)
    except FileNotFoundError:
        raise
    except OSError as err:
        raise _child_error(err, fd, name, shown) from None


def _child_error(err: OSError, fd: int, name: str, shown: Path) -> TaskFileError:
    full = disk_error(err, shown.parent, f"folder {name!r}")
    if full is not None:
        return full
    if _is_link(err, name, fd):
        return UnsafeTaskPathError(f"{shown_path(shown)}: is a symlink; refusing to follow it")
    if err.errno == errno.ENOTDIR:
        return TaskFileError(f"{shown_path(shown)}: exists but is not a directory")
    return TaskFileError(f"{shown_path(shown)}: cannot open: {err.strerror}")


def _open_folder(directory: Path, base: Path | None, *, create: bool) -> int:
    """A descriptor of `directory`; below the trusted folder no link is followed.

    The trusted folder is `base` when given (the configured root: links in its own path
    are the operator's and followed), else `directory` itself when it exists. Folders
    below it are opened with O_NOFOLLOW|O_DIRECTORY one by one from the previous
    descriptor; with `create`, missing ones (and missing parents of the trusted folder)
    are created 0700, and the leaf is made 0700 through its descriptor, never through a
    link."""
    directory = Path(os.path.abspath(directory))
    trusted = Path(os.path.abspath(base)) if base is not None else directory
    if trusted != directory and trusted not in directory.parents:
        raise UnsafeTaskPathError(f"{shown_path(directory)}: not below {shown_path(trusted)}")
    try:  # the common case, in one call; anything else takes the walk that explains it
        fd = os.open(trusted, _TOP_FLAGS)
        top = trusted
    except OSError:
        top = trusted if os.path.isdir(trusted) else _deepest_existing(trusted)
        if not create and top != trusted:
            raise FileNotFoundError(errno.ENOENT, "no such folder", str(trusted)) from None
        try:
            fd = os.open(top, _TOP_FLAGS)
        except NotADirectoryError:
            raise TaskFileError(f"{shown_path(top)}: exists but is not a directory") from None
        except OSError as err:
            raise TaskFileError(f"{shown_path(top)}: cannot open: {err.strerror}") from None
    try:
        current = top
        for name in directory.relative_to(top).parts:
            current = current / name
            child, created = _open_child(fd, name, current, create=create)
            os.close(fd)
            fd = child
            if created:  # mkdir's mode is cut by the umask
                os.fchmod(fd, 0o700)
        if create and stat.S_IMODE(os.fstat(fd).st_mode) != 0o700 and (
                directory != top or not os.path.islink(directory)):
            # A configured folder that is itself a link belongs to whoever made the link.
            _fchmod_folder(fd, directory)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _fchmod_folder(fd: int, directory: Path) -> None:
    try:
        os.fchmod(fd, 0o700)
    except OSError as err:
        full = disk_error(err, directory, "the folder's mode")
        if full is not None:
            raise full from None
        raise


@contextmanager
def _folder(directory: Path, base: Path | None, *, create: bool) -> Iterator[int]:
    fd = _open_folder(directory, base, create=create)
    try:
        yield fd
    finally:
        os.close(fd)


def ensure_private_dir(directory: Path, *, base: Path | None = None) -> Path:
    """Create `directory` and every missing parent as 0700, and make sure the leaf is 0700.

    mkdir(parents=True) would give the parents the umask's mode (0777 under umask 000);
    folders that already existed above the leaf are the operator's and left alone. With
    `base`, no link between `base` and `directory` (the leaf included) is followed or
    chmodded through: an UnsafeTaskPathError names it."""
    with _folder(directory, base, create=True):
        return directory


# --- reading --------------------------------------------------------------------------

def _read_capped(name: str | Path, max_bytes: int, shown: str, dir_fd: int | None) -> bytes:
    try:
        fd = os.open(name, _READ_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        raise
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise UnsafeTaskPathError(f"{shown}: is a symlink; refusing to follow it") from None
        if err.errno in (errno.ENXIO, errno.EOPNOTSUPP):  # a socket
            raise UnsafeTaskPathError(f"{shown}: is not a regular file") from None
        if err.errno == errno.ENOTDIR:
            raise FileNotFoundError(errno.ENOENT, "no such file", shown) from None
        raise TaskFileError(f"{shown}: cannot read: {err.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnsafeTaskPathError(f"{shown}: is {_kind(info.st_mode)}, not a regular file")
        chunks: list[bytes] = []
        left = max_bytes + 1
        while left > 0:
            try:
                chunk = os.read(fd, min(left, 1024 * 1024))
            except BlockingIOError:
                raise TaskFileError(f"{shown}: cannot read: would block") from None
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    except OSError as err:
        raise TaskFileError(f"{shown}: cannot read: {err.strerror}") from None
    finally:
        os.close(fd)


def read_agent_file(path: Path, max_bytes: int, *, base: Path | None = None) -> bytes:
    """The first `max_bytes` + 1 bytes of an agent-writable file (callers compare the
    length with their cap).

    Never follows a link at `path` (nor, with `base`, in any folder below `base`), never
    blocks (a FIFO is refused by fstat of the open descriptor, not waited on), and
    accepts regular files only. Raises FileNotFoundError when it is absent,
    UnsafeTaskPathError for a link or non-regular file, TaskFileError otherwise."""
    shown = shown_path(path)
    if base is None:
        return _read_capped(path, max_bytes, shown, None)
    try:
        with _folder(path.parent, base, create=False) as dir_fd:
            return _read_capped(path.name, max_bytes, shown, dir_fd)
    except NotADirectoryError:
        raise FileNotFoundError(errno.ENOENT, "no such file", str(path)) from None


# libyaml's parser and loader when PyYAML has them (its wheels do): five times faster than
# PyYAML's own (a task file 1.5 -> 0.3 ms), which is most of a lookup that finds its file.
_SafeLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_agent_yaml(text: str, max_depth: int = MAX_TASK_DEPTH, *,
                    allow_aliases: bool = False) -> Any:
    """Load YAML an agent wrote: at most `max_depth` levels of nesting and MAX_YAML_NODES
    nodes, no explicit tags beyond the plain ones (yaml.YAMLError otherwise). Anchors and
    aliases are refused, or with `allow_aliases` accepted while the document they expand
    to stays within the same two bounds (the platform's tools write an anchor and an
    alias whenever they dump one timestamp twice).

    All of it is checked on the parser's event stream, which stops at the first offence,
    before any node is composed or object built. PyYAML's composer slows down
    quadratically with nesting depth and recurses once per level, so one "[[[[…" file
    would otherwise cost seconds on every read (or end it with a RecursionError); a 1 KB
    alias bomb expands to gigabytes."""
    try:
        _check_events(text, max_depth, allow_aliases)
        return yaml.load(text, Loader=_SafeLoader)  # noqa: S506 - a safe loader, checked above
    except ValueError as err:  # an integer of more than 4300 digits, a lone surrogate
        raise yaml.YAMLError(str(err).splitlines()[0] if str(err) else "invalid") from None


class _EventBudget:
    """What one document's events expand to: values counted with every alias replaced by
    what its anchor holds, and the nesting that expansion reaches."""

    def __init__(self, max_depth: int, allow_aliases: bool) -> None:
        self.max_depth = max_depth
        self.allow_aliases = allow_aliases
        self.depth = self.documents = self.nodes = self.chars = 0
        # anchor -> (values it expands to, levels it spans, characters of text in it)
        self.anchors: dict[str, tuple[int, int, int]] = {}
        # per open collection: [anchor, values before it, levels below it, chars before it]
        self.open: list[list[Any]] = []

    def take(self, event: yaml.Event) -> None:
        if isinstance(event, CollectionEndEvent):
            self._close()
        elif isinstance(event, DocumentStartEvent):
            self.documents += 1
            if self.documents > 1:  # refused now, not after walking a megabyte of documents
                raise yaml.YAMLError(f"expected a single document in the stream (line "
                                     f"{event.start_mark.line + 1})")
        elif isinstance(event, AliasEvent):
            self._alias(event)
        elif isinstance(event, NodeEvent):
            self._node(event)

    def _node(self, event: NodeEvent) -> None:
        line = event.start_mark.line + 1
        text = len(event.value) if isinstance(event, ScalarEvent) else 0
        self._grow(1, 1, line, text)
        if event.anchor is not None and not self.allow_aliases:
            raise yaml.YAMLError(f"anchors/aliases are not allowed (line {line})")
        tag = event.tag if isinstance(event, ScalarEvent | CollectionStartEvent) else None
        if tag is not None and tag not in PLAIN_TAGS:
            raise yaml.YAMLError(f"tag {tag[:60]!r} is not allowed (line {line})")
        if isinstance(event, CollectionStartEvent):
            self.open.append([event.anchor, self.nodes - 1, 0, self.chars])
            self.depth += 1
        elif event.anchor is not None:
            self.anchors[event.anchor] = (1, 1, text)

    def _alias(self, event: AliasEvent) -> None:
        line = event.start_mark.line + 1
        if not self.allow_aliases:
            raise yaml.YAMLError(f"anchors/aliases are not allowed (line {line})")
        found = self.anchors.get(event.anchor or "")
        if found is None:  # undefined, or its own enclosing collection: a cycle
            raise yaml.YAMLError(f"alias {str(event.anchor)[:60]!r} refers to no complete "
                                 f"anchored value (line {line})")
        values, levels, chars = found
        self._grow(values, levels, line, chars)

    def _grow(self, values: int, levels: int, line: int, chars: int = 0) -> None:
        self.nodes += values
        self.chars += chars
        if self.nodes > MAX_YAML_NODES:
            raise yaml.YAMLError(f"more than {MAX_YAML_NODES} values, aliases expanded "
                                 f"(line {line})")
        if self.chars > MAX_EXPANDED_CHARS:
            # A long string aliased many times: small to read, huge once written again.
            raise yaml.YAMLError(f"more than {MAX_EXPANDED_CHARS} characters of text, "
                                 f"aliases expanded (line {line})")
        if self.depth + levels > self.max_depth:
            raise yaml.YAMLError(f"nesting deeper than {self.max_depth} levels")
        if self.open:
            self.open[-1][2] = max(self.open[-1][2], levels)

    def _close(self) -> None:
        anchor, before, below, chars_before = self.open.pop()
        self.depth -= 1
        if self.open:
            self.open[-1][2] = max(self.open[-1][2], below + 1)
        if anchor is not None:
            self.anchors[anchor] = (self.nodes - before, below + 1, self.chars - chars_before)


def _check_events(text: str, max_depth: int, allow_aliases: bool = False) -> None:
    budget = _EventBudget(max_depth, allow_aliases)
    for event in yaml.parse(text, Loader=_SafeLoader):
        budget.take(event)


def _short_string(value: Any, limit: int) -> bool:
    return value is None or (isinstance(value, str) and len(value) <= limit)


def check_task_fields(shown: str, task: dict[str, Any]) -> None:
    """The fields the worker acts on: `id`, `status` and each history entry's `status`,
    `actor` and `note` are strings (or absent/null), short enough to show."""
    if "id" in task and not isinstance(task["id"], str):
        raise TaskFileError(f"{shown}: id must be a string, got {type(task['id']).__name__}")
    if not _short_string(task.get("status"), MAX_STATUS_CHARS):
        raise TaskFileError(f"{shown}: status must be a string of at most "
                            f"{MAX_STATUS_CHARS} characters")
    history = task.get("history")
    if history is None:
        return
    if not isinstance(history, list):
        raise TaskFileError(f"{shown}: history must be a list, got {type(history).__name__}")
    for index, entry in enumerate(history):
        if not isinstance(entry, dict):
            raise TaskFileError(f"{shown}: history[{index}] must be a mapping, got "
                                f"{type(entry).__name__}")
        for key, limit in (("status", MAX_STATUS_CHARS), ("actor", MAX_ACTOR_CHARS),
                           ("note", MAX_NOTE_CHARS)):
            if not _short_string(entry.get(key), limit):
                raise TaskFileError(f"{shown}: history[{index}].{key} must be a string of "
                                    f"at most {limit} characters")


def parse_task(shown: str, raw: bytes) -> dict[str, Any]:
    """Parse task YAML already read (at most the cap + 1 bytes) and check its fields.

    Anchors and aliases are accepted within the expansion budget: the platform's tools
    write them into every file they touch (PROTOCOL.md §1.3)."""
    if len(raw) > MAX_TASK_FILE_BYTES:
        raise TaskFileError(f"{shown}: larger than {MAX_TASK_FILE_BYTES} bytes")
    try:
        document = load_agent_yaml(raw.decode("utf-8"), allow_aliases=True)
    except (UnicodeDecodeError, yaml.YAMLError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TaskFileError(f"{shown}: not valid YAML: {first}") from None
    if not isinstance(document, dict):
        raise TaskFileError(f"{shown}: top level must be a mapping, got "
                            f"{type(document).__name__}")
    check_task_fields(shown, document)
    return document


def read_task(path: Path, *, base: Path | None = None) -> dict[str, Any]:
    """Parse one task file; refuse links, non-regular and oversized files, unsafe YAML,
    non-mappings and mistyped fields (all TaskFileError naming the file). With `base`
    (the task folder it was found in), no link below `base` is followed."""
    try:
        raw = read_agent_file(path, MAX_TASK_FILE_BYTES, base=base)
    except FileNotFoundError:
        raise TaskNotFoundError(f"{shown_path(path)}: no such task file") from None
    return parse_task(shown_path(path), raw)


# --- writing --------------------------------------------------------------------------

def _refuse_link_at(dir_fd: int, name: str, shown: str) -> None:
    try:
        info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(info.st_mode):
        raise UnsafeTaskPathError(f"{shown}: is a symlink; refusing to follow it")
    if not stat.S_ISREG(info.st_mode):
        raise UnsafeTaskPathError(f"{shown}: is not a regular file")


def _write_all(fd: int, data: bytes) -> None:
    # No file object: it would add an fstat and an isatty ioctl to every write.
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_private_atomic(path: Path, data: bytes, *, base: Path | None = None) -> Path:
    """Write `data` to `path` as a 0600 file via temp file + rename; refuse symlinks.

    Everything happens through a descriptor of the folder, so swapping the folder for a
    link after it was opened redirects nothing. With `base` (the configured root the
    path lies under), no folder between `base` and the file may be a link either.
    A full or read-only folder raises DiskWriteError (folder and errno named) after the
    temp file is removed; `path` keeps its old content, or stays absent."""
    shown = shown_path(path)
    with _folder(path.parent, base, create=True) as dir_fd:
        _refuse_link_at(dir_fd, path.name, shown)
        temp = f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            _write_temp_and_rename(dir_fd, temp, path, data)
        except OSError as err:
            full = disk_error(err, path.parent, repr(path.name))
            if full is None:
                raise
            log.warning("disk_write_failed", extra={"folder": full.folder, "file": path.name,
                                                    "errno": errno.errorcode[err.errno],
                                                    "error": str(full)})
            raise full from None
    return path


def task_time(task: dict[str, Any], moment: datetime | None = None) -> datetime | str:
    """A timestamp in the style of `task`: a native YAML timestamp when its `created` is
    one (the platform's tools write them so, PROTOCOL.md §1.3), else v0.5.0's string."""
    moment = (moment or utc_now()).astimezone(UTC)
    return moment if isinstance(task.get("created"), datetime) else timestamp(moment)


def created_at(task: dict[str, Any]) -> datetime:
    """The moment a task says it was created, in either form (str or native)."""
    created = task["created"]
    if isinstance(created, datetime):
        return created if created.tzinfo is not None else created.replace(tzinfo=UTC)
    return datetime.fromisoformat(str(created).replace("Z", "+00:00"))
def _write_temp_and_rename(dir_fd: int, temp: str, path: Path, data: bytes) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(temp, flags, 0o600, dir_fd=dir_fd)
    except FileExistsError:
        raise UnsafeTaskPathError(f"{shown_path(path.with_name(temp))}: temp path already "
                                  f"exists; refusing") from None
    try:
        try:
            os.fchmod(fd, 0o600)
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        _remove_temp(dir_fd, temp, path.parent)
        raise


def _remove_temp(dir_fd: int, temp: str, folder: Path) -> None:
    """Remove a failed write's temp file. Unlinking needs no space, so a full folder
    loses it; only a folder turned read-only since the temp was made keeps it (a
    dot-name that agents and tools skip), and that is logged."""
    try:
        os.unlink(temp, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except OSError as err:
        log.warning("temp_file_left", extra={"folder": shown_path(folder), "file": temp,
                                             "error": err.strerror})


def task_filename(task_id: str, created: datetime) -> str:
    return f"{created.astimezone(UTC):%Y%m%d-%H%M%S}-{task_id[:8]}.yml"


def new_task(*, task_id: str, target_agent: str, task_type: str, summary: str,
             payload: dict[str, Any], created: datetime | None = None) -> dict[str, Any]:
    """A task document in v0.5.0's words with every schema field, status `submitted`."""
    created_at = timestamp(created)
    return {
        "id": task_id,
        "created": created_at,
        "source_agent": SOURCE_AGENT,
        "target_agent": target_agent,
        "task_type": task_type,
        "risk_level": "low",
        "requires_approval": False,
        "status": SUBMITTED,
        "summary": summary,
        "ttl_days": TASK_TTL_DAYS,
        "payload": payload,
        "result": {"output": None, "completed_by": None, "completed_at": None},
        "history": [{"timestamp": created_at, "status": SUBMITTED, "actor": SOURCE_AGENT,
                     "note": "task created"}],
    }


def new_platform_task(*, task_id: str, target_agent: str, task_type: str, summary: str,
                      payload: dict[str, Any], workflow_mode: str,
                      created: datetime | None = None) -> dict[str, Any]:
    """A task document as the platform's task tools write one (PROTOCOL.md §1.2, their key
    order): native timestamps with offset, every key a submitted task has, status
    `submitted` (the dispatcher's to route)."""
    moment = (created or utc_now()).astimezone(UTC)
    return {
        "id": task_id,
        "created": moment,
        "source_agent": SOURCE_AGENT,
        "target_agent": target_agent,
        "task_type": task_type,
        "risk_level": "low",
        "requires_approval": False,
        "workflow_mode": workflow_mode,
        "status": SUBMITTED,
        "summary": summary,
        "ttl_days": TASK_TTL_DAYS,
        "payload": payload,
        "result": {"output": None, "completed_by": None, "completed_at": None},
        "history": [{"timestamp": moment, "status": SUBMITTED, "actor": SOURCE_AGENT,
                     "note": "task created"}],
        "retry_policy": {"next_retry_at": None, "retry_count": 0},
    }


# libyaml's emitter when PyYAML has it (its wheels do): about 6 times faster than
# PyYAML's own, which is most of a task file write, and it escapes the line breaks (NEL,
# LS, PS, CR) that PyYAML's own writes raw inside quoted or literal scalars, where a
# reader turns them into other characters.
_SafeDumper: Any = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


class _TaskDumper(_SafeDumper):
    """Multi-line strings (instructions) as literal blocks, readable by humans; never an
    anchor or alias (the reader refuses them), even for an object used twice."""

    def ignore_aliases(self, _data: Any) -> bool:
        return True


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_TaskDumper.add_representer(str, _represent_str)


def dump_yaml(document: Any) -> bytes:
    return yaml.dump(document, Dumper=_TaskDumper, sort_keys=False, allow_unicode=True,
                     width=2**16).encode()


def dump_task(task: dict[str, Any]) -> bytes:
    return dump_yaml(task)


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


# --- lookup ---------------------------------------------------------------------------

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
                self.folders.append((queue_dir / sub, os.open(sub, _DIR_FLAGS, dir_fd=queue_fd)))
            except FileNotFoundError:
                continue
            except OSError as err:
                reason = ("is a symlink; not searched" if _is_link(err, sub, queue_fd)
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
            raw = _read_capped(name, MAX_TASK_FILE_BYTES, shown, fd)
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
        with _folder(root / LOCKS_DIR, root, create=False) as dir_fd:
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


def claimed_actor(task: dict[str, Any], status: str) -> tuple[str, str]:
    """(actor, note) of the newest history entry that set `status`, as the file claims
    them: anyone who can write the folder can write any name here, so callers show the
    actor as claimed, never as who decided. Empty when nothing usable is there."""
    history = task.get("history")
    for entry in reversed(history if isinstance(history, list) else []):
        if isinstance(entry, dict) and entry.get("status") == status:
            actor, note = entry.get("actor"), entry.get("note")
            return (visible_line(actor, CLAIMED_ACTOR_CHARS) if isinstance(actor, str) else "",
                    visible_line(note, MAX_NOTE_CHARS) if isinstance(note, str) else "")
    return "", ""


def add_history(task: dict[str, Any], *, status: str, actor: str, note: str) -> None:
    """Set the task's status and record who changed it and why (cut to the lengths the
    reader accepts, so the worker never writes a file it would refuse)."""
    task["status"] = status
    history = task.get("history")
    if not isinstance(history, list):
        history = []
        task["history"] = history
    if len(note) > MAX_NOTE_CHARS:
        note = note[:MAX_NOTE_CHARS - 1] + "…"
    history.append({"timestamp": task_time(task), "status": status,
                    "actor": actor[:MAX_ACTOR_CHARS], "note": note})
