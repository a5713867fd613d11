"""The measured commands: the anchors (semodule, secilc), the reference rows
(python start-up, the floor) and the selcache scenarios.

Each command owns its root (a copy of a pristine sample root) and prepares,
untimed, what its scenario needs before every run: a toggled boolean, a new
module, a staged compile. Only the command itself is timed, as a whole new
process. The selcache scenarios share one cache directory, as a machine has
one; their keys never collide (each scenario changes different inputs).
"""

from __future__ import annotations

import bz2
import json
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selcache import sample
from selcache.inputs import RACY_NS, discover_inputs
from selcache.layout import read_layout

from . import synth
from .env import Install
from .measure import Sample, spawn

#: A stat cache entry is only trusted once the file is older than this (the
#: racy-clean window in selcache.inputs); runs that must see a warm stat cache
#: wait it out after an install.
RACY_SECONDS = RACY_NS / 1e9 + 0.2

#: The reference rows end as the selcache command does (cli.run): with
#: os._exit, without the interpreter's teardown, so that start-up, imports and
#: the floor compare with it part for part.
EXIT = "os._exit(0)"
STAT_SCRIPT = ("import os, sys\n"
               "for p in open(sys.argv[1]).read().split('\\n'):\n"
               "    try: os.stat(p, follow_symlinks=False)\n"
               "    except FileNotFoundError: pass\n"
               f"{EXIT}\n")


class NotAvailable(Exception):
    """The scenario cannot run here (say why, in one line)."""


@dataclass
class Command:
    name: str
    kind: str  # "anchor" | "reference" | "selcache"
    label: str
    warmup: bool = True
    runs: list[Sample] = field(default_factory=list)
    extra: list[dict[str, Any]] = field(default_factory=list)
    unavailable: str | None = None

    def prepare(self) -> None:
        """Once, before any run."""

    def before(self, i: int) -> None:
        """Untimed, before run ``i`` (``-1``: the warm-up run)."""

    def argv(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        raise NotImplementedError

    def after(self, i: int, sample: Sample) -> dict[str, Any]:
        """What the run reported besides its time (selcache's action, timings)."""
        return {}

    def close(self) -> None:
        """Stop anything the command started."""


def copy_root(src: Path, dest: Path) -> Path:
    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    return sample.copy_root(src, dest)


def active(root: Path) -> Path:
    return root / read_layout(str(root)).active


def enabled_cil(root: Path) -> list[tuple[str, bytes]]:
    """The CIL libsemanage compiles: each enabled module's highest priority,
    decompressed, in module-name order (as libsemanage lists them)."""
    modules = active(root) / "modules"
    disabled = {p.name for p in (modules / "disabled").glob("*")}
    best: dict[str, tuple[int, Path]] = {}
    for d in modules.glob("[0-9]*/*"):
        prio = int(d.parent.name)
        if d.name not in disabled and (d.name not in best or prio > best[d.name][0]):
            best[d.name] = (prio, d / "cil")
    out = []
    for name in sorted(best):
        data = best[name][1].read_bytes()
        out.append((name, bz2.decompress(data) if data[:3] == b"BZh" else data))
    return out


def false_booleans(root: Path) -> list[str]:
    """Booleans the policy declares false by default, in name order."""
    found: set[str] = set()
    pattern = re.compile(rb"^\s*\(boolean (\S+) false\)", re.M)
    for _name, text in enabled_cil(root):
        found.update(m.decode() for m in pattern.findall(text))
    return sorted(found)


def set_boolean(root: Path, name: str | None) -> None:
    """booleans.local as an /etc merge leaves it: one hand-set boolean, or none."""
    path = active(root) / "booleans.local"
    if name is None:
        path.unlink(missing_ok=True)
    else:
        path.write_text(f"{name}=1\n")


def add_module(root: Path, name: str, text: str, priority: int = 100) -> None:
    """A module's store files as an image update ships them (bzip2-compressed
    CIL, as libsemanage writes them)."""
    d = active(root) / "modules" / str(priority) / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "cil").write_bytes(bz2.compress(text.encode()))
    (d / "lang_ext").write_text("cil")


def remove_module(root: Path, name: str, priority: int = 100) -> None:
    shutil.rmtree(active(root) / "modules" / str(priority) / name, ignore_errors=True)


# -- anchors ---------------------------------------------------------------------------


class Semodule(Command):
    def __init__(self, name: str, label: str, pristine: Path, work: Path, flag: str,
                 env: dict[str, str], warmup: bool) -> None:
        super().__init__(name, "anchor", label, warmup=warmup)
        self.pristine, self.work, self.flag, self._env = pristine, work, flag, env

    def prepare(self) -> None:
        self.root = copy_root(self.pristine, self.work / "root")
        self.policy_type = read_layout(str(self.root)).policy_type

    def argv(self) -> list[str]:
        # -s: semodule -p takes the store name from the *host's* config.
        return ["semodule", "-N", "-p", str(self.root), "-s", self.policy_type, self.flag]

    def env(self) -> dict[str, str]:
        return self._env


