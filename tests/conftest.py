from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from selcache import sample
from selcache.layout import read_layout

from .fleet import keys, redis_server, redis_server_session  # noqa: F401 - fixtures

REPO = Path(__file__).resolve().parent.parent
POLICIES = REPO / "policies"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="needs root: mount namespaces and chroot for the compile")
        for item in items:
            item.add_marker(skip)


@pytest.fixture
def cache_dir(tmp_path: Path) -> str:
    return str(tmp_path / "cache")


@pytest.fixture
def small_root(tmp_path: Path) -> Path:
    return sample.copy_root(sample.pristine_root("small"), tmp_path / "root")


@pytest.fixture
def ref_root(tmp_path: Path) -> Path:
    return sample.copy_root(sample.pristine_root("refpolicy"), tmp_path / "root")


@pytest.fixture(autouse=True)
def no_host_remote_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never see the host's /etc/selcache/selcache.conf or SELCACHE_* remote."""
    monkeypatch.setenv("SELCACHE_CONFIG", os.devnull)
    for var in ("SELCACHE_REMOTE", "SELCACHE_REMOTE_READONLY", "SELCACHE_REMOTE_TIMEOUT",
                "SELCACHE_SIGNING_KEY", "SELCACHE_TRUSTED_KEYS"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(autouse=True)
def no_thread_leaks() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    assert not leaked, f"threads leaked: {leaked}"


def tree_digest(root: Path) -> dict[str, str]:
    """Every file, symlink and directory under root with its content digest."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = p.lstat()
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_dir():
                out[rel] = f"dir:{st.st_mode:o}"
            else:
                out[rel] = f"{st.st_mode:o}:" + hashlib.sha256(p.read_bytes()).hexdigest()
    return out


ACCOUNT_BINDS = ("passwd", "group", "shells", "login.defs", "default/useradd")


def reference_build(root: Path, workdir: Path) -> Path:
    """A fresh `semodule -N -p REF -B` of a copy of root, the way the issue
    describes it: host /etc account files bind-mounted over by the root's own
    under `unshare --mount`. Independent of selcache's chroot sandbox."""
    ref = workdir / "reference"
    if ref.exists():
        shutil.rmtree(ref)
    shutil.copytree(root, ref, symlinks=True)
    layout = read_layout(str(ref))
    binds = []
    for f in ACCOUNT_BINDS:
        assert (ref / "etc" / f).exists() and Path("/etc", f).exists(), f
        binds.append(f'mount --bind "{ref}/etc/{f}" "/etc/{f}"')
    argv = ["semodule", "-N", "-p", str(ref), "-s", layout.policy_type, "-B"]
    if (ref / layout.active / "disable_dontaudit").exists():
        argv.append("-D")
    if (ref / layout.active / "preserve_tunables").exists():
        argv.append("-P")
    script = "set -e\n" + "\n".join(binds) + '\nexec "$@"\n'
    subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
                    *argv], check=True, capture_output=True)
    return ref


def output_files(root: Path) -> dict[str, bytes]:
    """The files semodule -B computes, as found under a root: the store's active/
    minus inputs, and everything under etc/selinux/TYPE that libsemanage writes."""
    from selcache.inputs import LOCAL_FILES

    layout = read_layout(str(root))
    out: dict[str, bytes] = {}
    active = root / layout.active
    for p in sorted(active.rglob("*")):
        rel = str(p.relative_to(active))
        if p.is_file() and not rel.startswith("modules/") and rel not in LOCAL_FILES \
                and rel != "commit_num":
            out[f"{layout.active}/{rel}"] = p.read_bytes()
    final = root / layout.final
    for sub in ("policy", "contexts/files"):
        for p in sorted((final / sub).glob("*")):
            if p.is_file() and (sub == "policy" or p.name.startswith("file_contexts")) \
                    and not p.name.endswith("subs_dist"):
                out[str(p.relative_to(root))] = p.read_bytes()
    for name in ("seusers", "contexts/netfilter_contexts"):
        if (final / name).is_file():
            out[f"{layout.final}/{name}"] = (final / name).read_bytes()
    return out


def is_kernel_policy(rel: str) -> bool:
    return "/policy/policy." in rel or rel.endswith("/policy.kern")


def assert_matches_reference(root: Path, workdir: Path, *, semantic_policy: bool = False) -> None:
    """The root's output files equal a fresh ``semodule -B`` of its inputs,
    byte for byte. With ``semantic_policy`` (a relinked result), the kernel
    policy files need only mean the same (setools); every other file must
    still be byte-identical."""
    from selcache.analysis import semantic_differences

    ref = reference_build(root, workdir)
    got, want = output_files(root), output_files(ref)
    assert sorted(got) == sorted(want)
    differ = [p for p in want if got[p] != want[p]]
    if semantic_policy:
        for rel in [p for p in differ if is_kernel_policy(p)]:
            assert semantic_differences(want[rel], got[rel]) == {}, \
                f"{rel} differs in meaning from a fresh semodule -B"
            differ.remove(rel)
    assert not differ, f"differ from a fresh semodule -B: {differ}"


def hold_lock(path: Path, seconds: float) -> subprocess.Popen[bytes]:
    """Another process holding an flock on ``path`` for ``seconds``; returns
    once it really holds it, so that what runs next contends for it."""
    import fcntl
    import time

    holder = subprocess.Popen(["flock", str(path), "sleep", str(seconds)])
    fd = os.open(path, os.O_RDONLY)
    try:
        for _ in range(250):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return holder
            fcntl.flock(fd, fcntl.LOCK_UN)
            time.sleep(0.02)
    finally:
        os.close(fd)
    holder.kill()
    raise AssertionError(f"the holder never took {path}")
