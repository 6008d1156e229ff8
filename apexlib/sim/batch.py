"""Many independent simulations at once: one process per core (or one Ray task each), with a progress bar.

Torch-free. Each simulation is deterministic and independent of the others, so a grid of them
(workloads x policies x hardware x assumption scenarios) runs through an executor
(``apexlib.cluster.executor``: the local process pool by default, Ray tasks when ``RAY_ADDRESS`` is set);
results come back in the order of the jobs, identical to a serial run. The notebooks use it for their grids.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from apexlib.cluster.executor import Executor, choose_executor
from apexlib.core.metrics import SLO
from apexlib.costs import CostModel
from apexlib.sim.simulator import simulate
from apexlib.workloads import Workload

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SimulationJob:
    """One ``simulate(workload, cost_model=..., **options)`` call; ``labels`` are copied into its row."""

    workload: Workload
    cost_model: CostModel
    options: Mapping[str, Any]
    labels: Mapping[str, Any] = field(default_factory=dict)
    slo: SLO | None = None  # when given, the row also has vLLM's goodput under it (request_goodput)


def _summary_row(job: SimulationJob) -> dict[str, Any]:
    result = simulate(job.workload, cost_model=job.cost_model, record_iterations=False, **job.options)
    if job.slo is not None:
        result = result.with_slo(job.slo)
    row = next(r for r in result.rows if r["row_type"] == "summary")
    return {**job.labels, **row, **job.labels}  # the labels first, and they win over the row's own columns


def simulate_rows(jobs: Sequence[SimulationJob], workers: int | None = None, progress: bool = True,
                  description: str = "simulations", executor: str | Executor | None = None) -> list[dict[str, Any]]:
    """The summary row (labels first) of every job, in the jobs' order. ``executor``: ``"process"`` (a pool of
    ``workers`` processes, default every usable CPU; 1 runs in this process), ``"ray"`` (one Ray task per job)
    or None (``APEX_EXECUTOR``, else Ray when ``RAY_ADDRESS`` is set, else the process pool)."""
    from tqdm.auto import tqdm

    runner = choose_executor(executor, workers)
    bar = tqdm(total=len(jobs), desc=f"{description} ({runner.name})", disable=not progress, leave=False)
    rows: list[dict[str, Any]] = []
    try:
        for row in runner.map(_summary_row, jobs):
            rows.append(row)
            bar.update()
        return rows
    finally:
        bar.close()
