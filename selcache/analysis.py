"""Semantic comparison of binary SELinux policies: the only module that imports setools.

Two kernel policies (``policy.N`` files) built from the same inputs can differ
in their bytes and still mean the same thing: libsemanage's no-rebuild commit
writes a different ``policy.N`` than a full ``semodule -B`` of the same inputs
(openshift/os#1036), and a reordered module renumbers types. This module says
what differs *by name*: symbols, labelling statements and rules, the way
setools' ``PolicyDifference`` (Debian's python3-setools) sees them.

setools is imported inside the functions, never at module import: ``finalize``
and the other hot paths must not pay for it (see tests/test_analysis.py).
setools 4.4 never frees a policy it has loaded (its policyrep symbol caches
are weak-keyed by the policy but their values refer back to it), about 30 MiB
per refpolicy comparison: a long-running process should compare in a child
process.

Two depths:

* ``compare(a, b)`` (quick, a few seconds on the refpolicy): every symbol and
  labelling category through setools, role and range rules through setools,
  and the TE rules *as stored* in each policy, counted as multisets. When the
  stored TE rules and every attribute's members are the same on both sides,
  the expanded rules are the same too, so a quick result with no differences
  is already a semantic "identical".
* ``compare(a, b, full=True)`` (up to about 30 s on the refpolicy): the same,
  plus setools' expanded diff (one rule per source/target type pair, with
  permission changes as "modified") for every TE rule kind whose stored rules
  differ. Kinds whose stored rules match are skipped, by the argument above.

``semantic_differences(a, b)`` runs the full comparison and returns only what
differs: an empty dict means "semantically identical".

On top of setools, two checks cover what a set comparison cannot see: the
kernel labels a port or a node with the *first* matching ``portcon`` or
``nodecon`` in policy order, so overlapping entries must keep their relative
order (``portcon_order``, ``nodecon_order``); and the order of sensitivities
(``sensitivity_order``) defines MLS dominance.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple, TypedDict, Union

from .errors import InvalidPolicy

log = logging.getLogger(__name__)

#: ``progress(phase, done, total)``: called before each step, and once with
#: ``done == total`` at the end. ``phase`` is a short label for people.
Progress = Callable[[str, int, int], None]

#: A policy to compare: a path to a binary policy, or its bytes.
PolicySource = Union[str, "os.PathLike[str]", bytes]


class Category(NamedTuple):
    name: str       # the JSON key, setools' attribute stem (added_<name>)
    label: str      # for people
    method: str     # SELinuxPolicy method listing the items
    ruletype: str = ""  # constraints share one method; filter on this


#: Symbol and labelling categories, in the order they are reported.
CATEGORIES: tuple[Category, ...] = (
    Category("properties", "policy properties", ""),
    Category("polcaps", "policy capabilities", "polcaps"),
    Category("commons", "commons", "commons"),
    Category("classes", "classes", "classes"),
    Category("types", "types", "types"),
    Category("type_attributes", "attributes", "typeattributes"),
    Category("roles", "roles", "roles"),
    Category("users", "users", "users"),
    Category("booleans", "booleans", "bools"),
    Category("sensitivities", "sensitivities", "sensitivities"),
    Category("categories", "categories", "categories"),
    Category("levels", "levels", "levels"),
    Category("initialsids", "initial SIDs", "initialsids"),
    Category("fs_uses", "fs_use", "fs_uses"),
    Category("genfscons", "genfscon", "genfscons"),
    Category("portcons", "ports", "portcons"),
    Category("nodecons", "nodes", "nodecons"),
    Category("netifcons", "interfaces", "netifcons"),
    Category("ibpkeycons", "infiniband pkeys", "ibpkeycons"),
    Category("ibendportcons", "infiniband end ports", "ibendportcons"),
    Category("typebounds", "typebounds", "bounds"),
    Category("defaults", "default_* rules", "defaults"),
    Category("constrains", "constraints", "constraints", "constrain"),
    Category("mlsconstrains", "MLS constraints", "constraints", "mlsconstrain"),
    Category("validatetrans", "validatetrans", "constraints", "validatetrans"),
    Category("mlsvalidatetrans", "MLS validatetrans", "constraints", "mlsvalidatetrans"),
)

#: Checks setools does not make (see the module docstring).
ORDER_CHECKS: tuple[tuple[str, str], ...] = (
    ("portcon_order", "port labelling order"),
    ("nodecon_order", "node labelling order"),
    ("sensitivity_order", "sensitivity order"),
)

TE_AV_KINDS = ("allow", "auditallow", "dontaudit", "neverallow")
TE_XPERM_KINDS = ("allowxperm", "auditallowxperm", "dontauditxperm", "neverallowxperm")
TE_TYPE_KINDS = ("type_transition", "type_change", "type_member")
TE_KINDS = TE_AV_KINDS + TE_XPERM_KINDS + TE_TYPE_KINDS
RBAC_KINDS = ("role_allow", "role_transition")
MLS_KINDS = ("range_transition",)
RULE_KINDS = TE_KINDS + RBAC_KINDS + MLS_KINDS

LABELS: dict[str, str] = {c.name: c.label for c in CATEGORIES}
LABELS.update(ORDER_CHECKS)
LABELS.update({k: k.replace("_", " ") + " rules" for k in RULE_KINDS})


class CategoryDiff(TypedDict):
    """What changed in one category or rule kind, sorted. Entries are the
    statements as setools prints them, except booleans: ``{"name",
    "default"}`` when added or removed, ``{"name", "from", "to"}`` when the
    default changed."""

    added: list[Any]
    removed: list[Any]
    modified: list[Any]


class RuleCount(TypedDict):
    """Rules of one kind: how many each policy stores, and how many were added,
    removed and modified (see ``compare`` for what is counted)."""

    left: int
    right: int
    added: int
    removed: int
    modified: int


class PolicyInfo(TypedDict):
    version: int
    mls: bool
    handle_unknown: str


class Comparison(TypedDict):
    """The result of ``compare``. Categories and rule kinds without changes
    are left out of ``differences`` and ``rule_changes``."""

    mode: str                             # "quick" or "full"
    identical: bool
    left: PolicyInfo | None               # None: compared with nothing
    right: PolicyInfo
    differences: dict[str, CategoryDiff]  # categories of CATEGORIES and ORDER_CHECKS
    rules: dict[str, RuleCount]           # every kind either policy has
    rule_changes: dict[str, CategoryDiff]  # full mode only: the rules themselves
    seconds: float


# -- loading ---------------------------------------------------------------------

@contextmanager
def _policy_path(src: PolicySource) -> Iterator[str]:
    if isinstance(src, bytes):
        with tempfile.NamedTemporaryFile(prefix="selcache-policy-") as tmp:
            tmp.write(src)
            tmp.flush()
            yield tmp.name
    else:
        yield os.fspath(src)


def load_policy(src: PolicySource, *, what: str = "") -> Any:
    """A setools ``SELinuxPolicy`` for a binary policy file or its bytes.
    Raises InvalidPolicy when it is not a readable binary policy."""
    import setools  # noqa: PLC0415 - kept off the finalize path on purpose

    label = what or ("a policy in memory" if isinstance(src, bytes) else os.fspath(src))
    with _policy_path(src) as path:
        try:
            # The policy is read whole here; the temporary file may go after.
            return setools.SELinuxPolicy(path)
        except setools.exception.InvalidPolicy as exc:
            raise InvalidPolicy(f"{label} is not a readable binary SELinux policy") from exc
        except OSError as exc:
            raise InvalidPolicy(f"cannot read policy {label}: {exc}") from exc


def policy_info(policy: Any) -> PolicyInfo:
    return {"version": int(policy.version), "mls": bool(policy.mls),
            "handle_unknown": str(policy.handle_unknown)}


# -- rendering ---------------------------------------------------------------------

def _text(item: Any) -> str:
    # setools ends some statements with "; " (constraints): keep the words only.
    return str(item).strip()


def _is_set(value: object) -> bool:
    return isinstance(value, (set, frozenset))


def _render_set(values: Iterable[Any]) -> list[str]:
    return sorted(hex(v) if isinstance(v, int) else str(v) for v in values)


def _render_change(subject: str, change: Any) -> str:
    """One setools ``Modified*`` named tuple as ``subject: what changed``.
    Every ``added_X``/``removed_X`` field pair becomes ``X +a -b`` (sets) or
    ``X old -> new`` (single values); ``matched_*`` fields are left out."""
    parts: list[str] = []
    if type(change).__name__ == "ModifiedProperty":
        return f"{change.property}: {change.removed} -> {change.added}"
    for field in change._fields:
        if not field.startswith("added_"):
            continue
        stem = field[len("added_"):]
        added, removed = getattr(change, field), getattr(change, "removed_" + stem)
        if _is_set(added) or _is_set(removed):
            items = [f"+{v}" for v in _render_set(added or ())]
            items += [f"-{v}" for v in _render_set(removed or ())]
            if items:
                parts.append(f"{stem} {' '.join(items)}")
        elif added is not None or removed is not None:
            parts.append(f"{stem} {removed} -> {added}")
    if getattr(change, "modified_permissive", False):
        parts.append(f"permissive {change.permissive} -> {not change.permissive}")
    return f"{subject}: {'; '.join(parts)}"


def _render_modified(modified: Any) -> list[str]:
    if isinstance(modified, dict):
        return sorted(_render_change(_text(k), v) for k, v in modified.items())
    # Lists of named tuples whose first field is the rule (or level) itself.
    return sorted(_render_change(_text(m[0]), m) for m in modified)


def _boolean(b: Any) -> dict[str, Any]:
    return {"name": str(b), "default": bool(b.state)}


def _category_diff(diff: Any, name: str) -> CategoryDiff:
    from setools.diff import PolicyDifference  # noqa: PLC0415

    def get(prefix: str) -> Any:
        attr = f"{prefix}_{name}"
        return getattr(diff, attr) if hasattr(PolicyDifference, attr) else None

    added: Any = get("added") or ()
    removed: Any = get("removed") or ()
    modified: Any = get("modified") or {}
    if name == "booleans":
        return {
            "added": sorted((_boolean(b) for b in added), key=lambda d: d["name"]),
            "removed": sorted((_boolean(b) for b in removed), key=lambda d: d["name"]),
            "modified": sorted(({"name": str(b), "from": bool(m.removed_state),
                                 "to": bool(m.added_state)} for b, m in modified.items()),
                               key=lambda d: d["name"]),
        }
    return {"added": sorted(_text(x) for x in added), "removed": sorted(_text(x) for x in removed),
            "modified": _render_modified(modified)}


def _nonempty(d: CategoryDiff) -> bool:
    return bool(d["added"] or d["removed"] or d["modified"])


# -- rules ---------------------------------------------------------------------------

def _rule_kind(rule: Any) -> str:
    # setools calls a role allow rule's type "allow", like the TE one.
    kind = str(rule.ruletype)
    return "role_allow" if kind == "allow" and type(rule).__name__ == "RoleAllow" else kind


def _stored_te_rules(policy: Any) -> dict[str, Counter[tuple[Any, ...]]]:
    """Every TE rule as the policy stores it (attributes unexpanded), by kind,
    as a multiset of name-based keys: comparable across policies whatever the
    symbols' numbering."""
    from setools.exception import (  # noqa: PLC0415
        RuleNotConditional,
        RuleUseError,
        TERuleNoFilename,
    )

    out: dict[str, Counter[tuple[Any, ...]]] = {}
    for rule in policy.terules():
        kind = str(rule.ruletype)
        try:
            cond: tuple[str, bool] | None = (str(rule.conditional), bool(rule.conditional_block))
        except RuleNotConditional:
            cond = None
        if kind in TE_AV_KINDS:
            detail: Any = frozenset(rule.perms)
        elif kind in TE_XPERM_KINDS:
            detail = (rule.xperm_type, frozenset(rule.perms))
        else:
            try:
                filename = rule.filename
            except (TERuleNoFilename, RuleUseError):
                filename = None
            detail = (rule.default.name, filename)
        key = (rule.source.name, rule.target.name, rule.tclass.name, detail, cond)
        out.setdefault(kind, Counter())[key] += 1
    return out


