"""The fleet tier: a shared Redis cache behind the local one, with signed entries.

The only module that imports ``redis`` and ``cryptography``, and only once a
remote is configured: a machine without one never loads either.

A remote entry is a local manifest's JSON bytes, an ed25519 signature over
them made on a builder, and the content-addressed blobs the manifest names.
Redis itself is not trusted. A machine uses an entry only if the signature
verifies with one of its trusted public keys, the signed manifest names the
key and policy type that were looked up, and every blob has the size and
sha256 the manifest gives. Anything else, and every Redis error or timeout,
is a warning and a miss: like the local cache, the remote is an optimisation
and never the reason a finalize fails. After the first connection failure or
timeout the tier stays off for the rest of the run, so a dead server costs
one timeout at most.

Configuration, highest precedence first: the command line (or the caller's
``load_config`` arguments), the environment (``SELCACHE_REMOTE``,
``SELCACHE_REMOTE_READONLY``, ``SELCACHE_REMOTE_TIMEOUT``,
``SELCACHE_SIGNING_KEY``, ``SELCACHE_TRUSTED_KEYS``), then the ``[remote]``
table of ``/etc/selcache/selcache.conf`` (TOML; ``SELCACHE_CONFIG`` names
another file).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import stat
import time
import tomllib
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from . import fsutil
from .errors import ConfigError
from .store import Cache, Manifest

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

log = logging.getLogger(__name__)

DEFAULT_CONFIG_PATH = "/etc/selcache/selcache.conf"
DEFAULT_TIMEOUT = 0.5
DEFAULT_NAMESPACE = "selcache"
#: Signatures cover this prefix and the manifest bytes, so a signature made
#: for anything else with the same key can never pass for an entry.
SIGNING_CONTEXT = b"selcache remote entry v1\0"
#: A compromised server must not make a finalizer read gigabytes: manifests
#: are a few dozen KiB, blobs are read only at the size the signed manifest gives.
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
#: Names of the local counters this tier keeps, as ``remote_NAME``.
COUNTERS = ("hits", "misses", "refused", "errors", "uploads")
_COUNTER_OF = {"hit": "remote_hits", "miss": "remote_misses", "refused": "remote_refused",
               "error": "remote_errors"}

_CONFIG_KEYS = frozenset({"url", "readonly", "timeout", "signing_key", "trusted_keys",
                          "namespace"})
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


@dataclass(frozen=True)
class RemoteConfig:
    """Where the fleet tier is and how to trust it. ``url=None``: no remote."""

    url: str | None = None
    readonly: bool = False
    timeout: float = DEFAULT_TIMEOUT
    signing_key: str | None = None
    trusted_keys: tuple[str, ...] = ()
    namespace: str = DEFAULT_NAMESPACE
    source: str = field(default="defaults", compare=False)

    @property
    def enabled(self) -> bool:
        return bool(self.url)


# -- configuration -------------------------------------------------------------

def _check_url(url: str, where: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(f"{where}: remote URL {redact(url)!r} must start with redis://, "
                          "rediss:// or unix://")
    try:
        parts.port  # noqa: B018 - parsing it is the check
    except ValueError as exc:
        raise ConfigError(f"{where}: remote URL {redact(url)!r}: {exc}") from exc
    if parts.scheme != "unix" and not parts.hostname:
        raise ConfigError(f"{where}: remote URL {redact(url)!r} has no host")
    db = parts.path.lstrip("/")
    if parts.scheme != "unix" and db and not db.isdigit():
        raise ConfigError(f"{where}: remote URL {redact(url)!r}: the database must be a number")
    return url


def redact(url: str) -> str:
    """``url`` without its password, for logs and ``status``."""
    parts = urlsplit(url)
    creds, at, hostport = parts.netloc.rpartition("@")
    if not at or ":" not in creds:
        return url
    user = creds.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hostport}"))


def _timeout(value: object, where: str) -> float:
    try:
        t = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: timeout {value!r} is not a number of seconds") from exc
    if not 0 < t <= 60:
        raise ConfigError(f"{where}: timeout {t} must be above 0 and at most 60 seconds")
    return t


def _bool(value: str, where: str) -> bool:
    if value.strip().lower() in _TRUE:
        return True
    if value.strip().lower() in _FALSE:
        return False
    raise ConfigError(f"{where}: {value!r} is not a boolean (use 1/0, true/false)")


def _read_file(path: str, required: bool) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            doc = tomllib.load(fh)
    except FileNotFoundError as exc:
        if required:
            raise ConfigError(f"config file {path} (from SELCACHE_CONFIG) does not exist") from exc
        return {}
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    unknown = sorted(set(doc) - {"remote"})
    if unknown:
        raise ConfigError(f"config file {path}: unknown section(s) {', '.join(unknown)} "
                          "(known: [remote])")
    table = doc.get("remote", {})
    if not isinstance(table, dict):
        raise ConfigError(f"config file {path}: 'remote' must be a table ([remote])")
    unknown = sorted(set(table) - _CONFIG_KEYS)
    if unknown:
        raise ConfigError(f"config file {path}: unknown key(s) in [remote]: {', '.join(unknown)} "
                          f"(known: {', '.join(sorted(_CONFIG_KEYS))})")
    return table


def _file_values(table: Mapping[str, Any], path: str) -> dict[str, Any]:
    """The [remote] table, typed; key paths relative to the file's directory."""
    base = os.path.dirname(os.path.abspath(path))
    where = f"config file {path}"
    out: dict[str, Any] = {}
    for name in ("url", "signing_key", "namespace"):
        if name in table:
            if not isinstance(table[name], str):
                raise ConfigError(f"{where}: {name} must be a string")
            out[name] = table[name]
    if "signing_key" in out:
        out["signing_key"] = os.path.join(base, out["signing_key"])
    if "readonly" in table:
        if not isinstance(table["readonly"], bool):
            raise ConfigError(f"{where}: readonly must be true or false")
        out["readonly"] = table["readonly"]
    if "timeout" in table:
        if isinstance(table["timeout"], bool):
            raise ConfigError(f"{where}: timeout must be a number of seconds")
        out["timeout"] = _timeout(table["timeout"], where)
    if "trusted_keys" in table:
        keys = table["trusted_keys"]
        if isinstance(keys, str):
            keys = [keys]
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise ConfigError(f"{where}: trusted_keys must be a list of paths")
        out["trusted_keys"] = tuple(os.path.join(base, k) for k in keys)
    return out


