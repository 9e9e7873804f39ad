"""resilient_http: an asyncio-native resilience layer for outbound HTTP, as an httpx transport."""

from ._call import CallInfo as CallInfo
from ._call import Wait as Wait
from ._client import ResilientClient as ResilientClient
from ._config import AdaptiveLimit as AdaptiveLimit
from ._config import BulkheadPolicy as BulkheadPolicy
from ._config import CircuitBreakerPolicy as CircuitBreakerPolicy
from ._config import CoalescePolicy as CoalescePolicy
from ._config import HedgePolicy as HedgePolicy
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
    "HedgePolicy",
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