def _count_rules(policy: Any) -> Counter[str]:
    counts: Counter[str] = Counter()
    for method in ("rbacrules", "mlsrules"):
        for rule in getattr(policy, method)():
            counts[_rule_kind(rule)] += 1
    return counts


def _rule_diff(diff: Any, kind: str) -> CategoryDiff:
    """setools' expanded diff of one rule kind (``added_allows``, ...)."""
    added = getattr(diff, f"added_{kind}s")
    removed = getattr(diff, f"removed_{kind}s")
    # role_allow rules have no "modified": their key is the whole rule.
    modified = getattr(diff, f"modified_{kind}s", None) or ()
    return {"added": sorted(_text(r) for r in added), "removed": sorted(_text(r) for r in removed),
            "modified": _render_modified(modified)}


# -- order checks --------------------------------------------------------------------

def _first_match_order(left: list[Any], right: list[Any],
                       overlaps: Callable[[Any, Any], bool]) -> list[str]:
    """Entries of a first-match table present in both policies that overlap
    must keep their relative order, or some port/address gets another label."""
    right_pos = {str(x): i for i, x in enumerate(right)}
    common = [x for x in left if str(x) in right_pos]
    moved = []
    for i, a in enumerate(common):
        for b in common[i + 1:]:
            if right_pos[str(a)] > right_pos[str(b)] and overlaps(a, b):
                moved.append(f"{b} now precedes {a}")
    return sorted(moved)


