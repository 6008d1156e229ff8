"""Workload generation, presets and the JSONL schema (apexlib.workloads). CPU only, no torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from apexlib.workloads import (
    PRESETS,
    Empirical,
    Fixed,
    Normal,
    RelativeUniform,
    Uniform,
    Workload,
    WorkloadFormatError,
    WorkloadRequest,
    arrival_times,
    get_preset,
    input_output_grid,
    make_workload,
    workload_path,
)


def _lengths(workload: Workload) -> tuple[list[int], list[int]]:
    return [r.prompt_len for r in workload.requests], [r.output_len for r in workload.requests]


def _arrivals(workload: Workload) -> np.ndarray:
    return np.array([r.arrival_time for r in workload.requests])


# ---------------------------------------------------------------------------------------------- import


def test_modules_import_no_torch():
    code = (
        "import sys\n"
        "import apexlib.workloads, apexlib.core.metrics\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------------------------- determinism


def test_same_seed_same_workload_different_seed_different():
    def build(seed):
        return make_workload(
            "w", 200, Uniform(10, 100), Normal(50, 20, 1, 200), arrival="poisson", rate=3.0, seed=seed
        )

    assert build(7) == build(7)
    assert build(7).requests != build(8).requests
    assert _lengths(build(7)) != _lengths(build(8))
    assert not np.array_equal(_arrivals(build(7)), _arrivals(build(8)))


def test_lengths_do_not_depend_on_arrival_process():
    """Separate random streams: a rate sweep at one seed keeps the same lengths."""
    slow = make_workload("w", 100, Uniform(1, 500), Uniform(1, 500), arrival="poisson", rate=1.0, seed=3)
    fast = make_workload("w", 100, Uniform(1, 500), Uniform(1, 500), arrival="poisson", rate=2.0, seed=3)
    offline = make_workload("w", 100, Uniform(1, 500), Uniform(1, 500), seed=3)
    assert _lengths(slow) == _lengths(fast) == _lengths(offline)
    np.testing.assert_allclose(_arrivals(fast) * 2.0, _arrivals(slow))


# ---------------------------------------------------------------------------------------------- arrivals


def test_poisson_mean_interarrival_close_to_inverse_rate():
    rate = 4.0
    workload = make_workload("p", 20000, Fixed(8), Fixed(8), arrival="poisson", rate=rate, seed=0)
    arrivals = _arrivals(workload)
    assert arrivals[0] == 0.0
    gaps = np.diff(arrivals)
    assert np.all(gaps >= 0)
    # std of the mean gap is (1/rate)/sqrt(n) ~ 0.7%: a 3% bound is loose.
    assert abs(gaps.mean() - 1 / rate) < 0.03 / rate
    # exponential gaps: coefficient of variation ~ 1
    assert 0.95 < gaps.std() / gaps.mean() < 1.05


def test_gamma_burstiness_keeps_the_rate():
    rng = np.random.Generator(np.random.PCG64(1))
    arrivals = arrival_times(20000, rng, arrival="poisson", rate=2.0, burstiness=0.5)
    gaps = np.diff(arrivals)
    assert abs(gaps.mean() - 0.5) < 0.03 * 0.5
    assert gaps.std() / gaps.mean() > 1.2  # burstier than Poisson (CV = 1/sqrt(0.5) ~ 1.41)


def test_fixed_and_offline_arrivals():
    fixed = make_workload("f", 5, Fixed(4), Fixed(4), arrival="fixed", rate=2.0)
    assert list(_arrivals(fixed)) == [0.0, 0.5, 1.0, 1.5, 2.0]
    offline = make_workload("o", 5, Fixed(4), Fixed(4))
    assert list(_arrivals(offline)) == [0.0] * 5


# ---------------------------------------------------------------------------------------------- distributions


def test_fixed_and_uniform_bounds_inclusive():
    workload = make_workload("u", 3000, Uniform(3, 6), Fixed(9), seed=1)
    prompts, outputs = _lengths(workload)
    assert set(prompts) == {3, 4, 5, 6}
    assert set(outputs) == {9}


def test_normal_is_clipped():
    workload = make_workload("n", 2000, Normal(100, 1000, 50, 150), Normal(20.4, 0.0, 1, 100), seed=2)
    prompts, outputs = _lengths(workload)
    assert min(prompts) == 50 and max(prompts) == 150  # a huge std hits both clips
    assert set(outputs) == {20}  # std 0: the rounded mean


def test_normal_mean_roughly_right_when_clipping_is_rare():
    workload = make_workload("n", 5000, Normal(300, 30, 1, 10_000), Fixed(1), seed=0)
    prompts, _ = _lengths(workload)
    assert abs(np.mean(prompts) - 300) < 3


def test_relative_uniform_matches_neo_rand_array():
    dist = RelativeUniform(1000, 0.1)
    assert dist.bounds == (900, 1100)
    assert RelativeUniform(55, 0.1).bounds == (50, 60)  # int(5.5) = 5, as NEO's int(avg * ratio)
    workload = make_workload("r", 5000, dist, RelativeUniform(200, 0.1), seed=0)
    prompts, outputs = _lengths(workload)
    assert min(prompts) == 900 and max(prompts) == 1100
    assert min(outputs) == 180 and max(outputs) == 220
    assert abs(np.mean(prompts) - 1000) < 5


def _write_csv(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_empirical_samples_pairs_jointly(tmp_path):
    csv_path = _write_csv(
        tmp_path / "lengths.csv",
        "# source: hand-written test table\ninput_len,output_len,note\n10,100,a\n20,200,b\n30,300,c\n",
    )
    dist = Empirical.from_csv(csv_path)
    assert dist.pairs == ((10, 100), (20, 200), (30, 300))
    assert dist.source == str(csv_path)
    workload = make_workload("e", 600, dist, seed=4, max_model_len=330)
    pairs = {(r.prompt_len, r.output_len) for r in workload.requests}
    assert pairs == {(10, 100), (20, 200), (30, 300)}  # joint: never (10, 300) etc.
    assert workload.metadata["prompt_lengths"]["kind"] == "empirical"
    assert workload.metadata["output_lengths"] is None
    with pytest.raises(ValueError, match="max_model_len"):
        make_workload("e", 10, dist, max_model_len=300)


@pytest.mark.parametrize(
    ("text", "line", "field"),
    [
        ("prompt,output_len\n1,2\n", 1, "input_len"),
        ("input_len,output_len\n1,x\n", 2, "output_len"),
        ("# c\ninput_len,output_len\n5,0\n", 3, "output_len"),
        ("input_len,output_len\n5\n", 2, "output_len"),
    ],
)
def test_empirical_csv_errors_name_line_and_field(tmp_path, text, line, field):
    csv_path = _write_csv(tmp_path / "bad.csv", text)
    with pytest.raises(WorkloadFormatError) as info:
        Empirical.from_csv(csv_path)
    assert info.value.line == line and info.value.field == field
    assert f"line {line}" in str(info.value) and field in str(info.value) and "bad.csv" in str(info.value)


def test_empirical_csv_without_rows(tmp_path):
    with pytest.raises(WorkloadFormatError, match="no data rows"):
        Empirical.from_csv(_write_csv(tmp_path / "empty.csv", "input_len,output_len\n"))


# ---------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_requests": 0}, "num_requests must be >= 1"),
        ({"arrival": "poisson", "rate": 0.0}, "rate must be a finite number > 0"),
        ({"arrival": "poisson", "rate": -1.0}, "rate must be a finite number > 0"),
        ({"arrival": "poisson"}, "rate must be a finite number > 0"),
        ({"arrival": "fixed", "rate": float("inf")}, "rate must be a finite number > 0"),
        ({"rate": 2.0}, "rate must be None for arrival='offline'"),
        ({"arrival": "burst"}, "arrival must be one of"),
        ({"arrival": "fixed", "rate": 1.0, "burstiness": 0.5}, "burstiness only applies"),
        ({"arrival": "poisson", "rate": 1.0, "burstiness": 0.0}, "burstiness must be"),
        ({"seed": -1}, "seed must be >= 0"),
        ({"max_model_len": 100}, "above max_model_len 100"),
    ],
)
def test_make_workload_parameter_errors(kwargs, message):
    arguments = {"num_requests": 4, "arrival": "offline", "rate": None}
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        make_workload("w", prompt_lengths=Uniform(10, 60), output_lengths=Uniform(10, 60), **arguments)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Uniform(10, 5), r"Uniform.low \(10\) must be <= Uniform.high \(5\)"),
        (lambda: Uniform(0, 5), "Uniform.low must be >= 1"),
        (lambda: Fixed(0), "Fixed.n must be >= 1"),
        (lambda: Fixed(2.5), "Fixed.n must be an int"),
        (lambda: Normal(10, -1, 1, 20), "Normal.std must be"),
        (lambda: Normal(10, 1, 30, 20), "Normal.low"),
        (lambda: RelativeUniform(100, 1.5), "RelativeUniform.spread"),
        (lambda: Empirical(()), "Empirical.pairs"),
        (lambda: Empirical(((1, 0),)), "output_len must be >= 1"),
    ],
)
def test_distribution_parameter_errors(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_empirical_with_separate_outputs_is_rejected():
    with pytest.raises(ValueError, match="sampled jointly"):
        make_workload("w", 3, Empirical(((1, 2),)), Fixed(3))


def test_request_and_workload_validation():
    with pytest.raises(ValueError, match="output_len"):
        WorkloadRequest("a", 4, 0, 0.0)
    with pytest.raises(ValueError, match="arrival_time"):
        WorkloadRequest("a", 4, 1, float("nan"))
    with pytest.raises(ValueError, match="prompt_token_ids has 2"):
        WorkloadRequest("a", 4, 1, 0.0, (1, 2))
    request = WorkloadRequest("a", 4, 1, 0.0)
    with pytest.raises(ValueError, match="duplicate request_id"):
        Workload("w", 0, (request, request))


# ---------------------------------------------------------------------------------------------- JSONL


def test_jsonl_round_trip(tmp_path):
    workload = make_workload(
        "rt", 50, Uniform(1, 90), Normal(30, 10, 1, 60), arrival="poisson", rate=7.3, seed=11, description="d"
    )
    path = workload.to_jsonl(tmp_path / "sub" / "rt.jsonl")
    loaded = Workload.from_jsonl(path)
    assert loaded == workload
    assert loaded.metadata == workload.metadata
    header = json.loads(path.read_text().splitlines()[0])
    assert header["format"] == "apexlib-workload" and header["version"] == 1 and header["seed"] == 11
    with_ids = workload.with_token_ids(vocab_size=1000, seed=5)
    assert Workload.from_jsonl(with_ids.to_jsonl(tmp_path / "ids.jsonl")) == with_ids


def test_jsonl_accepts_unsorted_arrivals_and_blank_lines(tmp_path):
    path = tmp_path / "u.jsonl"
    header = {"format": "apexlib-workload", "version": 1, "name": "u", "seed": None}
    lines = [
        json.dumps(header),
        json.dumps({"request_id": "b", "prompt_len": 3, "output_len": 2, "arrival_time": 5}),
        "",
        json.dumps({"request_id": "a", "prompt_len": 3, "output_len": 2, "arrival_time": 1.5}),
        "",
    ]
    path.write_text("\n".join(lines))
    workload = Workload.from_jsonl(path)
    assert [r.request_id for r in workload.requests] == ["b", "a"]
    assert [r.arrival_time for r in workload.requests] == [5.0, 1.5]
    assert workload.seed is None and workload.description == "" and dict(workload.metadata) == {}


_HEADER = json.dumps({"format": "apexlib-workload", "version": 1, "name": "bad", "seed": 0})
_GOOD = {"request_id": "r0", "prompt_len": 4, "output_len": 2, "arrival_time": 0.0}


def _request_line(**changes) -> str:
    record = dict(_GOOD)
    for key, value in changes.items():
        if value is _DROP:
            record.pop(key)
        else:
            record[key] = value
    return json.dumps(record)


_DROP = object()


@pytest.mark.parametrize(
    ("lines", "line", "field"),
    [
        pytest.param([_HEADER, _request_line(prompt_len=_DROP)], 2, "prompt_len", id="missing-field"),
        pytest.param([_HEADER, _request_line(request_id=_DROP)], 2, "request_id", id="missing-id"),
        pytest.param([_HEADER, _request_line(prompt_len="4")], 2, "prompt_len", id="wrong-type-str"),
        pytest.param([_HEADER, _request_line(prompt_len=4.0)], 2, "prompt_len", id="wrong-type-float"),
        pytest.param([_HEADER, _request_line(output_len=True)], 2, "output_len", id="wrong-type-bool"),
        pytest.param([_HEADER, _request_line(prompt_len=-3)], 2, "prompt_len", id="negative-length"),
        pytest.param([_HEADER, _request_line(output_len=0)], 2, "output_len", id="output-zero"),
        pytest.param([_HEADER, _request_line(arrival_time=-0.5)], 2, "arrival_time", id="negative-arrival"),
        pytest.param([_HEADER, _request_line(arrival_time="1")], 2, "arrival_time", id="arrival-str"),
        pytest.param(
            [_HEADER, '{"request_id": "r0", "prompt_len": 4, "output_len": 2, "arrival_time": NaN}'],
            2,
            "arrival_time",
            id="arrival-nan",
        ),
        pytest.param(
            [_HEADER, '{"request_id": "r0", "prompt_len": 4, "output_len": 2, "arrival_time": Infinity}'],
            2,
            "arrival_time",
            id="arrival-inf",
        ),
        pytest.param([_HEADER, _request_line(request_id=7)], 2, "request_id", id="id-not-string"),
        pytest.param(
            [_HEADER, _request_line(), _request_line(prompt_len=5)], 3, "request_id", id="duplicate-id"
        ),
        pytest.param([_HEADER, _request_line(), '{"request_id": "r1",'], 3, None, id="bad-json"),
        pytest.param([_HEADER, "[1, 2]"], 2, None, id="not-an-object"),
        pytest.param([_HEADER, _request_line(colour="red")], 2, "colour", id="unknown-field"),
        pytest.param(
            [_HEADER, _request_line(prompt_token_ids=[1, 2])], 2, "prompt_token_ids", id="ids-length"
        ),
        pytest.param(
            [_HEADER, _request_line(prompt_token_ids=[1, 2, -1, 3])], 2, "prompt_token_ids", id="ids-neg"
        ),
        pytest.param([_request_line()], 1, "format", id="no-header"),
        pytest.param(
            [json.dumps({"format": "apexlib-workload", "version": 2, "name": "x"}), _request_line()],
            1,
            "version",
            id="bad-version",
        ),
        pytest.param(
            [json.dumps({"format": "apexlib-workload", "version": 1}), _request_line()],
            1,
            "name",
            id="header-no-name",
        ),
        pytest.param(
            [
                json.dumps({"format": "apexlib-workload", "version": 1, "name": "x", "metadata": []}),
                _request_line(),
            ],
            1,
            "metadata",
            id="header-metadata-type",
        ),
        pytest.param(
            [
                json.dumps({"format": "apexlib-workload", "version": 1, "name": "x", "sed": 0}),
                _request_line(),
            ],
            1,
            "sed",
            id="header-unknown-field",
        ),
        pytest.param([], 1, None, id="empty-file"),
        pytest.param([_HEADER], 2, None, id="no-requests"),
    ],
)
def test_malformed_jsonl_names_file_line_and_field(tmp_path, lines, line, field):
    path = tmp_path / "broken.jsonl"
    path.write_text("\n".join(lines) + ("\n" if lines else ""))
    with pytest.raises(WorkloadFormatError) as info:
        Workload.from_jsonl(path)
    error = info.value
    assert isinstance(error, ValueError)
    assert error.line == line and error.field == field
    message = str(error)
    assert str(path) in message and f"line {line}" in message
    if field is not None:
        assert repr(field) in message


def test_workload_path_default_dir():
    path = workload_path("tiny-smoke")
    assert (
        path.name == "tiny-smoke.jsonl"
        and path.parent.name == "workloads"
        and path.parent.parent.name == "data"
    )


# ---------------------------------------------------------------------------------------------- token ids


def test_with_token_ids_deterministic_and_in_vocab():
    workload = get_preset("tiny-smoke")
    first = workload.with_token_ids(vocab_size=50, seed=3, reserved_ids=(0, 1, 2, 49))
    second = workload.with_token_ids(vocab_size=50, seed=3, reserved_ids=(0, 1, 2, 49))
    other = workload.with_token_ids(vocab_size=50, seed=4, reserved_ids=(0, 1, 2, 49))
    assert first == second
    assert first.requests != other.requests
    all_ids = set()
    for original, request in zip(workload.requests, first.requests, strict=True):
        assert request.prompt_token_ids is not None and len(request.prompt_token_ids) == request.prompt_len
        assert (request.prompt_len, request.output_len, request.arrival_time) == (
            original.prompt_len,
            original.output_len,
            original.arrival_time,
        )
        all_ids.update(request.prompt_token_ids)
    assert all_ids <= set(range(3, 49))
    assert len(all_ids) > 30  # spread over the vocabulary
    assert first.metadata["token_ids"] == {"vocab_size": 50, "seed": 3, "reserved_ids": [0, 1, 2, 49]}
    assert workload.requests[0].prompt_token_ids is None  # the original is untouched


def test_with_token_ids_errors():
    workload = get_preset("tiny-smoke")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        workload.with_token_ids(vocab_size=10, reserved_ids=(10,))
    with pytest.raises(ValueError, match="leaves no ids"):
        workload.with_token_ids(vocab_size=2, reserved_ids=(0, 1))
    with pytest.raises(ValueError, match="vocab_size"):
        workload.with_token_ids(vocab_size=0)


# ---------------------------------------------------------------------------------------------- presets


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_within_its_limits(name):
    preset = PRESETS[name]
    workload = get_preset(name)
    assert len(workload) >= 1
    assert workload.name and workload.description == preset.description
    assert "OUR CHOICE" in preset.description  # every preset says which numbers are ours
    assert workload.metadata["preset"] == name and workload.metadata["overrides"] == {}
    if preset.max_model_len is not None:
        assert workload.max_total_len <= preset.max_model_len
    arrivals = _arrivals(workload)
    assert arrivals[0] == 0.0 and np.all(np.diff(arrivals) >= 0)
    assert get_preset(name) == workload  # deterministic
    json.dumps(workload.header())  # provenance is serialisable


def test_neo_a10g_preset_matches_the_paper_numbers():
    workload = get_preset("neo-a10g-cpu-sensitivity")
    assert len(workload) == 2000
    prompts, outputs = _lengths(workload)
    assert 900 <= min(prompts) and max(prompts) <= 1100
    assert 180 <= min(outputs) and max(outputs) <= 220
    assert set(_arrivals(workload)) == {0.0}
    for center in (50, 100, 200, 300, 400):
        _, outputs = _lengths(get_preset("neo-a10g-cpu-sensitivity", output_len=center, num_requests=300))
        delta = int(center * 0.1)
        assert center - delta <= min(outputs) and max(outputs) <= center + delta


def test_tiny_presets_fit_the_tiny_models():
    prompts, outputs = _lengths(get_preset("tiny-decode-heavy"))
    assert 16 <= min(prompts) and max(prompts) <= 64
    assert 64 <= min(outputs) and max(outputs) <= 192
    assert len(get_preset("tiny-smoke")) == 8
    online = get_preset("tiny-online")
    assert _arrivals(online)[-1] > 0


def test_t4_preset_fits_832_and_takes_overrides():
    workload = get_preset("t4-decode-heavy", num_requests=300, rate=2.5)
    assert len(workload) == 300 and workload.max_total_len <= 832
    assert workload.metadata["rate"] == 2.5 and workload.metadata["overrides"] == {
        "num_requests": 300,
        "rate": 2.5,
    }
    offline = get_preset("t4-decode-heavy", num_requests=10, arrival="offline")
    assert set(_arrivals(offline)) == {0.0}
    with pytest.raises(ValueError, match="above max_model_len 832"):
        get_preset("t4-decode-heavy", output_high=700)


def test_get_preset_errors():
    with pytest.raises(ValueError, match="unknown workload preset"):
        get_preset("nope")
    with pytest.raises(ValueError, match="no parameter"):
        get_preset("tiny-smoke", prompt_len=5)


def test_input_output_grid():
    grid = input_output_grid((100, 200), (50, 400), num_requests=20)
    assert [w.name for w in grid] == ["grid-p100-o50", "grid-p100-o400", "grid-p200-o50", "grid-p200-o400"]
    fitting = input_output_grid((100, 200), (50, 400), num_requests=20, max_model_len=600)
    assert [w.name for w in fitting] == ["grid-p100-o50", "grid-p100-o400", "grid-p200-o50"]
    assert all(w.max_total_len <= 600 for w in fitting)
