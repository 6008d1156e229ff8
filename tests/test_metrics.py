"""Serving metrics (apexlib.core.metrics) on hand-computed cases. CPU only, no torch."""

from __future__ import annotations

import math

import numpy as np
import pytest

from apexlib.core.metrics import (
    SLO,
    RequestTiming,
    compute_stats,
    request_rows,
    sliced_throughput,
    summarize,
)


def _three_requests() -> list[RequestTiming]:
    """A: 3 tokens; B: a single token (no TPOT, no ITL); C: 5 tokens.

    per request       TTFT   E2E   TPOT                  ITLs
    A (arrive 0)      1.0    2.5   (2.5-1.0)/2 = 0.75    0.5, 1.0
    B (arrive 1)      2.0    2.0   undefined             -
    C (arrive 2)      0.5    4.0   (4.0-0.5)/4 = 0.875   0.5, 0.5, 0.5, 2.0
    duration = last finish (6.0) - first arrival (0.0) = 6.0
    """
    return [
        RequestTiming("A", 10, 3, 0.0, 1.0, 2.5, (1.0, 1.5, 2.5)),
        RequestTiming("B", 20, 1, 1.0, 3.0, 3.0, (3.0,)),
        RequestTiming("C", 30, 5, 2.0, 2.5, 6.0, (2.5, 3.0, 3.5, 4.0, 6.0)),
    ]


def test_per_request_metrics():
    a, b, c = _three_requests()
    assert (a.ttft, a.e2e_latency, a.tpot, a.itls) == (1.0, 2.5, 0.75, (0.5, 1.0))
    assert (b.ttft, b.e2e_latency, b.tpot, b.itls) == (2.0, 2.0, None, ())
    assert (c.ttft, c.e2e_latency, c.tpot, c.itls) == (0.5, 4.0, 0.875, (0.5, 0.5, 0.5, 2.0))


def test_summary_hand_computed():
    summary = summarize(_three_requests())
    assert summary.completed == 3
    assert summary.duration_s == 6.0
    assert summary.total_prompt_tokens == 60 and summary.total_output_tokens == 9
    assert summary.request_throughput == pytest.approx(0.5)
    assert summary.output_throughput == pytest.approx(1.5)
    assert summary.total_token_throughput == pytest.approx(11.5)

    # TTFT [1.0, 2.0, 0.5]; sorted [0.5, 1.0, 2.0]; linear p90 at rank 1.8 -> 1.0 + 0.8 * 1.0
    ttft = summary.ttft
    assert ttft.count == 3
    assert ttft.mean == pytest.approx(3.5 / 3)
    assert ttft.median == pytest.approx(1.0)
    assert ttft.std == pytest.approx(math.sqrt(7 / 18))  # population std
    assert ttft.p90 == pytest.approx(1.8)
    assert ttft.p99 == pytest.approx(1.98)

    # TPOT per request, B excluded: [0.75, 0.875]
    tpot = summary.tpot
    assert tpot.count == 2
    assert tpot.mean == pytest.approx(0.8125)
    assert tpot.median == pytest.approx(0.8125)
    assert tpot.std == pytest.approx(0.0625)
    assert tpot.p90 == pytest.approx(0.8625)
    assert tpot.p99 == pytest.approx(0.87375)

    # ITL pooled: [0.5, 1.0, 0.5, 0.5, 0.5, 2.0]; sorted [.5 .5 .5 .5 1 2]; p90 at rank 4.5 -> 1.5
    itl = summary.itl
    assert itl.count == 6
    assert itl.mean == pytest.approx(5.0 / 6)
    assert itl.median == pytest.approx(0.5)
    assert itl.p90 == pytest.approx(1.5)
    assert itl.p99 == pytest.approx(1.95)
    # mean ITL (pooled) differs from mean TPOT (per request): vLLM's distinction
    assert itl.mean != pytest.approx(tpot.mean)

    # E2E [2.5, 2.0, 4.0]; sorted [2.0, 2.5, 4.0]; p90 at rank 1.8 -> 2.5 + 0.8 * 1.5
    e2e = summary.e2e_latency
    assert e2e.mean == pytest.approx(8.5 / 3)
    assert e2e.median == pytest.approx(2.5)
    assert e2e.p90 == pytest.approx(3.7)
    assert e2e.p99 == pytest.approx(3.97)

    assert summary.slo is None and summary.request_goodput is None and summary.good_completed is None


