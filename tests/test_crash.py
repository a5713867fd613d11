"""SIGKILL during install: after every kill the root's output set is all old
or all new (or, with the store and the final files in two trees, the one
documented window: store new, final files old, journal present, reported by
status), and the next finalize completes and leaves exactly the expected root.

Each trial copies a root whose inputs changed but whose outputs are still the
old ones, and a cache that already holds the new output set, so the killed
finalize is a cheap ``reused`` install. The child is ``tests/killdriver.py``:
it dies by SIGKILL before its Nth mutating file system call, or the parent
kills it after a random delay.
"""

from __future__ import annotations

import errno
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import selcache
from selcache import sample
from selcache.layout import read_layout

from .conftest import REPO, assert_matches_reference, tree_digest
from .scenarios import booleans_local, fcontext_local

pytestmark = pytest.mark.timeout(300)

CHILD_TIMEOUT = 120
#: Kinds of step that are each a commit-relevant point: every one is a kill
#: point. Of the rest (building and removing the copies), every third is.
KEY_STEPS = frozenset({"rename", "replace", "fsync", "syncfs", "exchange"})


@dataclass
class Setup:
    """Everything a trial needs, prepared once per layout."""

    template: Path          # inputs changed, outputs old
    cache: Path             # holds the new output set
    trees: tuple[str, ...]  # root-relative, in install order
    old: dict[str, dict[str, str]]
    new: dict[str, dict[str, str]]
    final_root: dict[str, str]  # the whole root after a complete finalize
    journal: Path
    calls: list[list[str]] = field(default_factory=list)
    seconds: float = 0.0


def _change(root: Path) -> None:
    booleans_local(root)   # changes a store file and policy.N
    fcontext_local(root)   # adds two final files


def trees_of(root: Path) -> tuple[str, ...]:
    layout = read_layout(str(root))
    return (layout.final,) if layout.store_in_final else (layout.active, layout.final)


def snapshot(root: Path, trees: tuple[str, ...]) -> dict[str, dict[str, str]]:
    return {t: tree_digest(root / t) for t in trees}


def run_driver(root: Path, cache: Path, *extra: str, trace: Path | None = None) -> int:
    argv = [sys.executable, "-m", "tests.killdriver", "--root", str(root), "--cache-dir",
            str(cache), *extra]
    if trace is not None:
        argv += ["--trace", str(trace)]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, timeout=CHILD_TIMEOUT, check=False)
    if done.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(f"driver failed ({done.returncode}): {done.stderr.decode()}")
    return done.returncode


def prepare(work: Path, pristine: Path, *, check_reference: bool = True) -> Setup:
    work.mkdir(parents=True)
    template = sample.copy_root(pristine, work / "template")
    _change(template)
    trees = trees_of(template)
    done = sample.copy_root(template, work / "done")
    cache = work / "cache"
    assert selcache.finalize(str(done), str(cache)).action == "rebuilt"
    if check_reference:
        assert_matches_reference(done, work)
    setup = Setup(template=template, cache=cache, trees=trees, old=snapshot(template, trees),
                  new=snapshot(done, trees), final_root=tree_digest(done),
                  journal=template / "etc/selinux" /
                  f".selcache-install-{read_layout(str(template)).policy_type}.json")
    assert all(setup.old[t] != setup.new[t] for t in trees), "the change must touch every tree"
    # One uninterrupted run records the steps of a reused install.
    root, trial_cache = fresh(setup, work / "count")
    trace = work / "trace.json"
    assert run_driver(root, trial_cache, trace=trace) == 0
    recorded = json.loads(trace.read_text())
    assert recorded["action"] == "reused"
    setup.calls, setup.seconds = recorded["calls"], recorded["seconds"]
    assert tree_digest(root) == setup.final_root
    return setup


def fresh(setup: Setup, work: Path, start: Path | None = None,
          start_cache: Path | None = None) -> tuple[Path, Path]:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    root = sample.copy_root(start or setup.template, work / "root")
    cache = work / "cache"
    subprocess.run(["cp", "-a", str(start_cache or setup.cache), str(cache)], check=True)
    return root, cache


