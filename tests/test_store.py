"""The cache: bytes only, verified blobs, safe directory, gc."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import diskcache
import pytest

import selcache
from selcache.errors import CacheError
from selcache.store import Cache

from .conftest import assert_matches_reference, is_kernel_policy, output_files
from .scenarios import booleans_local


class _Exploit:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, int]]:
        return (os.open, (self.marker, os.O_CREAT | os.O_WRONLY))


def corrupt_blob(cache_dir: str, sha256: str, how: str) -> None:
    """Damage a blob where diskcache keeps it: a .val file, or inline in SQLite."""
    db = sqlite3.connect(os.path.join(cache_dir, "cache.db"))
    try:
        row = db.execute("SELECT filename, value FROM Cache WHERE key = ?",
                         (f"blob:{sha256}",)).fetchone()
        assert row is not None
        filename, value = row
        if filename:
            path = os.path.join(cache_dir, filename)
            data = Path(path).read_bytes()
            if how == "truncate":
                Path(path).write_bytes(data[: len(data) // 2])
            elif how == "missing":
                os.unlink(path)
            else:
                Path(path).write_bytes(data[:100] + bytes([data[100] ^ 0x40]) + data[101:])
        else:
            data = bytes(value)
            new = data[: len(data) // 2] if how != "flip" else data[:10] + bytes([data[10] ^ 1]) + data[11:]
            db.execute("UPDATE Cache SET value = ? WHERE key = ?", (new, f"blob:{sha256}"))
            db.commit()
    finally:
        db.close()


def test_values_are_bytes_only(tmp_path: Path) -> None:
    with Cache(str(tmp_path / "c")) as cache:
        with pytest.raises(TypeError):
            cache._dc.set("x", {"a": 1})
        digest = cache.put_blob(b"payload")
        assert cache.get_blob(digest) == b"payload"


def test_pickled_value_is_never_unpickled(tmp_path: Path) -> None:
    path = str(tmp_path / "c")
    marker = tmp_path / "pwned"
    Cache(path).close()
    with diskcache.Cache(path) as raw:  # default Disk: pickles
        raw.set("manifest:" + "0" * 64, _Exploit(str(marker)))
        raw.set("blob:" + "1" * 64, _Exploit(str(marker)))
    with Cache(path) as cache:
        assert cache.get_manifest("0" * 64) is None
        assert cache.get_blob("1" * 64) is None
        list(cache.iter_manifests())
    assert not marker.exists()


@pytest.mark.parametrize("how", ["truncate", "flip", "missing"])
def test_corrupt_blob_is_never_installed(how: str, small_root: Path, cache_dir: str,
                                         tmp_path: Path) -> None:
    booleans_local(small_root)
    staged = selcache.stage(str(small_root), cache_dir)
    with Cache(cache_dir) as cache:
        manifest = cache.get_manifest(staged.key)
    assert manifest is not None
    policy = next(f for f in manifest.files if "/policy/policy." in f.path)
    if how == "missing":
        # Inline blobs have no file to delete: drop the row instead.
        with Cache(cache_dir) as cache:
            cache._dc.delete(f"blob:{policy.sha256}")
    else:
        corrupt_blob(cache_dir, policy.sha256, how)
    result = selcache.finalize(str(small_root), cache_dir)
    assert result.action == "rebuilt"  # the bad entry was a miss
    assert_matches_reference(small_root, tmp_path)
    with Cache(cache_dir) as cache:
        assert cache.get_blob(policy.sha256) is not None  # stored again, intact


def test_corrupt_large_blob_file_is_a_miss(tmp_path: Path) -> None:
    with Cache(str(tmp_path / "c")) as cache:
        data = os.urandom(200_000)  # large enough for diskcache to use a .val file
        digest = cache.put_blob(data)
    corrupt_blob(str(tmp_path / "c"), digest, "flip")
    with Cache(str(tmp_path / "c")) as cache:
        assert cache.get_blob(digest) is None
        assert not cache.has_blob(digest)  # dropped


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o757])
def test_group_or_world_writable_cache_is_refused(tmp_path: Path, mode: int) -> None:
    d = tmp_path / "c"
    d.mkdir()
    d.chmod(mode)
    with pytest.raises(CacheError, match="writable"):
        Cache(str(d))


def test_cache_owned_by_someone_else_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "c"
    d.mkdir(mode=0o700)
    os.chown(d, 1000, 1000)
    with pytest.raises(CacheError, match="owned by uid 1000"):
        Cache(str(d))


def test_cache_dir_is_created_private(tmp_path: Path) -> None:
    Cache(str(tmp_path / "new" / "c")).close()
    assert (tmp_path / "new" / "c").stat().st_mode & 0o777 == 0o700


def test_counters_and_gc(small_root: Path, cache_dir: str) -> None:
    selcache.finalize(str(small_root), cache_dir)  # miss (compile)
    selcache.finalize(str(small_root), cache_dir)  # hit (unchanged)
    booleans_local(small_root)
    selcache.finalize(str(small_root), cache_dir)  # miss
    with Cache(cache_dir) as cache:
        stats = cache.stats()
        assert (stats["hits"], stats["misses"], stats["entries"]) == (1, 2, 2)
        orphan = cache.put_blob(b"nobody refers to me")
        removed = cache.gc()
        assert removed["blobs_removed"] == 1
        assert cache.get_blob(orphan) is None
        assert cache.stats()["entries"] == 2
        assert cache.gc(max_age=0)["manifests_removed"] == 2
    # With the cache emptied, finalize still gives the right answer.
    result = selcache.finalize(str(small_root), cache_dir)
    # The installed kernel policy came from a relink: a full rebuild means the
    # same with other bytes (and bumps commit_num); nothing else is rewritten.
    assert result.action == "rebuilt"
    assert result.written and all(is_kernel_policy(p) or p.endswith("/commit_num")
                                  for p in result.written)
    assert output_files(small_root)
