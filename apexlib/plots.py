"""The figure functions the notebooks call (seaborn). Each figure states how its numbers were made.

Every function takes a tidy DataFrame (summary rows from ``apexlib.bench.benchmark`` or
``apexlib.sim.simulator``), draws one figure and returns it; ``save_figure`` writes it to
``figures/<name>.png`` and ``.pdf``. The caption is mandatory: a figure must say whether it is
measured (on which device) or simulated (from which cost model / hardware profile), the model and
the workload.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # headless: papermill and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from apexlib.policies.registry import POLICIES  # noqa: E402

logger = logging.getLogger(__name__)

FIGURES_DIR = Path(__file__).resolve().parents[1] / "figures"
#: the order of the bars in every figure (baselines first, APEX last among the policies)
POLICY_ORDER = ("gpu_only", "vllm_offload", "neo_published", "neo", "apex", "hybrid", "vllm", "bound")
#: the registry's labels, and the two bars that are not policies of the engine
POLICY_LABELS = {**{name: spec.label for name, spec in POLICIES.items()}, "vllm": "vLLM",
                 "bound": "bound (best schedule on the cost model)"}


def policy_label(policy: str) -> str:
    """The name a reader sees for a policy (or a variant label, which is returned as it is)."""
    return POLICY_LABELS.get(policy, policy)


def _labelled(frame: pd.DataFrame, column: str = "policy") -> tuple[pd.DataFrame, list[str]]:
    """``frame`` with its policies replaced by their labels, and the labels in plotting order."""
    order = [policy_label(p) for p in _policy_order(frame, column)]
    return frame.assign(**{column: frame[column].map(policy_label)}), order


def provenance_caption(*, executor: str, source: str, model: str, workload: str) -> str:
    """'simulated from <source>' or 'measured on <source>', plus the model and the workload."""
    how = "simulated from" if executor == "simulator" else "measured on"
    return f"{how} {source} · model {model} · workload {workload}"


def _finish(fig: plt.Figure, title: str, caption: str) -> plt.Figure:
    if not caption:
        raise ValueError("every figure needs a caption saying how its numbers were made")
    fig.suptitle(title, fontsize=11)
    fig.text(0.01, 0.005, caption, fontsize=7, ha="left", va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.05, 1, 0.95))
    return fig


def save_figure(fig: plt.Figure, name: str, directory: str | Path | None = None) -> list[Path]:
    """Write ``<directory>/<name>.png`` and ``.pdf`` (directory: the checkout's ``figures/``)."""
    target = Path(directory) if directory is not None else FIGURES_DIR
    target.mkdir(parents=True, exist_ok=True)
    paths = [target / f"{name}.png", target / f"{name}.pdf"]
    fig.savefig(paths[0], dpi=150, bbox_inches="tight")  # keeps a legend placed beside the axes
    fig.savefig(paths[1], bbox_inches="tight")
    plt.close(fig)
    logger.info("wrote %s", ", ".join(str(p) for p in paths))
    return paths


def _policy_order(frame: pd.DataFrame, column: str = "policy") -> list[str]:
    present = list(dict.fromkeys(frame[column]))
    return [p for p in POLICY_ORDER if p in present] + [p for p in present if p not in POLICY_ORDER]


def throughput_by_policy(frame: pd.DataFrame, *, x: str, title: str, caption: str,
                         y: str = "output_throughput", col: str | None = None,
                         ylabel: str = "output tokens / s") -> plt.Figure:
    """Grouped bars: ``y`` per ``x`` setting, one bar per policy (optionally one panel per ``col``), with a
    legend naming each policy beside the panels. When ``frame`` has ``<y>_low`` and ``<y>_high`` columns
    (the results over an assumption's range), each bar carries that range as an error bar. Rows with
    ``policy`` = ``bound`` (``apexlib.sim.bound``) are drawn as an open, hatched bar, and every other bar
    is labelled with its fraction of the bound of the same setting."""
    frame, order = _labelled(frame)
    bound_label = policy_label("bound")
    panels = list(dict.fromkeys(frame[col])) if col else [None]
    settings = list(dict.fromkeys(frame[x]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels) + 2.2, 3.6), squeeze=False)
    colors = dict(zip(order, sns.color_palette(n_colors=len(order)), strict=True))
    width = 0.8 / max(1, len(order))
    ranged = f"{y}_low" in frame and f"{y}_high" in frame
    for axis, panel in zip(axes[0], panels, strict=True):
        part = frame if panel is None else frame[frame[col] == panel]
        for index, policy in enumerate(order):
            rows = part[part["policy"] == policy].set_index(x).reindex(settings)
            positions = [i + (index - (len(order) - 1) / 2) * width for i in range(len(settings))]
            error = None
            if ranged:
                error = [(rows[y] - rows[f"{y}_low"]).clip(lower=0), (rows[f"{y}_high"] - rows[y]).clip(lower=0)]
            style = ({"facecolor": "white", "edgecolor": "black", "hatch": "///", "linewidth": 0.6}
                     if policy == bound_label else {"color": colors[policy]})
            axis.bar(positions, rows[y], width=width, label=policy, yerr=error, capsize=2 if ranged else 0,
                     error_kw={"linewidth": 0.8}, **style)
            if bound_label in order and policy != bound_label:
                bound = part[part["policy"] == bound_label].set_index(x).reindex(settings)[y]
                for position, value, ceiling in zip(positions, rows[y], bound, strict=True):
                    if pd.notna(value) and pd.notna(ceiling) and ceiling > 0:
                        axis.text(position, value, f"{value / ceiling:.2f}", rotation=90, ha="center",
                                  va="bottom", fontsize=5)
        axis.set_xticks(range(len(settings)), settings, rotation=30, ha="right", fontsize=8)
        axis.set_xlabel(x.replace("_", " "))
        axis.set_ylabel(ylabel)
        if panel is not None:
            axis.set_title(str(panel), fontsize=9)
    note = " (error bars: results over the assumptions' low..high range)" if ranged else ""
    if bound_label in order:
        note += "; numbers: fraction of the bound"
    axes[0][-1].legend(title=f"policy{note}", fontsize=7, title_fontsize=7, loc="upper left",
                       bbox_to_anchor=(1.02, 1.0))
    return _finish(fig, title, caption)


