"""Input discovery and the key: every input counts, the host never does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import selcache
from selcache import inputs as inputs_mod
from selcache.errors import InvalidRoot
from selcache.inputs import DIRECTORY, MISSING, discover_inputs
from selcache.key import compute_key, diff_components
from selcache.layout import read_layout

from .conftest import output_files


def key_of(root: Path) -> str:
    return compute_key(discover_inputs(read_layout(str(root)))).hex


def test_every_input_file_changes_the_key(small_root: Path) -> None:
    layout = read_layout(str(small_root))
    found = discover_inputs(layout)
    base = compute_key(found)
    walked = 0
    for f in found.files:
        if f.rel.startswith(("host:", "selcache:")):
            continue
        path = small_root / f.rel
        if f.digest == MISSING:
            if f.rel == "export/home":
                path.mkdir(parents=True)
                changed = key_of(small_root)
                path.rmdir()
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(b"x")
                changed = key_of(small_root)
                path.unlink()
        elif f.digest == DIRECTORY:
            continue
        else:
            data = path.read_bytes()
            flipped = data[:-1] + bytes([data[-1] ^ 1]) if data else b"\n"
            path.write_bytes(flipped)
            changed = key_of(small_root)
            path.write_bytes(data)
        assert changed != base.hex, f"changing {f.rel} did not change the key"
        walked += 1
        assert key_of(small_root) == base.hex, f"restoring {f.rel} did not restore the key"
    # config, semanage.conf, 5 modules x 2 files, 12 local files, 6 account files, export/home
    assert walked >= 2 + 10 + 12 + 6 + 1


def test_missing_file_is_recorded_not_skipped(small_root: Path) -> None:
    layout = read_layout(str(small_root))
    found = {f.rel: f for f in discover_inputs(layout).files}
    assert found[f"{layout.active}/booleans.local"].digest == MISSING
    assert found["etc/libuser.conf"].digest == MISSING
    # An empty file is not the same input as a missing one.
    empty = small_root / layout.active / "booleans.local"
    before = key_of(small_root)
    empty.write_bytes(b"")
    assert key_of(small_root) != before


def test_components_name_what_changed(small_root: Path) -> None:
    layout = read_layout(str(small_root))
    old = compute_key(discover_inputs(layout))
    (small_root / layout.active / "booleans.local").write_text("httpd_can_network_connect=1\n")
    with open(small_root / "etc/passwd", "a") as fh:
        fh.write("carol:x:1002:1002::/home/carol:/bin/sh\n")
    (small_root / layout.active / "modules/disabled").mkdir(exist_ok=True)
    (small_root / layout.active / "modules/disabled/web").write_text("")
    new = compute_key(discover_inputs(layout))
    assert diff_components(old.components, new.components) == {
        "accounts": "changed", "booleans": "changed", "module:web": "changed"}


def test_toolchain_change_changes_the_key(small_root: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "libsepol.so.2"
    fake.write_bytes(b"version one")
    monkeypatch.setattr(inputs_mod, "toolchain_paths", lambda layout: [str(fake)])
    before = key_of(small_root)
    fake.write_bytes(b"version two")
    assert key_of(small_root) != before


def test_stat_cache_skips_unchanged_files_but_trusts_no_mtime(
        small_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inputs_mod, "RACY_NS", -10**18)  # trust even fresh files
    layout = read_layout(str(small_root))
    first = discover_inputs(layout)
    assert first.hashed > 0
    second = discover_inputs(layout, first.stat_cache)
    assert second.hashed == 0
    assert second.components == first.components
    # Same size, mtime put back: only ctime and content tell. ctime must win.
    cil = small_root / layout.active / "modules/100/web/cil"
    st = cil.stat()
    data = cil.read_bytes()
    cil.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    os.utime(cil, ns=(st.st_atime_ns, st.st_mtime_ns))
    third = discover_inputs(layout, second.stat_cache)
    assert third.hashed == 1
    assert third.components["module:web"] != first.components["module:web"]


def test_racy_files_are_never_cached(small_root: Path) -> None:
    layout = read_layout(str(small_root))
    (small_root / layout.active / "booleans.local").write_text("nis_enabled=1\n")
    found = discover_inputs(layout)
    assert f"{layout.active}/booleans.local" not in found.stat_cache


def test_host_passwd_does_not_leak_into_the_root(small_root: Path, tmp_path: Path) -> None:
    """Run finalize in a mount namespace whose /etc/passwd has an extra user
    with a home outside /home: the root's outputs must not change."""
    import shutil

    twin = tmp_path / "twin"
    shutil.copytree(small_root, twin, symlinks=True)
    host_passwd = tmp_path / "host-passwd"
    host_passwd.write_text(Path("/etc/passwd").read_text()
                           + "dave:x:1500:1500:Dave:/hostonly/dave:/bin/bash\n")
    script = 'mount --bind "$1" /etc/passwd; shift; exec "$@"'
    for root, cache in ((small_root, tmp_path / "c1"), (twin, tmp_path / "c2")):
        argv = [sys.executable, "-m", "selcache", "finalize", "--root", str(root),
                "--cache-dir", str(cache)]
        if root == small_root:
            argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
                    str(host_passwd), *argv]
        (root / read_layout(str(root)).active / "booleans.local").write_text("nis_enabled=1\n")
        subprocess.run(argv, check=True, capture_output=True)
    got, want = output_files(small_root), output_files(twin)
    assert got == want
    homedirs = next(v for k, v in got.items() if k.endswith("contexts/files/file_contexts.homedirs"))
    assert b"/hostonly" not in homedirs
    assert b"/home/alice" in homedirs  # the root's own users are there


@pytest.mark.parametrize("config, message", [
    pytest.param("SELINUXTYPE=../x\n", "not a valid policy type", id="dotdot"),
    pytest.param("SELINUXTYPE=a/b\n", "not a valid policy type", id="slash"),
    pytest.param("SELINUX=enforcing\n", "no SELINUXTYPE", id="no-type"),
    pytest.param("SELINUXTYPE=small\r\n", "CR (DOS) line endings", id="crlf"),
    pytest.param("SELINUXTYPE=nosuch\n", "no module store", id="unknown-type"),
])
def test_bad_config_is_a_clear_error(small_root: Path, config: str, message: str,
                                     cache_dir: str) -> None:
    (small_root / "etc/selinux/config").write_text(config)
    with pytest.raises(InvalidRoot, match=message.replace("(", r"\(").replace(")", r"\)")):
        selcache.finalize(str(small_root), cache_dir)


def test_symlinked_store_is_refused(small_root: Path, tmp_path: Path, cache_dir: str) -> None:
    layout = read_layout(str(small_root))
    outside = tmp_path / "outside"
    (small_root / layout.active).rename(outside)
    (small_root / layout.active).symlink_to(outside)
    with pytest.raises(InvalidRoot, match="symlink"):
        selcache.finalize(str(small_root), cache_dir)


def test_fifo_in_store_is_refused_without_blocking(small_root: Path, cache_dir: str) -> None:
    layout = read_layout(str(small_root))
    os.mkfifo(small_root / layout.active / "booleans.local")
    with pytest.raises(InvalidRoot, match="FIFO"):
        selcache.finalize(str(small_root), cache_dir)
