"""ResilientClient: an ``httpx.AsyncClient`` whose every call goes through the resilience layers.

``httpx.AsyncClient(transport=ResilientTransport())`` loses the client's
network settings and its proxies from the environment (httpx turns those
off whenever a transport is given). :class:`ResilientClient` takes all of a
client's usual arguments and keeps their meaning: it builds the network
transports exactly as httpx would (the direct one, one per proxy, and
``mounts``), puts them *under* a single :class:`ResilientTransport`, and
picks among them per request as httpx does. The layers thus see the target
host, never the proxy: a host's policy, breaker, bulkhead and metrics are
the same whichever way its requests travel.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping
from os import PathLike
from types import TracebackType
from typing import Any

import httpx
from httpx._utils import URLPattern, get_environment_proxies
from prometheus_client import CollectorRegistry

from ._clock import Clock
from ._config import Policy
from ._events import Event
from ._exceptions import ConfigurationError
from ._fallback import Fallback
from ._hosts import DEFAULT_MAX_HOSTS
from ._metrics import DEFAULT_NAME
from ._network import CertTypes, ProxyTypes, VerifyTypes, default_inner
from ._transport import ResilientTransport
from .store import Store


class Routes(httpx.AsyncBaseTransport):
    """The network under the layers: per request, the first mounted transport whose pattern matches, else ``direct``.

    Patterns are httpx's (``"all://"``, ``"https://*.example.com"``, ...),
    ordered as ``httpx.AsyncClient`` orders its mounts; a pattern mounted to
    ``None`` means ``direct`` (how ``NO_PROXY`` is written). Every transport
    here is owned, and closed, by the routes.
    """

    def __init__(
        self, direct: httpx.AsyncBaseTransport, mounts: Mapping[str, httpx.AsyncBaseTransport | None] | None = None
    ) -> None:
        self._direct = direct
        ordered = sorted({URLPattern(pattern): transport for pattern, transport in (mounts or {}).items()}.items())
        self._mounts = [(pattern, direct if transport is None else transport) for pattern, transport in ordered]
        owned = {id(direct): direct}
        owned.update((id(transport), transport) for _, transport in self._mounts)
        self._owned = list(owned.values())

    def transport_for(self, url: httpx.URL) -> httpx.AsyncBaseTransport:
        for pattern, transport in self._mounts:
            if pattern.matches(url):
                return transport
        return self._direct

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self.transport_for(request.url).handle_async_request(request)

    async def __aenter__(self) -> Routes:
        for entered, transport in enumerate(self._owned):
            try:
                await transport.__aenter__()
            except BaseException:
                await _close(self._owned[:entered])
                raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc_value: BaseException | None = None,
        traceback: TracebackType | None = None,
    ) -> None:
        await _close(self._owned, (exc_type, exc_value, traceback))

    async def aclose(self) -> None:
        await _close(self._owned)


async def _close(
    transports: list[httpx.AsyncBaseTransport],
    exc_info: tuple[type[BaseException] | None, BaseException | None, TracebackType | None] | None = None,
) -> None:
    """Close every transport, each even when closing an earlier one failed or was cancelled."""
    if not transports:
        return
    try:
        if exc_info is None:
            await transports[0].aclose()
        else:
            await transports[0].__aexit__(*exc_info)
    finally:
        await _close(transports[1:], exc_info)


class ResilientClient(httpx.AsyncClient):
    """An ``httpx.AsyncClient`` over a :class:`ResilientTransport`, keeping all of a client's usual arguments.

    ``policies``, ``default``, ``registry``, ``max_hosts``, ``clock``,
    ``random``, ``fallback``, ``name``, ``buckets``, ``on_event``,
    ``tracer_provider`` and ``store`` are :class:`ResilientTransport`'s, which
    is ``client.resilient_transport``. ``verify``, ``cert``,
    ``http1``, ``http2``, ``proxy``, ``mounts``, ``limits`` and ``trust_env``
    mean what they mean to ``httpx.AsyncClient``, proxies from the
    environment (``HTTP_PROXY``, ``HTTPS_PROXY``, ``ALL_PROXY``,
    ``NO_PROXY``) included, with one difference: without ``limits``, there
    is no cap on connections across all hosts (a host's cap is its
    bulkhead). ``mounts`` choose the network for matching URLs; the layers
    are around all of them. Every other keyword (``base_url``, ``headers``,
    ``timeout``, ``auth``, ``event_hooks``, ...) goes to
    ``httpx.AsyncClient`` unchanged; ``transport=`` is refused, as the
    client makes its own (wrap your own transport with
    ``ResilientTransport(inner=...)`` instead).
    """

    def __init__(
        self,
        policies: Mapping[str, Policy] | None = None,
        *,
        default: Policy | None = None,
        registry: CollectorRegistry | None = None,
        max_hosts: int = DEFAULT_MAX_HOSTS,
        clock: Clock | None = None,
        random: random.Random | None = None,
        verify: VerifyTypes = True,
        cert: CertTypes | None = None,
        http1: bool = True,
        http2: bool = False,
        proxy: ProxyTypes | None = None,
        mounts: Mapping[str, httpx.AsyncBaseTransport | None] | None = None,
        limits: httpx.Limits | None = None,
        trust_env: bool = True,
        fallback: Fallback | None = None,
        name: str = DEFAULT_NAME,
        buckets: Iterable[float] | None = None,
        on_event: Callable[[Event], object] | None = None,
        tracer_provider: Any = None,
        store: str | Store | Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if "transport" in kwargs:
            raise ConfigurationError(
                "transport",
                kwargs["transport"],
                "ResilientClient makes its own: use httpx.AsyncClient(transport=ResilientTransport(inner=...))",
            )
        if proxy is not None:
            proxies: dict[str, ProxyTypes | None] = {"all://": proxy}
        elif trust_env:
            proxies = dict(get_environment_proxies())
        else:
            proxies = {}
        network: dict[str, Any] = {
            "verify": verify,
            "cert": cert,
            "trust_env": trust_env,
            "http1": http1,
            "http2": http2,
            "limits": limits,
        }
        direct = default_inner(**network)
        routes: dict[str, httpx.AsyncBaseTransport | None] = {
            pattern: None if url is None else default_inner(proxy=url, **network) for pattern, url in proxies.items()
        }
        routes.update(mounts or {})
        transport = ResilientTransport(
            policies,
            default=default,
            inner=Routes(direct, routes),
            registry=registry,
            max_hosts=max_hosts,
            clock=clock,
            random=random,
            fallback=fallback,
            name=name,
            buckets=buckets,
            on_event=on_event,
            tracer_provider=tracer_provider,
            store=store,
        )
        #: The transport under the client: for ``policy_for``, ``update_policies`` and ``reload``.
        self.resilient_transport = transport
        super().__init__(transport=transport, trust_env=trust_env, **kwargs)

    @classmethod
    def from_file(cls, path: str | PathLike[str], **kwargs: Any) -> ResilientClient:
        """A client whose ``policies``, ``default`` and ``store`` come from a TOML file (its transport reloads it)."""
        from ._toml import load_policies, load_store

        policies, default = load_policies(path)
        if kwargs.get("store") is None:
            kwargs["store"] = load_store(path)
        client = cls(policies, default=default, **kwargs)
        client.resilient_transport._source = path
        return client
