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
# # 02 · Cost-model accuracy and decision overhead
#
# Runs a varied workload through the real engine once per execution mode (GPU-only, asynchronous
# overlap, asymmetric pipelining) with subtask timing on, and compares every iteration's measured time
# with the `TableCostModel`'s prediction from notebook 01's profile. Goal: median error <= 10%, the
# prediction's own time <= 1% of the iteration. Measured on this machine (device=cpu) on `model`
# (SmolLM2-135M-Instruct by default), with notebook 01's profile of the same model.

# %% tags=["parameters"]
# Parameters (papermill overrides these)
quick = False            # a small grid (the CI smoke test); writes under build/quick/
run_experiments = True   # False: rebuild the figures from data/results alone
model = "smollm2"        # measured runs: a named checkpoint (smollm2), a tiny preset (demo) or a directory
device = "cpu"

# %%
EXPERIMENT = "02-cost-model-accuracy"
# the same setup in every notebook: not every notebook uses every import
import json  # noqa: F401
from pathlib import Path  # noqa: F401

import pandas as pd  # noqa: F401
from IPython.display import display  # noqa: F401

from apexlib import plots

results_dir, figures_dir = plots.notebook_setup(EXPERIMENT, quick)

# %%
from apexlib.costs import TableCostModel
from apexlib.profiling.accuracy import check_profile
from apexlib.profiling.profiler import ProfileSettings

chosen = plots.notebook_model(model)
profile_path = plots.current_profile(quick, chosen.label)
rows_path = results_dir / "iterations.csv"
if run_experiments:
    settings = ProfileSettings(model=chosen.checkpoint(), device=device,
                               dtype="float32" if device == "cpu" else "auto", progress=False)
    workload = [(16 + 23 * i % 200, 8 + 7 * i % 40) for i in range(8 if quick else 24)]
    report = check_profile(settings, TableCostModel.from_file(profile_path), workload=workload)
    rows = pd.DataFrame([r for run in report["runs"].values() for r in run["rows"]])
    rows.to_csv(rows_path, index=False)
    (results_dir / "summary.json").write_text(json.dumps({k: report[k] for k in ("by_mode", "all")},
                                                         indent=2))
rows = pd.read_csv(rows_path)
rows["relative_error"] = (rows["predicted"] - rows["measured"]) / rows["measured"]
rows["overhead_fraction"] = rows["predict_seconds"] / rows["measured"]
table = rows.groupby("mode").agg(iterations=("measured", "size"),
                                 median_abs_error=("relative_error", lambda e: e.abs().median()),
                                 p90_abs_error=("relative_error", lambda e: e.abs().quantile(0.9)),
                                 median_overhead=("overhead_fraction", "median"))
display(table.style.format({c: "{:.1%}" for c in table.columns if c != "iterations"}))

# %%
profile = json.loads(Path(profile_path).read_text())
info = profile["provenance"]
caption = plots.provenance_caption(
    executor="engine", source=f"{info['cpu_model']} (device={info['device']}), "
    f"profile {Path(profile_path).name}", model=profile["model"].get("title", profile["model"]["name"]),
    workload=f"{len(rows)} iterations of mixed prefill/decode, squeezed GPU tier")
fig = plots.prediction_error(rows, title="Predicted vs measured iteration time", caption=caption)
plots.save_figure(fig, "02-cost-model-accuracy", figures_dir)
