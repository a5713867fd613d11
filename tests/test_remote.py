"""The fleet tier on the small policy, against a real redis-server: signed
entries, tampering refused, dead or empty servers only cost a compile,
read-only clients never write, configuration and keys."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

import selcache
from selcache import remote, sample
from selcache.cli import main
from selcache.errors import ConfigError
from selcache.layout import read_layout
from selcache.remote import SIGNING_CONTEXT, RemoteConfig, RemoteTier, load_config
from selcache.store import Cache, Manifest

from .conftest import REPO, assert_matches_reference, output_files, tree_digest
from .fleet import TIMEOUT, Keys, RedisServer, builder, client, counters, no_compile
from .scenarios import booleans_local, module_added


def entry_key(key: str) -> str:
    return f"selcache:v1:entry:{key}"


def blob_key(sha256: str) -> str:
    return f"selcache:v1:blob:{sha256}"


def remote_manifest(server: RedisServer, key: str) -> Manifest:
    with server.client() as c:
        return Manifest.from_bytes(c.hget(entry_key(key), "manifest"))


def policy_file(manifest: Manifest) -> str:
    return next(f.sha256 for f in manifest.files if "/policy/policy." in f.path)


@pytest.fixture
def staged(small_root: Path, tmp_path: Path, redis_server: RedisServer, keys: Keys) -> str:
    """A builder staged the customized small policy; the entry is on the server.
    ``small_root`` now has the same inputs (a fleet machine)."""
    build = sample.copy_root(small_root, tmp_path / "builder-root")
    booleans_local(build)
    result = selcache.stage(str(build), str(tmp_path / "builder-cache"),
                            remote=builder(redis_server, keys))
    assert result.action == "compiled"
    booleans_local(small_root)
    return result.key


# -- the happy path -------------------------------------------------------------------

def test_remote_hit_installs_without_compiling(staged: str, small_root: Path, cache_dir: str,
                                               tmp_path: Path, redis_server: RedisServer,
                                               keys: Keys) -> None:
    before = redis_server.keys()
    result = selcache.finalize(str(small_root), cache_dir, runner=no_compile,
                               remote=client(redis_server, keys))
    assert (result.action, result.source, result.key) == ("reused", "remote", staged)
    assert result.compile_seconds is None and result.written
    assert_matches_reference(small_root, tmp_path)
    # Written into the local tier: the next run needs no remote at all.
    again = selcache.finalize(str(small_root), cache_dir, runner=no_compile,
                              remote=RemoteConfig())
    assert again.action == "unchanged"
    assert counters(cache_dir) == {"hits": 1, "misses": 0, "remote_hits": 1, "remote_misses": 0,
                                   "remote_refused": 0, "remote_errors": 0, "remote_uploads": 0}
    assert redis_server.keys() == before  # a read-only client wrote nothing


def test_stage_fetches_ahead_on_a_fleet_machine(staged: str, small_root: Path, cache_dir: str,
                                                redis_server: RedisServer, keys: Keys) -> None:
    before = tree_digest(small_root)
    fetched = selcache.stage(str(small_root), cache_dir, runner=no_compile,
                             remote=client(redis_server, keys))
    assert (fetched.action, fetched.source) == ("fetched", "remote")
    assert tree_digest(small_root) == before
    redis_server.stop()  # the update is finalized offline, from the local tier
    result = selcache.finalize(str(small_root), cache_dir, runner=no_compile,
                               remote=client(redis_server, keys))
    assert (result.action, result.source) == ("reused", "local")


def test_different_inputs_miss_and_compile(staged: str, small_root: Path, cache_dir: str,
                                           tmp_path: Path, redis_server: RedisServer,
                                           keys: Keys) -> None:
    active = small_root / read_layout(str(small_root)).active
    (active / "booleans.local").write_text("httpd_can_network_connect=1\nnis_enabled=1\n")
    result = selcache.finalize(str(small_root), cache_dir, remote=client(redis_server, keys))
    assert result.action == "rebuilt" and result.key != staged
    assert counters(cache_dir)["remote_misses"] == 1
    assert_matches_reference(small_root, tmp_path)


def test_builder_compile_uploads_and_another_builder_reuses(
        small_root: Path, tmp_path: Path, redis_server: RedisServer, keys: Keys) -> None:
    module_added(small_root)
    first = selcache.finalize(str(small_root), str(tmp_path / "c1"),
                              remote=builder(redis_server, keys))
    assert first.action == "rebuilt"
    assert counters(str(tmp_path / "c1"))["remote_uploads"] == 1
    manifest = remote_manifest(redis_server, first.key)
    assert {blob_key(f.sha256).encode() for f in manifest.files} <= redis_server.keys()
    other = sample.copy_root(sample.pristine_root("small"), tmp_path / "other")
    module_added(other)
    second = selcache.finalize(str(other), str(tmp_path / "c2"), runner=no_compile,
                               remote=builder(redis_server, keys))
    assert (second.action, second.source) == ("reused", "remote")
    assert output_files(other) == output_files(small_root)


# -- tampering --------------------------------------------------------------------------

def _other_entry(tmp_path: Path, server: RedisServer, keys: Keys) -> str:
    """A second genuine entry, for different inputs with different outputs."""
    root = sample.copy_root(sample.pristine_root("small"), tmp_path / "b-root")
    module_added(root)
    return selcache.stage(str(root), str(tmp_path / "b-cache"), remote=builder(server, keys)).key


def _sign(key_path: str, data: bytes) -> bytes:
    return remote.load_private_key(key_path).sign(SIGNING_CONTEXT + data)


def flip_blob(c, key: str, other: str, keys: Keys) -> None:  # type: ignore[no-untyped-def]
    digest = policy_file(Manifest.from_bytes(c.hget(entry_key(key), "manifest")))
    data = bytearray(c.get(blob_key(digest)))
    data[len(data) // 2] ^= 0x01
    c.set(blob_key(digest), bytes(data))


def truncate_blob(c, key: str, other: str, keys: Keys) -> None:  # type: ignore[no-untyped-def]
    digest = policy_file(Manifest.from_bytes(c.hget(entry_key(key), "manifest")))
    c.set(blob_key(digest), c.get(blob_key(digest))[:-100])


def bad_signature(c, key: str, other: str, keys: Keys) -> None:  # type: ignore[no-untyped-def]
    sig = bytearray(c.hget(entry_key(key), "signature"))
    sig[0] ^= 0x80
    c.hset(entry_key(key), "signature", bytes(sig))


def unsigned(c, key: str, other: str, keys: Keys) -> None:  # type: ignore[no-untyped-def]
    c.hdel(entry_key(key), "signature")


def edited_manifest(c, key: str, other: str, keys: Keys) -> None:  # type: ignore[no-untyped-def]
    """The genuine signature, over a manifest pointing at the other entry's policy."""
    doc = json.loads(c.hget(entry_key(key), "manifest"))
    theirs = Manifest.from_bytes(c.hget(entry_key(other), "manifest"))
    policy = next(f for f in theirs.files if "/policy/policy." in f.path)
    for f in doc["files"]:
        if f["path"] == policy.path:
            f["sha256"], f["size"] = policy.sha256, policy.size
    c.hset(entry_key(key), "manifest", json.dumps(doc, sort_keys=True).encode())


