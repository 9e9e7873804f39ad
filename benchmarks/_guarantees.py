"""What each guarantee of the chain costs per call, in instructions, in every configuration of the table.

    python -m benchmarks.instructions --guarantees [--jobs 2]

Issue 12 asks, for each target missed, for the measured cost of what
remains. Most of what remains is not the layers' logic but three things
every call pays for a guarantee the library keeps:

- ``metrics``: the per-call and per-try Prometheus updates (a counter and
  a duration histogram each), which every layer's decisions are read by;
- ``timer``: the attempt's timer, which keeps anyio's rule of never
  cancelling through a shield (issue 5), started and ended on every try;
- ``copy``: the request each attempt sends, a shallow copy carrying its
  own httpx timeouts, so that httpx's implicit 5 s cannot cut an attempt
  short and the caller's request is never written to.

Each is counted by taking it away, in the counted worker process only:
the configuration is counted as it is and with the guarantee replaced by
a stub (the metric updates by a method that does nothing, the timer by a
shared one that is never armed, the copy by the caller's own request), and
the difference is what the guarantee costs. The stubs keep their call, so
each difference is a floor: the work, not the call that asks for it. The
last column takes all three away at once: what the configuration would
cost without any of them, against its target. Nothing here changes the
library; a stubbed worker is wrong on purpose and only ever counted.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from . import _cachegrind
from ._common import table

if TYPE_CHECKING:
    from .instructions import Settings

#: The guarantees that can be taken away, in the order the report shows them.
STUBS = ("metrics", "timer", "copy")
#: The label of the count with every stub at once.
ALL = "+".join(STUBS)


def apply(names: Iterable[str]) -> None:
    """Replace each named guarantee by its stub, in this process (a counted worker's) only."""
    names = set(names)
    unknown = names - set(STUBS)
    if unknown:
        raise ValueError(f"no such stub: {', '.join(sorted(unknown))} (known: {', '.join(STUBS)})")
    if "metrics" in names:
        from resilient_http._metrics import HostMetrics

        def nothing(self: HostMetrics, *args: object) -> None:
            return None

        for method in ("request", "answered", "tried", "attempt"):
            setattr(HostMetrics, method, nothing)
    if "timer" in names:
        from resilient_http import _watchdog

        idle = object.__new__(_watchdog.Timer)  # never armed, never delivers: what an attempt marks done
        idle._task = idle._outer = None
        idle._cancelling = 0
        idle._deadline = math.inf
        idle.delivered = idle.done = False

        def start(self: _watchdog.Watchdog, seconds: float) -> _watchdog.Timer:
            return idle

        _watchdog.Watchdog.start = start  # type: ignore[method-assign]
    if "copy" in names:
        import httpx

        from resilient_http import _deadline
        from resilient_http.layers import timeout

        unchanged = _deadline.Operations(_deadline._NONE)

        def operations(caller: object) -> _deadline.Operations:
            return unchanged

        def derive(request: httpx.Request, timeouts: _deadline.Operations) -> httpx.Request:
            return request

        setattr(timeout, "operations", operations)  # noqa: B010 - the names the attempt calls them by
        setattr(timeout, "derive", derive)  # noqa: B010


def measure(settings: Settings, rows: Iterable[str]) -> dict[str, Any]:
    """Every row counted as it is, with each stub, and with all of them; bare httpx once for the ratios."""
    from .instructions import TARGETS
    from .overhead import BARE
    from .overhead import _calls_for as calls_for

    rows = list(rows)
    # The smoke mode only checks that a stubbed worker runs and is counted: all the stubs at once.
    variants = [(), STUBS] if settings.smoke else [(), *((name,) for name in STUBS), STUBS]
    jobs = [(BARE, ())] + [(row, variant) for row in rows for variant in variants]

    def count(job: tuple[str, tuple[str, ...]]) -> float:
        name, stubs = job
        args = ["--subject", name, "--warmup", str(calls_for(name, settings.warmup))]
        for stub in stubs:
            args += ["--stub", stub]
        return _cachegrind.per_call(args, calls_for(name, settings.calls)).instructions

    found = dict(zip(jobs, _cachegrind.parallel(count, jobs, settings.jobs), strict=True))
    bare = found[BARE, ()]
    result: dict[str, Any] = {"calls": settings.calls, "bare": bare, "rows": []}
    for row in rows:
        whole = found[row, ()]
        without_all = found[row, STUBS]
        entry: dict[str, Any] = {
            "name": row,
            "instructions": whole,
            "over_bare": whole - bare,
            "costs": {stub: whole - found[row, (stub,)] for stub in STUBS if (row, (stub,)) in found},
            "without_all": without_all,
            "without_all_ratio": without_all / bare,
        }
        if row in TARGETS:
            entry["target"] = TARGETS[row]
            entry["met_without_all"] = without_all / bare <= TARGETS[row]
        result["rows"].append(entry)
    return result


def report(result: dict[str, Any]) -> str:
    header = (
        f"\n### What each guarantee costs (cachegrind, {result['calls']} calls; instructions per call the "
        f"configuration saves with it stubbed out; bare httpx {result['bare']:,.0f})\n"
    )
    headers = ["configuration", "+ over bare", *STUBS, f"without {ALL}", "target"]
    lines = []
    for row in result["rows"]:
        line: list[object] = [row["name"], f"{row['over_bare']:+,.0f}"]
        line += [f"{row['costs'][stub]:,.0f}" if stub in row["costs"] else "-" for stub in STUBS]
        line += [f"{row['without_all_ratio']:.3f}x ({row['without_all'] - result['bare']:+,.0f})"]
        line += [f"≤ {row['target']}x" if "target" in row else ""]
        lines.append(line)
    return header + table(headers, lines)
