"""The ``selcache`` command. The only module that prints or configures logging."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from . import __version__, pipeline
from .errors import EXIT_CODES, SelcacheError

log = logging.getLogger("selcache")


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--root", default="/", help="the root to work on (default: /)")
    common.add_argument("--cache-dir", default=None,
                        help="cache directory (default: $SELCACHE_CACHE_DIR or /var/cache/selcache)")
    common.add_argument("--json", action="store_true", help="print JSON (the stable interface)")
    common.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv: debug)")
    common.add_argument("--debug", action="store_true", help="show tracebacks on errors")

    epilog = "exit codes:\n" + "\n".join(f"  {code:>3}  {text}" for code, text in EXIT_CODES.items())
    parser = argparse.ArgumentParser(
        prog="selcache", description="SELinux policy cache and incremental recompiler.",
        epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"selcache {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("status", parents=[common], help="show the root's key, cache state and last finalize")
    sub.add_parser("finalize", parents=[common],
                   help="make the installed policy match the inputs (cache, else compile)")
    sub.add_parser("stage", parents=[common], help="compile ahead into the cache; install nothing")
    sub.add_parser("verify", parents=[common],
                   help="recompile in a sandbox and compare byte for byte with what is installed")
    gc = sub.add_parser("gc", parents=[common], help="drop unreferenced blobs and cull the cache")
    gc.add_argument("--max-age", type=float, default=None, metavar="SECONDS",
                    help="also drop entries created more than SECONDS ago")
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
        f"{cache['hits']} hits, {cache['misses']} misses ({cache['dir']})",
        f"last finalize:      {last_line}",
    ]
    if doc.get("interrupted_install"):
        lines.append("WARNING: an interrupted install was found; the next finalize repairs it")
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    if args.command == "status":
        doc = pipeline.status(args.root, args.cache_dir)
        _emit(args, doc, _human_status(doc))
    elif args.command in ("finalize", "stage"):
        fn = pipeline.finalize if args.command == "finalize" else pipeline.stage
        result = fn(args.root, args.cache_dir)
        doc = result.to_json()
        human = f"{result.action}: {result.policy_type} policy of {result.root} in {result.seconds:.3f}s"
        if result.written:
            human += f" ({len(result.written)} files written)"
        _emit(args, doc, human)
    elif args.command == "verify":
        doc = pipeline.verify(args.root, args.cache_dir)
        _emit(args, doc, f"ok: {doc['files']} installed files equal a fresh compile")
    elif args.command == "gc":
        doc = {"version": 1, **pipeline.gc(args.cache_dir, max_age=args.max_age)}
        _emit(args, doc, ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in doc.items()
                                   if k != "version"))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    # `selcache status | head` must not die with a BrokenPipeError traceback.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
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
