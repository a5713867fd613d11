"""``selcache watch``: follow a root's SELinux inputs and precompile changes.

The only module that imports watchdog. Events are hints about *when* to look;
content digests decide *what* changed (see journal.py). Anything that could
have lost events (a start-up gap, an inotify overflow, a dead emitter thread,
a failed watch, a stalled loop, the store directory replaced by a semodule
commit) makes the journal untrusted until a full rescan has run.

watchdog reports lost events only through its log (an overflow is logged by
its inotify reader and then reconciled silently; a watch that cannot be added
below a new directory is logged and skipped), so the watcher listens to the
``watchdog`` logger: any warning from it distrusts the journal.

When changes settle, a ``stage`` runs in a child process at the lowest CPU
and I/O priority. A change that arrives meanwhile kills it; ``stage`` itself
re-hashes the inputs before storing, so nothing lands under a stale key.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver, ObservedWatch

from . import journal as journal_mod
from .errors import SelcacheError
from .inputs import ACCOUNT_DIRS, Hasher, InputFile, classify, component_digest, \
    discover_inputs, refresh_file, single_file_inputs
from .journal import Journal
from .key import fold
from .layout import Layout, read_layout
from .store import Cache, root_id

log = logging.getLogger(__name__)

#: Changes are folded into the journal once the root has been quiet this long.
SETTLE_SECONDS = 0.3
#: Quiet time before a precompile starts. Longer than the stat cache's racy
#: window (inputs.RACY_NS), so what the precompile hashes is cached for finalize.
DEFAULT_DEBOUNCE = 3.0
DEFAULT_INTERVAL = 5.0
#: A full rescan this often anyway, for what no watch covers (a hand edit
#: below active/modules/, a toolchain update). Cheap: the stat cache vouches
#: for unchanged files.
RESCAN_SECONDS = 60.0
#: Distinct pending paths kept before giving up on the list and rescanning.
MAX_PENDING = 4096

_EVENTS: list[type[FileSystemEvent]] = [
    FileCreatedEvent, FileDeletedEvent, FileModifiedEvent, FileMovedEvent, FileClosedEvent,
    DirCreatedEvent, DirDeletedEvent, DirMovedEvent,
]


class _Handler(FileSystemEventHandler):
    def __init__(self, sink: Callable[[FileSystemEvent], None]) -> None:
        self._sink = sink

    def on_any_event(self, event: FileSystemEvent) -> None:
        self._sink(event)


class _TroubleLog(logging.Handler):
    """Turns watchdog's warnings (lost events, failed watches) into distrust."""

    def __init__(self, sink: Callable[[str], None]) -> None:
        super().__init__(level=logging.WARNING)
        self._sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self._sink(f"watchdog: {record.getMessage()}")


