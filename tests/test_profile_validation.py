"""A corrupted profile is rejected on load, with the table and the entry named; the shipped ones load."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from apexlib.costs import TableCostModel, load_cost_model
from apexlib.costs.validate import ProfileError, validate_profile

PROFILE = Path(__file__).resolve().parents[1] / "data" / "profiles" / "cpu-xeon-spr-tiny-demo.json"


@pytest.fixture(scope="module")
def profile():
    return json.loads(PROFILE.read_text())


def test_the_shipped_measured_profile_is_valid(profile):
    validate_profile(profile)
    assert isinstance(load_cost_model(PROFILE), TableCostModel)


def _set(path):
    def apply(tables, value):
        *head, last = path
        target = tables
        for key in head:
            target = target[key]
        target[last] = value
    return apply


@pytest.mark.parametrize(("path", "value", "message"), [
    (("linear", "seconds", 3), -1e-3, r"tables.linear.seconds\[3\] = -0.001: a time must be a finite number >= 0"),
    (("sample", "seconds", 0), float("nan"), r"tables.sample.seconds\[0\] = nan"),
    (("cpu_decode_attention", "seconds", 2, 1), float("inf"), r"tables.cpu_decode_attention.seconds\[2\]\[1\] = inf"),
    (("gpu_decode_attention", "seconds", 0, 0), "0.1", r"tables.gpu_decode_attention.seconds\[0\]\[0\] = '0.1'"),
    (("transfer", "h2d", "seconds", 1), -5.0, r"tables.transfer.h2d.seconds\[1\] = -5.0"),
    (("launch_overhead", "seconds"), float("nan"), r"tables.launch_overhead.seconds = nan"),
    (("gpu_prefill_attention", "prompt_length", 2), 4, r"tables.gpu_prefill_attention.prompt_length\[2\] = 4 does not "
                                                        r"increase on tables.gpu_prefill_attention.prompt_length\[1\]"),
    (("gpu_decode_attention", "fit", "constant"), float("nan"), r"tables.gpu_decode_attention.fit.constant = nan"),
    (("hybrid_calibration", "modes", "async_overlap", "device_slowdown"), 0.0,
     r"tables.hybrid_calibration.modes.async_overlap.device_slowdown = 0.0: a slowdown must be > 0"),
    (("hybrid_calibration", "modes", "asymmetric_pipeline", "serial_fraction"), 1.5,
     r"tables.hybrid_calibration.modes.asymmetric_pipeline.serial_fraction = 1.5: must be in \[0, 1\]"),
    (("engine_step_overhead", "per_sequence_seconds"), -1.0, r"tables.engine_step_overhead.per_sequence_seconds"),
])
def test_a_corrupt_entry_is_named(profile, tmp_path, path, value, message):
    bad = copy.deepcopy(profile)
    _set(path)(bad["tables"], value)
    file = tmp_path / "bad.json"
    file.write_text(json.dumps(bad))
    with pytest.raises(ProfileError, match=f"{file}: {message}"):
        load_cost_model(file)
    with pytest.raises(ValueError, match=message):  # a profile handed over in memory is checked too
        TableCostModel(bad)


def test_times_that_fall_with_the_work_are_rejected(profile):
    bad = copy.deepcopy(profile)
    bad["tables"]["linear"]["seconds"].reverse()
    with pytest.raises(ProfileError, match=r"tables.linear.seconds falls from .* more work cannot cost less"):
        validate_profile(bad)
    bad = copy.deepcopy(profile)
    for row in bad["tables"]["cpu_decode_attention"]["seconds"]:
        row[-1] = row[0] / 20
    with pytest.raises(ProfileError, match=r"tables.cpu_decode_attention.seconds\[0\] \(along context_length\)"):
        validate_profile(bad)


@pytest.mark.parametrize(("change", "message"), [
    (lambda p: p.pop("tables"), r"has no 'tables' object"),
    (lambda p: p["tables"].pop("transfer"), r"tables is missing \['transfer'\]"),
    (lambda p: p.__setitem__("schema", "apexlib.profile/0"), r"schema must be 'apexlib.profile/1'"),
    (lambda p: p.pop("model_shape"), r"has no 'model_shape' object"),
    (lambda p: p["tables"]["gpu_decode_attention"]["seconds"].pop(), r"must have one row per batch"),
    (lambda p: p["tables"]["linear"]["seconds"].pop(), r"tables.linear.seconds must be a list of \d+ times"),
])
def test_structure_errors_are_clear_not_key_errors(profile, change, message):
    bad = copy.deepcopy(profile)
    change(bad)
    with pytest.raises(ProfileError, match=message):
        TableCostModel(bad)
