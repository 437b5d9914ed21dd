"""Safe access to files agents can write: no link followed, no FIFO opened, no read
beyond its cap, every write private and atomic through a descriptor of its folder.

See the package docstring for the threat model."""

from __future__ import annotations

import errno
import logging
import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from exceptions import (
    DiskWriteError,
    TaskFileError,
    UnsafeTaskPathError,
)

log = logging.getLogger(__name__)

_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_TOP_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC  # the trusted folder: links followed
_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISLNK, "a symlink"))
# Errors of a folder that is full or read-only: they pass when space returns or the
# filesystem is remounted read-write, so writes failing with them are retried.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


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

def is_link_error(err: OSError, name: str, dir_fd: int) -> bool:
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
        return os.open(name, DIR_FLAGS, dir_fd=fd)
    except FileNotFoundError:
        raise
    except OSError as err:
        raise _child_error(err, fd, name, shown) from None


def _child_error(err: OSError, fd: int, name: str, shown: Path) -> TaskFileError:
    full = disk_error(err, shown.parent, f"folder {name!r}")
    if full is not None:
        return full
    if is_link_error(err, name, fd):
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
def folder_descriptor(directory: Path, base: Path | None, *, create: bool) -> Iterator[int]:
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
    with folder_descriptor(directory, base, create=True):
        return directory


# --- reading --------------------------------------------------------------------------

def read_capped(name: str | Path, max_bytes: int, shown: str, dir_fd: int | None) -> bytes:
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
        return read_capped(path, max_bytes, shown, None)
    try:
        with folder_descriptor(path.parent, base, create=False) as dir_fd:
            return read_capped(path.name, max_bytes, shown, dir_fd)
    except NotADirectoryError:
        raise FileNotFoundError(errno.ENOENT, "no such file", str(path)) from None


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
    with folder_descriptor(path.parent, base, create=True) as dir_fd:
        _refuse_link_at(dir_fd, path.name, shown)
        temp = f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            _write_temp_and_rename(dir_fd, temp, path, data)
        except OSError as err:
            full = disk_error(err, path.parent, repr(path.name))
            if full is None:
                raise
            log.warning("disk_write_failed", extra={"folder": full.folder, "file": path.name,
                                                    "errno": errno.errorcode[full.errno],
                                                    "error": str(full)})
            raise full from None
    return path


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
