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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import explain as explain_mod
from . import fsutil, journal, stamp
from . import remote as fleet
from .compile import LINKED_FILES, Compiled, compile_policy, relink_policy
from .errors import CacheError, CompileError, InputsChanged, SelcacheError, VerifyMismatch
from .inputs import (
    MISSING,
    Hasher,
    InputFile,
    Inputs,
    StatEntry,
    component_digest,
    discover_inputs,
    module_component,
    single_file_inputs,
)
from .install import (
    InstallReport,
    inspect_install,
    install_outputs,
    recover,
    root_lock,
    semanage_lock,
)
from .key import RELINKABLE, Key, compute_key, diff_components, fold, is_link_component, \
    module_set_key
from .layout import Layout, read_layout
from .remote import RemoteConfig, load_config
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
    hashed: int = 0  # input files read and hashed (the rest the stat cache vouched for)
    source: str | None = None  # where a reused output set came from: "local" | "remote"
    #: How the installed output set was first produced: "rebuilt" (a full
    #: compile, byte-identical to semodule -B) or "relinked" (the same meaning).
    compiled_as: str | None = None
    warnings: tuple[str, ...] = ()  # e.g. the cache could not be used

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
            "hashed": self.hashed,
            "source": self.source,
            "compiled_as": self.compiled_as,
            "warnings": list(self.warnings),
        }


class _Session:
    """One root and one cache, for the length of one command."""

    def __init__(self, root: str, cache_dir: str | None, runner: Runner,
                 workdir: str | None, remote_config: RemoteConfig | None = None) -> None:
        self.timings: dict[str, float] = {}
        t = time.monotonic()
        self.layout: Layout = read_layout(root)
        self.cache = Cache(cache_dir or default_cache_dir())
        try:
            self.remote = fleet.open_tier(remote_config) if remote_config else None
        except BaseException:
            self.cache.close()
            raise
        self.runner = runner
        self.workdir = workdir
        self.rid = root_id(root)
        self._stat_cache: dict[str, StatEntry] | None = None
        self.hashed = 0
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
        if self.remote is not None:
            self.remote.close()
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
        self.hashed += inputs.hashed
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
        pending = _conversion_keys(inputs, key)
        known: dict[str, bytes] = {}
        for rel, ckey in pending.items():
            doc = self.cache.get_json(f"hll2cil:{ckey}")
            data = self.cache.get_blob(doc["sha256"]) if isinstance(doc, dict) else None
            if data is not None:
                known[rel] = data
        if known:
            log.info("reusing %d of %d HLL->CIL conversions", len(known), len(pending))
        compiled = compile_policy(inputs, runner=self.runner, workdir=self.workdir,
                                  conversions=known)
        self.timings["compile"] = time.monotonic() - t
        for rel, ckey in pending.items():
            if rel in compiled.files and rel not in known:
                sha = self.cache.put_blob(compiled.files[rel][0])
                self.cache.put_json(f"hll2cil:{ckey}", {"sha256": sha})
        return self._store_compiled(inputs, key, compiled, "rebuilt")

    def _store_compiled(self, inputs: Inputs, key: Key, compiled: Compiled,
                        path: str) -> tuple[Manifest, dict[str, bytes]]:
        _, after = self.discover()
        if after.hex != key.hex:
            raise _Moved()
        manifest = _manifest(key, self.layout, compiled, path)
        blobs = {p: data for p, (data, _mode) in compiled.files.items()}
        t = time.monotonic()
        self.cache.put_entry(manifest, blobs)
        stored = key
        if compiled.generated_inputs:
            # The compile created inputs (CIL converted from HLL). Once
            # installed, the root has them, and its key is this one.
            stored = _post_install_key(inputs, compiled)
            post_manifest = _manifest(stored, self.layout, compiled, path)
            self.cache.put_entry(post_manifest, blobs)
            fleet.publish(self.remote, self.cache, post_manifest, blobs, self.timings)
        # The linked outputs of this module set, for later relinks, and what
        # the inputs were, for `explain`.
        self.cache.put_json(f"linked:{module_set_key(stored.components)}", {"key": stored.hex})
        self.cache.put_json(f"inputs:{key.hex}",
                            explain_mod.snapshot(inputs, _local_texts(self.layout, inputs)))
        self.timings["store"] = time.monotonic() - t
        fleet.publish(self.remote, self.cache, manifest, blobs, self.timings)
        return manifest, blobs

    def relink_source(self, key: Key) -> Manifest | None:
        """A cached compile this key can be relinked from: the same module
        set (module-set key), and every component that differs from it one
        that a relink applies exactly (key.RELINKABLE)."""
        doc = self.cache.get_json(f"linked:{module_set_key(key.components)}")
        if not isinstance(doc, dict) or not isinstance(doc.get("key"), str):
            return None
        base = self.cache.get_manifest(doc["key"])
        if base is None or base.policy_type != self.layout.policy_type:
            return None
        differ = diff_components(base.components, key.components)
        if any(is_link_component(n) or n not in RELINKABLE for n in differ):
            return None
        wanted = {f"{self.layout.active}/{n}" for n in LINKED_FILES}
        files = [f for f in base.files if f.path in wanted]
        if len(files) < len(wanted) - 1 or not all(self.cache.has_blob(f.sha256) for f in files):
            return None  # modules_checksum may be absent; nothing else may
        return base

    def relink_and_store(self, inputs: Inputs, key: Key) -> tuple[Manifest, dict[str, bytes]] | None:
        """The relinked path, or None when no cached compile qualifies."""
        base = self.relink_source(key)
        if base is None:
            return None
        wanted = {f"{self.layout.active}/{n}" for n in LINKED_FILES}
        linked: dict[str, bytes] = {}
        for f in base.files:
            if f.path in wanted:
                data = self.cache.get_blob(f.sha256)
                if data is None:
                    return None
                linked[f.path] = data
        t = time.monotonic()
        try:
            compiled = relink_policy(inputs, linked, runner=self.runner, workdir=self.workdir)
        except CompileError as exc:
            # The full compile decides: it fails too if the inputs are bad.
            log.warning("relink failed, rebuilding instead: %s", exc)
            return None
        self.timings["compile"] = time.monotonic() - t
        return self._store_compiled(inputs, key, compiled, "relinked")

    def build_and_store(self, inputs: Inputs, key: Key) -> tuple[Manifest, dict[str, bytes], str]:
        """The cheapest compile that is correct: a relink when a cached compile
        of the same module set qualifies, else a full rebuild."""
        relinked = self.relink_and_store(inputs, key)
        if relinked is not None:
            return (*relinked, "relinked")
        return (*self.compile_and_store(inputs, key), "rebuilt")

    def fetch_remote(self, key: Key) -> tuple[Manifest, dict[str, bytes]] | None:
        """The fleet tier's entry, verified, and now in the local tier too."""
        return fleet.fetch_into(self.remote, self.cache, key.hex, self.layout.policy_type,
                                 self.timings)

    def record(self, doc: dict[str, Any]) -> None:
        self.cache.put_json(f"last:{self.rid}", doc)


