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
        "| handler | worker host | events/s drained | bare Celery no-op tasks/s | ratio "
        "| offered | p50 ms (202 → done) | p99 ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, steps in results.items():
        bare = steps.get("bare_drain", [])
        ratio = f"{median_ratio(steps['drain'], bare):.0%}" if bare else "–"
        latency = steps["latency"]
        lines.append(
            f"| {name} | {describe.get(name, '')} | {spread(_pick(steps['drain'], 'rate'))} "
            f"| {spread(_pick(bare, 'rate'))} | {ratio} "
            f"| {latency[0]['offered_rate']}/s "
            f"| {spread(_pick(latency, 'p50_ms'), '{:.0f}')} "
            f"| {spread(_pick(latency, 'p99_ms'), '{:.0f}')} |"
        )
    return lines


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


def targets(results: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(target, measured, met) for each target of issue 6 that this run measured."""
    rows: list[tuple[str, str, bool]] = []
    ingress = results.get("ingress")
    if ingress:
        sat = {k: v["saturation"] for k, v in ingress.items()}
        r_bare = median_ratio(sat["calhook"], sat["bare"])
        r_recipe = median_ratio(sat["calhook"], sat["recipe"])
        rows.append(("ingress ≥ 70% of bare aiohttp", f"{r_bare:.0%}", r_bare >= 0.7))
        rows.append(("ingress ≥ 5× the send_task recipe", f"{r_recipe:.1f}×", r_recipe >= 5))
        if "rate_1000" in ingress["calhook"]:
            p99 = statistics.median(_pick(ingress["calhook"]["rate_1000"], "p99_ms"))
            rows.append(("ack p99 ≤ 10 ms at 1,000 req/s", f"{p99:.2f} ms", p99 <= 10))
    e2e = results.get("e2e")
    if e2e and "noop" in e2e and e2e["noop"].get("bare_drain"):
        ratio = median_ratio(e2e["noop"]["drain"], e2e["noop"]["bare_drain"])
        rows.append(("no-op end to end ≥ 80% of bare Celery", f"{ratio:.0%}", ratio >= 0.8))
    if e2e and "io" in e2e:
        rate = statistics.median(_pick(e2e["io"]["drain"], "rate"))
        rows.append(("50 ms I/O handler ≥ 500 events/s", f"{rate:,.0f}/s", rate >= 500))
    memory = results.get("memory")
    if memory:
        growth = max(memory[n]["growth_pct"] for n in ("ingress", "worker"))
        rows.append(("no RSS growth in the sustained run", f"{growth:+.1f}% at most", growth < 5))
    return rows


def markdown(results: dict[str, Any], machine: dict[str, str], describe: dict[str, str]) -> str:
    out = [
        "# calhook benchmark",
        "",
        f"{machine['date']} · {machine['cpu']} · {machine['cores']} cores · {machine['memory']} · "
        f"Python {machine['python']} · {machine['redis']} · `{machine['command']}`",
        "",
        "Each figure is the median of the rounds, with their range in brackets.",
        "",
    ]
    rows = targets(results)
    if rows:
        out += ["## Targets", "", "| target | measured | met |", "|---|---:|:---:|"]
        out += [f"| {t} | {m} | {'yes' if ok else '**no**'} |" for t, m, ok in rows]
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
            "*events/s drained*: events accepted while no worker ran, then one worker host "
            "started; from the moment it took its first message to the last handler's end. The "
            "bare baseline, run right after, drains the same number of `send_task` messages of "
            "a no-op task with calhook's broker settings (late ack, prefetch 1). Both count "
            "completions with one Redis INCR. calhook runs at its default log level (INFO: a "
            "`dispatched` and a `handler done` line per event), the bare worker at Celery's "
            "(WARNING). *Latency*: events offered at a fixed rate with the workers running, "
            "from the 202 to the handler's trail entry.",
            "",
            *e2e_table(results["e2e"], describe),
            "",
        ]
    if "memory" in results:
        out += ["## Memory", "", *memory_table(results["memory"]), ""]
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
