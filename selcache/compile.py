"""Compile a root's policy in a sandbox and capture the whole output set.

The sandbox is a private directory holding a copy of the root's policy inputs
(config, semanage.conf, the store's modules and local customizations) and of
the account files genhomedircon reads. ``semodule -N -B`` runs *chrooted* into
it, inside a private mount namespace where the host's /usr (the toolchain) is
bind-mounted read-only. Everything libsemanage reads unprefixed, /etc/passwd
through getpwent, /etc/shells, /etc/login.defs, /export/home, even
/etc/selinux/config for the policy type, is then the root's own and never the
host's, the way ``semodule`` inside an ostree deployment sees them. The live
root is never written here.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from . import fsutil
from .errors import CompileError, InputsChanged, SandboxError
from .inputs import ACCOUNT_DIRS, DIRECTORY, MISSING, InputFile, Inputs, single_file_inputs
from .layout import CONFIG_REL, SEMANAGE_CONF_REL, Layout
from .runner import Runner, run

log = logging.getLogger(__name__)

#: Host directories the toolchain lives in. Symlinks (merged /usr) are
#: recreated as symlinks; directories are bind-mounted read-only.
HOST_DIRS = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32")

#: Files in the store that belong to libsemanage's locking, not to the policy.
_NOT_OUTPUTS = frozenset({"semanage.trans.LOCK", "semanage.read.LOCK"})
#: libsemanage's transaction directories in the store: never outputs.
_STORE_SCRATCH = frozenset({"previous", "tmp"})

# Runs inside `unshare --mount`: bind the toolchain read-only, then chroot.
# argv: SANDBOX DIR... -- COMMAND...
_SANDBOX_SH = r"""
set -e
S=$1; shift
while [ "$1" != "--" ]; do
    mount --rbind "/$1" "$S/$1"
    mount -o remount,bind,ro "$S/$1"
    shift
