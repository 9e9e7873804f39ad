"""The Redis store: shared state for a fleet of workers, through redis-py's asyncio client.

Each operation is one Lua script (or one command) on one upstream's keys,
under a timeout of its own; the :class:`~._guard.StoreGuard` turns every
failure into ``UNAVAILABLE`` and skips the store after repeated failures.
redis-py's asyncio client runs on asyncio only: under trio the store is
refused with a :class:`ConfigurationError`.
"""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from prometheus_client import CollectorRegistry

from .._clock import Clock, SystemClock
from .._errors import ConfigurationError
from . import _lua
from ._base import (
    MAX_SECONDS,
    UNAVAILABLE,
    Admission,
    Circuit,
    CircuitState,
    Maybe,
    check_admit,
    check_prefix,
    check_seconds,
    check_slots,
    check_workers,
    tag,
    workers_key,
)
from ._guard import StoreGuard
from ._memory import default_worker_id
from ._metrics import StoreMetrics

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.cluster import RedisCluster

R = TypeVar("R")

SCHEMES = ("redis://", "rediss://", "unix://")
#: The fleet's size a worker assumes until the store has counted the live workers: more than one, since a
#: worker that has never heard from the store must not take the whole quota (see README, "Running a fleet").
WORKERS = 8
#: Turns of the event loop an operation is given after its timeout (see :class:`_Deadline`).
TURNS = 2
_STATES: tuple[CircuitState, ...] = ("closed", "open", "half_open")
_US = 1_000_000


def _in_trio() -> bool:
    trio = sys.modules.get("trio")
    return trio is not None and bool(trio.lowlevel.in_trio_run())


def _refuse(where: str) -> ConfigurationError:
    return ConfigurationError(
        "store", where, "a Redis store needs asyncio (redis-py's client); under trio, use the in-memory store"
    )


def _us(seconds: float) -> int:
    return round(seconds * _US)


def _ints(reply: Any, count: int) -> list[int]:
    """A script's answer, checked: it comes from a server, and is trusted no further than that."""
    if not isinstance(reply, list) or len(reply) != count or not all(type(item) is int for item in reply):
        raise ValueError(f"unexpected reply from the store: {reply!r:.80}")
    return reply


def _admission(reply: Any) -> Admission:
    allowed, wait, hold, turn = _ints(reply, 4)
    return Admission(allowed == 1, max(0, wait) / _US, max(0, hold) / _US, max(0, turn) / _US)


def _circuit(reply: Any) -> Circuit:
    state, round, retry_after = _ints(reply, 3)
    if not 0 <= state < len(_STATES) or round < 0:
        raise ValueError(f"unexpected reply from the store: {reply!r:.80}")
    return Circuit(_STATES[state], round, max(0, retry_after) / _US)


def _int(reply: Any) -> int:
    if type(reply) is not int:
        raise ValueError(f"unexpected reply from the store: {reply!r:.80}")
    return reply


def _seconds(reply: Any) -> float:
    return max(0, _int(reply)) / _US


def _flag(reply: Any) -> bool:
    return _int(reply) == 1