def signed_by_other_key(c, key: str, other: str, keys: Keys) -> None:  # type: ignore[no-untyped-def]
    """Another policy, relabelled for these inputs and signed with an untrusted key."""
    doc = json.loads(c.hget(entry_key(other), "manifest"))
    doc["key"] = key
    data = json.dumps(doc, sort_keys=True).encode()
    c.hset(entry_key(key), mapping={"manifest": data, "signature": _sign(keys.other_key, data)})


def swapped_between_keys(c, key: str, other: str, keys: Keys) -> None:  # type: ignore[no-untyped-def]
    """The other entry, genuine and signed by the builder, served for this key."""
    c.delete(entry_key(key))
    c.hset(entry_key(key), mapping=c.hgetall(entry_key(other)))


def wrong_type(c, key: str, other: str, keys: Keys) -> None:  # type: ignore[no-untyped-def]
    c.delete(entry_key(key))
    c.set(entry_key(key), b"not a hash")


def oversized_manifest(c, key: str, other: str, keys: Keys) -> None:  # type: ignore[no-untyped-def]
    c.hset(entry_key(key), "manifest", b"{" + b" " * (remote.MAX_MANIFEST_BYTES + 1))


TAMPERS: dict[str, Callable[..., None]] = {
    "flipped-blob": flip_blob,
    "truncated-blob": truncate_blob,
    "bad-signature": bad_signature,
    "unsigned": unsigned,
    "manifest-edited-after-signing": edited_manifest,
    "signed-by-untrusted-key": signed_by_other_key,
    "entry-swapped-between-keys": swapped_between_keys,
    "entry-of-wrong-type": wrong_type,
    "oversized-manifest": oversized_manifest,
}


