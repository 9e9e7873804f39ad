"""resilient_http under trio: the same transport, no asyncio anywhere.

    python examples/trio_program.py

httpx and httpcore run on trio, and every wait in resilient_http (backoff,
Retry-After, timeouts, queues) goes through anyio, so ``trio.run`` is all it
takes. The upstream here is served by ``trio.serve_tcp`` in the same
program:

- ``/flaky`` answers 503 with ``Retry-After: 1`` once, then 200: the
  retry waits at least the second the server asked for (jitter only adds);
- ``/slow`` hangs on its first request, then answers at once: the
  per-attempt timeout (0.3 s) cuts the first attempt and the retry succeeds,
  well inside the total timeout.
"""

from __future__ import annotations

import time
from collections import Counter
from functools import partial

import httpx
import sniffio
import trio
from prometheus_client import CollectorRegistry

from resilient_http import Policy, ResilientTransport, RetryPolicy, TimeoutPolicy, call_info


async def serve(requests: Counter[str], stream: trio.SocketStream) -> None:
    """Answer HTTP/1.1 requests on one connection; ``requests`` counts them per path."""
    buffer = b""
    try:
        while True:
            while b"\r\n\r\n" not in buffer:
                data = await stream.receive_some()
                if not data:
                    return
                buffer += data
            head, _, buffer = buffer.partition(b"\r\n\r\n")
            path = head.split(b" ", 2)[1].decode()
            requests[path] += 1
            status, headers = 200, ""
            if path == "/flaky" and requests[path] == 1:
                status, headers = 503, "retry-after: 1\r\n"
            elif path == "/slow" and requests[path] == 1:
                await trio.sleep(10)  # far longer than the attempt timeout: the client gives up first
            body = f'{{"path": "{path}", "served": {requests[path]}}}'.encode()
            await stream.send_all(
                f"HTTP/1.1 {status} X\r\ncontent-length: {len(body)}\r\n{headers}\r\n".encode() + body
            )
    except trio.BrokenResourceError:  # the client hung up (its attempt timed out)
        pass


async def main() -> None:
    requests: Counter[str] = Counter()
    registry = CollectorRegistry()
    transport = ResilientTransport(
        default=Policy(
            timeout=TimeoutPolicy(attempt=0.3, total=5.0),
            retry=RetryPolicy(attempts=3, backoff=0.05),
        ),
        registry=registry,
    )
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, partial(serve, requests), 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        print(f"event loop: {sniffio.current_async_library()}")
        async with httpx.AsyncClient(transport=transport, base_url=f"http://127.0.0.1:{port}") as client:
            for path in ("/flaky", "/slow"):
                started = time.monotonic()
                response = await client.get(path)
                info = call_info(response)
                assert info is not None
                waits = ", ".join(f"{wait.reason} {wait.seconds:.2f}s" for wait in info.waits)
                print(
                    f"GET {path:<6} -> {response.status_code} after {info.attempts} attempts "
                    f"in {time.monotonic() - started:.2f}s (waits: {waits}; server saw {requests[path]} requests)"
                )
            # Read before the client closes: a closed transport's series leave the registry.
            host = f"127.0.0.1:{port}"
            for name, labels in (
                ("resilient_http_retries_total", {"reason": "status_503"}),
                ("resilient_http_retries_total", {"reason": "timeout"}),
                ("resilient_http_timeouts_total", {"kind": "attempt"}),
            ):
                value = registry.get_sample_value(name, {"transport": "default", "host": host, **labels})
                label, label_value = next(iter(labels.items()))
                print(f'{name}{{{label}="{label_value}"}} {value or 0:.0f}')
        nursery.cancel_scope.cancel()  # stop the server (and the handler still asleep in /slow)


if __name__ == "__main__":
    trio.run(main)
