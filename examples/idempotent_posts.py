"""Retry-safe POSTs with an ``Idempotency-Key``: one charge, however many attempts.

    python examples/idempotent_posts.py

A POST is not idempotent: if the connection breaks after the server acted
but before its answer arrived, sending it again may charge the customer
twice. So resilient_http retries a POST that may have reached the server
only when it carries an ``Idempotency-Key`` header, which it sends unchanged
on every attempt. The server remembers the answer it gave for each key and
replays it instead of acting again (as Stripe, Adyen and the IETF draft
``Idempotency-Key`` header do).

The local payments server here misbehaves once per charge:

- charge A (with a key): the server creates the charge, then resets the
  connection before answering. The retry carries the same key; the server
  replays the charge it made. One charge.
- charge B (with a key): the first attempt gets a 503 before anything is
  done; the retry creates the charge. One charge.
- charge C (no key): a 503 comes back as the answer, not retried
  (``retry_stop="not_idempotent"``). No charge.
- charge D (no key): the server creates the charge and resets the
  connection. The caller sees an error and nothing is retried, which is
  right: a blind retry would have charged twice. One charge, of which the
  caller knows nothing; with a key it could simply have asked again.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import uuid
from typing import Any

import httpx

from resilient_http import Policy, ResilientTransport, RetryPolicy, TimeoutPolicy, call_info


class Payments:
    """A tiny payments API: ``POST /v1/charges``, deduplicated by Idempotency-Key."""

    def __init__(self) -> None:
        self.charges: list[dict[str, Any]] = []
        self.replies: dict[str, bytes] = {}  # idempotency key -> the body answered for it
        self.faults: list[str] = []  # what to do to the next POSTs: "reset" or "503"
        self.keys_seen: list[str | None] = []  # the key of every attempt, in order

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                headers = dict(
                    line.decode().lower().split(": ", 1) for line in head.split(b"\r\n")[1:] if b": " in line
                )
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                key = headers.get("idempotency-key")
                self.keys_seen.append(key)
                fault = self.faults.pop(0) if self.faults else None
                if fault == "503":  # overloaded: nothing was done
                    self.reply(writer, 503, b'{"error": "overloaded"}')
                elif key is not None and key in self.replies:  # seen before: replay, do not act again
                    self.reply(writer, 200, self.replies[key], replayed=True)
                else:
                    charge = {"id": f"ch_{len(self.charges) + 1}", **json.loads(body)}
                    self.charges.append(charge)
                    answer = json.dumps(charge).encode()
                    if key is not None:
                        self.replies[key] = answer
                    if fault == "reset":  # the charge exists, but its answer is lost
                        reset(writer)
                        return
                    self.reply(writer, 200, answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    @staticmethod
    def reply(writer: asyncio.StreamWriter, status: int, body: bytes, replayed: bool = False) -> None:
        extra = "idempotent-replayed: true\r\n" if replayed else ""
        head = f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n{extra}\r\n"
        writer.write(head.encode() + body)


def reset(writer: asyncio.StreamWriter) -> None:
    """Drop the connection with a TCP reset, as a crashing proxy would."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def create_charge(client: httpx.AsyncClient, description: str, *, idempotent: bool) -> httpx.Response:
    """One logical charge: one key, made here, however many attempts the transport makes."""
    # The key belongs to the operation, not to the attempt: code that retries on
    # its own (a job queue, a user's second click) must store and reuse it too.
    headers = {"Idempotency-Key": str(uuid.uuid4())} if idempotent else {}
    return await client.post("/v1/charges", json={"amount": 1999, "description": description}, headers=headers)


def report(
    payments: Payments, name: str, fault: str, outcome: httpx.Response | Exception, keys: list[str | None]
) -> None:
    """One line per logical charge: what the caller got, and what the server did."""
    info = call_info(outcome)
    assert info is not None and len(keys) == info.attempts
    distinct = set(keys)
    if distinct == {None}:
        sent = "no key      "
    else:
        (key,) = distinct  # one key, on every attempt
        assert key is not None
        sent = f"key {key[:8]}"
    if isinstance(outcome, httpx.Response):
        answer = f"{outcome.status_code} {outcome.json().get('id', '')}".strip()
        if outcome.headers.get("idempotent-replayed") == "true":
            answer += " (replayed)"
    else:
        answer = type(outcome).__name__
    made = sum(1 for charge in payments.charges if charge["description"] == f"charge {name}")
    print(
        f"charge {name}  {sent}  first attempt: {fault:<5} -> {answer:<18} "
        f"attempts={info.attempts} retry_stop={info.retry_stop} charges made={made}"
    )


async def main() -> None:
    payments = Payments()
    server = await asyncio.start_server(payments.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    transport = ResilientTransport(
        default=Policy(timeout=TimeoutPolicy(attempt=2.0, total=10.0), retry=RetryPolicy(attempts=3, backoff=0.05))
    )
    async with server, httpx.AsyncClient(transport=transport, base_url=f"http://127.0.0.1:{port}") as client:
        for name, fault, idempotent in (
            ("A", "reset", True),
            ("B", "503", True),
            ("C", "503", False),
            ("D", "reset", False),
        ):
            payments.faults = [fault]
            first_attempt = len(payments.keys_seen)
            outcome: httpx.Response | Exception
            try:
                outcome = await create_charge(client, f"charge {name}", idempotent=idempotent)
            except httpx.TransportError as exc:
                outcome = exc
            report(payments, name, fault, outcome, payments.keys_seen[first_attempt:])

    made = ", ".join(f"{charge['id']} {charge['description']}" for charge in payments.charges)
    print(f"\ncharges on the server: {made}")


if __name__ == "__main__":
    asyncio.run(main())
