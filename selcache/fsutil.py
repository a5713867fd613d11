"""File access beneath a root, through directory file descriptors.

Every path selcache reads or writes inside a root is resolved one component at a
time with ``O_NOFOLLOW``, relative to a directory fd, so a symlink planted in the
root can never lead a read or a write outside it. Special files (FIFOs, devices,
sockets) are refused before they are read: opening a FIFO would block forever.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from .errors import InvalidRoot

#: Inputs larger than this are refused: a policy input file is kilobytes, a
#: compiled policy a few MiB. Anything bigger is a broken or hostile root.
MAX_FILE_SIZE = 256 * 1024 * 1024

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def split_rel(rel: str) -> list[str]:
    """Split a root-relative path, refusing anything that could climb out."""
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise InvalidRoot(f"path {rel!r} climbs out of the root")
    return parts


def open_dir(base_fd: int, rel: str) -> int:
    """Open directory ``rel`` beneath ``base_fd`` without following any symlink.

    Raises FileNotFoundError when a component is missing and InvalidRoot when a
    component is a symlink or not a directory.
    """
    fd = os.dup(base_fd)
    try:
        for part in split_rel(rel):
            try:
                nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise InvalidRoot(
                        f"{rel}: component {part!r} is a symlink or not a directory"
                    ) from exc
                raise
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextmanager
def opened_dir(base_fd: int, rel: str) -> Iterator[int]:
    fd = open_dir(base_fd, rel)
    try:
        yield fd
    finally:
        os.close(fd)


@contextmanager
def opened_root(root: str) -> Iterator[int]:
    """The root itself may be reached through symlinks; nothing below it may."""
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise InvalidRoot(f"root {root!r} does not exist") from exc
    except NotADirectoryError as exc:
        raise InvalidRoot(f"root {root!r} is not a directory") from exc
    try:
        yield fd
    finally:
        os.close(fd)


def lstat_at(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def lstat_rel(base_fd: int, rel: str) -> os.stat_result | None:
    """lstat a root-relative path; None when it or a parent directory is missing."""
    parent, _, name = rel.rpartition("/")
    try:
        with opened_dir(base_fd, parent) as dfd:
            return lstat_at(dfd, name)
    except FileNotFoundError:
        return None


def describe_mode(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symlink"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISDIR(mode):
        return "a directory"
    return "not a regular file"


def read_at(dir_fd: int, name: str, *, what: str = "", max_size: int = MAX_FILE_SIZE) -> bytes:
    """Read a regular file ``name`` in ``dir_fd``; never a symlink, FIFO or device."""
    label = what or name
    try:
        fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InvalidRoot(f"{label} is a symlink") from exc
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidRoot(f"{label} is {describe_mode(st.st_mode)}, expected a regular file")
        if st.st_size > max_size:
            raise InvalidRoot(f"{label} is {st.st_size} bytes, over the {max_size} byte limit")
        chunks = []
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
        data = b"".join(chunks)
        if len(data) > max_size:
            raise InvalidRoot(f"{label} grew past the {max_size} byte limit while being read")
        return data
    finally:
        os.close(fd)


def read_rel(base_fd: int, rel: str, **kwargs: object) -> bytes:
    parent, _, name = rel.rpartition("/")
    with opened_dir(base_fd, parent) as dfd:
        return read_at(dfd, name, what=rel, **kwargs)  # type: ignore[arg-type]


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Entry:
    """A regular file found by ``walk_files``: its path relative to the walk's start."""

    rel: str
    st: os.stat_result


def walk_files(dir_fd: int, prefix: str = "") -> Iterator[Entry]:
    """Every regular file below ``dir_fd`` in sorted order, never following
    symlinks. Special files and symlinks raise InvalidRoot."""
    files: list[Entry] = []
    _walk(dir_fd, prefix, files)
    return iter(files)


def _by_name(entry: os.DirEntry[str]) -> str:
    return entry.name


def _walk(dir_fd: int, prefix: str, out: list[Entry]) -> None:
    # Discovery walks every store directory on every run (one per module),
    # so this loop is the hit path's: directories are told apart by the
    # directory entry's type, without an lstat; only files are stat'ed, their
    # stat is what the stat cache compares.
    with os.scandir(dir_fd) as it:
        entries = sorted(it, key=_by_name)
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            sub = os.open(entry.name, _DIR_FLAGS, dir_fd=dir_fd)
            try:
                _walk(sub, f"{prefix}{entry.name}/", out)
            finally:
                os.close(sub)
            continue
        st = entry.stat(follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidRoot(f"{prefix}{entry.name} is {describe_mode(st.st_mode)}, "
                              "expected a regular file")
        out.append(Entry(prefix + entry.name, st))


def fsync_dir(dir_fd: int) -> None:
    os.fsync(dir_fd)


def makedirs_at(base_fd: int, rel: str, mode: int = 0o755) -> None:
    """mkdir -p beneath ``base_fd``, refusing symlinked components."""
    fd = os.dup(base_fd)
    try:
        for part in split_rel(rel):
            try:
                os.mkdir(part, mode, dir_fd=fd)
            except FileExistsError:
                pass
            nfd = open_dir(fd, part)
            os.close(fd)
            fd = nfd
    finally:
        os.close(fd)


def write_new_at(dir_fd: int, name: str, data: bytes, mode: int) -> None:
    """Create ``name`` (which must not exist), write, fsync. Never touches an
    existing file: O_EXCL refuses one, including a dangling symlink."""
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 mode & 0o7777, dir_fd=dir_fd)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fchmod(fd, mode & 0o7777)
        os.fsync(fd)
    finally:
        os.close(fd)


#: Temporary files of ``atomic_write_at`` are named ``.NAME`` + this + a pid;
#: a crash leaves one behind, which the writer's owner cleans up.
TMP_INFIX = ".selcache-tmp."


def atomic_write_at(dir_fd: int, name: str, data: bytes, mode: int = 0o644) -> None:
    """Crash-safe replace: temp file beside the target, fsync, rename, fsync dir."""
    tmp = f".{name}{TMP_INFIX}{os.getpid()}"
    try:
        os.unlink(tmp, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    try:
        write_new_at(dir_fd, tmp, data, mode)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(dir_fd)
