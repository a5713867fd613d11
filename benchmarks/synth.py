"""Synthetic policy modules and scaled stores for the scaling benchmark.

Each synthetic module is a valid, independent CIL module shaped like a typical
refpolicy daemon module (the median Debian module is ~30 KB of CIL with 4-6
types, ~60 attribute memberships, ~120 allow/dontaudit rules and ~5 file
contexts): its own domain, exec, config, data, log and runtime types, its own
attribute, a boolean with a conditional block, type transitions, allow rules
on its own types and on a seeded random pick of the base policy's types, and
file contexts under its own paths. Modules differ in their counts and picks
(seeded by their index), so a store of N modules holds N different modules,
never N copies of one file.

Scaled stores are copies of the sample refpolicy root with extra synthetic
modules installed by ``semodule -i`` (through selcache's sandbox, so the root's
own accounts are used). They are built once under ``.cache/bench/`` and copied
for each benchmark; a 10x store takes minutes to build.
"""

from __future__ import annotations

import fcntl
import os
import random
import shutil
from pathlib import Path

from selcache import sample

#: Bump when the generator changes: stores built by another version are rebuilt.
GENERATOR_VERSION = 1

#: Base policy types the synthetic domains read (all declared in refpolicy's base).
BASE_TYPES = ("etc_t", "bin_t", "usr_t", "lib_t", "var_t", "var_lib_t", "var_log_t", "var_run_t",
              "tmp_t", "tmpfs_t", "proc_t", "sysfs_t", "device_t", "devpts_t", "devlog_t",
              "etc_runtime_t", "fs_t", "null_device_t", "urandom_device_t", "shell_exec_t",
              "user_home_dir_t")
#: Domains that start the synthetic daemons.
STARTERS = ("initrc_t", "init_t")
#: Base attributes a daemon's types join, as refpolicy's interfaces make them.
FILE_ATTRS = ("file_type", "non_security_file_type", "non_auth_file_type")

READ = {
    "file": ("read", "getattr", "open", "ioctl", "lock", "map"),
    "dir": ("getattr", "search", "open", "read"),
    "lnk_file": ("read", "getattr"),
    "chr_file": ("read", "getattr", "open", "ioctl"),
    "sock_file": ("write", "getattr"),
}
MANAGE = {
    "file": ("create", "read", "write", "getattr", "setattr", "open", "append", "unlink",
             "rename", "lock", "ioctl"),
    "dir": ("create", "read", "write", "getattr", "setattr", "search", "open", "add_name",
            "remove_name", "rmdir", "rename"),
    "lnk_file": ("create", "read", "getattr", "unlink", "rename"),
}
SELF = [
    ("process", ("fork", "sigchld", "signal", "signull", "getsched", "setsched", "setrlimit",
                 "getcap", "setcap")),
    ("capability", ("chown", "dac_override", "setuid", "setgid", "kill", "fowner", "fsetid",
                    "net_bind_service", "sys_resource")),
    ("unix_dgram_socket", ("create", "connect", "write", "read", "getattr", "setopt")),
    ("unix_stream_socket", ("create", "connect", "write", "read", "getattr", "listen", "accept")),
    ("tcp_socket", ("create", "connect", "write", "read", "getattr", "setopt", "bind")),
    ("udp_socket", ("create", "connect", "write", "read", "getattr", "bind")),
    ("fifo_file", ("read", "write", "getattr", "open", "ioctl")),
]


def _level() -> str:
    return "((s0) (s0))"


def _reads(rng: random.Random, domain: str, target: str) -> list[str]:
    rules = []
    for cls in sorted(rng.sample(sorted(READ), rng.randint(2, len(READ)))):
        perms = sorted(rng.sample(READ[cls], rng.randint(1, len(READ[cls]))))
        rules.append(f"(allow {domain} {target} ({cls} ({' '.join(perms)})))")
    return rules


def module_name(index: int, prefix: str = "bsyn") -> str:
    return f"{prefix}{index:05d}"


