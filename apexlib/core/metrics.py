"""Serving metrics from per-request timings, with vLLM's definitions. Imports no torch.

Definitions follow vLLM's serving benchmark (``benchmarks/benchmark_serving.py``, now
``vllm/benchmarks/serve.py``, function ``calculate_metrics``) and its offline throughput benchmark
(``benchmarks/benchmark_throughput.py``):

* TTFT (time to first token) = first token time - arrival time, per request.
* E2E latency = finish time - arrival time, per request (vLLM's ``e2el``/``latency``).
* TPOT (time per output token, excluding the first) = (E2E latency - TTFT) / (output_len - 1), per
  request; undefined for ``output_len == 1``: such requests are left out of the TPOT statistics, as in
  vLLM. For goodput, vLLM counts their TPOT as 0 and so do we.
* ITL (inter-token latency) = every gap between consecutive output tokens of a request, pooled over
  all requests before taking statistics (vLLM ``itls += output.itl``); TPOT is per request, then
  averaged, so mean ITL and mean TPOT differ when requests have different lengths.
* Statistics: mean, median, standard deviation (``numpy.std``, population, ddof=0) and percentiles by
  ``numpy.percentile`` with its default linear interpolation, as vLLM. Unlike vLLM (which reports 0 for
  an empty list via ``np.mean(x or 0)``), a statistic with no samples is NaN with ``count == 0``.
* Throughput: completed requests / duration, output tokens / duration, (prompt + output tokens) /
  duration. vLLM takes the duration as wall time from just before the first request is sent to the
  return of the last one; the default here is the same span read from the timings: last finish time -
  first arrival time. Pass ``duration`` to use another span.
* Goodput (``request_goodput``, vLLM's name): completed requests that meet every given SLO bound
  (``metric <= bound``, vLLM's ``s >= r``), divided by the same duration, in requests/s. SLO bounds are
  in seconds here; ``parse_goodput`` reads vLLM's command-line form (``ttft:<ms> tpot:<ms> e2el:<ms>``,
  ``vllm bench serve --goodput``).

All times are in seconds and must come from the same clock (absolute or relative, it does not matter).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import numpy as np

__all__ = [
    "SLO",
    "parse_goodput",
    "BenchmarkSummary",
    "LatencyStats",
    "RequestTiming",
    "compute_stats",
    "request_rows",
    "sliced_throughput",
    "summarize",
]

# Tolerance for "the first token time equals first_token_time" and ordering checks (float clocks).
_TIME_TOLERANCE = 1e-9


def _is_finite_number(value: Any) -> bool:
    return (
        isinstance(value, (int, float, np.integer, np.floating))
        and not isinstance(value, (bool, np.bool_))
        and math.isfinite(value)
    )


@dataclass(frozen=True)
class RequestTiming:
    """The measured (or simulated) timeline of one completed request.

    ``token_times`` holds the wall time of every output token (``output_len`` entries, non-decreasing,
    the first equal to ``first_token_time``, the last not after ``finish_time``). It may be left empty
    when an executor does not record per-token times; such a request then contributes no ITL samples.
    """

    request_id: str
    prompt_len: int
    output_len: int
    arrival_time: float
    first_token_time: float
    finish_time: float
    token_times: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        name = self.request_id
        if not isinstance(name, str) or not name:
            raise ValueError(f"request_id must be a non-empty string, got {name!r}")
        if (
            isinstance(self.prompt_len, bool)
            or not isinstance(self.prompt_len, (int, np.integer))
            or self.prompt_len < 0
        ):
            raise ValueError(f"request {name}: prompt_len must be an int >= 0, got {self.prompt_len!r}")
        if (
            isinstance(self.output_len, bool)
            or not isinstance(self.output_len, (int, np.integer))
            or self.output_len < 1
        ):
            raise ValueError(f"request {name}: output_len must be an int >= 1, got {self.output_len!r}")
        for field_name in ("arrival_time", "first_token_time", "finish_time"):
            if not _is_finite_number(getattr(self, field_name)):
                raise ValueError(
                    f"request {name}: {field_name} must be a finite number, got {getattr(self, field_name)!r}"
                )
        if self.first_token_time < self.arrival_time - _TIME_TOLERANCE:
            raise ValueError(
                f"request {name}: first_token_time {self.first_token_time} is before arrival_time {self.arrival_time}"
            )
        if self.finish_time < self.first_token_time - _TIME_TOLERANCE:
            raise ValueError(
                f"request {name}: finish_time {self.finish_time} is before first_token_time {self.first_token_time}"
            )
        if not isinstance(self.token_times, tuple):
            raise ValueError(f"request {name}: token_times must be a tuple of floats")
        if self.token_times:
            if len(self.token_times) != self.output_len:
                raise ValueError(
                    f"request {name}: token_times has {len(self.token_times)} entries, output_len is {self.output_len}"
                )
            if not all(_is_finite_number(time) for time in self.token_times):
                raise ValueError(f"request {name}: token_times must all be finite numbers")
            if abs(self.token_times[0] - self.first_token_time) > _TIME_TOLERANCE:
                raise ValueError(
                    f"request {name}: token_times[0] ({self.token_times[0]}) must equal first_token_time "
                    f"({self.first_token_time})"
                )
            if any(later < earlier - _TIME_TOLERANCE for earlier, later in pairwise(self.token_times)):
                raise ValueError(f"request {name}: token_times must be non-decreasing")
            if self.token_times[-1] > self.finish_time + _TIME_TOLERANCE:
                raise ValueError(
                    f"request {name}: the last token time ({self.token_times[-1]}) is after finish_time ({self.finish_time})"
                )

    @property
    def ttft(self) -> float:
        """Time to first token, seconds."""
        return self.first_token_time - self.arrival_time

    @property
    def e2e_latency(self) -> float:
        """End-to-end latency (arrival to finish), seconds."""
        return self.finish_time - self.arrival_time

    @property
    def tpot(self) -> float | None:
        """(E2E latency - TTFT) / (output_len - 1), seconds; None when output_len is 1."""
        if self.output_len <= 1:
            return None
        return (self.e2e_latency - self.ttft) / (self.output_len - 1)

    @property
    def itls(self) -> tuple[float, ...]:
        """Gaps between consecutive output tokens (``output_len - 1`` values; empty without token_times)."""
        return tuple(later - earlier for earlier, later in pairwise(self.token_times))

    def to_dict(self) -> dict[str, Any]:
        """One tidy row: the inputs (without token_times) and the per-request metrics."""
        return {
            "request_id": self.request_id,
            "prompt_len": int(self.prompt_len),
            "output_len": int(self.output_len),
            "arrival_time": float(self.arrival_time),
            "first_token_time": float(self.first_token_time),
            "finish_time": float(self.finish_time),
            "ttft_s": self.ttft,
            "tpot_s": math.nan if self.tpot is None else self.tpot,
            "e2e_latency_s": self.e2e_latency,
        }


def request_rows(timings: Iterable[RequestTiming]) -> list[dict[str, Any]]:
    """Per-request tidy rows (``RequestTiming.to_dict``), e.g. for ``pandas.DataFrame(rows)``."""
    return [timing.to_dict() for timing in timings]


@dataclass(frozen=True)
class LatencyStats:
    """Statistics of one latency metric, seconds. NaN everywhere when ``count == 0``."""

    count: int
    mean: float
    median: float
    std: float
    p90: float
    p99: float

    def to_dict(self, prefix: str = "") -> dict[str, Any]:
        return {
            f"{prefix}count": self.count,
            f"{prefix}mean_s": self.mean,
            f"{prefix}median_s": self.median,
            f"{prefix}std_s": self.std,
            f"{prefix}p90_s": self.p90,
            f"{prefix}p99_s": self.p99,
        }


def compute_stats(values: Sequence[float]) -> LatencyStats:
    """Mean, median, population std, p90 and p99 (``numpy.percentile``, linear interpolation)."""
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        return LatencyStats(count=0, mean=math.nan, median=math.nan, std=math.nan, p90=math.nan, p99=math.nan)
    p90, p99 = np.percentile(array, [90, 99])
    return LatencyStats(
        count=int(array.size),
        mean=float(np.mean(array)),
        median=float(np.median(array)),
        std=float(np.std(array)),
        p90=float(p90),
        p99=float(p99),
    )


@dataclass(frozen=True)
class SLO:
    """Service-level objectives in seconds; a request is good when it meets every bound given."""

    ttft: float | None = None
    tpot: float | None = None
    e2e: float | None = None

    def __post_init__(self) -> None:
        given = {name: getattr(self, name) for name in ("ttft", "tpot", "e2e")}
        if all(value is None for value in given.values()):
            raise ValueError("SLO needs at least one bound (ttft, tpot or e2e, seconds)")
        for name, value in given.items():
            if value is not None and (not _is_finite_number(value) or value <= 0):
                raise ValueError(f"SLO.{name} must be a finite number of seconds > 0, got {value!r}")

    def is_met_by(self, timing: RequestTiming) -> bool:
        """vLLM's rule: every given bound satisfied with ``metric <= bound``; TPOT of a one-token
        output counts as 0."""
        if self.ttft is not None and timing.ttft > self.ttft:
            return False
        if self.tpot is not None and (timing.tpot or 0.0) > self.tpot:
            return False
        if self.e2e is not None and timing.e2e_latency > self.e2e:
            return False
        return True

    def to_dict(self) -> dict[str, Any]:
        return {"slo_ttft_s": self.ttft, "slo_tpot_s": self.tpot, "slo_e2e_s": self.e2e}


#: vLLM's ``--goodput`` metric names (``vllm/benchmarks/serve.py``, ``parse_goodput`` / ``check_goodput_args``)
#: and the ``SLO`` field each sets.
GOODPUT_METRICS = {"ttft": "ttft", "tpot": "tpot", "e2el": "e2e"}


def parse_goodput(items: Sequence[str]) -> SLO:
    """The SLO of vLLM's ``--goodput`` arguments: ``"KEY:VALUE"`` items, KEY one of ``ttft``, ``tpot``,
    ``e2el``, VALUE in milliseconds (> 0). Each error names the item and what it must be."""
    bounds: dict[str, float] = {}
    for item in items:
        key, sep, value = str(item).partition(":")
        if not sep or key not in GOODPUT_METRICS:
            raise ValueError(f"--goodput item {item!r} must be KEY:MILLISECONDS with KEY one of "
                             f"{sorted(GOODPUT_METRICS)} (vLLM's names)")
        try:
            milliseconds = float(value)
        except ValueError:
            raise ValueError(f"--goodput {key}: {value!r} is not a number of milliseconds") from None
        if not (math.isfinite(milliseconds) and milliseconds > 0):
            raise ValueError(f"--goodput {key} must be a finite number of milliseconds > 0, got {value!r}")
        if GOODPUT_METRICS[key] in bounds:
            raise ValueError(f"--goodput {key} is given twice")
        bounds[GOODPUT_METRICS[key]] = milliseconds / 1e3
    if not bounds:
        raise ValueError("--goodput needs at least one KEY:MILLISECONDS item (ttft, tpot, e2el)")
    return SLO(**bounds)


@dataclass(frozen=True)
class BenchmarkSummary:
    """Aggregate metrics of one run (see the module docstring for every definition).

    Throughputs are per second of ``duration_s``; latency statistics are in seconds. ``request_goodput``
    and ``good_completed`` are None when no SLO was given.
    """

    completed: int
    duration_s: float
    total_prompt_tokens: int
    total_output_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    ttft: LatencyStats
    tpot: LatencyStats
    itl: LatencyStats
    e2e_latency: LatencyStats
    slo: SLO | None = None
    good_completed: int | None = None
    request_goodput: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """A flat dict (one tidy row): ``ttft_mean_s``, ``tpot_p99_s``, ``itl_count``, ..."""
        row: dict[str, Any] = {
            "completed": self.completed,
            "duration_s": self.duration_s,
            "total_prompt_tokens": self.total_prompt_tokens,
            "total_output_tokens": self.total_output_tokens,
            "request_throughput": self.request_throughput,
            "output_throughput": self.output_throughput,
            "total_token_throughput": self.total_token_throughput,
        }
        row.update(self.ttft.to_dict("ttft_"))
        row.update(self.tpot.to_dict("tpot_"))
        row.update(self.itl.to_dict("itl_"))
        row.update(self.e2e_latency.to_dict("e2e_latency_"))
        if self.slo is not None:
            row.update(self.slo.to_dict())
        else:
            row.update({"slo_ttft_s": None, "slo_tpot_s": None, "slo_e2e_s": None})
        row["good_completed"] = self.good_completed
        row["request_goodput"] = self.request_goodput
        return row


def _checked_list(timings: Iterable[RequestTiming], caller: str) -> list[RequestTiming]:
    timings = list(timings)
    if not timings:
        raise ValueError(f"{caller} needs at least one RequestTiming, got none")
    seen: set[str] = set()
    for timing in timings:
        if not isinstance(timing, RequestTiming):
            raise ValueError(f"{caller} expects RequestTiming objects, got {type(timing).__name__}")
        if timing.request_id in seen:
            raise ValueError(f"{caller}: duplicate request_id {timing.request_id!r}")
        seen.add(timing.request_id)
    return timings


def summarize(
    timings: Iterable[RequestTiming], duration: float | None = None, slo: SLO | None = None
) -> BenchmarkSummary:
    """Aggregate completed requests into a :class:`BenchmarkSummary` (vLLM ``calculate_metrics``).

    ``duration`` defaults to last finish time - first arrival time (seconds).
    """
    timings = _checked_list(timings, "summarize")
    if duration is None:
        duration = max(t.finish_time for t in timings) - min(t.arrival_time for t in timings)
        if duration <= 0:
            raise ValueError(
                f"the run spans {duration} s (last finish - first arrival); pass duration explicitly"
            )
    elif not _is_finite_number(duration) or duration <= 0:
        raise ValueError(f"duration must be a finite number of seconds > 0, got {duration!r}")
    if slo is not None and not isinstance(slo, SLO):
        raise ValueError(f"slo must be an SLO or None, got {type(slo).__name__}")

    total_prompt = sum(int(t.prompt_len) for t in timings)
    total_output = sum(int(t.output_len) for t in timings)
    tpots = [t.tpot for t in timings if t.tpot is not None]
    itls = [gap for t in timings for gap in t.itls]
    good = sum(1 for t in timings if slo.is_met_by(t)) if slo is not None else None
    return BenchmarkSummary(
        completed=len(timings),
        duration_s=float(duration),
        total_prompt_tokens=total_prompt,
        total_output_tokens=total_output,
        request_throughput=len(timings) / duration,
        output_throughput=total_output / duration,
        total_token_throughput=(total_prompt + total_output) / duration,
        ttft=compute_stats([t.ttft for t in timings]),
        tpot=compute_stats(tpots),
        itl=compute_stats(itls),
        e2e_latency=compute_stats([t.e2e_latency for t in timings]),
        slo=slo,
        good_completed=good,
        request_goodput=None if good is None else good / duration,
    )


def sliced_throughput(timings: Iterable[RequestTiming], low: float = 0.1, high: float = 0.7) -> float:
    """Requests/s over a middle slice of the completions, leaving out warm-up and cool-down (NEO).

    NEO's throughput test (its ``evaluation/benchmark.py``, ``run_throughput_test``) sorts the finish
    times ``t`` of the ``n`` requests, keeps ``t[n // 10 : n - n // 10 * 3 + 1]`` ("omit first 10% and
    last 30% of requests") and reports ``(len(kept) - 1) / (kept[-1] - kept[0])``. Here the kept
    finish times run from index ``floor(low * n)`` to index ``n - floor((1 - high) * n)`` (clamped to
    ``n - 1``), both inclusive, and the result is (number of completions after the first kept one) /
    (time between the first and last kept completion). The defaults ``low=0.1, high=0.7`` reproduce
    NEO's code exactly when ``n`` is a multiple of 10. (The project's notes describe NEO's figure as a
    "30-70%" slice; pass ``low=0.3`` for that.)
    """
    timings = _checked_list(timings, "sliced_throughput")
    if not (_is_finite_number(low) and _is_finite_number(high) and 0 <= low < high <= 1):
        raise ValueError(f"need 0 <= low < high <= 1, got low={low!r}, high={high!r}")
    finishes = sorted(t.finish_time for t in timings)
    count = len(finishes)
    first = math.floor(low * count + 1e-9)
    last = min(count - 1, count - math.floor((1 - high) * count + 1e-9))
    if last - first < 1:
        raise ValueError(
            f"the {low:.0%}-{high:.0%} slice of {count} completions keeps fewer than 2 of them; "
            "use more requests or a wider slice"
        )
    span = finishes[last] - finishes[first]
    if span <= 0:
        raise ValueError("the kept completions all finish at the same time; throughput is undefined")
    return (last - first) / span


def best_within_slo(rows: Sequence[Mapping[str, Any]], *, bound: float, metric: str = "tpot_p90_s",
                    value: str = "output_throughput") -> Mapping[str, Any] | None:
    """The row with the highest ``value`` among ``rows`` (one per request rate) whose ``metric`` is at
    most ``bound`` seconds: the throughput a service reaches while that latency percentile holds its
    SLO. None when no row meets it."""
    if not (_is_finite_number(bound) and bound > 0):
        raise ValueError(f"bound must be a finite number of seconds > 0, got {bound!r}")
    meeting = [row for row in rows if _is_finite_number(row.get(metric)) and row[metric] <= bound]
    return max(meeting, key=lambda row: row[value], default=None)