class Watcher:
    """Watch one root. ``run`` blocks until ``stop`` is called (from any thread)."""

    def __init__(self, root: str, cache_dir: str, *, debounce: float = DEFAULT_DEBOUNCE,
                 interval: float = DEFAULT_INTERVAL, precompile: bool = True) -> None:
        self.layout: Layout = read_layout(root)
        self.cache_dir = cache_dir
        self.debounce = debounce
        self.interval = interval
        self.precompile = precompile
        self.rid = root_id(self.layout.root)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._prefix = self.layout.root.rstrip("/") + "/"
        self._single = single_file_inputs(self.layout)
        # Filled by watchdog's threads, drained by the loop (under _lock).
        self._pending: set[str] = set()
        self._full_scan: str | None = "start-up"
        self._distrust: list[str] = ["start-up: changes made before the watcher started "
                                     "were not seen"]
        self._last_event = 0.0
        self._events = 0
        # Owned by the loop thread.
        self._files: dict[str, InputFile] = {}
        self._components: dict[str, str] = {}
        self._stat_cache: dict[str, tuple[int, int, int, int, int, str]] = {}
        self._observer: BaseObserver | None = None
        self._readers: set[threading.Thread] = set()
        self._active_watch: ObservedWatch | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._failed_keys: set[str] = set()
        now = time.time()
        self.journal = Journal(root=self.layout.root, pid=os.getpid(),
                               boot_id=journal_mod.boot_id(), started=now,
                               interval=interval, heartbeat=now)

    # -- watchdog's threads ------------------------------------------------------

    def _on_event(self, event: FileSystemEvent) -> None:
        paths = [event.src_path, getattr(event, "dest_path", "")]
        with self._lock:
            self._events += 1
            for p in paths:
                rel = self._rel(os.fsdecode(p)) if p else None
                if rel is None:
                    continue
                reason = self._needs_scan(rel, event)
                if reason is not None:
                    self._note_full(reason)
                elif rel in self._single:
                    self._pending.add(rel)
                    if len(self._pending) > MAX_PENDING:
                        self._pending.clear()
                        self._note_full(f"more than {MAX_PENDING} changed paths at once")
                else:
                    continue
                self._last_event = time.monotonic()

    def _on_trouble(self, message: str) -> None:
        with self._lock:
            self._distrust.append(message)
            self._note_full(message)
            self._last_event = time.monotonic()

    def _note_full(self, reason: str) -> None:
        if self._full_scan is None:
            self._full_scan = reason

    def _rel(self, path: str) -> str | None:
        if path.startswith(self._prefix):
            return path[len(self._prefix):].rstrip("/")
        return None

    def _needs_scan(self, rel: str, event: FileSystemEvent) -> str | None:
        """Why this path calls for a full rescan, or None if it does not."""
        store = self.layout.store + "/"
        if rel.startswith(store) or rel == self.layout.store:
            sub = rel[len(store):]
            top = sub.split("/", 1)[0]
            if top != "active":
                return None  # tmp/, previous/, locks: libsemanage's own working state
            if sub == "active":
                # Called under _lock. The old active/ and every watch below it
                # are gone: a full rescan, and distrust until it has run.
                self._distrust.append("the store directory was replaced (a semodule commit)")
                return "the store directory was replaced"
            if event.is_directory:
                return f"a directory changed in the store: /{rel}"
            comp = classify(self.layout, rel)
            if comp is None or rel in self._single:
                return None
            return f"{comp} changed"
        if rel in ACCOUNT_DIRS or any(d.startswith(rel + "/") for d in ACCOUNT_DIRS):
            return f"/{rel} changed"
        return None

    # -- the loop ----------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()

    def run(self, ready: Callable[[], None] | None = None) -> None:
        """Watch until ``stop()``. ``ready`` is called once the first scan is done."""
        trouble = _TroubleLog(self._on_trouble)
        wd_log = logging.getLogger("watchdog")
        wd_log.addHandler(trouble)
        if not wd_log.isEnabledFor(logging.WARNING):
            wd_log.setLevel(logging.WARNING)  # its warnings are how lost events show
        cache = Cache(self.cache_dir)
        previous = journal_mod.load(cache, self.rid)
        if previous is not None:
            # Keep the generation counter and first-seen times across restarts.
            self.journal.generation = previous.generation
            self.journal.dirty = dict(previous.dirty)
            self.journal.reasons = list(previous.reasons)
        try:
            self._start_observer()
            stored = cache.get_json(f"statcache:{self.rid}") or {}
            self._stat_cache = {k: tuple(v) for k, v in stored.items()}
            self._process(cache)
            if ready is not None:
                ready()
            self._loop(cache)
        finally:
            self._stop_observer()
            self._kill_precompile("the watcher stopped")
            self._save(cache)
            cache.close()
            wd_log.removeHandler(trouble)

    def _loop(self, cache: Cache) -> None:
        tick = max(0.05, min(0.5, self.debounce / 4, self.interval / 4))
        last_beat = last_scan = time.monotonic()
        while True:
            before = time.monotonic()
            if self._stop.wait(tick):
                break
            now = time.monotonic()
            if now - before > self.interval:
                # The loop slept far longer than asked (stopped, starved):
                # the kernel's event queue may have overflowed meanwhile.
                self._on_trouble(f"the watcher stalled for {now - before:.1f}s")
            self._check_observer()
            if now - last_scan >= RESCAN_SECONDS:
                last_scan = now
                with self._lock:
                    self._note_full("periodic rescan")
            with self._lock:
                quiet = now - self._last_event
                due = (self._pending or self._full_scan) and quiet >= SETTLE_SECONDS
            if due:
                self._process(cache)
            self._manage_precompile(cache, quiet)
            if now - last_beat >= self.interval:
                last_beat = now
                self._refresh_baseline(cache)
                self._save(cache)

    def _start_observer(self) -> None:
        before = set(threading.enumerate())
        observer = Observer()
        # The inotify reader thread the observer starts at once. It feeds every
        # emitter, and an exception can kill it silently.
        self._readers = set(threading.enumerate()) - before
        handler = _Handler(self._on_event)
        root = self.layout.root
        # Non-recursive watches only. Module changes go through a semodule
        # commit, which replaces active/ (seen from the store directory); a
        # recursive watch over the store also trips a watchdog 7.1 bug that
        # kills its inotify reader when a directory is renamed over.
        paths = [self.layout.store, self.layout.active, "etc/selinux", "etc", "etc/default", "",
                 *{d.split("/")[0] for d in ACCOUNT_DIRS}]
        try:
            for rel in paths:
                path = os.path.join(root, rel) if rel else root
                if os.path.isdir(path) and not os.path.islink(path):
                    watch = observer.schedule(handler, path, recursive=False, event_filter=_EVENTS)
                    if rel == self.layout.active:
                        self._active_watch = watch
            observer.start()
        except OSError as exc:
            observer.stop()
            observer.join(timeout=10)
            raise SelcacheError(f"cannot watch {self.layout.root}: {exc}") from exc
        self._observer = observer

    def _stop_observer(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=10)
            self._observer = None

    def _rewatch_active(self) -> None:
        """Point the active/ watch at the current active/: the watched inode
        became previous/ (and was removed) when a commit replaced it."""
        observer = self._observer
        if observer is None:
            return
        if self._active_watch is not None:
            observer.unschedule(self._active_watch)
            self._active_watch = None
        path = os.path.join(self.layout.root, self.layout.active)
        try:
            self._active_watch = observer.schedule(_Handler(self._on_event), path,
                                                   recursive=False, event_filter=_EVENTS)
        except OSError as exc:
            self._on_trouble(f"cannot watch /{self.layout.active}: {exc}")

    def _check_observer(self) -> None:
        observer = self._observer
        if observer is None:
            return
        threads = [observer, *self._readers]
        with self._lock:
            if self._full_scan is None:
                # An emitter also ends when its directory goes away (active/
                # replaced by a commit); the pending rescan re-watches that.
                threads += observer.emitters
        dead = [t.name for t in threads if not t.is_alive()]
        if dead:
            self._on_trouble(f"watchdog's thread(s) {', '.join(sorted(dead))} died")
            self._stop_observer()
            try:
                self._start_observer()
            except SelcacheError as exc:
                log.error("%s; retrying", exc)

    def _process(self, cache: Cache) -> None:
        """Fold pending changes into the journal: a full rescan when one is
        due, else re-hash just the fixed-place files that events named."""
        with self._lock:
            pending, self._pending = self._pending, set()
            full, self._full_scan = self._full_scan, None
            distrust, self._distrust = self._distrust, []
            self.journal.events = self._events
        now = time.time()
        for reason in dict.fromkeys(distrust):
            self.journal.distrust(reason, now)
        if full:
            self._rewatch_active()
        try:
            if full or not self._files:
                inputs = discover_inputs(self.layout, self._stat_cache)
                self._files = {f.rel: f for f in inputs.files}
                self._stat_cache = dict(inputs.stat_cache)
                self.journal.rescans += 1
            else:
                hasher = Hasher(self._stat_cache)
                for rel in sorted(pending):
                    self._files[rel] = refresh_file(self.layout, rel, hasher)
                self._stat_cache.update(hasher.new)
        except SelcacheError as exc:
            # A broken root (a FIFO where a file belongs, ...): say so, keep
            # watching, and try again on the next change.
            self.journal.distrust(f"scan failed: {exc}", now)
            self._save(cache)
            return
        cache.put_json(f"statcache:{self.rid}", self._stat_cache)
        groups: dict[str, list[InputFile]] = {}
        for f in self._files.values():
            groups.setdefault(f.component, []).append(f)
        self._components = {n: component_digest(g) for n, g in sorted(groups.items())}
        key = fold(self._components)
        base_key, manifest = journal_mod.baseline(cache, self.rid)
        base = dict(manifest.components) if manifest is not None else None
        if self.journal.update(base, base_key, self._components, key, now):
            if self._proc is not None and self.journal.precompile.key != key:
                self._kill_precompile("superseded by a newer change")
        with self._lock:
            if not self._distrust and self._full_scan is None:
                self.journal.trusted = True
        self._save(cache)

    def _refresh_baseline(self, cache: Cache) -> None:
        """A finalize or stage moves the baseline without touching any input."""
        if not self._components or self.journal.current_key is None:
            return
        base_key, manifest = journal_mod.baseline(cache, self.rid)
        if base_key != self.journal.baseline_key:
            base = dict(manifest.components) if manifest is not None else None
            self.journal.update(base, base_key, self._components, self.journal.current_key,
                                time.time())

    # -- background precompile -------------------------------------------------

    def _manage_precompile(self, cache: Cache, quiet: float) -> None:
        pre = self.journal.precompile
        if self._proc is not None:
            rc = self._proc.poll()
            if rc is None:
                return
            self._finish_precompile(rc)
            self._save(cache)
            return
        key = self.journal.current_key
        if not self.precompile or key is None or key == self.journal.baseline_key:
            return
        if key in self._failed_keys or (pre.key == key and pre.state in ("done", "running")):
            return
        if cache.get_manifest(key) is not None:
            return  # already compiled (by an earlier run, a stage, another root)
        if pre.state != "pending" or pre.key != key:
            self.journal.precompile = journal_mod.Precompile("pending", key, time.time())
            self._save(cache)
        if quiet < self.debounce or self._full_scan is not None or self._pending:
            return
        self._start_precompile(key)
        self._save(cache)

    def _start_precompile(self, key: str) -> None:
        argv = [sys.executable, "-m", "selcache", "stage", "--precompile", "--json",
                "--root", self.layout.root, "--cache-dir", self.cache_dir]
        if shutil.which("ionice"):
            argv = ["ionice", "-c", "3", *argv]
        if shutil.which("nice"):
            argv = ["nice", "-n", "19", *argv]
        log.info("precompiling %s for key %s", self.layout.root, key[:16])
        self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, start_new_session=True)
        self.journal.precompile = journal_mod.Precompile("running", key, time.time())

    def _finish_precompile(self, rc: int) -> None:
        proc, self._proc = self._proc, None
        assert proc is not None
        out, err = proc.communicate()
        pre = self.journal.precompile
        pre.seconds = round(time.time() - (pre.since or time.time()), 3)
        if rc == 0:
            try:
                staged = json.loads(out)["key"]
            except (ValueError, KeyError, TypeError):
                staged = None
            pre.state = "done" if staged == pre.key else "superseded"
            pre.key = staged or pre.key
        else:
            pre.state = "failed"
            pre.error = err.decode(errors="replace").strip()[-2000:]
            if pre.key is not None:
                self._failed_keys.add(pre.key)
        log.info("precompile %s (%.1fs)", pre.state, pre.seconds)

    def _kill_precompile(self, why: str) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            proc.wait()
        proc.communicate()
        self.journal.precompile.state = "superseded"
        self.journal.precompile.error = why

    def _save(self, cache: Cache) -> None:
        self.journal.heartbeat = time.time()
        journal_mod.save(cache, self.rid, self.journal)

