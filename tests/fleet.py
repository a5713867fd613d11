"""For the fleet-tier tests: a real redis-server on loopback (a random free
port, no persistence, its own directory; stopped at the end of the session),
key pairs, and remote configurations for a builder and for fleet machines."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from selcache import remote
from selcache.remote import RemoteConfig
from selcache.runner import Completed

TIMEOUT = 0.5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert self.proc is None
        log = open(self.directory / "redis.log", "ab")
        try:
            self.proc = subprocess.Popen(
                ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                 "--save", "", "--appendonly", "no", "--dir", str(self.directory),
                 "--daemonize", "no", "--loglevel", "warning"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        finally:
            log.close()
        deadline = time.monotonic() + 10
        while True:
            try:
                with self.client() as c:
                    if c.ping():
                        return
            except Exception:  # noqa: BLE001 - not up yet
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start: "
                                   + (self.directory / "redis.log").read_text()[-2000:])
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is None:
            return
        self.thaw()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """As a crash: SIGKILL, nothing flushed (there is nothing to flush)."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def freeze(self) -> None:
        """The process stays, the kernel still accepts connections, nothing answers."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        if self.proc is not None:
            os.kill(self.proc.pid, signal.SIGCONT)

    def client(self) -> Any:
        import redis

        return redis.Redis.from_url(self.url, socket_timeout=5, socket_connect_timeout=5)

    def keys(self) -> set[bytes]:
        with self.client() as c:
            return set(c.keys("*"))


@pytest.fixture(scope="session")
def redis_server_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (make deps installs it)")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_server(redis_server_session: RedisServer) -> Iterator[RedisServer]:
    """The session's server, running and empty at the start of each test."""
    server = redis_server_session
    if server.proc is None:
        server.start()
    server.thaw()
    with server.client() as c:
        c.flushall()
    yield server
    server.thaw()


@dataclass(frozen=True)
class Keys:
    builder_key: str
    builder_pub: str
    other_key: str
    other_pub: str


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    """The builders' key pair, and another one nobody trusts."""
    d = tmp_path_factory.mktemp("keys")
    b = remote.generate_keypair(str(d / "builder"))
    o = remote.generate_keypair(str(d / "other"))
    return Keys(b[0], b[1], o[0], o[1])


def builder(server: RedisServer, keys: Keys, **kw: Any) -> RemoteConfig:
    return replace(RemoteConfig(url=server.url, signing_key=keys.builder_key,
                                trusted_keys=(keys.builder_pub,), timeout=TIMEOUT), **kw)


def client(server: RedisServer, keys: Keys, **kw: Any) -> RemoteConfig:
    """An ordinary fleet machine: read-only, trusts the builders' public key."""
    return replace(RemoteConfig(url=server.url, readonly=True, trusted_keys=(keys.builder_pub,),
                                timeout=TIMEOUT), **kw)


def no_compile(argv: Sequence[str]) -> Completed:
    """A runner for runs that must not compile: any subprocess is a failure."""
    raise AssertionError(f"a compile ran: {' '.join(argv)}")


def counters(cache_dir: str) -> dict[str, int]:
    """A machine's cache counters: local hits and misses, and the remote's."""
    from selcache.store import Cache

    with Cache(cache_dir) as cache:
        names = ["hits", "misses"] + [f"remote_{n}" for n in remote.COUNTERS]
        return {n: cache.counter(n) for n in names}
