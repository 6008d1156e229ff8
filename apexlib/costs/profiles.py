"""Profile files: datasheet profiles (a ``HardwareSpec`` plus the roofline's factors) and the one loader of every cost model, ``load_cost_model``."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from apexlib.costs.base import CostModel, ZeroCostModel
from apexlib.costs.hardware import HardwareSpec, get_hardware
from apexlib.costs.roofline import DEFAULT_EFFICIENCY_SOURCE, RooflineCostModel
from apexlib.costs.shape import ModelShape
from apexlib.costs.table import PROFILE_SCHEMA, TableCostModel
from apexlib.costs.validate import validate_profile

# ----------------------------------------------------------------------------------------------
# iteration composition
# ----------------------------------------------------------------------------------------------
# ----------------------------------------------------------------------------------------------
# datasheet profiles: a HardwareSpec + the roofline's efficiency factors, as a versioned JSON file
# ----------------------------------------------------------------------------------------------
logger = logging.getLogger(__name__)

HARDWARE_SCHEMA = "apexlib.hardware/1"
ROOFLINE_FIELDS = ("memory_efficiency", "attention_efficiency", "compute_efficiency", "cpu_attention_efficiency",
                   "transfer_efficiency", "transfer_latency_seconds", "per_layer_launch_seconds",
                   "iteration_overhead_seconds")


def datasheet_profile(key: str, spec: HardwareSpec) -> dict[str, Any]:
    """The ``data/profiles/datasheet-<key>.json`` document of a datasheet ``spec``: every number with its
    source, and the roofline's (assumed) efficiency factors with theirs. Not a measurement."""
    defaults = RooflineCostModel.__dataclass_fields__
    return {"schema": HARDWARE_SCHEMA, "kind": "datasheet", "key": key,
            "label": f"datasheet: {spec.name} (roofline model, not measured)",
            "hardware": spec.to_dict(),
            "roofline": {**{name: defaults[name].default for name in ROOFLINE_FIELDS},
                         "source": DEFAULT_EFFICIENCY_SOURCE}}


def roofline_from_profile(profile: Mapping[str, Any], shape: ModelShape, dtype: str = "float16",
                          where: str = "profile") -> RooflineCostModel:
    """A :class:`RooflineCostModel` of ``shape`` from a datasheet profile (:func:`datasheet_profile`)."""
    if profile.get("schema") != HARDWARE_SCHEMA:
        raise ValueError(f"{where}: schema must be {HARDWARE_SCHEMA!r}, got {profile.get('schema')!r}")
    for section in ("hardware", "roofline"):
        if not isinstance(profile.get(section), Mapping):
            raise ValueError(f"{where}: missing the {section!r} object")
    spec = HardwareSpec.from_dict(dict(profile["hardware"]), where=f"{where}: hardware")
    roofline = profile["roofline"]
    factors = {}
    for name in ROOFLINE_FIELDS:
        value = roofline.get(name)
        if not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{where}: roofline.{name} must be a number > 0, got {value!r}")
        factors[name] = float(value)
    return RooflineCostModel(spec, shape, dtype, **factors, efficiency_source=str(roofline.get("source", "")))


def load_cost_model(spec: CostModel | str | Path | None, shape: ModelShape | None = None, dtype: str = "float16",
                    *, device: str | None = None) -> CostModel:
    """The one factory of cost models. ``spec``:

    - a :class:`CostModel`: returned as is (objects flow as objects);
    - ``"zero"``: :class:`ZeroCostModel`;
    - ``"roofline:<hardware>"``: a roofline of ``shape`` on ``apexlib.costs.hardware.get_hardware(<hardware>)``;
    - a profile file: a measured profile (``apexlib.profile/1``, from ``apex profile``) -> :class:`TableCostModel`;
      a datasheet profile (``apexlib.hardware/1``) -> a roofline of ``shape``;
    - None: an error (``apexlib.runner.machine.machine_cost_model`` gives a CPU engine a roofline of this
      machine instead: measuring it needs the data plane).
    """
    if isinstance(spec, CostModel):
        return spec
    if spec is None:
        raise ValueError("policies neo/neo_published/apex need cost_model=<profile from `apex profile`>, "
                         "'roofline:<hardware>' or a CostModel" + ("" if device == "cpu" else " on a GPU"))
    if isinstance(spec, str) and spec == "zero":
        return ZeroCostModel()
    if isinstance(spec, str) and spec.startswith("roofline:"):
        if shape is None:
            raise ValueError(f"cost_model {spec!r}: the model shape to predict for is needed")
        return RooflineCostModel(get_hardware(spec.split(":", 1)[1]), shape, dtype)
    if not isinstance(spec, (str, Path)):
        raise TypeError(f"cost_model must be a CostModel, a profile path, 'roofline:<hardware>' or 'zero', got "
                        f"{type(spec).__name__}")
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"cost_model profile {str(path)!r} does not exist (make one with `apex profile`)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    schema = data.get("schema") if isinstance(data, dict) else None
    if schema == PROFILE_SCHEMA:
        validate_profile(data, where=str(path))
        return TableCostModel(data)
    if schema == HARDWARE_SCHEMA:
        if shape is None:
            raise ValueError(f"{path} is a datasheet profile: the model shape to predict for is needed")
        return roofline_from_profile(data, shape, dtype, where=str(path))
    raise ValueError(f"{path}: schema {schema!r} is neither {PROFILE_SCHEMA!r} (measured, `apex profile`) nor "
                     f"{HARDWARE_SCHEMA!r} (datasheet, `apex profile --datasheet`)")


#: ``data/profiles/`` of this checkout (the editable install the project uses).
PROFILES_DIR = Path(__file__).resolve().parents[2] / "data" / "profiles"


def datasheet_profile_path(key: str, directory: str | Path = "data/profiles") -> Path:
    return Path(directory) / f"datasheet-{key}.json"


def datasheet_roofline(hardware: str, model: ModelShape | str, dtype: str = "float16",
                       directory: str | Path = PROFILES_DIR) -> CostModel:
    """The roofline of ``model`` (a ``ModelShape`` or a known shape name, ``apexlib.core.models``) on
    ``hardware``, from its datasheet profile (``datasheet-<hardware>.json``)."""
    from apexlib.core.models import model_config_for_shape

    shape = model if isinstance(model, ModelShape) else ModelShape.from_config(model_config_for_shape(model))
    return load_cost_model(datasheet_profile_path(hardware, directory), shape, dtype)


def write_datasheet_profiles(directory: str | Path = "data/profiles") -> list[Path]:
    """Write one datasheet profile per entry of ``apexlib.costs.hardware.HARDWARE``."""
    from apexlib.costs.hardware import HARDWARE

    paths = []
    for key, spec in HARDWARE.items():
        path = datasheet_profile_path(key, directory)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(datasheet_profile(key, spec), indent=1) + "\n")
        paths.append(path)
    return paths
