"""The same guarantees on Debian's real refpolicy (331 modules): slow, marked."""

from __future__ import annotations

from pathlib import Path

import pytest

import selcache
from selcache.layout import read_layout
from selcache.store import Cache

from .conftest import assert_matches_reference, output_files, tree_digest
from .scenarios import SCENARIOS, booleans_local, finalize_scenario

pytestmark = pytest.mark.refpolicy


@pytest.mark.parametrize("name", [pytest.param(n, id=n) for n in SCENARIOS])
def test_scenario_matches_fresh_semodule(name: str, ref_root: Path, cache_dir: str,
                                         tmp_path: Path) -> None:
    finalize_scenario(name, ref_root, cache_dir, tmp_path)


def test_reverted_change_is_reused(ref_root: Path, cache_dir: str, tmp_path: Path) -> None:
    original = output_files(ref_root)
    selcache.stage(str(ref_root), cache_dir)
    booleans_local(ref_root)
    # The stage compiled this module set: a boolean-only change relinks.
    assert selcache.finalize(str(ref_root), cache_dir).action == "relinked"
    (ref_root / read_layout(str(ref_root)).active / "booleans.local").unlink()
    reverted = selcache.finalize(str(ref_root), cache_dir)
    assert reverted.action == "reused"
    assert output_files(ref_root) == original
    assert_matches_reference(ref_root, tmp_path)


def test_bad_module_fails_with_semodule_message_and_root_untouched(
        ref_root: Path, cache_dir: str) -> None:
    from .scenarios import POLICIES, add_module

    add_module(ref_root, "bad", POLICIES / "broken/bad.cil")
    before = tree_digest(ref_root)
    with pytest.raises(selcache.CompileError) as info:
        selcache.finalize(str(ref_root), cache_dir)
    assert "Failed to resolve" in str(info.value)
    assert tree_digest(ref_root) == before


def test_missing_cil_is_converted_installed_and_then_unchanged(
        ref_root: Path, cache_dir: str, tmp_path: Path) -> None:
    """A module with only its HLL (.pp) file: the compile converts it, the
    converted CIL is installed like semodule -B would, and the root's new key
    (now with the CIL present) is already known."""
    cil = ref_root / read_layout(str(ref_root)).active / "modules/100/games/cil"
    original = cil.read_bytes()
    cil.unlink()
    first = selcache.finalize(str(ref_root), cache_dir)
    assert first.action == "rebuilt"
    assert cil.read_bytes() == original  # libsemanage's conversion is deterministic
    assert_matches_reference(ref_root, tmp_path)
    again = selcache.finalize(str(ref_root), cache_dir)
    assert again.action == "unchanged" and again.key != first.key

    # Another root with the same HLL and no CIL, plus a new module: the
    # rebuild is handed the earlier conversion before semodule runs.
    from selcache import sample
    from selcache.runner import run

    from .scenarios import POLICIES, add_module

    second = sample.copy_root(sample.pristine_root("refpolicy"), tmp_path / "second")
    (second / cil.relative_to(ref_root)).unlink()
    add_module(second, "demoapp", POLICIES / "refpolicy" / "demoapp.cil")
    work = tmp_path / "work"
    work.mkdir()
    seen: list[bytes] = []

    def inspecting(argv: list[str]) -> object:
        for found in work.glob(f"selcache-sandbox-*/{cil.relative_to(ref_root)}"):
            seen.append(found.read_bytes())
        return run(argv)

    result = selcache.finalize(str(second), cache_dir, runner=inspecting,  # type: ignore[arg-type]
                               workdir=str(work))
    assert result.action == "rebuilt"
    assert seen == [original], "the cached conversion was not put in place before semodule"
    assert (second / cil.relative_to(ref_root)).read_bytes() == original
    assert_matches_reference(second, tmp_path)


def test_boolean_change_is_relinked_without_a_cil_compile_then_reverted_and_module_added(
        ref_root: Path, cache_dir: str, tmp_path: Path) -> None:
    from selcache.runner import run

    from .scenarios import POLICIES, add_module

    argvs: list[str] = []

    def recording(argv: list[str]) -> object:
        argvs.append(" ".join(argv))
        return run(argv)

    first = selcache.finalize(str(ref_root), cache_dir)
    assert first.action == "rebuilt"
    booleans_local(ref_root)
    relinked = selcache.finalize(str(ref_root), cache_dir, runner=recording)  # type: ignore[arg-type]
    assert relinked.action == "relinked"
    assert len(argvs) == 1 and "semodule" not in argvs[0] and "semanage_commit" in argvs[0]
    assert_matches_reference(ref_root, tmp_path, semantic_policy=True)
    with Cache(cache_dir) as cache:
        manifest = cache.get_manifest(relinked.key)
        assert manifest is not None and manifest.compile_path == "relinked"
    (ref_root / read_layout(str(ref_root)).active / "booleans.local").unlink()
    reverted = selcache.finalize(str(ref_root), cache_dir)
    assert reverted.action == "reused" and reverted.key == first.key
    add_module(ref_root, "demoapp", POLICIES / "refpolicy" / "demoapp.cil")
    assert selcache.finalize(str(ref_root), cache_dir).action == "rebuilt"
