"""Fleet benchmark: N machines with the same inputs finalize against a shared
Redis tier (one builder compiles, everyone else installs its signed output
set) versus each machine compiling on its own.

Every selcache run is a new process (``python -m selcache ...``), as a
finalizer runs it; its wall time is measured around spawn and wait, its CPU
time (user + system, with the semodule children it waited for) comes from
``wait4``. The redis-server's own CPU time is counted on the shared-tier side.
Compiling on every machine is measured on ``--compile-samples`` machines and
extrapolated to N (every such compile does the same work).

    .venv/bin/python benchmarks/fleet.py [--machines 20] [--policy refpolicy]

Writes benchmarks/results/fleet.json and fleet.md. Runs on sample roots under
a temporary directory only; the host's policy is never touched. Needs root
(the compile sandbox) and redis-server.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from selcache import __version__, remote, sample  # noqa: E402
from selcache.layout import read_layout  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"


@dataclass(frozen=True)
class Run:
    what: str
    action: str
    wall: float
    cpu: float


def measure(what: str, argv: Sequence[str], env: dict[str, str]) -> Run:
    """Run one selcache command as a new process; its JSON result gives the action."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: "
                               f"{err.read().decode(errors='replace')}")
        action = json.loads(out.read())["action"]
    return Run(what, action, wall, usage.ru_utime + usage.ru_stime)


def process_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Server:
    def __init__(self, directory: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(directory), "--loglevel", "warning"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as c:
                    c.sendall(b"PING\r\n")
                    if c.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def cpu(self) -> float:
        return process_cpu(self.proc.pid)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=10)


def customize(root: Path) -> None:
    """The fleet's customization: a hand-edited boolean and one extra module."""
    layout = read_layout(str(root))
    active = root / layout.active
    if layout.policy_type == "small":
        (active / "booleans.local").write_text("httpd_can_network_connect=1\n")
        name, src = "myapp", REPO / "policies/extra/myapp.cil"
    else:
        (active / "booleans.local").write_text("httpd_can_network_connect=1\n")
        name, src = "demoapp", REPO / "policies/refpolicy/demoapp.cil"
    d = active / "modules/400" / name
    d.mkdir(parents=True)
    shutil.copyfile(src, d / "cil")
    (d / "lang_ext").write_text("cil")


def machine_info() -> dict[str, object]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    redis_version = subprocess.run(["redis-server", "--version"], capture_output=True,
                                   text=True).stdout.strip()
    import redis as redis_py

    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(), "kernel": platform.release(), "cpu": cpu,
            "cpus": os.cpu_count(), "loadavg": os.getloadavg(), "python": platform.python_version(),
            "selcache": __version__, "redis_server": redis_version, "redis_py": redis_py.__version__}


