"""Where the instructions of ``Policy()`` and all six layers go: the report the optimisation starts from.

Three views, each per call and over bare httpx:

1. **Per layer, in instructions** (cachegrind): each layer's cost inside
   the whole chain, as all six minus all six without that layer, beside
   its cost alone (the "X only" rows minus "every layer off").
2. **Per Python function**: CPython bytecodes executed, counted with a
   ``sys.settrace`` opcode tracer over the same calls in this process. A
   bytecode is not a fixed number of instructions (a dict lookup or a
   call into C is one bytecode), but the counts are exact and repeat, and
   they name the Python functions, which cachegrind cannot see.
3. **Per C function of the interpreter** (cachegrind's per-function
   counts, as ``cg_annotate`` prints them): what kind of work it is
   (evaluating bytecode, allocating, looking up attributes, collecting
   garbage).
"""

from __future__ import annotations

import asyncio
import sys
from collections import Counter
from types import CodeType, FrameType
from typing import TYPE_CHECKING, Any

import httpx

from . import _cachegrind
from ._common import table
from .overhead import _handler, _where

if TYPE_CHECKING:
    from .instructions import Settings

#: The modules of each layer; what is in none of them is the transport's own work, or httpx's.
LAYER_MODULES = {
    "stale_cache": ("layers/stale_cache.py", "layers/stale_store.py"),
    "rate_limit": ("layers/rate_limit.py",),
    "timeout": ("layers/timeout.py", "_deadline.py"),
    "circuit_breaker": ("layers/circuit_breaker.py",),
    "retry": ("layers/retry.py",),
    "bulkhead": ("layers/bulkhead.py", "layers/adaptive.py"),
}
ALONE = {"retry": "retry only", "rate_limit": "rate limiter only", "circuit_breaker": "circuit breaker only"}
ALONE |= {"stale_cache": "stale cache only"}
TOP = 25


