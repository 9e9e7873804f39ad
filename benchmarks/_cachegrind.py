"""Counting the CPU instructions a Python process executes, with valgrind's cachegrind.

Instruction counts repeat from run to run where wall time does not: other
processes on a shared machine slow a run down, but do not make it execute
more instructions. A measurement is two runs of the same worker process,
one that only warms up and one that warms up and then makes N calls; the
difference over N is the cost of one call, start-up, imports, warm-up and
exit subtracted. ``--cache-sim=no`` counts instructions only (``Ir``),
several times faster than simulating the caches.

The runs are made alike: a fixed ``PYTHONHASHSEED``, the same command line
and environment, and the working directory and output files kept out of
``sys.path`` (Python lists the directories on its path while importing, so
a directory that fills with output files changes the count of the next run).
"""

from __future__ import annotations

import gc
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from ._common import HERE

VALGRIND = shutil.which("valgrind")
T = TypeVar("T")
R = TypeVar("R")
ROOT = HERE.parent


@contextmanager
def frozen_heap() -> Iterator[None]:
    """Collect, then leave what exists out of later collections until the block ends.

    A full collection walks every object the process holds, the imported
    modules' included; freezing them after the warm-up keeps such a walk
    out of the counted calls, while their own garbage is still collected.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def missing() -> str | None:
    """Why instructions cannot be counted here, or ``None`` when they can."""
    if VALGRIND is None:
        return "valgrind is not installed (apt-get install valgrind)"
    if sys.platform != "linux":
        return f"cachegrind counts are taken on Linux only, not {sys.platform}"
    return None


@dataclass(frozen=True)
class Count:
    """The instructions one worker run executed; ``functions`` only when asked for.

    ``events`` holds every event of the summary by cachegrind's name (``Ir``
    alone, or with ``simulate`` the cache misses and branch mispredictions
    too: ``I1mr``, ``D1mr``, ``D1mw``, ``ILmr``, ``DLmr``, ``DLmw``, ``Bcm``, ``Bim``).
    """

    total: int
    functions: dict[str, int]
    events: dict[str, int]


def count(worker_args: list[str], *, functions: bool = False, simulate: bool = False) -> Count:
    """Run ``python -m benchmarks.instructions --worker <worker_args>`` under cachegrind.

    ``simulate`` also simulates the caches and the branch predictor (several
    times slower): what a count of instructions cannot see.
    """
    if VALGRIND is None:
        raise RuntimeError(missing())
    env = dict(os.environ, PYTHONHASHSEED="0", PYTHONDONTWRITEBYTECODE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    with tempfile.TemporaryDirectory(prefix="cachegrind-") as tmp:
        out = Path(tmp) / "cachegrind.out"
        command = [
            VALGRIND,
            "--tool=cachegrind",
            *(("--cache-sim=yes", "--branch-sim=yes") if simulate else ("--cache-sim=no",)),
            f"--cachegrind-out-file={out}",
            sys.executable,
            "-m",
            "benchmarks.instructions",
            "--worker",
            *worker_args,
        ]
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0 or not out.exists():
            raise RuntimeError(
                f"cachegrind run failed ({done.returncode}): {' '.join(worker_args)}\n{done.stderr[-3000:]}"
            )
        return parse(out.read_text(encoding="utf-8", errors="replace"), functions=functions)


_SUMMARY = re.compile(r"^summary:\s+(\d+)(.*)$", re.MULTILINE)
_EVENTS = re.compile(r"^events:\s+(.*)$", re.MULTILINE)


def parse(text: str, *, functions: bool = False) -> Count:
    """The total ``Ir`` of a cachegrind output file, every event's, and per function (``file:function``) if asked."""
    found = _SUMMARY.search(text)
    names = _EVENTS.search(text)
    if found is None or names is None:
        raise ValueError("no summary line in the cachegrind output")
    events = dict(zip(names.group(1).split(), map(int, (found.group(1), *found.group(2).split())), strict=False))
    per_function: dict[str, int] = defaultdict(int)
    if functions:
        name = source = "???"
        for line in text.splitlines():
            if line.startswith("fn="):
                name = line[3:]
            elif line.startswith("fl="):
                source = line[3:]
            elif line[:1].isdigit():
                fields = line.split()  # the line's number, then its events in order: Ir first
                per_function[f"{_short(source)}:{name}"] += int(fields[1]) if len(fields) > 1 else 0
    return Count(int(found.group(1)), dict(per_function), events)


def _short(source: str) -> str:
    """``.../Python-3.11.7/Objects/dictobject.c`` → ``Objects/dictobject.c``; libc paths to their file name."""
    for marker in ("/Objects/", "/Python/", "/Modules/", "/Include/", "/Parser/"):
        if marker in source:
            return marker[1:] + source.split(marker, 1)[1]
    return source.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class PerCall:
    """Instructions per call: (warm-up + N calls - warm-up alone) / N; per function and per event when asked."""

    instructions: float
    calls: int
    warmup_only: int
    with_calls: int
    functions: dict[str, float]
    events: dict[str, float]


def per_call(worker_args: list[str], calls: int, *, functions: bool = False, simulate: bool = False) -> PerCall:
    """Two runs of the worker: ``--calls 0`` and ``--calls N``; the difference per call."""
    base = count([*worker_args, "--calls", "0"], functions=functions, simulate=simulate)
    full = count([*worker_args, "--calls", str(calls)], functions=functions, simulate=simulate)
    by_function = {
        name: (full.functions.get(name, 0) - base.functions.get(name, 0)) / calls
        for name in set(base.functions) | set(full.functions)
    }
    events = {name: (full.events[name] - base.events.get(name, 0)) / calls for name in full.events}
    return PerCall((full.total - base.total) / calls, calls, base.total, full.total, by_function, events)


#: Cycles charged per event by :func:`cycles`: a first-level miss served by the next level, a last-level
#: miss served by memory, a mispredicted branch; typical of current x86 cores, not this machine's own.
CYCLES = {"L1": 12, "LL": 200, "branch": 16}


def cycles(events: Mapping[str, float]) -> float:
    """A rough model of the cycles behind a simulated count: one per instruction, plus each miss at :data:`CYCLES`.

    Not a measurement: a way to see whether misses weigh on the chain more
    than on bare httpx, which the instruction count alone cannot show.
    """
    l1 = events.get("I1mr", 0) + events.get("D1mr", 0) + events.get("D1mw", 0)
    ll = events.get("ILmr", 0) + events.get("DLmr", 0) + events.get("DLmw", 0)
    branches = events.get("Bcm", 0) + events.get("Bim", 0)
    return events["Ir"] + CYCLES["L1"] * l1 + CYCLES["LL"] * ll + CYCLES["branch"] * branches


def parallel(measure: Callable[[T], R], items: Iterable[T], jobs: int) -> list[R]:
    """``measure`` of every item, ``jobs`` at a time: counts do not depend on what else runs, only time does."""
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(measure, items))
