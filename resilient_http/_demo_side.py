"""One side of the demo in a process of its own: one client, its two upstreams, and the calls it makes.

``python -m resilient_http demo`` starts this module twice, once for bare
httpx and once for resilient_http, so that neither client's work can slow
the other or the timeline: on one event loop, bare httpx's own pool queue
(each request that joins or leaves it makes httpcore match every queued
request against every connection) took the loop from both clients and from
the timeline as soon as a hung host let calls pile up, and Ctrl-C with it.

Each side also starts at most :data:`MAX_IN_FLIGHT` calls at once. A call
due when that many are in flight is not started, and counted as such: it
keeps any client's backlog, and the CPU it costs, small enough that every
side starts its calls when the schedule says, at any ``--duration``.

The side talks to the demo over its standard streams, one JSON object a
line. It reads its settings, then ``{"start": T}``: the timeline begins at
``T`` on ``time.monotonic()`` (a system-wide clock), on which it switches
its upstreams through the phases and starts its calls, as the other side
does at the same moments. Every second it writes the calls that finished
(:class:`~resilient_http._demo_report.Record`, times from ``T``) and what
its upstreams received; at the end, or as soon as it reads ``stop`` or its
input closes, it writes ``{"end": ...}`` and closes everything it opened.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from contextlib import AsyncExitStack
from typing import Any

import httpx
from prometheus_client import CollectorRegistry, start_http_server

from ._call import CallInfo
from ._demo_report import API, Record, shed_by
from ._demo_scenario import DRAIN, MAX_IN_FLIGHT, QUOTA, RATES, SURGE, Timeline, policies_from_wire
from ._hosts import PolicyTable
from ._metrics import outcome_of_exception
from ._transport import ResilientTransport
from ._upstream import Upstream

STOP_WITHIN = 0.3  # seconds that closing down may take once the report is written


def _send(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message, separators=(",", ":")) + "\n")
    sys.stdout.flush()


class Side:
    """One client, its own pair of upstreams, and what its calls did."""

    def __init__(self, client: httpx.AsyncClient, upstreams: Mapping[str, Upstream], start: float) -> None:
        self.client = client
        self.upstreams = upstreams
        self.start = start
        self.records: list[Record] = []
        self.reported = 0  # records already written out
        self.tasks: set[asyncio.Task[None]] = set()
        self.due = 0
        self.started = 0
        self.late = 0.0  # the latest a call was started after its moment
        self.late_at = 0.0

    def launch(self, host: str, target: str, due: float) -> None:
        """Start one call in its own task, unless :data:`MAX_IN_FLIGHT` are in flight."""
        self.due += 1
        late = time.monotonic() - due
        if late > self.late:
            self.late, self.late_at = late, due - self.start
        if len(self.tasks) >= MAX_IN_FLIGHT:
            return
        task = asyncio.create_task(self._call(host, self.upstreams[host].url + target))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        self.started += 1

    async def _call(self, host: str, url: str) -> None:
        started = time.monotonic() - self.start
        outcome: httpx.Response | Exception
        try:
            outcome = await self.client.get(url)
        except Exception as exc:  # every failure is a data point; the table lists them by name
            outcome = exc
        self.records.append(record(host, started, time.monotonic() - self.start, outcome))

    def received(self, since: float = -math.inf, until: float = math.inf) -> int:
        """Requests this side's upstreams received in ``[since, until)``, on the timeline."""
        return sum(up.received(self.start + since, self.start + until) for up in self.upstreams.values())

    def report(self) -> dict[str, Any]:
        """The records not yet written out, and the counts so far."""
        records = self.records[self.reported :]
        self.reported += len(records)
        answered: Counter[str] = Counter()
        for upstream in self.upstreams.values():
            answered += upstream.answered
        return {
            "records": records,
            "due": self.due,
            "started": self.started,
            "attempts": self.received(),
            "answered": answered,
            "late": self.late,
            "late_at": self.late_at,
        }


def record(host: str, started: float, finished: float, outcome: httpx.Response | Exception) -> Record:
    """What a call's caller saw: its answer or exception, whether it was answered stale, and whether it was shed.

    Shed is :func:`~resilient_http._demo_report.shed_by`'s definition, read
    from the call's own outcome: the exception it raised, or the
    ``stale_reason`` of its ``CallInfo``.
    """
    if isinstance(outcome, Exception):
        shed = shed_by(outcome_of_exception(outcome))
        return Record(host, started, finished, False, False, type(outcome).__name__, shed)
    info = outcome.extensions.get("resilient_http")
    stale = isinstance(info, CallInfo) and info.stale
    reason = info.stale_reason if isinstance(info, CallInfo) else None
    label = "stale" if stale else str(outcome.status_code)
    return Record(host, started, finished, outcome.is_success, stale, label, shed_by(label, reason), reason)


async def _drive(side: Side, host: str, timeline: Timeline) -> None:
    """Start calls to ``host`` on schedule, late or not: open loop."""
    due, number = timeline.start, 0
    while (phase := timeline.at(due)) is not None:
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        target = f"/catalog/{number % 20}" if host == API else f"/search?q=term{number % 7}"
        side.launch(host, target, due)
        number += 1
        rate = RATES[host] * (SURGE if phase.surge and host == API else 1.0)
        due += 1.0 / rate