class _Moved(Exception):
    """The root's inputs changed while we worked."""


def _conversion_keys(inputs: Inputs, key: Key) -> dict[str, str]:
    """For each module whose HLL has no CIL yet: the CIL's path, and a key for
    its conversion (the HLL's and lang_ext's digests and the toolchain, which
    includes the HLL compiler). libsemanage itself trusts any CIL file that
    exists; selcache reuses only a conversion of the very same bytes."""
    present = {f.rel: f.digest for f in inputs.files if f.digest != MISSING}
    tool = key.components.get("toolchain", "")
    out: dict[str, str] = {}
    for rel, digest in present.items():
        if rel.endswith("/hll") and f"{rel[:-4]}/cil" not in present:
            lang = present.get(f"{rel[:-4]}/lang_ext", MISSING)
            out[f"{rel[:-4]}/cil"] = hashlib.sha256(
                f"hll2cil\0{digest}\0{lang}\0{tool}".encode()).hexdigest()
    return out


def _local_texts(layout: Layout, inputs: Inputs) -> dict[str, bytes]:
    """The fixed-place files in the store (``*.local``, flags) that exist."""
    fixed = {rel for rel in single_file_inputs(layout) if rel.startswith(layout.active + "/")}
    out: dict[str, bytes] = {}
    with fsutil.opened_root(layout.root) as rfd:
        for f in inputs.files:
            if f.rel in fixed and f.digest != MISSING:
                try:
                    out[f.rel] = fsutil.read_rel(rfd, f.rel)
                except (OSError, SelcacheError):
                    continue  # gone or replaced meanwhile: the snapshot just lacks its text
    return out


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
             workdir: str | None = None, remote: RemoteConfig | None = None,
             lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> Result:
    """Make ``root``'s installed policy match its inputs, from the cache when
    possible. Raises a SelcacheError, leaving the root as it was, on failure,
    and leaves a failure stamp that ``status`` shows until the next success.
    An unusable cache is a warning, never a failure: finalize compiles.
    ``remote``: the fleet tier (default: from the environment and config file)."""
    start = time.monotonic()
    directory = cache_dir or default_cache_dir()
    try:
        s = _Session(root, directory, runner, workdir, remote or load_config())
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
                              hashed=s.hashed, compiled_as=manifest.compile_path,
                              warnings=s.warnings())
            outputs = s.load(manifest) if manifest is not None else None
            compile_seconds = None
            source: str | None = None
            if manifest is not None and outputs is not None:
                s.cache.count("hits")
                action, source = "reused", "local"
            elif (fetched := s.fetch_remote(key)) is not None:
                manifest, outputs = fetched
                action, source = "reused", "remote"
            else:
                s.cache.count("misses")
                s.step = "compile"
                try:
                    manifest, outputs, action = s.build_and_store(inputs, key)
                except _Moved:
                    log.warning("inputs of %s changed during the compile (attempt %d)",
                                layout.root, attempt)
                    continue
                compile_seconds = s.timings.get("compile")
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
                s.remember_installed(manifest)
            return Result(action, layout.root, layout.policy_type, key.hex,
                          time.monotonic() - start, written=report.written,
                          compile_seconds=compile_seconds, recovered=recovered + report.recovered,
                          timings=s.timings, hashed=s.hashed, source=source,
                          compiled_as=manifest.compile_path, warnings=s.warnings())
    raise InputsChanged(f"the SELinux inputs of {layout.root} kept changing while selcache "
                        "worked (twice); nothing was installed. Retry when the root is quiet.")


