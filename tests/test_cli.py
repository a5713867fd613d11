"""The CLI contract: --json shapes and the exit code table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from selcache.cli import main
from selcache.errors import EXIT_CODES
from selcache.layout import read_layout

from .scenarios import POLICIES, add_module, booleans_local


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, (json.loads(out) if out.strip().startswith("{") else {}), err


def test_status_json_shape(small_root: Path, cache_dir: str,
                           capsys: pytest.CaptureFixture[str]) -> None:
    code, doc, _ = run(capsys, "status", "--json", "--root", str(small_root), "--cache-dir", cache_dir)
    assert code == 0
    assert doc["version"] == 1 and doc["policy_type"] == "small"
    assert doc["installed_matches"] is False and doc["predicted_action"] == "rebuilt"
    assert set(doc["cache"]) >= {"entries", "bytes", "hits", "misses"}
    assert doc["last_finalize"] is None
    assert len(doc["key"]) == 64


def test_finalize_json_actions_and_status_after(small_root: Path, cache_dir: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    args = ("--json", "--root", str(small_root), "--cache-dir", cache_dir)
    booleans_local(small_root)
    code, first, _ = run(capsys, "finalize", *args)
    assert code == 0 and first["action"] == "rebuilt" and first["seconds"] > 0
    code, second, _ = run(capsys, "finalize", *args)
    assert second["action"] == "unchanged" and second["key"] == first["key"]
    code, status, _ = run(capsys, "status", *args)
    assert status["installed_matches"] is True and status["predicted_action"] == "unchanged"
    assert status["last_finalize"]["action"] == "unchanged"
    assert status["cache"]["hits"] == 1 and status["cache"]["misses"] == 1


def test_invalid_root_exit_code(tmp_path: Path, cache_dir: str,
                                capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "finalize", "--root", str(tmp_path), "--cache-dir", cache_dir)
    assert code == 3 and "etc/selinux/config" in err


def test_bad_module_exit_code_carries_semodule_stderr(small_root: Path, cache_dir: str,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    add_module(small_root, "bad", POLICIES / "broken/bad.cil")
    code, doc, err = run(capsys, "finalize", "--json", "--root", str(small_root),
                         "--cache-dir", cache_dir)
    assert code == 4
    assert doc["error"] == "CompileError" and doc["exit_code"] == 4
    assert "Failed to resolve allow statement" in err


def test_verify_detects_tampering(small_root: Path, cache_dir: str,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    args = ("--root", str(small_root), "--cache-dir", cache_dir)
    code, _, _ = run(capsys, "verify", *args)
    assert code == 0
    seusers = small_root / read_layout(str(small_root)).final / "seusers"
    seusers.write_text(seusers.read_text() + "mallory:staff_u\n")
    code, _, err = run(capsys, "verify", *args)
    assert code == 10 and "etc/selinux/small/seusers" in err


def test_gc_and_help_list_exit_codes(cache_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, doc, _ = run(capsys, "gc", "--json", "--cache-dir", cache_dir)
    assert code == 0 and doc["blobs_removed"] == 0
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for code_num in EXIT_CODES:
        assert f"{code_num:>3}  " in out


def test_unsafe_cache_dir_exit_code(small_root: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "shared"
    bad.mkdir()
    bad.chmod(0o777)
    code, _, err = run(capsys, "status", "--root", str(small_root), "--cache-dir", str(bad))
    assert code == 6 and "writable" in err


def test_the_finalizer_example_refreshes_then_finds_nothing_to_do(small_root: Path,
                                                                  cache_dir: str) -> None:
    example = Path(__file__).resolve().parent.parent / "examples" / "finalizer.py"
    env = {**os.environ, "SELCACHE_CACHE_DIR": cache_dir}
    first = subprocess.run([sys.executable, str(example), str(small_root)], env=env,
                           capture_output=True, text=True, check=True)
    assert "Refreshed SELinux policy" in first.stdout and "(rebuilt" in first.stdout
    second = subprocess.run([sys.executable, str(example), str(small_root)], env=env,
                            capture_output=True, text=True, check=True)
    assert "(unchanged)" in second.stdout
    (small_root / "etc" / "selinux" / "config").write_text("SELINUXTYPE=../x\n")
    bad = subprocess.run([sys.executable, str(example), str(small_root)], env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 3 and "failed" in bad.stderr


def test_verify_accepts_a_relinked_policy_by_meaning_only(small_root: Path, cache_dir: str,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    args = ("--root", str(small_root), "--cache-dir", cache_dir, "--json")
    layout = read_layout(str(small_root))
    policy = next((small_root / layout.final / "policy").glob("policy.*"))
    assert main(["finalize", *args[:-1]]) == 0
    before = policy.read_bytes()
    booleans_local(small_root)
    capsys.readouterr()
    assert main(["finalize", *args]) == 0
    assert json.loads(capsys.readouterr().out)["action"] == "relinked"
    code, doc, _ = run(capsys, "verify", *args)
    assert code == 0 and doc["ok"]
    assert f"{layout.final}/policy/{policy.name}" in doc["same_meaning"]
    # The old policy (the boolean's default differs) is not the same meaning.
    policy.write_bytes(before)
    code, _, err = run(capsys, "verify", *args[:-1])
    assert code == 10 and policy.name in err
