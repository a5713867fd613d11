"""Install an output set into a root, all or nothing.

An output set spans two directory trees: the store's ``active/`` (computed
files such as policy.kern) and the final policy directory ``etc/selinux/TYPE``
(policy.N, file_contexts*, seusers). For each tree that changes, selcache
builds a complete new copy beside it: unchanged files are hard links (nothing
is ever written in place, so a file hardlinked into an ostree repo is never
modified), changed files are new files with the replaced file's mode and
SELinux label. One ``renameat2(RENAME_EXCHANGE)`` per tree then swaps old and
new. On ostree-style roots the store lives inside ``etc/selinux/TYPE`` and one
exchange commits everything. With two trees, an intent journal written before
the first exchange lets the next run roll an interrupted install forward
(``recover``). libsemanage itself commits by renaming ``active`` too
(semanage_commit_sandbox), without the exchange.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import stat
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

from . import fsutil
from .errors import Busy, InstallError, InvalidRoot
from .layout import Layout

log = logging.getLogger(__name__)

SELINUX_XATTR = "security.selinux"
STAGING_SUFFIX = ".selcache-new"
_RENAME_EXCHANGE = 2
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class InstallReport:
    written: tuple[str, ...] = ()
    trees: tuple[str, ...] = ()
    exchanged: bool = True
    seconds: float = 0.0
    recovered: tuple[str, ...] = field(default=())


def _renameat2_exchange(dir_fd: int, a: str, b: str) -> None:
    fn = getattr(_libc, "renameat2", None)
    if fn is None:
        raise OSError(errno.ENOSYS, "renameat2 not available")
    if fn(dir_fd, a.encode(), dir_fd, b.encode(), _RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"renameat2({a}, {b}, RENAME_EXCHANGE): {os.strerror(err)}")


def _exchange(parent_fd: int, name: str, staging: str) -> bool:
    """Swap ``staging`` and ``name``. Returns False if the fallback (two plain
    renames, with a short window where ``name`` is missing) had to be used."""
    try:
        _renameat2_exchange(parent_fd, staging, name)
        return True
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
    aside = f".{name}.selcache-old"
    os.rename(name, aside, src_dir_fd=parent_fd, dst_dir_fd=parent_fd)
    os.rename(staging, name, src_dir_fd=parent_fd, dst_dir_fd=parent_fd)
    os.rename(aside, staging, src_dir_fd=parent_fd, dst_dir_fd=parent_fd)
    return False


def _syncfs(fd: int) -> None:
    fn = getattr(_libc, "syncfs", None)
    if fn is None or fn(fd) != 0:
        os.sync()


def _get_label(fd: int) -> bytes | None:
    try:
        return os.getxattr(fd, SELINUX_XATTR)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            return None
        raise


def _set_label(fd: int, label: bytes | None) -> None:
    if label is not None:
        os.setxattr(fd, SELINUX_XATTR, label)


@contextmanager
def root_lock(layout: Layout, *, timeout: float = 60.0) -> Iterator[None]:
    """Serialise selcache runs on one root. The lock is an flock on the store
    root directory (never replaced, unlike active/ or etc/selinux/TYPE)."""
    with fsutil.opened_root(layout.root) as rfd:
        fd = fsutil.open_dir(rfd, layout.store_root)
    try:
        _flock(fd, timeout, f"/{layout.store_root} of {layout.root}")
        yield
    finally:
        os.close(fd)


@contextmanager
def semanage_lock(layout: Layout, *, timeout: float = 60.0) -> Iterator[None]:
    """Hold libsemanage's own transaction lock, so no semodule commits while we
    install. The same file libsemanage flocks (semanage_get_trans_lock)."""
    with fsutil.opened_root(layout.root) as rfd, fsutil.opened_dir(rfd, layout.store) as sfd:
        fd = os.open("semanage.trans.LOCK", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=sfd)
    try:
        _flock(fd, timeout, f"libsemanage's lock in /{layout.store}")
        yield
    finally:
        os.close(fd)


def _flock(fd: int, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise Busy(f"timed out after {timeout:.0f}s waiting for {what}") from None
            time.sleep(0.05)


def _digest_at(dir_fd: int, name: str) -> str | None:
    st = fsutil.lstat_at(dir_fd, name)
    if st is None or not stat.S_ISREG(st.st_mode):
        return None
    return hashlib.sha256(fsutil.read_at(dir_fd, name)).hexdigest()


def installed_digest(root_fd: int, rel: str) -> str | None:
    parent, _, name = rel.rpartition("/")
    try:
        with fsutil.opened_dir(root_fd, parent) as dfd:
            return _digest_at(dfd, name)
    except (FileNotFoundError, InvalidRoot):
        return None


class _TreeBuilder:
    """Builds the staging copy of one tree: links for unchanged files, new
    files for changed ones."""

    def __init__(self, replace: Mapping[str, tuple[bytes, int]], mtime_ns: int) -> None:
        self.replace = dict(replace)
        self.mtime_ns = mtime_ns
        self.written: list[str] = []

    def clone(self, src_fd: int, dst_fd: int, prefix: str = "") -> None:
        with os.scandir(src_fd) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            rel = prefix + entry.name
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                sfd = os.open(entry.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=src_fd)
                try:
                    os.mkdir(entry.name, 0o700, dir_fd=dst_fd)
                    dfd = os.open(entry.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW,
                                  dir_fd=dst_fd)
                    try:
                        os.fchmod(dfd, stat.S_IMODE(st.st_mode))
                        _set_label(dfd, _get_label(sfd))
                        self.clone(sfd, dfd, rel + "/")
                    finally:
                        os.close(dfd)
                finally:
                    os.close(sfd)
            elif stat.S_ISREG(st.st_mode):
                if rel in self.replace:
                    data, _mode = self.replace.pop(rel)
                    ofd = os.open(entry.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK,
                                  dir_fd=src_fd)
                    try:
                        label = _get_label(ofd)
                    finally:
                        os.close(ofd)
                    self._write(dst_fd, entry.name, rel, data, stat.S_IMODE(st.st_mode), label)
                else:
                    os.link(entry.name, entry.name, src_dir_fd=src_fd, dst_dir_fd=dst_fd,
                            follow_symlinks=False)
            elif stat.S_ISLNK(st.st_mode):
                os.symlink(os.readlink(entry.name, dir_fd=src_fd), entry.name, dir_fd=dst_fd)
            else:
                raise InvalidRoot(f"{rel} is {fsutil.describe_mode(st.st_mode)}; refusing to "
                                  "install beside it")

    def add_new(self, dst_fd: int) -> None:
        """Outputs that had no file to replace."""
        for rel, (data, mode) in sorted(self.replace.items()):
            parent, _, name = rel.rpartition("/")
            fsutil.makedirs_at(dst_fd, parent)
            with fsutil.opened_dir(dst_fd, parent) as dfd:
                self._write(dfd, name, rel, data, mode, None)
        self.replace.clear()

    def _write(self, dir_fd: int, name: str, rel: str, data: bytes, mode: int,
               label: bytes | None) -> None:
        fsutil.write_new_at(dir_fd, name, data, mode)
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dir_fd)
        try:
            _set_label(fd, label)
            # One timestamp for every file written: libselinux loads
            # file_contexts.bin over file_contexts only when it is not older.
            os.utime(fd, ns=(self.mtime_ns, self.mtime_ns))
        finally:
            os.close(fd)
        self.written.append(rel)


def _journal_name(layout: Layout) -> str:
    return f".selcache-install-{layout.policy_type}.json"


def _trees(layout: Layout) -> list[str]:
    return [layout.final] if layout.store_in_final else [layout.active, layout.final]


def _remove_tree(parent_fd: int, name: str) -> None:
    if fsutil.lstat_at(parent_fd, name) is not None:
        shutil.rmtree(name, dir_fd=parent_fd)


def recover(layout: Layout) -> tuple[str, ...]:
    """Finish or undo an install that was interrupted. Returns what was done."""
    done: list[str] = []
    with fsutil.opened_root(layout.root) as rfd, fsutil.opened_dir(rfd, "etc/selinux") as efd:
        journal_name = _journal_name(layout)
        plan = None
        if fsutil.lstat_at(efd, journal_name) is not None:
            try:
                plan = json.loads(fsutil.read_at(efd, journal_name))
            except ValueError:
                plan = None
        if plan is not None:
            for step in plan.get("steps", []):
                tree, probe, new_sha = step["tree"], step["probe"], step["new_sha256"]
                parent, _, name = tree.rpartition("/")
                staging = f".{name}{STAGING_SUFFIX}"
                with fsutil.opened_dir(rfd, parent) as pfd:
                    if fsutil.lstat_at(pfd, staging) is None:
                        continue
                    live = installed_digest(rfd, f"{tree}/{probe}")
                    staged = installed_digest(rfd, f"{parent}/{staging}/{probe}")
                    if live != new_sha and staged == new_sha:
                        _exchange(pfd, name, staging)
                        done.append(f"rolled forward /{tree}")
        for tree in _trees(layout):
            parent, _, name = tree.rpartition("/")
            try:
                with fsutil.opened_dir(rfd, parent) as pfd:
                    staging = f".{name}{STAGING_SUFFIX}"
                    if fsutil.lstat_at(pfd, staging) is not None:
                        _remove_tree(pfd, staging)
                        done.append(f"removed leftover /{parent}/{staging}")
                        os.fsync(pfd)
            except FileNotFoundError:
                pass
        if plan is not None or fsutil.lstat_at(efd, journal_name) is not None:
            os.unlink(journal_name, dir_fd=efd)
            os.fsync(efd)
    for line in done:
        log.warning("recovered an interrupted install: %s", line)
    return tuple(done)


def _next_commit_num(active_fd: int) -> bytes:
    """libsemanage's format: the decimal number NUL-padded to 32 bytes
    (semanage_commit_sandbox); an unreadable one counts as 0, as it does there."""
    try:
        text = fsutil.read_at(active_fd, "commit_num", max_size=64).split(b"\0")[0].strip()
        old = int(text or b"0")
    except (FileNotFoundError, ValueError):
        old = 0
    return str(max(old, 0) + 1).encode().ljust(32, b"\0")


def install_outputs(layout: Layout, outputs: Mapping[str, tuple[bytes, int]]) -> InstallReport:
    """Make the root's output files equal ``outputs`` (root-relative path ->
    (bytes, mode)), all or nothing. The caller holds the root lock."""
    start = time.monotonic()
    recovered = recover(layout)
    trees = _trees(layout)
    by_tree: dict[str, dict[str, tuple[bytes, int]]] = {t: {} for t in trees}
    for rel, value in outputs.items():
        owner = next((t for t in sorted(trees, key=len, reverse=True) if rel.startswith(t + "/")), None)
        if owner is None:
            raise InstallError(f"output {rel} lies outside /{layout.active} and /{layout.final}")
        by_tree[owner][rel[len(owner) + 1:]] = value

    mtime_ns = time.time_ns()
    staged: list[tuple[str, str, str, str]] = []  # tree, parent, name, staging
    written: list[str] = []
    journal_steps = []
    try:
        with fsutil.opened_root(layout.root) as rfd:
            for tree in trees:
                files = by_tree[tree]
                changed = {rel: v for rel, v in files.items()
                           if installed_digest(rfd, f"{tree}/{rel}") != hashlib.sha256(v[0]).hexdigest()}
                if not changed:
                    continue
                parent, _, name = tree.rpartition("/")
                fsutil.makedirs_at(rfd, tree)
                with fsutil.opened_dir(rfd, parent) as pfd, fsutil.opened_dir(pfd, name) as tfd:
                    if tree == layout.active:
                        changed["commit_num"] = (_next_commit_num(tfd), 0o644)
                    staging = f".{name}{STAGING_SUFFIX}"
                    _remove_tree(pfd, staging)
                    os.mkdir(staging, 0o700, dir_fd=pfd)
                    staged.append((tree, parent, name, staging))
                    with fsutil.opened_dir(pfd, staging) as sfd:
                        tst = os.fstat(tfd)
                        os.fchmod(sfd, stat.S_IMODE(tst.st_mode))
                        _set_label(sfd, _get_label(tfd))
                        builder = _TreeBuilder(changed, mtime_ns)
                        builder.clone(tfd, sfd)
                        builder.add_new(sfd)
                        written += [f"{tree}/{r}" for r in builder.written]
                        _syncfs(sfd)
                    os.fsync(pfd)
                probe = sorted(r for r in changed if r != "commit_num")[0] if len(changed) > 1 \
                    else next(iter(changed))
                journal_steps.append({"tree": tree, "probe": probe,
                                      "new_sha256": hashlib.sha256(changed[probe][0]).hexdigest()})
            if not staged:
                return InstallReport(seconds=time.monotonic() - start, recovered=recovered)
            with fsutil.opened_dir(rfd, "etc/selinux") as efd:
                if len(staged) > 1:
                    # Commit point: from here on the next run rolls forward.
                    fsutil.atomic_write_at(efd, _journal_name(layout),
                                           json.dumps({"version": 1, "steps": journal_steps}).encode(),
                                           0o600)
                atomic = True
                for tree, parent, name, staging in staged:
                    with fsutil.opened_dir(rfd, parent) as pfd:
                        atomic &= _exchange(pfd, name, staging)
                        os.fsync(pfd)
                staged_done = list(staged)
                staged = []
                for tree, parent, name, staging in staged_done:
                    with fsutil.opened_dir(rfd, parent) as pfd:
                        _remove_tree(pfd, staging)
                        os.fsync(pfd)
                if len(staged_done) > 1:
                    os.unlink(_journal_name(layout), dir_fd=efd)
                    os.fsync(efd)
    except InvalidRoot:
        _discard(layout, staged)
        raise
    except OSError as exc:
        _discard(layout, staged)
        raise InstallError(f"installing into {layout.root} failed before anything was "
                           f"replaced: {exc}") from exc
    seconds = time.monotonic() - start
    log.info("installed %d files into %s in %.3fs", len(written), layout.root, seconds)
    return InstallReport(written=tuple(written), trees=tuple(t for t, *_ in staged_done),
                         exchanged=atomic, seconds=seconds, recovered=recovered)


def _discard(layout: Layout, staged: list[tuple[str, str, str, str]]) -> None:
    with fsutil.opened_root(layout.root) as rfd:
        for _tree, parent, _name, staging in staged:
            try:
                with fsutil.opened_dir(rfd, parent) as pfd:
                    _remove_tree(pfd, staging)
            except OSError as exc:
                log.warning("could not remove staging dir %s/%s: %s", parent, staging, exc)
