"""Property test: random sequences of changes to a root, each followed by
finalize, always install what a fresh `semodule -B` of the same inputs gives
(bytes; the kernel policy by meaning when relinked), and `explain` always
names exactly the components that changed.

One cache serves every example, so later examples meet entries of earlier
ones: reused, relinked and rebuilt paths all come up.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import selcache
from selcache import sample
from selcache.inputs import discover_inputs
from selcache.key import diff_components
from selcache.layout import read_layout

from .conftest import assert_matches_reference
from .scenarios import POLICIES, add_module

pytestmark = pytest.mark.timeout(900)


def _active(root: Path) -> Path:
    return root / read_layout(str(root)).active


def _set_line(path: Path, key: str, line: str | None) -> None:
    """Replace the line starting with ``key`` (or drop it with None)."""
    lines = path.read_text().splitlines() if path.exists() else []
    lines = [ln for ln in lines if not ln.startswith(key)]
    if line is not None:
        lines.append(line)
    path.write_text("".join(f"{ln}\n" for ln in lines))


def module_add(root: Path) -> None:
    add_module(root, "myapp", POLICIES / "extra/myapp.cil")


def module_remove(root: Path) -> None:
    shutil.rmtree(_active(root) / "modules/400/myapp", ignore_errors=True)
    (_active(root) / "modules/disabled/myapp").unlink(missing_ok=True)


def module_toggle(name: str, disabled: bool) -> Callable[[Path], None]:
    def change(root: Path) -> None:
        marker = _active(root) / "modules/disabled" / name
        if disabled:
            marker.parent.mkdir(exist_ok=True)
            marker.write_text("")
        else:
            marker.unlink(missing_ok=True)
    return change


def override(on: bool) -> Callable[[Path], None]:
    def change(root: Path) -> None:
        if on:
            add_module(root, "web", POLICIES / "override/web.cil")
        else:
            shutil.rmtree(_active(root) / "modules/400/web", ignore_errors=True)
    return change


def boolean(name: str, value: int | None) -> Callable[[Path], None]:
    def change(root: Path) -> None:
        _set_line(_active(root) / "booleans.local", f"{name}=",
                  None if value is None else f"{name}={value}")
    return change


def port(number: int, kind: str | None) -> Callable[[Path], None]:
    def change(root: Path) -> None:
        _set_line(_active(root) / "ports.local", f"portcon tcp {number} ",
                  None if kind is None else f"portcon tcp {number} system_u:object_r:{kind}")
    return change


def fcontext(path: str, kind: str | None) -> Callable[[Path], None]:
    def change(root: Path) -> None:
        _set_line(_active(root) / "file_contexts.local", f"{path} ",
                  None if kind is None else f"{path}    system_u:object_r:{kind}")
    return change


def seuser(login: str, user: str | None) -> Callable[[Path], None]:
    def change(root: Path) -> None:
        _set_line(_active(root) / "seusers.local", f"{login}:",
                  None if user is None else f"{login}:{user}")
    return change


def home(login: str, uid: int, where: str | None) -> Callable[[Path], None]:
    def change(root: Path) -> None:
        _set_line(root / "etc/passwd", f"{login}:",
                  None if where is None else f"{login}:x:{uid}:{uid}::{where}/{login}:/bin/sh")
    return change


def dontaudit(on: bool) -> Callable[[Path], None]:
    def change(root: Path) -> None:
        flag = _active(root) / "disable_dontaudit"
        if on:
            flag.write_text("")
        else:
            flag.unlink(missing_ok=True)
    return change


MUTATIONS = st.one_of(
    st.just(("module add myapp", module_add)),
    st.just(("module remove myapp", module_remove)),
    st.sampled_from([(f"module {n} {'disabled' if d else 'enabled'}", module_toggle(n, d))
                     for n in ("myapp", "web") for d in (True, False)]),
    st.sampled_from([(f"override web {on}", override(on)) for on in (True, False)]),
    st.builds(lambda n, v: (f"boolean {n}={v}", boolean(n, v)),
              st.sampled_from(["nis_enabled", "user_tcp_server", "user_exec_content"]),
              st.sampled_from([0, 1, None])),
    st.builds(lambda p, k: (f"port {p} {k}", port(p, k)),
              st.sampled_from([8080, 8443, 5353]),
              st.sampled_from(["ssh_port_t", "dns_port_t", None])),
    st.builds(lambda p, k: (f"fcontext {p} {k}", fcontext(p, k)),
              st.sampled_from(["/srv/data(/.*)?", "/opt/tool/bin(/.*)?"]),
              st.sampled_from(["etc_t", "tmp_t", None])),
    st.builds(lambda u, s: (f"seuser {u} {s}", seuser(u, s)),
              st.sampled_from(["alice", "bob"]), st.sampled_from(["user_u", "staff_u", None])),
    st.builds(lambda w: (f"home carol {w}", home("carol", 1002, w)),
              st.sampled_from(["/srv/home", "/home", None])),
    st.sampled_from([(f"disable_dontaudit {on}", dontaudit(on)) for on in (True, False)]),
)


def _components(root: Path) -> dict[str, str]:
    return dict(discover_inputs(read_layout(str(root))).components)


@settings(max_examples=int(os.environ.get("SELCACHE_PROPERTY_EXAMPLES", "200")), deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(steps=st.lists(MUTATIONS, min_size=1, max_size=3))
def test_random_changes_always_install_what_semodule_would(
        steps: list[tuple[str, Callable[[Path], None]]], tmp_path_factory: pytest.TempPathFactory,
        shared_cache: str) -> None:
    work = tmp_path_factory.mktemp("example")
    root = sample.copy_root(sample.pristine_root("small"), work / "root")
    try:
        installed = selcache.finalize(str(root), shared_cache).key
        for name, change in steps:
            before = _components(root)
            change(root)
            explained = selcache.explain(str(root), shared_cache)
            result = selcache.finalize(str(root), shared_cache)
            assert explained["action"] == result.action, name
            changed = set(diff_components(before, _components(root)))
            base = explained["base"]
            if base is not None and base["key"] == installed and result.key != installed:
                # Compared with what was installed: exactly this step's changes.
                assert {c["component"] for c in explained["changes"]} == changed, name
                for c in explained["changes"]:
                    if c["component"].startswith("module:"):
                        assert f"module {c['component'][7:]} " in c["detail"], c
            assert result.compiled_as in ("rebuilt", "relinked")
            assert_matches_reference(root, work,
                                     semantic_policy=result.compiled_as == "relinked")
            installed = result.key
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("cache") / "cache")