def _port_key(p: Any) -> tuple[str, int, int]:
    return (str(p.protocol), int(p.ports.low), int(p.ports.high))


def _ports_overlap(a: tuple[str, int, int], b: tuple[str, int, int]) -> bool:
    return a[0] == b[0] and a[1] <= b[2] and b[1] <= a[2]


class _Keyed:
    """A table entry with its overlap key computed once."""

    __slots__ = ("text", "key")

    def __init__(self, text: str, key: Any) -> None:
        self.text, self.key = text, key

    def __str__(self) -> str:
        return self.text


def _order_checks(left: Any, right: Any) -> dict[str, CategoryDiff]:
    out: dict[str, CategoryDiff] = {}

    def table(policy: Any, method: str, key: Callable[[Any], Any]) -> list[_Keyed]:
        return [_Keyed(str(x), key(x)) for x in getattr(policy, method)()]

    ports = _first_match_order(table(left, "portcons", _port_key),
                               table(right, "portcons", _port_key),
                               lambda a, b: _ports_overlap(a.key, b.key))
    nodes = _first_match_order(table(left, "nodecons", lambda n: n.network),
                               table(right, "nodecons", lambda n: n.network),
                               lambda a, b: a.key.version == b.key.version
                               and bool(a.key.overlaps(b.key)))
    sens_l = [str(s) for s in sorted(left.sensitivities())]
    sens_r = [str(s) for s in sorted(right.sensitivities())]
    common = set(sens_l) & set(sens_r)
    sens_l, sens_r = [s for s in sens_l if s in common], [s for s in sens_r if s in common]
    sens = [f"{' '.join(sens_l)} -> {' '.join(sens_r)}"] if sens_l != sens_r else []
    for name, moved in (("portcon_order", ports), ("nodecon_order", nodes),
                        ("sensitivity_order", sens)):
        if moved:
            out[name] = {"added": [], "removed": [], "modified": moved}
    return out