def stage(root: str = "/", cache_dir: str | None = None, *, runner: Runner = run,
          workdir: str | None = None, precompile: bool = False,
          remote: RemoteConfig | None = None,
          lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> Result:
    """Compile ahead and fill the cache; install nothing. Action is ``cached``
    (already in the local cache; uploaded to the fleet tier if this machine
    signs), ``fetched`` (from the fleet tier) or ``compiled``. A stage is the
    watcher's baseline (what it reports changes against), unless it is the
    watcher's own background ``precompile``."""
    start = time.monotonic()
    s = _Session(root, cache_dir, runner, workdir, remote or load_config())
    try:
        result = _stage(s, start, lock_timeout)
        if not precompile:
            s.cache.put_json(journal.staged_name(s.rid), {"key": result.key, "when": time.time()})
        return result
    finally:
        s.close()


def _stage(s: _Session, start: float, lock_timeout: float) -> Result:
    with root_lock(s.layout, timeout=lock_timeout):
        for _attempt in (1, 2):
            inputs, key = s.discover()
            manifest = s.lookup(key)
            outputs = s.load(manifest) if manifest is not None else None
            if manifest is not None and outputs is not None:
                fleet.publish(s.remote, s.cache, manifest, outputs, s.timings)
                return Result("cached", s.layout.root, s.layout.policy_type, key.hex,
                              time.monotonic() - start, timings=s.timings, source="local")
            if s.fetch_remote(key) is not None:
                return Result("fetched", s.layout.root, s.layout.policy_type, key.hex,
                              time.monotonic() - start, timings=s.timings, source="remote")
            try:
                s.build_and_store(inputs, key)
            except _Moved:
                continue
            return Result("compiled", s.layout.root, s.layout.policy_type, key.hex,
                          time.monotonic() - start, compile_seconds=s.timings.get("compile"),
                          timings=s.timings)
    raise InputsChanged(f"the SELinux inputs of {s.layout.root} kept changing during the "
                        "compile (twice); nothing was cached")


def status(root: str = "/", cache_dir: str | None = None, *,
           remote: RemoteConfig | None = None) -> dict[str, Any]:
    """A read-only report on ``root``: its key, whether the installed files match,
    what finalize would do, the cache's counters and the last finalize."""
    s = _Session(root, cache_dir, run, None, remote or load_config())
    try:
        inputs, key = s.discover()
        manifest = s.lookup(key)
        matches = manifest is not None and s.installed_matches(manifest)
        if matches:
            predicted = "unchanged"
        elif manifest is not None and all(s.cache.has_blob(f.sha256) for f in manifest.files):
            predicted = "reused"
        elif s.relink_source(key) is not None:
            predicted = "relinked"
        else:
            predicted = "rebuilt"
        remote_doc = fleet.status_doc(s.remote, s.cache, key.hex, s.layout.policy_type)
        if predicted == "rebuilt" and remote_doc["entry"] == "verified":
            predicted = "reused"
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
            "watcher": journal.report(journal.load(s.cache, s.rid)),
            "remote": remote_doc,
        }
    finally:
        s.close()