def throughput_vs_parameter(frame: pd.DataFrame, *, x: str, title: str, caption: str, xlabel: str,
                            y: str = "output_throughput", marks: Sequence[tuple[float, str]] = (),
                            ylabel: str = "output tokens / s") -> plt.Figure:
    """Lines: ``y`` against a swept parameter ``x``, one line per policy; ``marks`` are labelled
    vertical lines (x, label) at reference values."""
    fig, axis = plt.subplots(figsize=(6.8, 3.8))
    frame, order = _labelled(frame)
    sns.lineplot(data=frame, x=x, y=y, hue="policy", hue_order=order, marker="o", ax=axis)
    top = axis.get_ylim()[1]
    for value, label in marks:
        axis.axvline(value, color="grey", linestyle="--", linewidth=0.8)
        axis.text(value, top, f" {label}", fontsize=7, va="top", ha="left", color="grey")
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    sns.move_legend(axis, "upper left", bbox_to_anchor=(1.0, 1.0))
    return _finish(fig, title, caption)


def gain_over_baseline(frame: pd.DataFrame, *, x: str, baseline: str = "gpu_only",
                       y: str = "output_throughput", by: Sequence[str] = ()) -> pd.DataFrame:
    """Throughput gain (%) of every policy over ``baseline`` at each ``x`` (and ``by``) setting."""
    keys = [x, *by]
    base = frame[frame["policy"] == baseline].set_index(keys)[y].rename("baseline")
    joined = frame.join(base, on=keys)
    joined["gain_percent"] = 100.0 * (joined[y] / joined["baseline"] - 1.0)
    return joined


