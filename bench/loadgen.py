"""An open-loop load generator: POSTs at a fixed offered rate, whatever the server's pace.

wrk measures saturation; it cannot hold a fixed rate (wrk2 is not in Debian). This generator
schedules request *i* at ``t0 + i/rate`` and measures each latency from that scheduled time, so a
slow server's queueing counts (no coordinated omission). It runs as its own process, pinned
away from the server under test. Run: ``python -m bench.loadgen --help``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
import uuid
from pathlib import Path

import uvloop

from bench.fixtures import Body


def percentile(sorted_values: list[float], q: float) -> float:
    """The q-quantile (0 < q ≤ 1) of already-sorted values, nearest rank."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


def load_bodies(directory: Path) -> list[Body]:
    count = int((directory / "count").read_text())
    return [
        Body(
            str(i),
            (directory / f"{i}.prefix").read_bytes(),
            (directory / f"{i}.suffix").read_bytes(),
        )
        for i in range(1, count + 1)
    ]


def write_bodies(bodies: list[Body], directory: Path) -> Path:
    """Write bodies where wrk.lua and this generator read them."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "count").write_text(str(len(bodies)))
    for i, body in enumerate(bodies, start=1):
        (directory / f"{i}.prefix").write_bytes(body.prefix)
        (directory / f"{i}.suffix").write_bytes(body.suffix)
    return directory


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.bodies = load_bodies(Path(args.bodies))
        self.head = (
            f"POST {args.path} HTTP/1.1\r\nHost: 127.0.0.1:{args.port}\r\n"
            f"Content-Type: application/json\r\nAuthorization: {args.secret}\r\n"
        ).encode()
        self.run_id = uuid.uuid4().hex[:8]
        self.latencies: list[float] = []
        self.statuses: dict[int, int] = {}
        self.acks: list[tuple[str, float]] = []
        self.errors = 0
        self.last_done = 0.0

    def request(self, i: int) -> bytes:
        body = self.bodies[i % len(self.bodies)].render(f"{self.run_id}-{i}")
        return self.head + f"Content-Length: {len(body)}\r\n\r\n".encode() + body

    async def connection(self, queue: asyncio.Queue[tuple[int, float] | None]) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.args.port)
        try:
            while (item := await queue.get()) is not None:
                i, due = item
                try:
                    writer.write(self.request(i))
                    status_line = await reader.readline()
                    length = 0
                    while (line := await reader.readline()) not in (b"\r\n", b""):
                        if line[:15].lower() == b"content-length:":
                            length = int(line[15:])
                    body = await reader.readexactly(length)
                    status = int(status_line[9:12])  # an empty line (closed) is a ValueError
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    self.errors += 1
                    writer.close()
                    reader, writer = await asyncio.open_connection("127.0.0.1", self.args.port)
                    continue
                done = time.perf_counter()
                self.statuses[status] = self.statuses.get(status, 0) + 1
                if not 200 <= status < 300:
                    # A refusal is counted (statuses), not acknowledged: no rate, no latency.
                    # The server may close the connection after it: open a new one.
                    writer.close()
                    reader, writer = await asyncio.open_connection("127.0.0.1", self.args.port)
                    continue
                self.last_done = done
                self.latencies.append(done - due)
                if self.args.acks and status == 202:
                    self.acks.append((json.loads(body)["event_id"], time.time()))
        finally:
            writer.close()

    async def main(self) -> dict[str, object]:
        # perf_counter, not loop.time(): uvloop's clock ticks in whole milliseconds.
        queue: asyncio.Queue[tuple[int, float] | None] = asyncio.Queue()
        workers = [
            asyncio.create_task(self.connection(queue)) for _ in range(self.args.connections)
        ]
        await asyncio.sleep(0.2)  # connections open
        total = int(self.args.rate * self.args.duration)
        t0 = time.perf_counter() + 0.01
        for i in range(total):
            due = t0 + i / self.args.rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            queue.put_nowait((i, due))
        for _ in workers:
            queue.put_nowait(None)
        await asyncio.gather(*workers)
        lat = sorted(self.latencies)
        elapsed = max(self.last_done - t0, 1e-9)
        return {
            "offered_rate": self.args.rate,
            "sent": total,
            "completed": len(lat),
            "rate": len(lat) / elapsed,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "errors": self.errors,
            "p50_ms": percentile(lat, 0.50) * 1000,
            "p99_ms": percentile(lat, 0.99) * 1000,
            "p999_ms": percentile(lat, 0.999) * 1000,
            "max_ms": (lat[-1] if lat else math.nan) * 1000,
            "acks": self.acks,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/webhooks/calenso")
    parser.add_argument("--rate", type=float, required=True, help="requests per second offered")
    parser.add_argument("--duration", type=float, required=True, help="seconds")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--bodies", required=True, help="folder written by write_bodies")
    parser.add_argument("--secret", default="")
    parser.add_argument("--acks", action="store_true", help="record (event_id, ack time)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    result = uvloop.run(Run(args).main())
    Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