def verify(root: str = "/", cache_dir: str | None = None, *, runner: Runner = run,
           workdir: str | None = None) -> dict[str, Any]:
    """Recompile in a sandbox, ignoring the cache, and compare byte for byte
    with what is installed. A kernel policy that came from a relink differs
    in its bytes: it passes if it means the same (setools), and is listed
    under ``same_meaning``. Raises VerifyMismatch listing the differences."""
    s = _Session(root, cache_dir, runner, workdir)
    try:
        inputs, key = s.discover()
        compiled = compile_policy(inputs, runner=runner, workdir=workdir)
        differ: list[str] = []
        same_meaning: list[str] = []
        with fsutil.opened_root(s.layout.root) as rfd:
            for rel, (data, _mode) in sorted(compiled.files.items()):
                st = fsutil.lstat_rel(rfd, rel)
                installed = fsutil.read_rel(rfd, rel) if st is not None and _is_reg(st) else None
                if installed == data:
                    continue
                if installed is not None and _is_kernel_policy(s.layout, rel):
                    from . import analysis  # setools, only when the bytes differ

                    if not analysis.semantic_differences(data, installed):
                        same_meaning.append(rel)
                        continue
                differ.append(rel)
        doc = {"version": 1, "root": s.layout.root, "key": key.hex, "files": len(compiled.files),
               "differ": differ, "same_meaning": same_meaning, "ok": not differ}
        if differ:
            raise VerifyMismatch(f"{len(differ)} installed file(s) differ from a fresh compile: "
                                 + ", ".join("/" + d for d in differ))
        return doc
    finally:
        s.close()


def _is_kernel_policy(layout: Layout, rel: str) -> bool:
    return rel == f"{layout.active}/policy.kern" or \
        rel.startswith(f"{layout.final}/policy/policy.")


def gc(cache_dir: str | None = None, *, max_age: float | None = None) -> dict[str, int]:
    with Cache(cache_dir or default_cache_dir()) as cache:
        return cache.gc(max_age=max_age)


def _is_policy_file(name: str) -> bool:
    return name.startswith("policy.") and name[len("policy."):].isdigit()


def _installed_policy(layout: Layout, name: str) -> tuple[str, bytes] | None:
    """The installed kernel policy: ``name`` (the file finalize would write)
    if present, else the highest ``policy.N``; None when there is none."""
    policy_dir = f"{layout.final}/policy"
    with fsutil.opened_root(layout.root) as rfd:
        try:
            with fsutil.opened_dir(rfd, policy_dir) as dfd:
                names = [n for n in os.listdir(dfd) if _is_policy_file(n)]
                if not names:
                    return None
                if name not in names:
                    name = max(names, key=lambda n: int(n.split(".")[1]))
                return f"{policy_dir}/{name}", fsutil.read_at(dfd, name, what=f"{policy_dir}/{name}")
        except FileNotFoundError:
            return None


