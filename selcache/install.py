"""Install an output set into a root, all or nothing.

An output set spans two directory trees: the store's ``active/`` (computed
files such as policy.kern) and the final policy directory ``etc/selinux/TYPE``
(policy.N, file_contexts*, seusers). For each tree that changes, selcache
builds a complete new copy beside it: unchanged files are hard links (nothing
is ever written in place, so a file hardlinked into an ostree repo is never
modified), changed files are new files with the replaced file's mode and
SELinux label. One ``renameat2(RENAME_EXCHANGE)`` per tree then swaps old and
new; there is no non-atomic fallback. On ostree-style roots the store lives
inside ``etc/selinux/TYPE`` and one exchange commits everything. With two
trees, an intent journal written before the first exchange is the commit
point, and ``recover`` rolls an interrupted install forward (or removes what
an install cut short before it left). libsemanage itself commits by renaming
``active`` too (semanage_commit_sandbox), then copies the final files one by
one, with no recovery.
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
from typing import Any

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
    seconds: float = 0.0
    recovered: tuple[str, ...] = field(default=())


def _renameat2_exchange(dir_fd: int, a: str, b: str) -> None:
    fn = getattr(_libc, "renameat2", None)
    if fn is None:
        raise OSError(errno.ENOSYS, "renameat2 not available")
    if fn(dir_fd, a.encode(), dir_fd, b.encode(), _RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"renameat2({a}, {b}, RENAME_EXCHANGE): {os.strerror(err)}")


#: errno values saying the file system cannot exchange two names atomically.
NO_EXCHANGE = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)


def _exchange(parent_fd: int, name: str, staging: str) -> None:
    """Swap ``staging`` and ``name`` in one step. There is no fallback: two
    plain renames would leave a moment with no ``name`` at all, and a machine
    that boots then finds no policy. Where the file system cannot exchange
    (NFS, some FUSE file systems), installing fails with the root unchanged."""
    _renameat2_exchange(parent_fd, staging, name)


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
    # The store first, then the final files: libsemanage's own order
    # (semanage_commit_sandbox renames the store, then installs the final
    # files). A machine that boots between the two loads the old final files,
    # a complete and consistent set; the journal makes the next run finish.
    return [layout.final] if layout.store_in_final else [layout.active, layout.final]


def _remove_tree(parent_fd: int, name: str) -> None:
    if fsutil.lstat_at(parent_fd, name) is not None:
        shutil.rmtree(name, dir_fd=parent_fd)


def _split(tree: str) -> tuple[str, str, str]:
    """parent, name, staging name."""
    parent, _, name = tree.rpartition("/")
    return parent, name, f".{name}{STAGING_SUFFIX}"


@dataclass(frozen=True)
class TreeState:
    """One tree of an interrupted install.

    ``state``: ``pending`` (the new copy is staged, the exchange is still to
    do: the journal says roll forward), ``exchanged`` (done; the old copy is
    left beside it), ``leftover`` (no journal: a copy staged before the
    commit point, or the old copy after a one-tree exchange; removed),
    ``foreign`` (the tree changed since, e.g. a semodule commit: the staged
    copy is removed and finalize installs from the inputs)."""

    tree: str
    state: str


@dataclass(frozen=True)
class Interrupted:
    """What an interrupted install left in a root, and what recovery will do."""

    committed: bool
    trees: tuple[TreeState, ...]
    stray: tuple[str, ...] = ()

    @property
    def repair(self) -> str:
        return "roll-forward" if any(t.state == "pending" for t in self.trees) else "clean-up"

    def to_json(self) -> dict[str, Any]:
        return {"committed": self.committed, "repair": self.repair,
                "trees": {"/" + t.tree: t.state for t in self.trees},
                "stray": ["/" + p for p in self.stray]}


def _classify(rfd: int, tree: str, live: str, staged: str, step: Mapping[str, Any] | None) -> str:
    if step is None:
        return "leftover"
    parent = _split(tree)[0]
    probe, old, new = step["probe"], step["old_sha256"], step["new_sha256"]
    live_sha = installed_digest(rfd, f"{parent}/{live}/{probe}")
    staged_sha = installed_digest(rfd, f"{parent}/{staged}/{probe}")
    # The probe is a file the install changes, so old != new: which copy
    # holds which tells whether this tree was exchanged.
    if live_sha == new and staged_sha == old:
        return "exchanged"
    if live_sha == old and staged_sha == new:
        return "pending"
    return "foreign"


def _read_journal(efd: int, name: str) -> dict[str, Any] | None:
    if fsutil.lstat_at(efd, name) is None:
        return None
    try:
        plan = json.loads(fsutil.read_at(efd, name, max_size=1 << 20))
        steps = {str(step["tree"]): step for step in plan["steps"]}
        for step in steps.values():
            str(step["probe"]), str(step["new_sha256"]), step["old_sha256"]
    except (ValueError, KeyError, TypeError) as exc:
        # Written with an atomic rename, so only tampering gets here. Without
        # a plan nothing is rolled forward: staged copies are removed, and
        # finalize then installs the right files from the inputs.
        log.warning("install journal /etc/selinux/%s is unreadable (%s); ignoring it", name, exc)
        return {"steps": {}}
    return {"steps": steps}


def _stray_names(efd: int, layout: Layout) -> list[str]:
    prefix = f".{_journal_name(layout)}{fsutil.TMP_INFIX}"
    with os.scandir(efd) as it:
        return sorted(e.name for e in it if e.name.startswith(prefix))


def inspect_install(layout: Layout) -> Interrupted | None:
    """Read-only: what an interrupted install left behind, if anything."""
    with fsutil.opened_root(layout.root) as rfd:
        try:
            efd = fsutil.open_dir(rfd, "etc/selinux")
        except FileNotFoundError:
            return None
        try:
            plan = _read_journal(efd, _journal_name(layout))
            stray = [f"etc/selinux/{n}" for n in _stray_names(efd, layout)]
        finally:
            os.close(efd)
        steps = plan["steps"] if plan else {}
        states = []
        for tree in _trees(layout):
            parent, name, staging = _split(tree)
            try:
                with fsutil.opened_dir(rfd, parent) as pfd:
                    if fsutil.lstat_at(pfd, staging) is None:
                        continue
            except FileNotFoundError:
                continue
            states.append(TreeState(tree, _classify(rfd, tree, name, staging, steps.get(tree))))
    if plan is None and not states and not stray:
        return None
    return Interrupted(committed=plan is not None, trees=tuple(states), stray=tuple(stray))


def recover(layout: Layout) -> tuple[str, ...]:
    """Finish or undo an install that was interrupted. Returns what was done.
    The caller holds the root lock and libsemanage's transaction lock.

    Safe to interrupt at any point: every step leaves a state this function
    recognises, so the next run carries on."""
    done: list[str] = []
    with fsutil.opened_root(layout.root) as rfd, fsutil.opened_dir(rfd, "etc/selinux") as efd:
        journal = _journal_name(layout)
        plan = _read_journal(efd, journal)
        steps = plan["steps"] if plan else {}
        for tree in _trees(layout):
            parent, name, staging = _split(tree)
            try:
                with fsutil.opened_dir(rfd, parent) as pfd:
                    if fsutil.lstat_at(pfd, staging) is None:
                        continue
                    state = _classify(rfd, tree, name, staging, steps.get(tree))
                    if state == "pending":
                        _exchange(pfd, name, staging)
                        os.fsync(pfd)
                        done.append(f"rolled forward /{tree}")
                    elif state == "foreign":
                        done.append(f"/{tree} changed after the interrupted install; "
                                    "discarded its staged copy")
            except FileNotFoundError:
                continue
        # Only once every exchange is done: the staged copies (old trees now,
        # or new ones that never got committed) and then the journal.
        for tree in _trees(layout):
            parent, name, staging = _split(tree)
            try:
                with fsutil.opened_dir(rfd, parent) as pfd:
                    if fsutil.lstat_at(pfd, staging) is not None:
                        _remove_tree(pfd, staging)
                        os.fsync(pfd)
                        done.append(f"removed /{parent}/{staging}")
            except FileNotFoundError:
                continue
        for stray in _stray_names(efd, layout):
            os.unlink(stray, dir_fd=efd)
            done.append(f"removed /etc/selinux/{stray}")
        if plan is not None:
            os.unlink(journal, dir_fd=efd)
            done.append(f"removed the journal /etc/selinux/{journal}")
        if done:
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


def _check_output_path(rfd: int, rel: str) -> None:
    """An output may replace a regular file or fill a missing one; never a
    symlink, a FIFO or a device, and never below a symlinked directory."""
    parts = fsutil.split_rel(rel)
    fd = os.dup(rfd)
    try:
        for i, part in enumerate(parts):
            st = fsutil.lstat_at(fd, part)
            if st is None:
                return
            here = "/".join(parts[: i + 1])
            last = i == len(parts) - 1
            if last and not stat.S_ISREG(st.st_mode):
                raise InvalidRoot(f"/{here} is {fsutil.describe_mode(st.st_mode)} where a policy "
                                  "file belongs; refusing to replace it")
            if not last:
                if not stat.S_ISDIR(st.st_mode):
                    raise InvalidRoot(f"/{here} is {fsutil.describe_mode(st.st_mode)} where a "
                                      "directory belongs; refusing to install through it")
                nfd = fsutil.open_dir(fd, part)
                os.close(fd)
                fd = nfd
    finally:
        os.close(fd)


def install_outputs(layout: Layout, outputs: Mapping[str, tuple[bytes, int]]) -> InstallReport:
    """Make the root's output files equal ``outputs`` (root-relative path ->
    (bytes, mode)), all or nothing. The caller holds the root lock and
    libsemanage's transaction lock."""
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
    with fsutil.opened_root(layout.root) as rfd:
        plan: dict[str, dict[str, tuple[bytes, int]]] = {}
        for tree in trees:
            for rel in by_tree[tree]:
                _check_output_path(rfd, f"{tree}/{rel}")
            changed = {rel: v for rel, v in by_tree[tree].items()
                       if installed_digest(rfd, f"{tree}/{rel}") != hashlib.sha256(v[0]).hexdigest()}
            if changed:
                plan[tree] = changed
    if not plan:
        return InstallReport(seconds=time.monotonic() - start, recovered=recovered)
    try:
        with fsutil.opened_root(layout.root) as rfd:
            for tree, changed in plan.items():
                parent, name, staging = _split(tree)
                fsutil.makedirs_at(rfd, tree)
                with fsutil.opened_dir(rfd, parent) as pfd, fsutil.opened_dir(pfd, name) as tfd:
                    if tree == layout.active:
                        changed["commit_num"] = (_next_commit_num(tfd), 0o644)
                    _remove_tree(pfd, staging)
                    os.mkdir(staging, 0o700, dir_fd=pfd)
                    staged.append((tree, parent, name, staging))
                    probe = sorted(r for r in changed if r != "commit_num")[0]
                    old_sha = installed_digest(tfd, probe)
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
                journal_steps.append({"tree": tree, "probe": probe, "old_sha256": old_sha,
                                      "new_sha256": hashlib.sha256(changed[probe][0]).hexdigest()})
            with fsutil.opened_dir(rfd, "etc/selinux") as efd:
                if len(staged) > 1:
                    # Commit point: from here on the next run rolls forward.
                    fsutil.atomic_write_at(efd, _journal_name(layout),
                                           json.dumps({"version": 1, "steps": journal_steps}).encode(),
                                           0o600)
    except InvalidRoot:
        _discard(layout, staged)
        raise
    except OSError as exc:
        _discard(layout, staged)
        raise InstallError(f"installing into {layout.root} failed before anything was "
                           f"replaced: {exc}") from exc
    _commit(layout, staged)
    seconds = time.monotonic() - start
    log.info("installed %d files into %s in %.3fs", len(written), layout.root, seconds)
    return InstallReport(written=tuple(written), trees=tuple(t for t, *_ in staged),
                         seconds=seconds, recovered=recovered)


