"""An embedded upstream for the demo: a real HTTP/1.1 server on 127.0.0.1 that misbehaves on cue.

Real dependencies fail in a handful of ways, and each one asks something
different of a client, so the demo switches the server between them while
traffic runs::

    healthy   every request answered at once
    errors    a share of requests (half by default) get 503 with Retry-After: 1
    quota     at most ``quota`` requests served per second; the rest get 429 with
              Retry-After, and every answer carries the IETF draft RateLimit and
              RateLimit-Policy headers
    hang      requests are read and never answered until the mode changes
    outage    every request gets 503 without Retry-After, or a connection reset

It speaks just enough HTTP/1.1 for httpx: keep-alive, ``Content-Length`` on
every answer, ``Connection: close`` honoured. ``GET /catalog/{n}`` answers
with ``Cache-Control: max-age=1``, so that a stale cache may keep it;
``GET /search`` answers too; anything else is a 404. Every request is counted
on arrival, per path and with its ``time.monotonic()`` timestamp, so that the
load a client puts on its dependency (attempts per call, retry storms) is
measured where it lands: at the server.

Requests held by ``hang`` are answered, by the mode then in force, when it
ends. Leaving the ``async with`` block closes every connection and waits for
every handler, so that shutting down leaves no pending task and no open
socket behind.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import math
import random
import socket
import struct
import time
from collections import Counter
from email.utils import formatdate
from http import HTTPStatus
from types import TracebackType
from typing import Any, Literal

Mode = Literal["healthy", "errors", "quota", "hang", "outage"]
MODES: tuple[Mode, ...] = ("healthy", "errors", "quota", "hang", "outage")


class Upstream:
    """One misbehaving HTTP/1.1 server on a random free port of 127.0.0.1.

    ``error_share`` is the share of requests that fail in ``errors`` mode;
    ``quota`` the requests served per one-second window in ``quota`` mode;
    ``reset_share`` the share of requests answered by a connection reset
    (rather than a 503) in ``outage`` mode. ``seed`` makes the choices
    repeatable.
    """

    def __init__(
        self,
        name: str = "upstream",
        *,
        error_share: float = 0.5,
        quota: int = 50,
        reset_share: float = 0.3,
        seed: int | None = None,
    ) -> None:
        self.name = name
        self.error_share = error_share
        self.quota = quota
        self.reset_share = reset_share
        self.port = 0
        #: Arrival time (``time.monotonic()``) of every request, in order.
        self.arrivals: list[float] = []
        #: Requests received, per path (without the query).
        self.by_path: Counter[str] = Counter()
        #: How requests were answered: the status as a string, ``"reset"``, or
        #: ``"abandoned"`` for a held request whose client had closed the connection.
        self.answered: Counter[str] = Counter()
        self._mode: Mode = "healthy"
        self._random = random.Random(seed)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._unhang = asyncio.Event()
        self._unhang.set()
        self._closing = False
        self._window = -1
        self._served_in_window = 0

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def mode(self) -> Mode:
        return self._mode

    def set_mode(self, mode: Mode) -> None:
        """Switch behaviour; requests held by ``hang`` are answered by the new mode."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)} (got {mode!r})")
        self._mode = mode
        if mode == "hang":
            if self._unhang.is_set():
                self._unhang = asyncio.Event()
        else:
            self._unhang.set()

    def received(self, since: float = -math.inf, until: float = math.inf) -> int:
        """Requests that arrived in ``[since, until)`` on ``time.monotonic()``."""
        return bisect.bisect_left(self.arrivals, until) - bisect.bisect_left(self.arrivals, since)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop listening, release held requests, close every connection and wait for the handlers."""
        self._closing = True
        self._unhang.set()
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=1.0)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> Upstream:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer the requests of one connection until either side closes it."""
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self._writers.add(writer)
        try:
            while not self._closing:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                    return
                request_line, *header_lines = head.decode("latin-1").split("\r\n")
                method, target, *_ = [*request_line.split(" "), "", ""]
                headers = {}
                for line in header_lines:
                    name, _, value = line.partition(":")
                    if value:
                        headers[name.strip().lower()] = value.strip()
                length = headers.get("content-length", "0")
                if length.isdigit() and int(length):
                    await reader.readexactly(int(length))
                path = target.partition("?")[0]
                self.arrivals.append(time.monotonic())
                self.by_path[path] += 1
                keep_open = await self._answer(reader, writer, method, target, path)
                if not keep_open or headers.get("connection", "").lower() == "close":
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, OSError):
                pass
            if task is not None:
                self._tasks.discard(task)

    async def _answer(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, method: str, target: str, path: str
    ) -> bool:
        """Answer one request as the mode says; ``False`` when the connection must end."""
        if self._mode == "hang":
            while self._mode == "hang" and not self._closing:
                await self._unhang.wait()
            if reader.at_eof():  # the client gave up (timed out) and closed while it was held
                self.answered["abandoned"] += 1
                return False
        if self._closing:
            return False
        mode = self._mode
        if mode == "outage":
            if self._random.random() < self.reset_share:
                self.answered["reset"] += 1
                _reset(writer)
                return False
            return await self._send(writer, 503, {}, {"error": "outage"})
        if mode == "errors" and self._random.random() < self.error_share:
            return await self._send(writer, 503, {"Retry-After": "1"}, {"error": "overloaded"})
        headers: dict[str, str] = {}
        if mode == "quota":
            now = time.monotonic()
            window = int(now)
            if window != self._window:
                self._window, self._served_in_window = window, 0
            reset = max(1, math.ceil(window + 1 - now))
            headers["RateLimit-Policy"] = f'"quota";q={self.quota};w=1'
            if self._served_in_window >= self.quota:
                headers["RateLimit"] = f'"quota";r=0;t={reset}'
                headers["Retry-After"] = str(reset)
                return await self._send(writer, 429, headers, {"error": "quota exceeded"})
            self._served_in_window += 1
            headers["RateLimit"] = f'"quota";r={self.quota - self._served_in_window};t={reset}'
        status, route_headers, body = _route(method, target, path)
        return await self._send(writer, status, {**route_headers, **headers}, body)

    async def _send(self, writer: asyncio.StreamWriter, status: int, headers: dict[str, str], body: object) -> bool:
        """Write one answer; ``False`` when the client has already gone."""
        self.answered[str(status)] += 1
        payload = json.dumps(body).encode()
        lines = [
            f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
            f"Date: {formatdate(usegmt=True)}",
            "Content-Type: application/json",
            f"Content-Length: {len(payload)}",
        ]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        try:
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload)
            await writer.drain()
        except ConnectionError:  # the client gave up on this request (a hung one, say) and closed
            return False
        return True


def _route(method: str, target: str, path: str) -> tuple[int, dict[str, str], object]:
    """What a healthy server answers: status, headers, JSON body."""
    if method not in ("GET", "HEAD"):
        return 405, {"Allow": "GET, HEAD"}, {"error": "method not allowed"}
    parts = path.strip("/").split("/")
    if len(parts) == 2 and parts[0] == "catalog" and parts[1].isdigit():
        return 200, {"Cache-Control": "max-age=1"}, {"item": int(parts[1]), "price": 10 + int(parts[1]) % 7}
    if path == "/search":
        return 200, {}, {"query": target.partition("?")[2], "hits": 3}
    return 404, {}, {"error": "not found"}


def _reset(writer: asyncio.StreamWriter) -> None:
    """Drop the connection with a TCP reset (RST), as a crashing server or a load balancer does."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
