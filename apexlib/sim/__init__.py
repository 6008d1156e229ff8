"""The simulator: the engine's scheduler and policies on a virtual clock timed by a cost model (torch-free)."""

from __future__ import annotations

from apexlib.sim.bound import BOUND_POLICY, BoundResult, simulated_bound, throughput_bound
from apexlib.sim.simulator import IterationTrace, SimulationResult, simulate

__all__ = ["BOUND_POLICY", "BoundResult", "IterationTrace", "SimulationResult", "simulate", "simulated_bound",
           "throughput_bound"]
