"""A minimal, fast HTTP/1.1 keep-alive server, run in its own process for the throughput benchmark.

    python benchmarks/_server.py

It listens on an ephemeral port of 127.0.0.1, prints ``PORT <n>`` once
ready, answers every request with the same small JSON 200 (with
``Content-Length``), and exits when its standard input closes, so it never
outlives the benchmark that started it. It runs in a separate process so
that it does not share the client's event loop (or, on 2 cores, its core).
Only request heads are read: the benchmark sends GETs without bodies.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys

BODY = b'{"ok": true, "items": [1, 2, 3]}'
RESPONSE = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(BODY)) + BODY


class _Http(asyncio.Protocol):
    def __init__(self) -> None:
        self._buffer = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer + data
        count = buffer.count(b"\r\n\r\n")
        if count and self._transport is not None:
            self._transport.write(RESPONSE * count)
            buffer = buffer[buffer.rfind(b"\r\n\r\n") + 4 :]
        self._buffer = buffer


async def _serve() -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Http, "127.0.0.1", 0, backlog=1024)
    port = server.sockets[0].getsockname()[1]
    print(f"PORT {port}", flush=True)
    # Exit when the parent closes our stdin (or dies).
    await asyncio.to_thread(sys.stdin.read)
    server.close()


class Server:
    """The server process, started and stopped by the benchmark: ``with Server() as port: ...``."""

    def __init__(self) -> None:
        self._process: subprocess.Popen[str] | None = None
        self.port = 0

    def __enter__(self) -> int:
        self._process = subprocess.Popen(
            [sys.executable, __file__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line.startswith("PORT "):
            self._process.kill()
            raise RuntimeError(f"benchmark server did not start: {line!r}")
        self.port = int(line.split()[1])
        return self.port

    def __exit__(self, *exc: object) -> None:
        process = self._process
        if process is None:
            return
        assert process.stdin is not None
        process.stdin.close()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        finally:
            if process.stdout is not None:
                process.stdout.close()


if __name__ == "__main__":
    asyncio.run(_serve())