done
shift
exec chroot "$S" "$@"
"""


@dataclass(frozen=True)
class Compiled:
    """The output set of one compile: root-relative path -> (bytes, mode)."""

    files: Mapping[str, tuple[bytes, int]]
    seconds: float
    generated_inputs: frozenset[str]  # input files the compile created (HLL->CIL)


def _unshare_argv() -> list[str]:
    argv = ["unshare", "--mount", "--propagation", "private"]
    if os.geteuid() != 0:
        argv[1:1] = ["--user", "--map-root-user"]
    return argv


class Sandbox:
    """A private directory laid out like a root, for libsemanage to run in."""

    def __init__(self, layout: Layout, workdir: str | None = None) -> None:
        self.layout = layout
        self.path = tempfile.mkdtemp(prefix="selcache-sandbox-", dir=workdir)
        self.placed: set[str] = set()
        self._dirs: set[str] = set()
        self._bind: list[str] = []

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def cleanup(self) -> None:
        # The bind mounts lived in a namespace that died with semodule, but a
        # leftover mount here would make rmtree delete the host's /usr.
        for d in self._bind:
            target = os.path.join(self.path, d)
            if os.path.ismount(target) or (os.path.isdir(target) and os.listdir(target)):
                raise SandboxError(f"{target} is still mounted; not removing {self.path}")
        shutil.rmtree(self.path, ignore_errors=True)

    def write(self, rel: str, data: bytes, mode: int = 0o644) -> None:
        full = os.path.join(self.path, rel)
        parent = os.path.dirname(full)
        if parent not in self._dirs:
            os.makedirs(parent, exist_ok=True)
            self._dirs.add(parent)
        with open(full, "wb") as fh:
            fh.write(data)
        os.chmod(full, mode)
        self.placed.add(rel)

    def seed(self, rel: str, data: bytes) -> None:
        """Put a file that is part of the output set (unlike ``write``, which
        places inputs, never harvested)."""
        full = os.path.join(self.path, rel)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "wb") as fh:
            fh.write(data)

    def populate(self, inputs: Inputs, *, modules: bool = True) -> None:
        """Copy every present input into the sandbox, checking each file's bytes
        against the digest the key was computed from. ``modules=False`` leaves
        out the module files (a relink never reads them)."""
        layout = self.layout
        skip = f"{layout.active}/modules/"
        by_dir: dict[str, list[InputFile]] = {}
        for f in inputs.files:
            if f.rel.startswith(("host:", "selcache:")) or f.digest == MISSING:
                continue
            if not modules and f.rel.startswith(skip):
                continue
            if f.digest == DIRECTORY:
                os.makedirs(os.path.join(self.path, f.rel), exist_ok=True)
                continue
            by_dir.setdefault(f.rel.rpartition("/")[0], []).append(f)
        with fsutil.opened_root(layout.root) as rfd:
            for parent, files in by_dir.items():
                # One no-symlink walk per directory, not two per file: a store
                # holds a directory per module and every compile copies them all.
                with fsutil.opened_dir(rfd, parent) as dfd:
                    for f in files:
                        name = f.rel.rpartition("/")[2]
                        data = fsutil.read_at(dfd, name, what=f.rel)
                        if hashlib.sha256(data).hexdigest() != f.digest:
                            raise InputsChanged(f"{f.rel} changed while it was copied into the "
                                                "sandbox")
                        st = fsutil.lstat_at(dfd, name)
                        self.write(f.rel, data, stat.S_IMODE(st.st_mode) if st else 0o644)
        self._prepare_system()

    def _prepare_system(self) -> None:
        etc = os.path.join(self.path, "etc")
        os.makedirs(etc, exist_ok=True)
        # getpwent must read the root's /etc/passwd and nothing else: the host's
        # nsswitch.conf may add systemd or sss users.
        with open(os.path.join(etc, "nsswitch.conf"), "w") as fh:
            fh.write("passwd: files\ngroup: files\nshadow: files\n")
        if os.path.exists("/etc/ld.so.cache"):
            shutil.copyfile("/etc/ld.so.cache", os.path.join(etc, "ld.so.cache"))
        os.makedirs(os.path.join(self.path, self.layout.active), exist_ok=True)
        for d in HOST_DIRS:
            host = f"/{d}"
            target = os.path.join(self.path, d)
            if os.path.islink(host):
                os.symlink(os.readlink(host), target)
            elif os.path.isdir(host):
                os.mkdir(target)
                self._bind.append(d)
        for rel in ACCOUNT_DIRS:
            parent = os.path.join(self.path, os.path.dirname(rel))
            os.makedirs(parent, exist_ok=True)

    def run(self, argv: Sequence[str], runner: Runner = run) -> str:
        """Run ``argv`` chrooted into the sandbox; return its stderr."""
        full = [*_unshare_argv(), "--", "sh", "-c", _SANDBOX_SH, "sh", self.path, *self._bind,
                "--", *argv]
        try:
            done = runner(full)
        except FileNotFoundError as exc:
            raise SandboxError(f"cannot run {full[0]}: {exc}") from exc
        if done.returncode != 0:
            if "unshare failed" in done.stderr or "mount:" in done.stderr or "chroot:" in done.stderr:
                raise SandboxError(f"compile sandbox failed (need root or user namespaces): "
                                   f"{done.stderr.strip()}")
            raise CompileError(f"{argv[0]} failed with exit code {done.returncode}",
                               stderr=done.stderr, returncode=done.returncode)
        return done.stderr

    def harvest(self) -> dict[str, tuple[bytes, int]]:
        """Every file the compile produced: the store's computed files and the
        final files under etc/selinux/TYPE. Inputs we placed are not outputs."""
        layout = self.layout
        out: dict[str, tuple[bytes, int]] = {}
        # libsemanage may (re)write a local customization file it was handed
        # (the relink's commit writes an empty booleans.local where there was
        # none): those are the root's inputs, never outputs.
        fixed = set(single_file_inputs(layout))
        for top in (layout.active, layout.final):
            base = os.path.join(self.path, top)
            if not os.path.isdir(base):
                continue
            fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
            try:
                for entry in fsutil.walk_files(fd):
                    rel = f"{top}/{entry.rel}"
                    name = rel.rsplit("/", 1)[-1]
                    if rel in self.placed or rel in fixed or name in _NOT_OUTPUTS or rel in out:
                        continue
                    if rel == f"{layout.active}/commit_num":
                        continue  # a counter, bumped at install, never cached
                    if rel.startswith(layout.store + "/") and \
                            rel[len(layout.store) + 1:].split("/")[0] in _STORE_SCRATCH:
                        continue  # ostree layout: libsemanage's own dirs inside the final dir
                    with open(os.path.join(self.path, rel), "rb") as fh:
                        out[rel] = (fh.read(), stat.S_IMODE(entry.st.st_mode))
            finally:
                os.close(fd)
        return out


def semodule_build_argv(inputs: Inputs) -> list[str]:
    """``semodule -N -B``, keeping the store's flags: semodule -B without -D
    *clears* disable_dontaudit (policycoreutils semodule.c: ``else if (build)
    semanage_set_disable_dontaudit(sh, 0)``), which would rewrite an input."""
    layout = inputs.layout
    argv = ["semodule", "-N", "-s", layout.policy_type, "-B"]
    present = {f.rel for f in inputs.files if f.digest != MISSING}
    if f"{layout.active}/disable_dontaudit" in present:
        argv.append("-D")
    if f"{layout.active}/preserve_tunables" in present:
        argv.append("-P")
    return argv


#: What libsemanage's no-rebuild commit reads instead of compiling the CIL
#: (direct_api.c, semanage_direct_commit: it stats the first three and loads
#: the linked ones), what genhomedircon reads, and the module-set checksum that
#: `--rebuild-if-modules-changed` compares. Relative to active/.
LINKED_FILES = ("policy.kern", "file_contexts", "seusers", "policy.linked", "seusers.linked",
                "users_extra.linked", "homedir_template", "modules_checksum")

#: Marks the local boolean database modified without changing its content, so
#: that libsemanage's commit takes the no-rebuild path *and* writes the kernel
#: policy and the final files: it merges every local customization onto the
#: linked policy and runs genhomedircon (semodule has no flag for this; a
#: plain commit with no modification writes nothing).
_RELINK_SCRIPT = r"""
import sys
import semanage as s