def kill_points(calls: list[list[str]]) -> list[int]:
    """1-based step numbers to die before: every key step, every third other
    one, and one past the end (the kill lands after the install)."""
    points = [i for i, (kind, _) in enumerate(calls, 1) if kind in KEY_STEPS or i % 3 == 0]
    return [*points, len(calls) + 1]


def leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if "selcache" in p.name)


def check_killed(setup: Setup, root: Path, cache: Path, *, committed_only: bool = False) -> str:
    """The state a kill left: 'old', 'new' or 'window'; fails on anything else."""
    got = snapshot(root, setup.trees)
    verdict = []
    for tree in setup.trees:
        if got[tree] == setup.old[tree]:
            verdict.append("old")
        elif got[tree] == setup.new[tree]:
            verdict.append("new")
        else:
            raise AssertionError(f"/{tree} is neither the old nor the new tree")
    journal = setup.journal.name in os.listdir(root / "etc/selinux")
    status = selcache.status(str(root), str(cache))
    interrupted = status["interrupted"]
    assert status["interrupted_install"] == bool(leftovers(root)) == (interrupted is not None)
    if journal:
        assert interrupted is not None and interrupted["committed"]
    if verdict == ["new", "old"]:
        # Store exchanged, final files not yet: the journal says finish it.
        assert journal, "the store is new, the final files old, and no journal"
        assert interrupted["repair"] == "roll-forward"
        assert interrupted["trees"] == {f"/{setup.trees[0]}": "exchanged",
                                        f"/{setup.trees[1]}": "pending"}
        assert not status["installed_matches"]
        state = "window"
    elif len(set(verdict)) == 1:
        state = verdict[0]
    else:
        raise AssertionError(f"trees in install order are {verdict}: the final files "
                             "went first")
    if state == "old" and journal:
        assert interrupted["repair"] == "roll-forward"
    if committed_only:
        assert state != "old" or journal
    return state


def check_next_finalize(setup: Setup, root: Path, cache: Path) -> None:
    before = leftovers(root)
    result = selcache.finalize(str(root), str(cache))
    assert result.action in ("reused", "unchanged")
    assert bool(result.recovered) == bool(before), (before, result.recovered)
    assert tree_digest(root) == setup.final_root
    assert leftovers(root) == []


def run_trials(setup: Setup, work: Path, trials: list[tuple[str, Callable[[Path, Path], int]]],
               start: Path | None = None, start_cache: Path | None = None,
               committed_only: bool = False) -> dict[str, int]:
    """Run each trial, check it, and report every failing one at the end."""
    seen: dict[str, int] = {}
    failures = []
    for label, kill in trials:
        root, cache = fresh(setup, work, start, start_cache)
        try:
            kill(root, cache)
            state = check_killed(setup, root, cache, committed_only=committed_only)
            check_next_finalize(setup, root, cache)
        except AssertionError as exc:
            failures.append(f"{label}: {exc}")
            continue
        seen[state] = seen.get(state, 0) + 1
    assert not failures, "\n".join(failures)
    return seen


def at_step(n: int, total: int) -> Callable[[Path, Path], int]:
    def kill(root: Path, cache: Path) -> int:
        code = run_driver(root, cache, "--kill-at", str(n))
        # The steps are deterministic: the driver dies exactly where asked.
        assert code == (-signal.SIGKILL if n <= total else 0), f"driver exited {code}"
        return code
    return kill


