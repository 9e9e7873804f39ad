"""resilient_http: an asyncio-native resilience layer for outbound HTTP, as an httpx transport.

Names are imported when first used (PEP 562), so that ``import
resilient_http`` needs neither HTTP package and ``resilient_http.httpx2``
works where only httpx2 is installed: the names of this module speak httpx,
those of :mod:`resilient_http.httpx2` speak httpx2.
"""

import typing

if typing.TYPE_CHECKING:
    from ._call import CallInfo as CallInfo
    from ._call import Wait as Wait
    from ._client import ResilientClient as ResilientClient
    from ._config import AdaptiveLimit as AdaptiveLimit
    from ._config import BulkheadPolicy as BulkheadPolicy
    from ._config import CircuitBreakerPolicy as CircuitBreakerPolicy
    from ._config import CoalescePolicy as CoalescePolicy
    from ._config import Policy as Policy
    from ._config import RateLimitPolicy as RateLimitPolicy
    from ._config import RetryBudget as RetryBudget
    from ._config import RetryPolicy as RetryPolicy
    from ._config import StaleCachePolicy as StaleCachePolicy
    from ._config import TimeoutPolicy as TimeoutPolicy
    from ._exceptions import BulkheadFullError as BulkheadFullError
    from ._exceptions import CircuitOpenError as CircuitOpenError
    from ._exceptions import ConfigurationError as ConfigurationError
    from ._exceptions import ConnectDeadlineExceededError as ConnectDeadlineExceededError
    from ._exceptions import DeadlineExceededError as DeadlineExceededError
    from ._exceptions import PoolDeadlineExceededError as PoolDeadlineExceededError
    from ._exceptions import RateLimitedError as RateLimitedError
    from ._exceptions import ReadDeadlineExceededError as ReadDeadlineExceededError
    from ._exceptions import RejectedError as RejectedError
    from ._exceptions import ResilienceError as ResilienceError
    from ._exceptions import WriteDeadlineExceededError as WriteDeadlineExceededError
    from ._transport import ResilientTransport as ResilientTransport
    from ._transport import call_info as call_info

__version__ = "0.1.0"

__all__ = [
    "AdaptiveLimit",
    "BulkheadFullError",
    "BulkheadPolicy",
    "CallInfo",
    "CircuitBreakerPolicy",
    "CircuitOpenError",
    "CoalescePolicy",
    "ConfigurationError",
    "ConnectDeadlineExceededError",
    "DeadlineExceededError",
    "Policy",
    "PoolDeadlineExceededError",
    "RateLimitPolicy",
    "RateLimitedError",
    "ReadDeadlineExceededError",
    "RejectedError",
    "ResilienceError",
    "ResilientClient",
    "ResilientTransport",
    "RetryBudget",
    "RetryPolicy",
    "StaleCachePolicy",
    "TimeoutPolicy",
    "Wait",
    "WriteDeadlineExceededError",
    "call_info",
]


#: Where each public name lives.
_WHERE = {
    "CallInfo": "._call",
    "Wait": "._call",
    "ResilientClient": "._client",
    "AdaptiveLimit": "._config",
    "BulkheadPolicy": "._config",
    "CircuitBreakerPolicy": "._config",
    "CoalescePolicy": "._config",
    "Policy": "._config",
    "RateLimitPolicy": "._config",
    "RetryBudget": "._config",
    "RetryPolicy": "._config",
    "StaleCachePolicy": "._config",
    "TimeoutPolicy": "._config",
    "BulkheadFullError": "._exceptions",
    "CircuitOpenError": "._exceptions",
    "ConfigurationError": "._exceptions",
    "ConnectDeadlineExceededError": "._exceptions",
    "DeadlineExceededError": "._exceptions",
    "PoolDeadlineExceededError": "._exceptions",
    "RateLimitedError": "._exceptions",
    "ReadDeadlineExceededError": "._exceptions",
    "RejectedError": "._exceptions",
    "ResilienceError": "._exceptions",
    "WriteDeadlineExceededError": "._exceptions",
    "ResilientTransport": "._transport",
    "call_info": "._transport",
}


def __getattr__(name: str) -> typing.Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        # A relative import statement, not importlib: under the httpx2 flavour this module's
        # builtins route it, and the shared modules (policies) stay the ones everybody uses.
        value = getattr(__import__(where[1:], globals(), None, [name], 1), name)
    except ModuleNotFoundError as exc:
        if exc.name not in ("httpx", "httpx2"):
            raise
        raise ImportError(
            f"resilient_http.{name} needs {exc.name}: pip install 'resilient-http-transport[{exc.name}]'"
            + (", or use resilient_http.httpx2 with httpx2" if exc.name == "httpx" else "")
        ) from exc
    globals()[name] = value  # the next access is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
