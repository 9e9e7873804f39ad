"""Give back the pool slots httpcore leaves behind when a queued request is cancelled.

httpcore 1.0.x (encode/httpcore#1093, #830, #658; fixed in httpx2's fork,
pydantic/httpx2#983): when the pool hands a request a newly created
connection while that request is waiting for one, and the request is
cancelled or times out before it runs, the connection stays in the pool
unconnected. It is neither closed, idle nor expired, so the pool never
removes it, and it is not available, so nobody uses it: with
``max_connections`` set, a few hundred timeouts under contention take every
slot, and every later call fails with a pool timeout against a healthy
server. Any cancellation can do it, httpcore's own pool timeout included.

:func:`reap` drops such orphans (unconnected, and no request of the pool
refers to them) after an attempt that ended by a timeout or a cancellation.
It reads httpcore's private state, so it checks every name it uses and does
nothing when they are not what it expects.
"""

from __future__ import annotations

from typing import Any

import anyio
import httpcore
import httpx


def _orphans(pool: Any) -> list[Any]:
    try:
        taken = {id(request.connection) for request in pool._requests}
        return [
            connection
            for connection in pool._connections
            if isinstance(connection, httpcore.AsyncHTTPConnection)
            and connection._connection is None
            and not connection._connect_failed
            and id(connection) not in taken
        ]
    except AttributeError:  # pragma: no cover - another httpcore
        return []


async def reap(transport: httpx.AsyncBaseTransport) -> None:
    """Drop the unconnected connections no request owns from ``transport``'s pool, and let queued requests in."""
    pool = getattr(transport, "_pool", None)
    if not isinstance(pool, httpcore.AsyncConnectionPool) or not _orphans(pool):
        return
    with pool._optional_thread_lock:
        for connection in _orphans(pool):
            pool._connections.remove(connection)
        closing = pool._assign_requests_to_connections()
    if closing:
        with anyio.CancelScope(shield=True):
            await pool._close_connections(closing)
