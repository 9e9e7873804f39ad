"""A fault-injecting HTTP/1.1 server for the chaos benchmark, with the bookkeeping a benchmark needs.

Why not ``resilient_http._upstream`` (the demo's server)? Its modes are the
same failures, but the scenarios need to know, at the server, what every
arrival was answered (so that attempts, 429 shares and resets are counted
where they land, for clients whose retries are invisible from outside),
and when each ``Retry-After`` was sent, so that an arrival before it ran
out is caught as it arrives. Those are benchmark concerns the demo should
not carry, so this server is kept beside the benchmark.

Modes, switched while traffic runs (:meth:`FaultServer.set_mode`):

    healthy   answer 200 at once (with ``cache_control`` when set)
    errors    a share ``error_share`` of requests get 503 (with ``Retry-After``
              when ``error_retry_after`` is set), the rest 200
    quota     at most ``quota`` requests per one-second window; the rest get 429
              with ``Retry-After`` (whole seconds to the window's end, at least 1)
    hang      read the request, never answer
    outage    503 without ``Retry-After``, or a TCP reset for ``reset_share`` of them,
              each after ``outage_latency`` seconds (0: at once; more: a failure that
              is slow, as a gateway that times out)
    capacity  ``capacity`` requests served at once in ``base_latency`` seconds; above
              it, each answer takes longer in proportion (``base_latency * n /
              capacity``), and a share of arrivals get an immediate 503 that grows
              from 0 at ``capacity`` to all of them at 1.25 x ``capacity``

Every arrival is recorded with its ``time.monotonic()`` time (the clock
asyncio and resilient_http read) and what it got: a status, ``RESET`` or
``HUNG``. An arrival during a Retry-After that the server sent is *early*,
unless it came within ``grace`` seconds of that 429 (it was already on the
wire when the 429 left).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import socket
import struct
import time
from dataclasses import dataclass
from email.utils import formatdate
from typing import Literal

Mode = Literal["healthy", "errors", "quota", "hang", "outage", "capacity"]
RESET = 0
HUNG = -1


@dataclass(frozen=True, slots=True)
class Arrival:
    at: float  # time.monotonic()
    path: str
    status: int  # the status sent, RESET or HUNG
    early: bool  # arrived before a Retry-After the server sent had run out


class FaultServer:
    """One misbehaving server on a free port of 127.0.0.1; ``async with FaultServer() as server: ...``."""

    def __init__(
        self,
        *,
        error_share: float = 0.2,
        error_retry_after: int | None = None,
        quota: int = 50,
        reset_share: float = 0.3,
        cache_control: str | None = None,
        grace: float = 0.005,
        capacity: int = 20,
        base_latency: float = 0.1,
        outage_latency: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.error_share = error_share
        self.error_retry_after = error_retry_after
        self.quota = quota
        self.reset_share = reset_share
        self.cache_control = cache_control
        self.grace = grace
        self.capacity = capacity  # may be changed while traffic runs
        self.base_latency = base_latency
        self.outage_latency = outage_latency  # may be changed between runs
        self.busy = 0  # requests being served in capacity mode
        self.mode: Mode = "healthy"
        self.arrivals: list[Arrival] = []
        self.port = 0
        self._random = random.Random(seed)
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._window = -1
        self._served = 0
        self._retry_afters: list[tuple[float, float]] = []  # (sent, until) of each Retry-After still running

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set_mode(self, mode: Mode) -> None:
        self.mode = mode

    def reset_log(self) -> None:
        """Forget every arrival and Retry-After: a new client starts clean."""
        self.arrivals = []
        self._retry_afters = []
        self._window = -1

    async def __aenter__(self) -> FaultServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def drop_connections(self) -> None:
        """Close every open connection (between two clients, so that none inherits another's)."""
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                now = time.monotonic()
                target = head.split(b" ", 2)[1].decode("latin-1")
                path = target.partition("?")[0]
                if not await self._answer(writer, path, now):
                    return
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._handlers.discard(task)
            writer.transport.abort()

    def _record(self, at: float, path: str, status: int) -> None:
        running = self._retry_afters = [(sent, until) for sent, until in self._retry_afters if at < until]
        early = any(sent + self.grace <= at for sent, _ in running)
        self.arrivals.append(Arrival(at, path, status, early))

    async def _answer(self, writer: asyncio.StreamWriter, path: str, now: float) -> bool:
        mode = self.mode
        if mode == "hang":
            self._record(now, path, HUNG)
            await asyncio.Event().wait()  # until the connection is dropped
            return False
        if mode == "outage":
            if self.outage_latency:
                await asyncio.sleep(self.outage_latency)
            if self._random.random() < self.reset_share:
                self._record(now, path, RESET)
                sock = writer.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
                return False
            return self._send(writer, path, now, 503, {})
        if mode == "capacity":
            return await self._serve_within_capacity(writer, path, now)
        if mode == "errors" and self._random.random() < self.error_share:
            headers = {} if self.error_retry_after is None else {"Retry-After": str(self.error_retry_after)}
            return self._send(writer, path, now, 503, headers)
        if mode == "quota":
            window = int(now)
            if window != self._window:
                self._window, self._served = window, 0
            if self._served >= self.quota:
                wait = max(1, math.ceil(window + 1 - now))
                return self._send(writer, path, now, 429, {"Retry-After": str(wait)}, retry_after=wait)
            self._served += 1
        headers = {} if self.cache_control is None else {"Cache-Control": self.cache_control}
        return self._send(writer, path, now, 200, headers)

    async def _serve_within_capacity(self, writer: asyncio.StreamWriter, path: str, now: float) -> bool:
        capacity, busy = self.capacity, self.busy
        if busy >= capacity and self._random.random() < (busy - capacity + 1) / max(1.0, capacity / 4):
            return self._send(writer, path, now, 503, {})
        self.busy += 1
        try:
            await asyncio.sleep(self.base_latency * max(1.0, (busy + 1) / capacity))
        finally:
            self.busy -= 1
        return self._send(writer, path, now, 200, {})

    def _send(
        self,
        writer: asyncio.StreamWriter,
        path: str,
        now: float,
        status: int,
        headers: dict[str, str],
        retry_after: int | None = None,
    ) -> bool:
        self._record(now, path, status)
        if retry_after is not None:
            self._retry_afters.append((now, now + retry_after))
        body = json.dumps({"path": path, "status": status}).encode()
        lines = [
            f"HTTP/1.1 {status} X",
            f"Date: {formatdate(usegmt=True)}",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
        ]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        return True

    def received(self, since: float = -math.inf, until: float = math.inf) -> list[Arrival]:
        """Arrivals in ``[since, until)``."""
        return [a for a in self.arrivals if since <= a.at < until]
