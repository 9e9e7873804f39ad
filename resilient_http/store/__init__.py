"""Fleet state: what every worker calling the same upstreams must agree on, in one place.

What is shared, per upstream (``host:port``):

- the **rate limit**, as one GCRA theoretical arrival time per limit: the
  fleet, not each worker, sends at most ``burst`` at once and ``rate`` a
  second; and the limit's *line*, the last turn given to a refused worker;
- the server's **hold** (a 429's or 503's ``Retry-After``): once one worker
  hears it, no worker sends before it ends;
- the **breaker's record**: "open until T, round R", and fleet-wide trial
  slots, so that a recovering host gets ``half_open_calls`` trials from the
  fleet rather than from each worker. Deciding to open stays local (a
  worker's own failures); what is shared is the verdict;
- the **live workers**, a heartbeat each, so a worker can take its share of
  a fleet-wide number (the retry budget's floor, the rate when it must fall
  back to local limits). Until the store has counted them, a worker takes
  the fleet to have the store's ``workers`` (the expected size: 8 by default
  for Redis), never to be alone.

How: :class:`MemoryStore` keeps it in this process (the default: one code
path whether or not state is shared); :class:`RedisStore` in Redis or a
Redis Cluster. Every key of an upstream carries the hash tag
``{prefix:host:port}``, so its scripts touch one slot, and every write sets
an expiry: nothing needs cleaning up, and a worker that dies leaves nothing
that outlives its TTL.

Why GCRA in Lua: a rate decision is a read, a comparison and a write, and
two workers must not both take the last token. A Lua script runs them as
one atomic step and one round trip, and reads the time from Redis ``TIME``:
workers' clocks never enter a decision, so skew between machines changes
nothing. GCRA keeps a single number per limit (no per-call entries, no
fixed-window bursts at window edges). A refusal takes no token but gives
the caller a *turn*, when to ask again: turns are handed out one token's
interval apart after the next free slot, so the workers refused come back
one at a time rather than all at once when a slot frees (where one of them
gets it and the others ask again, every token). A worker that has been
refusing calls asks for its next turn with its next slot. A saturated fleet
thus makes about one round trip per call sent, not per call; the turns
change when workers ask, never what the store allows, so the limit stays
exact. Every answer is a duration from the server's now, never an instant.

What happens on failure: each operation has its own short timeout
(50 ms by default), and a few more turns of the event loop when it runs
out, so that an answer that arrived while this process's loop was late is
read rather than thrown away. A failure, or the store being skipped,
answers :data:`UNAVAILABLE` and never raises: the caller decides with its
local state. After a few failures in a row the store is skipped for a cooldown,
then one operation probes it; sharing resumes by itself when Redis answers
again. The outage is logged once at WARNING; every answer not given counts
in ``resilient_http_store_fallbacks_total``, and each layer that then
decides alone emits a ``StoreFallback`` event.
"""

from ._base import UNAVAILABLE as UNAVAILABLE
from ._base import Admission as Admission
from ._base import Circuit as Circuit
from ._base import CircuitState as CircuitState
from ._base import Maybe as Maybe
from ._base import Store as Store
from ._base import Unavailable as Unavailable
from ._memory import MemoryStore as MemoryStore
from ._open import open_store as open_store
from ._open import open_store_table as open_store_table
from ._redis import RedisStore as RedisStore

__all__ = [
    "UNAVAILABLE",
    "Admission",
    "Circuit",
    "CircuitState",
    "Maybe",
    "MemoryStore",
    "RedisStore",
    "Store",
    "Unavailable",
    "open_store",
    "open_store_table",
]
