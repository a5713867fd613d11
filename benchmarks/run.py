"""Run the benchmark suite and write benchmarks/results/latest.{json,md,png}.

    python -m benchmarks [--runs N] [--scaling-runs N] [--no-scaling] [--factors 1,3,10]

Each round runs every command once, anchors and scenarios interleaved (A B A B
...), so a change in the machine's load hits them alike. Medians and min-max
are over the rounds; one untimed warm-up run precedes them for the fast
commands (page cache, bytecode).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from selcache import sample
from selcache.inputs import discover_inputs
from selcache.layout import read_layout

from . import commands as c
from . import env, measure, report, synth
from .measure import spawn, summarize


def _log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def main_commands(pristine: Path, work: Path, install: env.Install, dev: env.Install,
                  flag: str, runs: int) -> list[c.Command]:
    cache = work / "cache"
    booleans = c.false_booleans(pristine)
    booleans = [b for b in booleans if b != c.Reused.boolean]
    if len(booleans) < 2 * runs:
        raise RuntimeError(f"the policy has {len(booleans)} false booleans; {2 * runs} needed")

    def sc(cls: type[c.Selcache], name: str, label: str, **kw: Any) -> c.Selcache:
        return cls(name, label, kw.pop("install", install), pristine, work / name, cache, **kw)

    unchanged = sc(c.Unchanged, "unchanged", "finalize, nothing changed")
    return [
        c.Semodule("semodule-B", "semodule -N -B (full rebuild)", pristine, work / "semodule-B",
                   "-B", env.CHILD_ENV, warmup=False),
        unchanged,
        c.Semodule("semodule-refresh", f"semodule -N {flag} (what ostree runs)", pristine,
                   work / "semodule-refresh", flag, env.CHILD_ENV, warmup=True),
        sc(c.Reused, "reused", "finalize, inputs seen before"),
        c.Secilc(pristine, work / "secilc", env.CHILD_ENV),
        sc(c.BooleanFirst, "boolean-first", "finalize, a boolean changed, first time",
           booleans=booleans[:runs]),
        c.Python("python", "python start-up (the same interpreter, nothing imported)", install,
                 f"import os; {c.EXIT}"),
        sc(c.ModuleFirst, "module-first", "finalize, a new module, first time"),
        c.Floor(install, lambda: unchanged.root, work / "floor"),
        sc(c.Staged, "staged", "finalize right after `selcache stage`",
           booleans=booleans[-runs:]),
        c.Python("imports", "python start-up + import selcache.cli", install,
                 f"import os, selcache.cli; {c.EXIT}"),
        sc(c.Status, "status", "status --json", subcommand="status"),
        sc(c.Precompiled, "precompiled", "finalize right after the watcher's precompile"),
        sc(c.UnchangedNewInodes, "unchanged-new-inodes",
           "finalize, nothing changed, every file a new inode (fresh deployment)"),
        sc(c.Unchanged, "unchanged-dev-venv",
           "finalize, nothing changed, from the editable development install", install=dev),
    ]


def scaling_commands(root: Path, work: Path, install: env.Install, flag: str) -> list[c.Command]:
    cache = work / "cache"
    unchanged = c.Unchanged("unchanged", "finalize, nothing changed", install, root,
                            work / "unchanged", cache)
    return [
        c.Semodule("semodule-B", "semodule -N -B", root, work / "semodule-B", "-B",
                   env.CHILD_ENV, warmup=False),
        unchanged,
        c.Floor(install, lambda: unchanged.root, work / "floor"),
        c.Semodule("semodule-refresh", f"semodule -N {flag}", root, work / "semodule-refresh",
                   flag, env.CHILD_ENV, warmup=True),
        c.Reused("reused", "finalize, inputs seen before", install, root, work / "reused", cache),
        c.ModuleFirst("module-first", "finalize, a new module, first time", install, root,
                      work / "module-first", cache),
    ]


def run_rounds(cmds: Sequence[c.Command], runs: int) -> None:
    """Prepare every command, warm the fast ones up, then ``runs`` rounds of
    one run each. Commands started in the background are stopped at the end."""
    try:
        live: list[c.Command] = []
        for cmd in cmds:
            _log(f"preparing {cmd.name}")
            try:
                cmd.prepare()
            except c.NotAvailable as exc:
                cmd.unavailable = str(exc)
                _log(f"  {cmd.name}: {exc}")
                continue
            live.append(cmd)
        for cmd in live:
            if cmd.warmup:
                cmd.before(-1)
                spawn(cmd.argv(), env=cmd.env())
        for i in range(runs):
            for cmd in live:
                cmd.before(i)
                s = spawn(cmd.argv(), env=cmd.env())
                cmd.runs.append(s)
                cmd.extra.append(cmd.after(i, s))
            _log(f"round {i + 1}/{runs}: " + ", ".join(
                f"{cmd.name} {cmd.runs[-1].wall:.3f}s" for cmd in live))
    finally:
        for cmd in cmds:
            cmd.close()


def command_doc(cmd: c.Command) -> dict[str, Any]:
    doc: dict[str, Any] = {"kind": cmd.kind, "label": cmd.label}
    if cmd.unavailable:
        doc["unavailable"] = cmd.unavailable
        return doc
    doc.update(summarize(cmd.runs))
    doc["runs"] = [{"wall_s": round(s.wall, 4), "cpu_s": round(s.cpu, 4),
                    "rss_mib": round(s.rss_kib / 1024, 1), **extra}
                   for s, extra in zip(cmd.runs, cmd.extra)]
    actions = [e["action"] for e in cmd.extra if "action" in e]
    if actions:
        doc["actions"] = {a: actions.count(a) for a in sorted(set(actions))}
        doc["expected_action"] = getattr(cmd, "expect", None)
    timings = [e["timings"] for e in cmd.extra if e.get("timings")]
    if timings:
        phases = sorted({k for t in timings for k in t})
        doc["timings_ms"] = {k: round(1000 * statistics.median(t.get(k, 0.0) for t in timings), 2)
                             for k in phases}
        doc["seconds_median"] = round(statistics.median(e["seconds"] for e in cmd.extra), 4)
    if isinstance(cmd, c.Secilc):
        doc["reproduces_policy_linked"] = cmd.reproduces
    if isinstance(cmd, c.Precompiled) and cmd.waited:
        doc["precompile_wait_s"] = round(statistics.median(cmd.waited), 2)
    return doc


def importtime(install: env.Install, root: Path, cache: Path) -> list[dict[str, Any]]:
    """Where the imports of one unchanged finalize go (-X importtime, which
    itself inflates the figures): self time summed per top-level package."""
    done = spawn([install.python, "-X", "importtime", *install.command[-1:], "finalize", "--root",
                  str(root), "--cache-dir", str(cache), "--json"], env=install.env)
    per: dict[str, int] = {}
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, _cumulative, name = line[len("import time:"):].split("|")
        top = name.strip().split(".")[0]
        if name.strip().startswith("selcache."):
            top = name.strip()
        per[top] = per.get(top, 0) + int(self_us)
    ranked = sorted(per.items(), key=lambda kv: -kv[1])
    return [{"module": k, "self_ms": round(v / 1000, 2)} for k, v in ranked]


def discovery_profile(root: Path, repeat: int = 3) -> dict[str, Any]:
    """Discovery alone, in this process (no start-up, no imports): with an empty
    stat cache (every input read and hashed, as on a fresh deployment) and with
    a full one (only a walk and an lstat per input). Best of ``repeat``."""
    layout = read_layout(str(root))
    cold, warm = [], []
    for _ in range(repeat):
        t = time.perf_counter()
        inputs = discover_inputs(layout, None)
        cold.append(time.perf_counter() - t)
        t = time.perf_counter()
        warmed = discover_inputs(layout, inputs.stat_cache)
        warm.append(time.perf_counter() - t)
    return {"inputs": len(inputs.files), "hashed_cold": inputs.hashed,
            "hashed_warm": warmed.hashed, "cold_ms": round(min(cold) * 1000, 1),
            "warm_ms": round(min(warm) * 1000, 1),
            "hash_ms": round((min(cold) - min(warm)) * 1000, 1)}


def policy_facts(root: Path) -> dict[str, Any]:
    layout = read_layout(str(root))
    modules = root / layout.active / "modules"
    names = {p.name for p in modules.glob("[0-9]*/*")}
    disabled = {p.name for p in (modules / "disabled").glob("*")}
    inputs = discover_inputs(layout).files
    return {"modules": len(names), "enabled": len(names - disabled), "inputs": len(inputs),
            "store_files": sum(1 for f in inputs if f.rel.startswith(layout.active + "/"))}


def write_report(doc: dict[str, Any], out: Path, *, readme: bool) -> None:
    report.analyse(doc)
    (out / "latest.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    (out / "latest.md").write_text(report.markdown(doc))
    report.plot(doc, out / "latest.png")
    if readme:
        report.update_readme(env.REPO / "README.md", doc)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    finally:
        measure.close()


def _main(argv: Sequence[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="timed runs per command (default 5)")
    parser.add_argument("--scaling-runs", type=int, default=None,
                        help="timed runs per command in the scaling part (default: --runs)")
    parser.add_argument("--no-scaling", action="store_true", help="skip the 3x and 10x stores")
    parser.add_argument("--factors", default="1,3,10", help="store sizes, in multiples of the "
                        "refpolicy's module count (default 1,3,10)")
    parser.add_argument("--out", default=str(env.REPO / "benchmarks/results"),
                        help="where latest.{json,md,png} go")
    parser.add_argument("--no-readme", action="store_true",
                        help="do not update the table in README.md")
    parser.add_argument("--keep-work", action="store_true", help="keep the roots and caches")
    parser.add_argument("--report-only", action="store_true",
                        help="measure nothing: rewrite latest.md, latest.png and the README's "
                             "table from latest.json")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.report_only:
        stored: dict[str, Any] = json.loads((out / "latest.json").read_text())
        write_report(stored, out, readme=not args.no_readme)
        return 0
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    scaling_runs = args.scaling_runs or args.runs
    factors = [int(f) for f in args.factors.split(",")]

    started = time.monotonic()
    load_before = env.loadavg()
    _log("installing selcache from this checkout into the benchmark venv")
    install = env.bench_venv()
    dev = env.dev_venv()
    flag = env.refresh_flag()
    work = synth.bench_dir() / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    pristine = sample.pristine_root("refpolicy")
    cmds = main_commands(pristine, work / "main", install, dev, flag, args.runs)
    run_rounds(cmds, args.runs)
    unchanged = next(x for x in cmds if x.name == "unchanged")
    assert isinstance(unchanged, c.Selcache)
    imports = importtime(install, unchanged.root, unchanged.cache)
    discovery = {"1": discovery_profile(unchanged.root)}

    scaling: dict[str, Any] = {"factors": [], "runs": scaling_runs, "commands": {}}
    if not args.no_scaling:
        for factor in factors:
            _log(f"scaling: {factor}x store")
            root = synth.scaled_root(factor)
            facts = policy_facts(root)
            if factor == 1:
                scmds = [x for x in cmds if x.name in ("semodule-B", "unchanged", "floor",
                                                       "semodule-refresh", "reused", "module-first")]
                runs_here = args.runs
            else:
                scmds = scaling_commands(root, work / f"scale-{factor}x", install, flag)
                run_rounds(scmds, scaling_runs)
                scaled = next(x for x in scmds if x.name == "unchanged")
                assert isinstance(scaled, c.Selcache)
                discovery[str(factor)] = discovery_profile(scaled.root)
                runs_here = scaling_runs
            scaling["factors"].append({"factor": factor, "runs": runs_here, **facts})
            for cmd in scmds:
                scaling["commands"].setdefault(cmd.name, {})[str(factor)] = command_doc(cmd)

    doc: dict[str, Any] = {
        "version": 1,
        "date": env.now(),
        "machine": env.machine(),
        "load": {"before": load_before, "after": env.loadavg()},
        "versions": env.versions(install),
        "settings": {"runs": args.runs, "install": install.name,
                     "selcache": " ".join(install.command), "refresh_flag": flag,
                     "child_env": sorted(install.env), "duration_s": 0.0},
        "policy": policy_facts(pristine),
        "commands": {cmd.name: command_doc(cmd) for cmd in cmds},
        "importtime": imports,
        "discovery": discovery,
        "scaling": scaling,
    }
    doc["settings"]["duration_s"] = round(time.monotonic() - started, 1)
    out.mkdir(parents=True, exist_ok=True)
    write_report(doc, out, readme=not args.no_readme)
    if not args.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    _log(f"wrote {out}/latest.json, latest.md, latest.png in {doc['settings']['duration_s']:.0f}s")
    return 0