class Secilc(Command):
    """secilc on the store's CIL: the whole-program compile alone, libsemanage's floor."""

    def __init__(self, pristine: Path, work: Path, env: dict[str, str]) -> None:
        super().__init__("secilc", "anchor", "secilc on the store's decompressed CIL",
                         warmup=False)
        self.pristine, self.work, self._env = pristine, work, env
        self.reproduces: bool | None = None

    def prepare(self) -> None:
        cil = self.work / "cil"
        shutil.rmtree(cil, ignore_errors=True)
        cil.mkdir(parents=True)
        self.files = []
        for name, text in enabled_cil(self.pristine):
            (cil / f"{name}.cil").write_bytes(text)
            self.files.append(str(cil / f"{name}.cil"))
        self.out = self.work / "policy.out"

    def argv(self) -> list[str]:
        return ["secilc", "-o", str(self.out), "-f", str(self.work / "file_contexts.out"),
                *self.files]

    def env(self) -> dict[str, str]:
        return self._env

    def after(self, i: int, sample: Sample) -> dict[str, Any]:
        if self.reproduces is None:
            linked = active(self.pristine) / "policy.linked"
            self.reproduces = self.out.read_bytes() == linked.read_bytes()
        return {}


# -- reference rows ----------------------------------------------------------------------


class Python(Command):
    def __init__(self, name: str, label: str, install: Install, code: str,
                 args: Callable[[], list[str]] = list) -> None:
        super().__init__(name, "reference", label)
        self.install, self.code, self.args = install, code, args

    def argv(self) -> list[str]:
        return [self.install.python, "-c", self.code, *self.args()]

    def env(self) -> dict[str, str]:
        return self.install.env


class Floor(Python):
    """python start-up plus an lstat of every path selcache's discovery looks
    at: what no implementation in python can go below on the hit path."""

    def __init__(self, install: Install, root_of: Callable[[], Path], work: Path) -> None:
        super().__init__("floor", "python start-up + stat of every input", install, STAT_SCRIPT,
                         lambda: [str(self.list)])
        self.root_of, self.list = root_of, work / "inputs.txt"

    def prepare(self) -> None:
        input_list(self.root_of(), self.list)


def input_list(root: Path, dest: Path) -> Path:
    """Every path selcache's discovery looks at, for the floor: stat them all."""
    layout = read_layout(str(root))
    paths = []
    for f in discover_inputs(layout).files:
        if f.rel.startswith("host:"):
            paths.append(f.rel[len("host:"):])
        elif not f.rel.startswith("selcache:"):
            paths.append(f"{layout.root}/{f.rel}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text("\n".join(paths) + "\n")
    return dest


# -- selcache ------------------------------------------------------------------------------


class Selcache(Command):
    """``selcache finalize --json`` (or another subcommand) on a root of its own."""

    expect: str | None = None

    def __init__(self, name: str, label: str, install: Install, pristine: Path, work: Path,
                 cache: Path, *, subcommand: str = "finalize", warmup: bool = True) -> None:
        super().__init__(name, "selcache", label, warmup=warmup)
        self.install, self.pristine, self.work, self.cache = install, pristine, work, cache
        self.subcommand = subcommand

    def prepare(self) -> None:
        self.root = copy_root(self.pristine, self.work / "root")

    def selcache(self, *args: str, check: bool = True) -> dict[str, Any]:
        """An untimed selcache command (set-up); returns its JSON."""
        done = spawn([*self.install.command, *args, "--root", str(self.root), "--cache-dir",
                      str(self.cache), "--json"], env=self.install.env, check=check)
        doc: dict[str, Any] = json.loads(done.stdout)
        return doc

    def argv(self) -> list[str]:
        return [*self.install.command, self.subcommand, "--root", str(self.root), "--cache-dir",
                str(self.cache), "--json"]

    def env(self) -> dict[str, str]:
        return self.install.env

    def after(self, i: int, sample: Sample) -> dict[str, Any]:
        doc = json.loads(sample.stdout)
        if self.subcommand == "status":
            return {"action": doc["predicted_action"]}
        return {"action": doc["action"], "seconds": doc["seconds"],
                "timings": doc.get("timings", {}), "written": len(doc.get("written", []))}


def wait_racy() -> None:
    time.sleep(RACY_SECONDS)


class Unchanged(Selcache):
    """Nothing changed since the last finalize."""

    expect = "unchanged"

    def prepare(self) -> None:
        super().prepare()
        self.selcache("finalize")
        wait_racy()
        self.selcache("finalize")  # fills the stat cache once the files are old enough


class UnchangedNewInodes(Unchanged):
    """Nothing changed, but every file is a new inode, as in a fresh ostree
    deployment whose /etc (and the store in it) was copied by the 3-way merge:
    the stat cache cannot help, every input is read and hashed."""

    def before(self, i: int) -> None:
        fresh = self.root.with_name("root.next")
        if fresh.exists():
            shutil.rmtree(fresh)
        subprocess.run(["cp", "-a", f"{self.root}/.", str(fresh)], check=True)
        shutil.rmtree(self.root)
        fresh.rename(self.root)


class Status(Unchanged):
    expect = "unchanged"


class Reused(Selcache):
    """Inputs seen before: a boolean set and unset by turns, both states cached."""

    expect = "reused"
    boolean = "httpd_can_network_connect"

    def prepare(self) -> None:
        super().prepare()
        self.selcache("finalize")
        set_boolean(self.root, self.boolean)
        self.selcache("finalize")
        self.state = True

    def before(self, i: int) -> None:
        self.state = not self.state
        set_boolean(self.root, self.boolean if self.state else None)


class BooleanFirst(Selcache):
    """A boolean-only change never seen before: a different boolean each run."""

    expect = "relinked"

    def __init__(self, *args: Any, booleans: list[str], **kwargs: Any) -> None:
        super().__init__(*args, warmup=False, **kwargs)
        self.booleans = booleans

    def before(self, i: int) -> None:
        set_boolean(self.root, self.booleans[i])


class ModuleFirst(Selcache):
    """A module never seen before: a new synthetic module each run (the
    previous run's one removed, so the store does not grow)."""

    expect = "rebuilt"
    prefix = "bnew"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, warmup=False, **kwargs)
        self.previous: str | None = None

    def before(self, i: int) -> None:
        if self.previous:
            remove_module(self.root, self.previous)
        self.previous = synth.module_name(i, self.prefix)
        add_module(self.root, self.previous, synth.module_cil(i, self.prefix))