def fraction_of_bound(frame: pd.DataFrame, *, keys: Sequence[str], y: str = "output_throughput") -> pd.DataFrame:
    """``frame`` with ``bound`` (the ``y`` of the row with ``policy`` = ``bound`` at the same ``keys``) and
    ``fraction_of_bound`` = ``y`` / ``bound`` on every row."""
    bound = frame[frame["policy"] == "bound"].set_index(list(keys))[y].rename("bound")
    joined = frame.drop(columns=[c for c in ("bound", "fraction_of_bound") if c in frame]).join(bound, on=list(keys))
    joined["fraction_of_bound"] = joined[y] / joined["bound"]
    return joined


def with_scenario_range(frame: pd.DataFrame, *, keys: Sequence[str], y: str = "output_throughput",
                        scenario: str = "scenario", central: str = "central") -> pd.DataFrame:
    """The ``central`` scenario's rows, with ``<y>_low`` / ``<y>_high``: the min / max of ``y`` over every
    scenario of the same ``keys`` (the spread of a result over the assumptions' range)."""
    spread = frame.groupby(list(keys))[y].agg(["min", "max"]).rename(columns={"min": f"{y}_low", "max": f"{y}_high"})
    return frame[frame[scenario] == central].join(spread, on=list(keys))


def throughput_vs_latency(frame: pd.DataFrame, *, title: str, caption: str, panel: str,
                          latencies: Sequence[str] = ("tpot_p90_s", "ttft_p90_s"),
                          slo: Mapping[str, float] | None = None, throughput: str = "output_throughput",
                          ceilings: Mapping[str, float] | None = None) -> plt.Figure:
    """Output throughput against each latency percentile (one point per request rate, one line per
    policy), one row of panels per ``panel`` value; ``slo`` maps a panel value to its TPOT SLO (a
    vertical line on the TPOT panels), ``ceilings`` to a throughput bound (a horizontal line)."""
    frame, order = _labelled(frame)
    panels = list(dict.fromkeys(frame[panel]))
    fig, axes = plt.subplots(len(panels), len(latencies), figsize=(4.2 * len(latencies) + 2.0, 2.9 * len(panels)),
                             squeeze=False)
    colors = dict(zip(order, sns.color_palette(n_colors=len(order)), strict=True))
    scenarios = list(dict.fromkeys(frame["scenario"])) if "scenario" in frame else [None]
    for row, value in enumerate(panels):
        part = frame[frame[panel] == value].sort_values("rate")
        for column, metric in enumerate(latencies):
            axis = axes[row][column]
            for scenario in scenarios:  # the central scenario solid and in the legend, the corners faint
                central = scenario in (None, "central")
                lines = part if scenario is None else part[part["scenario"] == scenario]
                for policy in order:
                    line = lines[lines["policy"] == policy]
                    axis.plot(line[metric], line[throughput], marker="o" if central else None,
                              markersize=3, color=colors[policy], alpha=1.0 if central else 0.3,
                              linestyle="-" if central else "--", linewidth=1.2 if central else 0.8,
                              label=policy if central and row == 0 and column == len(latencies) - 1 else None)
            if ceilings is not None and value in ceilings:
                axis.axhline(ceilings[value], color="black", linestyle=":", linewidth=0.8)
                axis.text(axis.get_xlim()[0], ceilings[value], " offline bound", fontsize=6, va="bottom")
            if slo is not None and metric.startswith("tpot") and value in slo:
                axis.axvline(slo[value], color="grey", linestyle="--", linewidth=0.8)
                axis.text(slo[value], axis.get_ylim()[1], " SLO", fontsize=7, va="top", color="grey")
            axis.set_xscale("log")
            axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels collide
            axis.xaxis.set_major_formatter(matplotlib.ticker.LogFormatter(labelOnlyBase=False))
            axis.set_xlabel(metric.replace("_p90_s", " p90 (s)").replace("_", " "))
            axis.set_ylabel("output tokens / s")
            axis.set_title(str(value), fontsize=8)
    axes[0][-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7, title="policy",
                       title_fontsize=7)
    return _finish(fig, title, caption)