def test_summary_explicit_duration():
    summary = summarize(_three_requests(), duration=3.0)
    assert summary.duration_s == 3.0
    assert summary.request_throughput == pytest.approx(1.0)
    assert summary.output_throughput == pytest.approx(3.0)
    assert summary.total_token_throughput == pytest.approx(23.0)


@pytest.mark.parametrize(
    ("slo", "good"),
    [
        (SLO(ttft=1.0), 2),  # A (1.0, bound inclusive) and C (0.5); B is 2.0
        (SLO(tpot=0.8), 2),  # A 0.75; B's one-token TPOT counts as 0; C 0.875 fails
        (SLO(e2e=2.5), 2),  # A 2.5, B 2.0
        (SLO(ttft=1.0, tpot=0.8), 1),  # every bound: only A
        (SLO(ttft=10.0, tpot=10.0, e2e=10.0), 3),
        (SLO(ttft=0.1), 0),
    ],
)
def test_goodput(slo, good):
    summary = summarize(_three_requests(), slo=slo)
    assert summary.good_completed == good
    assert summary.request_goodput == pytest.approx(good / 6.0)
    assert summary.slo == slo


def test_to_dict_is_flat_and_complete():
    row = summarize(_three_requests(), slo=SLO(ttft=1.0)).to_dict()
    assert row["completed"] == 3 and row["duration_s"] == 6.0
    assert row["ttft_p90_s"] == pytest.approx(1.8)
    assert row["tpot_count"] == 2 and row["itl_count"] == 6
    assert row["e2e_latency_median_s"] == pytest.approx(2.5)
    assert row["slo_ttft_s"] == 1.0 and row["slo_tpot_s"] is None
    assert row["request_goodput"] == pytest.approx(2 / 6)
    assert all(not isinstance(value, (dict, list, tuple)) for value in row.values())
    plain = summarize(_three_requests()).to_dict()
    assert set(plain) == set(row)
    assert plain["request_goodput"] is None


def test_request_rows():
    rows = request_rows(_three_requests())
    assert [row["request_id"] for row in rows] == ["A", "B", "C"]
    assert rows[0]["tpot_s"] == 0.75 and math.isnan(rows[1]["tpot_s"])
    assert rows[2]["ttft_s"] == 0.5 and rows[2]["e2e_latency_s"] == 4.0


def test_all_single_token_outputs_give_nan_tpot_and_itl():
    timings = [RequestTiming(f"r{i}", 5, 1, 0.0, 0.5 + i, 0.5 + i, (0.5 + i,)) for i in range(3)]
    summary = summarize(timings)
    assert summary.tpot.count == 0 and math.isnan(summary.tpot.mean) and math.isnan(summary.tpot.p99)
    assert summary.itl.count == 0 and math.isnan(summary.itl.median)
    assert summary.ttft.mean == pytest.approx(1.5)
    assert summary.good_completed is None
    assert summarize(timings, slo=SLO(tpot=1e-6)).good_completed == 3  # TPOT counts as 0


def test_missing_token_times_contribute_no_itl():
    timing = RequestTiming("x", 4, 3, 0.0, 1.0, 3.0)
    assert timing.itls == ()
    summary = summarize([timing])
    assert summary.itl.count == 0 and summary.tpot.mean == pytest.approx(1.0)


def test_empty_and_bad_inputs():
    with pytest.raises(ValueError, match="at least one RequestTiming"):
        summarize([])
    with pytest.raises(ValueError, match="duplicate request_id"):
        summarize(_three_requests() + [_three_requests()[0]])
    with pytest.raises(ValueError, match="duration must be"):
        summarize(_three_requests(), duration=0.0)
    with pytest.raises(ValueError, match="pass duration explicitly"):
        summarize([RequestTiming("z", 1, 1, 2.0, 2.0, 2.0, (2.0,))])
    with pytest.raises(ValueError, match="at least one bound"):
        SLO()
    with pytest.raises(ValueError, match="SLO.tpot"):
        SLO(tpot=-1.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"output_len": 0}, "output_len must be an int >= 1"),
        ({"first_token_time": -1.0}, "before arrival_time"),
        ({"finish_time": 0.5}, "before first_token_time"),
        ({"token_times": (1.0, 1.5)}, "token_times has 2 entries"),
        ({"token_times": (1.1, 1.5, 2.0)}, r"token_times\[0\]"),
        ({"token_times": (1.0, 2.0, 1.5)}, "non-decreasing"),
        ({"token_times": (1.0, 1.5, 2.5)}, "after finish_time"),
        ({"arrival_time": float("nan")}, "arrival_time must be a finite number"),
    ],
)
def test_request_timing_validation(kwargs, message):
    fields = {
        "request_id": "q",
        "prompt_len": 4,
        "output_len": 3,
        "arrival_time": 0.0,
        "first_token_time": 1.0,
        "finish_time": 2.0,
        "token_times": (1.0, 1.5, 2.0),
    }
    fields.update(kwargs)
    with pytest.raises(ValueError, match=message):
        RequestTiming(**fields)


