"""The watcher on real inotify, with real semodule commits.

The watcher runs as its own process (`selcache watch`), the way systemd runs
it, so that it can be killed, stopped and measured; one test runs it in this
process to check that stopping it leaves no thread behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from selcache import journal, pipeline
from selcache.layout import read_layout
from selcache.store import Cache, root_id
from selcache.watch import Watcher

from .conftest import POLICIES, assert_matches_reference

pytestmark = pytest.mark.timeout(300)


def wait_for(what: str, predicate: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


def watcher_doc(root: Path, cache_dir: str) -> dict[str, Any]:
    doc = pipeline.status(str(root), cache_dir)["watcher"]
    assert doc is not None
    return doc


def wait_doc(root: Path, cache_dir: str, what: str, cond: Callable[[dict[str, Any]], bool],
             timeout: float = 30.0) -> dict[str, Any]:
    """The watcher's status once ``cond`` holds for it."""
    def probe() -> dict[str, Any] | None:
        doc = watcher_doc(root, cache_dir)
        return doc if cond(doc) else None
    return wait_for(what, probe, timeout)  # type: ignore[no-any-return]


def active(root: Path) -> Path:
    return root / read_layout(str(root)).active


def children_of(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry))
    return out


@contextmanager
def running_watcher(root: Path, cache_dir: str, *args: str,
                    tmpdir: Path | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """`selcache watch` in a child process, ready (first scan done) on entry,
    stopped with SIGTERM on exit, and checked to leave no process behind.
    ``tmpdir``: where its precompiles make their sandboxes."""
    started = time.time()
    env = {**os.environ, **({"TMPDIR": str(tmpdir)} if tmpdir else {})}
    proc = subprocess.Popen(
        [sys.executable, "-m", "selcache", "watch", "--root", str(root), "--cache-dir", cache_dir,
         "--interval", "1", *args],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        def ready() -> bool:
            doc = pipeline.status(str(root), cache_dir)["watcher"]
            return doc is not None and doc["pid"] == proc.pid and doc["started"] >= started \
                and doc["trusted"]
        wait_for("the watcher's first scan", ready)
        yield proc
    finally:
        if proc.poll() is None:
            kids = children_of(proc.pid)
            proc.send_signal(signal.SIGCONT)
            proc.terminate()
            proc.wait(timeout=30)
            assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
            for kid in kids:
                assert not Path(f"/proc/{kid}").exists() or \
                    "zombie" in Path(f"/proc/{kid}/status").read_text().lower(), \
                    f"process {kid} outlived the watcher"
        proc.communicate()


def semodule_install(root: Path, module: Path) -> None:
    """A real `semodule -N -p ROOT -i`: libsemanage replaces active/."""
    layout = read_layout(str(root))
    subprocess.run(["semodule", "-N", "-p", str(root), "-s", layout.policy_type, "-i",
                    str(module)], check=True, capture_output=True)


def test_semodule_commit_and_hand_edit_are_exactly_the_dirty_set_then_precompiled(
        small_root: Path, cache_dir: str, tmp_path: Path) -> None:
    assert pipeline.stage(str(small_root), cache_dir).action == "compiled"
    # Longer than the stat cache's racy window (2 s): what the precompile hashes
    # is then cached, and finalize re-hashes nothing.
    with running_watcher(small_root, cache_dir, "--debounce", "2.5"):
        before = os.stat(active(small_root)).st_ino
        semodule_install(small_root, POLICIES / "extra" / "myapp.cil")
        assert os.stat(active(small_root)).st_ino != before, "semodule did not replace active/"
        with open(active(small_root) / "booleans.local", "a") as fh:
            fh.write("httpd_can_network_connect=1\n")
        doc = wait_doc(small_root, cache_dir, "both changes in the journal",
                       lambda d: set(d["dirty"]) == {"module:myapp", "booleans"})
        assert doc["current_key"] == pipeline.status(str(small_root), cache_dir)["key"]
        done = wait_doc(small_root, cache_dir, "the precompile",
                        lambda d: d["precompile"]["state"] == "done")
        assert done["precompile"]["key"] == doc["current_key"]
        reasons = [r["reason"] for r in done["recent_rescans"]]
        assert any("store directory was replaced" in r for r in reasons)
        result = pipeline.finalize(str(small_root), cache_dir)
        assert result.action == "reused" and result.compile_seconds is None
        # The watcher hashed the new store files already; finalize hashed none.
        assert result.hashed == 0
        # After finalize the baseline moved: nothing is dirty any more.
        wait_for("an empty dirty set", lambda: not watcher_doc(small_root, cache_dir)["dirty"])
    assert_matches_reference(small_root, tmp_path)


def test_editor_style_atomic_replace_is_seen(small_root: Path, cache_dir: str) -> None:
    pipeline.finalize(str(small_root), cache_dir)
    with running_watcher(small_root, cache_dir, "--no-precompile"):
        target = active(small_root) / "booleans.local"
        tmp = target.with_name(".booleans.local.swp")
        tmp.write_text("httpd_can_network_connect=1\n")
        os.rename(tmp, target)
        doc = wait_doc(small_root, cache_dir, "booleans in the journal", lambda d: d["dirty"])
        assert set(doc["dirty"]) == {"booleans"}
        assert doc["precompile"]["state"] in ("idle", "pending")
        # Writing the old content back is not a change.
        target.unlink()
        wait_for("a clean journal", lambda: not watcher_doc(small_root, cache_dir)["dirty"])


def test_overflow_marks_the_journal_untrusted_and_rescans(small_root: Path, cache_dir: str,
                                                          tmp_path: Path) -> None:
    pipeline.finalize(str(small_root), cache_dir)
    knob = Path("/proc/sys/fs/inotify/max_queued_events")
    saved = knob.read_text()
    knob.write_text("16\n")  # read at inotify_init: only the watcher gets the tiny queue
    try:
        ctx = running_watcher(small_root, cache_dir, "--no-precompile")
        proc = ctx.__enter__()
    finally:
        knob.write_text(saved)
    try:
        proc.send_signal(signal.SIGSTOP)
        scratch = small_root / "etc" / "scratch"
        for i in range(200):  # far more than 16 events while nobody reads
            scratch.write_text(str(i))
        scratch.unlink()
        (active(small_root) / "booleans.local").write_text("httpd_can_network_connect=1\n")
        proc.send_signal(signal.SIGCONT)
        wait_doc(small_root, cache_dir, "the overflow to be noticed",
                 lambda d: any("overflow" in r["reason"].lower() for r in d["recent_rescans"]))
        doc = wait_doc(small_root, cache_dir, "a trusted journal after the rescan",
                       lambda d: d["trusted"])
        assert set(doc["dirty"]) == {"booleans"}
    finally:
        ctx.__exit__(None, None, None)
    assert pipeline.finalize(str(small_root), cache_dir).action == "relinked"
    assert_matches_reference(small_root, tmp_path, semantic_policy=True)


def test_killed_watcher_is_not_trusted_and_a_late_watcher_rescans(
        small_root: Path, cache_dir: str, tmp_path: Path) -> None:
    pipeline.finalize(str(small_root), cache_dir)
    with running_watcher(small_root, cache_dir, "--no-precompile") as proc:
        proc.kill()
        proc.wait()
    (active(small_root) / "booleans.local").write_text("httpd_can_network_connect=1\n")
    doc = watcher_doc(small_root, cache_dir)
    assert not doc["running"] and not doc["trusted"]
    assert doc["dirty"] == {}, "the dead watcher saw nothing"
    # A watcher started after the change finds it by its start-up rescan.
    with running_watcher(small_root, cache_dir, "--no-precompile"):
        doc = watcher_doc(small_root, cache_dir)
        assert set(doc["dirty"]) == {"booleans"}
        assert any(r["reason"].startswith("start-up") for r in doc["recent_rescans"])
    result = pipeline.finalize(str(small_root), cache_dir)
    assert result.action == "relinked"
    assert_matches_reference(small_root, tmp_path, semantic_policy=True)


def test_a_lying_journal_changes_nothing(small_root: Path, cache_dir: str,
                                         tmp_path: Path) -> None:
    """A journal that claims a live, trusted watcher and no change: finalize
    and status still go by content."""
    first = pipeline.finalize(str(small_root), cache_dir)
    now = time.time()
    lie = journal.Journal(root=str(small_root), pid=os.getpid(), boot_id=journal.boot_id(),
                          started=now, interval=3600, heartbeat=now, trusted=True,
                          baseline_key=first.key, current_key=first.key)
    with Cache(cache_dir) as cache:
        journal.save(cache, root_id(str(small_root)), lie)
    (active(small_root) / "booleans.local").write_text("httpd_can_network_connect=1\n")
    status = pipeline.status(str(small_root), cache_dir)
    assert status["watcher"]["trusted"] and status["watcher"]["dirty"] == {}
    assert status["predicted_action"] == "relinked"
    assert pipeline.finalize(str(small_root), cache_dir).action == "relinked"
    assert_matches_reference(small_root, tmp_path, semantic_policy=True)


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_memory_stays_flat_over_10000_events(small_root: Path, cache_dir: str) -> None:
    pipeline.finalize(str(small_root), cache_dir)
    target = active(small_root) / "booleans.local"

    def burst(n: int) -> None:
        for i in range(n):
            target.write_text(f"httpd_can_network_connect={i % 2}\n")
        target.unlink()

    with running_watcher(small_root, cache_dir, "--no-precompile") as proc:
        burst(1000)
        wait_for("the warm-up burst", lambda: watcher_doc(small_root, cache_dir)["events"] >= 1000)
        time.sleep(1.5)
        before = _rss_kib(proc.pid)
        burst(10_000)
        wait_for("10,000 more events", lambda: (
            watcher_doc(small_root, cache_dir)["events"] >= 11_000), timeout=120)
        time.sleep(1.5)
        after = _rss_kib(proc.pid)
        doc = wait_doc(small_root, cache_dir, "a settled journal", lambda d: not d["dirty"])
        assert doc["trusted"]
    assert after - before < 4096, f"RSS grew by {after - before} KiB over 10,000 events"


def test_stopping_an_in_process_watcher_leaves_no_thread(small_root: Path,
                                                         cache_dir: str) -> None:
    """The autouse no_thread_leaks fixture fails the test if any thread of the
    watcher or of watchdog is still alive afterwards."""
    pipeline.finalize(str(small_root), cache_dir)
    watcher = Watcher(str(small_root), cache_dir, debounce=0.2, interval=1.0, precompile=False)
    ready = threading.Event()
    thread = threading.Thread(target=watcher.run, kwargs={"ready": ready.set})
    thread.start()
    try:
        assert ready.wait(30), "the watcher never finished its first scan"
        (active(small_root) / "seusers.local").write_text("alice:user_u\n")
        wait_for("seusers in the journal",
                 lambda: set(watcher_doc(small_root, cache_dir)["dirty"]) == {"seusers"})
    finally:
        watcher.stop()
        thread.join(30)
    assert not thread.is_alive()


@pytest.mark.refpolicy
def test_refpolicy_change_mid_precompile_supersedes_it(ref_root: Path, cache_dir: str,
                                                      tmp_path: Path) -> None:
    """Real semodule commit and a hand edit on the refpolicy; a second edit
    during the background compile kills it, and nothing is stored under the
    key it was compiling."""
    assert pipeline.stage(str(ref_root), cache_dir).action == "compiled"
    sandboxes = tmp_path / "sandboxes"
    sandboxes.mkdir()
    with running_watcher(ref_root, cache_dir, "--debounce", "1", tmpdir=sandboxes):
        semodule_install(ref_root, POLICIES / "refpolicy" / "demoapp.cil")
        (active(ref_root) / "booleans.local").write_text(
            "httpd_can_network_connect=1\nhttpd_enable_homedirs=1\n")
        # Under load the commit can settle before the hand edit lands; then a
        # first precompile is itself superseded. Wait for the one of both.
        running = wait_doc(ref_root, cache_dir, "a precompile of both changes",
                           lambda d: d["precompile"]["state"] == "running"
                           and set(d["dirty"]) == {"module:demoapp", "booleans"}
                           and d["precompile"]["key"] == d["current_key"], timeout=90)
        stale = running["precompile"]["key"]
        # Both values differ from the defaults semodule's own commit installed.
        (active(ref_root) / "booleans.local").write_text("httpd_can_network_connect=1\n")
        done = wait_doc(ref_root, cache_dir, "the new precompile",
                        lambda d: d["precompile"]["state"] == "done", timeout=120)
        assert done["precompile"]["key"] != stale
        with Cache(cache_dir) as cache:
            assert cache.get_manifest(stale) is None, "a superseded compile was stored"
        result = pipeline.finalize(str(ref_root), cache_dir)
        assert result.action == "reused"
    # The killed compile's sandbox was removed as it unwound.
    assert not list(sandboxes.iterdir())
    assert_matches_reference(ref_root, tmp_path)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_watchdog_thread_is_noticed_restarted_and_rescanned(
        small_root: Path, cache_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """An exception kills watchdog's dispatch thread (a fault injected into
    the event handler: it cannot be produced on demand otherwise). The
    watcher distrusts the journal, restarts the observer, rescans, and sees
    later changes again."""
    pipeline.finalize(str(small_root), cache_dir)
    watcher = Watcher(str(small_root), cache_dir, debounce=0.2, interval=1.0, precompile=False)
    real = watcher._on_event
    boom = threading.Event()

    def flaky(event: Any) -> None:
        if not boom.is_set():
            boom.set()
            raise RuntimeError("injected fault in the event handler")
        real(event)

    monkeypatch.setattr(watcher, "_on_event", flaky)
    ready = threading.Event()
    thread = threading.Thread(target=watcher.run, kwargs={"ready": ready.set})
    thread.start()
    try:
        assert ready.wait(30)
        (active(small_root) / "ports.local").write_text("")  # the event that kills the thread
        wait_doc(small_root, cache_dir, "the dead thread to be noticed",
                 lambda d: any("died" in r["reason"] for r in d["recent_rescans"]))
        (active(small_root) / "seusers.local").write_text("alice:user_u\n")
        doc = wait_doc(small_root, cache_dir, "seusers after the restart",
                       lambda d: "seusers" in d["dirty"] and d["trusted"])
        assert set(doc["dirty"]) == {"ports", "seusers"}
    finally:
        watcher.stop()
        thread.join(30)
    assert not thread.is_alive()
