"""Where and how the benchmarked commands run: the selcache installation, the
child processes' environment, the machine and the tool versions.

selcache is measured as a system would run it: a regular (non-editable)
install with its bytecode compiled, in a venv of its own under
``.cache/bench/venv``, rebuilt from this checkout on every benchmark run. The
development ``.venv`` holds an *editable* install, whose import hook loads
pathlib, urllib and re at every interpreter start-up (~10 ms here) and which
no packaged selcache has; it is measured too, as its own row.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from . import synth

REPO = Path(__file__).resolve().parent.parent
SYSTEM_PYTHON = "/usr/bin/python3"

#: The whole environment of every measured process: nothing inherited (a
#: PYTHONDONTWRITEBYTECODE or PYTHONPATH from the caller's shell would change
#: what is measured).
CHILD_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
             "LANG": "C.UTF-8", "HOME": "/root"}


@dataclass(frozen=True)
class Install:
    """One selcache installation: its command, the python running it, and the
    environment it runs in."""

    name: str
    command: tuple[str, ...]  # argv prefix that runs the ``selcache`` command
    python: str
    env: dict[str, str]


def _run(argv: list[str]) -> str:
    done = subprocess.run(argv, check=True, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True)
    return done.stdout


def bench_venv() -> Install:
    """A regular install of this checkout in ``.cache/bench/venv``. The
    dependencies are installed once, at the versions the development venv has."""
    venv = synth.bench_dir() / "venv"
    pip = [str(venv / "bin/python"), "-m", "pip", "-q", "--disable-pip-version-check"]
    if not (venv / ".deps").exists():
        shutil.rmtree(venv, ignore_errors=True)
        _run([SYSTEM_PYTHON, "-m", "venv", "--system-site-packages", str(venv)])
        deps = [f"{name}=={importlib.metadata.version(name)}" for name in ("diskcache", "watchdog")]
        _run([*pip, "install", *deps])
        (venv / ".deps").write_text("\n".join(deps) + "\n")
    # --no-build-isolation: build with the venv's own setuptools, offline.
    _run([*pip, "install", "--no-deps", "--no-build-isolation", "--force-reinstall", str(REPO)])
    return Install("bench-venv", (str(venv / "bin/selcache"),), str(venv / "bin/python"),
                   dict(CHILD_ENV))


def dev_venv() -> Install:
    """The development venv's editable install, pointed at this checkout."""
    venv = REPO / ".venv"
    if not (venv / "bin/selcache").exists():
        venv = Path(sys.prefix)
    # Bytecode as a regular install has it: the caller's shell may have
    # disabled writing it, and compiling every module at every start is not
    # what anybody runs.
    _run([sys.executable, "-m", "compileall", "-q", str(REPO / "selcache")])
    # The console script as this checkout defines it, whatever entry point the
    # venv's (possibly older) generated script names.
    python = str(venv / "bin/python")
    return Install("dev-venv", (python, "-c", "from selcache.cli import run; run()"), python,
                   {**CHILD_ENV, "PYTHONPATH": str(REPO)})


def refresh_flag() -> str:
    """``--refresh`` in newer policycoreutils; ``--rebuild-if-modules-changed`` in 3.4."""
    done = subprocess.run(["semodule", "--help"], stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, check=False)
    text = done.stdout + done.stderr
    if "--refresh" in text:
        return "--refresh"
    if "--rebuild-if-modules-changed" in text:
        return "--rebuild-if-modules-changed"
    raise RuntimeError("semodule offers neither --refresh nor --rebuild-if-modules-changed")


def dpkg_version(package: str) -> str | None:
    done = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True,
                          text=True, check=False, stdin=subprocess.DEVNULL)
    return done.stdout.strip() or None


def machine() -> dict[str, object]:
    model = ""
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as fh:
        mem_kib = int(fh.readline().split()[1])
    return {"cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
            "cpu_model": model or platform.processor(), "memory_gib": round(mem_kib / 2**20, 1),
            "kernel": platform.release(), "os": _os_release()}


def _os_release() -> str:
    try:
        with open("/etc/os-release") as fh:
            for line in fh:
                if line.startswith("PRETTY_NAME="):
                    return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return platform.platform()


def loadavg() -> list[float]:
    with open("/proc/loadavg") as fh:
        return [float(x) for x in fh.read().split()[:3]]


def versions(install: Install) -> dict[str, str | None]:
    selcache = _run([*install.command, "--version"]).split()[-1]
    commit = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                            capture_output=True, text=True, check=False).stdout.strip()
    return {
        "selcache": selcache,
        "selcache_commit": commit or None,
        "libsemanage": dpkg_version("libsemanage2"),
        "libsepol": dpkg_version("libsepol2"),
        "policycoreutils": dpkg_version("policycoreutils"),
        "secilc": dpkg_version("secilc"),
        "refpolicy": dpkg_version_of_deb(),
        "python": platform.python_version(),
        "diskcache": importlib.metadata.version("diskcache"),
    }


def dpkg_version_of_deb() -> str | None:
    """The version of the refpolicy package the sample root was built from."""
    from selcache import sample

    debs = sorted((sample.fixtures_dir() / "refpolicy").glob(f"{sample.REFPOLICY_PACKAGE}_*.deb"))
    if not debs:
        return None
    return _run(["dpkg-deb", "-f", str(debs[-1]), "Version"]).strip()


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()
