"""Many independent simulations at once: one process per core, with a progress bar.

Torch-free. Each simulation is deterministic and independent of the others, so a grid of them
(workloads x policies x hardware x assumption scenarios) runs in a process pool; results come back in
the order of the jobs, identical to a serial run. The notebooks use it for their grids.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

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


def default_workers() -> int:
    """Every CPU this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def simulate_rows(jobs: Sequence[SimulationJob], workers: int | None = None, progress: bool = True,
                  description: str = "simulations") -> list[dict[str, Any]]:
    """The summary row (labels first) of every job, in the jobs' order; ``workers`` processes (default:
    every usable CPU; 1 runs in this process)."""
    from tqdm.auto import tqdm

    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    bar = tqdm(total=len(jobs), desc=description, disable=not progress, leave=False)
    rows: list[dict[str, Any]] = []
    try:
        if workers == 1 or len(jobs) <= 1:
            for job in jobs:
                rows.append(_summary_row(job))
                bar.update()
            return rows
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
            for row in pool.map(_summary_row, jobs):
                rows.append(row)
                bar.update()
        return rows
    finally:
        bar.close()
