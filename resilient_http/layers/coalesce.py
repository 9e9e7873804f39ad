"""Request coalescing: identical GETs and HEADs in flight at once share one upstream call.

When a popular resource expires, all its callers ask for it at once (the
thundering herd). With coalescing on, the first call for a key, the
*leader*, goes on down the chain; an identical call arriving while it is
in flight, a *follower*, sends nothing: it waits for the leader and gets a
copy of its answer, or of its error.

**Identical** means a GET or HEAD without a body, with the stale cache's key
(:mod:`.cache_key`: method, scheme, address, ``Host`` header, path and
query) in which ``Authorization``, ``Cookie`` and the policy's
``identity_headers`` always count, so that an answer never crosses
credentials, hosts or virtual hosts; and the same policy (a call with
overrides of its own coalesces with no one) and bulkhead priority. Other
headers (``User-Agent``, trace ids) may differ: upstream sees the leader's.

**What a follower gets.** A response of its own: its own headers, its own
stream over the same immutable body bytes, its own ``request``, and
``CallInfo.coalesced``. ``Vary`` is only known from the answer, so it is
checked then: a follower takes the answer only if its request and the
leader's agree on every header the answer names (``Vary: *``: never). Or
an error: a copy of the leader's exception, of the same class with the same
message and attributes, its own ``request`` and its own call info.

**Not shared**: an answer whose body is not in memory (the attempt reads
bodies of up to 1 MiB that announce a ``Content-Length``; the others stream,
and a follower must not hang on how fast the leader's caller reads), one
above ``max_body_bytes``, one that sets a cookie (a session begun for one
caller), one whose ``Vary`` does not match. The leader keeps its response
as is; each follower then sends its own call, at once and in parallel
(going round again would queue them one after another).

**Cancellation and deadlines.** A follower waits at most until its own
total deadline; cancelled, it just stops waiting, and the leader goes on.
A leader that ends for a reason of its own (its caller cancelled it, or its
own total deadline ran out) does not pass that on: its followers start
over, the first of them leading with its own deadline. A flight lives
exactly as long as its leader's call (its entry is removed as the leader
leaves, however it leaves), and nothing else is kept. A new policy makes
the layer afresh: a flight in progress lands for the calls that joined it,
and calls after the change start flights of their own.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, NamedTuple

import anyio
import httpx

from .._call import Call, Host, Next
from .._events import DEBUG, Coalesced
from .._exceptions import DeadlineExceededError
from .._headers import pick
from .cache_key import request_key, vary_names
from .timeout import BufferedStream, expired

_METHODS = frozenset({"GET", "HEAD"})
_CREDENTIALS = (b"authorization", b"cookie")
_BODY = (b"content-length", b"transfer-encoding")
_SET_COOKIE = frozenset({b"set-cookie", b"set-cookie2"})
_RESPONSE_HEADERS = frozenset({b"vary", *_SET_COOKIE})
_KEPT_EXTENSIONS = ("http_version", "reason_phrase")

#: A flight's outcome when its followers must start over (the leader ended for a reason of its own).
_AGAIN = "again"
#: A flight's outcome when its answer cannot be shared: each follower sends its own call.
_OWN = "own"


class _Answer(NamedTuple):
    """The leader's response, as each follower gets a copy of it."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    extensions: dict[str, Any]
    vary: tuple[tuple[str, str | None], ...]  # (header the answer varies on, the leader's value)

    def response_for(self, request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            self.status,
            headers=self.headers,
            stream=BufferedStream(self.body),
            request=request,
            extensions=dict(self.extensions),
        )


class _Flight:
    """One leader's call in flight; ``done`` is made by its first follower, so a lone call never pays for it."""

    __slots__ = ("done", "outcome")

    def __init__(self) -> None:
        self.done: anyio.Event | None = None
        self.outcome: _Answer | Exception | str = _AGAIN


def copy_error(error: Exception, request: httpx.Request) -> Exception:
    """``error`` again for another call: same class, message and attributes, its own request and call info.

    Made without calling ``__init__`` (resilient_http's own errors take
    keyword-only arguments that ``args`` does not hold).
    """
    kind = type(error)
    copy = kind.__new__(kind, *error.args)
    copy.args = error.args
    state = dict(getattr(error, "__dict__", {}))
    state.pop("resilient_http", None)  # the leader's call info; the transport sets the follower's
    if "__notes__" in state:
        state["__notes__"] = list(state["__notes__"])
    copy.__dict__.update(state)
    copy.__cause__ = error.__cause__
    copy.__suppress_context__ = error.__suppress_context__
    if isinstance(copy, httpx.RequestError):
        copy.request = request
    return copy.with_traceback(error.__traceback__)


