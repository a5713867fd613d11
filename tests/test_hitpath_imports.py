"""A finalize that finds everything in place is mostly interpreter start-up
and imports (benchmarks/results/latest.md): it must not load the watcher's or
the analysis' libraries."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import selcache

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("watchdog", "setools", "matplotlib")

_PROBE = """
import json, sys
from selcache.cli import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "modules": sorted(sys.modules)}))
"""


def test_unchanged_finalize_loads_no_watcher_or_analysis_library(small_root: Path,
                                                                 cache_dir: str) -> None:
    selcache.finalize(str(small_root), cache_dir)
    done = subprocess.run([sys.executable, "-c", _PROBE, "finalize", "--root", str(small_root),
                           "--cache-dir", cache_dir, "--json"], capture_output=True, text=True,
                          check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    result, probe = done.stdout.strip().rsplit("\n", 1)
    assert json.loads(result)["action"] == "unchanged"
    loaded = json.loads(probe)["modules"]
    assert json.loads(probe)["code"] == 0
    assert [m for m in loaded if m.split(".")[0] in HEAVY] == []
