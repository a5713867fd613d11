"""The failure stamp: a failed finalize leaves a record that ``status`` shows
and the next successful finalize clears, like ostree's
``/boot/ostree/finalize-failure.stamp``.

The stamp is a small JSON file in the cache directory, one per root, written
with a temp file and a rename. It lives outside the SQLite database so that a
garbage, locked or full database cannot lose the record of why an update
failed, and never in the root: a failed finalize leaves the root as it was.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

from . import fsutil
from .errors import CacheError, CompileError, InvalidRoot
from .store import check_dir_safe, root_id

log = logging.getLogger(__name__)

STAMP_VERSION = 1
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def stamp_name(root: str) -> str:
    return f"failed-{root_id(root)}.json"


def failure_doc(root: str, exc: BaseException, *, step: str, key: str | None,
                recovered: Sequence[str] = ()) -> dict[str, Any]:
    """What failed, where, and whether the root was left as it was."""
    doc: dict[str, Any] = {
        "version": STAMP_VERSION,
        "root": os.path.abspath(root),
        "when": time.time(),
        "step": step,
        "error": type(exc).__name__,
        "message": str(exc),
        "exit_code": getattr(exc, "exit_code", 1),
        # None for an unexpected error: nothing is promised then.
        "root_unchanged": getattr(exc, "root_unchanged", None),
        "recovered": list(recovered),
        "key": key,
    }
    if isinstance(exc, CompileError):
        doc["stderr"] = exc.stderr
        doc["returncode"] = exc.returncode
    return doc


def _open_cache_dir(cache_dir: str, *, create: bool) -> int | None:
    try:
        if create:
            os.makedirs(cache_dir, mode=0o700, exist_ok=True)
        check_dir_safe(cache_dir)
        return os.open(cache_dir, _DIR_FLAGS)
    except FileNotFoundError:
        return None


def record_failure(cache_dir: str, root: str, doc: dict[str, Any]) -> bool:
    """Write the stamp; a failure to write it is logged, never raised: the
    caller is already reporting the error that matters."""
    try:
        fd = _open_cache_dir(cache_dir, create=True)
        if fd is None:
            return False
        try:
            fsutil.atomic_write_at(fd, stamp_name(root),
                                   json.dumps(doc, sort_keys=True).encode(), 0o600)
        finally:
            os.close(fd)
    except (OSError, CacheError) as exc:
        log.warning("could not write the failure stamp in %s: %s", cache_dir, exc)
        return False
    return True


def read_failure(cache_dir: str, root: str) -> dict[str, Any] | None:
    fd = _open_cache_dir(cache_dir, create=False)
    if fd is None:
        return None
    try:
        data = fsutil.read_at(fd, stamp_name(root), max_size=1 << 20)
        doc = json.loads(data)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, InvalidRoot) as exc:
        log.warning("failure stamp in %s is unreadable: %s", cache_dir, exc)
        return {"version": STAMP_VERSION, "error": "unreadable", "message": str(exc)}
    finally:
        os.close(fd)
    return doc if isinstance(doc, dict) else None


def clear_failure(cache_dir: str, root: str) -> None:
    try:
        fd = _open_cache_dir(cache_dir, create=False)
    except CacheError:
        return
    if fd is None:
        return
    try:
        name = stamp_name(root)
        prefix = f".{name}{fsutil.TMP_INFIX}"
        with os.scandir(fd) as it:
            leftovers = [e.name for e in it if e.name.startswith(prefix)]
        for leftover in leftovers:
            os.unlink(leftover, dir_fd=fd)
        try:
            os.unlink(name, dir_fd=fd)
        except FileNotFoundError:
            return
        fsutil.fsync_dir(fd)
    except OSError as exc:
        log.warning("could not clear the failure stamp in %s: %s", cache_dir, exc)
    finally:
        os.close(fd)
