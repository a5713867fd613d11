"""Discover every input of a root that can change the compiled policy, and
digest it per component.

Components: ``config`` (etc/selinux/config, semanage.conf), ``module:NAME`` (all
priorities of a module plus its disabled marker), one component per kind of
local customization (``booleans``, ``ports``, ``fcontext-local``, ...),
``accounts`` (what genhomedircon reads), ``toolchain`` (the binaries that
compile) and ``store-other`` (any file in the store selcache does not know: it
still counts, so an unknown input can only cost a recompile).

Content decides, never events or mtimes: every semodule commit rewrites every
store file with new inodes and mtimes. The stat cache only avoids re-reading a
file whose (dev, inode, size, mtime_ns, ctime_ns) all match what was hashed;
ostree gives files mtime 0, so mtime alone is never trusted.
"""

from __future__ import annotations

import hashlib
import os
import stat
import sysconfig
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from . import fsutil
from .errors import InvalidRoot
from .layout import CONFIG_REL, SEMANAGE_CONF_REL, Layout

MISSING = "missing"
DIRECTORY = "directory"

#: Store files that ``semodule -B`` computes. They are outputs, never inputs.
STORE_OUTPUTS = frozenset({
    "policy.kern", "policy.linked", "seusers", "seusers.linked", "users_extra",
    "users_extra.linked", "file_contexts", "file_contexts.homedirs", "homedir_template",
    "modules_checksum", "commit_num", "file_contexts.template",
})

#: Local customization files in the store, by component. Missing ones are
#: recorded as missing: removing a file is a change too.
LOCAL_FILES: dict[str, str] = {
    "booleans.local": "booleans",
    "ports.local": "ports",
    "interfaces.local": "interfaces",
    "nodes.local": "nodes",
    "users.local": "users",
    "users_extra.local": "users",
    "seusers.local": "seusers",
    "file_contexts.local": "fcontext-local",
    "ibpkeys.local": "ibpkeys",
    "pkeys.local": "ibpkeys",
    "ibendports.local": "ibendports",
    "disable_dontaudit": "dontaudit",
    "preserve_tunables": "tunables",
}

#: What libsemanage's genhomedircon reads, unprefixed, through getpwent and
#: friends (libsemanage/src/genhomedircon.c). ``export/home`` counts by existence.
ACCOUNT_FILES = ("etc/passwd", "etc/group", "etc/login.defs", "etc/default/useradd",
                 "etc/libuser.conf", "etc/shells")
ACCOUNT_DIRS = ("export/home",)

KEY_FORMAT = "selcache-key-v1"

#: A stat cache entry: dev, ino, size, mtime_ns, ctime_ns, sha256.
StatEntry = tuple[int, int, int, int, int, str]

#: Entries changed within this window of the hash are not cached: a write in
#: the same timestamp tick would leave the stat unchanged (git's "racy clean").
RACY_NS = 2_000_000_000


