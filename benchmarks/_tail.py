"""An HTTP/1.1 keep-alive server with a long tail, in its own process, for the hedging benchmark.

    python benchmarks/_tail.py MEDIAN SLOW_SHARE SLOW_FACTOR SEED [deck|draw]

Each request is answered after ``MEDIAN`` seconds (jittered by ±20 %), or,
for a share ``SLOW_SHARE`` of them, after ``SLOW_FACTOR`` times that: the
upstream of "The Tail at Scale", where a slow answer is bad luck (a GC
pause, a busy disk), not a slow request, so a second copy of it is most
likely fast. The slow ones are dealt from shuffled decks of 1,000 requests
holding exactly ``SLOW_SHARE`` of them: at random, in runs of bad luck as
well, but exactly that share, so the seed decides where the slow answers
fall and not how many there are (a plain 5 % draw with seed 0 made 5.64 %
of the measured requests slow; ``draw`` still draws each request's luck on
its own). ``GET /stats`` answers the number of
requests served so far (``/stats`` itself aside) and ``GET /reset`` zeroes
it: the extra load of hedging is counted where it lands. The process prints
``PORT <n>`` once ready and exits when its standard input closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import subprocess
import sys
from typing import Any

#: Requests per deck: exactly ``slow_share`` of each thousand are slow.
_DECK = 1000


class _Tail:
    def __init__(self, median: float, slow_share: float, slow_factor: float, seed: int, deck: bool) -> None:
        self.median = median
        self.slow_share = slow_share
        self.slow_factor = slow_factor
        self.random = random.Random(seed)
        self.requests = 0
        self.dealt = deck
        self.deck: list[bool] = []

    def slow(self) -> bool:
        if not self.dealt:
            return self.random.random() < self.slow_share
        if not self.deck:
            slow = round(_DECK * self.slow_share)
            self.deck = [True] * slow + [False] * (_DECK - slow)
            self.random.shuffle(self.deck)
        return self.deck.pop()

    def latency(self) -> float:
        seconds = self.median * self.random.uniform(0.8, 1.2)
        return seconds * self.slow_factor if self.slow() else seconds

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(
            ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.CancelledError
        ):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ", 2)[1].decode("latin-1")
                if path == "/stats":
                    body = json.dumps({"requests": self.requests}).encode()
                elif path == "/reset":
                    self.requests = 0
                    body = b"{}"
                else:
                    self.requests += 1
                    await asyncio.sleep(self.latency())
                    body = b'{"ok": true}'
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                    % (len(body), body)
                )
        writer.close()


async def _serve(tail: _Tail) -> None:
    server = await asyncio.start_server(tail.serve, "127.0.0.1", 0, backlog=1024)
    print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)
    await asyncio.to_thread(sys.stdin.read)
    server.close()


class TailServer:
    """The server process: ``with TailServer(median=0.01) as port: ...``."""

    def __init__(
        self, *, median: float, slow_share: float, slow_factor: float, seed: int = 0, deck: bool = True
    ) -> None:
        self._args = [str(median), str(slow_share), str(slow_factor), str(seed), "deck" if deck else "draw"]
        self._process: subprocess.Popen[str] | None = None

    def __enter__(self) -> int:
        self._process = subprocess.Popen(
            [sys.executable, __file__, *self._args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line.startswith("PORT "):
            self._process.kill()
            raise RuntimeError(f"tail server did not start: {line!r}")
        return int(line.split()[1])

    def __exit__(self, *exc: Any) -> None:
        process = self._process
        if process is None:
            return
        assert process.stdin is not None and process.stdout is not None
        process.stdin.close()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stdout.close()


if __name__ == "__main__":
    median, share, factor, seed = sys.argv[1:5]
    dealt = sys.argv[5:6] != ["draw"]
    asyncio.run(_serve(_Tail(float(median), float(share), float(factor), int(seed), dealt)))
