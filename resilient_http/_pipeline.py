"""The one place where the order of the layers is written down, and the chain is built.

Outermost first::

    stale cache → coalescing → rate limiter → total timeout → circuit breaker
                → retry → hedging → bulkhead → per-attempt timeout → network

Why this order:

- The **stale cache** is outermost so that it can answer when anything
  inside fails: an error, a final 5xx, an open circuit, a refused slot, the
  total deadline.
- **Coalescing** comes next, before everything that costs: a follower
  sends nothing, so it must take no rate-limit token, count no call in the
  breaker, hold no bulkhead slot; the leader's one call pays for all. It
  is inside the stale cache so that each follower still falls back on
  its own: a shared 503, a shared error or a follower's own total
  deadline running out while it waits is a failure that the stale cache
  can answer.
- The **rate limiter** comes before everything that costs: a call it
  refuses never counts against the breaker or the budget. Its wait is
  bounded by the total timeout, which starts when the call enters.
- The **total timeout** bounds all that follows, the response body included.
  It is not a layer of its own but a deadline on the call, set when the call
  enters the transport (so it bounds the rate limiter's wait too), which
  every wait respects, which the attempt folds into its timer, and which the
  transport puts on a streamed response body before returning it.
- The **circuit breaker** sits outside retry, so an open circuit fails fast
  without retrying, and it judges whole calls rather than single tries.
- **Retry** is outside the bulkhead so that a call waiting out its backoff
  does not hold a slot.
- **Hedging** is inside retry and the breaker, which judge the race of
  copies as one attempt by its outcome (a hedge that wins is not a retry,
  and one slow copy is not a failure), and outside the bulkhead, so that
  each copy takes a slot (a connection) of its own, or is not sent. Its
  copies also take rate-limit tokens and retry budget through the hooks
  the retry layer uses, since the rate limiter is far outside.
- The **bulkhead** is outside the per-attempt timeout, so queueing for a
  slot never eats into an attempt's time.
- The **per-attempt timeout** is innermost, around the network alone.

A layer that is off (its policy field is ``None``) is not in the chain and
costs nothing. Layers are made per host on first use and keep their state
(breaker counts, budgets) on themselves; chains are composed once per host
and per set of active layers, by a reverse fold like Starlette's
``build_middleware_stack``.

Where hedging is off, the circuit breaker, retry and bulkhead (those of
them that are on) and the attempt are one layer in the chain:
:class:`~resilient_http._fused.Fused` runs their usual call in one
coroutine and hands every other case to the layers' own code, through the
same layers composed as above. It changes what a call costs, not what it
does (``tests/test_fused.py`` compares the two).

When a host's policy changes while the service runs (:func:`update`), a
layer that stays gets the new policy through its ``reconfigure`` and keeps
its state (a layer without ``reconfigure`` is made afresh); a layer the
policy turns off is dropped with its state (its ``detach``, if it has one,
undoes what it left on the host); a layer the policy turns on is made fresh.
Calls in flight finish on the chain they started with.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from ._call import Call, Host, Layer, Next
from ._config import Policy
from ._fused import Fused
from .layers.bulkhead import Bulkhead
from .layers.circuit_breaker import CircuitBreakerLayer
from .layers.coalesce import Coalesce
from .layers.hedge import Hedge
from .layers.rate_limit import RateLimiter
from .layers.retry import Retry
from .layers.stale_cache import StaleCache
from .layers.timeout import attempt

#: The layers whose usual call runs as one coroutine (outermost first), with the attempt inside: see _fused.
FUSED = ("circuit_breaker", "retry", "bulkhead")
#: Whether chains run those layers' usual call as one (``False``: each layer its own coroutine, as tests compare).
FUSE = True

# (policy field that turns the layer on, how to make it for a host), outermost first.
# The per-attempt timeout and the network are the end of every chain: ``attempt``.
ORDER: tuple[tuple[str, Callable[[Host], Any]], ...] = (
    ("stale_cache", StaleCache),
    ("coalesce", Coalesce),
    ("rate_limit", RateLimiter),
    ("circuit_breaker", CircuitBreakerLayer),
    ("retry", Retry),
    ("hedge", Hedge),
    ("bulkhead", Bulkhead),
)


#: A chain as its outermost layer's ``__call__`` and the chain inside that layer.
#: The third is the same chain as one callable, for the paths that take one (a traced call's).
Head = tuple[Callable[[Call, Next], Awaitable[httpx.Response]], Next, Next]


def _link_handle(handle: Callable[[Call, Next], Awaitable[httpx.Response]], call_next: Next) -> Next:
    """A layer's bound ``__call__`` in front of ``call_next``.

    A plain function calling the bound ``__call__``: calling the layer
    itself (a partial with ``call_next=`` as a keyword did) costs about
    1,400 more CPU instructions per layer and call.
    """

    def link(call: Call) -> Awaitable[httpx.Response]:
        return handle(call, call_next)

    return link


def _active(policy: Policy) -> tuple[bool, ...]:
    return tuple(getattr(policy, name) is not None for name, _ in ORDER)


def _through(call: Call, call_next: Next) -> Awaitable[httpx.Response]:
    """The head of a chain without layers: straight on."""
    return call_next(call)


def head_for(host: Host, policy: Policy) -> Head:
    """The chain for ``policy`` on ``host`` as its outermost layer's ``__call__`` and what follows it.

    The transport calls the one with the other, without a link in front of
    that layer; the third item is the whole chain as one callable. Cached per
    set of active layers.
    """
    key = _active(policy)
    head = host.chains.get(key)
    if head is None:
        host.metrics.prepare(policy)  # before the layers, which set their gauges when made
        handle: Callable[[Call, Next], Awaitable[httpx.Response]] = _through
        chain: Next = attempt
        fused: dict[str, Any] = {}  # the layers of the fused segment (see _fused), when hedging is off
        inside_retry: Next = attempt
        unlinked: Next | None = None  # ``handle`` itself when it needs no link to be called as a chain
        for (name, make), on in reversed(list(zip(ORDER, key, strict=True))):
            if on:
                layer: Layer | None = host.layers.get(name)
                if layer is None:
                    layer = host.layers[name] = make(host)
                if handle is not _through:
                    chain = unlinked or _link_handle(handle, chain)
                    unlinked = None
                if name == "retry":
                    inside_retry = chain
                handle = layer.__call__
                if name in FUSED:
                    fused[name] = layer
            if name == FUSED[0] and fused and FUSE and policy.hedge is None:
                # The segment's outermost: it becomes one layer, before the same layers' own chain.
                layers = (fused.get("circuit_breaker"), fused.get("retry"), fused.get("bulkhead"))
                handle = unlinked = Fused(*layers, inside_retry, _link_handle(handle, chain)).__call__
        whole = chain if handle is _through else unlinked or _link_handle(handle, chain)
        head = host.chains[key] = (handle, chain, whole)
    return head


def update(host: Host, policy: Policy) -> None:
    """Give ``host`` the new ``policy``, keeping the state of the layers that stay (see the module docstring).

    Synchronous, so that no call sees a host halfway through.
    """
    old = host.policy
    for name, _ in ORDER:
        layer = host.layers.get(name)
        if layer is None:
            continue
        new = getattr(policy, name)
        if new == getattr(old, name):
            continue
        reconfigure = getattr(layer, "reconfigure", None)
        if new is not None and reconfigure is not None:
            reconfigure(new)
        elif new is not None or getattr(old, name) is not None:  # one made for a call's override has nothing to lose
            del host.layers[name]
            detach = getattr(layer, "detach", None)
            if detach is not None:
                detach(host)
    host.policy = policy
    host.chains.clear()
    host.head = head_for(host, policy)
    host.direct = is_direct(policy)


def is_direct(policy: Policy) -> bool:
    """Whether ``policy`` turns every layer off, the timeouts too: its calls go straight to the network."""
    return policy.timeout is None and not any(_active(policy))
