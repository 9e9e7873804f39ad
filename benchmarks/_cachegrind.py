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
from collections.abc import Callable, Iterable, Iterator
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
    """The instructions one worker run executed; ``functions`` only when asked for."""

    total: int
    functions: dict[str, int]


def count(worker_args: list[str], *, functions: bool = False) -> Count:
    """Run ``python -m benchmarks.instructions --worker <worker_args>`` under cachegrind."""
    if VALGRIND is None:
        raise RuntimeError(missing())
    env = dict(os.environ, PYTHONHASHSEED="0", PYTHONDONTWRITEBYTECODE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    with tempfile.TemporaryDirectory(prefix="cachegrind-") as tmp:
        out = Path(tmp) / "cachegrind.out"
        command = [
            VALGRIND,
            "--tool=cachegrind",
            "--cache-sim=no",
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


_SUMMARY = re.compile(r"^summary:\s+(\d+)", re.MULTILINE)


def parse(text: str, *, functions: bool = False) -> Count:
    """The total ``Ir`` of a cachegrind output file, and per function (``file:function``) if asked."""
    found = _SUMMARY.search(text)
    if found is None:
        raise ValueError("no summary line in the cachegrind output")
    per_function: dict[str, int] = defaultdict(int)
    if functions:
        name = source = "???"
        for line in text.splitlines():
            if line.startswith("fn="):
                name = line[3:]
            elif line.startswith("fl="):
                source = line[3:]
            elif line[:1].isdigit():
                _, _, ir = line.partition(" ")
                per_function[f"{_short(source)}:{name}"] += int(ir or 0)
    return Count(int(found.group(1)), dict(per_function))


def _short(source: str) -> str:
    """``.../Python-3.11.7/Objects/dictobject.c`` → ``Objects/dictobject.c``; libc paths to their file name."""
    for marker in ("/Objects/", "/Python/", "/Modules/", "/Include/", "/Parser/"):
        if marker in source:
            return marker[1:] + source.split(marker, 1)[1]
    return source.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class PerCall:
    """Instructions per call: (warm-up + N calls - warm-up alone) / N, and per function when asked."""

    instructions: float
    calls: int
    warmup_only: int
    with_calls: int
    functions: dict[str, float]


def per_call(worker_args: list[str], calls: int, *, functions: bool = False) -> PerCall:
    """Two runs of the worker: ``--calls 0`` and ``--calls N``; the difference per call."""
    base = count([*worker_args, "--calls", "0"], functions=functions)
    full = count([*worker_args, "--calls", str(calls)], functions=functions)
    by_function = {
        name: (full.functions.get(name, 0) - base.functions.get(name, 0)) / calls
        for name in set(base.functions) | set(full.functions)
    }
    return PerCall((full.total - base.total) / calls, calls, base.total, full.total, by_function)


def parallel(measure: Callable[[T], R], items: Iterable[T], jobs: int) -> list[R]:
    """``measure`` of every item, ``jobs`` at a time: counts do not depend on what else runs, only time does."""
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(measure, items))