def goodput_vs_rate(frame: pd.DataFrame, *, title: str, caption: str, panel: str, x: str = "rate",
                    y: str = "request_goodput", slo_text: Mapping[str, str] | None = None) -> plt.Figure:
    """Goodput (good requests/s) against the request rate, one line per policy, one panel per ``panel``
    value; the central scenario solid, the assumptions' corners faint; ``slo_text`` names each panel's SLOs."""
    frame, order = _labelled(frame)
    panels = list(dict.fromkeys(frame[panel]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) + 2.0, 3.4), squeeze=False)
    colors = dict(zip(order, sns.color_palette(n_colors=len(order)), strict=True))
    scenarios = list(dict.fromkeys(frame["scenario"])) if "scenario" in frame else [None]
    for axis, value in zip(axes[0], panels, strict=True):
        part = frame[frame[panel] == value].sort_values(x)
        for scenario in scenarios:
            central = scenario in (None, "central")
            lines = part if scenario is None else part[part["scenario"] == scenario]
            for policy in order:
                line = lines[lines["policy"] == policy]
                axis.plot(line[x], line[y], marker="o" if central else None, markersize=3, color=colors[policy],
                          alpha=1.0 if central else 0.3, linestyle="-" if central else "--",
                          label=policy if central and axis is axes[0][-1] else None)
        axis.plot(part[x].drop_duplicates(), part[x].drop_duplicates(), color="grey", linewidth=0.6,
                  linestyle=":", label="offered load" if axis is axes[0][-1] else None)
        axis.set_xlabel("request rate (req/s)")
        axis.set_ylabel("goodput (good requests / s)")
        axis.set_title(f"{value}\n{slo_text[value]}" if slo_text and value in slo_text else str(value), fontsize=8)
    axes[0][-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7, title="policy", title_fontsize=7)
    return _finish(fig, title, caption)


def latency_vs_load(frame: pd.DataFrame, *, title: str, caption: str, x: str = "rate",
                    metrics: Sequence[str] = ("ttft_median_s", "tpot_median_s"),
                    throughput: str = "output_throughput") -> plt.Figure:
    """Throughput and latency against request rate, one line per policy."""
    columns = [throughput, *metrics]
    fig, axes = plt.subplots(1, len(columns), figsize=(4.0 * len(columns) + 1.5, 3.4))
    frame, order = _labelled(frame)
    for axis, metric in zip(axes, columns, strict=True):
        sns.lineplot(data=frame, x=x, y=metric, hue="policy", hue_order=order, marker="o", ax=axis)
        axis.set_xlabel("request rate (req/s)")
        axis.set_ylabel("output tokens / s" if metric == throughput else metric.replace("_s", " (s)").replace("_", " "))
        if axis is not axes[-1]:
            axis.get_legend().remove()
    sns.move_legend(axes[-1], "upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7, title="policy")
    return _finish(fig, title, caption)


MEASURED_ONLINE_METRICS = (("ttft", "TTFT"), ("tpot", "TPOT"))


def _rate_label(rate: object) -> str:
    if rate is None or pd.isna(rate) or float(rate) <= 0:
        return "all at once"
    return f"{float(rate):g}"


def measured_online(rows: pd.DataFrame, *, cpu: str, caption: str | None = None,
                    metrics: Sequence[tuple[str, str]] = MEASURED_ONLINE_METRICS) -> plt.Figure:
    """Client-measured online latency against request rate, one line per engine: one panel per metric (TTFT,
    TPOT), p50 solid and p99 dashed, in milliseconds.

    ``rows``: summary rows of ``apex bench serve`` (``engine``, ``rate`` -- empty for all requests at once --,
    ``<metric>_median_s``, ``<metric>_p99_s``; ``workload`` and ``model_path`` for the default caption).
    Rates are drawn as categories in increasing order with "all at once" last."""
    needed = {"engine", "rate"} | {f"{m}_{q}_s" for m, _ in metrics for q in ("median", "p99")}
    missing = sorted(needed - set(rows.columns))
    if missing:
        raise ValueError(f"measured_online needs the columns {missing} (summary rows of apex bench serve)")
    if rows.empty:
        raise ValueError("measured_online: no rows to draw")
    frame = rows.assign(rate_label=rows["rate"].map(_rate_label),
                        rate_order=rows["rate"].map(lambda r: float("inf") if _rate_label(r) == "all at once"
                                                    else float(r)))
    labels = list(dict.fromkeys(frame.sort_values("rate_order")["rate_label"]))
    position = {label: index for index, label in enumerate(labels)}
    engines = list(dict.fromkeys(frame["engine"]))
    colors = dict(zip(engines, sns.color_palette(n_colors=len(engines)), strict=True))
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.4 * len(metrics) + 2.2, 3.6), squeeze=False)
    for axis, (metric, name) in zip(axes[0], metrics, strict=True):
        for engine in engines:
            part = frame[frame["engine"] == engine].groupby("rate_label", sort=False)
            for quantile, style in (("median", "-"), ("p99", "--")):
                values = part[f"{metric}_{quantile}_s"].median() * 1000.0
                values = values.reindex([label for label in labels if label in values.index])
                axis.plot([position[label] for label in values.index], values.to_numpy(), style, marker="o",
                          color=colors[engine], label=f"{engine} {'p50' if quantile == 'median' else 'p99'}")
        axis.set_xticks(range(len(labels)), labels)
        axis.set_xlabel("request rate (req/s, Poisson)")
        axis.set_ylabel(f"{name} (ms)")
        axis.set_yscale("log")
        axis.set_title(f"{name} p50 (solid) and p99 (dashed)", fontsize=9)
    axes[0][-1].legend(title="engine, percentile", fontsize=7, title_fontsize=7, loc="upper left",
                       bbox_to_anchor=(1.02, 1.0))
    if caption is None:
        model = ", ".join(sorted({Path(str(m)).name for m in frame.get("model_path", pd.Series(["?"]))}))
        workload = ", ".join(sorted(map(str, frame.get("workload", pd.Series(["?"])).unique())))
        caption = provenance_caption(executor="http", source=f"{cpu} (client-side, over HTTP)", model=model,
                                     workload=workload)
    return _finish(fig, f"Online latency measured on {cpu}: {', '.join(engines)}", caption)


