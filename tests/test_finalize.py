"""finalize on the small policy: every scenario leaves the same bytes as a
fresh `semodule -N -B` of the same inputs, run with the root's accounts."""

from __future__ import annotations

from pathlib import Path

import pytest

import selcache
from selcache.layout import read_layout

from .conftest import assert_matches_reference, output_files, tree_digest
from .scenarios import SCENARIOS, booleans_local, finalize_scenario


@pytest.mark.parametrize("name", [pytest.param(n, id=n) for n in SCENARIOS])
def test_scenario_matches_fresh_semodule(name: str, small_root: Path, cache_dir: str,
                                         tmp_path: Path) -> None:
    key = finalize_scenario(name, small_root, cache_dir, tmp_path)
    # And the same inputs again are recognised as installed.
    again = selcache.finalize(str(small_root), cache_dir)
    assert again.action == "unchanged"
    assert again.key == key


@pytest.mark.parametrize("name", [pytest.param(n, id=n) for n in SCENARIOS])
def test_scenario_after_a_warm_cache_takes_the_cheapest_correct_path(
        name: str, small_root: Path, cache_dir: str, tmp_path: Path) -> None:
    """With the unchanged module set compiled, local-only changes are
    relinked (semantically equal kernel policy, other files byte-identical)
    and everything else is rebuilt."""
    finalize_scenario(name, small_root, cache_dir, tmp_path, warm=True)


def test_change_reverted_is_reused(small_root: Path, cache_dir: str, tmp_path: Path) -> None:
    first = selcache.finalize(str(small_root), cache_dir)
    original = output_files(small_root)
    booleans_local(small_root)
    changed = selcache.finalize(str(small_root), cache_dir)
    assert changed.action == "relinked" and changed.key != first.key
    (small_root / read_layout(str(small_root)).active / "booleans.local").unlink()
    reverted = selcache.finalize(str(small_root), cache_dir)
    assert reverted.action == "reused"
    assert reverted.key == first.key
    assert reverted.compile_seconds is None
    assert output_files(small_root) == original
    assert_matches_reference(small_root, tmp_path)


def test_stage_fills_cache_and_writes_nothing(small_root: Path, cache_dir: str) -> None:
    booleans_local(small_root)
    before = tree_digest(small_root)
    staged = selcache.stage(str(small_root), cache_dir)
    assert staged.action == "compiled"
    assert tree_digest(small_root) == before
    assert selcache.stage(str(small_root), cache_dir).action == "cached"
    status = selcache.status(str(small_root), cache_dir)
    assert status["predicted_action"] == "reused" and not status["installed_matches"]
    result = selcache.finalize(str(small_root), cache_dir)
    assert result.action == "reused" and result.key == staged.key


def test_commit_num_bumped_once_per_install(small_root: Path, cache_dir: str) -> None:
    active = small_root / read_layout(str(small_root)).active
    def commit_num() -> int:
        data = (active / "commit_num").read_bytes()
        assert len(data) == 32  # libsemanage's NUL-padded format
        return int(data.rstrip(b"\0"))

    old = commit_num()
    booleans_local(small_root)
    selcache.finalize(str(small_root), cache_dir)
    assert commit_num() == old + 1
    selcache.finalize(str(small_root), cache_dir)  # unchanged: nothing written
    assert commit_num() == old + 1


def _runner_that_edits(path: Path, times: int):  # type: ignore[no-untyped-def]
    """The real runner, but the root's input changes while semodule runs, as a
    concurrent semodule commit or /etc edit would."""
    from selcache.runner import run

    calls = {"n": 0}

    def runner(argv):  # type: ignore[no-untyped-def]
        done = run(argv)
        if calls["n"] < times:
            path.write_text(f"httpd_can_network_connect={calls['n'] % 2}\nnis_enabled=1\n")
        calls["n"] += 1
        return done

    return runner


def test_input_change_during_compile_is_retried(small_root: Path, cache_dir: str,
                                                tmp_path: Path) -> None:
    from selcache.store import Cache

    booleans = small_root / read_layout(str(small_root)).active / "booleans.local"
    booleans.write_text("httpd_can_network_connect=1\n")
    stale_key = selcache.status(str(small_root), cache_dir)["key"]
    result = selcache.finalize(str(small_root), cache_dir, runner=_runner_that_edits(booleans, 1))
    assert result.action == "rebuilt" and result.key != stale_key
    with Cache(cache_dir) as cache:
        assert cache.get_manifest(stale_key) is None  # never stored under the old key
    assert_matches_reference(small_root, tmp_path)


def test_inputs_that_keep_changing_fail_clearly(small_root: Path, cache_dir: str) -> None:
    booleans = small_root / read_layout(str(small_root)).active / "booleans.local"
    before = output_files(small_root)
    with pytest.raises(selcache.InputsChanged, match="kept changing"):
        selcache.finalize(str(small_root), cache_dir, runner=_runner_that_edits(booleans, 99))
    assert output_files(small_root) == before
    assert selcache.InputsChanged.exit_code == 5
