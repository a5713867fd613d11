"""Install: all-or-nothing, never in place, never outside the root."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

import selcache
from selcache.errors import InvalidRoot
from selcache.layout import read_layout

from .conftest import assert_matches_reference, output_files, tree_digest
from .scenarios import booleans_local, fcontext_local

LABEL = b"system_u:object_r:semanage_store_t:s0\0"


def final(root: Path) -> Path:
    return root / read_layout(str(root)).final


def test_unchanged_files_keep_their_inode_and_changed_ones_are_new(
        small_root: Path, cache_dir: str) -> None:
    extra = final(small_root) / "setrans.conf"  # a file no compile writes
    extra.write_text("s0=SystemLow\n")
    seusers = final(small_root) / "seusers"  # an output a boolean does not change
    policy = final(small_root) / "policy/policy.33"
    inodes = {p: p.stat().st_ino for p in (extra, seusers, policy)}
    booleans_local(small_root)
    result = selcache.finalize(str(small_root), cache_dir)
    assert "etc/selinux/small/policy/policy.33" in result.written
    assert extra.stat().st_ino == inodes[extra]
    assert seusers.stat().st_ino == inodes[seusers]
    assert policy.stat().st_ino != inodes[policy]
    assert extra.read_text() == "s0=SystemLow\n"


def test_hardlinked_output_is_replaced_not_written_through(
        small_root: Path, tmp_path: Path, cache_dir: str) -> None:
    """On ostree, files may be hard links into the repo: writing in place would
    corrupt the repo object."""
    repo_object = tmp_path / "repo-object"
    policy = final(small_root) / "policy/policy.33"
    os.link(policy, repo_object)
    before = hashlib.sha256(repo_object.read_bytes()).hexdigest()
    booleans_local(small_root)
    selcache.finalize(str(small_root), cache_dir)
    assert hashlib.sha256(repo_object.read_bytes()).hexdigest() == before
    assert policy.read_bytes() != repo_object.read_bytes()


def test_mode_and_selinux_label_of_replaced_files_are_kept(small_root: Path, cache_dir: str) -> None:
    policy = final(small_root) / "policy/policy.33"
    policy.chmod(0o640)
    os.setxattr(policy, "security.selinux", LABEL)
    booleans_local(small_root)
    result = selcache.finalize(str(small_root), cache_dir)
    assert "etc/selinux/small/policy/policy.33" in result.written
    assert policy.stat().st_mode & 0o7777 == 0o640
    assert os.getxattr(policy, "security.selinux") == LABEL


def test_file_contexts_bin_is_never_older_than_its_source(small_root: Path, cache_dir: str) -> None:
    fcontext_local(small_root)
    selcache.finalize(str(small_root), cache_dir)
    files = final(small_root) / "contexts/files"
    for stem in ("file_contexts", "file_contexts.local"):
        assert (files / f"{stem}.bin").stat().st_mtime >= (files / stem).stat().st_mtime


def test_symlink_out_of_the_root_is_never_followed(small_root: Path, tmp_path: Path,
                                                   cache_dir: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "sentinel").write_text("keep me")
    policy_dir = final(small_root) / "policy"
    for p in policy_dir.iterdir():
        (outside / p.name).write_bytes(p.read_bytes())
        p.unlink()
    policy_dir.rmdir()
    policy_dir.symlink_to(outside)
    booleans_local(small_root)
    before_root, before_out = tree_digest(small_root), tree_digest(outside)
    with pytest.raises(InvalidRoot, match="symlink"):
        selcache.finalize(str(small_root), cache_dir)
    assert tree_digest(outside) == before_out
    assert tree_digest(small_root) == before_root


def test_failed_compile_leaves_root_untouched(small_root: Path, cache_dir: str) -> None:
    from .scenarios import POLICIES, add_module

    add_module(small_root, "bad", POLICIES / "broken/bad.cil")
    before = tree_digest(small_root)
    with pytest.raises(selcache.CompileError, match="Failed to resolve allow statement"):
        selcache.finalize(str(small_root), cache_dir)
    assert tree_digest(small_root) == before
    status = selcache.status(str(small_root), cache_dir)
    assert status["last_finalize"]["ok"] is False
    assert "Failed to resolve" in status["last_finalize"]["error"]


def test_no_staging_left_behind(small_root: Path, cache_dir: str) -> None:
    booleans_local(small_root)
    selcache.finalize(str(small_root), cache_dir)
    leftovers = [p for p in small_root.rglob("*") if "selcache" in p.name]
    assert leftovers == []


def test_ostree_layout_store_inside_etc_selinux(tmp_path: Path, cache_dir: str) -> None:
    """store-root=/etc/selinux puts the store inside the final dir: one exchange."""
    from selcache import sample

    root = sample.build_root(tmp_path / "ostree", "small", store_root="/etc/selinux")
    layout = read_layout(str(root))
    assert layout.store_in_final and layout.active == "etc/selinux/small/active"
    before = output_files(root)
    booleans_local(root)
    result = selcache.finalize(str(root), cache_dir)
    assert result.action == "rebuilt" and output_files(root) != before
    assert_matches_reference(root, tmp_path)
    assert not list(root.rglob("*selcache*"))


def test_concurrent_finalizes_serialise_and_both_are_correct(
        small_root: Path, cache_dir: str, tmp_path: Path) -> None:
    booleans_local(small_root)
    argv = [sys.executable, "-m", "selcache", "finalize", "--json", "--root", str(small_root),
            "--cache-dir", cache_dir]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    import json
    actions = sorted(json.loads(o)["action"] for o, _ in outs)
    # Exactly one compiled; the others found the result installed (or reused it).
    assert actions.count("rebuilt") == 1
    assert set(actions) <= {"rebuilt", "unchanged", "reused"}
    assert_matches_reference(small_root, tmp_path)
