"""Request traces for benchmarks and the simulator: length distributions, arrival processes, presets.

A :class:`Workload` is an immutable list of :class:`WorkloadRequest` (prompt length, output length,
arrival time, optional prompt token ids) plus the parameters that generated it (``metadata``), so a
result row can always say exactly which trace produced it. This module imports no torch.

Generation is deterministic per seed. ``make_workload`` derives three independent random streams from
``numpy.random.SeedSequence(seed).spawn(3)``, each driving a ``Generator(PCG64(...))``: one for prompt
lengths, one for output lengths, one for arrival times. Consequence: the same seed at two request
rates gives the same lengths, only the arrival times differ (what a load-vs-latency sweep wants).

Arrival processes (``arrival=``):

* ``"offline"``: every request arrives at t = 0 (vLLM ``benchmark_throughput.py``; NEO's throughput
  test, which creates every request task before awaiting any).
* ``"poisson"``: the first request arrives at t = 0, each next one after an exponential gap of mean
  ``1 / rate`` (vLLM ``benchmark_serving.py``/``vllm bench serve`` ``get_request``: yield, then sleep;
  NEO's latency test: send, then sleep ``np.random.exponential(1 / rate)``). With ``burstiness != 1``
  the gaps follow vLLM's gamma distribution (shape ``burstiness``, scale ``1 / (rate * burstiness)``).
* ``"fixed"``: request ``i`` arrives at ``i / rate``.

The JSONL format (``Workload.to_jsonl`` / ``Workload.from_jsonl``; documented in
``data/workloads/README.md``): the first line is a header object
``{"format": "apexlib-workload", "version": 1, "name", "seed", "description", "metadata"}``, then one
object per request ``{"request_id", "prompt_len", "output_len", "arrival_time"[, "prompt_token_ids"]}``.
A malformed file raises :class:`WorkloadFormatError` naming the file, the line and the field.
"""

from __future__ import annotations

from apexlib.workloads.distributions import (
    Empirical,
    Fixed,
    LengthDistribution,
    Normal,
    RelativeUniform,
    Uniform,
    arrival_times,
    make_workload,
)
from apexlib.workloads.jsonl import workload_path
from apexlib.workloads.presets import (
    GRID_OUTPUT_CENTERS,
    GRID_PROMPT_CENTERS,
    PRESETS,
    Preset,
    get_preset,
    input_output_grid,
)
from apexlib.workloads.types import (
    FORMAT_NAME,
    FORMAT_VERSION,
    WORKLOADS_DIR,
    Workload,
    WorkloadFormatError,
    WorkloadRequest,
    prepare_workload,
)

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "GRID_OUTPUT_CENTERS",
    "GRID_PROMPT_CENTERS",
    "PRESETS",
    "WORKLOADS_DIR",
    "Empirical",
    "Fixed",
    "LengthDistribution",
    "Normal",
    "Preset",
    "RelativeUniform",
    "Uniform",
    "Workload",
    "WorkloadFormatError",
    "WorkloadRequest",
    "arrival_times",
    "get_preset",
    "input_output_grid",
    "make_workload",
    "prepare_workload",
    "workload_path",
]