@pytest.mark.parametrize("name", [pytest.param(n, id=n) for n in TAMPERS])
def test_tampered_entry_is_refused_and_compiled_locally(
        name: str, staged: str, small_root: Path, cache_dir: str, tmp_path: Path,
        redis_server: RedisServer, keys: Keys) -> None:
    other = _other_entry(tmp_path, redis_server, keys)
    mine = remote_manifest(redis_server, staged)
    theirs = remote_manifest(redis_server, other)
    assert policy_file(mine) != policy_file(theirs)  # installing theirs would be wrong
    with redis_server.client() as c:
        TAMPERS[name](c, staged, other, keys)
    result = selcache.finalize(str(small_root), cache_dir, remote=client(redis_server, keys))
    assert result.action == "rebuilt" and result.source is None
    assert counters(cache_dir)["remote_refused"] == 1
    assert_matches_reference(small_root, tmp_path)
    # What the compile stored locally is the genuine output set.
    with Cache(cache_dir) as cache:
        local = cache.get_manifest(staged)
    assert local is not None and {f.sha256 for f in local.files} == {f.sha256 for f in mine.files}


def test_builder_repairs_a_tampered_entry(staged: str, tmp_path: Path, small_root: Path,
                                          redis_server: RedisServer, keys: Keys) -> None:
    with redis_server.client() as c:
        flip_blob(c, staged, "", keys)
    rebuild = sample.copy_root(small_root, tmp_path / "rebuild")
    assert selcache.stage(str(rebuild), str(tmp_path / "builder-cache"),
                          remote=builder(redis_server, keys)).action == "cached"
    result = selcache.finalize(str(small_root), str(tmp_path / "fresh"), runner=no_compile,
                               remote=client(redis_server, keys))
    assert (result.action, result.source) == ("reused", "remote")


# -- a remote that is gone, hung, or empty ----------------------------------------------

def test_killed_server_is_a_miss(staged: str, small_root: Path, cache_dir: str, tmp_path: Path,
                                 redis_server: RedisServer, keys: Keys) -> None:
    redis_server.kill()
    result = selcache.finalize(str(small_root), cache_dir, remote=client(redis_server, keys))
    assert result.action == "rebuilt"
    assert result.timings["remote"] < TIMEOUT
    assert counters(cache_dir)["remote_errors"] == 1
    assert_matches_reference(small_root, tmp_path)


