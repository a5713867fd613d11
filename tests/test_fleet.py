"""Fleet simulation on Debian's real refpolicy: one builder compiles, twenty
machines with the same inputs install its signed output set from a shared
Redis without compiling, and get the bytes a fresh semodule -B gives."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

import selcache
from selcache import sample
from selcache.layout import read_layout
from selcache.store import Manifest

from .conftest import assert_matches_reference, output_files
from .fleet import Keys, RedisServer, builder, client, counters, no_compile
from .scenarios import booleans_local, module_added

pytestmark = pytest.mark.refpolicy

FLEET = 20


def customize(root: Path) -> None:
    """The fleet's own customization on top of the image: a boolean and a module."""
    booleans_local(root)
    module_added(root)


def digests(root: Path) -> dict[str, str]:
    return {p: hashlib.sha256(data).hexdigest() for p, data in output_files(root).items()}


@pytest.fixture
def staged(ref_root: Path, tmp_path: Path, redis_server: RedisServer, keys: Keys) -> str:
    customize(ref_root)
    result = selcache.stage(str(ref_root), str(tmp_path / "builder-cache"),
                            remote=builder(redis_server, keys))
    assert result.action == "compiled"
    return result.key


def test_fleet_installs_the_builders_compile(staged: str, tmp_path: Path,
                                             redis_server: RedisServer, keys: Keys) -> None:
    server_keys = redis_server.keys()
    pristine = sample.pristine_root("refpolicy")
    first: Path | None = None
    first_digests: dict[str, str] = {}
    for i in range(FLEET):
        root = sample.copy_root(pristine, tmp_path / f"machine{i}")
        customize(root)
        before = digests(root)
        cache_dir = str(tmp_path / f"cache{i}")
        result = selcache.finalize(str(root), cache_dir, runner=no_compile,
                                   remote=client(redis_server, keys))
        assert (result.action, result.source, result.key) == ("reused", "remote", staged)
        assert result.compile_seconds is None
        assert counters(cache_dir) == {"hits": 0, "misses": 0, "remote_hits": 1,
                                       "remote_misses": 0, "remote_refused": 0,
                                       "remote_errors": 0, "remote_uploads": 0}
        got = digests(root)
        assert got != before
        if first is None:
            first, first_digests = root, got
        else:
            assert got == first_digests, f"machine{i} differs from machine0"
            shutil.rmtree(root)
    assert first is not None
    assert_matches_reference(first, tmp_path)
    assert redis_server.keys() == server_keys  # read-only machines wrote nothing


def test_machine_with_another_boolean_compiles_its_own(staged: str, tmp_path: Path,
                                                       redis_server: RedisServer,
                                                       keys: Keys) -> None:
    with redis_server.client() as c:
        staged_manifest = Manifest.from_bytes(c.hget(f"selcache:v1:entry:{staged}", "manifest"))
    builder_policy = {f.path: f.sha256 for f in staged_manifest.files if "/policy/policy." in f.path}
    root = sample.copy_root(sample.pristine_root("refpolicy"), tmp_path / "odd")
    customize(root)
    active = root / read_layout(str(root)).active
    (active / "booleans.local").write_text("httpd_can_network_connect=0\n")
    cache_dir = str(tmp_path / "odd-cache")
    result = selcache.finalize(str(root), cache_dir, remote=client(redis_server, keys))
    assert result.action == "rebuilt" and result.key != staged
    assert counters(cache_dir)["remote_misses"] == 1
    assert_matches_reference(root, tmp_path)
    mine = {p: d for p, d in digests(root).items() if "/policy/policy." in p}
    assert mine.keys() == builder_policy.keys() and mine != builder_policy
