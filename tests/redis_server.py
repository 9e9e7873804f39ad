"""Real ``redis-server`` processes for the store's tests: one server, or a three-node Redis Cluster.

Each server is this test run's own, on a free loopback port, keeping nothing
on disk (``--save '' --appendonly no``), and is killed at the end. The
Redis that the machine may already run on 6379 is never touched. Tests that
need a server are skipped, with the reason, when ``redis-server`` is not
installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")

needs_redis = pytest.mark.skipif(
    REDIS_SERVER is None or REDIS_CLI is None,
    reason="redis-server and redis-cli are not installed (Debian: apt-get install redis-server)",
)


def _major() -> int:
    if REDIS_SERVER is None:
        return 0
    out = subprocess.run([REDIS_SERVER, "--version"], capture_output=True, text=True, check=False).stdout
    for word in out.split():
        if word.startswith("v="):
            return int(word[2:].split(".")[0])
    return 0


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(*, with_bus: bool = False) -> int:
    """A free loopback port; with ``with_bus``, its cluster bus port (+10000) is free too."""
    for _ in range(100):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port == 6379 or (with_bus and (port > 55535 or not _bindable(port + 10000))):
            continue
        return port
    raise RuntimeError("no free port pair on 127.0.0.1")


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One ``redis-server`` process on ``127.0.0.1:port``; :meth:`start` again restarts it on the same port."""

    def __init__(self, directory: Path, port: int | None = None, *, cluster: bool = False) -> None:
        self.port = free_port(with_bus=cluster) if port is None else port
        self.directory = directory
        self.cluster = cluster
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert REDIS_SERVER is not None and self.process is None
        args = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        args += ["--dir", str(self.directory), "--logfile", f"redis-{self.port}.log"]
        if _major() >= 7:
            args += ["--enable-debug-command", "local"]
        if self.cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{self.port}.conf"]
            args += ["--cluster-node-timeout", "2000"]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not _ping(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                log = self.directory / f"redis-{self.port}.log"
                raise RuntimeError(f"redis-server on port {self.port} did not start: {log.read_text()[-500:]}")
            time.sleep(0.02)

    def stop(self) -> None:
        """Kill the server at once (SIGKILL: no goodbye to its clients)."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None


@contextlib.contextmanager
def redis_server(directory: Path) -> Iterator[RedisServer]:
    server = RedisServer(directory)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def redis_cluster(directory: Path, nodes: int = 3) -> Iterator[list[RedisServer]]:
    """``nodes`` masters sharing the 16384 slots, ready (``cluster_state:ok`` on every node)."""
    assert REDIS_CLI is not None
    servers = [RedisServer(directory, cluster=True) for _ in range(nodes)]
    try:
        for server in servers:
            server.start()
        addresses = [f"127.0.0.1:{server.port}" for server in servers]
        subprocess.run(
            [REDIS_CLI, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=30,
        )
        deadline = time.monotonic() + 20
        for server in servers:
            while True:
                info = subprocess.run(
                    [REDIS_CLI, "-p", str(server.port), "cluster", "info"], capture_output=True, text=True, check=False
                ).stdout
                if "cluster_state:ok" in info:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the cluster did not become ready: {info}")
                time.sleep(0.05)
        yield servers
    finally:
        for server in servers:
            server.stop()


async def stall(server: RedisServer, seconds: float) -> asyncio.subprocess.Process:
    """Put the server to sleep for ``seconds`` (``DEBUG SLEEP`` from another client); await ``.wait()`` for its end."""
    assert REDIS_CLI is not None
    return await asyncio.create_subprocess_exec(
        REDIS_CLI, "-p", str(server.port), "DEBUG", "SLEEP", str(seconds), stdout=asyncio.subprocess.DEVNULL
    )
