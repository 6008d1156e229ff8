"""Cost models: the predicted seconds of every subtask of one iteration, and their composition.

Torch-free (the scheduler's policies and the simulator call it). Every ``CostModel`` method returns
seconds for the **whole model** (all layers) of one iteration's subtask; per-layer figures are the
whole-model figure divided by ``num_layers`` (each layer has the same shapes).

Implementations:

- :class:`ZeroCostModel`: every subtask is free (tests).
- :class:`TableCostModel`: measured tables from a profile JSON (``apex profile``), interpolated
  piecewise-linearly; outside the measured grid it extrapolates linearly from the last two points
  and counts it (``extrapolated``, per table in ``extrapolations``; logged once per table).
- :class:`RooflineCostModel`: bytes / bandwidth and FLOPs / peak from a :class:`HardwareSpec` and a
  :class:`ModelShape`, times efficiency factors.

:func:`predict_iteration` composes the subtasks into an iteration time per execution mode, following
the runner's schedule (``apexlib/runner/model_runner.py``); see its docstring for the formulas.

Modules: ``shape`` (ModelShape), ``base`` (the contract), ``table``, ``roofline``, ``compose``
(IterationShape, predict_iteration), ``profiles`` (profile files, ``load_cost_model``), ``hardware``
(HardwareSpec), ``assumptions`` (the roofline's assumed factors and their ranges), ``validate``.
"""

from apexlib.costs.base import CostModel, ZeroCostModel
from apexlib.costs.compose import (
    IterationShape,
    inline_pipeline_forward_seconds,
    pipeline_forward_seconds,
    predict_iteration,
    shape_from_plan,
)
from apexlib.costs.hardware import HARDWARE, HardwareSpec, get_hardware
from apexlib.costs.profiles import (
    HARDWARE_SCHEMA,
    datasheet_profile,
    datasheet_profile_path,
    datasheet_roofline,
    load_cost_model,
    roofline_from_profile,
    write_datasheet_profiles,
)
from apexlib.costs.roofline import RooflineCostModel
from apexlib.costs.shape import IDEAL_OVERLAP, NEO_LAUNCH_SECONDS, HybridAdjustment, ModelShape
from apexlib.costs.table import PROFILE_SCHEMA, TableCostModel

__all__ = [
    "HARDWARE", "HARDWARE_SCHEMA", "IDEAL_OVERLAP", "NEO_LAUNCH_SECONDS", "PROFILE_SCHEMA", "CostModel",
    "HardwareSpec", "HybridAdjustment", "IterationShape", "ModelShape", "RooflineCostModel", "TableCostModel",
    "ZeroCostModel", "datasheet_profile", "datasheet_profile_path", "datasheet_roofline", "get_hardware", "inline_pipeline_forward_seconds",
    "load_cost_model", "pipeline_forward_seconds", "predict_iteration", "roofline_from_profile", "shape_from_plan",
    "write_datasheet_profiles",
]
