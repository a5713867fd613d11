"""finalize, stage, status, verify: discover -> key -> lookup -> compile ->
install, for one root.

The cache is an optimisation: every decision is made from the root's current
inputs, re-hashed by content. A cache miss, an eviction or a corrupt blob
only means a compile.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from . import fsutil, stamp
from .compile import Compiled, compile_policy
from .errors import CacheError, InputsChanged, SelcacheError, VerifyMismatch
from .inputs import (
    Hasher,
    InputFile,
    Inputs,
    StatEntry,
    component_digest,
    discover_inputs,
    module_component,
)
from .install import (
    InstallReport,
    inspect_install,
    install_outputs,
    recover,
    root_lock,
    semanage_lock,
)
from .key import Key, compute_key, fold
from .layout import Layout, read_layout
from .runner import Runner, run
from .store import DEFAULT_CACHE_DIR, Cache, Manifest, OutputFile, root_id

log = logging.getLogger(__name__)

ACTIONS = ("unchanged", "reused", "relinked", "rebuilt")
#: How long finalize and stage wait for the root's lock and libsemanage's.
DEFAULT_LOCK_TIMEOUT = 60.0


def default_cache_dir() -> str:
    return os.environ.get("SELCACHE_CACHE_DIR") or DEFAULT_CACHE_DIR


@dataclass(frozen=True)
class Result:
    """What finalize or stage did."""

    action: str
    root: str
    policy_type: str
    key: str
    seconds: float
    written: tuple[str, ...] = ()
    compile_seconds: float | None = None
    recovered: tuple[str, ...] = ()
    timings: Mapping[str, float] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "version": 1,
            "action": self.action,
            "root": self.root,
            "policy_type": self.policy_type,
            "key": self.key,
            "seconds": round(self.seconds, 6),
            "written": list(self.written),
            "compile_seconds": self.compile_seconds,
            "recovered": list(self.recovered),
            "timings": {k: round(v, 6) for k, v in self.timings.items()},
            "warnings": list(self.warnings),
        }


class _Session:
    """One root and one cache, for the length of one command."""

    def __init__(self, root: str, cache_dir: str | None, runner: Runner,
                 workdir: str | None) -> None:
        self.timings: dict[str, float] = {}
        t = time.monotonic()
        self.layout: Layout = read_layout(root)
        self.cache = Cache(cache_dir or default_cache_dir())
        self.runner = runner
        self.workdir = workdir
        self.rid = root_id(root)
        self._stat_cache: dict[str, StatEntry] | None = None
        self.timings["open"] = time.monotonic() - t
        # For the failure stamp: where finalize was when it failed.
        self.step = "open"
        self.key: str | None = None
        self.recovered: tuple[str, ...] = ()

    def warnings(self) -> tuple[str, ...]:
        out = []
        if self.cache.rebuilt:
            out.append(f"the cache database was damaged and has been rebuilt ({self.cache.rebuilt})")
        if self.cache.problem:
            out.append(f"the cache was not used: {self.cache.problem}")
        return tuple(out)

    def close(self) -> None:
        self.cache.close()

    def discover(self) -> tuple[Inputs, Key]:
        t = time.monotonic()
        # finalize discovers up to three times (lookup, after compile, before
        # install): read the stored stat cache once per session, then reuse it.
        if self._stat_cache is None:
            stored = self.cache.get_json(f"statcache:{self.rid}") or {}
            self._stat_cache = {k: tuple(v) for k, v in stored.items()}
        previous = self._stat_cache
        inputs = discover_inputs(self.layout, previous)
        if inputs.hashed or set(inputs.stat_cache) != set(previous):
            self.cache.put_json(f"statcache:{self.rid}", inputs.stat_cache)
        self._stat_cache = dict(inputs.stat_cache)
        key = compute_key(inputs)
        self.timings["discover"] = self.timings.get("discover", 0.0) + time.monotonic() - t
        log.debug("discovered %d inputs (%d hashed), key %s", len(inputs.files), inputs.hashed,
                  key.hex[:16])
        return inputs, key

    def installed_matches(self, manifest: Manifest) -> bool:
        t = time.monotonic()
        stat_cache = self.cache.get_json(f"outstat:{self.rid}") or {}
        hasher = Hasher({k: tuple(v) for k, v in stat_cache.items()})
        ok = True
        with fsutil.opened_root(self.layout.root) as rfd:
            for f in manifest.files:
                st = fsutil.lstat_rel(rfd, f.path)
                if st is None or not _is_reg(st) or st.st_size != f.size:
                    ok = False
                    break
                digest = hasher.digest(f.path, st, lambda p=f.path: fsutil.read_rel(rfd, p))
                if digest != f.sha256:
                    ok = False
                    break
        if hasher.hashed:
            self.cache.put_json(f"outstat:{self.rid}", hasher.new)
        self.timings["check_installed"] = time.monotonic() - t
        return ok

    def lookup(self, key: Key) -> Manifest | None:
        t = time.monotonic()
        manifest = self.cache.get_manifest(key.hex)
        if manifest is not None and manifest.policy_type != self.layout.policy_type:
            manifest = None
        self.timings["lookup"] = time.monotonic() - t
        return manifest

    def load(self, manifest: Manifest) -> dict[str, bytes] | None:
        """The manifest's blobs, each verified; None if any is missing or bad."""
        t = time.monotonic()
        outputs = self.cache.load_outputs(manifest)
        self.timings["load"] = time.monotonic() - t
        return outputs

    def compile_and_store(self, inputs: Inputs, key: Key) -> tuple[Manifest, dict[str, bytes]]:
        """Compile, confirm the root's inputs did not move meanwhile, then store."""
        t = time.monotonic()
        compiled = compile_policy(inputs, runner=self.runner, workdir=self.workdir)
        self.timings["compile"] = time.monotonic() - t
        _, after = self.discover()
        if after.hex != key.hex:
            raise _Moved()
        manifest = _manifest(key, self.layout, compiled, "rebuilt")
        blobs = {p: data for p, (data, _mode) in compiled.files.items()}
        t = time.monotonic()
        self.cache.put_entry(manifest, blobs)
        if compiled.generated_inputs:
            # The compile created inputs (CIL converted from HLL). Once
            # installed, the root has them, and its key is this one.
            post = _post_install_key(inputs, compiled)
            self.cache.put_entry(_manifest(post, self.layout, compiled, "rebuilt"), blobs)
        self.timings["store"] = time.monotonic() - t
        return manifest, blobs

    def record(self, doc: dict[str, Any]) -> None:
        self.cache.put_json(f"last:{self.rid}", doc)