def module_cil(index: int, prefix: str = "bsyn") -> str:
    """The CIL text of synthetic module ``index`` (deterministic)."""
    rng = random.Random(f"{prefix}-{index}")
    p = module_name(index, prefix)
    d, exe = f"{p}_t", f"{p}_exec_t"
    files = [f"{p}_conf_t", f"{p}_data_t", f"{p}_log_t"]
    files += [f"{p}_{kind}_t" for kind in rng.sample(["runtime", "cache", "spool", "tmp"],
                                                      rng.randint(1, 3))]
    out: list[str] = [f";; synthetic benchmark module {p} (generator v{GENERATOR_VERSION})"]
    add = out.append
    add(f"(type {d})")
    add(f"(roletype system_r {d})")
    for t in [exe, *files]:
        add(f"(type {t})")
        add(f"(roletype object_r {t})")
    add(f"(typeattribute {p}_file_type)")
    add(f"(typeattributeset {p}_file_type ({' '.join(files)}))")
    for attr in ("domain", "daemon", "systemprocess", "nsswitch_domain"):
        add(f"(typeattributeset {attr} ({d}))")
    for attr in FILE_ATTRS:
        add(f"(typeattributeset {attr} ({exe} {' '.join(files)}))")
    for attr in ("exec_type", "entry_type", "application_exec_type"):
        add(f"(typeattributeset {attr} ({exe}))")
    add(f"(typeattributeset logfile ({p}_log_t))")
    add(f"(typeattributeset configfile ({p}_conf_t))")
    for starter in STARTERS:
        add(f"(allow {starter} {exe} (file (read getattr open map execute)))")
        add(f"(allow {starter} {d} (process (transition signal sigchld sigkill)))")
        add(f"(typetransition {starter} {exe} process {d})")
        add(f"(dontaudit {starter} {d} (process (noatsecure siginh rlimitinh)))")
    add(f"(allow {d} {exe} (file (read getattr map execute entrypoint open)))")
    add(f"(allow {d} {p}_file_type (dir (getattr search open read)))")
    add(f"(allow {d} {p}_conf_t (file ({' '.join(READ['file'])})))")
    for t in files[1:]:
        for cls, perms in MANAGE.items():
            add(f"(allow {d} {t} ({cls} ({' '.join(perms)})))")
    add(f"(typetransition {d} var_log_t file {p}_log_t)")
    add(f"(typetransition {d} var_lib_t dir {p}_data_t)")
    for cls, perms in SELF:
        picked = sorted(rng.sample(perms, rng.randint(2, len(perms))))
        add(f"(allow {d} self ({cls} ({' '.join(picked)})))")
    # What refpolicy's interfaces expand to once converted from HLL: a
    # requirement line per base type used, then reads of it, some of them
    # inside optional blocks.
    used = rng.sample(BASE_TYPES, rng.randint(10, len(BASE_TYPES)))
    for t in used:
        add(f"(typeattributeset cil_gen_require {t})")
    for t in used:
        for rule in _reads(rng, d, t):
            add(rule)
    for n in range(rng.randint(2, 5)):
        add(f"(optional {p}_optional_{n}")
        for t in rng.sample(BASE_TYPES, rng.randint(2, 5)):
            add(f"    (typeattributeset cil_gen_require {t})")
            for rule in _reads(rng, d, t):
                add(f"    {rule}")
        add(")")
    for t in rng.sample(BASE_TYPES, rng.randint(3, 8)):
        add(f"(dontaudit {d} {t} (dir (getattr search)))")
    add(f"(boolean {p}_manage_home false)")
    add(f"(booleanif ({p}_manage_home)")
    add("    (true")
    for cls, perms in MANAGE.items():
        add(f"        (allow {d} user_home_dir_t ({cls} ({' '.join(perms)})))")
    add("    )")
    add(")")
    add(f'(filecon "/usr/sbin/{p}" file (system_u object_r {exe} {_level()}))')
    add(f'(filecon "/etc/{p}(/.*)?" any (system_u object_r {p}_conf_t {_level()}))')
    add(f'(filecon "/var/lib/{p}(/.*)?" any (system_u object_r {p}_data_t {_level()}))')
    add(f'(filecon "/var/log/{p}(/.*)?" any (system_u object_r {p}_log_t {_level()}))')
    for t in files[3:]:
        kind = t[len(p) + 1:-2]
        add(f'(filecon "/var/{kind}/{p}(/.*)?" any (system_u object_r {t} {_level()}))')
    return "\n".join(out) + "\n"


def write_modules(dest: Path, first: int, count: int, prefix: str = "bsyn") -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(first, first + count):
        path = dest / f"{module_name(i, prefix)}.cil"
        path.write_text(module_cil(i, prefix))
        paths.append(path)
    return paths


def bench_dir() -> Path:
    return Path(os.environ.get("SELCACHE_BENCH_DIR") or sample.REPO / ".cache" / "bench")


def refpolicy_module_count(root: Path) -> int:
    """Module names in the root's store (enabled or not), as `semodule -l` counts them."""
    active = root / "var/lib/selinux/default/active/modules"
    return len({p.name for p in active.glob("[0-9]*/*")})


def scaled_root(factor: int) -> Path:
    """A pristine refpolicy root with ``factor`` times its module count (factor 1:
    the sample root itself). Built once, then reused: copy it, never modify it."""
    base = sample.pristine_root("refpolicy")
    if factor == 1:
        return base
    cache = bench_dir()
    done = cache / f"store-{factor}x-v{GENERATOR_VERSION}"
    if (done / ".complete").exists():
        return done
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f".store-{factor}x.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (done / ".complete").exists():
            return done
        tmp = cache / f"store-{factor}x.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        sample.copy_root(base, tmp)
        extra = refpolicy_module_count(base) * (factor - 1)
        mods = write_modules(cache / f"modules-v{GENERATOR_VERSION}", 0, extra)
        args = ["-X", "100"]
        for m in mods:
            args += ["-i", f"/selcache-files/{m.name}"]
        sample.apply_semodule(tmp, args, mods)
        (tmp / ".complete").write_text("")
        shutil.rmtree(done, ignore_errors=True)
        os.rename(tmp, done)
    return done
