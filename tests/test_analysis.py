"""Semantic comparison of compiled policies (selcache.analysis, setools), on
real compiles of the small policy: every change is made to a root's inputs,
compiled by semodule through finalize, and the installed policy.33 compared
with the one before."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import selcache
from selcache import analysis
from selcache.errors import InvalidPolicy

from .conftest import REPO
from .scenarios import (
    POLICIES,
    add_module,
    booleans_local,
    disable_dontaudit,
    fcontext_local,
    module_added,
    priority_override,
)

POLICY = "etc/selinux/small/policy/policy.33"
ACTIVE = "var/lib/selinux/small/active"
MYAPP = (POLICIES / "extra/myapp.cil").read_text()


def rebuilt(root: Path, cache_dir: str, *changes: Callable[[Path], None]) -> bytes:
    """Apply ``changes`` to the root's inputs, compile and install them
    (semodule -B through finalize), and return the new kernel policy."""
    for change in changes:
        change(root)
    result = selcache.finalize(str(root), cache_dir)
    assert result.action == "rebuilt"
    return (root / POLICY).read_bytes()


def top_level_forms(cil: str) -> list[str]:
    forms, depth, current = [], 0, ""
    for line in cil.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith(";")):
            continue
        current += line + "\n"
        depth += line.count("(") - line.count(")")
        if depth == 0:
            forms.append(current)
            current = ""
    return forms


def test_policy_compared_with_itself(small_root: Path) -> None:
    data = (small_root / POLICY).read_bytes()
    assert analysis.semantic_differences(small_root / POLICY, data) == {}
    quick = analysis.compare(small_root / POLICY, data)
    assert quick["identical"] is True and quick["differences"] == {}
    # The comparison saw the rules: every kind is counted on both sides.
    assert quick["rules"]["allow"]["left"] == quick["rules"]["allow"]["right"] > 0
    assert quick["rules"]["dontaudit"]["left"] > 0 and quick["rules"]["role_allow"]["left"] > 0


def test_reordered_rebuild_differs_in_bytes_only(small_root: Path, cache_dir: str,
                                                 tmp_path: Path) -> None:
    """The web module again at priority 400 with its statements in reverse
    order: CIL numbers the types differently, the meaning is the same."""
    before = (small_root / POLICY).read_bytes()
    reordered = tmp_path / "web.cil"
    reordered.write_text("".join(reversed(top_level_forms(
        (POLICIES / "small/web.cil").read_text()))))
    after = rebuilt(small_root, cache_dir, lambda r: add_module(r, "web", reordered))
    assert after != before
    assert analysis.semantic_differences(before, after) == {}
    assert analysis.compare(before, after)["identical"] is True


def test_boolean_default_flip_is_the_only_difference(small_root: Path, cache_dir: str) -> None:
    before = (small_root / POLICY).read_bytes()
    after = rebuilt(small_root, cache_dir, booleans_local)
    assert analysis.semantic_differences(before, after) == {"booleans": {
        "added": [], "removed": [],
        "modified": [{"name": "httpd_can_network_connect", "from": False, "to": True}]}}
    back = analysis.semantic_differences(after, before)
    assert back["booleans"]["modified"] == [
        {"name": "httpd_can_network_connect", "from": True, "to": False}]


def test_module_added_shows_types_attributes_roles_booleans_and_rules(
        small_root: Path, cache_dir: str) -> None:
    before = (small_root / POLICY).read_bytes()
    after = rebuilt(small_root, cache_dir, module_added)
    declared = sorted(re.findall(r"^\(type (\w+)\)", MYAPP, re.M))
    booleans = re.findall(r"^\(boolean (\w+) (true|false)\)", MYAPP, re.M)

    full = analysis.compare(before, after, full=True)
    diff = full["differences"]
    assert diff["types"] == {"added": declared, "removed": [], "modified": []}
    assert diff["booleans"]["added"] == [{"name": n, "default": v == "true"} for n, v in booleans]
    assert "domain: types +myapp_t" in diff["type_attributes"]["modified"]
    assert "system_r: types +myapp_t" in diff["roles"]["modified"]
    # Rules myapp.cil writes itself, as setools expands them.
    allow = full["rule_changes"]["allow"]
    assert "allow myapp_t myapp_data_t:dir { getattr ioctl lock open read search };" \
        in allow["added"]
    assert any(r.startswith("allow myapp_t myapp_data_t:file {") and
               r.endswith("[ myapp_enabled ]:True") for r in allow["added"])
    assert allow["removed"] == [] and allow["modified"] == []
    assert full["rules"]["allow"]["added"] == len(allow["added"])
    assert any(r.startswith("dontaudit myapp_t ") for r in full["rule_changes"]["dontaudit"]["added"])
    assert full["rule_changes"]["type_transition"]["added"] == [
        "type_transition init_t myapp_exec_t:process myapp_t;"]
    assert full["identical"] is False

    # Quick: the same symbols, and the stored rules counted.
    quick = analysis.compare(before, after)
    assert quick["differences"] == diff
    assert quick["rule_changes"] == {}
    assert quick["rules"]["allow"]["added"] > 0 and quick["rules"]["allow"]["removed"] == 0
    assert quick["rules"]["allow"]["right"] == quick["rules"]["allow"]["left"] + \
        quick["rules"]["allow"]["added"]

    # The other way round, the module is removed.
    removed = analysis.semantic_differences(after, before)
    assert removed["types"] == {"added": [], "removed": declared, "modified": []}
    assert removed["allow"]["removed"] == allow["added"]


def test_priority_override_changes_rules_ports_and_defaults(small_root: Path,
                                                            cache_dir: str) -> None:
    before = (small_root / POLICY).read_bytes()
    after = rebuilt(small_root, cache_dir, priority_override)
    diff = analysis.semantic_differences(before, after)
    assert diff["portcons"]["added"] == ["portcon tcp 8443 system_u:object_r:http_port_t"]
    assert {"name": "httpd_enable_homedirs", "from": False, "to": True} \
        in diff["booleans"]["modified"]
    assert any(r.startswith("allow httpd_t tmp_t:file ") for r in diff["allow"]["added"])
    assert "types" not in diff


@pytest.mark.parametrize(("local", "line", "category", "expected"), [
    pytest.param("ports.local", "portcon tcp 8081 system_u:object_r:http_port_t", "portcons",
                 "portcon tcp 8081 system_u:object_r:http_port_t", id="port"),
    pytest.param("nodes.local", "nodecon ipv4 10.0.0.0 255.0.0.0 system_u:object_r:lo_node_t",
                 "nodecons", "nodecon 10.0.0.0 255.0.0.0 system_u:object_r:lo_node_t", id="node"),
    pytest.param("interfaces.local",
                 "netifcon eth0 system_u:object_r:lo_netif_t system_u:object_r:unlabeled_t",
                 "netifcons",
                 "netifcon eth0 system_u:object_r:lo_netif_t system_u:object_r:unlabeled_t",
                 id="interface"),
    pytest.param("users.local", "user test_u roles { user_r } ;", "users", "test_u", id="user"),
])
def test_local_customization_shows_in_its_category(small_root: Path, cache_dir: str, local: str,
                                                   line: str, category: str,
                                                   expected: str) -> None:
    before = (small_root / POLICY).read_bytes()
    after = rebuilt(small_root, cache_dir,
                    lambda r: (r / ACTIVE / local).write_text(line + "\n"))
    diff = analysis.semantic_differences(before, after)
    assert diff == {category: {"added": [expected], "removed": [], "modified": []}}


def test_fcontext_change_is_not_in_the_kernel_policy(small_root: Path, cache_dir: str) -> None:
    fc = small_root / "etc/selinux/small/contexts/files/file_contexts"
    fc_before, before = fc.read_bytes(), (small_root / POLICY).read_bytes()
    after = rebuilt(small_root, cache_dir, fcontext_local)
    assert (small_root / "etc/selinux/small/contexts/files/file_contexts.local").exists()
    assert fc.read_bytes() == fc_before
    assert analysis.semantic_differences(before, after) == {}


def test_disable_dontaudit_removes_every_dontaudit_rule(small_root: Path, cache_dir: str) -> None:
    before = (small_root / POLICY).read_bytes()
    after = rebuilt(small_root, cache_dir, disable_dontaudit)
    quick = analysis.compare(before, after)
    stored = quick["rules"]["dontaudit"]
    assert stored["right"] == 0 and stored["removed"] == stored["left"] > 0
    assert quick["rules"]["allow"]["added"] == quick["rules"]["allow"]["removed"] == 0
    full = analysis.semantic_differences(before, after)
    assert set(full) == {"dontaudit"} and full["dontaudit"]["added"] == []
    assert all(r.startswith("dontaudit ") for r in full["dontaudit"]["removed"])


def test_overlapping_ports_in_another_order_are_a_difference(tmp_path: Path,
                                                             cache_dir: str) -> None:
    """The kernel labels a port with the first matching portcon. Local ports
    come before the modules' ones, so the same two statements, one from a
    module and one local, label tcp 9005 differently depending on which is
    local. setools compares portcons as a set and sees nothing."""
    from selcache import sample

    policies = []
    for name, module_port, local_port in (
            ("a", "tcp 9005 (system_u object_r ssh_port_t low_low)",
             "portcon tcp 9000-9010 system_u:object_r:http_port_t"),
            ("b", "tcp (9000 9010) (system_u object_r http_port_t low_low)",
             "portcon tcp 9005 system_u:object_r:ssh_port_t")):
        root = sample.copy_root(sample.pristine_root("small"), tmp_path / name)
        module = tmp_path / f"ports-{name}.cil"
        module.write_text(f"(portcon {module_port})\n")
        add_module(root, "extraports", module)
        (root / ACTIVE / "ports.local").write_text(local_port + "\n")
        policies.append(rebuilt(root, cache_dir))
    diff = analysis.semantic_differences(*policies)
    assert "portcons" not in diff
    assert diff == {"portcon_order": {"added": [], "removed": [], "modified": [
        "portcon tcp 9005 system_u:object_r:ssh_port_t now precedes "
        "portcon tcp 9000-9010 system_u:object_r:http_port_t"]}}


def test_compared_with_nothing_everything_is_added(small_root: Path) -> None:
    policy = small_root / POLICY
    against_self = analysis.compare(policy, policy)
    for full in (False, True):
        fresh = analysis.compare(None, policy, full=full)
        assert fresh["left"] is None and fresh["identical"] is False
        assert {k: c["added"] for k, c in fresh["rules"].items()} == \
            {k: c["right"] for k, c in against_self["rules"].items()}
        assert len(fresh["differences"]["types"]["added"]) == len(re.findall(
            r"^\(type \w+\)", "".join(p.read_text() for p in (POLICIES / "small").glob("*.cil")),
            re.M))
        assert {"name": "httpd_can_network_connect", "default": False} \
            in fresh["differences"]["booleans"]["added"]
        assert (fresh["rule_changes"] != {}) is full


@pytest.mark.parametrize("full", [pytest.param(False, id="quick"), pytest.param(True, id="full")])
def test_progress_reports_every_step(small_root: Path, full: bool) -> None:
    calls: list[tuple[str, int, int]] = []
    analysis.compare(small_root / POLICY, small_root / POLICY, full=full,
                     progress=lambda *a: calls.append(a))
    totals = {t for _, _, t in calls}
    assert len(totals) == 1
    total = totals.pop()
    assert [d for _, d, _ in calls] == list(range(total)) + [total]
    assert calls[-1][0] == "done"
    phases = [p for p, _, _ in calls]
    assert "booleans" in phases and "role allow rules" in phases
    assert ("allow rules" in phases) is full


@pytest.mark.parametrize("damage", [
    pytest.param(lambda data: data[:5000], id="truncated"),
    pytest.param(lambda data: b"not a policy\n", id="garbage"),
])
def test_unreadable_policy_is_a_clear_error(small_root: Path,
                                            damage: Callable[[bytes], bytes]) -> None:
    good = (small_root / POLICY).read_bytes()
    with pytest.raises(InvalidPolicy, match="installed.*not a readable binary SELinux policy") \
            as exc:
        analysis.compare(damage(good), good, labels=("installed", "pending"))
    assert exc.value.exit_code == 3


def test_setools_stays_off_the_finalize_path(small_root: Path, cache_dir: str) -> None:
    code = (
        "import sys, selcache, selcache.cli, selcache.pipeline\n"
        "assert 'setools' not in sys.modules, 'imported by selcache'\n"
        f"first = selcache.finalize({str(small_root)!r}, {cache_dir!r})\n"
        f"second = selcache.finalize({str(small_root)!r}, {cache_dir!r})\n"
        "assert (first.action, second.action) == ('rebuilt', 'unchanged'), (first, second)\n"
        "assert 'setools' not in sys.modules, 'imported by finalize'\n"
        "import selcache.analysis\n"
        "assert 'setools' not in sys.modules, 'imported by selcache.analysis'\n"
        "selcache.analysis.compare(None, sys.argv[1])\n"
        "assert 'setools' in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(small_root / POLICY)], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_attribute_membership_change_expands_to_rule_changes(small_root: Path, cache_dir: str,
                                                            tmp_path: Path) -> None:
    """httpd_t joins an attribute: the rule written on the attribute is
    stored the same in both policies, the rule the kernel enforces is not.
    The quick diff's shortcut (same stored rules -> same rules) must not hide it."""
    module = tmp_path / "joinme.cil"

    def members(types: str) -> Callable[[Path], None]:
        def change(root: Path) -> None:
            module.write_text(f"(typeattribute joinme)\n(typeattributeset joinme ({types}))\n"
                              "(allow joinme etc_t (file (write)))\n")
            add_module(root, "joinme", module)
        return change

    before = rebuilt(small_root, cache_dir, members("user_t staff_t"))
    after = rebuilt(small_root, cache_dir, members("user_t staff_t httpd_t"))
    quick = analysis.compare(before, after)
    assert quick["differences"] == {
        "types": {"added": [], "removed": [], "modified": ["httpd_t: attributes +joinme"]},
        "type_attributes": {"added": [], "removed": [], "modified": ["joinme: types +httpd_t"]}}
    assert quick["rules"]["allow"]["added"] == quick["rules"]["allow"]["removed"] == 0
    assert quick["identical"] is False
    diff = analysis.semantic_differences(before, after)
    assert set(diff) == {"types", "type_attributes", "allow"}
    [modified] = diff["allow"]["modified"]
    assert modified.startswith("allow httpd_t etc_t:file {") and modified.endswith(": perms +write")
    assert diff["allow"]["added"] == diff["allow"]["removed"] == []
