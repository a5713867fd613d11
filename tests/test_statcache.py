"""After an install, the stat caches vouch for the files the install linked or
wrote (their ctime moved, their content did not), and for nothing else."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import selcache
from selcache import fsutil, inputs, pipeline
from selcache.layout import CONFIG_REL, SEMANAGE_CONF_REL, read_layout

from .conftest import assert_matches_reference
from .scenarios import booleans_local


@pytest.fixture
def no_racy_window(monkeypatch: pytest.MonkeyPatch) -> None:
    # Files a test has just written are "racy" for 2 s and never cached; the
    # behaviour under test is what happens to cached entries.
    monkeypatch.setattr(inputs, "RACY_NS", 0)


def _reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    seen: list[str] = []
    real = fsutil.read_at

    def read_at(dir_fd: int, name: str, *, what: str = "", **kw: int) -> bytes:
        seen.append(what or name)
        return real(dir_fd, name, what=what, **kw)

    monkeypatch.setattr(fsutil, "read_at", read_at)
    return seen


@pytest.mark.usefixtures("no_racy_window")
def test_nothing_is_read_again_after_an_install(small_root: Path, cache_dir: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    selcache.finalize(str(small_root), cache_dir)
    booleans_local(small_root)
    installed = selcache.finalize(str(small_root), cache_dir)
    # A boolean-only change: relinked, and every store file linked anew.
    assert installed.action == "relinked" and installed.written

    reads = _reads(monkeypatch)
    again = selcache.finalize(str(small_root), cache_dir)
    assert again.action == "unchanged"
    # Only the config, which read_layout parses on every run; no store input,
    # no installed output.
    assert sorted(reads) == [CONFIG_REL, SEMANAGE_CONF_REL]


@pytest.mark.usefixtures("no_racy_window")
def test_a_file_written_during_the_install_is_read_again(
        small_root: Path, cache_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """booleans.local is rewritten in place (same inode, same size) after the
    install linked it: its mtime moved, so the stat cache must not vouch for it."""
    selcache.finalize(str(small_root), cache_dir)
    booleans_local(small_root)  # httpd_can_network_connect=1
    booleans = small_root / read_layout(str(small_root)).active / "booleans.local"
    real = pipeline.install_outputs

    def install_then_edit(*args: object) -> object:
        report = real(*args)  # type: ignore[arg-type]
        time.sleep(0.05)  # a later timestamp tick than the write the key saw
        with open(booleans, "r+b") as fh:
            fh.write(b"httpd_can_network_connect=0\n")
        return report

    monkeypatch.setattr(pipeline, "install_outputs", install_then_edit)
    first = selcache.finalize(str(small_root), cache_dir)
    monkeypatch.setattr(pipeline, "install_outputs", real)
    assert booleans.read_text() == "httpd_can_network_connect=0\n"

    second = selcache.finalize(str(small_root), cache_dir)
    assert second.key != first.key
    assert second.action == "relinked"
    assert_matches_reference(small_root, tmp_path, semantic_policy=True)
