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
# # 03 · Offline throughput: APEX vs NEO vs GPU-only (vLLM-like)
#
# The paper's main comparison over its workload grid (decode-heavy: short prompts, long outputs).
# Two vLLM baselines: **GPU-only** (vLLM's default: a preempted request is recomputed) and **vLLM + CPU
# KV offload** (`--kv-offloading-backend native`: a preempted request's KV waits in host memory and comes
# back over PCIe; no CPU attention). Beside every bar: the **bound**, the best throughput any schedule
# can reach on the same cost model (`apexlib.sim.bound`, a linear program), and each policy's fraction
# of it.
#
# * **Simulated** (this machine has no T4/A10): the engine's own scheduler and policies on a virtual
#   clock, timed by a roofline cost model of each GPU + host (datasheet bandwidths; efficiency factors
#   documented in `apexlib.costs`). The GPU KV pool is what the GPU has left after the fp16
#   weights; the CPU tier is `cpu_kv_gib`. Every simulated figure says so.
# * **Measured**: the same three policies through the real engine on this machine (device=cpu,
#   `model`, SmolLM2-135M-Instruct by default, a GPU tier squeezed to force CPU-resident requests),
#   deciding on notebook 01's profile.

# %% tags=["parameters"]
# Parameters (papermill overrides these)
quick = False            # a small grid (the CI smoke test); writes under build/quick/
run_experiments = True   # False: rebuild the figures from data/results alone
model = "smollm2"        # measured runs: a named checkpoint (smollm2), a tiny preset (demo) or a directory
hardware_models = [("t4", "llama-2-7b"), ("a10g-16vcpu", "llama-2-7b"), ("a10g-16vcpu", "llama-3.1-8b")]
policies = ["gpu_only", "vllm_offload", "neo_published", "neo", "apex"]
cpu_kv_gib = 20.0
prompt_centers = [128, 512]
output_centers = [256, 1024]
num_requests = 100        # per grid point, as NEO's evaluation scripts default to

# %%
EXPERIMENT = "03-offline-throughput"
# the same setup in every notebook: not every notebook uses every import
import json  # noqa: F401
from pathlib import Path  # noqa: F401

import pandas as pd  # noqa: F401
from IPython.display import display  # noqa: F401

from apexlib import plots

results_dir, figures_dir = plots.notebook_setup(EXPERIMENT, quick)

# %%
from apexlib.costs import datasheet_roofline

measured_model = plots.notebook_model(model)  # the measured part's model (`model` names shapes below)

# %% [markdown]
# ## Assumptions and their ranges
#
# The roofline needs numbers nobody has measured on these machines (efficiencies, host DRAM, copy and
# launch costs). Each has a low, central and high value with its reason (`apexlib.costs.assumptions`);
# every simulated bar is the central value, and its error bar the range of results between the two
# corners of that box (`offload-adverse`: slow host beside an efficient GPU; `offload-friendly`: the
# opposite).
# %%
from apexlib.costs.assumptions import SCENARIOS, assumptions_table, scenario_cost_model
from apexlib.sim.batch import SimulationJob, simulate_rows
from apexlib.sim.bound import simulated_bound
from apexlib.workloads import get_preset, input_output_grid

display(pd.DataFrame(assumptions_table())[["name", "low", "central", "high", "unit", "source"]])
scenarios = SCENARIOS
if quick:
    hardware_models, prompt_centers, output_centers, num_requests = hardware_models[:1], [128], [256], 40
    scenarios = ("central", "offload-adverse")
simulated_path = results_dir / "simulated.csv"
if run_experiments:
    jobs = []
    for hardware, model in hardware_models:
        for workload in input_output_grid(prompt_centers, output_centers, num_requests=num_requests, seed=0):
            for scenario in scenarios:
                cost = scenario_cost_model(datasheet_roofline(hardware, model), scenario)
                for policy in policies:
                    jobs.append(SimulationJob(
                        workload, cost,
                        dict(model=model, policy=policy, cpu_kv_gib=cpu_kv_gib, dtype="float16",
                             max_model_len=workload.max_total_len),
                        dict(hardware=hardware, model=model, policy=policy, scenario=scenario,
                             setting=workload.name.removeprefix("grid-"))))
    rows = simulate_rows(jobs, description="03 grid")
    # the bound of every grid point and scenario, with the KV tiers a hybrid policy gets
    for job in jobs:
        if job.labels["policy"] == "apex":
            bound = simulated_bound(job.workload, cost_model=job.cost_model, **job.options)
            rows.append(bound.summary_row(**{**job.labels, "policy": "bound"}))
    pd.DataFrame(rows).to_csv(simulated_path, index=False)
simulated = pd.read_csv(simulated_path)
keys = ["hardware", "model", "setting", "policy"]
central = plots.with_scenario_range(simulated, keys=keys)
point = ["hardware", "model", "setting", "scenario"]
fractions = plots.fraction_of_bound(simulated, keys=point)
display(fractions[fractions["policy"] != "bound"].pivot_table(
    index=["hardware", "model", "setting"], columns=["policy", "scenario"], values="fraction_of_bound").round(3))
gains = plots.gain_over_baseline(simulated[simulated["policy"] != "bound"], x="setting",
                                 by=("hardware", "model", "scenario"))
best_other = (simulated[~simulated["policy"].isin(["apex", "bound"])].groupby(point)
              ["output_throughput"].max().rename("best_baseline"))