def mode_breakdown(iterations: pd.DataFrame, *, title: str, caption: str, by: str = "policy") -> plt.Figure:
    """Share of iterations per execution mode (none / async_overlap / asymmetric_pipeline)."""
    shares = (iterations.groupby([by, "mode"]).size().rename("iterations").reset_index())
    shares["share"] = shares["iterations"] / shares.groupby(by)["iterations"].transform("sum")
    fig, axis = plt.subplots(figsize=(7.0, 3.6))
    sns.barplot(data=shares, x=by, y="share", hue="mode", ax=axis,
                hue_order=[m for m in ("none", "async_overlap", "asymmetric_pipeline") if m in set(shares["mode"])])
    axis.set_ylabel("share of iterations")
    axis.tick_params(axis="x", rotation=20, labelsize=7)
    sns.move_legend(axis, "upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7, title="execution mode")
    return _finish(fig, title, caption)


def prediction_error(frame: pd.DataFrame, *, title: str, caption: str, x: str = "mode",
                     y: str = "relative_error") -> plt.Figure:
    """Distribution of the cost model's relative error (predicted vs measured iteration time)."""
    fig, axis = plt.subplots(figsize=(5.5, 3.4))
    sns.boxplot(data=frame, x=x, y=y, ax=axis, showfliers=False)
    axis.axhline(0.0, color="grey", linewidth=0.8)
    axis.set_ylabel("(predicted - measured) / measured")
    return _finish(fig, title, caption)


def paper_comparison(frame: pd.DataFrame, *, title: str, caption: str) -> plt.Figure:
    """Our gain range (``ours_min`` .. ``ours``) next to the paper's reported range (``paper_low`` ..
    ``paper_high``) per setting."""
    fig, axis = plt.subplots(figsize=(10.0, 4.4))
    positions = range(len(frame))
    low = frame["ours_min"] if "ours_min" in frame else 0.0
    axis.bar(positions, frame["ours"] - low, bottom=low, color="tab:blue", alpha=0.8,
             label="apexlib (simulated): min..max over the grid and the assumptions' range")
    if "central_max" in frame:
        axis.scatter(positions, frame["central_max"], marker="_", s=200, color="navy", zorder=3,
                     label="apexlib: max over the grid, central assumptions")
    axis.axhline(0.0, color="grey", linewidth=0.8)
    axis.errorbar(positions, (frame["paper_low"] + frame["paper_high"]) / 2,
                  yerr=(frame["paper_high"] - frame["paper_low"]) / 2, fmt="o", color="black",
                  capsize=4, label="paper (reported range)")
    axis.set_xticks(list(positions), frame["setting"], rotation=25, ha="right", fontsize=7)
    axis.set_ylabel("throughput gain (%)")
    axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return _finish(fig, title, caption)


def output_paths(experiment: str, quick: bool, root: str | Path = "..") -> tuple[Path, Path]:
    """(results directory, figures directory) of a notebook run from ``notebooks/``.

    Quick runs (CI smoke tests) write under ``build/quick/`` so they never overwrite the versioned
    results in ``data/results/`` or the figures in ``figures/``.
    """
    base = Path(root) / "build" / "quick" if quick else Path(root)
    return base / "data" / "results" / experiment, base / "figures"


def notebook_setup(experiment: str, quick: bool) -> tuple[Path, Path]:
    """The common start of every notebook: warnings-only logging, its results and figures directories
    (:func:`output_paths`, the results one created), printed."""
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    results_dir, figures_dir = output_paths(experiment, quick)
    results_dir.mkdir(parents=True, exist_ok=True)
    print("results ->", results_dir.resolve(), "| figures ->", figures_dir.resolve())  # noqa: T201
    return results_dir, figures_dir


@dataclass(frozen=True)
class NotebookModel:
    """A notebook's ``model`` parameter: a named checkpoint (``smollm2``), a tiny preset (``demo``) or a
    checkpoint directory, with its label in profile and result file names and its title in captions."""

    name: str
    label: str
    title: str

    def checkpoint(self) -> str:
        """Its checkpoint directory (a named checkpoint is built on first use)."""
        from apexlib.model.catalog import resolve_checkpoint

        return resolve_checkpoint(self.name)


def notebook_model(model: str) -> NotebookModel:
    """:class:`NotebookModel` of ``model``, without building or loading anything."""
    from apexlib.model.catalog import describe_model

    return NotebookModel(str(model), *describe_model(model))


def find_profile(directory: str | Path, model_label: str = "tiny-demo") -> Path:
    """The profile of ``model_label`` measured on this machine's CPU if there is one, else any profile
    of that model (device=cpu profiles are named ``cpu-<cpu>-<model>.json`` by ``apex profile``)."""
    from apexlib.core.host import cpu_info, cpu_short_name

    directory = Path(directory)
    info = cpu_info()
    own = directory / f"cpu-{cpu_short_name(info['cpu_model'], info['simd'])}-{model_label}.json"
    if own.is_file():
        return own
    candidates = sorted(p for p in directory.glob(f"*-{model_label}.json"))
    if not candidates:
        raise FileNotFoundError(f"no profile of {model_label} under {directory}: run notebook 01 or `apex profile`")
    logger.warning("no profile of %s measured on this CPU; using %s", model_label, candidates[0])
    return candidates[0]


def current_profile(quick: bool, model_label: str = "tiny-demo", root: str | Path = "..") -> Path:
    """The profile later notebooks use: in quick runs the quick one notebook 01 wrote under
    ``build/quick/``, if any; otherwise (and as a fallback) the versioned one in ``data/profiles``."""
    directories = ([Path(root) / "build" / "quick" / "data" / "profiles"] if quick else []) + \
        [Path(root) / "data" / "profiles"]
    for directory in directories:
        try:
            return find_profile(directory, model_label)
        except FileNotFoundError:
            continue
    raise FileNotFoundError(f"no profile of {model_label} in {[str(d) for d in directories]}: run notebook 01")
