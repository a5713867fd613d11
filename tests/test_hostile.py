"""Hostile and broken roots, one table: each gets its error and exit code
through the CLI, and a digest of the whole root, of a sentinel directory
outside it and of the host's own SELinux directories shows that nothing
changed. The cases with a documented safe behaviour follow the table."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import selcache
from selcache.cli import main
from selcache.fsutil import MAX_FILE_SIZE
from selcache.layout import read_layout

from .conftest import assert_matches_reference, hold_lock, output_files
from .scenarios import POLICIES, add_module, booleans_local

pytestmark = pytest.mark.timeout(120)

HOST_SELINUX = (Path("/etc/selinux"), Path("/var/lib/selinux"))


def digest(top: Path) -> dict[str, str]:
    """Every entry below ``top`` by type, mode and content. Unlike
    conftest.tree_digest it never opens a FIFO or a device."""
    out: dict[str, str] = {}
    if not top.exists():
        return out
    for dirpath, dirnames, filenames in os.walk(top):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath, name)
            st = p.lstat()
            rel = str(p.relative_to(top))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = "link:" + os.readlink(p)
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = f"dir:{st.st_mode:o}"
            elif stat.S_ISREG(st.st_mode):
                h = hashlib.sha256()
                with open(p, "rb") as fh:
                    while chunk := fh.read(1 << 22):
                        h.update(chunk)
                out[rel] = f"{st.st_mode:o}:{h.hexdigest()}"
            else:
                out[rel] = f"special:{st.st_mode:o}:{st.st_rdev}"
    return out


@dataclass
class World:
    root: Path
    outside: Path
    cache: str

    @property
    def layout(self):  # type: ignore[no-untyped-def]
        return read_layout(str(self.root))

    @property
    def active(self) -> Path:
        return self.root / "var/lib/selinux/small/active"

    @property
    def final(self) -> Path:
        return self.root / "etc/selinux/small"

    def snapshot(self) -> list[dict[str, str]]:
        return [digest(self.root), digest(self.outside), *(digest(h) for h in HOST_SELINUX)]


@pytest.fixture
def world(small_root: Path, tmp_path: Path, cache_dir: str) -> World:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "sentinel").write_text("must not change\n")
    booleans_local(small_root)  # a finalize that works would write: policy.N changes
    return World(small_root, outside, cache_dir)


# -- the mutations -------------------------------------------------------------
def config(text: bytes) -> Callable[[World], None]:
    return lambda w: (w.root / "etc/selinux/config").write_bytes(text)


def semanage_conf(text: bytes) -> Callable[[World], None]:
    return lambda w: (w.root / "etc/selinux/semanage.conf").write_bytes(text)


def move_out_and_link(rel: str) -> Callable[[World], None]:
    """Move ``rel`` outside the root and leave a symlink to it in its place."""
    def mutate(w: World) -> None:
        src = w.root / rel
        dst = w.outside / src.name
        shutil.move(str(src), dst)
        src.symlink_to(dst)
    return mutate


def special(rel: str, kind: str) -> Callable[[World], None]:
    def mutate(w: World) -> None:
        path = w.root / rel
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
        if kind == "fifo":
            os.mkfifo(path)
        elif kind == "device":
            os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # like /dev/null
        elif kind == "dir":
            path.mkdir()
        else:
            # Bound in a short directory (AF_UNIX paths are limited to 107
            # bytes), then renamed into place.
            short = tempfile.mkdtemp(dir="/tmp")
            with socket.socket(socket.AF_UNIX) as sock:
                sock.bind(f"{short}/s")
            os.rename(f"{short}/s", path)
            os.rmdir(short)
    return mutate


def huge(rel: str) -> Callable[[World], None]:
    def mutate(w: World) -> None:
        with open(w.root / rel, "r+b") as fh:  # sparse: cheap on disk
            fh.truncate(MAX_FILE_SIZE + 1)
    return mutate


def only_previous(w: World) -> None:
    w.active.rename(w.active.parent / "previous")


def no_config(w: World) -> None:
    (w.root / "etc/selinux/config").unlink()


def missing_lang_ext(w: World) -> None:
    (w.active / "modules/100/web/lang_ext").unlink()


def bad_cil(w: World) -> None:
    add_module(w.root, "bad", POLICIES / "broken/bad.cil")


def garbage_cil(w: World) -> None:
    (w.active / "modules/100/web/cil").write_bytes(os.urandom(4096))


HOLDERS: list[subprocess.Popen[bytes]] = []


def held_trans_lock(w: World) -> None:
    HOLDERS.append(hold_lock(w.root / "var/lib/selinux/small/semanage.trans.LOCK", 60))


def held_root_lock(w: World) -> None:
    HOLDERS.append(hold_lock(w.root / "var/lib/selinux", 60))


@pytest.fixture(autouse=True)
def release_holders() -> Iterator[None]:
    yield
    while HOLDERS:
        holder = HOLDERS.pop()
        holder.kill()
        holder.wait()


TYPE_ERROR = "not a valid policy type"

CASES = [
    # path tricks and bad config
    ("selinuxtype-dotdot", config(b"SELINUXTYPE=../x\n"), 3, TYPE_ERROR),
    ("selinuxtype-absolute", config(b"SELINUXTYPE=/etc\n"), 3, TYPE_ERROR),
    ("selinuxtype-empty", config(b"SELINUXTYPE=\n"), 3, TYPE_ERROR),
    ("selinuxtype-quoted", config(b'SELINUXTYPE="small"\n'), 3, TYPE_ERROR),
    ("unknown-policy-type", config(b"SELINUXTYPE=nosuch\n"), 3, "no module store"),
    ("config-missing", no_config, 3, "no etc/selinux/config"),
    ("config-crlf", config(b"SELINUX=permissive\r\nSELINUXTYPE=small\r\n"), 3, "CR \\(DOS\\)"),
    ("config-nul", config(b"SELINUXTYPE=small\n\0\n"), 3, "NUL"),
    ("config-not-utf8", config(b"SELINUXTYPE=small\n\xff\xfe\n"), 3, "not valid UTF-8"),
    ("semanage-conf-crlf", semanage_conf(b"module-store = direct\r\n"), 3, "CR \\(DOS\\)"),
    ("semanage-conf-garbage", semanage_conf(b"module-store = direct\n%%garbage%%\n"), 3,
     "cannot parse"),
    ("store-root-climbs-out", semanage_conf(b"store-root = /../../outside\n"), 3,
     "climbs out"),
    ("store-root-relative", semanage_conf(b"store-root = var/lib/selinux\n"), 3,
     "not absolute"),
    ("module-store-socket", semanage_conf(b"module-store = /run/semanage.sock\n"), 3,
     "only 'direct'"),
    # symlinks out of the root
    ("etc-selinux-symlink-out", move_out_and_link("etc/selinux"), 3, "symlink"),
    ("store-symlink-out", move_out_and_link("var/lib/selinux"), 3, "symlink"),
    ("config-symlink-out", move_out_and_link("etc/selinux/config"), 3, "symlink"),
    ("module-cil-symlink-out", move_out_and_link("var/lib/selinux/small/active/modules/100/web/cil"),
     3, "symlink"),
    ("passwd-symlink-out", move_out_and_link("etc/passwd"), 3, "symlink"),
    ("output-symlink-out", move_out_and_link("etc/selinux/small/policy/policy.33"), 3,
     "symlink where a policy file belongs"),
    ("output-dir-symlink-out", move_out_and_link("etc/selinux/small/contexts/files"), 3,
     "symlink where a directory belongs"),
    # special files where files belong
    ("fifo-module-cil", special("var/lib/selinux/small/active/modules/100/web/cil", "fifo"), 3,
     "FIFO"),
    ("fifo-config", special("etc/selinux/config", "fifo"), 3, "FIFO"),
    ("fifo-passwd", special("etc/passwd", "fifo"), 3, "FIFO"),
    ("fifo-output", special("etc/selinux/small/seusers", "fifo"), 3,
     "FIFO where a policy file belongs"),
    ("device-local-file", special("var/lib/selinux/small/active/booleans.local", "device"), 3,
     "a device"),
    ("device-output", special("etc/selinux/small/policy/policy.33", "device"), 3,
     "a device where a policy file belongs"),
    ("socket-in-store", special("var/lib/selinux/small/active/ports.local", "socket"), 3,
     "a socket"),
    ("directory-as-output", special("etc/selinux/small/seusers", "dir"), 3,
     "a directory where a policy file belongs"),
    # huge files
    ("huge-module", huge("var/lib/selinux/small/active/modules/100/web/cil"), 3, "byte limit"),
    ("huge-passwd", huge("etc/passwd"), 3, "byte limit"),
    # leftover libsemanage state
    ("only-previous-store", only_previous, 3, "previous/ but no active/"),
    ("held-semanage-trans-lock", held_trans_lock, 8, "libsemanage's lock"),
    ("held-root-lock", held_root_lock, 8, "timed out"),
    # broken modules: semodule's own message, exit 4
    ("missing-lang-ext", missing_lang_ext, 4, "lang ext file"),
    ("bad-cil", bad_cil, 4, "Failed to resolve allow statement"),
    ("garbage-cil", garbage_cil, 4, "semodule failed"),
]


@pytest.mark.parametrize("mutate, code, message",
                         [pytest.param(m, c, msg, id=name) for name, m, c, msg in CASES])
def test_hostile_root_is_refused_and_left_unchanged(
        world: World, mutate: Callable[[World], None], code: int, message: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    import re

    mutate(world)
    before = world.snapshot()
    start = time.monotonic()
    got = main(["finalize", "--root", str(world.root), "--cache-dir", world.cache,
                "--lock-timeout", "1"])
    elapsed = time.monotonic() - start
    err = capsys.readouterr().err
    assert got == code, err
    assert re.search(message, err), err
    assert "Traceback" not in err
    after = world.snapshot()
    assert after[0] == before[0], "the root changed"
    assert after[1] == before[1], "the sentinel outside the root changed"
    assert after[2:] == before[2:], "the host's SELinux files changed"
    assert elapsed < 30  # a held lock is a bounded wait, never a hang


# -- documented safe behaviours ------------------------------------------------
def test_missing_semanage_conf_means_libsemanage_defaults_never_the_hosts(
        world: World, tmp_path: Path) -> None:
    twin = tmp_path / "twin"
    shutil.copytree(world.root, twin, symlinks=True)
    (world.root / "etc/selinux/semanage.conf").unlink()
    (twin / "etc/selinux/semanage.conf").write_text("")
    host = digest(HOST_SELINUX[0])
    for root, cache in ((world.root, world.cache), (twin, str(tmp_path / "c2"))):
        assert selcache.finalize(str(root), cache).action == "rebuilt"
    assert output_files(world.root) == output_files(twin)
    assert digest(HOST_SELINUX[0]) == host


def test_stale_libsemanage_tmp_is_ignored_and_left_alone(world: World, tmp_path: Path) -> None:
    """libsemanage removes a stale tmp/ at its next transaction
    (semanage_make_sandbox); selcache reads active/ only and leaves tmp/ be."""
    tmp = world.active.parent / "tmp"
    shutil.copytree(world.active, tmp)
    (tmp / "booleans.local").write_text("httpd_can_network_connect=0\n")
    (tmp / "modules/100/web/cil").write_text("(garbage")
    before = digest(tmp)
    assert selcache.finalize(str(world.root), world.cache).action == "rebuilt"
    assert digest(tmp) == before
    shutil.rmtree(tmp)
    assert_matches_reference(world.root, tmp_path)


def test_disabled_marker_for_a_missing_module_changes_nothing(world: World,
                                                              tmp_path: Path) -> None:
    selcache.finalize(str(world.root), world.cache)
    expected = output_files(world.root)
    (world.active / "modules/disabled").mkdir(exist_ok=True)
    (world.active / "modules/disabled/nosuch").write_text("")
    result = selcache.finalize(str(world.root), world.cache)
    assert result.action == "rebuilt" and result.written == ()  # a new key, the same policy
    assert output_files(world.root) == expected
    assert_matches_reference(world.root, tmp_path)


def test_hardlinks_out_of_the_root_are_read_never_written(world: World,
                                                          tmp_path: Path) -> None:
    """A hard link cannot be told from the root's own file: selcache reads it
    as libsemanage would, and never writes through it (nothing is written in
    place)."""
    linked = {"policy.kern": world.active / "policy.kern",        # an output that changes
              "cil": world.active / "modules/100/web/cil",       # an input
              "seusers": world.final / "seusers"}                # an output that does not
    for name, path in linked.items():
        os.link(path, world.outside / name)
    before = digest(world.outside)
    result = selcache.finalize(str(world.root), world.cache)
    assert "var/lib/selinux/small/active/policy.kern" in result.written
    assert digest(world.outside) == before
    assert not os.path.samefile(linked["policy.kern"], world.outside / "policy.kern")
    assert os.path.samefile(linked["seusers"], world.outside / "seusers")
    assert_matches_reference(world.root, tmp_path)


def test_symlink_beside_the_outputs_is_kept_not_followed(world: World) -> None:
    target = world.outside / "setrans.conf"
    target.write_text("s0=SystemLow\n")
    link = world.final / "setrans.conf"
    link.symlink_to(target)
    before = digest(world.outside)
    assert selcache.finalize(str(world.root), world.cache).action == "rebuilt"
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert digest(world.outside) == before
