"""Datasheet (roofline) profiles under data/profiles: generated from apexlib.costs.hardware, loaded
through the same entry point as measured profiles, bad files rejected with the field named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from apexlib.core.models import model_config_for_shape
from apexlib.costs import (
    HARDWARE_SCHEMA,
    ModelShape,
    RooflineCostModel,
    TableCostModel,
    datasheet_profile,
    datasheet_profile_path,
    load_cost_model,
    write_datasheet_profiles,
)
from apexlib.costs.hardware import HARDWARE, HardwareSpec

PROFILES = Path(__file__).resolve().parents[1] / "data" / "profiles"

LLAMA2_7B = ModelShape.from_config(model_config_for_shape("llama-2-7b"))


@pytest.mark.parametrize("key", sorted(HARDWARE))
def test_committed_profile_is_what_the_code_writes(key):
    path = datasheet_profile_path(key, PROFILES)
    assert path.is_file(), f"{path} missing: run `apex profile --datasheet`"
    assert json.loads(path.read_text()) == json.loads(json.dumps(datasheet_profile(key, HARDWARE[key])))


def test_no_stray_datasheet_files():
    keys = {p.name[len("datasheet-"):-len(".json")] for p in PROFILES.glob("datasheet-*.json")}
    assert keys == set(HARDWARE)


@pytest.mark.parametrize("key", ["t4", "a10g-16vcpu"])
def test_loaded_roofline_equals_the_code_s(key):
    model = load_cost_model(datasheet_profile_path(key, PROFILES), LLAMA2_7B, "float16")
    assert isinstance(model, RooflineCostModel)
    assert model == RooflineCostModel(HARDWARE[key], LLAMA2_7B, "float16")
    assert model.spec.source_of("dram_gbps").startswith("ASSUMPTION")  # the host figure says what it is


def test_every_number_keeps_its_source():
    for spec in HARDWARE.values():
        assert HardwareSpec.from_dict(spec.to_dict()) == spec


def test_measured_profiles_load_as_tables():
    model = load_cost_model(PROFILES / "cpu-xeon-spr-tiny-demo.json")
    assert isinstance(model, TableCostModel)


def test_written_files_round_trip(tmp_path):
    paths = write_datasheet_profiles(tmp_path)
    assert sorted(p.name for p in paths) == sorted(f"datasheet-{k}.json" for k in HARDWARE)


def test_bad_profiles_name_the_problem(tmp_path):
    profile = datasheet_profile("t4", HARDWARE["t4"])
    path = tmp_path / "bad.json"
    broken = json.loads(json.dumps(profile))
    del broken["hardware"]["dram_gbps"]
    path.write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="dram_gbps"):
        load_cost_model(path, LLAMA2_7B)
    broken = json.loads(json.dumps(profile))
    broken["roofline"]["memory_efficiency"] = 0
    path.write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="roofline.memory_efficiency"):
        load_cost_model(path, LLAMA2_7B)
    path.write_text(json.dumps({**profile, "schema": "something/9"}))
    with pytest.raises(ValueError, match="schema"):
        load_cost_model(path, LLAMA2_7B)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_cost_model(path, LLAMA2_7B)
    with pytest.raises(ValueError, match="model shape"):
        load_cost_model(datasheet_profile_path("t4", PROFILES))
    with pytest.raises(FileNotFoundError):
        load_cost_model(tmp_path / "absent.json", LLAMA2_7B)
    assert profile["schema"] == HARDWARE_SCHEMA
