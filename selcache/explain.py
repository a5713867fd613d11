"""Why finalize will take the path it takes, in words.

Each compile leaves an input snapshot in the cache (``json:inputs:<key>``):
every input file's digest, and the text of the small local customization
files. ``explain`` compares the root's current inputs with the snapshot of
the closest cached entry (the relink source, or else the entry sharing the
most component digests) and names what differs: "booleans.local changed:
httpd_can_network_connect 0→1", "module myapp added at priority 400".
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping
from typing import Any

from .inputs import MISSING, Inputs, classify
from .key import diff_components
from .store import Manifest

#: Local files whose text is kept in the snapshot (they are small, and what
#: people edit by hand); larger ones are named but not quoted.
MAX_QUOTED = 64 * 1024
#: Lines quoted per changed file.
MAX_LINES = 8


def snapshot(inputs: Inputs, read: Mapping[str, bytes]) -> dict[str, Any]:
    """The snapshot stored beside a compiled entry. ``read``: the text of the
    fixed-place local files, as the compile saw them."""
    texts = {rel: data.decode(errors="replace") for rel, data in read.items()
             if len(data) <= MAX_QUOTED}
    return {"version": 1, "files": {f.rel: f.digest for f in inputs.files}, "texts": texts}


def _module_where(files: Iterable[str], active: str, name: str) -> tuple[list[int], bool]:
    """Priorities a module has files at, and whether it is disabled."""
    prios: set[int] = set()
    disabled = False
    for rel in files:
        if not rel.startswith(active + "/modules/"):
            continue
        parts = rel[len(active) + 1:].split("/")
        if len(parts) >= 3 and parts[1] == "disabled" and parts[2] == name:
            disabled = True
        elif len(parts) >= 4 and parts[1].isdigit() and parts[2] == name:
            prios.add(int(parts[1]))
    return sorted(prios), disabled


def _booleans(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if "=" in line:
            name, _, value = line.partition("=")
            out[name.strip()] = value.strip()
    return out


def _text_change(rel: str, old: str | None, new: str | None) -> str:
    name = rel.rsplit("/", 1)[-1]
    if old is None and new is None:
        return f"{name} changed"
    if old is None:
        old = ""
    if new is None:
        return f"{name} removed"
    if name == "booleans.local":
        a, b = _booleans(old), _booleans(new)
        parts = [f"{n} {a.get(n, 'default')}→{b.get(n, 'default')}"
                 for n in sorted(set(a) | set(b)) if a.get(n) != b.get(n)]
        return f"{name} changed: " + (", ".join(parts) or "formatting only")
    old_lines, new_lines = old.splitlines(), new.splitlines()
    added = [f"+{ln}" for ln in new_lines if ln not in old_lines]
    removed = [f"-{ln}" for ln in old_lines if ln not in new_lines]
    shown = (added + removed)[:MAX_LINES]
    more = len(added) + len(removed) - len(shown)
    return f"{name} changed: " + ("; ".join(shown) or "order only") + \
        (f" (+{more} more)" if more > 0 else "")


def describe(component: str, how: str, old: Mapping[str, Any] | None, inputs: Inputs,
             current_texts: Mapping[str, str]) -> str:
    """One sentence for one differing component."""
    active = inputs.layout.active
    new_files = {f.rel: f.digest for f in inputs.files}
    old_files: Mapping[str, str] = old["files"] if old else {}
    if component.startswith("module:"):
        name = component.split(":", 1)[1]
        new_p, new_dis = _module_where((r for r, d in new_files.items() if d != MISSING),
                                       active, name)
        old_p, old_dis = _module_where(old_files, active, name)
        if how == "added" or (not old_p and new_p):
            return f"module {name} added at priority {', '.join(map(str, new_p))}"
        if how == "removed" or not new_p:
            return f"module {name} removed (was at priority {', '.join(map(str, old_p))})"
        if old_dis != new_dis:
            return f"module {name} {'disabled' if new_dis else 're-enabled'}"
        if old_p != new_p:
            return (f"module {name} now at priority {', '.join(map(str, new_p))} "
                    f"(was {', '.join(map(str, old_p))})")
        return f"module {name} changed (its files at priority {', '.join(map(str, new_p))})"
    changed = sorted(rel for rel in set(old_files) | {r for r, f in new_files.items()}
                     if _component_of(rel, inputs) == component
                     and old_files.get(rel) != new_files.get(rel)) if old else []
    if not changed:
        return f"{component} {how}"
    texts: Mapping[str, str] = old["texts"] if old else {}
    out = []
    for rel in changed:
        if rel in texts or rel in current_texts:
            out.append(_text_change(rel, texts.get(rel) if old_files.get(rel) != MISSING else None,
                                    current_texts.get(rel)))
        else:
            state = "created" if old_files.get(rel) in (None, MISSING) else \
                "removed" if new_files.get(rel) in (None, MISSING) else "changed"
            out.append(f"/{rel.removeprefix('host:/')} {state}")
    return f"{component}: " + "; ".join(out)


def _component_of(rel: str, inputs: Inputs) -> str | None:
    for f in inputs.files:
        if f.rel == rel:
            return f.component
    return classify(inputs.layout, rel)


def closest(manifests: Iterable[Manifest], components: Mapping[str, str]) -> Manifest | None:
    """The cached entry sharing the most component digests with ``components``."""
    best, score = None, -1
    for m in manifests:
        same = sum(1 for n, d in m.components.items() if components.get(n) == d)
        if same > score:
            best, score = m, same
    return best


def estimate(manifests: Iterable[Manifest], path: str) -> float | None:
    """The median compile time of past entries that took ``path``."""
    seconds = [m.compile_seconds for m in manifests
               if m.compile_path == path and m.compile_seconds is not None]
    return round(statistics.median(seconds), 3) if seconds else None


def changes(base: Manifest | None, old: Mapping[str, Any] | None, inputs: Inputs,
            components: Mapping[str, str], current_texts: Mapping[str, str]) -> list[dict[str, str]]:
    if base is None:
        return []
    return [{"component": name, "change": how,
             "detail": describe(name, how, old, inputs, current_texts)}
            for name, how in diff_components(base.components, components).items()]