store = sys.argv[1]
h = s.semanage_handle_create()
s.semanage_select_store(h, store, s.SEMANAGE_CON_DIRECT)
s.semanage_set_reload(h, 0)
s.semanage_set_rebuild(h, 0)
if s.semanage_connect(h) < 0 or s.semanage_begin_transaction(h) < 0:
    sys.exit("cannot open the store")
rc, local = s.semanage_bool_list_local(h)
if rc < 0:
    sys.exit("cannot list local booleans")
if local:
    b = local[0]
    rc, key = s.semanage_bool_key_extract(h, b)
    if rc < 0 or s.semanage_bool_modify_local(h, key, b) < 0:
        sys.exit("cannot re-set a local boolean")
else:
    rc, known = s.semanage_bool_list(h)
    if rc < 0 or not known:
        sys.exit("the policy has no boolean to mark")
    b = known[0]
    rc, key = s.semanage_bool_key_extract(h, b)
    if rc < 0 or s.semanage_bool_modify_local(h, key, b) < 0             or s.semanage_bool_del_local(h, key) < 0:
        sys.exit("cannot mark the booleans modified")
if s.semanage_commit(h) < 0:
    sys.exit("commit failed")
"""


def relink_policy(inputs: Inputs, linked: Mapping[str, bytes], *, runner: Runner = run,
                  workdir: str | None = None) -> Compiled:
    """Merge ``inputs``' local customizations onto an already linked policy
    (``linked``: root-relative store paths -> bytes, from a cached compile of
    the same module set) without compiling the CIL: libsemanage's own
    no-rebuild commit. The kernel policy is semantically, not bytewise, what
    a full rebuild gives (openshift/os#1036); the other files are identical."""
    layout = inputs.layout
    start = time.monotonic()
    with Sandbox(layout, workdir) as sb:
        # libsemanage's no-rebuild commit never reads the modules, but it
        # copies the whole store into its transaction: leaving them out makes
        # that copy (and ours) about a thousand files shorter.
        sb.populate(inputs, modules=False)
        for rel, data in linked.items():
            sb.seed(rel, data)
        stderr = sb.run(["/usr/bin/python3", "-I", "-c", _RELINK_SCRIPT, layout.policy_type],
                        runner)
        if stderr.strip():
            log.info("relink: %s", stderr.strip())
        files = sb.harvest()
    if not any(p.startswith(f"{layout.final}/policy/policy.") for p in files):
        raise CompileError("the relink wrote no kernel policy", stderr=stderr)
    seconds = time.monotonic() - start
    log.info("relinked %s policy in %.2fs (%d files)", layout.policy_type, seconds, len(files))
    return Compiled(files=files, seconds=seconds, generated_inputs=frozenset())


def compile_policy(inputs: Inputs, *, runner: Runner = run, workdir: str | None = None,
                   conversions: Mapping[str, bytes] | None = None) -> Compiled:
    """Full rebuild of ``inputs`` in a sandbox: ``semodule -N -B``.
    ``conversions``: CIL files (root-relative store paths) converted from a
    module's HLL earlier, by the same converter from the same bytes. They are
    put beside the HLL so libsemanage skips converting those modules; like
    the CIL it would write, they are part of the output set."""
    layout = inputs.layout
    start = time.monotonic()
    with Sandbox(layout, workdir) as sb:
        sb.populate(inputs)
        for rel, data in (conversions or {}).items():
            sb.seed(rel, data)
        stderr = sb.run(semodule_build_argv(inputs), runner)
        if stderr.strip():
            log.info("semodule: %s", stderr.strip())
        files = sb.harvest()
    policy = [p for p in files if p.startswith(f"{layout.final}/policy/policy.")]
    if not policy:
        raise CompileError("semodule succeeded but wrote no policy."
                           f"N under /{layout.final}/policy", stderr=stderr)
    generated = frozenset(p for p in files if p.startswith(f"{layout.active}/modules/"))
    seconds = time.monotonic() - start
    log.info("compiled %s policy in %.2fs (%d files)", layout.policy_type, seconds, len(files))
    return Compiled(files=files, seconds=seconds, generated_inputs=generated)
