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
# # 01 · Profile the hardware
#
# Measures every subtask the cost model predicts (linear work vs tokens, prefill attention, device
# and CPU decode attention vs batch and context, copies, launch overhead) through the real runner, on
# this machine: with no GPU the "device" is the CPU (`device=cpu`) and the model SmolLM2-135M-Instruct
# (`model = "smollm2"`, real weights streamed from DRAM every step); on a GPU VM give `model` (a
# checkpoint directory) and `device="cuda"`. Writes
# `data/profiles/<device>-<model>.json` with full provenance, which notebooks 02, 03 and 07 use.

# %% tags=["parameters"]
# Parameters (papermill overrides these)
quick = False            # a small grid (the CI smoke test); writes under build/quick/
run_experiments = True   # False: rebuild the figures from data/results alone
model = "smollm2"        # measured runs: a named checkpoint (smollm2), a tiny preset (demo) or a directory
device = "cpu"

# %%
EXPERIMENT = "01-profile-hardware"
# the same setup in every notebook: not every notebook uses every import
import json  # noqa: F401
from pathlib import Path  # noqa: F401

import pandas as pd  # noqa: F401
from IPython.display import display  # noqa: F401

from apexlib import plots

results_dir, figures_dir = plots.notebook_setup(EXPERIMENT, quick)

# %%
from apexlib.profiling.profiler import ProfileSettings, default_profile_path, profile_model, write_profile

profiles_dir = results_dir.parents[1] / "profiles"
chosen = plots.notebook_model(model)
if run_experiments:
    settings = ProfileSettings(model=chosen.checkpoint(), device=device,
                               dtype="float32" if device == "cpu" else "auto", quick=quick, progress=False,
                               command="notebooks/01-profile-hardware.ipynb")
    profile = profile_model(settings)
    profile_path = write_profile(profile, profiles_dir / default_profile_path(profile).name)
else:
    profile_path = plots.find_profile(profiles_dir, chosen.label)
profile = json.loads(Path(profile_path).read_text())
info = profile["provenance"]
print(profile_path, "|", profile["label"])

# %%
import matplotlib.pyplot as plt

tables = profile["tables"]
fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
axes[0].plot(tables["linear"]["num_tokens"], [s * 1e3 for s in tables["linear"]["seconds"]], "o-")
axes[0].set(xscale="log", xlabel="tokens in the iteration", ylabel="ms (whole model)", title="linear work")
axes[1].plot(tables["gpu_prefill_attention"]["prompt_length"],
             [s * 1e3 for s in tables["gpu_prefill_attention"]["seconds"]], "o-")
axes[1].set(xscale="log", xlabel="prompt length", ylabel="ms", title="device prefill attention")
for axis, key, label in ((axes[2], "gpu_decode_attention", "device"),
                         (axes[3], "cpu_decode_attention", "CPU")):
    table = tables[key]
    for batch, row in zip(table["batch"], table["seconds"], strict=True):
        axis.plot(table["context_length"], [s * 1e3 for s in row], "o-", label=f"batch {batch}")
    axis.set(xscale="log", yscale="log", xlabel="context per sequence", ylabel="ms",
             title=f"{label} decode attention")
axes[3].legend(fontsize=7)
for axis in axes:
    axis.xaxis.set_minor_formatter(plt.NullFormatter())
    axis.yaxis.set_minor_formatter(plt.NullFormatter())
caption = plots.provenance_caption(executor="engine", source=f"{info['device_name']} ({info['cpu_model']}, "
                                   f"{info['cpu_count']} CPUs), {info['date_utc'][:10]}",
                                   model=profile["model"].get("title", profile["model"]["name"]),
                                   workload="synthetic profiling batches")
fig = plots._finish(fig, "Measured subtask times (the cost model's tables)", caption)
plots.save_figure(fig, "01-profile", figures_dir)
