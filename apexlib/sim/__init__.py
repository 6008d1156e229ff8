"""The simulator: the engine's scheduler and policies on a virtual clock timed by a cost model (torch-free)."""

from __future__ import annotations

from apexlib.sim.simulator import IterationTrace, SimulationResult, simulate

__all__ = ["IterationTrace", "SimulationResult", "simulate"]
