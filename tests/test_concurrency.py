"""Concurrency: runs on one root are serialised by its lock and all correct;
roots sharing a cache are all correct; a real semodule commit on the root
during a selcache compile is detected and nothing is stored under the stale
key. (Three finalizes on one root at once: tests/test_install.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

import selcache
from selcache.layout import read_layout
from selcache.runner import Completed, run
from selcache.store import Cache

from .conftest import REPO, assert_matches_reference, hold_lock, output_files
from .scenarios import POLICIES, booleans_local, fcontext_local

pytestmark = pytest.mark.timeout(180)

TIMEOUT = 120


def cli(*argv: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "selcache", *argv, "--json"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def results(procs: Sequence[subprocess.Popen[str]]) -> list[dict[str, object]]:
    docs = []
    for proc in procs:
        out, err = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 0, err
        docs.append(json.loads(out))
    return docs


def test_stage_and_finalize_at_once_compile_once(small_root: Path, cache_dir: str,
                                                 tmp_path: Path) -> None:
    booleans_local(small_root)
    args = ("--root", str(small_root), "--cache-dir", cache_dir)
    holder = hold_lock(small_root / read_layout(str(small_root)).store_root, 1.0)
    procs = [cli("stage", *args), cli("finalize", *args)]
    holder.wait(timeout=TIMEOUT)
    staged, finalized = results(procs)
    # Whichever ran first compiled; the other used its result.
    assert (staged["action"], finalized["action"]) in (("compiled", "reused"),
                                                       ("cached", "rebuilt"))
    assert staged["key"] == finalized["key"]
    assert_matches_reference(small_root, tmp_path)
    with Cache(cache_dir) as cache:
        assert cache.stats()["misses"] == (1 if finalized["action"] == "rebuilt" else 0)


def test_roots_sharing_a_cache_at_once_are_all_correct(small_root: Path, cache_dir: str,
                                                       tmp_path: Path) -> None:
    roots = {}
    for name, change in (("a", booleans_local), ("b", fcontext_local), ("c", booleans_local)):
        root = tmp_path / name
        subprocess.run(["cp", "-a", f"{small_root}/.", str(root)], check=True)
        change(root)
        roots[name] = root
    docs = dict(zip(roots, results([cli("finalize", "--root", str(r), "--cache-dir", cache_dir)
                                    for r in roots.values()])))
    assert docs["a"]["key"] == docs["c"]["key"] != docs["b"]["key"]
    for name, root in roots.items():
        # b may relink onto a's or c's compile: the same modules.
        assert docs[name]["action"] in ("rebuilt", "relinked", "reused")
        assert_matches_reference(root, tmp_path / f"ref-{name}",
                                 semantic_policy=docs[name]["action"] == "relinked")
    assert output_files(roots["a"]) == output_files(roots["c"])
    with Cache(cache_dir) as cache:
        for doc in docs.values():
            manifest = cache.get_manifest(str(doc["key"]))
            assert manifest is not None and cache.load_outputs(manifest) is not None
    for root in roots.values():
        assert selcache.finalize(str(root), cache_dir).action == "unchanged"


def test_semodule_commit_during_the_compile_is_detected(small_root: Path, cache_dir: str,
                                                        tmp_path: Path) -> None:
    """A real ``semodule -i`` commits on the live root while selcache's
    compile of the earlier inputs runs in its sandbox."""
    layout = read_layout(str(small_root))
    booleans_local(small_root)
    stale_key = selcache.status(str(small_root), cache_dir)["key"]
    commits = []

    def runner(argv: Sequence[str]) -> Completed:
        if not commits:
            commits.append(subprocess.run(
                ["semodule", "-N", "-p", str(small_root), "-s", layout.policy_type,
                 "-X", "400", "-i", str(POLICIES / "extra/myapp.cil")],
                capture_output=True, text=True, timeout=TIMEOUT, check=False))
        return run(argv)

    result = selcache.finalize(str(small_root), cache_dir, runner=runner)
    assert commits and commits[0].returncode == 0, commits[0].stderr
    assert (small_root / layout.active / "modules/400/myapp/cil").exists()
    assert result.action == "rebuilt"
    assert result.key != stale_key
    assert result.key == selcache.status(str(small_root), cache_dir)["key"]
    with Cache(cache_dir) as cache:
        assert cache.get_manifest(stale_key) is None  # never stored under the stale key
        assert cache.stats()["misses"] == 2  # compiled twice: the first result was stale
    # What is installed is the policy of the inputs after the commit, with the
    # root's own accounts (semodule -p used the host's for file_contexts.homedirs).
    assert_matches_reference(small_root, tmp_path)