class Staged(Selcache):
    """finalize right after ``selcache stage`` compiled the new inputs ahead
    (what an update's staging step would do)."""

    expect = "reused"

    def __init__(self, *args: Any, booleans: list[str], **kwargs: Any) -> None:
        super().__init__(*args, warmup=False, **kwargs)
        self.booleans = booleans

    def before(self, i: int) -> None:
        set_boolean(self.root, self.booleans[i])
        staged = self.selcache("stage")
        if staged["action"] != "compiled":
            raise RuntimeError(f"stage did {staged['action']!r}, expected a compile")


class Precompiled(Selcache):
    """finalize right after the watcher compiled the change in the background:
    ``selcache watch`` runs beside the root, a new module appears, and finalize
    is timed once ``status`` says the cache holds the new key."""

    expect = "reused"
    prefix = "bpre"
    timeout = 900.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, warmup=False, **kwargs)
        self.watcher: subprocess.Popen[bytes] | None = None
        self.previous: str | None = None
        self.waited: list[float] = []

    def prepare(self) -> None:
        probe = spawn([*self.install.command, "watch", "--help"], env=self.install.env,
                      check=False)
        if probe.returncode != 0:
            raise NotAvailable("n/a: needs `selcache watch`")
        super().prepare()
        self.selcache("finalize")
        self.log = open(self.work / "watch.log", "wb")  # noqa: SIM115 - closed in close()
        self.watcher = subprocess.Popen(
            [*self.install.command, "watch", "--root", str(self.root), "--cache-dir",
             str(self.cache)], stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log,
            env=self.install.env)

    def before(self, i: int) -> None:
        assert self.watcher is not None
        if self.previous:
            remove_module(self.root, self.previous)
        self.previous = synth.module_name(i, self.prefix)
        add_module(self.root, self.previous, synth.module_cil(i, self.prefix))
        start = time.monotonic()
        while True:
            if self.watcher.poll() is not None:
                raise RuntimeError(f"selcache watch exited with {self.watcher.returncode}; "
                                   f"see {self.work / 'watch.log'}")
            status = self.selcache("status")
            if status["predicted_action"] in ("reused", "unchanged"):
                break
            if time.monotonic() - start > self.timeout:
                raise RuntimeError(f"selcache watch did not precompile within {self.timeout:.0f}s")
            time.sleep(0.5)
        self.waited.append(time.monotonic() - start)

    def close(self) -> None:
        if self.watcher is not None and self.watcher.poll() is None:
            self.watcher.terminate()
            try:
                self.watcher.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.watcher.kill()
                self.watcher.wait()
        if self.watcher is not None:
            self.log.close()
