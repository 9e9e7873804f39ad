"""Which requests are "the same": the key shared by the stale cache and request coalescing.

Two layers need one answer to that question, and they must never disagree:
the stale cache (which stored answer may stand in for this request) and
coalescing (which call in flight may answer this one). The key is the
effective request target (RFC 9111 §4): method, scheme, the address called
(host and port), the ``Host`` header (virtual hosts behind one address),
path and query; then one value per identity header the layer names, hashed
so that no credential is kept in clear. An absent header is a value of its
own (``None``), equal to no string, the empty one included.

Headers named by an answer's ``Vary`` are known only once the answer is there,
so they are not part of the key: each layer checks them against the answer
(:mod:`.stale_store`, :mod:`.coalesce`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from .._call import Call

#: method, address called (host:port), scheme, ``Host`` header, path and query,
#: then one digest per identity header (``None``: the request did not carry it).
Key = tuple[str, str, str, str | None, bytes, tuple[bytes | None, ...]]


def digest(value: str | None) -> bytes | None:
    """An identity header's value, hashed so that no credential sits in a key in clear."""
    return None if value is None else hashlib.sha256(value.encode("latin-1")).digest()


def request_key(call: Call, found: Mapping[bytes, str], identity: tuple[bytes, ...]) -> Key:
    """The key of ``call``'s request, with the values of the ``identity`` headers.

    ``found`` holds the request's ``host`` header and its ``identity``
    headers (lower-case names), picked by the caller in the one pass over the
    request's headers it makes anyway.
    """
    request = call.request
    url = request.url
    vhost = found.get(b"host")
    return (
        request.method,
        call.host.label,
        url.scheme,
        None if vhost is None else vhost.lower(),
        url.raw_path,
        tuple([digest(found.get(name)) for name in identity]) if identity else (),
    )


def vary_names(vary: str | None) -> list[str]:
    """The header names of a ``Vary`` value, lower-case (``"*"`` among them when it says ``*``)."""
    return [name.strip().lower() for name in vary.split(",") if name.strip()] if vary else []
