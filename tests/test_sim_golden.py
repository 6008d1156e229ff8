"""Behaviour pin: the simulator's rows for fixed seeds are exactly the recorded ones.

``tests/data/sim_golden.json`` was written by this file's cases (``APEX_UPDATE_GOLDEN=1 pytest
tests/test_sim_golden.py``) before the code was reorganised; a refactoring that changes what the
scheduler, a policy, a cost model or the virtual-clock loop does changes a row here. Rewrite the file
only for an intended change of behaviour, and say so in the commit.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import pytest

from apexlib.core.models import model_config_for_shape
from apexlib.costs import ModelShape, datasheet_profile_path, load_cost_model
from apexlib.costs.assumptions import scenario_cost_model
from apexlib.sim.simulator import simulate
from apexlib.workloads import get_preset

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "data" / "sim_golden.json"
PROFILES = ROOT / "data" / "profiles"
# Columns that say when and from which commit a row was made, not what it says.
VOLATILE = ("date_utc", "git_commit", "apexlib_version", "engine_version")


def _cost_model(hardware: str, model: str, scenario: str = "central"):
    shape = ModelShape.from_config(model_config_for_shape(model))
    return scenario_cost_model(load_cost_model(datasheet_profile_path(hardware, PROFILES), shape, "float16"),
                               scenario)


def _cases():
    t4_online = get_preset("t4-decode-heavy", num_requests=32, rate=2.0)
    a10g_offline = get_preset("decode-heavy-chat", num_requests=12)
    tiny = get_preset("tiny-decode-heavy", num_requests=24)
    for policy in ("gpu_only", "hybrid", "neo", "neo_published", "apex"):
        yield f"t4-{policy}", dict(workload=t4_online, model="llama-2-7b", policy=policy,
                                   cost_model=_cost_model("t4", "llama-2-7b"))
    yield "t4-apex-bound", dict(workload=t4_online, model="llama-2-7b", policy="apex",
                                cost_model=_cost_model("t4", "llama-2-7b"), policy_options={"iteration_time_bound": 0.09})
    yield "t4-hybrid-pipeline", dict(workload=t4_online, model="llama-2-7b", policy="hybrid",
                                     cost_model=_cost_model("t4", "llama-2-7b"),
                                     policy_options={"hybrid_mode": "asymmetric_pipeline", "cpu_placement": "cpu"})
    for policy in ("gpu_only", "neo", "neo_published", "apex"):
        yield f"a10g-adverse-{policy}", dict(
            workload=a10g_offline, model="llama-3.1-8b", policy=policy, gpu_kv_gib=0.5,
            cost_model=_cost_model("a10g-16vcpu", "llama-3.1-8b", "offload-adverse"))
    tiny_profile = load_cost_model(PROFILES / "cpu-amd-epyc-tiny-demo.json",
                                   ModelShape.from_config(model_config_for_shape("tiny-demo")), "float32")
    for policy in ("gpu_only", "apex"):
        yield f"tiny-cpu-{policy}", dict(workload=tiny, model="tiny-demo", policy=policy, cost_model=tiny_profile,
                                         device="cpu", dtype="float32", num_gpu_blocks=40,
                                         num_cpu_blocks=None if policy != "gpu_only" else 0)


def _digest(rows) -> dict:
    kept = [{k: v for k, v in row.items() if k not in VOLATILE} for row in rows]
    text = json.dumps(kept, sort_keys=True, default=repr, allow_nan=True)
    summary = next(row for row in kept if row["row_type"] == "summary")
    numbers = {k: v for k, v in summary.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and not (isinstance(v, float) and math.isnan(v))}
    return {"sha256": hashlib.sha256(text.encode()).hexdigest(), "summary_numbers": numbers}


def _run_all() -> dict:
    out = {}
    for name, kwargs in _cases():
        options = dict(kwargs)
        result = simulate(options.pop("workload"), **options)
        out[name] = _digest(result.rows)
    return out


def test_simulated_rows_match_the_recorded_ones():
    actual = _run_all()
    if os.environ.get("APEX_UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(json.dumps(actual, indent=1, sort_keys=True) + "\n")
        pytest.skip(f"wrote {GOLDEN}")
    expected = json.loads(GOLDEN.read_text())
    assert sorted(actual) == sorted(expected)
    for name in expected:
        assert actual[name]["summary_numbers"] == expected[name]["summary_numbers"], name
        assert actual[name]["sha256"] == expected[name]["sha256"], name