def _env_values(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "SELCACHE_REMOTE" in env:
        out["url"] = env["SELCACHE_REMOTE"] or None  # empty: switch a configured remote off
    if "SELCACHE_REMOTE_READONLY" in env:
        out["readonly"] = _bool(env["SELCACHE_REMOTE_READONLY"], "SELCACHE_REMOTE_READONLY")
    if env.get("SELCACHE_REMOTE_TIMEOUT"):
        out["timeout"] = _timeout(env["SELCACHE_REMOTE_TIMEOUT"], "SELCACHE_REMOTE_TIMEOUT")
    if env.get("SELCACHE_SIGNING_KEY"):
        out["signing_key"] = env["SELCACHE_SIGNING_KEY"]
    if env.get("SELCACHE_TRUSTED_KEYS"):
        out["trusted_keys"] = tuple(p for p in env["SELCACHE_TRUSTED_KEYS"].split(":") if p)
    return out


def load_config(*, url: str | None = None, readonly: bool | None = None,
                timeout: float | None = None, signing_key: str | None = None,
                trusted_keys: Sequence[str] | None = None,
                environ: Mapping[str, str] | None = None) -> RemoteConfig:
    """The remote configuration: arguments over environment over config file.
    Raises ConfigError on a malformed file or value; nothing is contacted here."""
    env = os.environ if environ is None else environ
    explicit = env.get("SELCACHE_CONFIG")
    path = explicit or DEFAULT_CONFIG_PATH
    values = _file_values(_read_file(path, required=bool(explicit)), path)
    sources = [path] if values else []
    from_env = _env_values(env)
    if from_env:
        sources.append("environment")
    values.update(from_env)
    args = {"url": url, "readonly": readonly, "timeout": timeout, "signing_key": signing_key,
            "trusted_keys": tuple(trusted_keys) if trusted_keys is not None else None}
    given = {k: v for k, v in args.items() if v is not None}
    if given:
        sources.append("command line")
    values.update(given)
    if values.get("url"):
        values["url"] = _check_url(str(values["url"]), " + ".join(sources))
    if "timeout" in given:
        values["timeout"] = _timeout(given["timeout"], "--remote-timeout")
    namespace = values.get("namespace", DEFAULT_NAMESPACE)
    if not namespace or any(c.isspace() for c in namespace):
        raise ConfigError(f"remote namespace {namespace!r} must be non-empty, without spaces")
    return RemoteConfig(source=" + ".join(sources) or "defaults", **values)


# -- keys ----------------------------------------------------------------------

def key_id(public: Ed25519PublicKey) -> str:
    """A short, stable name for a public key: sha256 of its 32 raw bytes."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    raw = public.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


_PUBLIC_PEM = b"-----BEGIN PUBLIC KEY-----"
_PRIVATE_PEM = b"-----BEGIN PRIVATE KEY-----"


def read_public_pem(path: str) -> list[bytes]:
    """The PEM PUBLIC KEY blocks of a trusted-key file (one or more): read and
    checked for shape only, without loading cryptography."""
    try:
        with open(path, "rb") as fh:
            text = fh.read()
    except OSError as exc:
        raise ConfigError(f"cannot read trusted key {path}: {exc}") from exc
    blocks = [_PUBLIC_PEM + b for b in text.split(_PUBLIC_PEM)[1:]]
    if not blocks:
        raise ConfigError(f"trusted key {path} has no PEM public key "
                          f"({_PUBLIC_PEM.decode()}); is it a private key?")
    return blocks


def parse_public_pem(block: bytes, path: str) -> Ed25519PublicKey:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        key = load_pem_public_key(block)
    except ValueError as exc:
        raise ConfigError(f"trusted key {path} is not a valid PEM public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"trusted key {path} is a {type(key).__name__}, not ed25519")
    return key


def read_private_pem(path: str) -> bytes:
    """A builder's private key file: a regular file, unencrypted PKCS#8 PEM, and
    not readable by group or others (like ssh, refuse a key others could copy)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as exc:
        raise ConfigError(f"cannot read signing key {path}: {exc}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"signing key {path} is not a regular file")
        if st.st_mode & 0o077:
            raise ConfigError(f"signing key {path} is readable by others (mode "
                              f"{stat.S_IMODE(st.st_mode):o}); chmod 600 it")
        with os.fdopen(os.dup(fd), "rb") as fh:
            data = fh.read()
    finally:
        os.close(fd)
    if _PRIVATE_PEM not in data:
        raise ConfigError(f"signing key {path} is not an unencrypted PKCS#8 PEM private key "
                          f"({_PRIVATE_PEM.decode()})")
    return data


def parse_private_pem(data: bytes, path: str) -> Ed25519PrivateKey:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"signing key {path} is not an unencrypted PEM private key: "
                          f"{exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"signing key {path} is a {type(key).__name__}, not ed25519")
    return key


def load_public_keys(path: str) -> list[Ed25519PublicKey]:
    """Every ed25519 public key in a PEM file."""
    return [parse_public_pem(b, path) for b in read_public_pem(path)]


def load_private_key(path: str) -> Ed25519PrivateKey:
    return parse_private_pem(read_private_pem(path), path)


def generate_keypair(prefix: str) -> tuple[str, str, str]:
    """Write PREFIX.key (PKCS#8 PEM, mode 600) and PREFIX.pub (SubjectPublicKeyInfo
    PEM, mode 644), the formats of ``openssl genpkey -algorithm ed25519``.
    Refuses to overwrite either. Returns (private path, public path, key id)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        NoEncryption,
        PrivateFormat,
        PublicFormat,
    )

    private = Ed25519PrivateKey.generate()
    pem_private = private.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    pem_public = private.public_key().public_bytes(Encoding.PEM,
                                                   PublicFormat.SubjectPublicKeyInfo)
    key_path, pub_path = f"{prefix}.key", f"{prefix}.pub"
    directory = os.path.dirname(os.path.abspath(key_path))
    for p in (key_path, pub_path):
        if os.path.lexists(p):
            raise ConfigError(f"{p} exists; not overwriting a key")
    try:
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise ConfigError(f"cannot write keys into {directory}: {exc}") from exc
    try:
        fsutil.write_new_at(dfd, os.path.basename(key_path), pem_private, 0o600)
        fsutil.write_new_at(dfd, os.path.basename(pub_path), pem_public, 0o644)
        fsutil.fsync_dir(dfd)
    except OSError as exc:
        raise ConfigError(f"cannot write keys {key_path}, {pub_path}: {exc}") from exc
    finally:
        os.close(dfd)
    return key_path, pub_path, key_id(private.public_key())


# -- the tier --------------------------------------------------------------------

@dataclass(frozen=True)
class Fetched:
    """What one remote lookup gave: ``outcome`` is hit, miss, refused or error."""

    outcome: str
    manifest: Manifest | None = None
    outputs: dict[str, bytes] | None = None
    reason: str = ""


class _Refused(Exception):
    """The remote served something this machine must not trust."""


class _Missing(Exception):
    """The remote has no complete entry (never stored, or evicted)."""


class RemoteTier:
    """One run's connection to the shared cache. Key files are read and checked
    when it is created (a missing or malformed one is a ConfigError before
    anything happens); parsing them (loading cryptography costs ~0.1 s) and
    contacting Redis wait until a lookup or an upload needs them, so a local
    hit pays for neither."""

    def __init__(self, config: RemoteConfig) -> None:
        if not config.url:
            raise ValueError("RemoteTier needs a configured remote URL")
        for module in ("redis", "cryptography"):
            if importlib.util.find_spec(module) is None:
                raise ConfigError(f"a remote is configured ({config.source}) but the Python "
                                  f"package {module!r} is missing: install selcache[remote]")
        self.config = config
        self.seconds = 0.0
        self._client: Any = None
        self._down: str | None = None
        self._trusted_pem = [(path, block) for path in config.trusted_keys
                             for block in read_public_pem(path)]
        self._signer_pem = (read_private_pem(config.signing_key)
                            if config.signing_key and not config.readonly else None)
        if not self._trusted_pem and self._signer_pem is None:
            raise ConfigError(f"remote {redact(config.url)} is set ({config.source}) but "
                              "no trusted public key is given: nothing it serves could be "
                              "verified (set trusted_keys, --trusted-key or "
                              "SELCACHE_TRUSTED_KEYS)")
        self._loaded = False
        self._signer: Ed25519PrivateKey | None = None
        self._signer_id: str | None = None
        self._trusted: dict[str, Ed25519PublicKey] = {}

    def _keys(self) -> None:
        """Parse the key files (once). Raises ConfigError."""
        if self._loaded:
            return
        for path, block in self._trusted_pem:
            key = parse_public_pem(block, path)
            self._trusted[key_id(key)] = key
        if self._signer_pem is not None:
            self._signer = parse_private_pem(self._signer_pem, self.config.signing_key or "")
            public = self._signer.public_key()
            self._signer_id = key_id(public)
            # A builder trusts what it signs itself.
            self._trusted.setdefault(self._signer_id, public)
        self._loaded = True

    def close(self) -> None:
        if self._client is not None:
            try:
                self._client.close()
            except Exception as exc:  # noqa: BLE001 - closing must never fail a run
                log.debug("closing the remote connection: %s", exc)
            self._client = None

    def describe(self) -> dict[str, Any]:
        self._keys()
        c = self.config
        return {"url": redact(c.url or ""), "readonly": c.readonly, "timeout": c.timeout,
                "namespace": c.namespace, "signing_key": self._signer_id,
                "trusted_keys": sorted(self._trusted), "config": c.source}

    # -- redis plumbing ----------------------------------------------------------
    def _redis(self) -> Any:
        if self._client is None:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry

            t = self.config.timeout
            # redis-py retries failed commands by default (3 times with
            # backoff since 6.0): here one failure must cost one timeout.
            self._client = redis.Redis.from_url(
                self.config.url or "", socket_timeout=t, socket_connect_timeout=t,
                retry=Retry(NoBackoff(), 0), health_check_interval=0)
        return self._client

    def _entry(self, key: str) -> str:
        return f"{self.config.namespace}:v1:entry:{key}"

    def _blob(self, sha256: str) -> str:
        return f"{self.config.namespace}:v1:blob:{sha256}"

    def _fail(self, what: str, exc: Exception) -> None:
        self._down = f"{type(exc).__name__}: {exc}"
        log.warning("remote cache %s unusable during %s (%s); continuing without it for "
                    "this run", redact(self.config.url or ""), what, self._down)

    # -- lookups -----------------------------------------------------------------
    def _signed_manifest(self, r: Any, key: str, policy_type: str) -> Manifest:
        entry = self._entry(key)
        size = int(r.hstrlen(entry, "manifest"))
        if size == 0:
            raise _Missing("no entry")
        if size > MAX_MANIFEST_BYTES:
            raise _Refused(f"manifest of {size} bytes is implausibly large")
        data, signature = r.hmget(entry, ["manifest", "signature"])
        if not isinstance(data, bytes) or not isinstance(signature, bytes):
            raise _Refused("entry has no signature")
        signer = self._verify(data, signature)
        if signer is None:
            raise _Refused("signature does not verify with any trusted key")
        try:
            manifest = Manifest.from_bytes(data)
        except (ValueError, KeyError, TypeError) as exc:
            raise _Refused(f"signed manifest is unreadable ({exc})") from exc
        # A valid signature only says a builder made this manifest; it must
        # also be the one for these inputs (an entry moved to another key).
        if manifest.key != key:
            raise _Refused(f"signed manifest is for key {manifest.key[:12]}")
        if manifest.policy_type != policy_type:
            raise _Refused(f"signed manifest is for policy type {manifest.policy_type!r}")
        log.debug("remote manifest %s signed by %s", key[:12], signer)
        return manifest

    def _verify(self, data: bytes, signature: bytes) -> str | None:
        from cryptography.exceptions import InvalidSignature

        self._keys()
        for kid, public in self._trusted.items():
            try:
                public.verify(signature, SIGNING_CONTEXT + data)
            except InvalidSignature:
                continue
            return kid
        return None

    def _blobs(self, r: Any, manifest: Manifest) -> dict[str, bytes]:
        sizes = {f.sha256: f.size for f in manifest.files}
        digests = sorted(sizes)
        pipe = r.pipeline(transaction=False)
        for d in digests:
            pipe.strlen(self._blob(d))
        lengths = pipe.execute()
        for d, n in zip(digests, lengths, strict=True):
            if int(n) == 0 and sizes[d] != 0:
                raise _Missing(f"blob {d[:12]} is gone")
            if int(n) != sizes[d]:
                raise _Refused(f"blob {d[:12]} has {n} bytes, the signed manifest says {sizes[d]}")
        values = r.mget([self._blob(d) for d in digests]) if digests else []
        data: dict[str, bytes] = {}
        for d, value in zip(digests, values, strict=True):
            if value is None:
                raise _Missing(f"blob {d[:12]} is gone")
            if not isinstance(value, bytes) or hashlib.sha256(value).hexdigest() != d:
                raise _Refused(f"blob {d[:12]} does not match its digest")
            data[d] = value
        return {f.path: data[f.sha256] for f in manifest.files}

    def fetch(self, key: str, policy_type: str) -> Fetched:
        """The entry for ``key``, signature and blobs verified, or why not."""
        if self._down is not None:
            return Fetched("error", reason=self._down)
        import redis

        t = time.monotonic()
        try:
            r = self._redis()
            manifest = self._signed_manifest(r, key, policy_type)
            outputs = self._blobs(r, manifest)
        except _Missing as exc:
            log.info("remote miss for %s: %s", key[:12], exc)
            return Fetched("miss", reason=str(exc))
        except _Refused as exc:
            log.warning("remote entry %s refused: %s; compiling locally", key[:12], exc)
            return Fetched("refused", reason=str(exc))
        except ConfigError as exc:
            self._fail("lookup", exc)
            return Fetched("error", reason=self._down or "")
        except redis.ResponseError as exc:
            # The server answered, but not for these types (WRONGTYPE): a key
            # overwritten with something else. Not a dead server.
            log.warning("remote entry %s refused: %s", key[:12], exc)
            return Fetched("refused", reason=str(exc))
        except (redis.RedisError, OSError) as exc:
            self._fail("lookup", exc)
            return Fetched("error", reason=self._down or "")
        finally:
            self.seconds += time.monotonic() - t
        log.info("remote hit for %s (%d files)", key[:12], len(outputs))
        return Fetched("hit", manifest, outputs)

    def probe(self, key: str, policy_type: str) -> str:
        """Whether the remote holds a signed manifest for ``key``: verified,
        missing, refused or unreachable. Reads no blobs (for ``status``)."""
        if self._down is not None:
            return "unreachable"
        import redis

        t = time.monotonic()
        try:
            self._signed_manifest(self._redis(), key, policy_type)
        except _Missing:
            return "missing"
        except (_Refused, redis.ResponseError):
            return "refused"
        except (redis.RedisError, OSError) as exc:
            self._fail("status", exc)
            return "unreachable"
        finally:
            self.seconds += time.monotonic() - t
        return "verified"

    # -- uploads -----------------------------------------------------------------
    @property
    def can_publish(self) -> bool:
        return self._signer_pem is not None and not self.config.readonly

    def publish(self, manifest: Manifest, blobs: Mapping[str, bytes]) -> bool:
        """Sign and upload one entry: blobs first, the entry last, so a reader
        never sees an entry whose blobs were not written. Blobs are written
        even if present: a tampered blob under its digest gets repaired."""
        if not self.can_publish or self._down is not None:
            return False
        try:
            self._keys()
        except ConfigError as exc:
            self._fail("upload", exc)
            return False
        assert self._signer is not None
        import redis

        data = manifest.to_bytes()
        signature = self._signer.sign(SIGNING_CONTEXT + data)
        t = time.monotonic()
        try:
            by_digest = {f.sha256: blobs[f.path] for f in manifest.files}
            pipe = self._redis().pipeline(transaction=False)
            for digest in sorted(by_digest):
                pipe.set(self._blob(digest), by_digest[digest])
            pipe.hset(self._entry(manifest.key), mapping={
                "manifest": data, "signature": signature, "signer": self._signer_id or ""})
            pipe.execute()
        except (redis.RedisError, OSError) as exc:
            self._fail("upload", exc)
            return False
        finally:
            self.seconds += time.monotonic() - t
        log.info("uploaded %s to the remote cache (%d files)", manifest.key[:12],
                 len(manifest.files))
        return True


# -- what the pipeline calls -------------------------------------------------------

def open_tier(config: RemoteConfig) -> RemoteTier | None:
    """The tier for ``config``, or None when no remote is configured; then
    neither redis nor cryptography is ever imported."""
    return RemoteTier(config) if config.enabled else None


def fetch_into(tier: RemoteTier | None, cache: Cache, key: str, policy_type: str,
               timings: MutableMapping[str, float]) -> tuple[Manifest, dict[str, bytes]] | None:
    """Look ``key`` up in the remote; a verified hit is written into the local tier."""
    if tier is None:
        return None
    before = tier.seconds
    got = tier.fetch(key, policy_type)
    timings["remote"] = timings.get("remote", 0.0) + tier.seconds - before
    cache.count(_COUNTER_OF[got.outcome])
    if got.manifest is None or got.outputs is None:
        return None
    cache.put_entry(got.manifest, got.outputs)
    return got.manifest, got.outputs


def publish(tier: RemoteTier | None, cache: Cache, manifest: Manifest,
            blobs: Mapping[str, bytes], timings: MutableMapping[str, float]) -> None:
    if tier is None or not tier.can_publish:
        return
    before = tier.seconds
    if tier.publish(manifest, blobs):
        cache.count("remote_uploads")
    timings["remote"] = timings.get("remote", 0.0) + tier.seconds - before


def status_doc(tier: RemoteTier | None, cache: Cache, key: str,
               policy_type: str) -> dict[str, Any]:
    """The ``remote`` part of ``status``: configuration, whether a verified entry
    for ``key`` is there, and this machine's remote counters."""
    counters = {name: cache.counter(f"remote_{name}") for name in COUNTERS}
    if tier is None:
        return {"url": None, "entry": None, **counters}
    return {**tier.describe(), "entry": tier.probe(key, policy_type), **counters}