def after_delay(delay: float) -> Callable[[Path, Path], int]:
    def kill(root: Path, cache: Path) -> int:
        r, w = os.pipe()
        proc = subprocess.Popen([sys.executable, "-m", "tests.killdriver", "--root", str(root),
                                 "--cache-dir", str(cache), "--notify-fd", str(w)],
                                cwd=REPO, pass_fds=(w,), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        os.close(w)
        try:
            ready, _, _ = select.select([r], [], [], CHILD_TIMEOUT)
            assert ready, "the driver never started finalize"
            os.read(r, 2)
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            return proc.wait(timeout=CHILD_TIMEOUT)
        finally:
            os.close(r)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return kill


def step_label(calls: list[list[str]], n: int) -> str:
    if n > len(calls):
        return f"kill after the last step ({len(calls)})"
    kind, arg = calls[n - 1]
    return f"kill before step {n}/{len(calls)} ({kind} {arg})"


@pytest.fixture(scope="module")
def small_setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    work = tmp_path_factory.mktemp("crash-small")
    yield prepare(work / "prep", sample.pristine_root("small"))
    shutil.rmtree(work, ignore_errors=True)


def test_kill_at_every_install_step_small(small_setup: Setup, tmp_path: Path) -> None:
    points = kill_points(small_setup.calls)
    assert len(points) >= 45
    kinds = {kind for kind, _ in small_setup.calls}
    assert {"exchange", "syncfs", "rename", "fsync", "link", "unlink"} <= kinds
    total = len(small_setup.calls)
    seen = run_trials(small_setup, tmp_path / "t",
                      [(step_label(small_setup.calls, n), at_step(n, total)) for n in points])
    # The kill points reach all three states, the window included.
    assert set(seen) == {"old", "window", "new"}, seen


def test_kill_at_random_times_small(small_setup: Setup, tmp_path: Path) -> None:
    rng = random.Random(5)
    span = small_setup.seconds * 1.3
    delays = sorted(rng.uniform(0, span) for _ in range(20))
    codes: list[int] = []

    def killer(delay: float) -> Callable[[Path, Path], int]:
        def kill(root: Path, cache: Path) -> int:
            codes.append(after_delay(delay)(root, cache))
            return codes[-1]
        return kill

    seen = run_trials(small_setup, tmp_path / "t",
                      [(f"kill after {d:.3f}s", killer(d)) for d in delays])
    assert sum(seen.values()) == 20
    # Most kills land before the child finished (the delays span its runtime).
    assert codes.count(-signal.SIGKILL) >= 10, codes


def test_kill_during_recovery_small(small_setup: Setup, tmp_path: Path) -> None:
    """Die in the window, then die again at every step of the run that
    repairs it: the journal keeps the install moving forward."""
    exchanges = [i for i, (kind, _) in enumerate(small_setup.calls, 1) if kind == "exchange"]
    window = tmp_path / "window"
    root, cache = fresh(small_setup, window)
    assert run_driver(root, cache, "--kill-at", str(exchanges[1])) == -signal.SIGKILL
    assert check_killed(small_setup, root, cache) == "window"
    trace = tmp_path / "trace.json"
    count_root, count_cache = fresh(small_setup, tmp_path / "count", root, cache)
    assert run_driver(count_root, count_cache, trace=trace) == 0
    calls = json.loads(trace.read_text())["calls"]
    assert [kind for kind, _ in calls].count("exchange") == 1
    points = kill_points(calls)
    seen = run_trials(small_setup, tmp_path / "t",
                      [("recovery: " + step_label(calls, n), at_step(n, len(calls)))
                       for n in points],
                      start=root, start_cache=cache, committed_only=True)
    assert "old" not in seen and "new" in seen


def test_kill_at_every_step_ostree_layout(tmp_path: Path) -> None:
    """store-root=/etc/selinux: one tree, one exchange, no journal."""
    pristine = sample.build_root(tmp_path / "pristine", "small", store_root="/etc/selinux")
    setup = prepare(tmp_path / "prep", pristine)
    assert setup.trees == ("etc/selinux/small",)
    points = [i for i, (kind, _) in enumerate(setup.calls, 1) if kind in KEY_STEPS]
    total = len(setup.calls)
    seen = run_trials(setup, tmp_path / "t",
                      [(step_label(setup.calls, n), at_step(n, total)) for n in points])
    assert set(seen) == {"old", "new"}
    assert not (setup.journal).exists()


@pytest.mark.refpolicy
def test_kill_during_install_refpolicy(tmp_path: Path) -> None:
    setup = prepare(tmp_path / "prep", sample.pristine_root("refpolicy"), check_reference=False)
    calls = setup.calls
    first = {kind: next(i for i, (k, _) in enumerate(calls, 1) if k == kind)
             for kind in ("syncfs", "rename", "exchange")}
    exchange2 = [i for i, (k, _) in enumerate(calls, 1) if k == "exchange"][1]
    last_unlinks = [i for i, (k, _) in enumerate(calls, 1) if k == "unlink"]
    points = [
        first["syncfs"] // 2,      # building the store's copy
        first["rename"],           # the journal, the commit point
        exchange2,                 # store exchanged, final files not yet
        last_unlinks[len(last_unlinks) // 2],  # removing the old copies
    ]
    trials = [(step_label(setup.calls, n), at_step(n, len(setup.calls))) for n in points]
    trials.append(("random kill", after_delay(random.Random(7).uniform(0, setup.seconds))))
    seen = run_trials(setup, tmp_path / "t", trials)
    assert {"old", "window", "new"} <= set(seen)


def _failing_exchange(monkeypatch: pytest.MonkeyPatch, fail_on: set[int], err: int) -> list[str]:
    """renameat2 that fails on the given calls (1-based): a file system that
    cannot exchange, or an I/O error half-way. Cannot be produced for real
    on this machine's ext4 and tmpfs."""
    from selcache import install

    real = install._renameat2_exchange
    calls: list[str] = []

    def exchange(dir_fd: int, a: str, b: str) -> None:
        calls.append(b)
        if len(calls) in fail_on:
            raise OSError(err, os.strerror(err))
        real(dir_fd, a, b)

    monkeypatch.setattr(install, "_renameat2_exchange", exchange)
    return calls


@pytest.mark.parametrize("fail_on, err", [
    pytest.param({1}, errno.EINVAL, id="no-exchange-support"),
    pytest.param({2}, errno.EINVAL, id="final-files-on-a-file-system-without-exchange"),
    pytest.param({2}, errno.EIO, id="io-error-on-the-second-exchange"),
])
def test_failed_exchange_leaves_the_root_unchanged(
        small_setup: Setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], fail_on: set[int], err: int) -> None:
    from selcache.cli import main

    root, cache = fresh(small_setup, tmp_path / "t")
    before = tree_digest(root)
    calls = _failing_exchange(monkeypatch, fail_on, err)
    code = main(["finalize", "--root", str(root), "--cache-dir", str(cache)])
    stderr = capsys.readouterr().err
    assert code == 7, stderr
    assert "the root is unchanged" in stderr
    if err == errno.EINVAL:
        assert "RENAME_EXCHANGE" in stderr
    # An exchange done before the failure was exchanged back.
    assert len(calls) == {1: 1, 2: 3}[max(fail_on)]
    assert tree_digest(root) == before
    stamp = selcache.status(str(root), str(cache))["failure"]
    assert stamp["error"] == "InstallError" and stamp["step"] == "install"
    assert stamp["root_unchanged"] is True
    monkeypatch.undo()
    check_next_finalize(small_setup, root, cache)
    assert selcache.status(str(root), str(cache))["failure"] is None


def test_failed_exchange_that_cannot_be_undone_is_finished_next_time(
        small_setup: Setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from selcache.cli import main

    root, cache = fresh(small_setup, tmp_path / "t")
    _failing_exchange(monkeypatch, {2, 3}, errno.EIO)
    with pytest.raises(selcache.InstallError, match="could not be undone") as info:
        selcache.finalize(str(root), str(cache))
    assert info.value.root_unchanged is False
    monkeypatch.undo()
    # Exactly the crash window: the journal rolls it forward.
    assert check_killed(small_setup, root, cache) == "window"
    status = selcache.status(str(root), str(cache))
    assert status["failure"]["root_unchanged"] is False
    assert main(["status", "--root", str(root), "--cache-dir", str(cache)]) == 0
    human = capsys.readouterr().out
    assert "root NOT unchanged" in human
    assert (f"an install was interrupted after its commit point (/{small_setup.trees[0]} new, "
            f"/{small_setup.trees[1]} not yet); the next finalize rolls it forward") in human
    check_next_finalize(small_setup, root, cache)
