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

from . import fsutil
from .compile import Compiled, compile_policy
from .errors import InputsChanged, SelcacheError, VerifyMismatch
from .inputs import (
    Hasher,
    InputFile,
    Inputs,
    StatEntry,
    component_digest,
    discover_inputs,
    module_component,
)
from .install import InstallReport, install_outputs, recover, root_lock, semanage_lock
from .key import Key, compute_key, fold
from .layout import Layout, read_layout
from .runner import Runner, run
from .store import DEFAULT_CACHE_DIR, Cache, Manifest, OutputFile, root_id

log = logging.getLogger(__name__)

ACTIONS = ("unchanged", "reused", "relinked", "rebuilt")


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
                if st is None or not _is_reg(st):
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

    def remember_installed(self, manifest: Manifest) -> None:
        """Record the stat of every store input and output file that the install
        just linked or wrote, with the content it already knows for them.

        An install hard-links every unchanged store file into the new tree and
        unlinks the old tree, and each link and unlink bumps the inode's ctime:
        without this, the next run would read and hash the whole store and all
        outputs again. Only a file whose device, inode, size and mtime are still
        what was hashed before the install (under libsemanage's lock, held
        since) gets its new ctime; anything else is left for the next run to hash.
        """
        t = time.monotonic()
        layout, old = self.layout, self._stat_cache or {}
        inputs: dict[str, StatEntry] = dict(old)
        outputs: dict[str, StatEntry] = {}
        with fsutil.opened_root(layout.root) as rfd:
            with fsutil.opened_dir(rfd, layout.active) as afd:
                for entry in fsutil.walk_files(afd):
                    rel = f"{layout.active}/{entry.rel}"
                    known = old.get(rel)
                    st = entry.st
                    sig = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
                    if known is not None and known[:4] == sig[:4] and sig[4] >= known[4]:
                        inputs[rel] = (*sig, known[5])
            for f in manifest.files:
                ost = fsutil.lstat_rel(rfd, f.path)
                if ost is not None and _is_reg(ost) and ost.st_size == f.size:
                    outputs[f.path] = (ost.st_dev, ost.st_ino, ost.st_size, ost.st_mtime_ns,
                                       ost.st_ctime_ns, f.sha256)
        self._stat_cache = inputs
        self.cache.put_json(f"statcache:{self.rid}", inputs)
        self.cache.put_json(f"outstat:{self.rid}", outputs)
        self.timings["remember"] = time.monotonic() - t

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
             workdir: str | None = None) -> Result:
    """Make ``root``'s installed policy match its inputs, from the cache when
    possible. Raises a SelcacheError, leaving the root as it was, on failure."""
    start = time.monotonic()
    s = _Session(root, cache_dir, runner, workdir)
    try:
        try:
            result = _finalize(s, start)
        except SelcacheError as exc:
            s.record({"version": 1, "ok": False, "when": time.time(), "error": str(exc),
                      "error_type": type(exc).__name__, "exit_code": exc.exit_code})
            raise
        s.record({"version": 1, "ok": True, "when": time.time(), **result.to_json()})
        return result
    finally:
        s.close()


def _finalize(s: _Session, start: float) -> Result:
    layout = s.layout
    with root_lock(layout):
        recovered = recover(layout)
        for attempt in (1, 2):
            inputs, key = s.discover()
            manifest = s.lookup(key)
            if manifest is not None and s.installed_matches(manifest):
                s.cache.count("hits")
                return Result("unchanged", layout.root, layout.policy_type, key.hex,
                              time.monotonic() - start, recovered=recovered, timings=s.timings)
            outputs = s.load(manifest) if manifest is not None else None
            compile_seconds = None
            if manifest is not None and outputs is not None:
                s.cache.count("hits")
                action = "reused"
            else:
                s.cache.count("misses")
                try:
                    manifest, outputs = s.compile_and_store(inputs, key)
                except _Moved:
                    log.warning("inputs of %s changed during the compile (attempt %d)",
                                layout.root, attempt)
                    continue
                compile_seconds = s.timings.get("compile")
                action = "rebuilt"
            t = time.monotonic()
            with semanage_lock(layout):
                _, now = s.discover()
                if now.hex != key.hex:
                    log.warning("inputs of %s changed before install (attempt %d)",
                                layout.root, attempt)
                    continue
                report: InstallReport = install_outputs(layout, _modes(manifest, outputs))
                s.timings["install"] = time.monotonic() - t
                s.remember_installed(manifest)
            return Result(action, layout.root, layout.policy_type, key.hex,
                          time.monotonic() - start, written=report.written,
                          compile_seconds=compile_seconds, recovered=recovered + report.recovered,
                          timings=s.timings)
    raise InputsChanged(f"the SELinux inputs of {layout.root} kept changing while selcache "
                        "worked (twice); nothing was installed. Retry when the root is quiet.")


def stage(root: str = "/", cache_dir: str | None = None, *, runner: Runner = run,
          workdir: str | None = None) -> Result:
    """Compile ahead and fill the cache; install nothing. Action is ``cached``
    (already there) or ``compiled``."""
    start = time.monotonic()
    s = _Session(root, cache_dir, runner, workdir)
    try:
        with root_lock(s.layout):
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
            "interrupted_install": _interrupted(s.layout),
            "cache": {"dir": s.cache.directory, **s.cache.stats()},
            "last_finalize": s.cache.get_json(f"last:{s.rid}"),
        }
    finally:
        s.close()


def _interrupted(layout: Layout) -> bool:
    with fsutil.opened_root(layout.root) as rfd:
        if fsutil.lstat_rel(rfd, f"etc/selinux/.selcache-install-{layout.policy_type}.json"):
            return True
        for tree in (layout.active, layout.final):
            parent, _, name = tree.rpartition("/")
            if fsutil.lstat_rel(rfd, f"{parent}/.{name}.selcache-new"):
                return True
    return False


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
