"""The ``selcache`` command as a process: ``cli.run`` skips the interpreter's
teardown, so everything it prints must still arrive, with the right exit code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def selcache(*argv: str) -> subprocess.CompletedProcess[str]:
    # stdout is a pipe here, so it is block-buffered (no PYTHONUNBUFFERED from
    # the caller): nothing arrives unless the exit flushes it.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    return subprocess.run([sys.executable, "-m", "selcache", *argv], capture_output=True,
                          text=True, env={**env, "PYTHONPATH": str(REPO)}, check=False)


def test_result_json_arrives_through_a_pipe(small_root: Path, cache_dir: str) -> None:
    args = ("--root", str(small_root), "--cache-dir", cache_dir, "--json")
    first = selcache("finalize", *args)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["action"] == "rebuilt"
    status = selcache("status", *args)
    assert status.returncode == 0
    assert json.loads(status.stdout)["last_finalize"]["action"] == "rebuilt"


@pytest.mark.parametrize("json_flag", [pytest.param(True, id="json"),
                                       pytest.param(False, id="human")])
def test_error_exit_code_and_message_arrive(tmp_path: Path, cache_dir: str,
                                            json_flag: bool) -> None:
    done = selcache("finalize", "--root", str(tmp_path / "nowhere"), "--cache-dir", cache_dir,
                    *(["--json"] if json_flag else []))
    assert done.returncode == 3
    assert "does not exist" in done.stderr
    if json_flag:
        doc = json.loads(done.stdout)
        assert doc["error"] == "InvalidRoot" and doc["exit_code"] == 3


def test_usage_error_exits_2(cache_dir: str) -> None:
    done = selcache("finalize", "--no-such-option")
    assert done.returncode == 2
    assert "usage:" in done.stderr