class _Moved(Exception):
    """The root's inputs changed while we worked."""


def _is_reg(st: os.stat_result) -> bool:
    return stat.S_ISREG(st.st_mode)


def _manifest(key: Key, layout: Layout, compiled: Compiled, path: str) -> Manifest:
    files = tuple(OutputFile(p, hashlib.sha256(data).hexdigest(), mode, len(data))
                  for p, (data, mode) in sorted(compiled.files.items()))
    return Manifest(key=key.hex, policy_type=layout.policy_type, compile_path=path, files=files,
                    components=dict(key.components), created=time.time(),
                    compile_seconds=compiled.seconds)


def _post_install_key(inputs: Inputs, compiled: Compiled) -> Key:
    layout = inputs.layout
    files = {f.rel: f for f in inputs.files}
    for rel in compiled.generated_inputs:
        data, _mode = compiled.files[rel]
        inner = rel[len(layout.active) + 1:]
        files[rel] = InputFile(rel, module_component(inner), hashlib.sha256(data).hexdigest())
    groups: dict[str, list[InputFile]] = {}
    for f in files.values():
        groups.setdefault(f.component, []).append(f)
    components = {name: component_digest(g) for name, g in sorted(groups.items())}
    return Key(fold(components), components)


def _modes(manifest: Manifest, blobs: Mapping[str, bytes]) -> dict[str, tuple[bytes, int]]:
    return {f.path: (blobs[f.path], f.mode) for f in manifest.files}


