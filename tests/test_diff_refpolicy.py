"""`selcache diff` on Debian's real refpolicy (331 modules): slow, marked."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import selcache

from .scenarios import POLICIES, booleans_local, module_added

pytestmark = pytest.mark.refpolicy

DEMOAPP = (POLICIES / "refpolicy/demoapp.cil").read_text()


def test_quick_diff_of_a_boolean_change_and_a_module_add(ref_root: Path, cache_dir: str) -> None:
    booleans_local(ref_root)
    module_added(ref_root)
    doc = selcache.diff(str(ref_root), cache_dir)
    assert doc["pending"]["source"] == "compiled" and doc["mode"] == "quick"
    assert doc["pending"]["policy"]["mls"] is True
    diff = doc["differences"]
    assert set(diff) == {"types", "type_attributes", "roles", "booleans"}
    assert diff["types"] == {"added": sorted(re.findall(r"^\(type (\w+)\)", DEMOAPP, re.M)),
                             "removed": [], "modified": []}
    assert diff["booleans"] == {
        "added": [{"name": "demoapp_can_network", "default": False}], "removed": [],
        "modified": [{"name": "httpd_can_network_connect", "from": False, "to": True}]}
    assert "system_r: types +demoapp_t" in diff["roles"]["modified"]
    allow = doc["rules"]["allow"]
    written = len(re.findall(r"\(allow ", DEMOAPP))
    assert allow["added"] >= written and allow["removed"] == 0
    assert allow["right"] == allow["left"] + allow["added"]
    assert doc["rule_changes"] == {}

    # Once installed, the pending policy is the installed one.
    selcache.finalize(str(ref_root), cache_dir)
    after = selcache.diff(str(ref_root), cache_dir)
    assert after["pending"]["source"] == "cache"
    assert after["byte_identical"] is True and after["identical"] is True
