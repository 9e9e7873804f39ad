"""A real HTTP/1.1 server on 127.0.0.1 that fails the way real servers fail.

It runs on the test's own event loop and is scripted per path: a test queues
behaviours for a path (answer, hang, reset, close, trickle, answer late) and
may give the path a default for when its queue is empty::

    async with FlakyServer() as server:
        server.queue("/a", reset(), respond(200, body=b"ok"))
        server.default("/b", hang())
        ... httpx calls to server.url("/a") ...
        assert len(server.requests_to("/a")) == 2

Connections are kept alive between requests (HTTP/1.1), so connection reuse
and pool leaks show in :attr:`FlakyServer.connections_accepted` and
:attr:`FlakyServer.connections_open` (and its high-water mark,
:attr:`FlakyServer.connections_peak`). Every request is recorded with its
arrival time on ``time.monotonic()``, the clock anyio's asyncio backend and
resilient_http's ``SystemClock`` read too.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from collections import defaultdict, deque
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from types import TracebackType

import httpx

HeadersLike = Mapping[str, str] | Iterable[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class Recorded:
    """One request as the server read it; ``arrived`` is ``time.monotonic()`` once it was read in full."""

    arrived: float
    method: str
    path: str
    target: str
    headers: httpx.Headers
    body: bytes
    connection: int


@dataclass(frozen=True, slots=True)
class Respond:
    """Answer after ``delay`` seconds; ``Content-Length`` unless ``chunked``, a ``Date`` unless given."""

    status: int = 200
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    chunked: bool = False
    delay: float = 0.0


@dataclass(frozen=True, slots=True)
class Hang:
    """Read the request and never answer; the connection ends when the client leaves or the server stops."""


@dataclass(frozen=True, slots=True)
class Reset:
    """Read the request, then abort the connection with ``SO_LINGER`` 0: the client sees a TCP reset."""


@dataclass(frozen=True, slots=True)
class Close:
    """Read the request, then close the connection without a word (a FIN, no response)."""


@dataclass(frozen=True, slots=True)
class Trickle:
    """Send the headers at once, then ``chunks`` pieces of the body, ``interval`` seconds apart.

    The pieces are ``chunk`` repeated, or the distinct ``pieces`` when given
    (the events of a server-sent event stream). The body is chunked; with
    ``sized`` it announces its full ``Content-Length`` instead.
    """

    status: int = 200
    headers: tuple[tuple[str, str], ...] = ()
    chunk: bytes = b"x" * 16
    chunks: int = 10
    interval: float = 0.2
    sized: bool = False
    pieces: tuple[bytes, ...] = ()

    def body(self) -> tuple[bytes, ...]:
        return self.pieces or (self.chunk,) * self.chunks


Behaviour = Respond | Hang | Reset | Close | Trickle


def _pairs(headers: HeadersLike | None) -> tuple[tuple[str, str], ...]:
    if headers is None:
        return ()
    items = headers.items() if isinstance(headers, Mapping) else headers
    return tuple((str(k), str(v)) for k, v in items)


def respond(
    status: int = 200, headers: HeadersLike | None = None, body: bytes = b"", *, chunked: bool = False
) -> Respond:
    """Answer at once."""
    return Respond(status, _pairs(headers), body, chunked)


def delay(
    seconds: float, status: int = 200, headers: HeadersLike | None = None, body: bytes = b"", *, chunked: bool = False
) -> Respond:
    """Answer after ``seconds``."""
    return Respond(status, _pairs(headers), body, chunked, seconds)


def hang() -> Hang:
    """Never answer."""
    return Hang()


def reset() -> Reset:
    """Abort the connection with a TCP reset once the request is read."""
    return Reset()


def close() -> Close:
    """Close the connection without answering once the request is read."""
    return Close()


def trickle(
    chunks: int = 10,
    interval: float = 0.2,
    *,
    chunk: bytes = b"x" * 16,
    status: int = 200,
    headers: HeadersLike | None = None,
    sized: bool = False,
    pieces: Iterable[bytes] = (),
) -> Trickle:
    """Headers at once, then the body a chunk at a time (``chunk`` repeated, or each of ``pieces``)."""
    return Trickle(status, _pairs(headers), chunk, chunks, interval, sized, tuple(pieces))


def http_date(timestamp: float) -> str:
    """``timestamp`` (seconds since the epoch) as an HTTP-date."""
    return formatdate(timestamp, usegmt=True)


def free_port() -> int:
    """A port on 127.0.0.1 that nobody listens on (bound once, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


class _Ended(Exception):
    """The connection is over: the client left, or a behaviour ended it."""


@dataclass(slots=True)
class _Connection:
    number: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    aborted: bool = False


@dataclass(slots=True)
class _Script:
    queued: deque[Behaviour] = field(default_factory=deque)
    default: Behaviour | None = None


class FlakyServer:
    """An HTTP/1.1 server on 127.0.0.1 and a random free port, scripted per path.

    A path with no behaviour queued and no default gets a 404.
    """

    def __init__(self) -> None:
        self._scripts: defaultdict[str, _Script] = defaultdict(_Script)
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._arrival = asyncio.Event()
        self.port = 0
        self.requests: list[Recorded] = []
        self.connections_accepted = 0
        self.connections_open = 0
        self.connections_peak = 0

    # -- scripting -----------------------------------------------------------

    def queue(self, path: str, *behaviours: Behaviour) -> None:
        """Append ``behaviours`` for ``path``; each request to it takes the next one."""
        self._scripts[path].queued.extend(behaviours)

    def default(self, path: str, behaviour: Behaviour) -> None:
        """What ``path`` does once its queue is empty."""
        self._scripts[path].default = behaviour

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def requests_to(self, path: str) -> list[Recorded]:
        return [r for r in self.requests if r.path == path]

    async def wait_for_requests(self, count: int, path: str | None = None) -> None:
        """Return once at least ``count`` requests (to ``path``, when given) have arrived."""
        while len(self.requests if path is None else self.requests_to(path)) < count:
            self._arrival.clear()
            await self._arrival.wait()

    def _next(self, path: str) -> Behaviour:
        script = self._scripts.get(path)
        if script is None:
            return Respond(404, body=b"nothing scripted")
        if script.queued:
            return script.queued.popleft()
        return script.default if script.default is not None else Respond(404, body=b"script exhausted")

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening and end every connection, hung handlers included."""
        self._stopping = True
        if self._server is not None:
            self._server.close()
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> FlakyServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- connections ---------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if self._stopping:  # accepted just before stop() closed the listener
            writer.close()
            return
        self.connections_accepted += 1
        self.connections_open += 1
        self.connections_peak = max(self.connections_peak, self.connections_open)
        conn = _Connection(self.connections_accepted, reader, writer)
        self._handlers.add(task)
        try:
            while await self._serve_one(conn):
                pass
        except (_Ended, ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass
        except asyncio.CancelledError:
            if not self._stopping:
                raise
        finally:
            self.connections_open -= 1
            self._handlers.discard(task)
            if not conn.aborted:
                writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, asyncio.CancelledError):
                pass

    async def _serve_one(self, conn: _Connection) -> bool:
        """Read and answer one request; whether the connection stays open for another."""
        request = await self._read_request(conn)
        if request is None:
            return False
        self.requests.append(request)
        self._arrival.set()
        behaviour = self._next(request.path)
        keep_alive = request.headers.get("connection", "").lower() != "close"
        match behaviour:
            case Respond():
                if behaviour.delay:
                    await self._idle(conn, behaviour.delay)
                await self._respond(conn, request, behaviour)
                return keep_alive and not _says_close(behaviour.headers)
            case Trickle():
                await self._trickle(conn, behaviour)
                return keep_alive and not _says_close(behaviour.headers)
            case Hang():
                while await conn.reader.read(65536):  # until the client leaves (or the server stops)
                    pass
                return False
            case Reset():
                sock = conn.writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.aborted = True
                conn.writer.transport.abort()
                return False
            case Close():
                return False

    async def _read_request(self, conn: _Connection) -> Recorded | None:
        reader = conn.reader
        line = await reader.readline()
        if not line:
            return None
        method, target, _version = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
        headers = httpx.Headers()
        while True:
            raw = await reader.readline()
            if raw in (b"\r\n", b"\n"):
                break
            if not raw:
                raise _Ended
            name, _, value = raw.decode("latin-1").partition(":")
            headers[name.strip()] = value.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = await _read_chunked(reader)
        else:
            body = await reader.readexactly(int(headers.get("content-length", "0")))
        return Recorded(
            arrived=time.monotonic(),
            method=method,
            path=target.split("?", 1)[0],
            target=target,
            headers=headers,
            body=body,
            connection=conn.number,
        )

    async def _idle(self, conn: _Connection, seconds: float) -> None:
        """Wait ``seconds``; end the connection early if the client leaves meanwhile."""
        try:
            async with asyncio.timeout(seconds):
                if not await conn.reader.read(1):
                    raise _Ended
        except TimeoutError:
            return
        raise _Ended  # the client sent something while waiting for its answer: not HTTP/1.1 as we serve it

    async def _respond(self, conn: _Connection, request: Recorded, behaviour: Respond) -> None:
        headers = list(behaviour.headers)
        body = b"" if request.method == "HEAD" else behaviour.body
        if behaviour.chunked:
            headers.append(("Transfer-Encoding", "chunked"))
            payload = (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"
        else:
            headers.append(("Content-Length", str(len(behaviour.body))))
            payload = body
        conn.writer.write(_head(behaviour.status, headers) + payload)
        await conn.writer.drain()

    async def _trickle(self, conn: _Connection, behaviour: Trickle) -> None:
        headers = list(behaviour.headers)
        pieces = behaviour.body()
        if behaviour.sized:
            headers.append(("Content-Length", str(sum(map(len, pieces)))))
        else:
            headers.append(("Transfer-Encoding", "chunked"))
        writer = conn.writer
        writer.write(_head(behaviour.status, headers))
        await writer.drain()
        for chunk in pieces:
            await self._idle(conn, behaviour.interval)
            writer.write(chunk if behaviour.sized else b"%x\r\n%s\r\n" % (len(chunk), chunk))
            await writer.drain()
        if not behaviour.sized:
            writer.write(b"0\r\n\r\n")
            await writer.drain()


def _says_close(headers: Iterable[tuple[str, str]]) -> bool:
    return any(k.lower() == "connection" and v.lower() == "close" for k, v in headers)


def _head(status: int, headers: list[tuple[str, str]]) -> bytes:
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Unknown"
    if not any(k.lower() == "date" for k, _ in headers):
        headers = [("Date", http_date(time.time())), *headers]
    lines = [f"HTTP/1.1 {status} {reason}", *(f"{k}: {v}" for k, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        size = int((await reader.readline()).split(b";", 1)[0].strip(), 16)
        if size == 0:
            while (await reader.readline()) not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return bytes(body)
        body += await reader.readexactly(size)
        await reader.readexactly(2)


@contextmanager
def server_on_its_own_thread() -> Iterator[FlakyServer]:
    """A started :class:`FlakyServer` whose event loop runs on a thread of its own."""
    server = FlakyServer()
    loop = asyncio.new_event_loop()
    started = threading.Event()

    def run() -> None:
        loop.run_until_complete(server.start())
        started.set()
        loop.run_forever()
        loop.run_until_complete(server.stop())
        loop.close()

    thread = threading.Thread(target=run, name="flaky-server", daemon=True)
    thread.start()
    if not started.wait(10):
        raise RuntimeError("the server did not start")
    try:
        yield server
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