class Coalesce:
    """The coalescing layer of one host: its flights in progress, by key."""

    __slots__ = ("_clock", "_events", "_flights", "_identity", "_max_body", "_metrics", "_picked")

    def __init__(self, host: Host) -> None:
        policy = host.policy.coalesce
        assert policy is not None
        self._max_body = policy.max_body_bytes
        self._identity = tuple(dict.fromkeys((*_CREDENTIALS, *(n.encode("ascii") for n in policy.identity_headers))))
        self._picked = frozenset({b"host", *_BODY, *self._identity})
        self._clock = host.clock
        self._metrics = host.metrics
        self._events = host.events
        self._flights: dict[Hashable, _Flight] = {}

    async def __call__(self, call: Call, call_next: Next) -> httpx.Response:
        request = call.request
        if request.method not in _METHODS:
            return await call_next(call)
        found = pick(request.headers, self._picked)
        if b"transfer-encoding" in found or found.get(b"content-length", "0").strip() != "0":
            return await call_next(call)
        key = (id(call.policy), call.priority, request_key(call, found, self._identity))
        while True:
            flight = self._flights.get(key)
            if flight is None:
                return await self._lead(call, call_next, key)
            outcome = await self._follow(call, flight)
            if outcome is not _AGAIN:
                break
        if isinstance(outcome, _Answer):
            if all(request.headers.get(name) == value for name, value in outcome.vary):
                call.coalesced = True
                call.noted = True
                self._metrics.labelled("coalesced", "response").inc()
                self._coalesced(call, "response")
                return outcome.response_for(request)
        elif isinstance(outcome, Exception):
            try:
                error = copy_error(outcome, request)
            except Exception:  # an exception class that cannot be made without its __init__
                error = None
            if error is not None:
                call.coalesced = True
                call.noted = True
                self._metrics.labelled("coalesced", "error").inc()
                self._coalesced(call, "error")
                raise error
        self._metrics.labelled("coalesced", "unshared").inc()
        self._coalesced(call, "unshared")
        return await call_next(call)

    def _coalesced(self, call: Call, result: str) -> None:
        events = self._events
        if events.wants(DEBUG, "coalesce", call):
            events.emit(Coalesced(transport=events.transport, host=events.host, result=result), call)

    async def _lead(self, call: Call, call_next: Next, key: Hashable) -> httpx.Response:
        flight = self._flights[key] = _Flight()
        outcome: _Answer | Exception | str = _AGAIN  # cancelled: the followers start over
        try:
            response = await call_next(call)
            # Nothing awaits from here to the end, so no follower can join after this look.
            outcome = _OWN if flight.done is None else self._answer(call, response)
            return response
        except Exception as exc:
            if not (isinstance(exc, DeadlineExceededError) and exc.kind == "total"):
                outcome = exc  # the leader's own deadline is not the followers'
            raise
        finally:
            del self._flights[key]
            flight.outcome = outcome
            if flight.done is not None:
                flight.done.set()

    async def _follow(self, call: Call, flight: _Flight) -> _Answer | Exception | str:
        """Wait for ``flight`` to land, within the call's own total deadline."""
        done = flight.done
        if done is None:
            done = flight.done = anyio.Event()
        deadline = call.deadline
        if deadline is None:
            await done.wait()
            return flight.outcome
        remaining = deadline - self._clock.now()
        if remaining <= 0:
            raise expired(call, "total")
        with anyio.move_on_after(remaining) as scope:
            await done.wait()
        if scope.cancelled_caught:
            raise expired(call, "total", " while waiting for an identical call")
        return flight.outcome

    def _answer(self, call: Call, response: httpx.Response) -> _Answer | str:
        """The leader's response as followers may share it, or ``_OWN`` (see the module docstring)."""
        stream = response.stream
        if isinstance(stream, BufferedStream):
            body = stream.body
        elif isinstance(stream, httpx.ByteStream):
            body = b"".join(stream)
        else:
            return _OWN
        if len(body) > self._max_body:
            return _OWN
        found = pick(response.headers, _RESPONSE_HEADERS)
        if not found.keys().isdisjoint(_SET_COOKIE):
            return _OWN
        names = vary_names(found.get(b"vary"))
        if "*" in names:
            return _OWN
        extensions = {name: response.extensions[name] for name in _KEPT_EXTENSIONS if name in response.extensions}
        headers = call.request.headers
        vary = tuple((name, headers.get(name)) for name in names)
        return _Answer(response.status_code, response.headers.raw, body, extensions, vary)
