"""The command line: ``python -m resilient_http demo`` and ``python -m resilient_http check FILE``.

``demo`` shows, in twenty seconds on one machine, what the library is for:
the same traffic through a bare httpx client and through
:class:`~resilient_http.ResilientTransport`, against dependencies that fail
in every common way (see :mod:`resilient_http._demo`).

``check`` validates a policy file before a service loads it, and prints the
policy each host pattern resolves to, so that what a host table inherits
from ``[default]`` is visible rather than guessed. A bad file is reported
by key, value and line, without a traceback, and exits 2.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
import textwrap
from collections.abc import Sequence
from typing import Any

from ._config import Policy
from ._exceptions import ConfigurationError
from ._hosts import PolicyTable
from ._toml import _BARE_KEY, load_policies

_DEMO_EPILOG = """\
phases (scaled to --duration): healthy 15 %, errors 15 % (503 with Retry-After: 1 on
half the requests), quota 15 % (api traffic doubles; api serves 50/s, 429 beyond),
hang 20 % (api never answers; search is healthy), outage 15 % (both hosts: 503
without Retry-After, or a connection reset), recovery 20 %.

--policy FILE: the resilient client takes its policies from FILE instead of the
built-in ones. Name the demo's hosts "api.demo" and "search.demo" (port 80) in it,
e.g. [hosts."api.demo".retry]; wildcards such as "*.demo" work too. The demo
resolves the policy each name gets from the file and gives it to the local port
that plays that host; [default] serves any other host. `check FILE` prints what
each pattern resolves to.

Each client runs in its own process, with at most 150 calls in flight (a call due
beyond that is not started, and counted), so that both keep to the timeline at any
--duration. "calls shed" counts the calls refused locally by the circuit breaker,
the rate limiter or the bulkhead, those then answered stale included. When
resilient_http gives fewer fresh answers than bare httpx in a phase, the lines under
the table say why (a server's Retry-After holds the whole host back, say).

Exit status: 0 when the run ends on its own, 130 when interrupted (Ctrl-C ends the
run within a second, after printing the table of the calls made so far); 2 for a bad
--policy file or a --metrics-port that cannot be served.
"""


class PolicyFileError(Exception):
    """A policy file that cannot be used; the message says where and why."""


def load_policy_file(path: str) -> tuple[dict[str, Policy], Policy]:
    """``(policies, default)`` from the file at ``path``, or :class:`PolicyFileError` saying where and why."""
    try:
        return load_policies(path)
    except ConfigurationError as exc:
        raise PolicyFileError(str(exc)) from None


def _quoted(segment: str) -> str:
    return segment if _BARE_KEY.fullmatch(segment) else json.dumps(segment)


def _value(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, frozenset | set):
        return "[" + ", ".join(str(v) for v in sorted(value)) + "]"
    return str(value)


def describe_policy(policy: Policy) -> list[str]:
    """One line per layer: its settings as ``key=value``, or ``off``."""
    lines = []
    for layer in dataclasses.fields(policy):
        settings = getattr(policy, layer.name)
        if settings is None:
            lines.append(f"  {layer.name:<16} off")
            continue
        parts = []
        for setting in dataclasses.fields(settings):
            value = getattr(settings, setting.name)
            if dataclasses.is_dataclass(value):
                parts += [
                    f"{setting.name}.{f.name}={_value(getattr(value, f.name))}" for f in dataclasses.fields(value)
                ]
            elif setting.name == "budget" and value is None:
                parts.append("budget=off")
            else:
                parts.append(f"{setting.name}={_value(value)}")
        wrapped = textwrap.wrap(" ".join(parts), width=100, break_long_words=False, break_on_hyphens=False)
        lines.append(f"  {layer.name:<16} " + f"\n  {'':<16} ".join(wrapped))
    return lines


def _check(args: argparse.Namespace) -> int:
    policies, default = load_policy_file(args.file)
    patterns = len(policies)
    print(f"{args.file}: valid; a default and {patterns} host pattern{'' if patterns == 1 else 's'}")
    for title, policy in [("[default]  (hosts no pattern matches)", default)] + [
        (f"[hosts.{_quoted(pattern)}]", policy) for pattern, policy in policies.items()
    ]:
        print(f"\n{title}")
        print("\n".join(describe_policy(policy)))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from ._demo import DemoError, run_demo
    from ._demo_report import API, SEARCH
    from ._demo_scenario import demo_policies

    policies = demo_policies() if args.policy is None else load_policy_file(args.policy)
    table = PolicyTable(*policies)
    print(f"resilient_http policies ({args.policy or 'built in'}):")
    for host in (API, SEARCH):
        print(f"[hosts.{_quoted(host)}]")
        print("\n".join(describe_policy(table.resolve(host, 80))))
    sys.stdout.flush()
    try:
        interrupted = asyncio.run(run_demo(args.duration, policies, metrics_port=args.metrics_port, out=sys.stdout))
    except DemoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 130 if interrupted else 0


def seconds(text: str) -> float:
    """An argparse type: a duration the demo can run for."""
    value = float(text)
    if not 0.5 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"must be between 0.5 and 3600 seconds (got {text})")
    return value


def port(text: str) -> int:
    """An argparse type: a TCP port, 0 for any free one."""
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number, 0 for any free one (got {text})")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m resilient_http", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="the same traffic through bare httpx and resilient_http, against failing local upstreams",
        description="The same open-loop traffic through a bare httpx.AsyncClient and through\n"
        "ResilientTransport, each against its own local upstreams that go through the same\n"
        "failures at the same moments; a line a second, then a table that compares them.",
        epilog=_DEMO_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--duration", type=seconds, default=20.0, metavar="SECONDS", help="length of the run (20)")
    demo.add_argument("--policy", metavar="FILE", help="policy TOML for the resilient client (see below)")
    demo.add_argument(
        "--metrics-port",
        type=port,
        metavar="PORT",
        help="serve the transport's Prometheus metrics at http://127.0.0.1:PORT/metrics while it runs (0: any port)",
    )
    demo.set_defaults(run=_demo)
    check = commands.add_parser(
        "check",
        help="validate a policy TOML file and print the policy of every host pattern",
        description="Validate a policy TOML file and print what [default] and each host pattern resolve to. "
        "Exit 0 when valid, 2 with the key, value and line on stderr when not.",
    )
    check.add_argument("file", metavar="FILE")
    check.set_defaults(run=_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; the exit status is returned."""
    args = _parser().parse_args(argv)
    try:
        status: int = args.run(args)
    except PolicyFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into head, say: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:  # Ctrl-C before the demo's own handler is in place, or after
        print("\ninterrupted", file=sys.stderr)
        return 130
    return status


if __name__ == "__main__":
    sys.exit(main())
