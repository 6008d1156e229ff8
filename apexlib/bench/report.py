"""Rich tables of benchmark summaries: one column per run, one row per metric."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from apexlib.core.results import BenchmarkResult

__all__ = ["print_summary", "summary_table"]

_LATENCIES = (("TTFT", "ttft"), ("TPOT", "tpot"), ("ITL", "itl"), ("E2E", "e2e_latency"))


def _number(value: Any, scale: float = 1.0, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value * scale:,.{digits}f}"


def _load(provenance: dict[str, Any]) -> str:
    if provenance["mode"] == "offline":
        return "offline"
    rate = provenance.get("rate")
    return f"{provenance['arrival']} {rate:g}/s" if isinstance(rate, (int, float)) else str(provenance["arrival"])


def summary_table(results: Sequence[BenchmarkResult], title: str | None = None) -> Table:
    """Throughput and latency (mean / median / p99) of each run, runs as columns."""
    table = Table(title=title, show_lines=False, header_style="bold")
    table.add_column("metric", style="bold")
    for index, _ in enumerate(results):
        table.add_column(f"run {index + 1}", justify="right")

    def add(label: str, cells: list[str], style: str | None = None) -> None:
        table.add_row(label, *cells, style=style)

    provenances = [dict(result.provenance) for result in results]
    summaries = [result.summary_row() for result in results]
    add("engine", [f"{p['engine']} {p['engine_version']}" for p in provenances])
    if any("executor" in p for p in provenances):
        add("executor", [str(p.get("executor", "engine")) for p in provenances])
    add("workload", [str(p["workload"]) for p in provenances])
    add("load", [_load(p) for p in provenances])
    add("policy", [str(p["policy"]) for p in provenances])
    add("KV blocks x size", [f"{p['num_gpu_blocks'] if p['num_gpu_blocks'] is not None else 'auto'} x "
                             f"{p['block_size']}" for p in provenances])
    add("iterations / preemptions", [f"{p['engine_iterations']} / {p['engine_preemptions']}"
                                     if p["engine_preemptions"] is not None else f"{p['engine_iterations']} / -"
                                     for p in provenances], style="dim")
    add("requests", [str(s["completed"]) for s in summaries])
    add("duration (s)", [_number(s["duration_s"], digits=2) for s in summaries])
    add("requests/s", [_number(s["request_throughput"], digits=2) for s in summaries])
    add("output tok/s", [_number(s["output_throughput"]) for s in summaries], style="green")
    add("total tok/s", [_number(s["total_token_throughput"]) for s in summaries])
    if any(s.get("request_goodput") is not None for s in summaries):
        add("SLO ttft / tpot / e2el (ms)", [" / ".join(_number(s[f"slo_{k}_s"], 1e3, 0) for k in ("ttft", "tpot", "e2e"))
                                            for s in summaries], style="dim")
        add("good requests", [str(s["good_completed"]) if s["good_completed"] is not None else "-" for s in summaries])
        add("request goodput (req/s)", [_number(s["request_goodput"], digits=3) for s in summaries], style="green")
    for label, key in _LATENCIES:
        for statistic in ("mean", "median", "p99"):
            add(f"{label} {statistic} (ms)", [_number(s[f"{key}_{statistic}_s"], 1e3, 2) for s in summaries],
                style="cyan" if statistic == "median" else None)
    return table


def print_summary(results: Sequence[BenchmarkResult], console: Console | None = None, title: str | None = None) -> None:
    """Print :func:`summary_table` (to stdout unless a console is given)."""
    (console or Console()).print(summary_table(results, title))
