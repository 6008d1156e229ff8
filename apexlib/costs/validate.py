"""Validation of a measured profile (``apexlib.profile/1``) before a cost model trusts it. Torch-free.

A profile is a JSON file that can be hand-edited, truncated or produced by a failed run; a NaN or a
negative time in it would silently distort every prediction (and every throughput figure built on
them). :func:`validate_profile` checks, with errors that name the table and the entry:

- the schema version, and that ``model_shape`` and ``tables`` (with every required table) exist;
- every axis (token counts, batch sizes, context lengths, byte counts) is a list of finite numbers
  >= 0, strictly increasing, with one time per point (a grid: one row per batch, one column per context);
- every time is a finite number >= 0; fit coefficients are finite;
- monotone where physics says so: more work never costs much less. Measured times are noisy at the
  small end (a warm-up outlier of 2x is ordinary on a shared machine), so the check is end to end
  along each curve and each grid line, with a wide margin: the time at the largest point is at least
  a tenth of the time at the smallest (a reversed or swapped table, a value off by powers of ten fail it);
- hybrid calibration factors: slowdowns > 0, ``per_job_seconds`` >= 0, ``serial_fraction`` in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

#: table -> (axis key, value key) of the one-dimensional tables.
CURVES = {
    "linear": "num_tokens",
    "sample": "num_rows",
    "gpu_prefill_attention": "prompt_length",
}
GRIDS = ("gpu_decode_attention", "cpu_decode_attention")
TRANSFER_DIRECTIONS = ("d2h", "h2d")
#: The time at a curve's largest point may be no less than this share of the time at its smallest.
MONOTONE_SLACK = 0.1


class ProfileError(ValueError):
    """A profile that must not be used; the message names the table and the entry."""


def _fail(where: str, path: str, message: str) -> None:
    raise ProfileError(f"{where}: {path} {message}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_time(where: str, path: str, value: Any) -> float:
    if not _is_number(value) or not math.isfinite(value) or value < 0:
        _fail(where, path, f"= {value!r}: a time must be a finite number >= 0 (seconds)")
    return float(value)


def _check_axis(where: str, path: str, values: Any) -> list[float]:
    if not isinstance(values, Sequence) or isinstance(values, str) or not values:
        _fail(where, path, f"must be a non-empty list of numbers, got {values!r}")
    for index, value in enumerate(values):
        if not _is_number(value) or not math.isfinite(value) or value < 0:
            _fail(where, f"{path}[{index}]", f"= {value!r}: must be a finite number >= 0")
    for index in range(1, len(values)):
        if not values[index] > values[index - 1]:
            _fail(where, f"{path}[{index}]", f"= {values[index]!r} does not increase on {path}[{index - 1}] "
                                             f"= {values[index - 1]!r} (axes must be strictly increasing)")
    return [float(v) for v in values]


def _check_monotone(where: str, path: str, times: list[float]) -> None:
    if len(times) > 1 and times[-1] < MONOTONE_SLACK * times[0]:
        _fail(where, path, f"falls from {times[0]!r} s at the smallest point to {times[-1]!r} s at the largest: "
                           f"more work cannot cost less than {MONOTONE_SLACK:g}x as much (corrupt or swapped table?)")


def _check_curve(where: str, name: str, table: Any, axis: str, value_key: str = "seconds") -> None:
    if not isinstance(table, Mapping):
        _fail(where, f"tables.{name}", f"must be an object, got {type(table).__name__}")
    for key in (axis, value_key):
        if key not in table:
            _fail(where, f"tables.{name}", f"has no {key!r} list")
    xs = _check_axis(where, f"tables.{name}.{axis}", table[axis])
    ys = table[value_key]
    if not isinstance(ys, Sequence) or isinstance(ys, str) or len(ys) != len(xs):
        _fail(where, f"tables.{name}.{value_key}", f"must be a list of {len(xs)} times (one per {axis}), got {ys!r}")
    times = [_check_time(where, f"tables.{name}.{value_key}[{i}]", y) for i, y in enumerate(ys)]
    _check_monotone(where, f"tables.{name}.{value_key}", times)


def _check_grid(where: str, name: str, table: Any) -> None:
    if not isinstance(table, Mapping):
        _fail(where, f"tables.{name}", f"must be an object, got {type(table).__name__}")
    for key in ("batch", "context_length", "seconds"):
        if key not in table:
            _fail(where, f"tables.{name}", f"has no {key!r} entry")
    batches = _check_axis(where, f"tables.{name}.batch", table["batch"])
    contexts = _check_axis(where, f"tables.{name}.context_length", table["context_length"])
    rows = table["seconds"]
    if not isinstance(rows, Sequence) or len(rows) != len(batches):
        _fail(where, f"tables.{name}.seconds", f"must have one row per batch ({len(batches)})")
    grid = []
    for i, row in enumerate(rows):
        if not isinstance(row, Sequence) or isinstance(row, str) or len(row) != len(contexts):
            _fail(where, f"tables.{name}.seconds[{i}]", f"must have one time per context_length ({len(contexts)})")
        grid.append([_check_time(where, f"tables.{name}.seconds[{i}][{j}]", v) for j, v in enumerate(row)])
    for i, row in enumerate(grid):
        _check_monotone(where, f"tables.{name}.seconds[{i}] (along context_length)", row)
    for j in range(len(contexts)):
        _check_monotone(where, f"tables.{name}.seconds[*][{j}] (along batch)", [row[j] for row in grid])
    fit = table.get("fit")
    if fit is not None:
        if not isinstance(fit, Mapping):
            _fail(where, f"tables.{name}.fit", "must be an object")
        for key in ("per_kv_token", "per_sequence", "constant"):
            value = fit.get(key)
            if not _is_number(value) or not math.isfinite(value):
                _fail(where, f"tables.{name}.fit.{key}", f"= {value!r}: must be a finite number")
    if table.get("model", "grid") not in ("grid", "fit"):
        _fail(where, f"tables.{name}.model", f"= {table.get('model')!r}: must be 'grid' or 'fit'")


def _check_fields(where: str, path: str, section: Any, required: Sequence[str], optional: Sequence[str] = ()) -> None:
    if not isinstance(section, Mapping):
        _fail(where, path, f"must be an object, got {type(section).__name__}")
    for key in required:
        if key not in section:
            _fail(where, path, f"has no {key!r}")
    for key in (*required, *optional):
        if key in section:
            _check_time(where, f"{path}.{key}", section[key])


def _check_hybrid(where: str, section: Any) -> None:
    modes = section.get("modes", {}) if isinstance(section, Mapping) else None
    if not isinstance(modes, Mapping):
        _fail(where, "tables.hybrid_calibration.modes", "must be an object of mode -> factors")
    for mode, factors in modes.items():
        path = f"tables.hybrid_calibration.modes.{mode}"
        _check_fields(where, path, factors, ("per_job_seconds", "device_slowdown"), ("cpu_slowdown", "serial_fraction"))
        for key in ("device_slowdown", "cpu_slowdown"):
            if key in factors and not factors[key] > 0:
                _fail(where, f"{path}.{key}", f"= {factors[key]!r}: a slowdown must be > 0")
        if not 0.0 <= factors.get("serial_fraction", 0.0) <= 1.0:
            _fail(where, f"{path}.serial_fraction", f"= {factors['serial_fraction']!r}: must be in [0, 1]")


def validate_profile(profile: Any, where: str = "profile") -> None:
    """Raise :class:`ProfileError` (a ValueError) naming the table and the entry unless ``profile`` is a
    usable measured profile; ``where`` (a file name, say) starts the message."""
    from apexlib.costs.table import PROFILE_SCHEMA  # here: the table loader calls this module

    if not isinstance(profile, Mapping):
        raise ProfileError(f"{where}: a profile is a JSON object, got {type(profile).__name__}")
    if profile.get("schema") != PROFILE_SCHEMA:
        raise ProfileError(f"{where}: schema must be {PROFILE_SCHEMA!r}, got {profile.get('schema')!r}")
    shape = profile.get("model_shape")
    if not isinstance(shape, Mapping):
        raise ProfileError(f"{where}: has no 'model_shape' object (the model the tables were measured for)")
    for key, value in shape.items():
        if _is_number(value) and not (math.isfinite(value) and value > 0):
            _fail(where, f"model_shape.{key}", f"= {value!r}: must be a finite number > 0")
    tables = profile.get("tables")
    if not isinstance(tables, Mapping):
        raise ProfileError(f"{where}: has no 'tables' object (not a complete `apex profile` output?)")
    required = (*CURVES, *GRIDS, "transfer", "launch_overhead")
    missing = [name for name in required if name not in tables]
    if missing:
        raise ProfileError(f"{where}: tables is missing {missing} (has {sorted(tables)})")
    for name, axis in CURVES.items():
        _check_curve(where, name, tables[name], axis)
    for name in GRIDS:
        _check_grid(where, name, tables[name])
    transfer = tables["transfer"]
    if not isinstance(transfer, Mapping):
        _fail(where, "tables.transfer", "must be an object")
    for direction in TRANSFER_DIRECTIONS:
        if direction not in transfer:
            _fail(where, "tables.transfer", f"has no {direction!r} curve")
        _check_curve(where, f"transfer.{direction}", transfer[direction], "bytes")
    _check_fields(where, "tables.launch_overhead", tables["launch_overhead"], ("seconds",), ("per_sequence_seconds",))
    if "hybrid_calibration" in tables:
        _check_hybrid(where, tables["hybrid_calibration"])
    if tables.get("engine_step_overhead") is not None:
        _check_fields(where, "tables.engine_step_overhead", tables["engine_step_overhead"],
                      ("seconds", "per_sequence_seconds"))
