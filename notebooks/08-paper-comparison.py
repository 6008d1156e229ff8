# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 08 · Our numbers beside the paper's
#
# APEX reports throughput gains over vLLM of +84-96% on a T4 and +11-89% on an A10 (at vLLM's latency),
# and over the best hybrid scheduler (NEO) of up to +49% (v2) / +72% (v4) on a T4 and +37% on an A10
# (`data/paper/reported.csv`, with sources). Our gains come from notebook 03's **simulated** grid (roofline
# cost models; GPU-only is our vLLM-like baseline), so this table compares a reproduction by simulation,
# not by measurement on those GPUs. NEO appears twice: **NEO (published runtime)** models NEO as its public
# code runs (its scheduler's slack rule with its 0.8 ms per-stage launch charge, and its CPU attention as a
# blocking call on the thread that launches GPU kernels), the baseline the paper measured; **NEO policy on
# apexlib's runtime** is NEO's decision rule on our two-thread runtime. APEX's gain over the first includes
# the runtime; over the second it is the scheduling rule alone.
#
# vLLM also appears twice: **GPU-only** is vLLM's default (a preempted request is recomputed), and
# **vLLM + CPU KV offload** is what a user of vLLM >= 0.11 on a small GPU can turn on
# (`--kv-offloading-backend native`: a preempted request's KV waits in host memory and is loaded back;
# still no CPU attention). The last table gives every policy's distance to the **bound**, the best
# throughput any schedule reaches on the same cost model (`apexlib.sim.bound`).

# %% tags=["parameters"]
# Parameters (papermill overrides these)
quick = False            # a small grid (the CI smoke test); writes under build/quick/
run_experiments = True   # False: rebuild the figures from data/results alone
model = "smollm2"        # measured runs: a named checkpoint (smollm2), a tiny preset (demo) or a directory

# %%
EXPERIMENT = "08-paper-comparison"
# the same setup in every notebook: not every notebook uses every import
import json  # noqa: F401
from pathlib import Path  # noqa: F401

import pandas as pd  # noqa: F401
from IPython.display import display  # noqa: F401

from apexlib import plots

results_dir, figures_dir = plots.notebook_setup(EXPERIMENT, quick)

# %%
from apexlib.costs.assumptions import assumptions_table

# The assumptions behind our gains, with the range their error bars span
display(pd.DataFrame(assumptions_table())[["name", "low", "central", "high", "unit", "source"]])
reported = pd.read_csv("../data/paper/reported.csv")
display(reported[reported["system"] == "APEX"][["source", "baseline", "gpu", "setting", "metric", "value",
                                                "unit"]])
simulated_dir = plots.output_paths("03-offline-throughput", quick)[0]
simulated = pd.read_csv(simulated_dir / "simulated.csv")
by = ("hardware", "model", "scenario")
simulated_policies = simulated[simulated["policy"] != "bound"]
vs_vllm = plots.gain_over_baseline(simulated_policies, x="setting", by=by, baseline="gpu_only")
vs_vllm_offload = plots.gain_over_baseline(simulated_policies, x="setting", by=by, baseline="vllm_offload")
vs_neo = plots.gain_over_baseline(simulated_policies, x="setting", by=by, baseline="neo")
vs_neo_published = plots.gain_over_baseline(simulated_policies, x="setting", by=by, baseline="neo_published")


def paper_range(gpu, baseline):
    rows = reported[(reported["system"] == "APEX") & (reported["gpu"] == gpu)
                    & (reported["baseline"] == baseline)]
    values = [str(v) for v in rows["value"]]
    lows = [float(v.partition("-")[0]) if "-" in v else 0.0 for v in values]
    highs = [float(v.partition("-")[2] or v) for v in values]
    return min(lows), max(highs)