class _Deadline:
    """An operation's timeout, with a few more turns of the event loop to read an answer that already came.

    A worker's event loop runs late when its process is not scheduled or is
    busy (on a loaded machine, by more than a store timeout while Redis
    itself answers in milliseconds: ``benchmarks/RESULTS.md``, section 7).
    When such a loop wakes, the timer and Redis's answer are both due; timed
    out at once, the answer would be thrown away (with the connection,
    which redis-py drops on cancellation) and the caller would decide alone
    for nothing. So when the timer fires, the operation gets :data:`TURNS`
    more turns of the loop, each of which reads the sockets, before it is
    cancelled: microseconds when the loop is idle and the answer is really
    late.
    """

    __slots__ = ("_handle", "_loop", "_scope", "_turns")

    def __init__(self, scope: asyncio.Timeout, seconds: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._scope = scope
        self._turns = TURNS
        self._handle: asyncio.Handle = self._loop.call_later(seconds, self._expire)

    def _expire(self) -> None:
        if self._turns:
            self._turns -= 1
            self._handle = self._loop.call_soon(self._expire)
        else:
            self._scope.reschedule(self._loop.time())  # cancels the operation, as a TimeoutError

    def cancel(self) -> None:
        self._handle.cancel()


class RedisStore:
    """A :class:`~resilient_http.store.Store` in Redis (a server, or a Redis Cluster), shared by every worker.

    ``client`` is a ``redis.asyncio.Redis`` or ``RedisCluster``; it is closed
    by :meth:`aclose` only when ``close_client`` is set (as
    :meth:`from_url` does). Keys live under ``prefix``; each operation has
    ``timeout`` seconds (see :class:`_Deadline`); after ``failures`` failures
    in a row the store is skipped for ``cooldown`` seconds. A breaker's
    record is kept ``circuit_ttl`` seconds after its last change. ``workers``
    is the fleet's size a worker assumes until the store has counted the
    live workers (:data:`WORKERS` by default; see :class:`~._fleet.Fleet`).
    ``clock`` times only the cooldown: every time that is shared is the
    server's.
    """

    def __init__(
        self,
        client: Redis | RedisCluster,
        *,
        prefix: str = "resilient_http",
        timeout: float = 0.05,
        failures: int = 3,
        cooldown: float = 5.0,
        circuit_ttl: float = 600.0,
        worker_id: str | None = None,
        workers: int = WORKERS,
        registry: CollectorRegistry | None = None,
        clock: Clock | None = None,
        name: str = "redis",
        close_client: bool = False,
    ) -> None:
        if _in_trio():
            raise _refuse(name)
        self._client = client
        self._prefix = check_prefix(prefix)
        self._timeout = check_seconds("store.timeout", timeout)
        self._circuit_ttl = _us(check_seconds("store.circuit_ttl", circuit_ttl))
        self.worker_id = default_worker_id() if worker_id is None else worker_id
        self.workers = check_workers(workers)
        self.name = name
        self._close_client = close_client
        self._beating = False  # in the live workers: aclose() takes it out
        self._metrics = StoreMetrics(registry)
        self._guard = StoreGuard(
            name=name,
            failures=failures,
            cooldown=cooldown,
            clock=SystemClock() if clock is None else clock,
            metrics=self._metrics,
        )
        register = client.register_script
        self._gcra = register(_lua.GCRA)
        self._hold = register(_lua.HOLD)
        self._read = register(_lua.CIRCUIT)
        self._open = register(_lua.OPEN)
        self._claim = register(_lua.CLAIM)
        self._release = register(_lua.RELEASE)
        self._succeeded = register(_lua.SUCCEEDED)
        self._heartbeat = register(_lua.HEARTBEAT)

    @classmethod
    def from_url(cls, url: str, *, cluster: bool = False, **options: Any) -> RedisStore:
        """A store on a client made for ``url`` (``redis://``, ``rediss://`` or ``unix://``), closed with the store.

        ``cluster`` connects to a Redis Cluster through one of its nodes. The
        client does not retry by itself: a failed operation is the guard's
        to count, and the caller falls back at once.
        """
        if not isinstance(url, str) or not url.startswith(SCHEMES):
            raise ConfigurationError("store.url", url, "must start with redis://, rediss:// or unix://")
        if cluster and url.startswith("unix://"):
            raise ConfigurationError("store.cluster", cluster, "a Redis Cluster is reached over TCP, not unix://")
        try:
            from redis.asyncio import Redis
            from redis.asyncio.cluster import RedisCluster
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff
        except ImportError:
            raise ConfigurationError(
                "store.url", url, "needs the redis package: pip install 'resilient-http-transport[redis]'"
            ) from None
        name = re.sub(r"(password=)[^&]*", r"\1***", re.sub(r"//[^@/]*@", "//***@", url))  # no password in logs
        if _in_trio():
            raise _refuse(name)
        client: Redis | RedisCluster
        if cluster:
            client = RedisCluster.from_url(url, retry=Retry(NoBackoff(), 0))
        else:
            client = Redis.from_url(url, retry=Retry(NoBackoff(), 0))
        return cls(client, name=name, close_client=True, **options)

    @property
    def available(self) -> bool:
        """``False`` while the store is skipped after failures."""
        return self._guard.available

    def _key(self, upstream: str, suffix: str) -> str:
        return f"{tag(self._prefix, upstream)}:{suffix}"

    async def _run(
        self, operation: str, script: Any, keys: Sequence[str], args: Sequence[Any], parse: Callable[[Any], R]
    ) -> Maybe[R]:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            raise _refuse(self.name) from None
        guard = self._guard
        if not guard.enter(operation):
            return UNAVAILABLE
        try:
            async with asyncio.timeout(None) as scope:
                deadline = _Deadline(scope, self._timeout)
                try:
                    reply = await script(keys=keys, args=args)
                finally:
                    deadline.cancel()
            result = parse(reply)
        except Exception as exc:  # whatever went wrong, the caller falls back to local state
            guard.failed(operation, exc)
            return UNAVAILABLE
        except BaseException:
            guard.abandoned()
            raise
        guard.succeeded()
        return result

    async def admit(
        self,
        upstream: str,
        *,
        rate: float,
        burst: int,
        cost: int = 1,
        max_wait: float = 0.0,
        limit: str = "rate",
        turn: bool = True,
        next_turn: bool = False,
    ) -> Maybe[Admission]:
        check_admit(rate, burst, cost, max_wait)
        keys = (self._key(upstream, f"rate:{limit}"), self._key(upstream, "hold"), self._key(upstream, f"turn:{limit}"))
        args = (round(_US / rate), burst, cost, _us(max_wait), (2 if next_turn else 1) if turn else 0)
        return await self._run("admit", self._gcra, keys, args, _admission)

    async def hold(self, upstream: str, seconds: float) -> Maybe[float]:
        seconds = min(check_seconds("seconds", seconds, zero=True), MAX_SECONDS)
        return await self._run("hold", self._hold, (self._key(upstream, "hold"),), (_us(seconds),), _seconds)

    async def held(self, upstream: str) -> Maybe[float]:
        return await self._run("held", self._pttl, (self._key(upstream, "hold"),), (), _seconds)

    async def _pttl(self, keys: Sequence[str], args: Sequence[Any]) -> int:
        left = await self._client.pttl(keys[0])
        return max(0, _int(left)) * 1000

    async def circuit(self, upstream: str) -> Maybe[Circuit]:
        return await self._run("circuit", self._read, (self._key(upstream, "circuit"),), (), _circuit)

    async def open_circuit(self, upstream: str, seconds: float, *, after_round: int) -> Maybe[Circuit]:
        args = (_us(min(check_seconds("seconds", seconds), MAX_SECONDS)), int(after_round), self._circuit_ttl)
        return await self._run("open_circuit", self._open, (self._key(upstream, "circuit"),), args, _circuit)

    async def claim_trial(self, upstream: str, round: int, *, slots: int, ttl: float) -> Maybe[bool]:
        args = (int(round), check_slots(slots), _us(check_seconds("ttl", ttl)), self._circuit_ttl)
        return await self._run("claim_trial", self._claim, (self._key(upstream, "circuit"),), args, _flag)

    async def release_trial(self, upstream: str, round: int) -> Maybe[bool]:
        key = (self._key(upstream, "circuit"),)
        return await self._run("release_trial", self._release, key, (int(round),), _flag)

    async def trial_succeeded(self, upstream: str, round: int, *, slots: int) -> Maybe[Circuit]:
        args = (int(round), check_slots(slots), self._circuit_ttl)
        return await self._run("trial_succeeded", self._succeeded, (self._key(upstream, "circuit"),), args, _circuit)

    async def heartbeat(self, ttl: float) -> Maybe[int]:
        args = (self.worker_id, _us(check_seconds("ttl", ttl)))
        self._beating = True
        return await self._run("heartbeat", self._heartbeat, (workers_key(self._prefix),), args, _int)

    async def leave(self) -> None:
        self._beating = False
        await self._run("leave", self._zrem, (workers_key(self._prefix),), (self.worker_id,), _int)

    async def _zrem(self, keys: Sequence[str], args: Sequence[Any]) -> int:
        return _int(await self._client.zrem(keys[0], *args))

    async def aclose(self) -> None:
        """Leave the live workers if this one beat; stop exporting metrics; close the client if the store made it."""
        if self._beating:
            await self.leave()
        self._metrics.remove()
        if self._close_client:
            await self._client.aclose()
