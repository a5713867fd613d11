"""The ``selcache`` command. The only module that prints or configures logging."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from . import __version__, pipeline
from .errors import EXIT_CODES, SelcacheError
from .remote import RemoteConfig, generate_keypair, load_config

log = logging.getLogger("selcache")


def _parser() -> argparse.ArgumentParser:
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument("--json", action="store_true", help="print JSON (the stable interface)")
    output.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv: debug)")
    output.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    common = argparse.ArgumentParser(add_help=False, parents=[output])
    common.add_argument("--root", default="/", help="the root to work on (default: /)")
    common.add_argument("--cache-dir", default=None,
                        help="cache directory (default: $SELCACHE_CACHE_DIR or /var/cache/selcache)")
    fleet = argparse.ArgumentParser(add_help=False)
    group = fleet.add_argument_group(
        "fleet tier", "a shared Redis cache with signed entries (defaults: $SELCACHE_REMOTE... "
        "and the [remote] table of $SELCACHE_CONFIG or /etc/selcache/selcache.conf)")
    group.add_argument("--remote", metavar="URL", help="redis://HOST:PORT/DB")
    group.add_argument("--no-remote", action="store_true", help="ignore any configured remote")
    group.add_argument("--remote-readonly", action="store_true", default=None,
                       help="read from the remote, never write to it")
    group.add_argument("--remote-timeout", type=float, metavar="SECONDS",
                       help="connect and per-operation timeout (default: 0.5)")
    group.add_argument("--signing-key", metavar="PEM", help="ed25519 private key: upload signed "
                       "entries (builders only)")
    group.add_argument("--trusted-key", action="append", metavar="PEM",
                       help="ed25519 public key(s) whose entries are installed (repeatable)")
    locking = argparse.ArgumentParser(add_help=False)
    locking.add_argument("--lock-timeout", type=float, default=pipeline.DEFAULT_LOCK_TIMEOUT,
                         metavar="SECONDS",
                         help="how long to wait for the root's lock and libsemanage's before "
                              "giving up (exit 8; default %(default)g)")

    epilog = "exit codes:\n" + "\n".join(f"  {code:>3}  {text}" for code, text in EXIT_CODES.items())
    parser = argparse.ArgumentParser(
        prog="selcache", description="SELinux policy cache and incremental recompiler.",
        epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"selcache {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("status", parents=[common, fleet],
                   help="show the root's key, cache state and last finalize")
    sub.add_parser("finalize", parents=[common, fleet, locking],
                   help="make the installed policy match the inputs (cache, else compile)")
    stage = sub.add_parser("stage", parents=[common, fleet, locking],
                           help="compile ahead into the cache (or fetch it); install nothing")
    # The watcher's background compile: not the baseline that changes are reported against.
    stage.add_argument("--precompile", action="store_true", help=argparse.SUPPRESS)
    sub.add_parser("explain", parents=[common],
                   help="say which path finalize will take, why, and what changed")
    watch = sub.add_parser("watch", parents=[common],
                           help="follow the root's inputs, keep a journal, precompile changes")
    watch.add_argument("--debounce", type=float, default=3.0, metavar="SECONDS",
                       help="quiet time before a background precompile (default: 3)")
    watch.add_argument("--interval", type=float, default=5.0, metavar="SECONDS",
                       help="heartbeat interval (default: 5)")
    watch.add_argument("--no-precompile", dest="precompile", action="store_false",
                       help="only keep the journal; never compile")
    sub.add_parser("verify", parents=[common],
                   help="recompile in a sandbox and compare byte for byte with what is installed")
    diff = sub.add_parser(
        "diff", parents=[common],
        help="semantic diff (setools) of the installed policy against the one finalize would "
             "install; exits 0 whether or not they differ")
    diff.add_argument("--full", action="store_true",
                      help="expand and list every TE rule (slow: about 30 s on the refpolicy); "
                           "the default counts rules as stored")
    gc = sub.add_parser("gc", parents=[common], help="drop unreferenced blobs and cull the cache")
    gc.add_argument("--max-age", type=float, default=None, metavar="SECONDS",
                    help="also drop entries created more than SECONDS ago")
    keygen = sub.add_parser("keygen", parents=[output],
                            help="write an ed25519 key pair for signing fleet-tier entries")
    keygen.add_argument("--out", required=True, metavar="PREFIX",
                        help="writes PREFIX.key (private, mode 600) and PREFIX.pub")
    return parser


def _emit(args: argparse.Namespace, doc: dict[str, Any], human: str) -> None:
    if args.json:
        print(json.dumps(doc, indent=2, sort_keys=True))
    else:
        print(human)


def _human_status(doc: dict[str, Any]) -> str:
    cache = doc["cache"]
    last = doc.get("last_finalize")
    if last is None:
        last_line = "never"
    elif last.get("ok"):
        last_line = f"{last['action']} in {last['seconds']:.3f}s"
    else:
        last_line = f"FAILED: {last.get('error', '').splitlines()[0]}"
    lines = [
        f"root:               {doc['root']}",
        f"policy type:        {doc['policy_type']} (store {doc['store']})",
        f"key:                {doc['key'][:16]}",
        f"installed matches:  {'yes' if doc['installed_matches'] else 'no'}",
        f"finalize would:     {doc['predicted_action']}",
        f"cache:              {cache['entries']} entries, {cache['bytes'] / 1048576:.1f} MiB, "
        f"{cache['hits']} local hits, {cache['misses']} misses ({cache['dir']})",
        _human_remote(doc["remote"]),
        f"last finalize:      {last_line}",
    ]
    watcher = doc.get("watcher")
    if watcher is None:
        lines.append("watcher:            never ran")
    else:
        state = "running" if watcher["running"] else "not running"
        trust = "trusted" if watcher["trusted"] else f"untrusted ({watcher['untrusted_because']})"
        dirty = ", ".join(watcher["dirty"]) or "nothing"
        pre = watcher["precompile"]
        lines += [
            f"watcher:            {state} (pid {watcher['pid']}), heartbeat "
            f"{watcher['heartbeat_age']:.1f}s ago, generation {watcher['generation']}, {trust}",
            f"changed since base: {dirty}",
            f"precompile:         {pre['state']}"
            + (f" ({pre['key'][:16]})" if pre.get("key") else ""),
        ]
    if cache.get("problem"):
        lines.append(f"WARNING: the cache is unusable ({cache['problem']}); finalize compiles")
    failure = doc.get("failure")
    if failure:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(failure.get("when", 0)))
        first = (failure.get("message") or "").splitlines()[:1]
        untouched = {True: "root left unchanged", False: "root NOT unchanged",
                     None: "root state unknown"}.get(failure.get("root_unchanged"), "")
        lines.append(f"FAILED finalize:   {when}, at step {failure.get('step', '?')}: "
                     f"{failure.get('error')}: {first[0] if first else ''} ({untouched})")
        if failure.get("stderr"):
            lines += ["  semodule: " + line for line in failure["stderr"].strip().splitlines()]
    interrupted = doc.get("interrupted")
    if interrupted:
        lines.append(f"WARNING: {_describe_interrupted(interrupted)}")
    elif doc.get("interrupted_install"):
        lines.append("WARNING: an interrupted install was found; the next finalize repairs it")
    return "\n".join(lines)


def _describe_interrupted(doc: dict[str, Any]) -> str:
    if doc.get("repair") == "roll-forward":
        new = [t for t, state in doc["trees"].items() if state == "exchanged"]
        todo = [t for t, state in doc["trees"].items() if state == "pending"]
        return ("an install was interrupted after its commit point ("
                + (", ".join(new) + " new, " if new else "") + ", ".join(todo)
                + " not yet); the next finalize rolls it forward")
    return "an interrupted install left staged files; the next finalize removes them"


def _human_explain(doc: dict[str, Any]) -> str:
    estimate = doc.get("estimated_seconds")
    lines = [f"finalize would: {doc['action']}"
             + (f" (about {estimate:.1f}s, from past compiles)" if estimate is not None else ""),
             f"because:        {doc['reason']}"]
    base = doc.get("base")
    if base is not None and doc["changes"]:
        lines.append(f"compared with:  the cached {base['compile_path']} entry {base['key'][:16]}")
        lines += [f"  - {c['detail']}" for c in doc["changes"]]
    return "\n".join(lines)


def _watch(args: argparse.Namespace) -> None:
    from .watch import Watcher  # watchdog is loaded by this command only

    watcher = Watcher(args.root, args.cache_dir or pipeline.default_cache_dir(),
                      debounce=args.debounce, interval=args.interval,
                      precompile=args.precompile)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: watcher.stop())
    watcher.run(ready=lambda: log.info("watching %s", watcher.layout.root))


#: Items shown per line or category in the human diff; --json has them all.
_DIFF_SHOWN = 5


def _names(items: list[Any], full: bool) -> str:
    shown = items if full else items[:_DIFF_SHOWN]
    more = ", ..." if len(shown) < len(items) else ""
    return ", ".join(str(i) for i in shown) + more


def _human_diff(doc: dict[str, Any]) -> str:
    from .analysis import LABELS

    full = doc["mode"] == "full"
    pending = doc["pending"]
    origin = {"cache": "from the cache", "compiled": "compiled now"}[pending["source"]]
    lines = [f"root:       {doc['root']} (policy type {doc['policy_type']})"]
    if doc["installed"] is None:
        lines.append(f"installed:  nothing (no /{pending['path'].rpartition('/')[0]}/policy.N): "
                     "everything below is added")
    else:
        lines.append(f"installed:  /{doc['installed']['path']}")
    lines.append(f"pending:    /{pending['path']} ({origin})")
    changed_rules = {k: c for k, c in doc["rules"].items()
                     if c["added"] or c["removed"] or c["modified"]}
    if doc["byte_identical"]:
        lines.append("result:     no differences (the files are byte-identical)")
        return "\n".join(lines)
    if doc["identical"]:
        lines.append("result:     no semantic differences (the files differ in their bytes only)")
        return "\n".join(lines)
    how = "full diff" if full else "quick diff; --full lists every rule"
    what = [f"{n} {noun}" for n, noun in ((len(doc["differences"]), "categories"),
                                          (len(changed_rules), "rule kinds")) if n]
    lines.append(f"result:     {' and '.join(what)} differ ({how})")
    lines.append("")
    for name, d in doc["differences"].items():
        label = LABELS.get(name, name)
        if name == "booleans":
            d = {"added": [f"{b['name']} default {str(b['default']).lower()}"
                           for b in d["added"]],
                 "removed": [f"{b['name']} default {str(b['default']).lower()}"
                             for b in d["removed"]],
                 "modified": [f"{b['name']} default {str(b['from']).lower()} -> "
                              f"{str(b['to']).lower()}" for b in d["modified"]]}
        counts = []
        if d["added"]:
            counts.append(f"+{len(d['added'])} ({_names(d['added'], full)})")
        if d["removed"]:
            counts.append(f"-{len(d['removed'])} ({_names(d['removed'], full)})")
        if counts:
            lines.append(f"{label}: {' '.join(counts)}")
        shown = d["modified"] if full else d["modified"][:_DIFF_SHOWN]
        lines += [f"{label}: {m}" for m in shown]
        if len(shown) < len(d["modified"]):
            lines.append(f"{label}: ... {len(d['modified']) - len(shown)} more changed (--json)")
    for kind, c in changed_rules.items():
        line = f"{LABELS.get(kind, kind)}: +{c['added']} -{c['removed']}"
        lines.append(line + (f" ~{c['modified']}" if c["modified"] else ""))
        details = doc["rule_changes"].get(kind)
        if details:
            lines += [f"  + {r}" for r in details["added"]]
            lines += [f"  - {r}" for r in details["removed"]]
            lines += [f"  ~ {r}" for r in details["modified"]]
    if not full and changed_rules:
        lines.append("(quick diff: TE rules are counted as stored in the policy, an attribute "
                     "rule once; --full expands and lists them)")
    return "\n".join(lines)


def _progress() -> Callable[[str, int, int], None] | None:
    """A one-line progress display on stderr, only when it is a terminal."""
    if not sys.stderr.isatty():
        return None

    def show(phase: str, done: int, total: int) -> None:
        sys.stderr.write("\r\033[K")
        if phase != "done":
            sys.stderr.write(f"selcache: {phase} [{done}/{total}]")
        sys.stderr.flush()

    return show


def _human_remote(remote: dict[str, Any]) -> str:
    counts = (f"{remote['hits']} remote hits, {remote['misses']} misses, {remote['refused']} "
              f"refused, {remote['errors']} errors, {remote['uploads']} uploads")
    if remote["url"] is None:
        return f"remote:             none configured ({counts})"
    mode = "read-only" if remote["readonly"] else \
        ("signs uploads" if remote["signing_key"] else "no signing key")
    return (f"remote:             {remote['url']} ({mode}), entry {remote['entry']}; {counts}")


def _remote_config(args: argparse.Namespace) -> RemoteConfig:
    if args.no_remote:
        return RemoteConfig(source="--no-remote")
    return load_config(url=args.remote, readonly=args.remote_readonly,
                       timeout=args.remote_timeout, signing_key=args.signing_key,
                       trusted_keys=args.trusted_key)


def _run(args: argparse.Namespace) -> int:
    if args.command == "status":
        doc = pipeline.status(args.root, args.cache_dir, remote=_remote_config(args))
        _emit(args, doc, _human_status(doc))
    elif args.command in ("finalize", "stage"):
        if args.command == "finalize":
            result = pipeline.finalize(args.root, args.cache_dir, remote=_remote_config(args),
                                       lock_timeout=args.lock_timeout)
        else:
            result = pipeline.stage(args.root, args.cache_dir, precompile=args.precompile,
                                    remote=_remote_config(args), lock_timeout=args.lock_timeout)
        doc = result.to_json()
        human = f"{result.action}: {result.policy_type} policy of {result.root} in {result.seconds:.3f}s"
        if result.written:
            human += f" ({len(result.written)} files written)"
        _emit(args, doc, human)
    elif args.command == "watch":
        _watch(args)
    elif args.command == "explain":
        doc = pipeline.explain(args.root, args.cache_dir)
        _emit(args, doc, _human_explain(doc))
    elif args.command == "verify":
        doc = pipeline.verify(args.root, args.cache_dir)
        _emit(args, doc, f"ok: {doc['files']} installed files equal a fresh compile")
    elif args.command == "diff":
        progress = _progress()
        try:
            doc = pipeline.diff(args.root, args.cache_dir, full=args.full, progress=progress)
        finally:
            if progress is not None:
                progress("done", 0, 0)
        _emit(args, doc, _human_diff(doc))
    elif args.command == "gc":
        doc = {"version": 1, **pipeline.gc(args.cache_dir, max_age=args.max_age)}
        _emit(args, doc, ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in doc.items()
                                   if k != "version"))
    elif args.command == "keygen":
        private, public, kid = generate_keypair(args.out)
        doc = {"version": 1, "private_key": private, "public_key": public, "key_id": kid}
        _emit(args, doc, f"wrote {private} (keep it on builders only) and {public} "
                         f"(key id {kid}; install it on every machine)")
    return 0


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    # `selcache status | head` must not die with a BrokenPipeError traceback.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    # A stopped service or a superseded precompile gets SIGTERM: unwind, so the
    # compile's child is killed and its sandbox removed, like Ctrl-C.
    signal.signal(signal.SIGTERM, _terminate)
    args = _parser().parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="selcache: %(levelname)s: %(message)s",
                        stream=sys.stderr)
    try:
        return _run(args)
    except KeyboardInterrupt:
        print("selcache: interrupted", file=sys.stderr)
        return 130
    except SelcacheError as exc:
        if args.debug:
            log.exception("failed")
        if args.json:
            print(json.dumps({"version": 1, "error": type(exc).__name__, "message": str(exc),
                              "exit_code": exc.exit_code}, indent=2))
        print(f"selcache: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:  # noqa: BLE001 - last resort, mapped to exit code 1
        if args.debug:
            raise
        print(f"selcache: unexpected error: {type(exc).__name__}: {exc} (rerun with --debug)",
              file=sys.stderr)
        return 1


def run() -> NoReturn:
    """The ``selcache`` command: ``main()``, then exit without tearing the
    interpreter down. A finalize that finds everything in place takes about
    100 ms, and freeing every module's objects at exit, which the kernel
    reclaims anyway, took 10 of them. By now selcache has closed everything it
    opened; only the standard streams and logging are left to flush."""
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