def diff(root: str = "/", cache_dir: str | None = None, *, full: bool = False,
         progress: Callable[[str, int, int], None] | None = None, runner: Runner = run,
         workdir: str | None = None) -> dict[str, Any]:
    """A semantic diff (setools) from the installed kernel policy to the one
    finalize would install: the cached entry's ``policy.N``, else a compile
    that fills the cache as ``stage`` does. Installs nothing. ``full``
    compares every rule (slow); the default is the quick comparison of
    ``analysis.compare``. Returns the ``selcache diff --json`` document."""
    from . import analysis  # setools stays off the finalize path

    start = time.monotonic()
    s = _Session(root, cache_dir, runner, workdir)
    try:
        layout = s.layout
        with root_lock(layout):
            for _attempt in (1, 2):
                inputs, key = s.discover()
                manifest = s.lookup(key)
                outputs = s.load(manifest) if manifest is not None else None
                source = "cache"
                if manifest is None or outputs is None:
                    if progress is not None:
                        progress("compiling the pending policy", 0, 1)
                    try:
                        manifest, outputs, _ = s.build_and_store(inputs, key)
                    except _Moved:
                        continue
                    source = "compiled"
                break
            else:
                raise InputsChanged(f"the SELinux inputs of {layout.root} kept changing during "
                                    "the compile (twice); nothing was compared")
            pending = [p for p in outputs
                       if p.startswith(f"{layout.final}/policy/")
                       and _is_policy_file(p.rpartition("/")[2])]
            if len(pending) != 1:
                raise SelcacheError(f"the output set of key {key.hex[:16]} has {len(pending)} "
                                    f"kernel policy files under /{layout.final}/policy")
            new_rel = pending[0]
            installed = _installed_policy(layout, new_rel.rpartition("/")[2])
    finally:
        s.close()
    new = outputs[new_rel]
    doc: dict[str, Any] = {
        "version": 1, "root": layout.root, "policy_type": layout.policy_type, "key": key.hex,
        "mode": "full" if full else "quick",
        "installed": None,
        "pending": {"path": new_rel, "sha256": fsutil.sha256_hex(new), "source": source},
    }
    if installed is not None:
        old_rel, old = installed
        doc["installed"] = {"path": old_rel, "sha256": fsutil.sha256_hex(old)}
        if old == new:
            # Nothing to analyse: the same bytes mean the same policy.
            doc.update(byte_identical=True, identical=True, differences={}, rules={},
                       rule_changes={}, seconds=round(time.monotonic() - start, 6))
            return doc
    cmp = analysis.compare(installed[1] if installed else None, new, full=full,
                           progress=progress,
                           labels=(f"/{installed[0]}" if installed else "", f"the pending /{new_rel}"))
    if doc["installed"] is not None:
        doc["installed"]["policy"] = cmp["left"]
    doc["pending"]["policy"] = cmp["right"]
    doc.update(byte_identical=False, identical=cmp["identical"], differences=cmp["differences"],
               rules=cmp["rules"], rule_changes=cmp["rule_changes"],
               seconds=round(time.monotonic() - start, 6))
    return doc


def explain(root: str = "/", cache_dir: str | None = None) -> dict[str, Any]:
    """Which path finalize will take and why, naming every component that
    differs from the closest cached entry. Read-only, and compiles nothing."""
    s = _Session(root, cache_dir, run, None)
    try:
        layout = s.layout
        inputs, key = s.discover()
        manifests = [m for m in s.cache.iter_manifests() if m.policy_type == layout.policy_type]
        manifest = s.lookup(key)
        source = s.relink_source(key)
        base: Manifest | None
        if manifest is not None and s.installed_matches(manifest):
            action, base = "unchanged", manifest
            reason = "the installed files are the cached output set of these inputs"
        elif manifest is not None and all(s.cache.has_blob(f.sha256) for f in manifest.files):
            action, base = "reused", manifest
            reason = (f"these inputs were compiled before ({manifest.compile_path}); "
                      "their output set is cached and will be installed")
        elif source is not None:
            action, base = "relinked", source
            reason = ("the same module set was compiled before; only local customizations "
                      "differ, which libsemanage merges onto its linked policy without a CIL "
                      "compile")
        else:
            action = "rebuilt"
            base = explain_mod.closest(manifests, key.components)
            if base is None:
                reason = "nothing for this root's policy type is cached yet"
            else:
                differ = diff_components(base.components, key.components)
                compile_side = [n for n in differ if is_link_component(n)]
                other = [n for n in differ if not is_link_component(n) and n not in RELINKABLE]
                if compile_side:
                    reason = ("the module set or the compile's settings changed ("
                              + ", ".join(compile_side[:5])
                              + (", ..." if len(compile_side) > 5 else "")
                              + "): a full compile")
                else:
                    reason = (f"{', '.join(other)} changed, which only a full compile applies "
                              "exactly")
        old = s.cache.get_json(f"inputs:{base.key}") if base is not None else None
        texts = {rel: data.decode(errors="replace")
                 for rel, data in _local_texts(layout, inputs).items()}
        changes = explain_mod.changes(base, old if isinstance(old, dict) else None, inputs,
                                      key.components, texts)
        estimate = explain_mod.estimate(manifests, action) if action in ("relinked", "rebuilt") \
            else None
        return {
            "version": 1,
            "root": layout.root,
            "policy_type": layout.policy_type,
            "key": key.hex,
            "action": action,
            "reason": reason,
            "base": None if base is None else {
                "key": base.key, "compile_path": base.compile_path, "created": base.created},
            "changes": changes,
            "estimated_seconds": estimate,
        }
    finally:
        s.close()
