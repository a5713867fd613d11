"""The cache: the only module that imports diskcache.

Entries are raw bytes, never pickles: a manifest (JSON) per key, and
content-addressed blobs. ``BytesOnlyDisk`` refuses to unpickle anything, so a
tampered cache database cannot run code. Every blob is checked against its
sha256 before it is returned; a bad one is dropped and reported as a miss.

The cache is an optimisation: a miss, an eviction, a corrupt or locked
database only costs a recompile, never a wrong install. A cache that cannot
be used at all (a garbage, locked or read-only database, a full disk) is
*disabled* for the run, with a warning: every lookup misses and nothing is
stored. A garbage database is moved aside and rebuilt empty. A cache that is
not safe to trust (not ours, group- or world-writable, symlinks inside) is
refused with CacheError: that one needs a person to look at it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import sqlite3
import stat
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import diskcache
from diskcache.core import MODE_BINARY, MODE_PICKLE

from .errors import CacheError

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = "/var/cache/selcache"
DEFAULT_SIZE_LIMIT = 2 * 1024**3
MANIFEST_VERSION = 1
DB_NAME = "cache.db"
#: How long to wait for another process's write transaction before giving
#: up on the cache for this run (finalize runs at shutdown: it must not hang).
DEFAULT_DB_TIMEOUT = 5.0
#: A value file no row names is removed by gc only once it is this old: a
#: concurrent writer creates the file before it inserts the row.
ORPHAN_AGE = 3600.0

_BAD = (sqlite3.Error, OSError, diskcache.Timeout, ValueError, json.JSONDecodeError)
#: diskcache's value file names: two levels of two hex digits, then 28 more.
_VALUE_FILE_RE = re.compile(r"^[0-9a-f]{2}/[0-9a-f]{2}/[0-9a-f]{28}\.val$")
_VALUE_DIR_RE = re.compile(r"^[0-9a-f]{2}$")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class BytesOnlyDisk(diskcache.Disk):  # type: ignore[misc]
    """A diskcache Disk that stores and returns bytes, str and int only."""

    def fetch(self, mode: int, filename: Any, value: Any, read: bool) -> Any:
        if mode == MODE_PICKLE:
            raise ValueError("refusing to unpickle a cache value")
        if mode == MODE_BINARY and not read:
            return read_value_file(self._directory, filename)
        return super().fetch(mode, filename, value, read)

    def store(self, value: Any, read: bool, key: Any = diskcache.core.UNKNOWN) -> Any:
        if read or type(value) not in (bytes, int):
            raise TypeError(f"selcache stores bytes only, not {type(value).__name__}")
        size, mode, filename, db_value = super().store(value, read, key=key)
        if filename:
            # Whatever the umask: the cache's own checks refuse group- or
            # world-writable files, and the values are policy, not for others.
            full = os.path.join(self._directory, filename)
            os.chmod(full, 0o600)
            os.chmod(os.path.dirname(full), 0o700)
            os.chmod(os.path.dirname(os.path.dirname(full)), 0o700)
        return size, mode, filename, db_value

    def remove(self, file_path: Any) -> Any:
        # diskcache deletes the file a row names: a tampered row must not
        # name a file outside the cache.
        if not isinstance(file_path, str) or not _VALUE_FILE_RE.match(file_path):
            log.warning("cache row names %r, not a value file; not removing it", file_path)
            return None
        return super().remove(file_path)

    def get(self, key: Any, raw: bool) -> Any:
        if not raw:
            raise ValueError("refusing to unpickle a cache key")
        return super().get(key, raw)


@dataclass(frozen=True)
class OutputFile:
    """One file of an output set, relative to the root."""

    path: str
    sha256: str
    mode: int
    size: int


@dataclass(frozen=True)
class Manifest:
    key: str
    policy_type: str
    compile_path: str  # "rebuilt" | "relinked"
    files: tuple[OutputFile, ...]
    components: Mapping[str, str] = field(default_factory=dict)
    created: float = 0.0
    compile_seconds: float = 0.0

    def to_bytes(self) -> bytes:
        doc = {
            "version": MANIFEST_VERSION,
            "key": self.key,
            "policy_type": self.policy_type,
            "compile_path": self.compile_path,
            "files": [asdict(f) for f in self.files],
            "components": dict(self.components),
            "created": self.created,
            "compile_seconds": self.compile_seconds,
        }
        return json.dumps(doc, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        doc = json.loads(data)
        if doc.get("version") != MANIFEST_VERSION:
            raise ValueError(f"manifest version {doc.get('version')!r}")
        files = tuple(OutputFile(str(f["path"]), str(f["sha256"]), int(f["mode"]), int(f["size"]))
                      for f in doc["files"])
        for f in files:
            if f.path.startswith("/") or ".." in f.path.split("/"):
                raise ValueError(f"manifest path {f.path!r} escapes the root")
        return cls(key=str(doc["key"]), policy_type=str(doc["policy_type"]),
                   compile_path=str(doc["compile_path"]), files=files,
                   components=dict(doc.get("components", {})),
                   created=float(doc.get("created", 0.0)),
                   compile_seconds=float(doc.get("compile_seconds", 0.0)))


def root_id(root: str) -> str:
    return hashlib.sha256(os.path.realpath(root).encode()).hexdigest()[:32]


def _check_owned(path: str, st: os.stat_result) -> None:
    if st.st_uid != os.geteuid():
        raise CacheError(f"cache path {path} is owned by uid {st.st_uid}, not by uid "
                         f"{os.geteuid()}; refusing to trust the cache")
    if st.st_mode & 0o022:
        raise CacheError(f"cache path {path} is group- or world-writable "
                         f"(mode {stat.S_IMODE(st.st_mode):o}); refusing to trust the cache")


def check_dir_safe(path: str) -> None:
    """The cache dir and everything directly in it (the database files and the
    value directories) must be ours, not writable by others, and no symlinks."""
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise CacheError(f"cache dir {path} is not a directory")
    _check_owned(path, st)
    with os.scandir(path) as it:
        for entry in it:
            est = entry.stat(follow_symlinks=False)
            if stat.S_ISLNK(est.st_mode):
                raise CacheError(f"cache path {entry.path} is a symlink; refusing to trust "
                                 "the cache")
            _check_owned(entry.path, est)


def read_value_file(directory: str, filename: Any) -> bytes:
    """Read one of diskcache's value files without following symlinks, checking
    each directory and the file like the cache dir itself."""
    if not isinstance(filename, str) or not _VALUE_FILE_RE.match(filename):
        raise ValueError(f"cache row names {filename!r}, not a value file")
    *dirs, name = filename.split("/")
    fd = os.open(directory, _DIR_FLAGS)
    try:
        for part in dirs:
            try:
                nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise CacheError(f"cache path {directory}/{part} is a symlink or not a "
                                     "directory; refusing to trust the cache") from exc
                raise
            os.close(fd)
            fd = nfd
            _check_owned(f"{directory}/{part}", os.fstat(fd))
        try:
            vfd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                          dir_fd=fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise CacheError(f"cache value file {directory}/{filename} is a symlink; "
                                 "refusing to trust the cache") from exc
            raise
        try:
            vst = os.fstat(vfd)
            if not stat.S_ISREG(vst.st_mode):
                raise CacheError(f"cache value file {directory}/{filename} is not a regular "
                                 "file; refusing to trust the cache")
            _check_owned(f"{directory}/{filename}", vst)
            chunks = []
            while chunk := os.read(vfd, 1 << 20):
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(vfd)
    finally:
        os.close(fd)


def _sqlite_error_name(exc: BaseException) -> str:
    return str(getattr(exc, "sqlite_errorname", ""))


def _is_locked(exc: BaseException) -> bool:
    return isinstance(exc, diskcache.Timeout) or \
        _sqlite_error_name(exc).startswith(("SQLITE_BUSY", "SQLITE_LOCKED"))


def _is_corrupt(exc: BaseException) -> bool:
    return _sqlite_error_name(exc).startswith(("SQLITE_NOTADB", "SQLITE_CORRUPT"))


def _cannot_write(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES)
    return _sqlite_error_name(exc).startswith(("SQLITE_FULL", "SQLITE_READONLY",
                                               "SQLITE_CANTOPEN", "SQLITE_IOERR"))


class Cache:
    """Typed access to the diskcache: manifests, blobs, counters, stat caches.

    ``problem`` is None while the cache works; otherwise it says why the cache
    is disabled for this run (every lookup misses, nothing is stored)."""

    def __init__(self, directory: str, *, size_limit: int = DEFAULT_SIZE_LIMIT,
                 timeout: float = DEFAULT_DB_TIMEOUT) -> None:
        self.directory = os.path.abspath(directory)
        self.timeout = timeout
        self.problem: str | None = None
        self.rebuilt: str | None = None
        self._size_limit = size_limit
        self._dc: diskcache.Cache | None = None
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
        except OSError as exc:
            self._disable(f"cannot create the cache dir: {exc.strerror}")
            return
        check_dir_safe(self.directory)
        self._open()

    # -- opening, rebuilding, giving up -----------------------------------------
    def _open(self) -> None:
        db = os.path.join(self.directory, DB_NAME)
        new = not os.path.lexists(db)
        trouble = self._probe(db)
        if trouble is not None and trouble[0] == "corrupt":
            self._rebuild(trouble[1])
            new = True
            trouble = self._probe(db)
        if trouble is not None:
            self._disable(trouble[1])
            return
        try:
            self._dc = diskcache.Cache(self.directory, disk=BytesOnlyDisk,
                                       size_limit=self._size_limit,
                                       eviction_policy="least-recently-used", timeout=self.timeout)
        except _BAD as exc:
            self._disable(f"cannot open the database: {exc}")
            return
        if new:
            for suffix in ("", "-wal", "-shm"):
                try:
                    os.chmod(db + suffix, 0o600)
                except FileNotFoundError:
                    pass

    def _probe(self, db: str) -> tuple[str, str] | None:
        """Can the database be read and written right now? diskcache's own
        open retries a locked database for 60 s, and with least-recently-used
        eviction every read is a write: ask SQLite first, with our timeout."""
        try:
            con = sqlite3.connect(db, timeout=self.timeout, isolation_level=None)
        except sqlite3.Error as exc:
            return "unusable", f"cannot open the database: {exc}"
        try:
            con.execute("SELECT count(*) FROM sqlite_master").fetchall()
            con.execute("BEGIN IMMEDIATE")
            con.execute("ROLLBACK")
        except sqlite3.Error as exc:
            if _is_corrupt(exc):
                return "corrupt", str(exc)
            if _is_locked(exc):
                return "unusable", (f"the database stayed locked by another process for "
                                    f"{self.timeout:g}s")
            return "unusable", f"the database cannot be written: {exc}"
        finally:
            con.close()
        return None

    def _rebuild(self, reason: str) -> None:
        """Move a damaged database aside (the last one is kept for a post-mortem)
        and drop the value files only it named."""
        db = os.path.join(self.directory, DB_NAME)
        log.warning("cache database %s is damaged (%s); moving it aside to %s.corrupt and "
                    "starting an empty cache", db, reason, DB_NAME)
        try:
            os.replace(db, db + ".corrupt")
            for suffix in ("-wal", "-shm", "-journal"):
                try:
                    os.unlink(db + suffix)
                except FileNotFoundError:
                    pass
            with os.scandir(self.directory) as it:
                stale = [e.name for e in it if _VALUE_DIR_RE.match(e.name) and e.is_dir()]
            for name in stale:
                shutil.rmtree(os.path.join(self.directory, name))
        except OSError as exc:
            log.warning("could not rebuild the cache database: %s", exc)
        self.rebuilt = reason

    def _disable(self, reason: str) -> None:
        if self.problem is None:
            log.warning("cache %s is unusable, continuing without it (every lookup misses, "
                        "nothing is stored): %s", self.directory, reason)
        self.problem = reason
        dc, self._dc = self._dc, None
        if dc is not None:
            try:
                dc.close()
            except _BAD:
                pass

    def _trouble(self, what: str, exc: BaseException) -> None:
        """A failed operation: a miss for this call; a locked, read-only, full
        or damaged database disables the cache for the rest of the run, so a
        shutdown-time finalize waits for it at most once."""
        if _is_corrupt(exc):
            self._disable(f"the database is damaged ({exc}); it was moved aside, and the "
                          "next run starts an empty cache")
            self._rebuild(str(exc))
        elif _is_locked(exc):
            self._disable(f"the database stayed locked by another process for {self.timeout:g}s")
        elif _cannot_write(exc):
            self._disable(f"the cache cannot be written: {exc}")
        else:
            log.warning("cache %s failed, treating it as a miss: %s", what, exc)

    def close(self) -> None:
        if self._dc is not None:
            self._dc.close()

    def __enter__(self) -> Cache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- raw access, every failure is a miss --------------------------------
    def _get(self, key: str) -> Any:
        if self._dc is None:
            return None
        try:
            return self._dc.get(key)
        except _BAD as exc:
            self._trouble(f"read of {key}", exc)
            return None

    def _set(self, key: str, value: bytes | int) -> bool:
        if self._dc is None:
            return False
        try:
            return bool(self._dc.set(key, value))
        except _BAD as exc:
            self._trouble(f"write of {key}", exc)
            return False

    def _delete(self, key: str) -> None:
        if self._dc is None:
            return
        try:
            self._dc.delete(key)
        except _BAD as exc:
            self._trouble(f"delete of {key}", exc)

    def _contains(self, key: str) -> bool:
        if self._dc is None:
            return False
        try:
            return key in self._dc
        except _BAD as exc:
            self._trouble(f"lookup of {key}", exc)
            return False

    # -- blobs ---------------------------------------------------------------
    def get_blob(self, sha256: str) -> bytes | None:
        """The blob with this digest, verified; a corrupt blob is dropped."""
        key = f"blob:{sha256}"
        data = self._get(key)
        if data is None:
            if self._contains(key):
                # The row is there but its value file is gone: drop the row,
                # or the next store would believe the blob is still cached.
                log.warning("cache blob %s lost its value file; dropping it", sha256[:12])
                self._delete(key)
            return None
        if not isinstance(data, bytes) or hashlib.sha256(data).hexdigest() != sha256:
            log.warning("cache blob %s is corrupt; dropping it", sha256[:12])
            self._delete(key)
            return None
        return data

    def has_blob(self, sha256: str) -> bool:
        return self._contains(f"blob:{sha256}")

    def put_blob(self, data: bytes) -> str | None:
        """Store a blob; its digest, or None if it could not be stored."""
        digest = hashlib.sha256(data).hexdigest()
        if not self.has_blob(digest) and not self._set(f"blob:{digest}", data):
            return None
        return digest

    # -- manifests -------------------------------------------------------------
    def get_manifest(self, key: str) -> Manifest | None:
        data = self._get(f"manifest:{key}")
        if data is None:
            return None
        try:
            manifest = Manifest.from_bytes(data)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("cache manifest %s is unreadable (%s); dropping it", key[:12], exc)
            self._delete(f"manifest:{key}")
            return None
        if manifest.key != key:
            log.warning("cache manifest %s names key %s; dropping it", key[:12], manifest.key[:12])
            self._delete(f"manifest:{key}")
            return None
        return manifest

    def load_outputs(self, manifest: Manifest) -> dict[str, bytes] | None:
        """Every blob of ``manifest``, verified, or None if any is missing or bad."""
        out: dict[str, bytes] = {}
        for f in manifest.files:
            data = self.get_blob(f.sha256)
            if data is None:
                return None
            out[f.path] = data
        return out

    def put_entry(self, manifest: Manifest, blobs: Mapping[str, bytes]) -> bool:
        """Blobs first, then the manifest: a manifest never names a blob that was
        never written (eviction may still drop one later; lookups verify). If
        any blob cannot be stored (a full disk), the manifest is not either."""
        if self._dc is None:
            return False
        for f in manifest.files:
            if self.put_blob(blobs[f.path]) is None:
                log.warning("cache entry %s not stored: blob for %s could not be written",
                            manifest.key[:12], f.path)
                return False
        return self._set(f"manifest:{manifest.key}", manifest.to_bytes())

    def _keys(self, prefix: str) -> list[str]:
        if self._dc is None:
            return []
        try:
            return [k for k in self._dc.iterkeys() if isinstance(k, str) and k.startswith(prefix)]
        except _BAD as exc:
            self._trouble("listing", exc)
            return []

    def iter_manifests(self) -> Iterator[Manifest]:
        keys = self._keys("manifest:")
        for k in keys:
            m = self.get_manifest(k.split(":", 1)[1])
            if m is not None:
                yield m

    # -- counters and per-root records ----------------------------------------
    def count(self, name: str) -> None:
        if self._dc is None:
            return
        try:
            self._dc.incr(f"counter:{name}", default=0)
        except _BAD as exc:
            self._trouble(f"counter {name}", exc)

    def counter(self, name: str) -> int:
        value = self._get(f"counter:{name}")
        return value if isinstance(value, int) else 0

    def get_json(self, name: str) -> Any:
        data = self._get(f"json:{name}")
        if not isinstance(data, bytes):
            return None
        try:
            return json.loads(data)
        except ValueError:
            return None

    def put_json(self, name: str, doc: Any) -> None:
        self._set(f"json:{name}", json.dumps(doc, sort_keys=True).encode())

    # -- maintenance -------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Counters for ``status``; ``problem`` says why the cache is disabled."""
        entries = len(self._keys("manifest:"))
        volume = 0
        if self._dc is not None:
            try:
                volume = int(self._dc.volume())
            except _BAD as exc:
                self._trouble("volume", exc)
        return {"entries": entries, "bytes": volume, "hits": self.counter("hits"),
                "misses": self.counter("misses"), "problem": self.problem}

    def gc(self, *, max_age: float | None = None,
           orphan_age: float = ORPHAN_AGE) -> dict[str, int]:
        """Drop manifests older than ``max_age`` seconds, then every blob that no
        manifest names, then value files that no row names (left by a crash or
        a full disk between writing the file and inserting its row), then cull
        to the size limit."""
        removed_manifests = 0
        live: set[str] = set()
        now = time.time()
        for m in list(self.iter_manifests()):
            if max_age is not None and now - m.created > max_age:
                self._delete(f"manifest:{m.key}")
                removed_manifests += 1
                continue
            live.update(f.sha256 for f in m.files)
        removed_blobs = 0
        for k in self._keys("blob:"):
            if k.split(":", 1)[1] not in live:
                self._delete(k)
                removed_blobs += 1
        orphans = self._sweep_orphans(now - orphan_age)
        culled = 0
        if self._dc is not None:
            try:
                culled = int(self._dc.cull())
            except _BAD as exc:
                self._trouble("cull", exc)
        return {"manifests_removed": removed_manifests, "blobs_removed": removed_blobs,
                "orphans_removed": orphans, "culled": culled}

    def _sweep_orphans(self, older_than: float) -> int:
        if self._dc is None:
            return 0
        try:
            con = sqlite3.connect(os.path.join(self.directory, DB_NAME), timeout=self.timeout)
            try:
                named = {row[0] for row in
                         con.execute("SELECT filename FROM Cache WHERE filename IS NOT NULL")}
            finally:
                con.close()
        except sqlite3.Error as exc:
            self._trouble("orphan sweep", exc)
            return 0
        removed = 0
        with os.scandir(self.directory) as top:
            level1 = sorted(e.name for e in top if _VALUE_DIR_RE.match(e.name) and e.is_dir(
                follow_symlinks=False))
        for d1 in level1:
            with os.scandir(os.path.join(self.directory, d1)) as it:
                level2 = sorted(e.name for e in it if _VALUE_DIR_RE.match(e.name) and e.is_dir(
                    follow_symlinks=False))
            for d2 in level2:
                with os.scandir(os.path.join(self.directory, d1, d2)) as it:
                    files = [e for e in it if e.is_file(follow_symlinks=False)]
                for e in files:
                    rel = f"{d1}/{d2}/{e.name}"
                    if rel not in named and e.stat(follow_symlinks=False).st_mtime < older_than:
                        os.unlink(e.path)
                        removed += 1
        return removed
