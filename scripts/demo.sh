#!/usr/bin/env bash
# `make demo`: selcache on a sample root holding Debian's real refpolicy
# (DEMO_POLICY=small for the small hand-written one). Works on ./demo-root and
# ./.cache only; the host's own SELinux policy is never touched.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
SELCACHE=.venv/bin/selcache
ROOT=demo-root
CACHE=.cache/demo-cache
POLICY=${DEMO_POLICY:-refpolicy}

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

rm -rf "$ROOT" "$CACHE"
step "Build a sample root with the $POLICY policy (first run: apt-get download, ~20 s)"
run "$PY" -m selcache.sample build --policy "$POLICY" "$ROOT"
TYPE=$(sed -n 's/^SELINUXTYPE=//p' "$ROOT/etc/selinux/config")
ACTIVE="$ROOT/var/lib/selinux/$TYPE/active"
HOMEDIRS="$ROOT/etc/selinux/$TYPE/contexts/files/file_contexts.homedirs"

step "An update is staged: the /etc merge leaves a hand-edited booleans.local"
run sh -c "echo httpd_can_network_connect=1 > $ACTIVE/booleans.local"
run "$SELCACHE" status --root "$ROOT" --cache-dir "$CACHE"

step "Staging time: compile ahead into the cache, install nothing"
run "$SELCACHE" stage --root "$ROOT" --cache-dir "$CACHE"

step "Finalization at shutdown: the policy comes from the cache"
run "$SELCACHE" finalize --root "$ROOT" --cache-dir "$CACHE"

step "A change: a user whose home lies outside /home (accounts only: relinked, no CIL compile)"
run sh -c "echo 'carol:x:1002:1002:Carol:/srv/home/carol:/bin/bash' >> $ROOT/etc/passwd"
run "$SELCACHE" explain --root "$ROOT" --cache-dir "$CACHE"
run "$SELCACHE" finalize --root "$ROOT" --cache-dir "$CACHE"
run grep -m 3 '^/srv/home' "$HOMEDIRS"

step "The change reverted: the earlier result is reused"
run sed -i '/^carol:/d' "$ROOT/etc/passwd"
run "$SELCACHE" finalize --root "$ROOT" --cache-dir "$CACHE"
if grep -q '^/srv/home' "$HOMEDIRS"; then echo "unexpected: /srv/home still labelled" >&2; exit 1; fi

step "Nothing changed since: finalize writes nothing"
run "$SELCACHE" finalize --root "$ROOT" --cache-dir "$CACHE"

step "Status"
run "$SELCACHE" status --root "$ROOT" --cache-dir "$CACHE"
run "$SELCACHE" verify --root "$ROOT" --cache-dir "$CACHE"
printf '\nThe sample root stays in ./%s and its cache in ./%s.\n' "$ROOT" "$CACHE"