def test_server_killed_mid_lookup(staged: str, small_root: Path, cache_dir: str, tmp_path: Path,
                                  redis_server: RedisServer, keys: Keys,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed after the signed manifest was read, before the blobs: the
    kill is real, the hook only picks the moment."""
    real = RemoteTier._blobs

    def kill_then_read(self: RemoteTier, r: object, manifest: Manifest) -> dict[str, bytes]:
        redis_server.kill()
        return real(self, r, manifest)

    monkeypatch.setattr(RemoteTier, "_blobs", kill_then_read)
    result = selcache.finalize(str(small_root), cache_dir, remote=client(redis_server, keys))
    assert result.action == "rebuilt"
    assert counters(cache_dir)["remote_errors"] == 1
    assert_matches_reference(small_root, tmp_path)


def _never_answers() -> Iterator[str]:
    """A TCP port whose listener never accepts: connects succeed, replies never come."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield f"redis://127.0.0.1:{s.getsockname()[1]}/0"


@pytest.fixture
def blackhole() -> Iterator[str]:
    yield from _never_answers()


@pytest.mark.parametrize("how", ["frozen-server", "blackhole"])
def test_hung_remote_costs_one_timeout(how: str, small_root: Path, tmp_path: Path,
                                       redis_server: RedisServer, blackhole: str,
                                       keys: Keys) -> None:
    """A builder's stage talks to the remote twice (lookup, then upload): with
    a hung server, the first timeout switches the tier off for the run."""
    booleans_local(small_root)
    url = redis_server.url if how == "frozen-server" else blackhole
    if how == "frozen-server":
        redis_server.freeze()
    cache_dir = str(tmp_path / "builder-cache")
    start = time.monotonic()
    result = selcache.stage(str(small_root), cache_dir, remote=builder(redis_server, keys, url=url))
    elapsed = time.monotonic() - start
    redis_server.thaw()
    assert result.action == "compiled"
    assert TIMEOUT * 0.9 <= result.timings["remote"] < TIMEOUT * 1.6
    assert elapsed < result.timings["compile"] + TIMEOUT * 1.6 + 5
    assert counters(cache_dir)["remote_errors"] == 1
    assert counters(cache_dir)["remote_uploads"] == 0
    assert redis_server.keys() == set()


def test_server_restarted_empty_is_only_a_miss(staged: str, small_root: Path, cache_dir: str,
                                               tmp_path: Path, redis_server: RedisServer,
                                               keys: Keys) -> None:
    redis_server.restart()
    assert redis_server.keys() == set()
    result = selcache.finalize(str(small_root), cache_dir, remote=client(redis_server, keys))
    assert result.action == "rebuilt"
    assert counters(cache_dir)["remote_misses"] == 1
    assert counters(cache_dir)["remote_errors"] == 0
    assert_matches_reference(small_root, tmp_path)
    # The builder's next stage repopulates it from its local tier.
    again = sample.copy_root(small_root, tmp_path / "again")
    assert selcache.stage(str(again), str(tmp_path / "builder-cache"),
                          remote=builder(redis_server, keys)).action == "cached"
    assert entry_key(staged).encode() in redis_server.keys()


# -- who writes ----------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["readonly-with-signing-key", "no-signing-key"])
def test_clients_that_must_not_write_never_do(how: str, small_root: Path, cache_dir: str,
                                              redis_server: RedisServer, keys: Keys) -> None:
    booleans_local(small_root)
    if how == "readonly-with-signing-key":
        config = builder(redis_server, keys, readonly=True)
    else:
        config = client(redis_server, keys, readonly=False)
    with redis_server.client() as c:
        c.set(b"unrelated", b"1")
    assert selcache.stage(str(small_root), cache_dir, remote=config).action == "compiled"
    assert selcache.finalize(str(small_root), cache_dir, remote=config).action == "reused"
    module_added(small_root)
    assert selcache.finalize(str(small_root), cache_dir, remote=config).action == "rebuilt"
    assert redis_server.keys() == {b"unrelated"}
    with redis_server.client() as c:
        assert c.get(b"unrelated") == b"1"
    assert counters(cache_dir)["remote_uploads"] == 0


# -- status, CLI, configuration, keys -------------------------------------------------------

def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, (json.loads(out) if out.strip().startswith("{") else {}), out, err


def test_status_shows_local_and_remote_hits(staged: str, small_root: Path, cache_dir: str,
                                            redis_server: RedisServer, keys: Keys,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    fleet = ("--root", str(small_root), "--cache-dir", cache_dir, "--remote", redis_server.url,
             "--remote-readonly", "--trusted-key", keys.builder_pub)
    code, doc, _, _ = run_cli(capsys, "status", "--json", *fleet)
    assert code == 0 and doc["predicted_action"] == "reused"
    assert doc["remote"]["entry"] == "verified" and doc["remote"]["readonly"] is True
    assert doc["remote"]["signing_key"] is None and len(doc["remote"]["trusted_keys"]) == 1
    code, first, _, _ = run_cli(capsys, "finalize", "--json", *fleet)
    assert (first["action"], first["source"]) == ("reused", "remote")
    code, second, _, _ = run_cli(capsys, "finalize", "--json", *fleet)
    assert second["action"] == "unchanged"
    code, doc, _, _ = run_cli(capsys, "status", "--json", *fleet)
    assert doc["cache"]["hits"] == 1 and doc["cache"]["misses"] == 0
    assert doc["remote"]["hits"] == 1 and doc["remote"]["refused"] == 0
    code, _, human, _ = run_cli(capsys, "status", *fleet)
    assert "1 local hits, 0 misses" in human
    assert f"{redis_server.url} (read-only), entry verified; 1 remote hits" in human
    code, doc, _, _ = run_cli(capsys, "status", "--json", "--root", str(small_root),
                              "--cache-dir", cache_dir)
    assert doc["remote"]["url"] is None and doc["remote"]["hits"] == 1


def test_config_file_environment_and_arguments(tmp_path: Path, keys: Keys,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "etc" / "selcache.conf"
    conf.parent.mkdir()
    (tmp_path / "etc" / "keys").mkdir()
    os.link(keys.builder_pub, tmp_path / "etc" / "keys" / "b.pub")
    conf.write_text('[remote]\nurl = "redis://cache.example:6379/2"\nreadonly = true\n'
                    'timeout = 0.25\ntrusted_keys = ["keys/b.pub"]\n')
    monkeypatch.setenv("SELCACHE_CONFIG", str(conf))
    c = load_config()
    assert (c.url, c.readonly, c.timeout) == ("redis://cache.example:6379/2", True, 0.25)
    assert c.trusted_keys == (str(tmp_path / "etc" / "keys" / "b.pub"),)  # relative to the file
    monkeypatch.setenv("SELCACHE_REMOTE", "redis://other:6380/0")
    monkeypatch.setenv("SELCACHE_REMOTE_READONLY", "0")
    c = load_config()
    assert (c.url, c.readonly, c.timeout) == ("redis://other:6380/0", False, 0.25)
    c = load_config(url="redis://third/1", readonly=True, timeout=2)
    assert (c.url, c.readonly, c.timeout) == ("redis://third/1", True, 2.0)
    monkeypatch.setenv("SELCACHE_REMOTE", "")  # switches the file's remote off
    assert not load_config().enabled
    assert remote.redact("redis://u:s3cret@h:1/0") == "redis://u:***@h:1/0"


@pytest.mark.parametrize("text, message", [
    pytest.param('[remote]\nurl = "http://x/"\n', "must start with redis://", id="bad-scheme"),
    pytest.param('[remote]\nurl = "redis://h/zero"\n', "must be a number", id="bad-db"),
    pytest.param('[remote]\nurll = "redis://h/0"\n', "unknown key(s) in [remote]: urll",
                 id="typo"),
    pytest.param('[remote]\ntimeout = 0\n', "above 0", id="zero-timeout"),
    pytest.param('[remote]\nreadonly = "yes"\n', "true or false", id="string-bool"),
    pytest.param('[remote\nurl = 1\n', "not valid TOML", id="syntax"),
    pytest.param('[cache]\ndir = "/x"\n', "unknown section(s) cache", id="section"),
])
def test_bad_config_is_a_clear_usage_error(text: str, message: str, small_root: Path,
                                           cache_dir: str, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    conf = tmp_path / "selcache.conf"
    conf.write_text(text)
    monkeypatch.setenv("SELCACHE_CONFIG", str(conf))
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")
                       .replace(")", r"\)")):
        load_config()
    before = tree_digest(small_root)
    code, doc, _, err = run_cli(capsys, "finalize", "--json", "--root", str(small_root),
                                "--cache-dir", cache_dir)
    assert code == 2 and doc["error"] == "ConfigError" and str(conf) in err
    assert tree_digest(small_root) == before


def test_bad_key_files_are_usage_errors(tmp_path: Path, keys: Keys, redis_server: RedisServer,
                                        small_root: Path, cache_dir: str,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match="no trusted public key"):
        RemoteTier(RemoteConfig(url=redis_server.url))
    with pytest.raises(ConfigError, match="no PEM public key.*private key"):
        RemoteTier(client(redis_server, keys, trusted_keys=(keys.builder_key,)))
    public_as_private = tmp_path / "public.key"
    public_as_private.write_bytes(Path(keys.builder_pub).read_bytes())
    public_as_private.chmod(0o600)
    with pytest.raises(ConfigError, match="not an unencrypted PKCS#8 PEM private key"):
        RemoteTier(builder(redis_server, keys, signing_key=str(public_as_private)))
    loose = tmp_path / "loose.key"
    loose.write_bytes(Path(keys.builder_key).read_bytes())
    loose.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        RemoteTier(builder(redis_server, keys, signing_key=str(loose)))
    before = tree_digest(small_root)
    code, _, _, err = run_cli(capsys, "finalize", "--root", str(small_root), "--cache-dir",
                              cache_dir, "--remote", redis_server.url, "--trusted-key",
                              str(tmp_path / "missing.pub"))
    assert code == 2 and "missing.pub" in err
    assert tree_digest(small_root) == before


def test_key_of_the_wrong_type(staged: str, tmp_path: Path, small_root: Path, cache_dir: str,
                               redis_server: RedisServer, capsys: pytest.CaptureFixture[str],
                               caplog: pytest.LogCaptureFixture) -> None:
    """Parsed only when first needed (loading cryptography costs ~0.1 s, too much
    for a local hit): status reports it as a usage error; finalize warns and
    compiles, because the remote is never the reason a finalize fails."""
    rsa = tmp_path / "rsa.pub"
    subprocess.run(f"openssl genpkey -algorithm rsa -pkeyopt rsa_keygen_bits:1024 2>/dev/null"
                   f" | openssl pkey -pubout -out {rsa}", shell=True, check=True)
    fleet = ("--root", str(small_root), "--cache-dir", cache_dir, "--remote", redis_server.url,
             "--remote-readonly", "--trusted-key", str(rsa))
    code, _, _, err = run_cli(capsys, "status", *fleet)
    assert code == 2 and "not ed25519" in err
    code, doc, _, _ = run_cli(capsys, "finalize", "--json", *fleet)
    assert code == 0 and doc["action"] == "rebuilt"
    assert "not ed25519); continuing without it" in caplog.text
    assert counters(cache_dir)["remote_errors"] == 1


def test_keygen_cli_and_openssl_keys_both_work(tmp_path: Path, small_root: Path,
                                               redis_server: RedisServer,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    prefix = tmp_path / "builder1"
    code, doc, _, _ = run_cli(capsys, "keygen", "--json", "--out", str(prefix))
    assert code == 0 and len(doc["key_id"]) == 16
    assert (prefix.with_suffix(".key").stat().st_mode & 0o777) == 0o600
    assert prefix.with_suffix(".pub").read_text().startswith("-----BEGIN PUBLIC KEY-----")
    code, _, _, err = run_cli(capsys, "keygen", "--out", str(prefix))
    assert code == 2 and "not overwriting" in err
    # A pair made with openssl, as the README shows, signs; the keygen one verifies
    # it only when both are trusted (one file holding two keys).
    osl = tmp_path / "osl"
    subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", f"{osl}.key"],
                   check=True)
    os.chmod(f"{osl}.key", 0o600)
    subprocess.run(["openssl", "pkey", "-in", f"{osl}.key", "-pubout", "-out", f"{osl}.pub"],
                   check=True)
    both = tmp_path / "trusted.pub"
    both.write_bytes(Path(f"{osl}.pub").read_bytes() + prefix.with_suffix(".pub").read_bytes())
    booleans_local(small_root)
    up = RemoteConfig(url=redis_server.url, signing_key=f"{osl}.key", timeout=TIMEOUT)
    key = selcache.stage(str(small_root), str(tmp_path / "b"), remote=up).key
    only_keygen = RemoteConfig(url=redis_server.url, readonly=True, timeout=TIMEOUT,
                               trusted_keys=(str(prefix.with_suffix(".pub")),))
    with RemoteTierContext(only_keygen) as tier:
        assert tier.probe(key, "small") == "refused"
    with RemoteTierContext(replace(only_keygen, trusted_keys=(str(both),))) as tier:
        assert len(tier.describe()["trusted_keys"]) == 2
        assert tier.probe(key, "small") == "verified"


class RemoteTierContext:
    def __init__(self, config: RemoteConfig) -> None:
        self.tier = RemoteTier(config)

    def __enter__(self) -> RemoteTier:
        return self.tier

    def __exit__(self, *exc: object) -> None:
        self.tier.close()


@pytest.mark.parametrize("configured", [pytest.param(False, id="no-remote"),
                                        pytest.param(True, id="remote-configured")])
def test_local_hit_imports_neither_redis_nor_cryptography(
        configured: bool, small_root: Path, cache_dir: str, redis_server: RedisServer,
        keys: Keys) -> None:
    selcache.finalize(str(small_root), cache_dir)
    env = {**os.environ, "SELCACHE_CONFIG": os.devnull}
    if configured:
        env.update(SELCACHE_REMOTE=redis_server.url, SELCACHE_TRUSTED_KEYS=keys.builder_pub,
                   SELCACHE_REMOTE_READONLY="1")
    code = ("import sys, selcache\n"
            f"r = selcache.finalize({str(small_root)!r}, {cache_dir!r})\n"
            "assert r.action == 'unchanged', r.action\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('redis', 'cryptography')))\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True, cwd=REPO, env=env)
    assert out.stdout.strip() == "[]"