def test_compute_stats_matches_numpy_linear_percentiles():
    values = np.random.Generator(np.random.PCG64(0)).exponential(1.0, size=101)
    stats = compute_stats(values)
    assert stats.p90 == pytest.approx(np.percentile(values, 90, method="linear"))
    assert stats.p99 == pytest.approx(np.percentile(values, 99, method="linear"))
    assert stats.std == pytest.approx(np.std(values))
    assert stats.count == 101


# ---------------------------------------------------------------------------------------------- sliced throughput


def _finishing_at(times) -> list[RequestTiming]:
    return [RequestTiming(f"r{i}", 1, 1, 0.0, t, t, (t,)) for i, t in enumerate(times)]


def _neo_reference(finish_times) -> float:
    """NEO's evaluation/benchmark.py run_throughput_test, verbatim in effect."""
    n = len(finish_times)
    kept = sorted(finish_times)[n // 10 : n - n // 10 * 3 + 1]
    return (len(kept) - 1) / (kept[-1] - kept[0])


def test_sliced_throughput_hand_computed():
    times = [float(i * i) for i in range(10)]  # 0 1 4 9 16 25 36 49 64 81
    # default 10%-70%: indices 1..7 -> 6 completions over 49 - 1 seconds
    assert sliced_throughput(_finishing_at(times)) == pytest.approx(6 / 48)
    # 30%-70%: indices 3..7 -> 4 over 49 - 9
    assert sliced_throughput(_finishing_at(times), low=0.3, high=0.7) == pytest.approx(4 / 40)
    # the whole run: 9 completions over 81 s
    assert sliced_throughput(_finishing_at(times), low=0.0, high=1.0) == pytest.approx(9 / 81)


@pytest.mark.parametrize("count", [10, 20, 100, 2000])
def test_sliced_throughput_matches_neo_code(count):
    finishes = np.cumsum(np.random.Generator(np.random.PCG64(count)).exponential(0.2, size=count)).tolist()
    shuffled = list(reversed(finishes))  # order of the input does not matter
    assert sliced_throughput(_finishing_at(shuffled)) == pytest.approx(_neo_reference(finishes))


def test_sliced_throughput_errors():
    with pytest.raises(ValueError, match="fewer than 2"):
        sliced_throughput(_finishing_at([1.0, 2.0]), low=0.5, high=0.6)
    with pytest.raises(ValueError, match="0 <= low < high <= 1"):
        sliced_throughput(_finishing_at([1.0, 2.0]), low=0.7, high=0.3)
    with pytest.raises(ValueError, match="same time"):
        sliced_throughput(_finishing_at([1.0] * 10))
    with pytest.raises(ValueError, match="at least one"):
        sliced_throughput([])


def test_parse_goodput_reads_vllms_form_in_milliseconds():
    from apexlib.core.metrics import parse_goodput

    assert parse_goodput(["ttft:500", "tpot:50", "e2el:20000"]) == SLO(ttft=0.5, tpot=0.05, e2e=20.0)
    assert parse_goodput(["tpot:150"]) == SLO(tpot=0.15)
    for bad, needle in ((["ttfb:5"], "KEY one of"), (["tpot"], "KEY one of"), (["tpot:fast"], "not a number"),
                        (["tpot:0"], "> 0"), (["tpot:1", "tpot:2"], "twice"), ([], "at least one")):
        with pytest.raises(ValueError, match=needle):
            parse_goodput(bad)
