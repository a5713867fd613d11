"""Run one command as a whole new process and measure it, the way a finalizer
would run it: wall time around spawn and wait, and the child's own CPU time
and peak RSS from ``wait4``'s rusage.

The commands are started by a small launcher process, not by the benchmark
itself: Linux records the RSS high-water mark of the memory a process had
when it called exec (exec_mmap's setmax_mm_hiwater_rss), and a child forked
or vforked from the ~50 MiB benchmark process would report at least that. The
launcher is ``python -S`` with nothing but json imported (~9 MiB), well below
anything measured here.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

_LAUNCHER = r"""
import json, os, sys, time
for line in sys.stdin:
    req = json.loads(line)
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, req["out"], os.O_WRONLY | os.O_TRUNC, 0),
        (os.POSIX_SPAWN_OPEN, 2, req["err"], os.O_WRONLY | os.O_TRUNC, 0),
    ]
    try:
        start = time.perf_counter()
        pid = os.posix_spawn(req["argv"][0], req["argv"], req["env"], file_actions=actions)
        _, status, ru = os.wait4(pid, 0)
        wall = time.perf_counter() - start
    except OSError as exc:
        print(json.dumps({"error": str(exc)}), flush=True)
        continue
    print(json.dumps({"wall": wall, "cpu": ru.ru_utime + ru.ru_stime, "rss_kib": ru.ru_maxrss,
                      "returncode": os.waitstatus_to_exitcode(status)}), flush=True)
"""


@dataclass(frozen=True)
class Sample:
    """One run of one command."""

    wall: float  # seconds, spawn to reaped
    cpu: float  # seconds, user + sys of the child and of the children it waited for
    rss_kib: int  # peak resident set size of the child or its largest waited-for child
    returncode: int
    stdout: str
    stderr: str


class CommandFailed(RuntimeError):
    def __init__(self, argv: Sequence[str], sample: Sample) -> None:
        super().__init__(f"{' '.join(argv)} exited with {sample.returncode}:\n"
                         f"{sample.stderr.strip()[-4000:]}")
        self.sample = sample


class _Launcher:
    def __init__(self) -> None:
        self.proc: subprocess.Popen[str] | None = None

    def request(self, req: dict[str, object]) -> dict[str, object]:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen([sys.executable, "-S", "-c", _LAUNCHER],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         text=True, env={})
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the benchmark's launcher process died")
        doc: dict[str, object] = json.loads(line)
        return doc

    def close(self) -> None:
        if self.proc is not None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self.proc.wait()
            self.proc = None


_launcher = _Launcher()
close = _launcher.close


def spawn(argv: Sequence[str], *, env: Mapping[str, str] | None = None,
          check: bool = True) -> Sample:
    """Run ``argv`` with stdin from /dev/null and stdout/stderr to files (a pipe
    that nobody drains could stall the child and count as its time)."""
    environ = dict(os.environ if env is None else env)
    exe = shutil.which(argv[0], path=environ.get("PATH", os.defpath))
    if exe is None:
        raise FileNotFoundError(f"{argv[0]} not found in {environ.get('PATH')}")
    with tempfile.NamedTemporaryFile() as out, tempfile.NamedTemporaryFile() as err:
        doc = _launcher.request({"argv": [exe, *argv[1:]], "env": environ, "out": out.name,
                                 "err": err.name})
        if "error" in doc:
            raise OSError(f"cannot run {argv[0]}: {doc['error']}")
        sample = Sample(wall=float(doc["wall"]), cpu=float(doc["cpu"]),  # type: ignore[arg-type]
                        rss_kib=int(doc["rss_kib"]),  # type: ignore[call-overload]
                        returncode=int(doc["returncode"]),  # type: ignore[call-overload]
                        stdout=out.read().decode("utf-8", "replace"),
                        stderr=err.read().decode("utf-8", "replace"))
    if check and sample.returncode != 0:
        raise CommandFailed(argv, sample)
    return sample


@dataclass(frozen=True)
class Spread:
    median: float
    min: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        return cls(statistics.median(values), min(values), max(values))

    def to_json(self, digits: int = 4) -> dict[str, float]:
        return {"median": round(self.median, digits), "min": round(self.min, digits),
                "max": round(self.max, digits)}


def summarize(samples: Sequence[Sample]) -> dict[str, dict[str, float]]:
    """Median and min-max of wall, CPU and peak RSS (MiB) over ``samples``."""
    return {
        "wall_s": Spread.of([s.wall for s in samples]).to_json(),
        "cpu_s": Spread.of([s.cpu for s in samples]).to_json(),
        "rss_mib": Spread.of([s.rss_kib / 1024 for s in samples]).to_json(1),
    }
