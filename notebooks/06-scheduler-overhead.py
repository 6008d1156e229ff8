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
# # 06 · Scheduler decision overhead
#
# APEX decides every iteration; the decision must be cheap. This measures, on this machine's CPU,
# the time of one `ApexPolicy.decide()` / `NeoPolicy.decide()` as the number of CPU-resident decodes
# grows, next to the iteration time the same cost model predicts for that batch on a T4 with
# Llama-2-7B (so the ratio is decision time over the GPU iteration it schedules).

# %% tags=["parameters"]
# Parameters (papermill overrides these)
quick = False            # a small grid (the CI smoke test); writes under build/quick/
run_experiments = True   # False: rebuild the figures from data/results alone
model = "smollm2"        # measured runs: a named checkpoint (smollm2), a tiny preset (demo) or a directory
hardware = "t4"
simulated_model = "llama-2-7b"  # the shape the simulated runs use
cpu_decode_counts = [8, 32, 128, 512]

# %%
EXPERIMENT = "06-scheduler-overhead"
# the same setup in every notebook: not every notebook uses every import
import json  # noqa: F401
from pathlib import Path  # noqa: F401

import pandas as pd  # noqa: F401
from IPython.display import display  # noqa: F401

from apexlib import plots

results_dir, figures_dir = plots.notebook_setup(EXPERIMENT, quick)

# %%
import time

from apexlib.core.models import model_config_for_shape
from apexlib.core.plan import ScheduledSequence
from apexlib.core.request import SamplingParams
from apexlib.costs import ModelShape, datasheet_roofline
from apexlib.kvcache.manager import Tier
from apexlib.policies import ApexPolicy, NeoPolicy
from apexlib.policies.base import IterationCandidate


# %%
def decodes(prefix, count, context, tier):
    params = SamplingParams(temperature=0)
    return tuple(ScheduledSequence(request_id=f"{prefix}{i}", token_ids=(5,), start_position=context + i - 1,
                                   block_table=(0,), tier=tier, sample=True, sampling_params=params,
                                   num_output_tokens=1) for i in range(count))


if quick:
    cpu_decode_counts = cpu_decode_counts[:2]
path = results_dir / "decision_time.csv"
if run_experiments:
    cost_model = datasheet_roofline(hardware, simulated_model)
    shape = ModelShape.from_config(model_config_for_shape(simulated_model))
    transfer = sum(shape.cpu_token_transfer_bytes("float16"))
    rows = []
    for count in cpu_decode_counts:
        state = IterationCandidate(prefills=(), gpu_decodes=decodes("g", 16, 600, Tier.GPU),
                                   cpu_decodes=decodes("c", count, 800, Tier.CPU))
        for policy in (ApexPolicy(cost_model, transfer), NeoPolicy(cost_model, transfer)):
            policy.decide(state)
            repeats = 20 if quick else 200
            started = time.perf_counter()
            for _ in range(repeats):
                decision = policy.decide(state)
            seconds = (time.perf_counter() - started) / repeats
            rows.append({"policy": policy.name, "cpu_decodes": count, "decision_seconds": seconds,
                         "predicted_iteration_seconds": decision.predicted.total, "mode": decision.mode.value,
                         "chosen_cpu_decodes": len(decision.cpu_decodes)})
    pd.DataFrame(rows).to_csv(path, index=False)
frame = pd.read_csv(path)
frame["overhead_fraction"] = frame["decision_seconds"] / frame["predicted_iteration_seconds"]
display(frame.style.format({"decision_seconds": "{:.2e}", "predicted_iteration_seconds": "{:.4f}",
                            "overhead_fraction": "{:.2%}"}))

# %%
import matplotlib.pyplot as plt
import seaborn as sns

from apexlib.core.host import cpu_info

fig, axis = plt.subplots(figsize=(5.5, 3.4))
sns.lineplot(data=frame, x="cpu_decodes", y="overhead_fraction", hue="policy", marker="o", ax=axis)
axis.set(xscale="log", ylabel="decision time / predicted T4 iteration", xlabel="CPU-resident decodes")
caption = plots.provenance_caption(executor="engine", source=f"{cpu_info()['cpu_model']} (decision time); "
                                   f"iteration time simulated from the {hardware} roofline",
                                   model=f"{simulated_model} fp16", workload="16 GPU decodes + N CPU decodes")
fig = plots._finish(fig, "Scheduler decision overhead", caption)
plots.save_figure(fig, "06-scheduler-overhead", figures_dir)
