#!/usr/bin/env python3
"""How a deployment finalizer calls selcache in place of
``semodule -N --refresh`` inside the new deployment.

    finalizer.py /ostree/deploy/fedora/deploy/<checksum>.0

ostree's finalization merges /etc and then refreshes the policy of the new
deployment; a failure there aborts the update. With selcache the refresh is
a cache hit when nothing changed (or when ``selcache watch`` precompiled the
change), a compile otherwise, and in every case an all-or-nothing install.
"""

from __future__ import annotations

import logging
import sys

import selcache


def refresh_policy(deployment: str) -> int:
    try:
        result = selcache.finalize(deployment)
    except selcache.SelcacheError as exc:
        # The deployment was left exactly as it was. Report, and let the
        # finalizer decide (ostree aborts the update and keeps the old one).
        print(f"Refreshing SELinux policy failed: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"Refreshed SELinux policy in {result.seconds * 1000:.0f} ms ({result.action}"
          + (f", {len(result.written)} files written" if result.written else "") + ")")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    sys.exit(refresh_policy(sys.argv[1] if len(sys.argv) > 1 else "/"))
