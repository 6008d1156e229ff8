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
# # 07 · Simulator fidelity
#
# The simulated figures are only as good as the simulator. Here the same workload runs through the
# real engine on this machine (device=cpu, `model`: SmolLM2-135M-Instruct by default, squeezed GPU tier)
# and through the simulator, per policy; the table reports the relative error of output throughput and mean TPOT.
# Target: within 10% (`tests/test_fidelity.py` asserts it in `make test-all`).
#
# The profile and the engine runs interleave (`fresh_profile`): a profile is measured, each policy runs
# once on the engine (deciding with it), a profile is measured again, and so on for `repeats` rounds;
# each round is compared with the simulator on the profile measured right before it, and the table
# reports the median error over the rounds (`error_*_rounds` lists them, `profile_linear_drift_rounds`
# each round's profile level against the first). A VM's speed moves by 10-20% from one minute to the
# next; this way the drift moves both sides instead of counting as simulator error.

# %% tags=["parameters"]
# Parameters (papermill overrides these)
quick = False            # a small grid (the CI smoke test); writes under build/quick/
run_experiments = True   # False: rebuild the figures from data/results alone
model = "smollm2"        # measured runs: a named checkpoint (smollm2), a tiny preset (demo) or a directory
policies = ["gpu_only", "neo", "apex"]
num_requests = 32
fresh_profile = True     # measure a profile before every round (False: notebook 01's, for every round)
repeats = 3              # rounds: (profile,) one engine run per policy, alternating order
profile_grid = {"decode_batches": (1, 4, 16, 32), "hybrid_cpu_batches": (2, 8, 16, 32)}  # quick grid + these

# %%
EXPERIMENT = "07-simulator-fidelity"
# the same setup in every notebook: not every notebook uses every import
import json  # noqa: F401
from pathlib import Path  # noqa: F401

import pandas as pd  # noqa: F401
from IPython.display import display  # noqa: F401

from apexlib import plots

results_dir, figures_dir = plots.notebook_setup(EXPERIMENT, quick)

# %%
import statistics

from apexlib.bench.fidelity import fidelity, machine_drift
from apexlib.costs import TableCostModel
from apexlib.engine.settings import BenchmarkSettings
from apexlib.profiling.profiler import ProfileSettings, profile_model, write_profile
from apexlib.workloads import get_preset

if quick:  # the smoke test: notebook 01's quick profile, measured minutes before, and one run per policy
    num_requests, repeats, fresh_profile = 8, 1, False
path = results_dir / "fidelity.csv"
chosen = plots.notebook_model(model)
if run_experiments:
    profile_path = plots.current_profile(quick, chosen.label)
    workload = get_preset("tiny-decode-heavy", num_requests=num_requests)
    settings = BenchmarkSettings.create(model=chosen.checkpoint(), device="cpu", dtype="float32", num_gpu_blocks=24,
                                        num_cpu_blocks=2048, warmup_requests=2)
    measured_profiles = []

    def measure_profile():
        """A profile measured now, before each round (written beside the results)."""
        fresh = profile_model(ProfileSettings(model=chosen.checkpoint(), quick=True, grid=profile_grid,
                                              progress=False, command="notebook 07 (profile before a round)"))
        measured_profiles.append(write_profile(fresh, results_dir / f"profile-round{len(measured_profiles)}.json"))
        return TableCostModel(fresh)

    table = fidelity(workload, settings, measure_profile if fresh_profile else profile_path, policies=policies,
                     repeats=repeats)
    if fresh_profile:
        def linear_table(file):
            table = json.loads(Path(file).read_text())["tables"]["linear"]
            return dict(zip(table["num_tokens"], table["seconds"], strict=True))

        reference, first = linear_table(profile_path), linear_table(measured_profiles[0])
        ratios = [first[n] / reference[n] for n in first.keys() & reference.keys() if reference[n] > 0]
        print(f"first round's profile vs notebook 01's: linear table x{statistics.median(ratios):.3f} (median)")
        profile_path = measured_profiles[0]
    table.assign(profile=str(profile_path)).to_csv(path, index=False)
    # how steady this machine was right after the runs (a fixed single-thread load, in the LLC and in L2)
    drift = machine_drift(seconds=1.0 if quick else 20.0)
    (results_dir / "machine_drift.json").write_text(json.dumps(drift, indent=1) + "\n")
drift_path = results_dir / "machine_drift.json"
if drift_path.exists():
    for form, numbers in json.loads(drift_path.read_text()).items():
        print(f"machine drift ({form}): {numbers['min_us']:.1f}-{numbers['max_us']:.1f} us per op, "
              f"median {numbers['median_us']:.1f}, spread x{numbers['spread']:.2f}")
table = pd.read_csv(path)
display(table[["policy", "engine_output_throughput", "sim_output_throughput", "error_output_throughput",
               "engine_tpot_mean_s", "sim_tpot_mean_s", "error_tpot_mean_s", "iteration_error_median",
               "engine_mode_counts", "load_average_1min"]
              + [c for c in ("engine_output_throughput_runs", "error_output_throughput_rounds",
                             "error_tpot_mean_s_rounds", "profile_linear_drift_rounds") if c in table.columns]])

# %%
import matplotlib.pyplot as plt
import seaborn as sns

error_columns = {"error_output_throughput": "output throughput", "error_tpot_mean_s": "mean TPOT"}
long = table.melt(id_vars=["policy"], value_vars=list(error_columns), var_name="metric",
                  value_name="relative_error")
long["metric"] = long["metric"].map(error_columns)
fig, axis = plt.subplots(figsize=(6, 3.4))
sns.barplot(data=long, x="policy", y="relative_error", hue="metric", ax=axis)
axis.axhline(0.1, color="grey", linestyle="--", linewidth=0.8)
axis.axhline(-0.1, color="grey", linestyle="--", linewidth=0.8)
axis.set_ylabel("(simulated - measured) / measured")
caption = plots.provenance_caption(
    executor="engine",
    source="this machine (device=cpu) vs the simulator "
    f"with the profile {Path(table['profile'].iloc[0]).name} measured before the runs",
    model=plots.notebook_model(table["model_path"].iloc[0]).title if "model_path" in table else chosen.title,
    workload=f"tiny-decode-heavy, {num_requests} requests")
fig = plots._finish(fig, "Simulator vs real engine", caption)
plots.save_figure(fig, "07-simulator-fidelity", figures_dir)