comparison = []
for hardware, gpu in (("t4", "T4"), ("a10g-16vcpu", "A10")):
    for frame, baseline, label in ((vs_vllm, "vLLM", "vs vLLM (GPU-only)"),
                                   (vs_vllm_offload, "vLLM", "vs vLLM + CPU KV offload"),
                                   (vs_neo_published, "best hybrid (NEO)", "vs NEO (published runtime)"),
                                   (vs_neo, "best hybrid (NEO)", "vs NEO policy on our runtime")):
        ours = frame[(frame["hardware"] == hardware) & (frame["policy"] == "apex")]
        if ours.empty:
            continue
        central = ours[ours["scenario"] == "central"]["gain_percent"]
        low, high = paper_range(gpu, baseline)
        comparison.append({"setting": f"{gpu} {label}", "ours_min": ours["gain_percent"].min(),
                           "ours": ours["gain_percent"].max(), "central_min": central.min(),
                           "central_max": central.max(), "paper_low": low, "paper_high": high,
                           "difference_points": central.max() - high})
comparison = pd.DataFrame(comparison)
comparison.to_csv(results_dir / "comparison.csv", index=False)
display(comparison.round(1))

# %%
caption = ("apexlib: simulated from roofline cost models (notebook 03); bar: min..max gain over the grid and "
           "the assumptions' low..high corners; paper: reported range (data/paper/reported.csv; for NEO the "
           "paper's 'up to' figures: 49 (v2) and 72 (v4) on T4, 37 on A10). Llama-2-7B (T4, A10), "
           "Llama-3.1-8B (A10), fp16")
fig = plots.paper_comparison(comparison, title="APEX throughput gain: this reproduction vs the paper",
                             caption=caption)
plots.save_figure(fig, "08-paper-comparison", figures_dir)


# %% [markdown]
# ## Which vLLM the paper's number is nearer
#
# The paper measured vLLM as it ran then, without KV offloading: a preempted request is recomputed.
# Offloading replaces the recompute by PCIe copies, but a request whose KV is in host memory still
# cannot decode until it is back on the GPU, so the GPU's KV capacity stays the limit; the rows above
# say how much of APEX's gain survives against it, next to the paper's range.

# %%
vllm_rows = comparison[comparison["setting"].str.contains("vLLM")]
display(vllm_rows[["setting", "central_min", "central_max", "paper_low", "paper_high"]].round(1))

# %% [markdown]
# ## Distance to the bound
#
# Each policy's throughput as a fraction of the bound at the same grid point and assumptions
# (central, and the min..max over the grid and the assumptions' corners). The bound is an upper limit,
# not a target: it lets every iteration use the whole KV capacity with no ramp-up or drain, and lets
# each tier take any mix of the workload's contexts that the totals allow (`apexlib.sim.bound`).

# %%
fractions = plots.fraction_of_bound(simulated, keys=["hardware", "model", "setting", "scenario"])
fractions = fractions[fractions["policy"] != "bound"]
gap = (fractions.groupby(["hardware", "model", "policy"])["fraction_of_bound"].agg(["min", "max"])
       .join(fractions[fractions["scenario"] == "central"].groupby(["hardware", "model", "policy"])
             ["fraction_of_bound"].agg(["min", "max"]).rename(columns={"min": "central_min", "max": "central_max"})))
gap = gap.reset_index()
gap["policy"] = gap["policy"].map(plots.policy_label)
gap.to_csv(results_dir / "fraction_of_bound.csv", index=False)
display(gap.round(3))

# %%
ranged = plots.with_scenario_range(fractions, keys=["hardware", "model", "setting", "policy"], y="fraction_of_bound")
ranged["gpu / model"] = ranged["hardware"] + " · " + ranged["model"]
caption = ("apexlib: simulated from roofline cost models (notebook 03); bars: each policy's throughput over the "
           "bound of the same grid point (apexlib.sim.bound) at the central assumptions, error bars: the same "
           "fraction at the assumptions' low..high corners. Llama-2-7B (T4, A10G), Llama-3.1-8B (A10G), fp16, "
           "100 requests, offline")
fig = plots.throughput_by_policy(ranged, x="setting", col="gpu / model", y="fraction_of_bound",
                                 ylabel="fraction of the bound", title="Distance to the bound (simulated)",
                                 caption=caption)
plots.save_figure(fig, "08-fraction-of-bound", figures_dir)
