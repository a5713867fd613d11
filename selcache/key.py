"""The cache key: per-component digests folded into one sha256.

Two levels share this module. The *full key* covers every component and names
the final output set. The *module-set key* covers only what feeds the CIL
compile (the modules, the compile settings, the flags and the toolchain) and
names the linked outputs that a relink merges local customizations onto.
``diff_components`` tells which components differ between
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


#: Components, besides every ``module:*``, that feed the whole-program compile.
LINK_COMPONENTS = frozenset({"config", "dontaudit", "tunables", "toolchain", "store-other"})

#: Components a relink applies exactly as a full rebuild does: each is checked
#: by the tests against a fresh ``semodule -B`` (setools for the kernel policy,
#: bytes for every other file). A change to any other component is rebuilt.
RELINKABLE = frozenset({"booleans", "ports", "fcontext-local", "seusers", "accounts"})


def is_link_component(name: str) -> bool:
    return name.startswith("module:") or name in LINK_COMPONENTS


def module_set_key(components: Mapping[str, str]) -> str:
    return fold({n: d for n, d in components.items() if is_link_component(n)}, "module-set")


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
