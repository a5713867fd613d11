"""Where things are under a root: the SELinux config, semanage.conf, the module
store and the final policy directory.

libsemanage resolves two of these from the *host* when run as ``semodule -p
ROOT``: the policy type comes from the host's ``/etc/selinux/config``
(``selinux_policy_root()``), and a root without ``etc/selinux/semanage.conf``
silently falls back to the host's (libsemanage ``semanage_conf_path``). selcache
reads both from the root itself and compiles in a chroot, so neither leaks in.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from . import fsutil
from .errors import InvalidRoot

CONFIG_REL = "etc/selinux/config"
SEMANAGE_CONF_REL = "etc/selinux/semanage.conf"
DEFAULT_STORE_ROOT = "/var/lib/selinux"

_TYPE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_SECTION_RE = re.compile(r"^\[([a-z_ ]+)\]$")


@dataclass(frozen=True)
class Layout:
    """The SELinux-relevant places of one root. All paths but ``root`` are
    relative to the root, with no leading slash."""

    root: str
    policy_type: str
    store_root: str
    settings: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def store(self) -> str:
        return f"{self.store_root}/{self.policy_type}"

    @property
    def active(self) -> str:
        return f"{self.store}/active"

    @property
    def final(self) -> str:
        return f"etc/selinux/{self.policy_type}"

    @property
    def policy_version(self) -> int | None:
        value = self.settings.get("policy-version")
        return int(value) if value is not None else None

    @property
    def store_in_final(self) -> bool:
        """True on ostree-style roots, where store-root is /etc/selinux and the
        store lives inside the final policy directory."""
        return self.store == self.final or self.store.startswith(self.final + "/")


def _text(data: bytes, what: str) -> str:
    if b"\r" in data:
        raise InvalidRoot(f"{what} has CR (DOS) line endings, which libselinux and "
                          "libsemanage do not accept; convert it to LF")
    if b"\0" in data:
        raise InvalidRoot(f"{what} contains NUL bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRoot(f"{what} is not valid UTF-8 text") from exc


def parse_selinux_config(data: bytes) -> str:
    """Return SELINUXTYPE from etc/selinux/config, validated as a bare name."""
    policy_type = None
    for line in _text(data, CONFIG_REL).splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        if key.strip() == "SELINUXTYPE":
            policy_type = value.strip()
    if policy_type is None:
        raise InvalidRoot(f"{CONFIG_REL} has no SELINUXTYPE= line")
    if not _TYPE_RE.match(policy_type) or policy_type in (".", ".."):
        raise InvalidRoot(f"{CONFIG_REL}: SELINUXTYPE={policy_type!r} is not a valid policy "
                          "type name (letters, digits, '_', '.', '-'; no '/')")
    return policy_type


def parse_semanage_conf(data: bytes) -> dict[str, str]:
    """The top-level ``key = value`` settings of semanage.conf. Sections such as
    ``[verify kernel]`` ... ``[end]`` configure external programs; their lines
    are skipped here (they still feed the key, as the whole file does)."""
    settings: dict[str, str] = {}
    in_section = False
    for lineno, raw in enumerate(_text(data, SEMANAGE_CONF_REL).splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        section = _SECTION_RE.match(line)
        if section:
            in_section = section.group(1) != "end"
            continue
        if in_section:
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise InvalidRoot(f"{SEMANAGE_CONF_REL}:{lineno}: cannot parse {raw!r}")
        settings[key.strip()] = value.strip().strip('"')
    return settings


def _store_root(settings: dict[str, str]) -> str:
    store_root = settings.get("store-root", DEFAULT_STORE_ROOT)
    if not store_root.startswith("/"):
        raise InvalidRoot(f"{SEMANAGE_CONF_REL}: store-root={store_root!r} is not absolute")
    return "/".join(fsutil.split_rel(store_root))


def read_layout(root: str) -> Layout:
    """Read a root's config and semanage.conf; raise InvalidRoot if unusable."""
    with fsutil.opened_root(root) as rfd:
        try:
            config = fsutil.read_rel(rfd, CONFIG_REL, max_size=1 << 20)
        except FileNotFoundError as exc:
            raise InvalidRoot(f"{root}: no {CONFIG_REL}; is this an SELinux root?") from exc
        policy_type = parse_selinux_config(config)
        try:
            conf = fsutil.read_rel(rfd, SEMANAGE_CONF_REL, max_size=1 << 20)
        except FileNotFoundError:
            # libsemanage's built-in defaults apply (store-root /var/lib/selinux).
            conf = b""
        settings = parse_semanage_conf(conf)
    module_store = settings.get("module-store", "direct")
    if module_store != "direct":
        raise InvalidRoot(f"{SEMANAGE_CONF_REL}: module-store={module_store!r}; only 'direct' "
                          "stores can be compiled offline")
    version = settings.get("policy-version")
    if version is not None and not version.isdigit():
        raise InvalidRoot(f"{SEMANAGE_CONF_REL}: policy-version={version!r} is not a number")
    layout = Layout(root=os.path.abspath(root), policy_type=policy_type, store_root=_store_root(settings),
                    settings=settings)
    with fsutil.opened_root(root) as rfd:
        try:
            with fsutil.opened_dir(rfd, layout.active):
                pass
        except FileNotFoundError as exc:
            if fsutil.lstat_rel(rfd, f"{layout.store}/previous") is not None:
                # libsemanage renames active -> previous, then tmp -> active
                # (semanage_commit_sandbox): a commit cut short in between.
                # Which copy is right is not ours to guess.
                raise InvalidRoot(
                    f"{root}: /{layout.store} has previous/ but no active/: a libsemanage "
                    "commit was interrupted; restore the store (e.g. rename previous to "
                    "active, or run semodule -B) and retry") from exc
            raise InvalidRoot(f"{root}: no module store at /{layout.active} "
                              f"(policy type {policy_type!r} unknown?)") from exc
    return layout
