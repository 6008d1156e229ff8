"""plots.measured_online draws the measured online table: one line per engine and percentile, rates in order."""

from __future__ import annotations

import pandas as pd
import pytest

from apexlib import plots


def _rows() -> pd.DataFrame:
    rows = []
    for engine, scale in (("apexlib-serve", 1.0), ("vllm-serve", 2.0)):
        for rate in (4.0, 1.0, None, 2.0):
            base = 0.01 * scale * (1 + (rate or 10.0))
            rows.append({"engine": engine, "rate": rate, "workload": "tiny-online", "model_path": "/x/demo",
                         "ttft_median_s": base, "ttft_p99_s": 2 * base, "tpot_median_s": base / 10,
                         "tpot_p99_s": base / 5})
    return pd.DataFrame(rows)


def test_measured_online_draws_each_engine_and_percentile_in_rate_order():
    fig = plots.measured_online(_rows(), cpu="AMD EPYC (2 cores)")
    try:
        ttft, tpot = fig.axes[:2]
        labels = [line.get_label() for line in ttft.get_lines()]
        assert labels == ["apexlib-serve p50", "apexlib-serve p99", "vllm-serve p50", "vllm-serve p99"]
        assert [t.get_text() for t in ttft.get_xticklabels()] == ["1", "2", "4", "all at once"]
        p50 = ttft.get_lines()[0]
        assert list(p50.get_xdata()) == [0, 1, 2, 3]
        assert list(p50.get_ydata()) == pytest.approx([20.0, 30.0, 50.0, 110.0])  # ms, by rate
        assert list(tpot.get_lines()[3].get_ydata()) == pytest.approx([8.0, 12.0, 20.0, 44.0])
        assert "ms" in ttft.get_ylabel() and "TPOT" in tpot.get_ylabel()
        assert "measured" in fig._suptitle.get_text() and "AMD EPYC" in fig._suptitle.get_text()
        assert "tiny-online" in fig.texts[-1].get_text() and fig.axes[1].get_legend() is not None
    finally:
        plots.plt.close(fig)


def test_measured_online_names_missing_columns():
    with pytest.raises(ValueError, match="tpot_p99_s"):
        plots.measured_online(_rows().drop(columns=["tpot_p99_s"]), cpu="x")