apex_ratio = simulated[simulated["policy"] == "apex"].join(best_other,
                                                           on=["hardware", "model", "setting", "scenario"])
apex_ratio["apex_over_best"] = apex_ratio["output_throughput"] / apex_ratio["best_baseline"]
display(apex_ratio.pivot_table(index=["hardware", "model", "setting"], columns="scenario",
                               values="apex_over_best").round(3))
display(gains[gains["scenario"] == "central"].pivot_table(index=["hardware", "model", "setting"],
                                                          columns="policy", values="gain_percent").round(1))

# %%
central["gpu / model"] = central["hardware"] + " · " + central["model"]
caption = plots.provenance_caption(
    executor="simulator",
    source="roofline cost models of " + ", ".join(sorted(set(central["hardware"])))
    + f" (+{cpu_kv_gib:g} GiB CPU KV); bars: central assumptions, error bars: their low..high corners; "
    "hatched: the bound (apexlib.sim.bound), numbers: fraction of it",
    model="Llama-2-7B / Llama-3.1-8B fp16 shapes",
    workload=f"grid of prompt x output centers +-10%, {num_requests} requests, offline")
fig = plots.throughput_by_policy(central, x="setting", col="gpu / model",
                                 title="Offline output throughput (simulated)", caption=caption)
plots.save_figure(fig, "03-offline-throughput-simulated", figures_dir)

# %% [markdown]
# ## Where APEX's distance to the bound goes
#
# The bound's best schedule (below: the one without recompute, per iteration) runs the same iteration for
# the whole run. A run cannot: it starts with every prompt to prefill, and it ends in a **drain**, where
# the waiting queue is empty and fewer requests are left than the bound's iteration advances; no schedule
# can run the bound's iteration there. APEX's run (central assumptions, its iteration trace) is split into
# prefill iterations, drain iterations and the rest ("steady"); `steady / bound` compares its steady rate
# with the bound.

# %%
gap_path = results_dir / "bound_gap.csv"
if run_experiments:
    from apexlib.sim.simulator import simulate

    gap_rows = []
    for job in jobs:
        if job.labels["policy"] != "apex" or job.labels["scenario"] != "central":
            continue
        bound = simulated_bound(job.workload, cost_model=job.cost_model, **job.options).without_recompute
        kinds = bound.schedule.values()
        per_iteration = (sum(k["iterations"] * (k["gpu_decodes"] + k["cpu_decodes"]) for k in kinds)
                         / sum(k["iterations"] for k in kinds))
        trace = simulate(job.workload, cost_model=job.cost_model, **job.options).iterations.to_dataframe()
        tokens = trace["num_gpu_decodes"] + trace["num_cpu_decodes"]
        drain = (trace["num_waiting"] == 0) & (trace["num_running"] < per_iteration)
        prefill = trace["num_prefill_tokens"] > 0
        steady = ~drain & ~prefill
        total = trace["duration"].sum()
        gap_rows.append({**job.labels, "bound_without_recompute": bound.output_throughput,
                         "bound_decodes_per_iteration": per_iteration,
                         "bound_modes": "+".join(bound.schedule),
                         "prefill_time_share": trace.loc[prefill, "duration"].sum() / total,
                         "drain_time_share": trace.loc[drain & ~prefill, "duration"].sum() / total,
                         "steady_rate": tokens[steady].sum() / trace.loc[steady, "duration"].sum()
                         if steady.any() else float("nan")})
    pd.DataFrame(gap_rows).to_csv(gap_path, index=False)
gap = pd.read_csv(gap_path)
gap["steady_over_bound"] = gap["steady_rate"] / gap["bound_without_recompute"]
display(gap[["hardware", "model", "setting", "bound_modes", "bound_decodes_per_iteration", "prefill_time_share",
             "drain_time_share", "steady_over_bound"]].round(3))

# %% [markdown]
# ## Measured on this machine (device=cpu, `model`: SmolLM2-135M-Instruct by default)

# %%
from apexlib.bench.benchmark import run_benchmark
from apexlib.engine.settings import BenchmarkSettings

measured_path = results_dir / "measured.csv"
if run_experiments:
    workload = get_preset("tiny-decode-heavy", num_requests=12 if quick else 48)
    profile_path = plots.current_profile(quick, measured_model.label)
    rows = []
    for policy in policies:
        settings = BenchmarkSettings.create(model=measured_model.checkpoint(), policy=policy, device="cpu", dtype="float32",
                                            num_gpu_blocks=24, num_cpu_blocks=2048, warmup_requests=2,
                                            cost_model=str(profile_path))
        result = run_benchmark(workload, settings, progress=False, experiment=EXPERIMENT)
        rows.append(result.labelled_summary(policy=policy, setting=workload.name))
    pd.DataFrame(rows).to_csv(measured_path, index=False)
measured = pd.read_csv(measured_path)
display(measured[["policy", "output_throughput", "tpot_mean_s", "ttft_median_s", "engine_iterations",
                  "engine_mode_counts"]])
caption = plots.provenance_caption(
    executor="engine",
    source=f"{measured['cpu_model'].iloc[0]} ({measured['cpu_count'].iloc[0]} CPUs, device=cpu)",
    model=plots.notebook_model(measured["model_path"].iloc[0]).title,
    workload=f"{measured['workload'].iloc[0]}, GPU tier squeezed to 24 blocks")
fig = plots.throughput_by_policy(measured, x="setting", title="Offline output throughput (measured)",
                                 caption=caption)
plots.save_figure(fig, "03-offline-throughput-measured", figures_dir)