# -- the comparison --------------------------------------------------------------------

class _Steps:
    def __init__(self, progress: Progress | None, total: int) -> None:
        self.progress, self.total, self.done = progress, total, 0

    def __call__(self, phase: str) -> None:
        if self.progress is not None:
            self.progress(phase, min(self.done, self.total), self.total)
        self.done += 1

    def finish(self) -> None:
        if self.progress is not None:
            self.progress("done", self.total, self.total)


def compare(left: PolicySource | None, right: PolicySource, *, full: bool = False,
            progress: Progress | None = None, labels: tuple[str, str] = ("", "")) -> Comparison:
    """Compare two binary policies (paths or bytes) by meaning; ``left`` is
    the old one, ``right`` the new one. ``left=None`` compares with nothing:
    everything in ``right`` is added.

    Rule counts in ``rules``: role and range rules, and in full mode the TE
    rules of every kind whose stored rules differ, are counted the way setools
    expands them (one rule per source/target type pair; a permission change is
    "modified"). In quick mode TE rules are counted as stored in the policy
    (an attribute rule counts once; a permission change counts as one removed
    and one added rule). ``labels`` name the two policies in errors."""
    start = time.monotonic()
    n_steps = 1 + len(CATEGORIES) + 1 + 1 + len(RBAC_KINDS + MLS_KINDS)
    if full:
        n_steps += len(TE_KINDS)
    step = _Steps(progress, n_steps)
    step("loading policies")
    right_p = load_policy(right, what=labels[1])
    if left is None:
        return _against_nothing(right_p, full, step, start)
    left_p = load_policy(left, what=labels[0])
    return _compare(left_p, right_p, full, step, start)


