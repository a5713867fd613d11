"""Cache faults, each produced for real: damaged or extra value files, a
garbage or locked database, a read-only cache dir, a full disk. Each is a miss
or a cache disabled for the run, never a wrong install, never a failed
finalize; and the cache repairs or rebuilds itself. An unsafe cache (not ours,
writable by others, symlinks) is refused. tests/test_store.py has the inline
blob cases and the directory checks."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import selcache
from selcache.cli import main
from selcache.store import Cache

from .conftest import REPO, assert_matches_reference, output_files, tree_digest
from .scenarios import booleans_local

pytestmark = pytest.mark.timeout(120)

#: A miss ends in a compile: a full rebuild, or a relink onto a cached
#: compile of the same modules.
COMPILED = ("rebuilt", "relinked")



def value_files(cache_dir: str) -> dict[str, str]:
    """blob digest -> value file path, for the blobs diskcache keeps in files."""
    db = sqlite3.connect(os.path.join(cache_dir, "cache.db"))
    try:
        rows = db.execute("SELECT key, filename FROM Cache WHERE filename IS NOT NULL").fetchall()
    finally:
        db.close()
    return {key.split(":", 1)[1]: os.path.join(cache_dir, name) for key, name in rows
            if key.startswith("blob:")}


def staged_value_file(root: Path, cache_dir: str) -> tuple[str, str, str]:
    """Stage a changed root; return its key and one of its blobs kept in a file."""
    booleans_local(root)
    key = selcache.stage(str(root), cache_dir).key
    with Cache(cache_dir) as cache:
        manifest = cache.get_manifest(key)
    assert manifest is not None
    files = value_files(cache_dir)
    sha = next(f.sha256 for f in manifest.files if f.sha256 in files)
    return key, sha, files[sha]


def copy_root(root: Path, dest: Path) -> Path:
    subprocess.run(["cp", "-a", f"{root}/.", str(dest)], check=True)
    return dest


@pytest.mark.parametrize("how", ["truncate", "flip", "missing", "empty", "swapped"])
def test_damaged_value_file_is_a_miss_and_is_repaired(
        how: str, small_root: Path, cache_dir: str, tmp_path: Path) -> None:
    twin = copy_root(small_root, tmp_path / "twin")
    key, sha, path = staged_value_file(small_root, cache_dir)
    data = Path(path).read_bytes()
    if how == "truncate":
        Path(path).write_bytes(data[: len(data) // 2])
    elif how == "flip":
        Path(path).write_bytes(data[:1000] + bytes([data[1000] ^ 0x10]) + data[1001:])
    elif how == "missing":
        os.unlink(path)
    elif how == "empty":
        Path(path).write_bytes(b"")
    else:  # another file's bytes, of the same length, in its place
        Path(path).write_bytes(os.urandom(len(data)))
    result = selcache.finalize(str(small_root), cache_dir)
    assert result.action in COMPILED and result.key == key  # a miss, then compiled
    assert_matches_reference(small_root, tmp_path, semantic_policy=result.action == "relinked")
    with Cache(cache_dir) as cache:
        assert cache.get_blob(sha) == data  # stored again, intact
    booleans_local(twin)
    assert selcache.finalize(str(twin), cache_dir).action == "reused"
    assert output_files(twin) == output_files(small_root)


def test_extra_value_file_is_ignored_and_swept(small_root: Path, cache_dir: str) -> None:
    _key, _sha, path = staged_value_file(small_root, cache_dir)
    vdir = Path(path).parent
    old_orphan = vdir / ("a" * 28 + ".val")
    new_orphan = vdir / ("b" * 28 + ".val")
    for orphan in (old_orphan, new_orphan):
        orphan.write_bytes(Path(path).read_bytes())
        orphan.chmod(0o600)
    two_hours_ago = time.time() - 7200
    os.utime(old_orphan, (two_hours_ago, two_hours_ago))
    assert selcache.finalize(str(small_root), cache_dir).action == "reused"
    with Cache(cache_dir) as cache:
        removed = cache.gc()
    assert removed["orphans_removed"] == 1
    # A fresh one may be a concurrent writer's file whose row is not in yet.
    assert not old_orphan.exists() and new_orphan.exists()
    assert Path(path).exists()
    assert selcache.finalize(str(small_root), cache_dir).action == "unchanged"


def test_tampered_row_cannot_reach_outside_the_cache(small_root: Path, cache_dir: str,
                                                     tmp_path: Path) -> None:
    """diskcache reads and deletes the file a row names: a row naming a path
    outside the cache is a miss, and the file there is neither read nor removed."""
    key, sha, _path = staged_value_file(small_root, cache_dir)
    victim = tmp_path / "victim"
    victim.write_text("not yours")
    db = sqlite3.connect(os.path.join(cache_dir, "cache.db"))
    db.execute("UPDATE Cache SET filename = ? WHERE key = ?",
               (os.path.relpath(victim, cache_dir), f"blob:{sha}"))
    db.commit()
    db.close()
    result = selcache.finalize(str(small_root), cache_dir)
    assert result.action in COMPILED and result.key == key
    assert victim.read_text() == "not yours"
    assert_matches_reference(small_root, tmp_path, semantic_policy=result.action == "relinked")


def test_garbage_database_is_moved_aside_and_rebuilt(small_root: Path, cache_dir: str,
                                                     tmp_path: Path) -> None:
    twin = copy_root(small_root, tmp_path / "twin")
    selcache.finalize(str(small_root), cache_dir)
    value_dirs = [n for n in os.listdir(cache_dir) if len(n) == 2]
    assert value_dirs
    garbage = os.urandom(16384)
    Path(cache_dir, "cache.db").write_bytes(garbage)
    booleans_local(small_root)
    result = selcache.finalize(str(small_root), cache_dir)
    assert result.action in COMPILED
    assert any("damaged and has been rebuilt" in w for w in result.warnings)
    assert_matches_reference(small_root, tmp_path, semantic_policy=result.action == "relinked")
    assert Path(cache_dir, "cache.db.corrupt").read_bytes() == garbage
    # The old database's value files went with it; the new one works.
    with Cache(cache_dir) as cache:
        assert cache.problem is None
        assert cache.get_manifest(result.key) is not None
        assert set(value_files(cache_dir).values()) == {
            str(p) for d in os.listdir(cache_dir) if len(d) == 2
            for p in Path(cache_dir, d).rglob("*.val")}
    booleans_local(twin)
    assert selcache.finalize(str(twin), cache_dir).action == "reused"


def test_locked_database_costs_one_bounded_wait_not_the_update(
        small_root: Path, cache_dir: str, tmp_path: Path) -> None:
    selcache.finalize(str(small_root), cache_dir)
    locker = subprocess.Popen(
        [sys.executable, "-c", "import sqlite3, sys, time\n"
         "con = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
         "con.execute('BEGIN EXCLUSIVE')\nprint('locked', flush=True)\ntime.sleep(120)\n",
         os.path.join(cache_dir, "cache.db")], stdout=subprocess.PIPE, text=True)
    try:
        assert locker.stdout is not None and locker.stdout.readline() == "locked\n"
        booleans_local(small_root)
        start = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "selcache", "finalize", "--json", "--root",
                               str(small_root), "--cache-dir", cache_dir],
                              cwd=REPO, capture_output=True, text=True, timeout=120)
        elapsed = time.monotonic() - start
    finally:
        locker.kill()
        locker.wait()
        if locker.stdout is not None:
            locker.stdout.close()
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["action"] in COMPILED
    assert any("locked by another process" in w for w in doc["warnings"])
    assert "locked by another process" in done.stderr  # the warning reaches the log
    # One wait of the database timeout (5 s), not one per cache operation.
    assert 5 <= elapsed < 25, elapsed
    assert_matches_reference(small_root, tmp_path, semantic_policy=doc["action"] == "relinked")
    # Lock gone: the cache works again and learns this root.
    again = selcache.finalize(str(small_root), cache_dir)
    assert again.warnings == () and again.action in COMPILED
    assert selcache.status(str(small_root), cache_dir)["predicted_action"] == "unchanged"


def test_read_only_cache_dir(small_root: Path, cache_dir: str, tmp_path: Path) -> None:
    selcache.finalize(str(small_root), cache_dir)
    before = tree_digest(Path(cache_dir))
    booleans_local(small_root)
    script = ('mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && '
              'exec "$@"')
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", cache_dir,
         sys.executable, "-m", "selcache", "finalize", "--json", "--root", str(small_root),
         "--cache-dir", cache_dir], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["action"] in COMPILED and doc["warnings"]
    assert_matches_reference(small_root, tmp_path, semantic_policy=doc["action"] == "relinked")
    assert tree_digest(Path(cache_dir)) == before


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs, so that the disk really fills up."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "selcache-test", str(mnt)],
                   check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def fill(mnt: Path, leave: int) -> Path:
    """Fill the file system until ``leave`` bytes remain."""
    filler = mnt / "filler"
    with open(filler, "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        except OSError:
            pass
    if leave:
        os.truncate(filler, max(filler.stat().st_size - leave, 0))
    return filler


# Measured here: with 0 and 96 KiB left the database cannot even be opened;
# with 144 KiB it opens and a write fails half-way through the run; with
# 256 KiB everything fits. Whatever the thresholds, the checks hold.
@pytest.mark.parametrize("leave", [0, 96 * 1024, 144 * 1024, 256 * 1024])
def test_full_disk_never_fails_finalize_nor_stores_half_an_entry(
        leave: int, small_root: Path, tiny_fs: Path, tmp_path: Path) -> None:
    cache_dir = str(tiny_fs / "cache")
    twin = copy_root(small_root, tmp_path / "twin")
    selcache.finalize(str(small_root), cache_dir)  # the cache knows the old set
    filler = fill(tiny_fs, leave)
    booleans_local(small_root)
    result = selcache.finalize(str(small_root), cache_dir)
    assert result.action in COMPILED
    assert_matches_reference(small_root, tmp_path, semantic_policy=result.action == "relinked")
    # Space again. Whatever was stored is whole: every manifest's blobs are
    # there and verify; then the cache cleans up and fills in what it missed.
    filler.unlink()
    with Cache(cache_dir) as cache:
        assert cache.problem is None
        manifests = list(cache.iter_manifests())
        assert manifests  # the old set, at least
        for manifest in manifests:
            assert cache.load_outputs(manifest) is not None, manifest.key
        cache.gc(orphan_age=0)
    booleans_local(twin)
    action = selcache.finalize(str(twin), cache_dir).action
    assert action in (*COMPILED, "reused")
    # Reused from either compile: a relinked one means the same, not the same bytes.
    assert_matches_reference(twin, tmp_path / "twin-ref", semantic_policy=True)
    assert selcache.status(str(twin), cache_dir)["predicted_action"] == "unchanged"


def _val_owned_by_someone_else(cache_dir: str, path: str) -> None:
    os.chown(path, 1000, 1000)


def _val_group_writable_dir(cache_dir: str, path: str) -> None:
    os.chmod(os.path.dirname(path), 0o770)


def _val_symlink(cache_dir: str, path: str) -> None:
    data = Path(path).read_bytes()
    elsewhere = os.path.join(os.path.dirname(cache_dir), "elsewhere.val")
    Path(elsewhere).write_bytes(data)
    os.unlink(path)
    os.symlink(elsewhere, path)


def _db_world_writable(cache_dir: str, path: str) -> None:
    os.chmod(os.path.join(cache_dir, "cache.db"), 0o666)


def _symlink_in_cache_dir(cache_dir: str, path: str) -> None:
    os.symlink("/etc", os.path.join(cache_dir, "ff"))


@pytest.mark.parametrize("tamper, message", [
    pytest.param(_val_owned_by_someone_else, "owned by uid 1000", id="value-file-not-ours"),
    pytest.param(_val_group_writable_dir, "group- or world-writable", id="value-dir-writable"),
    pytest.param(_val_symlink, "symlink", id="value-file-symlink"),
    pytest.param(_db_world_writable, "group- or world-writable", id="database-writable"),
    pytest.param(_symlink_in_cache_dir, "symlink", id="symlink-in-cache-dir"),
])
def test_unsafe_cache_contents_are_refused(tamper: object, message: str, small_root: Path,
                                           cache_dir: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    _key, _sha, path = staged_value_file(small_root, cache_dir)
    tamper(cache_dir, path)  # type: ignore[operator]
    before = tree_digest(small_root)
    code = main(["finalize", "--root", str(small_root), "--cache-dir", cache_dir])
    err = capsys.readouterr().err
    assert code == 6, err
    assert message in err and "refusing to trust" in err
    assert tree_digest(small_root) == before
