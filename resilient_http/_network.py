"""The network under the layers: httpx's own transport, with the settings a client would give it.

httpx configures TLS (``verify``, ``cert``), protocols (``http1``,
``http2``), the pool (``limits``) and proxies on the transport a client
makes when it is given none. A custom ``transport=`` replaces that
transport, and its settings with it: ``httpx.AsyncClient(http2=True,
transport=...)`` silently speaks HTTP/1.1. :func:`default_inner` takes the
same settings as ``httpx.AsyncHTTPTransport``, so that a
:class:`~resilient_http.ResilientTransport` (and a
:class:`~resilient_http.ResilientClient`) can keep them.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable, Mapping
from typing import Any

import httpx

from ._exceptions import ConfigurationError

#: What httpx accepts as ``cert=`` and ``proxy=``, and as one of ``socket_options=``.
CertTypes = str | tuple[str, str] | tuple[str, str, str]
ProxyTypes = httpx.URL | str | httpx.Proxy
SocketOption = tuple[int, int, int] | tuple[int, int, bytes | bytearray] | tuple[int, int, None, int]
VerifyTypes = ssl.SSLContext | str | bool

#: httpx's pool limits without its cap on connections across all hosts (see :func:`default_inner`).
NO_GLOBAL_CAP = httpx.Limits(max_connections=None, max_keepalive_connections=100)

#: ``httpx.AsyncHTTPTransport``'s settings and their defaults (``limits=None`` is :data:`NO_GLOBAL_CAP`).
DEFAULTS: Mapping[str, Any] = {
    "verify": True,
    "cert": None,
    "trust_env": True,
    "http1": True,
    "http2": False,
    "limits": None,
    "proxy": None,
    "uds": None,
    "local_address": None,
    "retries": 0,
    "socket_options": None,
}


def default_inner(
    *,
    verify: VerifyTypes = True,
    cert: CertTypes | None = None,
    trust_env: bool = True,
    http1: bool = True,
    http2: bool = False,
    limits: httpx.Limits | None = None,
    proxy: ProxyTypes | None = None,
    uds: str | None = None,
    local_address: str | None = None,
    retries: int = 0,
    socket_options: Iterable[SocketOption] | None = None,
) -> httpx.AsyncHTTPTransport:
    """httpx's network transport with these settings (``httpx.AsyncHTTPTransport``'s), and no global connection cap.

    httpx's pool caps connections across *all* hosts (100 by default), so one
    hung host would hold every connection and starve the healthy ones, whatever
    their bulkheads say. Here the cap per host is the host's bulkhead
    (``max_concurrent``), which is the isolation a bulkhead promises. Given
    ``limits`` are used as they are, global cap included.

    ``http2=True`` without the ``h2`` package raises ``ImportError`` here, as
    ``httpx.AsyncClient`` does, rather than at the first request.
    """
    if http2:
        try:
            import h2  # noqa: F401
        except ImportError:
            raise ImportError(
                "Using http2=True, but the 'h2' package is not installed: install httpx[http2] (or httpx2[http2])."
            ) from None
    return httpx.AsyncHTTPTransport(
        verify=verify,
        cert=cert,
        trust_env=trust_env,
        http1=http1,
        http2=http2,
        limits=NO_GLOBAL_CAP if limits is None else limits,
        proxy=proxy,
        uds=uds,
        local_address=local_address,
        retries=retries,
        socket_options=socket_options,
    )


def refuse_beside_inner(settings: Mapping[str, Any]) -> None:
    """Raise :class:`ConfigurationError` for the first setting not at its default.

    Network settings configure the default inner transport; given beside
    ``inner=``, they would be silently lost, which is the very trap they exist
    to close.
    """
    for name, value in settings.items():
        if value != DEFAULTS[name]:
            raise ConfigurationError(
                name, value, "configures the default inner transport: give it to your own inner transport instead"
            )
