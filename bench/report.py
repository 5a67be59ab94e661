"""The results of `make bench` as Markdown (RESULTS.md) and a PNG plot (ingress.png)."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

Figures = list[dict[str, Any]]


def spread(values: Sequence[float], fmt: str = "{:,.0f}") -> str:
    """Median of the runs and, with several, their range: ``1,234 (1,200–1,250)``."""
    if not values:
        return "–"
    median = fmt.format(statistics.median(values))
    if len(values) == 1:
        return median
    return f"{median} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def median_ratio(a: Figures, b: Figures, key: str = "rate") -> float:
    """The median over rounds of a/b, each round's pair measured back to back."""
    return float(statistics.median(x[key] / y[key] for x, y in zip(a, b, strict=False) if y[key]))


def _pick(figures: Figures, key: str) -> list[float]:
    return [float(f[key]) for f in figures if key in f]


POINTS = {
    "saturation": "saturation, fixtures (2–3 KB), 64 connections",
    "saturation_200kb": "saturation, 200 KB body, 16 connections",
}


def ingress_table(results: dict[str, dict[str, Figures]]) -> list[str]:
    servers = list(results)
    lines = [
        "| load | server | acked/s | p50 ms | p99 ms | p99.9 ms | errors |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for point in results[servers[0]]:
        label = POINTS.get(point, f"{point.removeprefix('rate_')} req/s offered (open loop)")
        for server in servers:
            figures = results[server][point]
            lines.append(
                f"| {label} | {server} | {spread(_pick(figures, 'rate'))} "
                f"| {spread(_pick(figures, 'p50_ms'), '{:.2f}')} "
                f"| {spread(_pick(figures, 'p99_ms'), '{:.2f}')} "
                f"| {spread(_pick(figures, 'p999_ms'), '{:.2f}')} "
                f"| {sum(int(f['errors']) for f in figures)} |"
            )
    return lines


def e2e_table(results: dict[str, dict[str, Figures]], describe: dict[str, str]) -> list[str]:
    lines = [
        "| handler | worker host | backlog | events/s drained | bare Celery no-op tasks/s "
        "| ratio | offered | p50 ms (202 → done) | p99 ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, steps in results.items():
        bare = steps.get("bare_drain", [])
        ratio = f"{median_ratio(steps['drain'], bare):.2f}×" if bare else "–"
        latency = steps["latency"]
        backlog = statistics.median(_pick(steps["drain"], "events"))
        lines.append(
            f"| {name} | {describe.get(name, '')} | {backlog:,.0f} "
            f"| {spread(_pick(steps['drain'], 'rate'))} "
            f"| {spread(_pick(bare, 'rate'))} | {ratio} "
            f"| {latency[0]['offered_rate']}/s "
            f"| {spread(_pick(latency, 'p50_ms'), '{:.1f}')} "
            f"| {spread(_pick(latency, 'p99_ms'), '{:.1f}')} |"
        )
    return lines


def acks_table(acks: dict[str, Any]) -> list[str]:
    """The levels side by side: saturation, the fixed rate, where the events went."""
    levels: dict[str, dict[str, Any]] = acks["levels"]
    rate = acks["rate"]
    point = f"rate_{rate}"
    written = levels["written"]["saturation"]
    lines = [
        f"| level | acked/s | ratio to `written` | events per batch | p50 ms | p99 ms "
        f"| p99 ms at {rate:,}/s | spooled | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    over = timed_out = False
    for figures in levels.values():
        saturation = figures["saturation"]
        measured = [f for f in figures[point] if "skipped" not in f]
        if measured:
            p99 = spread(_pick(measured, "p99_ms"), "{:.1f}")
            if statistics.median(_pick(saturation, "rate")) < rate:
                p99 += " †"
                over = True
        else:
            skipped = figures[point][0]["skipped"] if figures[point] else "not run"
            p99 = f"– ({skipped})"
        runs = saturation + measured
        spooled = sum(int(f["spooled"]) for f in runs)
        acked = sum(int(f["acked_events"]) for f in runs)
        left = sum(int(f["left_in_spool"]) for f in runs)
        spool = f"{spooled:,} of {acked:,}" + (f" ({left:,} left)" if left else "")
        ratio = median_ratio(saturation, written)
        latency = [spread(_pick(saturation, k), "{:.1f}") for k in ("p50_ms", "p99_ms")]
        if any(f["errors"] for f in saturation):
            latency = [f"{cell} ‡" for cell in latency]
            timed_out = True
        lines.append(
            f"| {figures['describe']} | {spread(_pick(saturation, 'rate'))} "
            f"| {ratio:.2f}{'' if ratio >= 0.1 else f' ({ratio:.1%})'} "
            f"| {spread(_pick(saturation, 'batch_mean'), '{:.0f}')} "
            f"| {latency[0]} | {latency[1]} | {p99} | {spool} "
            f"| {sum(int(f['errors']) for f in runs)} |"
        )
    if over:
        lines += [
            "",
            f"† Above that level's saturation: {rate:,}/s offered on {acks['connections']} "
            "connections is more than it answers, so the figure is the queue in front of it "
            "and grows with the run's length.",
        ]
    if timed_out:
        lines += [
            "",
            "‡ Some requests were still unanswered at wrk's 2 s timeout (*errors*): wrk leaves "
            "them out of its latencies, so the true p50 and p99 are higher.",
        ]
    return lines


def acks_notes(acks: dict[str, Any]) -> list[str]:
    """Which points the spool took events at, and any point where Redis held fewer events
    than were acknowledged (the spool's leftovers aside)."""
    notes = []
    for name, figures in acks["levels"].items():
        for point, runs in figures.items():
            if point == "describe":
                continue
            for i, run in enumerate(runs):
                if "skipped" in run:
                    continue
                where = f"{name} {point.replace('_', ' ')} round {i + 1}"
                if run["spooled"]:
                    left = run["left_in_spool"]
                    notes.append(
                        f"{where}: {run['spooled']:,} of {run['acked_events']:,} acknowledged "
                        "events went to the spool"
                        + (f", {left:,} still there after the drain wait" if left else "")
                    )
                missing = run["acked_events"] - run["left_in_spool"] - run["in_redis"]
                if missing > 0:
                    notes.append(f"{where}: {missing:,} acknowledged events not in Redis")
    if not notes:
        return ["No event went to the spool, and Redis held every event acknowledged.", ""]
    return [
        "Where the spool took events (confirmation not in time; each still reaches Redis "
        "through the same confirmation): " + "; ".join(notes) + ".",
        "",
    ]


def _not_ok_note(results: dict[str, dict[str, Figures]]) -> list[str]:
    """A line naming the runs whose handlers did not all end ``ok`` the first time."""
    runs = [
        f"{name} {step} round {i + 1}: {run['not_ok']}"
        for name, steps in results.items()
        for step, figures in steps.items()
        for i, run in enumerate(figures)
        if run.get("not_ok")
    ]
    if not runs:
        return []
    return [
        "Attempts that did not end `ok` (retried by the scheduler that runs beside every calhook "
        f"host; those runs measured more than the handler): {'; '.join(runs)}.",
        "",
    ]


def memory_table(memory: dict[str, Any]) -> list[str]:
    lines = [
        f"{memory['seconds']:.0f} s at {memory['rate']} events/s through ingress and worker; "
        "RSS sampled every 2 s (worker: main process and pool children). The workers run with "
        "a 60 s task time limit: Celery keeps a timer entry per task until its hard limit "
        "passes, even when the task is long done, so a worker grows until then and holds "
        "steady after (bench/memory.py).",
        "",
        "| process | peak MB | 2nd fifth MB | last fifth MB | growth |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in ("ingress", "worker"):
        m = memory[name]
        lines.append(f"| {name} | {m['peak_mb']:.1f} | {m['early_mb']:.1f} | {m['late_mb']:.1f} "
                     f"| {m['growth_pct']:+.1f}% |")  # fmt: skip
    return lines


# The last full run before issue 12 (bench/results/RESULTS.md of 2026-12-01, this machine): the
# ingress must not fall below it. Its ratio to bare aiohttp is the drift-proof form of the same.
BEFORE_12 = "2026-12-01"
BEFORE_12_SATURATION = 4065.0
BEFORE_12_BARE_RATIO = 0.21
BEFORE_12_P99_1000_MS = 8.99

Target = tuple[str, str, bool | None]  # (target, measured, met; None: a figure to quote)


def _ingress_targets(ingress: dict[str, Any]) -> list[Target]:
    sat = {k: v["saturation"] for k, v in ingress.items()}
    r_bare = median_ratio(sat["calhook"], sat["bare"])
    r_recipe = median_ratio(sat["calhook"], sat["recipe"])
    rate = statistics.median(_pick(sat["calhook"], "rate"))
    rows: list[Target] = [
        ("ingress ≥ 70% of bare aiohttp", f"{r_bare:.0%}", r_bare >= 0.7),
        ("ingress ≥ 5× the send_task recipe", f"{r_recipe:.1f}×", r_recipe >= 5),
        (
            f"ingress saturation ≥ {BEFORE_12_SATURATION:,.0f} acked/s ({BEFORE_12})",
            f"{rate:,.0f}/s",
            rate >= BEFORE_12_SATURATION,
        ),
        (
            f"ingress ≥ {BEFORE_12_BARE_RATIO:.0%} of bare aiohttp ({BEFORE_12}'s ratio)",
            f"{r_bare:.0%}",
            r_bare >= BEFORE_12_BARE_RATIO,
        ),
    ]
    if "rate_1000" in ingress["calhook"]:
        p99 = statistics.median(_pick(ingress["calhook"]["rate_1000"], "p99_ms"))
        rows.append(("ack p99 ≤ 10 ms at 1,000 req/s", f"{p99:.2f} ms", p99 <= 10))
        rows.append(
            (
                f"ack p99 at 1,000 req/s ≤ {BEFORE_12_P99_1000_MS} ms ({BEFORE_12})",
                f"{p99:.2f} ms",
                p99 <= BEFORE_12_P99_1000_MS,
            )
        )
    return rows


def _e2e_targets(e2e: dict[str, Any]) -> list[Target]:
    rows: list[Target] = []
    noop = e2e.get("noop", {})
    if noop.get("bare_drain"):
        ratio = median_ratio(noop["drain"], noop["bare_drain"])
        rows.append(("no-op drain ≥ 2× the bare Celery no-op task", f"{ratio:.2f}×", ratio >= 2))
    if noop.get("latency"):
        offered = noop["latency"][0]["offered_rate"]
        p50 = statistics.median(_pick(noop["latency"], "p50_ms"))
        p99 = statistics.median(_pick(noop["latency"], "p99_ms"))
        label = f"at {offered} events/s offered"
        rows.append((f"no-op 202 → done p50 ≤ 5 ms {label}", f"{p50:.1f} ms", p50 <= 5))
        rows.append((f"no-op 202 → done p99 ≤ 20 ms {label}", f"{p99:.1f} ms", p99 <= 20))
    if "io_async" in e2e:
        rate = statistics.median(_pick(e2e["io_async"]["drain"], "rate"))
        measured = f"{rate:,.0f}/s"
        if "io" in e2e:
            sync = statistics.median(_pick(e2e["io"]["drain"], "rate"))
            measured += f" (sync on threads: {sync:,.0f}/s)"
        rows.append(("50 ms I/O handler, async: ≥ 2,000 events/s", measured, rate >= 2000))
    return rows


def targets(results: dict[str, Any]) -> list[Target]:
    """(target, measured, met) for each target of issues 6 and 12 that this run measured."""
    rows: list[Target] = []
    if results.get("ingress"):
        rows += _ingress_targets(results["ingress"])
    if results.get("e2e"):
        rows += _e2e_targets(results["e2e"])
    footprint = results.get("footprint")
    if footprint:
        queued, finished = footprint["queued"]["per_event"], footprint["finished"]["per_event"]
        body_kb = footprint["body_bytes"] / 1000
        bytes_per_event = f"{queued:,.0f} B / {finished:,.0f} B"
        rows.append(
            (f"Redis per event ({body_kb:.1f} KB body): queued / finished", bytes_per_event, None)
        )
        day = footprint["day"]
        a_day = f"{_bytes(day['steady'])} ({_bytes(day['first_day'])} after a day)"
        rows.append(
            (f"Redis for {day['events_per_day']:,} events a day, default retention", a_day, None)
        )
    memory = results.get("memory")
    if memory:
        growth = max(memory[n]["growth_pct"] for n in ("ingress", "worker"))
        rows.append(("no RSS growth in the sustained run", f"{growth:+.1f}% at most", growth < 5))
    return rows


def _bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n:,.0f} B"


def _days(seconds: float) -> str:
    return f"{seconds / 86_400:g} d" if seconds >= 86_400 else f"{seconds / 3600:g} h"


def footprint_tables(footprint: dict[str, Any]) -> list[str]:
    from bench.footprint import KEYS_OF_KIND, PER_EVENT

    queued, finished, day = footprint["queued"], footprint["finished"], footprint["day"]
    n = footprint["events"]
    lines = [
        f"{n:,} events of one fixture (`{footprint['fixture']}`, {footprint['body_bytes']:,} B "
        "as stored) through the ingress with no worker running (*queued*), then drained by the "
        "no-op host until every pair was final (*finished*), on a fresh server. *Bytes per "
        "event*: the growth of `used_memory` over the server after a warm-up cycle (flushed), "
        "over the events; by kind, `MEMORY USAGE` of every key of the kind over the events. "
        "*Redis's own*: what `used_memory` holds beyond the keys (its hash tables, expiry "
        "entries). One handler per event: each further handler adds its pair's fields to the "
        "state and its entries to the trail (bench/footprint.py).",
        "",
        "| kind | keys | queued B/event | finished B/event |",
        "|---|---|---:|---:|",
    ]
    for kind in (*PER_EVENT, "counters", "other"):
        q, f = queued["kinds"][kind], finished["kinds"][kind]
        if kind in PER_EVENT:
            cells = f"{q['per_event']:,.0f} | {f['per_event']:,.0f}"
        else:  # fixed: do not grow with the number of events
            cells = f"{_bytes(q['bytes'])} in all | {_bytes(f['bytes'])} in all"
        lines.append(f"| {kind} | {KEYS_OF_KIND[kind]} | {cells} |")
    lines += [
        f"| Redis's own | hash tables, expiry entries | {queued['redis_own_per_event']:,.0f} "
        f"| {finished['redis_own_per_event']:,.0f} |",
        f"| **total** (`used_memory`) | | **{queued['per_event']:,.0f}** "
        f"| **{finished['per_event']:,.0f}** |",
        "",
        f"{day['events_per_day']:,} events a day ({day['events_per_day'] / 86_400:.1f}/s) under "
        "the default settings: each kind of key a finished event leaves is held for its "
        "lifetime, so it holds bytes × events/s × lifetime; *after a day* caps each lifetime "
        "at the day. Redis's own share grows with the keys' bytes "
        f"(+{day['redis_own_share']:.0%} here).",
        "",
        "| kind | B/event | kept | after a day | steady state |",
        "|---|---:|---|---:|---:|",
    ]
    for row in day["rows"]:
        lines.append(
            f"| {row['kind']} | {row['per_event']:,.0f} | {_days(row['life_s'])} "
            f"({row['setting']}) | {_bytes(row['first_day'])} | {_bytes(row['steady'])} |"
        )
    lines += [
        f"| **total**, with Redis's own | | | **{_bytes(day['first_day'])}** "
        f"| **{_bytes(day['steady'])}** |",
        "",
        f"While it waits for a worker an event holds {queued['per_event']:,.0f} B, its body "
        f"included: an hour of backlog at this rate holds {_bytes(day['backlog_hour'])} more. "
        "Dead letters and parked events (kept CALHOOK_RETENTION_DAYS, with their bodies) come "
        "on top; this run has none.",
    ]
    return lines


def markdown(
    results: dict[str, Any],
    machine: dict[str, str],
    describe: dict[str, str],
    kept: dict[str, dict[str, str]] | None = None,
) -> str:
    """The report; ``kept``: the parts not measured by this run, each with the machine line
    (:func:`bench.run.machine`) of the run that did."""
    out = [
        "# calhook benchmark",
        "",
        f"{machine['date']} · {machine['cpu']} · {machine['cores']} cores · {machine['memory']} · "
        f"Python {machine['python']} · {machine['redis']} · `{machine['command']}`",
        "",
        "Each figure is the median of the rounds, with their range in brackets.",
        "",
    ]
    if kept:
        earlier: dict[tuple[str, str, str], list[str]] = {}
        for part, run in kept.items():
            earlier.setdefault((run["date"], run["cpu"], run["command"]), []).append(part)
        runs = [
            f"{', '.join(parts)}: {date} · {cpu} · `{command}`"
            for (date, cpu, command), parts in earlier.items()
        ]
        out += [
            f"Kept from earlier runs ({'; '.join(runs)}). Compare figures of different runs "
            "with care: this machine is shared and its speed drifts.",
            "",
        ]
    rows = targets(results)
    if rows:
        out += ["## Targets", "", "| target | measured | met |", "|---|---:|:---:|"]
        met = {True: "yes", False: "**no**", None: "–"}
        out += [f"| {t} | {m} | {met[ok]} |" for t, m, ok in rows]
        out.append("")
    if "ingress" in results:
        out += [
            "## Ingress",
            "",
            "One server process pinned to core 0 (uvloop, no access log); wrk (saturation) or "
            "bench/loadgen.py (fixed offered rate, latency from each request's scheduled time) "
            "and Redis on core 1. *bare*: an aiohttp handler that reads the body and answers "
            "202. *recipe*: an aiohttp handler that checks the secret, parses the JSON and "
            "calls Celery's `send_task`. *calhook*: `calhook serve` with auth, full validation, "
            "dedup, the body stored once with its dispatch state and one dispatch message per "
            "batch of requests (one script call), answering after Redis confirmed the write.",
            "",
            *ingress_table(results["ingress"]),
            "",
        ]
    if "e2e" in results:
        out += [
            "## End to end",
            "",
            "*events/s drained*: a backlog of events accepted while no worker ran (the case "
            "where batches form); their queue is hidden while the worker host starts and shown "
            "once every worker process is consuming, and the clock runs from then to the last "
            "handler's end. The bare baseline, run right after, drains as many `send_task` "
            "messages of a no-op task with calhook's broker settings (late ack, prefetch 1). "
            "Every handler and the bare task count completions with one Redis INCR. calhook "
            "runs at its default log level (INFO) with a `calhook scheduler` beside it, as "
            "deployed; the bare worker at Celery's level (WARNING). "
            "*noop*: the no-op handler; *io*: a sync handler that waits on a local server "
            "answering after 50 ms (httpx, a pool thread per call); *io_async*: the same call "
            "as an `async def` on aiohttp, the events of a batch concurrent on the worker "
            "process's event loop. *Latency*: events offered at a fixed rate with the workers "
            "consuming (after a second of the same load, not counted), from the 202 to the "
            "handler's trail entry (Redis's clock, whole ms).",
            "",
            *e2e_table(results["e2e"], describe),
            "",
            *_not_ok_note(results["e2e"]),
        ]
    if "acks" in results:
        acks = results["acks"]
        out += [
            "## Acknowledgement levels",
            "",
            "`CALHOOK_ACK_DURABILITY` side by side (issue 13): each level its own `calhook "
            "serve` pinned to core 0 and its own fresh Valkey on core 1 with wrk or "
            "bench/loadgen.py, rounds interleaving the levels. *written*: the answer once Redis "
            "ran the write (the default). *fsynced*: each publish batch is followed, in the same "
            "round trip, by `WAITAOF 1 0`, against a server with `appendfsync always` (the "
            "ingress refuses `fsynced` under `everysec`, whose WAITAOF waits for the "
            "once-a-second fsync or, in the embedded Valkey, confirms before it: "
            "redis/redis#13793, bench/README.md). *replicated*: `WAIT 1`, a replica has "
            "received the batch (a second Valkey on the same machine, attached with "
            "`REPLICAOF`); under `always`, `WAITAOF 1 0` first. *acked/s*, *p50*, *p99*: wrk "
            "at saturation, "
            f"{acks['connections']} connections; *ratio*: acked/s over `written`'s in the same "
            f"round; *events per batch*: events written to Redis per publish batch (per "
            f"confirmation). *p99 at {acks['rate']:,}/s*: open loop, bench/loadgen.py; "
            "*errors*: wrk's and the load generator's, requests unanswered at wrk's 2 s timeout "
            "among them. "
            "*spooled*: events answered 202 from the ingress's local spool because their "
            f"batch was not confirmed in time (CALHOOK_ACK_TIMEOUT_S, {acks['ack_timeout_s']:g} "
            "s, or the ingress's Redis socket timeout, whichever came first), over the events "
            "acknowledged at all the level's points (its /metrics); a spool "
            "not drained a few seconds after a point is *left* with its ingress, restarted on a "
            "fresh spool so the next point measures the level (bench/acks.py).",
            "",
            *acks_table(acks),
            "",
            *acks_notes(acks),
        ]
    if "memory" in results:
        out += ["## Memory", "", *memory_table(results["memory"]), ""]
    if "footprint" in results:
        out += ["## Redis footprint", "", *footprint_tables(results["footprint"]), ""]
    return "\n".join(out)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ingress = results["ingress"]
    servers = list(ingress)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    saturation = [_pick(ingress[s]["saturation"], "rate") for s in servers]
    medians = [statistics.median(rates) for rates in saturation]
    lows = [m - min(rates) for rates, m in zip(saturation, medians, strict=True)]
    highs = [max(rates) - m for rates, m in zip(saturation, medians, strict=True)]
    left.bar(servers, medians, yerr=[lows, highs], color=["#999", "#d98", "#48a"], capsize=4)
    left.set_title("Acknowledged webhooks/s at saturation (one core)")
    left.set_ylabel("requests/s")
    rates = sorted(
        int(p.removeprefix("rate_")) for p in ingress[servers[0]] if p.startswith("rate_")
    )
    line: Callable[..., Any] = right.plot
    for server in servers:
        p99 = [statistics.median(_pick(ingress[server][f"rate_{r}"], "p99_ms")) for r in rates]
        line(rates, p99, marker="o", label=server)
    right.set_yscale("log")
    right.set_xlabel("offered requests/s")
    right.set_ylabel("ack latency p99, ms (log)")
    right.set_title("p99 at fixed offered rates")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


README_START = "<!-- bench:start -->"
README_END = "<!-- bench:end -->"


def update_readme(readme: Path, results_md: str) -> None:
    """Put the report (without its title) between the README's bench markers."""
    text = readme.read_text()
    start, end = text.index(README_START), text.index(README_END)
    body = results_md.split("\n", 1)[1].strip().replace("\n## ", "\n### ")
    text = text[: start + len(README_START)] + "\n" + body + "\n" + text[end:]
    readme.write_text(text)
