"""The error tree. Every error selcache raises is a SelcacheError with an exit code.

The CLI maps ``exc.exit_code`` to the process exit status; the table lives in
``EXIT_CODES`` and in the README. Library callers catch ``SelcacheError`` (or a
subclass) and read ``str(exc)``: messages name the step that failed and carry
the tool's stderr where a tool failed.
"""

from __future__ import annotations


class SelcacheError(Exception):
    """Base of every error selcache raises on purpose.

    ``root_unchanged`` is the promise behind every error: nothing in the root
    was changed (an interrupted install found at the start may have been
    repaired). The one exception sets it False and says so in its message."""

    exit_code = 1
    root_unchanged = True


class ConfigError(SelcacheError, ValueError):
    """A bad option, configuration file or key file (the remote tier's)."""

    exit_code = 2


class InvalidRoot(SelcacheError, ValueError):
    """The root is not a usable SELinux root: missing or bad config, path tricks,
    unexpected file types in the store."""

    exit_code = 3


class InvalidPolicy(InvalidRoot):
    """A file that should be a binary SELinux policy (``policy.N``) is not a
    readable one: truncated, corrupt, or another kind of file."""


class CompileError(SelcacheError):
    """libsemanage (semodule) failed to build the policy."""

    exit_code = 4

    def __init__(self, message: str, *, stderr: str = "", returncode: int | None = None) -> None:
        detail = stderr.strip()
        super().__init__(f"{message}\n{detail}" if detail else message)
        self.stderr = stderr
        self.returncode = returncode


class InputsChanged(SelcacheError):
    """The root's inputs kept changing while selcache compiled them."""

    exit_code = 5


class CacheError(SelcacheError):
    """The cache cannot be trusted: not ours, writable by others, symlinks.
    A cache that merely does not work (garbage, locked, read-only, full) is
    not an error: it is disabled for the run, with a warning."""

    exit_code = 6


class InstallError(SelcacheError, OSError):
    """Installing the output set failed; the root was left as it was, unless
    ``root_unchanged`` is False: then an exchange failed and could not be
    undone, and the next finalize rolls the install forward."""

    exit_code = 7

    def __init__(self, message: str, *, root_unchanged: bool = True) -> None:
        super().__init__(message)
        self.root_unchanged = root_unchanged


class Busy(SelcacheError):
    """Another selcache process holds the root's lock."""

    exit_code = 8


class SandboxError(SelcacheError):
    """The compile sandbox could not be set up (mount namespace, chroot)."""

    exit_code = 9


class VerifyMismatch(SelcacheError):
    """``verify`` found installed files that differ from a fresh compile."""

    exit_code = 10


EXIT_CODES: dict[int, str] = {
    0: "success",
    1: "unexpected error (a bug: run with --debug and report it)",
    ConfigError.exit_code: "usage error: bad option, configuration file or key file",
    InvalidRoot.exit_code: "invalid root: bad or missing SELinux config, path tricks, unexpected files",
    CompileError.exit_code: "semodule failed to build the policy (its stderr is shown)",
    InputsChanged.exit_code: "the root's inputs changed during the compile, twice",
    CacheError.exit_code: "the cache is unsafe (not ours, writable by others, symlinks)",
    InstallError.exit_code: "installing the output set failed; the root is unchanged",
    Busy.exit_code: "the root's lock or libsemanage's is held past --lock-timeout",
    SandboxError.exit_code: "the compile sandbox could not be set up",
    VerifyMismatch.exit_code: "verify: installed files differ from a fresh compile",
    130: "interrupted (SIGINT)",
}