def _commit(layout: Layout, staged: list[tuple[str, str, str, str]]) -> None:
    """Exchange every staged tree with its live one, then remove the old copies
    and the journal. If an exchange fails, undo the ones done so the root is
    as it was; only if that fails too is the journal left for the next run."""
    done: list[tuple[str, str, str, str]] = []
    with fsutil.opened_root(layout.root) as rfd, fsutil.opened_dir(rfd, "etc/selinux") as efd:
        try:
            for entry in staged:
                _tree, parent, name, staging = entry
                with fsutil.opened_dir(rfd, parent) as pfd:
                    _exchange(pfd, name, staging)
                    done.append(entry)
                    os.fsync(pfd)
        except OSError as exc:
            try:
                for _tree, parent, name, staging in reversed(done):
                    with fsutil.opened_dir(rfd, parent) as pfd:
                        _exchange(pfd, name, staging)
                        os.fsync(pfd)
            except OSError as undo_exc:
                raise InstallError(
                    f"installing into {layout.root} failed half-way ({exc}) and could not be "
                    f"undone ({undo_exc}); the next finalize completes it",
                    root_unchanged=False) from exc
            _discard(layout, staged)
            if len(staged) > 1:
                os.unlink(_journal_name(layout), dir_fd=efd)
                os.fsync(efd)
            why = str(exc)
            if exc.errno in NO_EXCHANGE:
                why = ("the file system cannot exchange two directories atomically "
                       f"(renameat2 RENAME_EXCHANGE: {exc.strerror}); selcache does not install "
                       "without it")
            raise InstallError(f"installing into {layout.root} failed: {why}; the root is "
                               "unchanged") from exc
        try:
            for _tree, parent, _name, staging in staged:
                with fsutil.opened_dir(rfd, parent) as pfd:
                    _remove_tree(pfd, staging)
                    os.fsync(pfd)
            if len(staged) > 1:
                os.unlink(_journal_name(layout), dir_fd=efd)
                os.fsync(efd)
        except OSError as exc:
            # The new files are in place; what is left is the old copies,
            # which the next run removes.
            log.warning("installed, but could not clean up after it: %s", exc)


def _discard(layout: Layout, staged: list[tuple[str, str, str, str]]) -> None:
    with fsutil.opened_root(layout.root) as rfd:
        for _tree, parent, _name, staging in staged:
            try:
                with fsutil.opened_dir(rfd, parent) as pfd:
                    _remove_tree(pfd, staging)
                    os.fsync(pfd)
            except OSError as exc:
                log.warning("could not remove staging dir %s/%s: %s", parent, staging, exc)
