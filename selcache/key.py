"""The cache key: per-component digests folded into one sha256.

Two levels share this module. The *full key* covers every component and names
the final output set. ``diff_components`` tells which components differ between
two keys' component maps, which ``status`` and ``explain`` report.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

from .inputs import KEY_FORMAT, Inputs


@dataclass(frozen=True)
class Key:
    hex: str
    components: Mapping[str, str]

    def __str__(self) -> str:
        return self.hex


def fold(components: Mapping[str, str], domain: str = "full") -> str:
    h = hashlib.sha256(f"{KEY_FORMAT}\0{domain}\n".encode())
    for name in sorted(components):
        h.update(f"{name}\0{components[name]}\n".encode())
    return h.hexdigest()


def compute_key(inputs: Inputs) -> Key:
    return Key(fold(inputs.components), dict(inputs.components))


def diff_components(old: Mapping[str, str], new: Mapping[str, str]) -> dict[str, str]:
    """Component name -> 'added' | 'removed' | 'changed'."""
    out: dict[str, str] = {}
    for name in sorted(set(old) | set(new)):
        if name not in old:
            out[name] = "added"
        elif name not in new:
            out[name] = "removed"
        elif old[name] != new[name]:
            out[name] = "changed"
    return out