async def _switch_phases(side: Side, timeline: Timeline) -> None:
    for begin, _, phase in timeline.bounds:
        await asyncio.sleep(max(0.0, begin - time.monotonic()))
        for host, upstream in side.upstreams.items():
            upstream.set_mode(phase.api if host == API else phase.search)


async def _report(side: Side, timeline: Timeline, extra: Callable[[], dict[str, Any]]) -> None:
    """Every whole second of the timeline: the calls that finished, and the upstreams' arrivals in that second."""
    for second in range(1, math.floor(timeline.end - timeline.start + 1e-6) + 1):
        await asyncio.sleep(max(0.0, timeline.start + second - time.monotonic()))
        _send({"second": second, "received": side.received(second - 1.0, second), **side.report(), **extra()})


def _watch_input(loop: asyncio.AbstractEventLoop, lines: asyncio.Queue[str | None]) -> None:
    """Pass the lines of standard input to the loop; ``None`` once it closes (the demo has gone).

    It reads the file descriptor itself: a daemon thread blocked in
    ``sys.stdin`` would hold its lock while the interpreter shuts down.
    """
    pending = b""
    while chunk := os.read(0, 65536):
        *complete, pending = (pending + chunk).split(b"\n")
        for line in complete:
            loop.call_soon_threadsafe(lines.put_nowait, line.decode().strip())
    with contextlib.suppress(RuntimeError):  # the loop has closed
        loop.call_soon_threadsafe(lines.put_nowait, None)


async def _until_stopped(lines: asyncio.Queue[str | None]) -> None:
    while await lines.get() not in ("stop", None):
        pass


def _raise_failures(tasks: list[asyncio.Task[None]]) -> None:
    """A task of the demo's own that failed is a bug in the demo: raise it."""
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]


async def _play(
    side: Side, timeline: Timeline, lines: asyncio.Queue[str | None], extra: Callable[[], dict[str, Any]]
) -> None:
    """Run the timeline, let the calls still in flight finish, and write the end; sooner when told to stop."""
    stopped = asyncio.ensure_future(_until_stopped(lines))
    background = [
        asyncio.create_task(_switch_phases(side, timeline)),
        asyncio.create_task(_report(side, timeline, extra)),
        *(asyncio.create_task(_drive(side, host, timeline)) for host in RATES),
    ]
    try:
        timeline_over: asyncio.Future[Any] = asyncio.gather(*background, return_exceptions=True)
        await asyncio.wait([timeline_over, stopped], return_when=asyncio.FIRST_COMPLETED)
        _raise_failures(background)
        if not stopped.done() and side.tasks:
            calls: asyncio.Future[Any] = asyncio.gather(*side.tasks, return_exceptions=True)
            await asyncio.wait([calls, stopped], timeout=DRAIN, return_when=asyncio.FIRST_COMPLETED)
        _send({"end": {**side.report(), **extra()}})
    finally:
        left = [stopped, *background, *side.tasks]
        for task in left:
            task.cancel()
        await asyncio.wait(left, timeout=STOP_WITHIN)


async def _run(settings: dict[str, Any], lines: asyncio.Queue[str | None]) -> None:
    registry = CollectorRegistry()
    async with AsyncExitStack() as stack:
        seed = settings["seed"]
        upstreams = {host: await stack.enter_async_context(Upstream(host, quota=QUOTA, seed=seed)) for host in RATES}
        ready: dict[str, Any] = {"upstreams": {host: up.url for host, up in upstreams.items()}}
        extra: Callable[[], dict[str, Any]] = dict
        if settings["policies"] is None:
            client = httpx.AsyncClient(timeout=5)
        else:
            named, default = policies_from_wire(settings["policies"])
            table = PolicyTable(named, default)
            transport = ResilientTransport(
                {f"127.0.0.1:{up.port}": table.resolve(host, 80) for host, up in upstreams.items()},
                default=default,
                registry=registry,
            )
            client = httpx.AsyncClient(transport=transport)

            def extra() -> dict[str, Any]:
                return {"openings": int(_metric_sum(registry, "resilient_http_circuit_opened_total"))}

            port = settings["metrics_port"]
            if port is not None:
                try:
                    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
                except OSError as exc:
                    _send({"error": f"cannot serve metrics on 127.0.0.1:{port}: {exc.strerror}"})
                    return
                stack.callback(thread.join)
                stack.callback(server.server_close)
                stack.callback(server.shutdown)
                ready["metrics"] = f"http://127.0.0.1:{server.server_port}/metrics"
        await stack.enter_async_context(client)
        _send({"ready": ready})
        line = await lines.get()
        if line is None or line == "stop":
            return
        timeline = Timeline(json.loads(line)["start"], settings["duration"])
        await _play(Side(client, upstreams, timeline.start), timeline, lines, extra)


def _metric_sum(registry: CollectorRegistry, name: str) -> float:
    return sum(s.value for family in registry.collect() for s in family.samples if s.name == name)


async def _main() -> None:
    lines: asyncio.Queue[str | None] = asyncio.Queue()
    threading.Thread(target=_watch_input, args=(asyncio.get_running_loop(), lines), daemon=True).start()
    first = await lines.get()
    if first is not None:
        await _run(json.loads(first), lines)


def main() -> None:
    """Play one side; the demo that started this process says when to begin and when to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the demo's to handle: it says "stop" here
    asyncio.run(_main())


if __name__ == "__main__":
    main()
