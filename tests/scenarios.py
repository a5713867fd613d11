"""Changes to a root's inputs, as an update or an /etc merge leaves them: the
store's input files change, its computed files and the final policy do not."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from selcache.inputs import discover_inputs
from selcache.key import diff_components
from selcache.layout import read_layout

POLICIES = Path(__file__).resolve().parent.parent / "policies"


def _active(root: Path) -> Path:
    return root / read_layout(str(root)).active


def add_module(root: Path, name: str, src: Path, priority: int = 400) -> None:
    d = _active(root) / "modules" / str(priority) / name
    d.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, d / "cil")
    (d / "lang_ext").write_text("cil")


def nothing(root: Path) -> None:
    pass


def module_added(root: Path) -> None:
    if read_layout(str(root)).policy_type == "small":
        add_module(root, "myapp", POLICIES / "extra/myapp.cil")
    else:
        add_module(root, "demoapp", POLICIES / "refpolicy/demoapp.cil")


def module_disabled(root: Path) -> None:
    name = "web" if read_layout(str(root)).policy_type == "small" else "games"
    d = _active(root) / "modules/disabled"
    d.mkdir(exist_ok=True)
    (d / name).write_text("")


def module_removed(root: Path) -> None:
    name = "web" if read_layout(str(root)).policy_type == "small" else "uml"
    shutil.rmtree(_active(root) / "modules/100" / name)


def priority_override(root: Path) -> None:
    if read_layout(str(root)).policy_type == "small":
        add_module(root, "web", POLICIES / "override/web.cil")
    else:
        # An override of a real module: its own CIL, extended by one filecon.
        import bz2
        src = _active(root) / "modules/100/apache/cil"
        text = bz2.decompress(src.read_bytes()).decode()
        text += '\n(filecon "/srv/www(/.*)?" any (system_u object_r httpd_sys_content_t ((s0) (s0))))\n'
        d = _active(root) / "modules/400/apache"
        d.mkdir(parents=True)
        (d / "cil").write_text(text)
        (d / "lang_ext").write_text("cil")


def booleans_local(root: Path) -> None:
    # As an /etc merge leaves it: edited by hand, not through semanage.
    (_active(root) / "booleans.local").write_text("httpd_can_network_connect=1\n")


def fcontext_local(root: Path) -> None:
    # The small policy is not MLS: its contexts have no level.
    level = "" if read_layout(str(root)).policy_type == "small" else ":s0"
    (_active(root) / "file_contexts.local").write_text(
        f"/srv/data(/.*)?    system_u:object_r:etc_t{level}\n")


def new_home_root(root: Path) -> None:
    with open(root / "etc/passwd", "a") as fh:
        fh.write("carol:x:1002:1002:Carol:/srv/home/carol:/bin/bash\n")


def policy_version(root: Path) -> None:
    with open(root / "etc/selinux/semanage.conf", "a") as fh:
        fh.write("policy-version = 31\n")


def disable_dontaudit(root: Path) -> None:
    (_active(root) / "disable_dontaudit").write_text("")


SCENARIOS: dict[str, Callable[[Path], None]] = {
    "nothing": nothing,
    "module-added": module_added,
    "module-disabled": module_disabled,
    "module-removed": module_removed,
    "priority-400-override": priority_override,
    "booleans-local-hand-edit": booleans_local,
    "file-contexts-local-added": fcontext_local,
    "new-home-root-in-passwd": new_home_root,
    "policy-version-changed": policy_version,
    "disable-dontaudit": disable_dontaudit,
}


def _components(root: Path) -> dict[str, str]:
    return dict(discover_inputs(read_layout(str(root))).components)


#: Scenarios whose only changes are local customizations or accounts: with
#: the module set already compiled, finalize relinks them.
RELINKED = frozenset({"booleans-local-hand-edit", "file-contexts-local-added",
                      "new-home-root-in-passwd"})


def finalize_scenario(name: str, root: Path, cache_dir: str, workdir: Path, *,
                      warm: bool = False) -> str:
    """Apply scenario ``name``, finalize, and check the result against a fresh
    semodule -B of the same inputs. ``warm``: finalize once before the change,
    so the cache holds the unchanged module set. Returns the key finalize
    reported."""
    import selcache

    from .conftest import assert_matches_reference, output_files

    if warm:
        selcache.finalize(str(root), cache_dir)
    before = output_files(root)
    old = _components(root)
    SCENARIOS[name](root)
    explained = selcache.explain(str(root), cache_dir)
    result = selcache.finalize(str(root), cache_dir)
    assert explained["action"] == result.action
    if warm:
        # explain names exactly the components that changed, each in words.
        changed = diff_components(old, _components(root))
        assert {c["component"] for c in explained["changes"]} == set(changed), (explained, changed)
        for c in explained["changes"]:
            if c["component"].startswith("module:"):
                assert f"module {c['component'][7:]} " in c["detail"]
            assert c["detail"] and c["detail"] != f"{c['component']} {c['change']}", c
    if name == "nothing":
        assert result.written == ()
        assert result.action == ("unchanged" if warm else "rebuilt")
    else:
        assert result.action == ("relinked" if warm and name in RELINKED else "rebuilt")
        assert output_files(root) != before
    assert_matches_reference(root, workdir, semantic_policy=result.action == "relinked")
    # Finalize changed no input: the same inputs are now installed.
    assert selcache.status(str(root), cache_dir)["key"] == result.key
    return result.key
