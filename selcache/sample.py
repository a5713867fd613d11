"""Sample roots for the demo, the tests and the benchmarks.

``build_root(dest, "small")`` installs the hand-written CIL policy in
``policies/small``; ``build_root(dest, "refpolicy")`` installs Debian's
``selinux-policy-default`` modules, fetched with ``apt-get download`` and
unpacked with ``dpkg -x`` (never installed on the host, whose policy stays
untouched). Every semodule run happens in selcache's chroot sandbox, so the
root's own accounts feed genhomedircon.

``python -m selcache.sample build --policy refpolicy DEST`` builds one by hand.
"""

from __future__ import annotations

import argparse
import fcntl
import glob
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from .compile import Sandbox
from .errors import SelcacheError
from .inputs import discover_inputs
from .layout import read_layout
from .runner import Runner, run

REPO = Path(__file__).resolve().parent.parent
POLICIES = REPO / "policies"
SMALL_MODULES = ("base", "files", "users", "net", "web")
REFPOLICY_PACKAGE = "selinux-policy-default"
# Debian's postinst leaves these disabled (selinux-policy-default postinst).
REFPOLICY_NOT_DEFAULT = ("amtu bugzilla cobbler condor cyphesis git ksmtuned likewise livecd "
                         "nessus numad oddjob openca soundserver thunderbird updfstab "
                         "usernetctl").split()

PASSWD = """root:x:0:0:root:/root:/bin/bash
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
alice:x:1000:1000:Alice:/home/alice:/bin/bash
bob:x:1001:1001:Bob:/home/bob:/bin/sh
"""
GROUP = "root:x:0:\ndaemon:x:1:\nalice:x:1000:\nbob:x:1001:\n"
SHELLS = "/bin/sh\n/bin/bash\n/usr/bin/bash\n"
LOGIN_DEFS = "UID_MIN 1000\nUID_MAX 60000\n"
USERADD = "HOME=/home\nSHELL=/bin/sh\n"
SEMANAGE_CONF = "module-store = direct\nexpand-check = 0\n"


def fixtures_dir() -> Path:
    return Path(os.environ.get("SELCACHE_FIXTURES_DIR") or REPO / ".cache" / "fixtures")


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def skeleton(dest: Path, policy_type: str, store_root: str = "/var/lib/selinux") -> None:
    """The non-policy files of a root: config, semanage.conf and accounts."""
    _write(dest / "etc/selinux/config", f"SELINUX=permissive\nSELINUXTYPE={policy_type}\n")
    conf = SEMANAGE_CONF
    if store_root != "/var/lib/selinux":
        conf += f"store-root = {store_root}\n"
    _write(dest / "etc/selinux/semanage.conf", conf)
    _write(dest / "etc/passwd", PASSWD)
    _write(dest / "etc/group", GROUP)
    _write(dest / "etc/shells", SHELLS)
    _write(dest / "etc/login.defs", LOGIN_DEFS)
    _write(dest / "etc/default/useradd", USERADD)
    (dest / store_root.lstrip("/") / policy_type / "active").mkdir(parents=True, exist_ok=True)


def apply_semodule(root: str | Path, args: Sequence[str], files: Sequence[str | Path] = (),
                   *, runner: Runner = run) -> str:
    """Run ``semodule ARGS`` on ``root`` the way it would run inside the root
    (its own accounts and config), through the sandbox. ``files`` are copied
    into the sandbox's /selcache-files/ first, for ``-i``. Returns stderr."""
    layout = read_layout(str(root))
    inputs = discover_inputs(layout)
    with Sandbox(layout) as sb:
        sb.populate(inputs)
        for f in files:
            with open(f, "rb") as fh:
                sb.write(f"selcache-files/{os.path.basename(f)}", fh.read())
        stderr = sb.run(["semodule", "-N", "-s", layout.policy_type, *args], runner)
        for rel in (layout.store, layout.final):
            src = Path(sb.path) / rel
            dst = Path(root) / rel
            if rel == layout.store and (dst / "active").exists():
                shutil.rmtree(dst / "active")
            if src.exists():
                shutil.copytree(src, dst, dirs_exist_ok=True, symlinks=True)
    return stderr