def median(runs: Sequence[Run], field: str) -> float:
    return statistics.median(getattr(r, field) for r in runs)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--machines", type=int, default=20)
    parser.add_argument("--policy", choices=("refpolicy", "small"), default="refpolicy")
    parser.add_argument("--compile-samples", type=int, default=3,
                        help="machines that compile on their own (extrapolated to --machines)")
    parser.add_argument("--out", default=str(RESULTS), help="directory for fleet.json/fleet.md")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("fleet benchmark: needs root (the compile sandbox)", file=sys.stderr)
        return 2

    pristine = sample.pristine_root(args.policy)
    work = Path(tempfile.mkdtemp(prefix="selcache-fleet-"))
    server = Server(work)
    try:
        key, pub, _ = remote.generate_keypair(str(work / "builder"))
        selcache_cmd = [sys.executable, "-m", "selcache"]
        env = {**os.environ, "SELCACHE_CONFIG": os.devnull, "PYTHONPATH": str(REPO)}
        for var in ("SELCACHE_REMOTE", "SELCACHE_TRUSTED_KEYS", "SELCACHE_SIGNING_KEY",
                    "SELCACHE_REMOTE_READONLY", "SELCACHE_REMOTE_TIMEOUT"):
            env.pop(var, None)
        fleet_env = {**env, "SELCACHE_REMOTE": server.url, "SELCACHE_TRUSTED_KEYS": pub,
                     "SELCACHE_REMOTE_READONLY": "1"}

        def new_root(name: str) -> Path:
            root = sample.copy_root(pristine, work / name)
            customize(root)
            return root

        def finalize(what: str, root: Path, cache: Path, e: dict[str, str]) -> Run:
            return measure(what, [*selcache_cmd, "finalize", "--json", "--root", str(root),
                                  "--cache-dir", str(cache)], e)

        server_cpu_start = server.cpu()
        builder_root = new_root("builder")
        build = measure("builder stage", [*selcache_cmd, "stage", "--json", "--root",
                                          str(builder_root), "--cache-dir", str(work / "bcache"),
                                          "--signing-key", key], {**env,
                                                                  "SELCACHE_REMOTE": server.url})
        assert build.action == "compiled", build
        remote_hits: list[Run] = []
        local_hits: list[Run] = []
        unchanged: list[Run] = []
        for i in range(args.machines):
            root, cache = new_root(f"m{i}"), work / f"cache{i}"
            hit = finalize("remote hit", root, cache, fleet_env)
            assert hit.action == "reused", hit
            remote_hits.append(hit)
            again = finalize("unchanged", root, cache, fleet_env)
            assert again.action == "unchanged", again
            unchanged.append(again)
            # The same machine's next fresh deployment with the same inputs:
            # the entry is in its local tier now.
            shutil.rmtree(root)
            root = new_root(f"m{i}")
            local = finalize("local hit", root, cache, {**env})
            assert local.action == "reused", local
            local_hits.append(local)
            shutil.rmtree(root)
        server_cpu = server.cpu() - server_cpu_start
        compiles: list[Run] = []
        for i in range(args.compile_samples):
            root = new_root(f"c{i}")
            run = finalize("compile", root, work / f"ccache{i}", env)
            assert run.action == "rebuilt", run
            compiles.append(run)
            shutil.rmtree(root)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)

    n = args.machines
    compile_cpu = median(compiles, "cpu")
    each_compiles_cpu = n * compile_cpu
    shared_cpu = build.cpu + sum(r.cpu for r in remote_hits) + server_cpu
    doc = {
        "version": 1,
        "machine": machine_info(),
        "policy": args.policy,
        "machines": n,
        "compile_samples": args.compile_samples,
        "per_machine": {
            name: {"wall_median": round(median(runs, "wall"), 4),
                   "wall_min": round(min(r.wall for r in runs), 4),
                   "wall_max": round(max(r.wall for r in runs), 4),
                   "cpu_median": round(median(runs, "cpu"), 4)}
            for name, runs in (("compile", compiles), ("remote_hit", remote_hits),
                               ("local_hit", local_hits), ("unchanged", unchanged))
        },
        "builder_stage": {"wall": round(build.wall, 4), "cpu": round(build.cpu, 4)},
        "redis_server_cpu": round(server_cpu, 4),
        "total_cpu": {"each_compiles": round(each_compiles_cpu, 3),
                      "shared_tier": round(shared_cpu, 3),
                      "saved": round(each_compiles_cpu - shared_cpu, 3)},
        "runs": [asdict(r) for r in [build, *compiles, *remote_hits, *local_hits, *unchanged]],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fleet.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out / "fleet.md").write_text(render(doc))
    print(render(doc))
    return 0


def render(doc: dict[str, object]) -> str:
    m = doc["machine"]
    per = doc["per_machine"]
    total = doc["total_cpu"]
    assert isinstance(m, dict) and isinstance(per, dict) and isinstance(total, dict)
    rows = [("compile on the machine (`rebuilt`)", per["compile"]),
            ("install from the shared tier (`reused`, remote hit)", per["remote_hit"]),
            ("install from the local tier (`reused`, local hit)", per["local_hit"]),
            ("nothing to do (`unchanged`)", per["unchanged"])]
    lines = [
        "# Fleet benchmark",
        "",
        f"{doc['machines']} machines, {doc['policy']} policy with one boolean and one module; "
        f"each finalize a new process. {m['date']}, {m['cpu']} ({m['cpus']} CPUs, load "
        f"{', '.join(f'{x:.2f}' for x in m['loadavg'])}), kernel {m['kernel']}, Python "
        f"{m['python']}, selcache {m['selcache']}, {m['redis_server'].split(' sha=')[0]} on "
        f"loopback, redis-py {m['redis_py']}.",
        "",
        "| per machine | wall median | wall min-max | CPU median |",
        "|---|---|---|---|",
    ]
    for name, r in rows:
        lines.append(f"| {name} | {r['wall_median']:.3f} s | {r['wall_min']:.3f}-"
                     f"{r['wall_max']:.3f} s | {r['cpu_median']:.3f} s |")
    b = doc["builder_stage"]
    assert isinstance(b, dict)
    lines += [
        "",
        "| fleet total (CPU seconds) | |",
        "|---|---|",
        f"| every machine compiles ({doc['machines']} x median of {doc['compile_samples']} "
        f"measured compiles) | {total['each_compiles']:.1f} |",
        f"| shared tier: builder stage ({b['cpu']:.1f}) + {doc['machines']} remote hits + "
        f"redis-server ({doc['redis_server_cpu']:.2f}) | {total['shared_tier']:.1f} |",
        f"| **saved** | **{total['saved']:.1f}** |",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