async def _bytecodes(name: str, calls: int, warmup: int) -> Counter[CodeType]:
    from .instructions import make

    subject = make(name, httpx.MockTransport(_handler))
    counts: Counter[CodeType] = Counter()

    def local(frame: FrameType, event: str, arg: Any) -> Any:
        if event == "opcode":
            counts[frame.f_code] += 1
        return local

    def enter(frame: FrameType, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        return local

    async with subject.client:
        for _ in range(warmup):
            await subject.call()
        sys.settrace(enter)
        try:
            for _ in range(calls):
                await subject.call()
        finally:
            sys.settrace(None)
    return counts


def bytecodes(name: str, calls: int, warmup: int) -> dict[str, float]:
    """Bytecodes per call of ``name``, by Python function (``file:line(name)``)."""
    counts = asyncio.run(_bytecodes(name, calls, warmup))
    per_function: dict[str, float] = {}
    for code, n in counts.items():
        key = f"{_where(code.co_filename)}:{code.co_firstlineno}({code.co_name})"
        per_function[key] = per_function.get(key, 0.0) + n / calls
    return per_function


def _module(function: str) -> str:
    return function.split(":", 1)[0]


def _layer(module: str) -> str:
    for layer, modules in LAYER_MODULES.items():
        if any(module == f"resilient_http/{m}" for m in modules):
            return layer
    if module == "resilient_http/_metrics.py":
        return "metrics (resilient_http/_metrics.py)"
    if module.startswith("resilient_http/"):
        return "transport (host, call record, chain)"
    if module.startswith("stdlib/"):
        return "/".join(module.split("/", 2)[:2]).removesuffix(".py")
    return module.split("/", 1)[0].removesuffix(".py")


def _extra(subject: dict[str, float], bare: dict[str, float]) -> dict[str, float]:
    return {key: subject.get(key, 0.0) - bare.get(key, 0.0) for key in set(subject) | set(bare)}


def _grouped(extra: dict[str, float], key: Any) -> dict[str, float]:
    groups: dict[str, float] = {}
    for function, value in extra.items():
        group = key(function)
        groups[group] = groups.get(group, 0.0) + value
    return dict(sorted(groups.items(), key=lambda item: -item[1]))


def _top(extra: dict[str, float]) -> list[list[Any]]:
    return [[name, value] for name, value in sorted(extra.items(), key=lambda item: -abs(item[1]))[:TOP]]


def profile(settings: Settings, counted: dict[str, _cachegrind.PerCall], ablate: bool = True) -> dict[str, Any]:
    """The three views, for every subject among ``Policy()`` and all six that the table counted."""
    from .instructions import ALL_SIX, DEFAULT, OFF, count_subject
    from .overhead import BARE

    subjects = [name for name in (DEFAULT, ALL_SIX) if name in counted]
    result: dict[str, Any] = {"calls": settings.profile_calls, "subjects": {}}
    bare_py = bytecodes(BARE, settings.profile_calls, min(settings.warmup, 100))
    result["bare_bytecodes_per_call"] = sum(bare_py.values())
    result["bare_instructions_per_call"] = counted[BARE].instructions
    for name in subjects:
        python = _extra(bytecodes(name, settings.profile_calls, min(settings.warmup, 100)), bare_py)
        c_level = _extra(counted[name].functions, counted[BARE].functions)
        result["subjects"][name] = {
            "extra_instructions": counted[name].instructions - counted[BARE].instructions,
            "extra_bytecodes": sum(python.values()),
            "bytecodes_by_layer": _grouped(python, lambda f: _layer(_module(f))),
            "bytecodes_by_module": _grouped(python, _module),
            "bytecodes_by_function": _top(python),
            "instructions_by_c_file": _grouped(c_level, lambda f: f.split(":", 1)[0]),
            "instructions_by_c_function": _top(c_level),
        }
    layers: list[dict[str, Any]] = [{"layer": field} for field in LAYER_MODULES]
    for row in layers:
        alone = ALONE.get(row["layer"])
        if alone in counted and OFF in counted:
            row["alone"] = counted[alone].instructions - counted[OFF].instructions
    if ablate and ALL_SIX in counted:
        names = [f"all six without {field}" for field in LAYER_MODULES]
        without = _cachegrind.parallel(lambda name: count_subject(name, settings), names, settings.jobs)
        for row, counts in zip(layers, without, strict=True):
            row["in_all_six"] = counted[ALL_SIX].instructions - counts.instructions
    result["layers"] = layers
    return result


def report(pr: dict[str, Any]) -> str:
    out = [
        f"\n### Where the instructions go (bare httpx: {pr['bare_instructions_per_call']:,.0f} instructions, "
        f"{pr['bare_bytecodes_per_call']:,.0f} bytecodes per call)\n",
        "Per layer, instructions per call: inside all six (all six minus all six without it) and alone (X only minus "
        "every layer off):\n",
        table(
            ("layer", "in all six", "alone"),
            (
                (
                    r["layer"],
                    f"{r['in_all_six']:+,.0f}" if "in_all_six" in r else "-",
                    f"{r['alone']:+,.0f}" if "alone" in r else "-",
                )
                for r in pr["layers"]
            ),
        ),
    ]
    for name, sp in pr["subjects"].items():
        out.append(
            f"\n#### {name}: +{sp['extra_instructions']:,.0f} instructions, +{sp['extra_bytecodes']:,.0f} bytecodes "
            "per call over bare\n"
        )
        by_layer = [(k, f"{v:+,.1f}") for k, v in sp["bytecodes_by_layer"].items() if abs(v) >= 0.5]
        out.append("Extra bytecodes per call, by layer or package:\n")
        out.append(table(("where", "+bytecodes/call"), by_layer))
        out.append("\nExtra bytecodes per call, by Python function (largest first):\n")
        out.append(table(("function", "+bytecodes/call"), ((k, f"{v:+,.1f}") for k, v in sp["bytecodes_by_function"])))
        by_file = list(sp["instructions_by_c_file"].items())[:12]
        out.append("\nExtra instructions per call, by C source file (inlined code counts where it is written):\n")
        out.append(table(("C source", "+instructions/call"), ((k, f"{v:+,.0f}") for k, v in by_file)))
        by_c = sp["instructions_by_c_function"]
        out.append("\nExtra instructions per call, by C function of the interpreter (largest first):\n")
        out.append(table(("C function", "+instructions/call"), ((k, f"{v:+,.0f}") for k, v in by_c)))
    return "\n".join(out)