def refpolicy_dir() -> Path:
    """Debian's selinux-policy-default unpacked under the fixtures dir."""
    base = fixtures_dir() / "refpolicy"
    unpacked = base / "unpacked"
    if (unpacked / "usr/share/selinux/default/.modules").exists():
        return unpacked
    base.mkdir(parents=True, exist_ok=True)
    with open(base / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (unpacked / "usr/share/selinux/default/.modules").exists():
            return unpacked
        debs = glob.glob(str(base / f"{REFPOLICY_PACKAGE}_*.deb"))
        if not debs:
            subprocess.run(["apt-get", "download", REFPOLICY_PACKAGE], cwd=base, check=True,
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
            debs = glob.glob(str(base / f"{REFPOLICY_PACKAGE}_*.deb"))
        tmp = base / "unpacked.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run(["dpkg-deb", "-x", debs[0], str(tmp)], check=True, stdin=subprocess.DEVNULL)
        os.rename(tmp, unpacked)
    return unpacked


def build_root(dest: str | Path, policy: str = "small", *, store_root: str = "/var/lib/selinux",
               runner: Runner = run) -> Path:
    """Build a complete root with ``policy`` ("small" or "refpolicy") at ``dest``."""
    dest = Path(dest)
    if policy == "small":
        skeleton(dest, "small", store_root)
        mods = [POLICIES / "small" / f"{m}.cil" for m in SMALL_MODULES]
        args = ["-X", "100"]
        for m in mods:
            args += ["-i", f"/selcache-files/{m.name}"]
        apply_semodule(dest, args, mods, runner=runner)
    elif policy == "refpolicy":
        src = refpolicy_dir()
        skeleton(dest, "default", store_root)
        shutil.copytree(src / "etc/selinux/default", dest / "etc/selinux/default", dirs_exist_ok=True)
        share = src / "usr/share/selinux/default"
        names = (share / ".modules").read_text().split()
        mods = [share / f"{n}.pp.bz2" for n in names]
        args = ["-X", "100"]
        for m in mods:
            args += ["-i", f"/selcache-files/{m.name}"]
        for n in REFPOLICY_NOT_DEFAULT:
            if n in names:
                args += ["-d", n]
        apply_semodule(dest, args, mods, runner=runner)
    else:
        raise ValueError(f"unknown sample policy {policy!r} (small, refpolicy)")
    return dest


def pristine_root(policy: str) -> Path:
    """A root built once per fixtures dir and reused: copy it, never modify it."""
    base = fixtures_dir()
    done = base / f"{policy}-root"
    if (done / ".complete").exists():
        return done
    base.mkdir(parents=True, exist_ok=True)
    with open(base / f".{policy}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (done / ".complete").exists():
            return done
        tmp = base / f"{policy}-root.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        build_root(tmp, policy)
        (tmp / ".complete").write_text("")
        shutil.rmtree(done, ignore_errors=True)
        os.rename(tmp, done)
    return done


def copy_root(src: str | Path, dest: str | Path) -> Path:
    """A private copy of a root (cp -a keeps modes, links and timestamps)."""
    dest = Path(dest)
    subprocess.run(["cp", "-a", f"{src}/.", str(dest)], check=True)
    (dest / ".complete").unlink(missing_ok=True)
    return dest


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m selcache.sample",
                                     description="Build a sample SELinux root.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build a root at DEST")
    b.add_argument("dest")
    b.add_argument("--policy", choices=("small", "refpolicy"), default="small")
    b.add_argument("--store-root", default="/var/lib/selinux",
                   help="semanage.conf store-root (/etc/selinux gives an ostree-style root)")
    args = parser.parse_args(argv)
    if os.path.exists(args.dest) and os.listdir(args.dest):
        print(f"{args.dest} exists and is not empty", file=sys.stderr)
        return 2
    try:
        if args.store_root == "/var/lib/selinux":
            copy_root(pristine_root(args.policy), args.dest)
        else:
            build_root(args.dest, args.policy, store_root=args.store_root)
    except SelcacheError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(args.dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
