"""The watcher's journal: which components changed since the baseline, and
whether that list can be trusted.

The journal is a hint. ``finalize`` never believes it: it stats every input
and re-hashes by content whatever the stat cache cannot vouch for. What the
watcher buys is time: it hashes changed files as they change (the stat cache
it leaves behind makes finalize re-hash fewer files) and precompiles new
inputs in the background, so finalize finds them cached.

The baseline is the key of the last successful ``finalize`` (what is
installed) or of the last explicit ``stage``, whichever is newer. A component
is dirty when its content digest differs from the baseline's, never merely
because an event touched it: every semodule commit rewrites every store file.

The journal lives in the cache (``json:journal:<root id>``), so it survives a
restart of the watcher. It is untrusted whenever its owner could have missed
events: a start-up gap, an inotify overflow, a dead emitter thread, a failed
watch, a heartbeat gap, the store directory being replaced. The watcher then
rescans every input and trusts the journal again. A reader also distrusts a
journal whose watcher is gone or whose heartbeat is older than its interval.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from .store import Cache, Manifest

JOURNAL_VERSION = 1

#: How many recent rescan reasons the journal keeps.
MAX_REASONS = 20

#: A heartbeat this many intervals old means the watcher stopped looking.
STALE_INTERVALS = 2.0

PRECOMPILE_STATES = ("idle", "pending", "running", "done", "failed", "superseded")


def boot_id() -> str:
    """The kernel's boot id, so a pid from an earlier boot is never taken as alive."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def _journal_name(rid: str) -> str:
    return f"journal:{rid}"


def staged_name(rid: str) -> str:
    return f"staged:{rid}"


@dataclass
class Precompile:
    state: str = "idle"
    key: str | None = None
    since: float | None = None
    seconds: float | None = None
    error: str | None = None


@dataclass
class Journal:
    """Owned and written by one watcher; read by ``status``."""

    root: str
    pid: int
    boot_id: str
    started: float
    interval: float
    heartbeat: float = 0.0
    generation: int = 0
    baseline_key: str | None = None
    current_key: str | None = None
    dirty: dict[str, float] = field(default_factory=dict)
    trusted: bool = False
    reasons: list[dict[str, Any]] = field(default_factory=list)
    rescans: int = 0
    events: int = 0
    precompile: Precompile = field(default_factory=Precompile)

    def distrust(self, reason: str, when: float | None = None) -> None:
        self.trusted = False
        self.reasons.append({"reason": reason, "at": when or time.time()})
        del self.reasons[:-MAX_REASONS]

    def update(self, baseline: dict[str, str] | None, baseline_key: str | None,
               current: dict[str, str], current_key: str, now: float) -> bool:
        """Recompute the dirty set from content digests. True if it changed."""
        if baseline is None:
            dirty_names = set(current)  # no baseline known: everything is new
        else:
            dirty_names = {n for n in set(current) | set(baseline)
                           if current.get(n) != baseline.get(n)}
        dirty = {n: self.dirty.get(n, now) for n in sorted(dirty_names)}
        changed = (dirty != self.dirty or current_key != self.current_key
                   or baseline_key != self.baseline_key)
        self.dirty, self.current_key, self.baseline_key = dirty, current_key, baseline_key
        if changed:
            self.generation += 1
        return changed

    def to_json(self) -> dict[str, Any]:
        return {"version": JOURNAL_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Journal:
        doc = dict(doc)
        doc.pop("version", None)
        pre = Precompile(**doc.pop("precompile", {}))
        return cls(**doc, precompile=pre)


def load(cache: Cache, rid: str) -> Journal | None:
    doc = cache.get_json(_journal_name(rid))
    if not isinstance(doc, dict) or doc.get("version") != JOURNAL_VERSION:
        return None
    try:
        return Journal.from_json(doc)
    except TypeError:
        return None


def save(cache: Cache, rid: str, journal: Journal) -> None:
    cache.put_json(_journal_name(rid), journal.to_json())


def baseline(cache: Cache, rid: str) -> tuple[str | None, Manifest | None]:
    """The newest of the last successful finalize and the last explicit stage:
    its key, and its manifest (which lists the component digests) if cached."""
    candidates: list[tuple[float, str]] = []
    last = cache.get_json(f"last:{rid}")
    if isinstance(last, dict) and last.get("ok") and isinstance(last.get("key"), str):
        candidates.append((float(last.get("when", 0)), last["key"]))
    staged = cache.get_json(staged_name(rid))
    if isinstance(staged, dict) and isinstance(staged.get("key"), str):
        candidates.append((float(staged.get("when", 0)), staged["key"]))
    if not candidates:
        return None, None
    _, key = max(candidates)
    return key, cache.get_manifest(key)


def _alive(pid: int, boot: str) -> bool:
    if boot != boot_id():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def report(journal: Journal | None, now: float | None = None) -> dict[str, Any] | None:
    """The watcher as ``status`` shows it. ``trusted`` here also requires a
    live watcher with a fresh heartbeat."""
    if journal is None:
        return None
    now = time.time() if now is None else now
    age = now - journal.heartbeat
    running = _alive(journal.pid, journal.boot_id)
    fresh = running and age <= journal.interval * STALE_INTERVALS
    why = None
    if not running:
        why = "the watcher is not running"
    elif not fresh:
        why = f"the last heartbeat is {age:.1f}s old (interval {journal.interval:g}s)"
    elif not journal.trusted:
        why = journal.reasons[-1]["reason"] if journal.reasons else "rescan pending"
    return {
        "running": running,
        "pid": journal.pid,
        "started": journal.started,
        "heartbeat": journal.heartbeat,
        "heartbeat_age": round(age, 3),
        "interval": journal.interval,
        "generation": journal.generation,
        "baseline_key": journal.baseline_key,
        "current_key": journal.current_key,
        "dirty": dict(journal.dirty),
        "trusted": fresh and journal.trusted,
        "untrusted_because": why,
        "recent_rescans": journal.reasons[-5:],
        "rescans": journal.rescans,
        "events": journal.events,
        "precompile": asdict(journal.precompile),
    }