def finalize(root: str = "/", cache_dir: str | None = None, *, runner: Runner = run,
             workdir: str | None = None, lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> Result:
    """Make ``root``'s installed policy match its inputs, from the cache when
    possible. Raises a SelcacheError, leaving the root as it was, on failure,
    and leaves a failure stamp that ``status`` shows until the next success.
    An unusable cache is a warning, never a failure: finalize compiles."""
    start = time.monotonic()
    directory = cache_dir or default_cache_dir()
    try:
        s = _Session(root, directory, runner, workdir)
    except CacheError:
        raise  # an untrusted cache dir is no place for a stamp either
    except SelcacheError as exc:
        stamp.record_failure(directory, root, stamp.failure_doc(root, exc, step="open", key=None))
        raise
    try:
        try:
            result = _finalize(s, start, lock_timeout)
        except Exception as exc:
            stamp.record_failure(directory, root, stamp.failure_doc(
                root, exc, step=s.step, key=s.key, recovered=s.recovered))
            if isinstance(exc, SelcacheError):
                s.record({"version": 1, "ok": False, "when": time.time(), "error": str(exc),
                          "error_type": type(exc).__name__, "exit_code": exc.exit_code,
                          "step": s.step})
            raise
        stamp.clear_failure(directory, root)
        s.record({"version": 1, "ok": True, "when": time.time(), **result.to_json()})
        return result
    finally:
        s.close()


def _finalize(s: _Session, start: float, lock_timeout: float) -> Result:
    layout = s.layout
    s.step = "lock"
    with root_lock(layout, timeout=lock_timeout):
        s.step = "recover"
        if inspect_install(layout) is not None:
            # Recovery exchanges trees: no semodule may commit meanwhile.
            with semanage_lock(layout, timeout=lock_timeout):
                s.recovered = recover(layout)
        recovered = s.recovered
        for attempt in (1, 2):
            s.step = "discover"
            inputs, key = s.discover()
            s.key = key.hex
            s.step = "lookup"
            manifest = s.lookup(key)
            if manifest is not None and s.installed_matches(manifest):
                s.cache.count("hits")
                return Result("unchanged", layout.root, layout.policy_type, key.hex,
                              time.monotonic() - start, recovered=recovered, timings=s.timings,
                              warnings=s.warnings())
            outputs = s.load(manifest) if manifest is not None else None
            compile_seconds = None
            if manifest is not None and outputs is not None:
                s.cache.count("hits")
                action = "reused"
            else:
                s.cache.count("misses")
                s.step = "compile"
                try:
                    manifest, outputs = s.compile_and_store(inputs, key)
                except _Moved:
                    log.warning("inputs of %s changed during the compile (attempt %d)",
                                layout.root, attempt)
                    continue
                compile_seconds = s.timings.get("compile")
                action = "rebuilt"
            t = time.monotonic()
            s.step = "install"
            with semanage_lock(layout, timeout=lock_timeout):
                _, now = s.discover()
                if now.hex != key.hex:
                    log.warning("inputs of %s changed before install (attempt %d)",
                                layout.root, attempt)
                    continue
                report: InstallReport = install_outputs(layout, _modes(manifest, outputs))
            s.timings["install"] = time.monotonic() - t
            return Result(action, layout.root, layout.policy_type, key.hex,
                          time.monotonic() - start, written=report.written,
                          compile_seconds=compile_seconds, recovered=recovered + report.recovered,
                          timings=s.timings, warnings=s.warnings())
    raise InputsChanged(f"the SELinux inputs of {layout.root} kept changing while selcache "
                        "worked (twice); nothing was installed. Retry when the root is quiet.")


def stage(root: str = "/", cache_dir: str | None = None, *, runner: Runner = run,
          workdir: str | None = None, lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> Result:
    """Compile ahead and fill the cache; install nothing. Action is ``cached``
    (already there) or ``compiled``."""
    start = time.monotonic()
    s = _Session(root, cache_dir, runner, workdir)
    try:
        with root_lock(s.layout, timeout=lock_timeout):
            for _attempt in (1, 2):
                inputs, key = s.discover()
                manifest = s.lookup(key)
                if manifest is not None and s.load(manifest) is not None:
                    return Result("cached", s.layout.root, s.layout.policy_type, key.hex,
                                  time.monotonic() - start, timings=s.timings)
                try:
                    s.compile_and_store(inputs, key)
                except _Moved:
                    continue
                return Result("compiled", s.layout.root, s.layout.policy_type, key.hex,
                              time.monotonic() - start, compile_seconds=s.timings.get("compile"),
                              timings=s.timings)
        raise InputsChanged(f"the SELinux inputs of {s.layout.root} kept changing during the "
                            "compile (twice); nothing was cached")
    finally:
        s.close()


def status(root: str = "/", cache_dir: str | None = None) -> dict[str, Any]:
    """A read-only report on ``root``: its key, whether the installed files match,
    what finalize would do, the cache's counters and the last finalize."""
    s = _Session(root, cache_dir, run, None)
    try:
        inputs, key = s.discover()
        manifest = s.lookup(key)
        matches = manifest is not None and s.installed_matches(manifest)
        if matches:
            predicted = "unchanged"
        elif manifest is not None and all(s.cache.has_blob(f.sha256) for f in manifest.files):
            predicted = "reused"
        else:
            predicted = "rebuilt"
        interrupted = inspect_install(s.layout)
        return {
            "version": 1,
            "root": s.layout.root,
            "policy_type": s.layout.policy_type,
            "store": "/" + s.layout.store,
            "key": key.hex,
            "installed_matches": matches,
            "predicted_action": predicted,
            "components": len(key.components),
            "inputs": len(inputs.files),
            "interrupted_install": interrupted is not None,
            "interrupted": interrupted.to_json() if interrupted else None,
            "cache": {"dir": s.cache.directory, **s.cache.stats()},
            "last_finalize": s.cache.get_json(f"last:{s.rid}"),
            "failure": stamp.read_failure(s.cache.directory, root),
        }
    finally:
        s.close()


def verify(root: str = "/", cache_dir: str | None = None, *, runner: Runner = run,
           workdir: str | None = None) -> dict[str, Any]:
    """Recompile in a sandbox, ignoring the cache, and compare byte for byte
    with what is installed. Raises VerifyMismatch listing the differences."""
    s = _Session(root, cache_dir, runner, workdir)
    try:
        inputs, key = s.discover()
        compiled = compile_policy(inputs, runner=runner, workdir=workdir)
        differ: list[str] = []
        with fsutil.opened_root(s.layout.root) as rfd:
            for rel, (data, _mode) in sorted(compiled.files.items()):
                st = fsutil.lstat_rel(rfd, rel)
                if st is None or not _is_reg(st) or fsutil.read_rel(rfd, rel) != data:
                    differ.append(rel)
        doc = {"version": 1, "root": s.layout.root, "key": key.hex, "files": len(compiled.files),
               "differ": differ, "ok": not differ}
        if differ:
            raise VerifyMismatch(f"{len(differ)} installed file(s) differ from a fresh compile: "
                                 + ", ".join("/" + d for d in differ))
        return doc
    finally:
        s.close()


def gc(cache_dir: str | None = None, *, max_age: float | None = None) -> dict[str, int]:
    with Cache(cache_dir or default_cache_dir()) as cache:
        return cache.gc(max_age=max_age)
