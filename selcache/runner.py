"""Every subprocess goes through one runner: argv lists, stdin from /dev/null,
output captured so errors can carry it. Tests may inject another runner."""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Completed:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    seconds: float


Runner = Callable[[Sequence[str]], Completed]


def run(argv: Sequence[str], *, timeout: float | None = 600.0) -> Completed:
    start = time.monotonic()
    proc = subprocess.run(list(argv), stdin=subprocess.DEVNULL, capture_output=True,
                          timeout=timeout, check=False)
    elapsed = time.monotonic() - start
    log.debug("ran %s -> %d in %.3fs", " ".join(argv), proc.returncode, elapsed)
    return Completed(tuple(argv), proc.returncode, proc.stdout.decode("utf-8", "replace"),
                     proc.stderr.decode("utf-8", "replace"), elapsed)