def _compare(left_p: Any, right_p: Any, full: bool, step: _Steps, start: float) -> Comparison:
    from setools.diff import PolicyDifference  # noqa: PLC0415

    diff = PolicyDifference(left_p, right_p)
    differences: dict[str, CategoryDiff] = {}
    for cat in CATEGORIES:
        step(cat.label)
        d = _category_diff(diff, cat.name)
        if _nonempty(d):
            differences[cat.name] = d
    step("ordered tables")
    differences.update(_order_checks(left_p, right_p))

    step("TE rules as stored")
    stored_l, stored_r = _stored_te_rules(left_p), _stored_te_rules(right_p)
    counts_l, counts_r = _count_rules(left_p), _count_rules(right_p)
    # Same stored rules and same attribute members mean the same expanded
    # rules: setools' (slow) expansion is only needed where they differ.
    members_same = "type_attributes" not in differences
    rules: dict[str, RuleCount] = {}
    rule_changes: dict[str, CategoryDiff] = {}
    empty: Counter[tuple[Any, ...]] = Counter()
    for kind in RULE_KINDS:
        changes: CategoryDiff | None
        if kind in TE_KINDS:
            sl, sr = stored_l.get(kind, empty), stored_r.get(kind, empty)
            n_left, n_right = sum(sl.values()), sum(sr.values())
            if full:
                step(LABELS[kind])
            if sl == sr and members_same:
                changes = {"added": [], "removed": [], "modified": []}
            elif full:
                changes = _rule_diff(diff, kind)
            else:
                changes = None
        else:
            step(LABELS[kind])
            n_left, n_right = counts_l.get(kind, 0), counts_r.get(kind, 0)
            changes = _rule_diff(diff, kind)
        if not (n_left or n_right):
            continue
        if changes is None:
            # Quick mode: the stored TE rules, compared as multisets.
            rules[kind] = {"left": n_left, "right": n_right, "added": sum((sr - sl).values()),
                           "removed": sum((sl - sr).values()), "modified": 0}
            continue
        rules[kind] = {"left": n_left, "right": n_right, "added": len(changes["added"]),
                       "removed": len(changes["removed"]), "modified": len(changes["modified"])}
        if full and _nonempty(changes):
            rule_changes[kind] = changes
    step.finish()
    identical = not differences and not any(
        c["added"] or c["removed"] or c["modified"] for c in rules.values())
    seconds = time.monotonic() - start
    log.debug("compared policies (%s) in %.3fs: %s", "full" if full else "quick", seconds,
              "identical" if identical else f"{len(differences)} categories differ")
    return {"mode": "full" if full else "quick", "identical": identical,
            "left": policy_info(left_p), "right": policy_info(right_p),
            "differences": differences, "rules": rules, "rule_changes": rule_changes,
            "seconds": round(seconds, 6)}


def _items(policy: Any, cat: Category) -> list[Any]:
    if not cat.method:
        return []
    items = getattr(policy, cat.method)()
    if cat.ruletype:
        items = (x for x in items if str(x.ruletype) == cat.ruletype)
    return list(items)


def _against_nothing(right: Any, full: bool, step: _Steps, start: float) -> Comparison:
    differences: dict[str, CategoryDiff] = {}
    for cat in CATEGORIES:
        step(cat.label)
        items = _items(right, cat)
        if not items:
            continue
        added = (sorted((_boolean(b) for b in items), key=lambda d: d["name"])
                 if cat.name == "booleans" else sorted(_text(x) for x in items))
        differences[cat.name] = {"added": added, "removed": [], "modified": []}
    step("ordered tables")
    step("rules")
    by_kind: dict[str, list[Any]] = {}
    for method in ("terules", "rbacrules", "mlsrules"):
        for rule in getattr(right, method)():
            by_kind.setdefault(_rule_kind(rule), []).append(rule)
    rules: dict[str, RuleCount] = {}
    rule_changes: dict[str, CategoryDiff] = {}
    for kind in RULE_KINDS:
        if kind in TE_KINDS and full:
            step(LABELS[kind])
        elif kind not in TE_KINDS:
            step(LABELS[kind])
        found = by_kind.get(kind, [])
        if not found:
            continue
        rules[kind] = {"left": 0, "right": len(found), "added": len(found), "removed": 0,
                       "modified": 0}
        if full:
            rule_changes[kind] = {"added": sorted(_text(r) for r in found), "removed": [],
                                  "modified": []}
    step.finish()
    return {"mode": "full" if full else "quick", "identical": False, "left": None,
            "right": policy_info(right), "differences": differences, "rules": rules,
            "rule_changes": rule_changes, "seconds": round(time.monotonic() - start, 6)}


def semantic_differences(left: PolicySource, right: PolicySource, *,
                         progress: Progress | None = None) -> dict[str, CategoryDiff]:
    """What differs in meaning between two binary policies: every category and
    rule kind with a change (keys of ``LABELS``), nothing else. An empty dict
    means the policies are semantically identical as far as setools and the
    order checks can tell (see the module docstring for what that covers)."""
    result = compare(left, right, full=True, progress=progress)
    return {**result["differences"], **result["rule_changes"]}
