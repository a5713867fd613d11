"""`selcache diff`: the installed kernel policy against the one finalize would
install, on real compiles of the small policy. The JSON document, the human
output, exit codes, and that diff never changes the root."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from selcache.cli import main

from .conftest import REPO, tree_digest
from .scenarios import booleans_local, module_added

POLICY = "etc/selinux/small/policy/policy.33"


def run(capsys: pytest.CaptureFixture[str], root: Path, cache_dir: str,
        *argv: str) -> tuple[int, str, str]:
    code = main(["diff", "--root", str(root), "--cache-dir", cache_dir, *argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys: pytest.CaptureFixture[str], root: Path, cache_dir: str,
             *argv: str) -> tuple[int, dict]:
    code, out, _ = run(capsys, root, cache_dir, "--json", *argv)
    return code, json.loads(out)


def test_same_inputs_are_byte_identical_compiled_then_cached(
        small_root: Path, cache_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
    before = tree_digest(small_root)
    code, doc = run_json(capsys, small_root, cache_dir)
    assert code == 0
    assert doc["version"] == 1 and doc["mode"] == "quick" and doc["policy_type"] == "small"
    assert doc["pending"]["source"] == "compiled"
    assert doc["installed"]["path"] == doc["pending"]["path"] == POLICY
    assert doc["installed"]["sha256"] == doc["pending"]["sha256"]
    assert doc["byte_identical"] is True and doc["identical"] is True
    assert doc["differences"] == {} and doc["rule_changes"] == {}
    code, again = run_json(capsys, small_root, cache_dir)
    assert code == 0 and again["pending"]["source"] == "cache" and again["key"] == doc["key"]
    assert tree_digest(small_root) == before


def test_boolean_change_json_and_human(small_root: Path, cache_dir: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    booleans_local(small_root)
    before = tree_digest(small_root)
    code, doc = run_json(capsys, small_root, cache_dir)
    assert code == 0
    assert doc["byte_identical"] is False and doc["identical"] is False
    assert doc["differences"] == {"booleans": {"added": [], "removed": [], "modified": [
        {"name": "httpd_can_network_connect", "from": False, "to": True}]}}
    assert doc["rules"]["allow"]["left"] == doc["rules"]["allow"]["right"] > 0
    assert all(c["added"] == c["removed"] == c["modified"] == 0 for c in doc["rules"].values())
    assert doc["installed"]["policy"]["version"] == doc["pending"]["policy"]["version"] == 33
    code, out, _ = run(capsys, small_root, cache_dir)
    assert code == 0
    assert "booleans: httpd_can_network_connect default false -> true" in out.splitlines()
    assert "1 categories differ" in out and "rules:" not in out
    # diff compiled into the cache and installed nothing.
    assert tree_digest(small_root) == before


def test_module_added_human_counts_match_the_json(small_root: Path, cache_dir: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    module_added(small_root)
    code, doc = run_json(capsys, small_root, cache_dir)
    assert code == 0
    types = doc["differences"]["types"]["added"]
    assert types == ["myapp_data_t", "myapp_exec_t", "myapp_t"]
    allow = doc["rules"]["allow"]
    assert allow["added"] > 0 and allow["removed"] == 0
    code, out, _ = run(capsys, small_root, cache_dir)
    lines = out.splitlines()
    assert code == 0
    assert f"types: +3 ({', '.join(types)})" in lines
    assert "booleans: +1 (myapp_enabled default false)" in lines
    assert f"allow rules: +{allow['added']} -0" in lines
    assert "attributes: domain: types +myapp_t" in lines


def test_full_lists_every_rule(small_root: Path, cache_dir: str,
                               capsys: pytest.CaptureFixture[str]) -> None:
    module_added(small_root)
    code, doc = run_json(capsys, small_root, cache_dir, "--full")
    assert code == 0 and doc["mode"] == "full"
    added = doc["rule_changes"]["allow"]["added"]
    assert "allow myapp_t myapp_data_t:dir { getattr ioctl lock open read search };" in added
    assert doc["rules"]["allow"]["added"] == len(added)
    code, out, _ = run(capsys, small_root, cache_dir, "--full")
    lines = out.splitlines()
    assert [line[4:] for line in lines if line.startswith("  + allow ")] == added


def test_nothing_installed_everything_is_added(small_root: Path, cache_dir: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    for p in (small_root / "etc/selinux/small/policy").iterdir():
        p.unlink()
    code, doc = run_json(capsys, small_root, cache_dir)
    assert code == 0 and doc["installed"] is None and doc["identical"] is False
    assert "myapp_t" not in doc["differences"]["types"]["added"]
    assert "httpd_t" in doc["differences"]["types"]["added"]
    assert all(c["left"] == 0 and c["added"] == c["right"] > 0 for c in doc["rules"].values())
    code, out, _ = run(capsys, small_root, cache_dir)
    assert code == 0
    assert "installed:  nothing (no /etc/selinux/small/policy/policy.N): everything below is " \
           "added" in out
    n_types = len(doc["differences"]["types"]["added"])
    assert re.search(rf"^types: \+{n_types} \(", out, re.M)


def test_older_installed_version_is_compared(small_root: Path, cache_dir: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """An installed policy.31 and no policy.33: the highest one present is the
    installed policy, and the version change is the difference."""
    with open(small_root / "etc/selinux/semanage.conf", "a") as fh:
        fh.write("policy-version = 31\n")
    code, doc = run_json(capsys, small_root, cache_dir)
    assert code == 0
    assert doc["installed"]["path"] == POLICY
    assert doc["pending"]["path"] == "etc/selinux/small/policy/policy.31"
    assert doc["differences"] == {"properties": {"added": [], "removed": [],
                                                 "modified": ["version: 33 -> 31"]}}


def test_corrupt_installed_policy_exit_code(small_root: Path, cache_dir: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    policy = small_root / POLICY
    policy.write_bytes(policy.read_bytes()[:4096])
    before = tree_digest(small_root)
    code, out, err = run(capsys, small_root, cache_dir, "--json")
    doc = json.loads(out)
    assert code == 3 and doc["error"] == "InvalidPolicy" and doc["exit_code"] == 3
    assert f"/{POLICY} is not a readable binary SELinux policy" in err
    assert tree_digest(small_root) == before


def test_invalid_root_exit_code(tmp_path: Path, cache_dir: str,
                                capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, tmp_path, cache_dir)
    assert code == 3 and "etc/selinux/config" in err


def test_progress_only_on_a_terminal(small_root: Path, cache_dir: str,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    booleans_local(small_root)
    code, _, err = run(capsys, small_root, cache_dir)
    assert code == 0 and err == ""

    master, slave = os.openpty()
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: the terminal's other side is closed
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        done = subprocess.run([sys.executable, "-m", "selcache", "diff", "--json", "--full",
                               "--root", str(small_root), "--cache-dir", cache_dir],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=slave, timeout=120)
    finally:
        os.close(slave)
        reader.join(timeout=10)
        os.close(master)
    assert done.returncode == 0
    assert json.loads(done.stdout)["differences"]["booleans"]["modified"]
    shown = b"".join(chunks).decode()
    assert "selcache: booleans [" in shown and "selcache: allow rules [" in shown
    # The last thing written clears the progress line.
    assert shown.endswith("\r\x1b[K")


def test_help_documents_exit_zero(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "exits 0 whether or not they differ" in capsys.readouterr().out
