"""The failure stamp: a failed finalize says what failed, with semodule's
stderr, and that the root was left as it was; status shows it (human and
JSON); the next successful finalize clears it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

import selcache
from selcache import stamp
from selcache.cli import main
from selcache.layout import read_layout

from .conftest import hold_lock, tree_digest
from .scenarios import POLICIES, add_module, booleans_local

pytestmark = pytest.mark.timeout(120)


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_compile_failure_is_stamped_shown_and_cleared(
        small_root: Path, cache_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
    args = ("--root", str(small_root), "--cache-dir", cache_dir)
    add_module(small_root, "bad", POLICIES / "broken/bad.cil")
    before = tree_digest(small_root)
    code, _, err = cli(capsys, "finalize", *args)
    assert code == 4
    assert tree_digest(small_root) == before

    code, out, _ = cli(capsys, "status", "--json", *args)
    failure = json.loads(out)["failure"]
    assert failure["step"] == "compile"
    assert failure["error"] == "CompileError" and failure["exit_code"] == 4
    assert failure["root_unchanged"] is True
    assert "Failed to resolve allow statement" in failure["stderr"]
    assert failure["stderr"].strip() in err  # the same stderr the user saw
    assert failure["key"] == json.loads(out)["key"]

    code, out, _ = cli(capsys, "status", *args)
    assert code == 0
    assert "FAILED finalize" in out and "at step compile" in out
    assert "root left unchanged" in out
    assert "semodule: " in out and "Failed to resolve" in out

    shutil.rmtree(small_root / read_layout(str(small_root)).active / "modules/400/bad")
    code, _, _ = cli(capsys, "finalize", *args)
    assert code == 0
    code, out, _ = cli(capsys, "status", "--json", *args)
    assert json.loads(out)["failure"] is None
    assert "FAILED" not in cli(capsys, "status", *args)[1]
    assert not [n for n in os.listdir(cache_dir) if n.startswith(("failed-", ".failed-"))]


def test_invalid_root_is_stamped_before_the_cache_is_opened(small_root: Path,
                                                            cache_dir: str) -> None:
    config = small_root / "etc/selinux/config"
    good = config.read_bytes()
    config.write_bytes(good.replace(b"SELINUXTYPE=small", b"SELINUXTYPE=../x"))
    with pytest.raises(selcache.InvalidRoot):
        selcache.finalize(str(small_root), cache_dir)
    config.write_bytes(good)
    failure = selcache.status(str(small_root), cache_dir)["failure"]
    assert failure["step"] == "open" and failure["error"] == "InvalidRoot"
    assert "not a valid policy type" in failure["message"]
    assert failure["exit_code"] == 3 and failure["root_unchanged"] is True
    selcache.finalize(str(small_root), cache_dir)
    assert selcache.status(str(small_root), cache_dir)["failure"] is None


def test_busy_is_stamped(small_root: Path, cache_dir: str) -> None:
    layout = read_layout(str(small_root))
    booleans_local(small_root)
    holder = hold_lock(small_root / layout.store_root, 60)
    try:
        with pytest.raises(selcache.Busy):
            selcache.finalize(str(small_root), cache_dir, lock_timeout=0.5)
    finally:
        holder.kill()
        holder.wait()
    failure = selcache.status(str(small_root), cache_dir)["failure"]
    assert failure["step"] == "lock" and failure["error"] == "Busy"
    assert failure["exit_code"] == 8


def test_stamp_survives_a_garbage_cache_database(small_root: Path, cache_dir: str) -> None:
    """The stamp is a file beside the database, not a row in it."""
    selcache.finalize(str(small_root), cache_dir)
    add_module(small_root, "bad", POLICIES / "broken/bad.cil")
    Path(cache_dir, "cache.db").write_bytes(os.urandom(8192))
    for suffix in ("-wal", "-shm"):
        Path(cache_dir, "cache.db" + suffix).unlink(missing_ok=True)
    with pytest.raises(selcache.CompileError):
        selcache.finalize(str(small_root), cache_dir)
    assert Path(cache_dir, stamp.stamp_name(str(small_root))).is_file()
    assert selcache.status(str(small_root), cache_dir)["failure"]["error"] == "CompileError"


def test_a_stamp_that_cannot_be_written_does_not_hide_the_error(
        small_root: Path, tmp_path: Path) -> None:
    """A cache dir that is a file: no stamp, a warning, and the real error."""
    not_a_dir = tmp_path / "cache"
    not_a_dir.write_text("")
    (small_root / "etc/selinux/config").write_text("SELINUXTYPE=../x\n")
    with pytest.raises(selcache.InvalidRoot):
        selcache.finalize(str(small_root), str(not_a_dir))
