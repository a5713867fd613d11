"""selcache: an SELinux policy cache and incremental recompiler for image-based
systems. ``finalize(root)`` makes a root's installed policy match its inputs,
from the cache when the inputs were seen before."""

from __future__ import annotations

import logging

from .errors import (
    Busy,
    CacheError,
    CompileError,
    ConfigError,
    InputsChanged,
    InstallError,
    InvalidPolicy,
    InvalidRoot,
    SandboxError,
    SelcacheError,
    VerifyMismatch,
)
from .pipeline import Result, diff, explain, finalize, gc, stage, status, verify

__version__ = "0.1.0"

__all__ = [
    "Busy",
    "CacheError",
    "CompileError",
    "ConfigError",
    "InputsChanged",
    "InstallError",
    "InvalidPolicy",
    "InvalidRoot",
    "Result",
    "SandboxError",
    "SelcacheError",
    "VerifyMismatch",
    "__version__",
    "diff",
    "explain",
    "finalize",
    "gc",
    "stage",
    "status",
    "verify",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())
