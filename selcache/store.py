"""The cache: the only module that imports diskcache.

Entries are raw bytes, never pickles: a manifest (JSON) per key, and
content-addressed blobs. ``BytesOnlyDisk`` refuses to unpickle anything, so a
tampered cache database cannot run code. Every blob is checked against its
sha256 before it is returned; a bad one is dropped and reported as a miss.

The cache is an optimisation: a miss, an eviction, a corrupt or locked
database only costs a recompile, never a wrong install.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import stat
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import diskcache
from diskcache.core import MODE_PICKLE

from .errors import CacheError

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = "/var/cache/selcache"
DEFAULT_SIZE_LIMIT = 2 * 1024**3
MANIFEST_VERSION = 1

_BAD = (sqlite3.Error, OSError, diskcache.Timeout, ValueError, json.JSONDecodeError)


class BytesOnlyDisk(diskcache.Disk):  # type: ignore[misc]
    """A diskcache Disk that stores and returns bytes, str and int only."""

    def store(self, value: Any, read: bool, key: Any = diskcache.core.UNKNOWN) -> Any:
        if read or type(value) not in (bytes, int):
            raise TypeError(f"selcache stores bytes only, not {type(value).__name__}")
        return super().store(value, read, key=key)

    def fetch(self, mode: int, filename: Any, value: Any, read: bool) -> Any:
        if mode == MODE_PICKLE:
            raise ValueError("refusing to unpickle a cache value")
        return super().fetch(mode, filename, value, read)

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


def _check_dir_safe(path: str) -> None:
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise CacheError(f"cache dir {path} is not a directory")
    if st.st_uid != os.geteuid():
        raise CacheError(f"cache dir {path} is owned by uid {st.st_uid}, not by uid "
                         f"{os.geteuid()}; refusing to trust it")
    if st.st_mode & 0o022:
        raise CacheError(f"cache dir {path} is group- or world-writable "
                         f"(mode {stat.S_IMODE(st.st_mode):o}); refusing to trust it")


class Cache:
    """Typed access to the diskcache: manifests, blobs, counters, stat caches."""

    def __init__(self, directory: str, *, size_limit: int = DEFAULT_SIZE_LIMIT) -> None:
        self.directory = os.path.abspath(directory)
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise CacheError(f"cannot create cache dir {self.directory}: {exc}") from exc
        _check_dir_safe(self.directory)
        try:
            self._dc = diskcache.Cache(self.directory, disk=BytesOnlyDisk, size_limit=size_limit,
                                       eviction_policy="least-recently-used", timeout=5)
        except _BAD as exc:
            raise CacheError(f"cannot open cache in {self.directory}: {exc}") from exc

    def close(self) -> None:
        self._dc.close()

    def __enter__(self) -> Cache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- raw access, every failure is a miss --------------------------------
    def _get(self, key: str) -> Any:
        try:
            return self._dc.get(key)
        except _BAD as exc:
            log.warning("cache read of %s failed, treating as a miss: %s", key, exc)
            return None

    def _set(self, key: str, value: bytes | int) -> bool:
        try:
            return bool(self._dc.set(key, value))
        except _BAD as exc:
            log.warning("cache write of %s failed; continuing without it: %s", key, exc)
            return False

    def _delete(self, key: str) -> None:
        try:
            self._dc.delete(key)
        except _BAD as exc:
            log.warning("cache delete of %s failed: %s", key, exc)

    # -- blobs ---------------------------------------------------------------
    def get_blob(self, sha256: str) -> bytes | None:
        """The blob with this digest, verified; a corrupt blob is dropped."""
        data = self._get(f"blob:{sha256}")
        if data is None:
            return None
        if not isinstance(data, bytes) or hashlib.sha256(data).hexdigest() != sha256:
            log.warning("cache blob %s is corrupt; dropping it", sha256[:12])
            self._delete(f"blob:{sha256}")
            return None
        return data

    def has_blob(self, sha256: str) -> bool:
        try:
            return f"blob:{sha256}" in self._dc
        except _BAD:
            return False

    def put_blob(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        if not self.has_blob(digest):
            self._set(f"blob:{digest}", data)
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

    def put_entry(self, manifest: Manifest, blobs: Mapping[str, bytes]) -> None:
        """Blobs first, then the manifest: a manifest never names a blob that was
        never written (eviction may still drop one later; lookups verify)."""
        for f in manifest.files:
            self.put_blob(blobs[f.path])
        self._set(f"manifest:{manifest.key}", manifest.to_bytes())

    def iter_manifests(self) -> Iterator[Manifest]:
        try:
            keys = [k for k in self._dc.iterkeys() if isinstance(k, str) and k.startswith("manifest:")]
        except _BAD:
            return
        for k in keys:
            m = self.get_manifest(k.split(":", 1)[1])
            if m is not None:
                yield m

    # -- counters and per-root records ----------------------------------------
    def count(self, name: str) -> None:
        try:
            self._dc.incr(f"counter:{name}", default=0)
        except _BAD as exc:
            log.debug("counter %s not updated: %s", name, exc)

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
    def stats(self) -> dict[str, int]:
        entries = 0
        try:
            for k in self._dc.iterkeys():
                if isinstance(k, str) and k.startswith("manifest:"):
                    entries += 1
            volume = int(self._dc.volume())
        except _BAD:
            volume = 0
        return {"entries": entries, "bytes": volume, "hits": self.counter("hits"),
                "misses": self.counter("misses")}

    def gc(self, *, max_age: float | None = None) -> dict[str, int]:
        """Drop manifests older than ``max_age`` seconds, then every blob that no
        manifest names, then cull to the size limit."""
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
        try:
            blob_keys = [k for k in self._dc.iterkeys() if isinstance(k, str) and k.startswith("blob:")]
        except _BAD:
            blob_keys = []
        for k in blob_keys:
            if k.split(":", 1)[1] not in live:
                self._delete(k)
                removed_blobs += 1
        try:
            culled = int(self._dc.cull())
        except _BAD:
            culled = 0
        return {"manifests_removed": removed_manifests, "blobs_removed": removed_blobs,
                "culled": culled}