def _stat_sig(st: os.stat_result) -> tuple[int, int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass(frozen=True)
class InputFile:
    rel: str
    component: str
    digest: str  # sha256 hex, or MISSING / DIRECTORY


@dataclass(frozen=True)
class Inputs:
    """Every input of one root, with per-component digests."""

    layout: Layout
    files: tuple[InputFile, ...]
    components: Mapping[str, str]
    stat_cache: Mapping[str, StatEntry] = field(compare=False, repr=False)
    hashed: int = field(default=0, compare=False)

    def by_component(self) -> dict[str, list[InputFile]]:
        out: dict[str, list[InputFile]] = {}
        for f in self.files:
            out.setdefault(f.component, []).append(f)
        return out


class Hasher:
    """Hashes files, reusing stat-cache entries whose signature matches."""

    def __init__(self, old: Mapping[str, StatEntry] | None) -> None:
        self.old = old or {}
        self.new: dict[str, StatEntry] = {}
        self.hashed = 0
        self.now_ns = time.time_ns()

    def digest(self, key: str, st: os.stat_result, read: object) -> str:
        sig = _stat_sig(st)
        cached = self.old.get(key)
        if cached is not None and tuple(cached[:5]) == sig:
            digest = cached[5]
        else:
            data = read()  # type: ignore[operator]
            digest = hashlib.sha256(data).hexdigest()
            self.hashed += 1
            if len(data) != st.st_size:
                return digest  # changed while we read it: never cache
        if max(st.st_mtime_ns, st.st_ctime_ns) < self.now_ns - RACY_NS:
            self.new[key] = (*sig, digest)
        return digest


def module_component(rel: str) -> str:
    """Component of a path below active/modules/: ``module:NAME``."""
    parts = rel.split("/")
    # modules/<priority>/<name>/<file> or modules/disabled/<name>
    if len(parts) >= 3 and parts[1] == "disabled":
        return f"module:{parts[2]}"
    if len(parts) >= 4 and parts[1].isdigit():
        return f"module:{parts[2]}"
    return "store-other"


def store_component(rel: str) -> str | None:
    """Component of a path inside the store's ``active/``; None for an output."""
    if rel in STORE_OUTPUTS:
        return None
    if rel.startswith("modules/"):
        return module_component(rel)
    return LOCAL_FILES.get(rel, "store-other")


def single_file_inputs(layout: Layout) -> dict[str, str]:
    """Root-relative path -> component, for every input that is one file at a
    fixed place: re-hashing that file alone gives its new digest. Everything
    else (modules, unknown store files) needs a walk of the store."""
    out = {CONFIG_REL: "config", SEMANAGE_CONF_REL: "config"}
    out.update({f"{layout.active}/{name}": comp for name, comp in LOCAL_FILES.items()})
    out.update({rel: "accounts" for rel in ACCOUNT_FILES})
    return out


def classify(layout: Layout, rel: str) -> str | None:
    """The component a root-relative path belongs to, or None if it is not an
    input (an output, libsemanage's tmp/ and previous/, anything else)."""
    fixed = single_file_inputs(layout).get(rel)
    if fixed is not None:
        return fixed
    if rel in ACCOUNT_DIRS:
        return "accounts"
    prefix = layout.active + "/"
    if rel.startswith(prefix):
        return store_component(rel[len(prefix):])
    return None


def refresh_file(layout: Layout, rel: str, hasher: Hasher) -> InputFile:
    """Re-digest one fixed-place input, exactly as ``discover_inputs`` would."""
    component = single_file_inputs(layout)[rel]
    with fsutil.opened_root(layout.root) as rfd:
        return _root_file(rfd, rel, component, hasher)


def _store_inputs(rfd: int, layout: Layout, hasher: Hasher) -> list[InputFile]:
    files: list[InputFile] = []
    seen_locals: set[str] = set()
    with fsutil.opened_dir(rfd, layout.active) as afd:
        for entry in fsutil.walk_files(afd):
            rel = entry.rel
            component = store_component(rel)
            if component is None:
                continue
            if rel in LOCAL_FILES:
                seen_locals.add(rel)
            full = f"{layout.active}/{rel}"

            def read(rel: str = rel) -> bytes:
                parent, _, name = rel.rpartition("/")
                with fsutil.opened_dir(afd, parent) as dfd:
                    return fsutil.read_at(dfd, name, what=f"{layout.active}/{rel}")

            files.append(InputFile(full, component, hasher.digest(full, entry.st, read)))
    for name, component in LOCAL_FILES.items():
        if name not in seen_locals:
            files.append(InputFile(f"{layout.active}/{name}", component, MISSING))
    return files


def _root_file(rfd: int, rel: str, component: str, hasher: Hasher) -> InputFile:
    st = fsutil.lstat_rel(rfd, rel)
    if st is None:
        return InputFile(rel, component, MISSING)
    if not stat.S_ISREG(st.st_mode):
        raise InvalidRoot(f"{rel} is {fsutil.describe_mode(st.st_mode)}, expected a regular file")
    return InputFile(rel, component, hasher.digest(rel, st, lambda: fsutil.read_rel(rfd, rel)))


def _root_dir(rfd: int, rel: str, component: str) -> InputFile:
    st = fsutil.lstat_rel(rfd, rel)
    exists = st is not None and stat.S_ISDIR(st.st_mode)
    return InputFile(rel, component, DIRECTORY if exists else MISSING)


def toolchain_paths(layout: Layout) -> list[str]:
    """Host files whose bytes decide the compiled output."""
    multiarch = sysconfig.get_config_var("MULTIARCH") or ""
    libdirs = [d for d in (f"/usr/lib/{multiarch}", f"/lib/{multiarch}", "/usr/lib64", "/usr/lib")
               if d and os.path.isdir(d)]
    hll_dir = layout.settings.get("compiler-directory", "/usr/libexec/selinux/hll")
    paths = ["/usr/sbin/semodule", "/usr/sbin/sefcontext_compile", f"{hll_dir}/pp"]
    for soname in ("libsepol.so.2", "libsemanage.so.2", "libselinux.so.1", "libpcre2-8.so.0",
                   "libbz2.so.1.0"):
        for d in libdirs:
            candidate = f"{d}/{soname}"
            if os.path.exists(candidate):
                paths.append(candidate)
                break
        else:
            paths.append(f"/usr/lib/{soname}")  # recorded as missing
    return paths


def _toolchain_inputs(layout: Layout, hasher: Hasher) -> list[InputFile]:
    files = [InputFile("selcache:key-format", "toolchain",
                       hashlib.sha256(KEY_FORMAT.encode()).hexdigest())]
    for path in toolchain_paths(layout):
        real = os.path.realpath(path)
        try:
            st = os.stat(real)
        except FileNotFoundError:
            files.append(InputFile(f"host:{path}", "toolchain", MISSING))
            continue

        def read(real: str = real) -> bytes:
            with open(real, "rb") as fh:
                return fh.read()

        files.append(InputFile(f"host:{path}", "toolchain", hasher.digest(f"host:{real}", st, read)))
    return files


def component_digest(files: Iterable[InputFile]) -> str:
    h = hashlib.sha256()
    for f in sorted(files, key=lambda f: f.rel):
        h.update(f"{f.rel}\0{f.digest}\n".encode())
    return h.hexdigest()


def discover_inputs(layout: Layout, stat_cache: Mapping[str, StatEntry] | None = None) -> Inputs:
    """Find and digest every input of ``layout.root``."""
    hasher = Hasher(stat_cache)
    with fsutil.opened_root(layout.root) as rfd:
        files = [
            _root_file(rfd, CONFIG_REL, "config", hasher),
            _root_file(rfd, SEMANAGE_CONF_REL, "config", hasher),
        ]
        files += _store_inputs(rfd, layout, hasher)
        files += [_root_file(rfd, rel, "accounts", hasher) for rel in ACCOUNT_FILES]
        files += [_root_dir(rfd, rel, "accounts") for rel in ACCOUNT_DIRS]
    files += _toolchain_inputs(layout, hasher)
    groups: dict[str, list[InputFile]] = {}
    for f in files:
        groups.setdefault(f.component, []).append(f)
    components = {name: component_digest(group) for name, group in sorted(groups.items())}
    return Inputs(layout=layout, files=tuple(files), components=components,
                  stat_cache=hasher.new, hashed=hasher.hashed)
