"""Run ``selcache.finalize`` in this process and SIGKILL it at a chosen
mutating filesystem call: a real kill, at an exact step, with no hook in
selcache itself.

    python -m tests.killdriver --root R --cache-dir C --trace FILE   # record the steps
    python -m tests.killdriver --root R --cache-dir C --kill-at N    # die before step N
    python -m tests.killdriver --root R --cache-dir C --notify-fd FD # for a timed kill

A *step* is one call of a function that changes a file system: the ``os``
functions below (``shutil.rmtree`` goes through them too), selcache's
``renameat2(RENAME_EXCHANGE)`` and its ``syncfs``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

from selcache import install, pipeline

OS_STEPS = ("rename", "replace", "fsync", "unlink", "rmdir", "link", "mkdir", "symlink")


class Steps:
    def __init__(self, kill_at: int | None) -> None:
        self.kill_at = kill_at
        self.armed = False
        self.calls: list[list[str]] = []

    def hit(self, kind: str, args: tuple[Any, ...]) -> None:
        if not self.armed:
            return
        self.calls.append([kind, " ".join(str(a) for a in args[:2])])
        if self.kill_at is not None and len(self.calls) == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def wrap(self, kind: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            self.hit(kind, args)
            return fn(*args, **kwargs)
        return wrapper


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", required=True)
    parser.add_argument("--cache-dir", required=True)
    parser.add_argument("--kill-at", type=int, default=None)
    parser.add_argument("--trace", default=None)
    parser.add_argument("--notify-fd", type=int, default=None)
    args = parser.parse_args(argv)

    steps = Steps(args.kill_at)
    for name in OS_STEPS:
        setattr(os, name, steps.wrap(name, getattr(os, name)))
    install._renameat2_exchange = steps.wrap("exchange", install._renameat2_exchange)
    install._syncfs = steps.wrap("syncfs", install._syncfs)

    if args.notify_fd is not None:
        os.write(args.notify_fd, b"go")
        os.close(args.notify_fd)
    steps.armed = True
    start = time.monotonic()
    result = pipeline.finalize(args.root, args.cache_dir)
    seconds = time.monotonic() - start
    steps.armed = False
    if args.trace:
        with open(args.trace, "w") as fh:
            json.dump({"action": result.action, "seconds": seconds, "calls": steps.calls}, fh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
