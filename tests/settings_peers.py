"""What the client-settings tests talk to, on 127.0.0.1: an origin (TLS or not, HTTP/1.1 and HTTP/2) and a proxy.

:class:`Origin` answers every request with 200 and records how it came:
the protocol (ALPN picks ``h2`` or ``http/1.1`` under TLS), the method, the
path and the authority. :class:`ForwardProxy` is a real forward proxy:
``CONNECT host:port`` opens a tunnel, an absolute URI (``GET http://...``)
is forwarded in origin form, one request per connection. It records each
request line, and reaches only 127.0.0.1: a name is looked up in the
proxy's own ``hosts`` (so that tests can use names like ``origin.test``
that resolve nowhere else), anything else gets a 502.

:class:`~flaky_server.FlakyServer` plays a misbehaving HTTP/1.1 server;
these show what a client's network settings change, so they speak TLS and
HTTP/2 but never fail on purpose.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Self

import h2.config
import h2.connection
import h2.events
import httpx


@dataclass(frozen=True, slots=True)
class Seen:
    """One request as the origin read it."""

    protocol: str  # "HTTP/1.1" or "HTTP/2"
    method: str
    path: str
    authority: str


class _Listener:
    """A server on 127.0.0.1 and a free port whose connection handlers end when it stops."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self._tls = tls
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self.port = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._handle(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ssl.SSLError, ValueError):
            pass
        except asyncio.CancelledError:
            pass  # the server is stopping
        finally:
            self._handlers.discard(task)
            writer.close()

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0, ssl=self._tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._server is not None
        self._server.close()
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await self._server.wait_closed()


async def _read_head(reader: asyncio.StreamReader) -> tuple[str, list[tuple[str, str]]] | None:
    """The request or status line and the header fields; ``None`` at a clean end of stream."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise
        return None
    first, *lines = head[:-4].decode("latin-1").split("\r\n")
    fields = [(name.strip(), value.strip()) for name, _, value in (line.partition(":") for line in lines)]
    return first, fields


def _field(fields: list[tuple[str, str]], name: str, default: str = "") -> str:
    return next((value for key, value in fields if key.lower() == name), default)


class Origin(_Listener):
    """An origin that answers 200 to everything, body ``"<protocol> <method> <path>"``; HTTP/2 when ALPN says so."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        super().__init__(tls)
        self.seen: list[Seen] = []

    def url(self, path: str = "/", host: str = "127.0.0.1") -> str:
        return f"{'https' if self._tls else 'http'}://{host}:{self.port}{path}"

    def _answer(self, protocol: str, method: str, path: str, authority: str) -> bytes:
        self.seen.append(Seen(protocol, method, path, authority))
        return f"{protocol} {method} {path}".encode()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tls = writer.get_extra_info("ssl_object")
        if tls is not None and tls.selected_alpn_protocol() == "h2":
            await self._serve_h2(reader, writer)
            return
        while (head := await _read_head(reader)) is not None:
            (method, target, _), fields = head[0].split(" ", 2), head[1]
            await reader.readexactly(int(_field(fields, "content-length", "0")))
            body = self._answer("HTTP/1.1", method, target, _field(fields, "host"))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
            if _field(fields, "connection").lower() == "close":
                return

    async def _serve_h2(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        requests: dict[int, dict[str, str]] = {}
        while data := await reader.read(65536):
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived) and event.stream_id is not None:
                    requests[event.stream_id] = {str(k): str(v) for k, v in event.headers or ()}
                elif isinstance(event, h2.events.DataReceived) and event.stream_id is not None:
                    conn.acknowledge_received_data(event.flow_controlled_length or 0, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded) and event.stream_id is not None:
                    fields = requests.pop(event.stream_id)
                    body = self._answer("HTTP/2", fields[":method"], fields[":path"], fields[":authority"])
                    conn.send_headers(event.stream_id, [(":status", "200"), ("content-length", str(len(body)))])
                    conn.send_data(event.stream_id, body, end_stream=True)
                elif isinstance(event, h2.events.ConnectionTerminated):
                    return
            writer.write(conn.data_to_send())
            await writer.drain()


class ForwardProxy(_Listener):
    """A forward proxy on 127.0.0.1: CONNECT tunnels and absolute-URI requests, to 127.0.0.1 only."""

    def __init__(self, hosts: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self._hosts = {"127.0.0.1": "127.0.0.1", **(hosts or {})}
        #: Each request line the proxy read: ``("CONNECT", "origin.test:443")``, ``("GET", "http://...")``.
        self.seen: list[tuple[str, str]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await _read_head(reader)
        if head is None:
            return
        method, target, _ = head[0].split(" ", 2)
        self.seen.append((method, target))
        url = httpx.URL(f"//{target}" if method == "CONNECT" else target)
        address = self._hosts.get(url.host)
        if address is None or (url.port is None and method == "CONNECT"):
            writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            await writer.drain()
            return
        up_reader, up_writer = await asyncio.open_connection(address, url.port or 80)
        try:
            if method == "CONNECT":
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            else:
                body = await reader.readexactly(int(_field(head[1], "content-length", "0")))
                keep = [(k, v) for k, v in head[1] if k.lower() not in ("connection", "proxy-connection")]
                request_line = f"{method} {url.raw_path.decode('ascii')} HTTP/1.1"
                lines = [request_line, *(f"{k}: {v}" for k, v in keep), "Connection: close"]
                up_writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
                answer = await _read_head(up_reader)
                if answer is None:
                    return
                keep = [(k, v) for k, v in answer[1] if k.lower() != "connection"]
                lines = [answer[0], *(f"{k}: {v}" for k, v in keep), "Connection: close"]
                writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            up_writer.close()


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    """Copy ``source`` to ``sink`` until it ends, then end ``sink``'s half."""
    try:
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()
        if sink.can_write_eof():
            sink.write_eof()
    except (ConnectionError, OSError):
        sink.close()
