"""Named workload presets (each with its sources: what comes from the papers, what is our choice) and the input/output grid."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from apexlib.workloads.distributions import RelativeUniform, Uniform, make_workload
from apexlib.workloads.types import Workload

# --------------------------------------------------------------------------------------------------
# Presets


@dataclass(frozen=True)
class Preset:
    """A named workload recipe. ``build(**overrides)`` returns the :class:`Workload`;
    ``max_model_len`` is the context limit every request respects (``None``: no stated limit)."""

    name: str
    description: str
    build: Callable[..., Workload]
    max_model_len: int | None

    @property
    def parameters(self) -> dict[str, Any]:
        """The overridable parameters and their defaults."""
        return {name: p.default for name, p in inspect.signature(self.build).parameters.items()}


#: Our choice of grid for the input/output figures (see ``input_output_grid``).
GRID_PROMPT_CENTERS = (128, 256, 512, 1024)
GRID_OUTPUT_CENTERS = (128, 256, 512, 1024, 2048)


def _preset_rate(arrival: str, rate: float | None, default: float) -> float | None:
    """A preset's default rate applies to timed arrivals only (``offline`` takes no rate)."""
    if rate is None and arrival != "offline":
        return default
    return rate


def _neo_a10g_cpu_sensitivity(
    output_len: int = 200,
    num_requests: int = 2000,
    seed: int = 0,
    arrival: str = "offline",
    rate: float | None = None,
) -> Workload:
    return make_workload(
        "neo-a10g-cpu-sensitivity",
        num_requests,
        RelativeUniform(1000, 0.1),
        RelativeUniform(output_len, 0.1),
        arrival=arrival,
        rate=rate,
        seed=seed,
        max_model_len=20000,
        description=_DESCRIPTIONS["neo-a10g-cpu-sensitivity"],
        metadata={"preset": "neo-a10g-cpu-sensitivity", "reported_metric": "sliced_throughput"},
    )


def _uniform_preset(name: str, *, num_requests: int, arrival: str, prompt: tuple[int, int],
                    output: tuple[int, int], max_model_len: int,
                    default_rate: float | None = None) -> Callable[..., Workload]:
    """The builder of a preset with uniform prompt and output lengths; its keyword defaults are the
    preset's parameters (``Preset.parameters``). ``default_rate``: the rate of timed arrivals when none
    is given (None: the caller must give one for ``poisson``/``fixed``)."""

    def build(num_requests: int = num_requests, seed: int = 0, arrival: str = arrival, rate: float | None = None,
              prompt_low: int = prompt[0], prompt_high: int = prompt[1], output_low: int = output[0],
              output_high: int = output[1]) -> Workload:
        return make_workload(
            name,
            num_requests,
            Uniform(prompt_low, prompt_high),
            Uniform(output_low, output_high),
            arrival=arrival,
            rate=rate if default_rate is None else _preset_rate(arrival, rate, default=default_rate),
            seed=seed,
            max_model_len=max_model_len,
            description=_DESCRIPTIONS[name],
            metadata={"preset": name},
        )

    return build


def _grid_point(
    prompt_len: int = 512,
    output_len: int = 512,
    spread: float = 0.1,
    num_requests: int = 500,
    seed: int = 0,
    arrival: str = "offline",
    rate: float | None = None,
) -> Workload:
    return make_workload(
        f"grid-p{prompt_len}-o{output_len}",
        num_requests,
        RelativeUniform(prompt_len, spread),
        RelativeUniform(output_len, spread),
        arrival=arrival,
        rate=rate,
        seed=seed,
        description=_DESCRIPTIONS["grid-point"],
        metadata={"preset": "grid-point"},
    )


_DESCRIPTIONS = {
    "neo-a10g-cpu-sensitivity": (
        "NEO's A10G CPU-sensitivity setting (Llama-3-8B on g5.{2,4,8,16}xlarge). FROM THE PAPERS: inputs "
        "1000 +-10% tokens, outputs one of {50,100,200,300,400} +-10% (one run per value; override "
        "output_len), 2000 requests, all sent at once, max model length 20000, throughput over a slice of "
        "the completions (see apexlib.core.metrics.sliced_throughput); +-10% sampled as NEO's "
        "_get_rand_array does (uniform integers on center +- int(center*0.1)). Sources: "
        "NEO's paper (its published evaluation setup); NEO's evaluation "
        "scripts (evaluation/benchmark.py: prepare_mock_test, run_throughput_test). OUR CHOICE: "
        "the default output_len 200 and the seed."
    ),
    "t4-decode-heavy": (
        "Decode-heavy online trace sized for NEO's T4 setting (Llama-2-7B, max model length 832, 2000 "
        "requests, Poisson arrivals, seed 0; NEO swept 0.5-3.9 req/s, vLLM 0.2-0.6). FROM THE PAPERS: max "
        "model length 832, 2000 requests, Poisson arrivals. OUR CHOICE: the lengths (prompts uniform "
        "64-256, outputs uniform 256-512, so prompt+output <= 768 < 832; NEO used the CarperAI "
        "openai_summarize_comparisons dataset, which we do not ship) and the default rate 1.0 req/s."
    ),
    "decode-heavy-chat": (
        "APEX's target shape: short prefill, long outputs (chat). FROM THE PAPER: only the shape "
        "(decode-heavy, short prompts, long outputs, as in the APEX paper). OUR CHOICE: all numbers (prompts uniform "
        "128-512, outputs uniform 512-2048, 1000 requests, offline, max model length 4096)."
    ),
    "reasoning-long-output": (
        "APEX's reasoning / chain-of-thought shape: very short prompts, very long outputs. FROM THE PAPER: "
        "only the shape (APEX v4 abstract: multi-turn chat and reasoning, short prefill, long decode). OUR "
        "CHOICE: all numbers (prompts uniform 64-256, outputs uniform 1024-4096, 500 requests, offline, max "
        "model length 8192)."
    ),
    "grid-point": (
        "One point of an input/output-length grid for figures: prompt_len +-spread, output_len +-spread "
        "(NEO-style relative uniform). FROM THE PAPERS: the +-10% relative-uniform construction (NEO's "
        "evaluation scripts, which also sweep inputs {500,1000,2000} x outputs {50,100,200}). OUR CHOICE: "
        "the default point 512/512, 500 requests; see input_output_grid for the grid."
    ),
    "tiny-decode-heavy": (
        "Decode-heavy trace for the tiny test models (max_position_embeddings 512). OUR CHOICE entirely: "
        "prompts uniform 16-64, outputs uniform 64-192 (prompt+output <= 256), 64 requests, offline."
    ),
    "tiny-online": (
        "Online trace for the tiny test models. OUR CHOICE entirely: prompts uniform 16-64, outputs uniform "
        "32-128, 32 requests, Poisson arrivals at 8 req/s."
    ),
    "tiny-smoke": (
        "Smallest smoke test for the tiny models. OUR CHOICE entirely: 8 requests, prompts uniform 8-32, "
        "outputs uniform 4-16, offline."
    ),
}

PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset(
            "neo-a10g-cpu-sensitivity",
            _DESCRIPTIONS["neo-a10g-cpu-sensitivity"],
            _neo_a10g_cpu_sensitivity,
            20000,
        ),
        Preset("t4-decode-heavy", _DESCRIPTIONS["t4-decode-heavy"], _uniform_preset(
            "t4-decode-heavy", num_requests=2000, arrival="poisson", prompt=(64, 256), output=(256, 512),
            max_model_len=832, default_rate=1.0), 832),
        Preset("decode-heavy-chat", _DESCRIPTIONS["decode-heavy-chat"], _uniform_preset(
            "decode-heavy-chat", num_requests=1000, arrival="offline", prompt=(128, 512), output=(512, 2048),
            max_model_len=4096), 4096),
        Preset("reasoning-long-output", _DESCRIPTIONS["reasoning-long-output"], _uniform_preset(
            "reasoning-long-output", num_requests=500, arrival="offline", prompt=(64, 256), output=(1024, 4096),
            max_model_len=8192), 8192),
        Preset("grid-point", _DESCRIPTIONS["grid-point"], _grid_point, None),
        Preset("tiny-decode-heavy", _DESCRIPTIONS["tiny-decode-heavy"], _uniform_preset(
            "tiny-decode-heavy", num_requests=64, arrival="offline", prompt=(16, 64), output=(64, 192),
            max_model_len=512), 512),
        Preset("tiny-online", _DESCRIPTIONS["tiny-online"], _uniform_preset(
            "tiny-online", num_requests=32, arrival="poisson", prompt=(16, 64), output=(32, 128), max_model_len=512,
            default_rate=8.0), 512),
        Preset("tiny-smoke", _DESCRIPTIONS["tiny-smoke"], _uniform_preset(
            "tiny-smoke", num_requests=8, arrival="offline", prompt=(8, 32), output=(4, 16), max_model_len=512), 512),
    )
}


def get_preset(name: str, **overrides: Any) -> Workload:
    """Build the named preset, with keyword overrides of its parameters (``Preset.parameters``).

    The overrides are recorded in ``metadata["overrides"]``.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown workload preset {name!r}; known: {sorted(PRESETS)}")
    preset = PRESETS[name]
    accepted = preset.parameters
    unknown = sorted(set(overrides) - set(accepted))
    if unknown:
        raise ValueError(f"preset {name!r} has no parameter(s) {unknown}; it accepts {sorted(accepted)}")
    workload = preset.build(**overrides)
    metadata = dict(workload.metadata)
    metadata["overrides"] = dict(overrides)
    return replace(workload, metadata=metadata)


def input_output_grid(
    prompt_centers: Sequence[int] = GRID_PROMPT_CENTERS,
    output_centers: Sequence[int] = GRID_OUTPUT_CENTERS,
    *,
    spread: float = 0.1,
    num_requests: int = 500,
    seed: int = 0,
    arrival: str = "offline",
    rate: float | None = None,
    max_model_len: int | None = None,
) -> tuple[Workload, ...]:
    """One ``grid-point`` workload per (prompt center, output center), prompts varying slowest.

    With ``max_model_len``, points whose upper bounds do not fit are skipped. The default centers are
    our choice; NEO's scripts used prompts {500, 1000, 2000} x outputs {50, 100, 200}.
    """
    workloads = []
    for prompt_center in prompt_centers:
        for output_center in output_centers:
            if max_model_len is not None:
                upper = (
                    RelativeUniform(prompt_center, spread).bounds[1]
                    + RelativeUniform(output_center, spread).bounds[1]
                )
                if upper > max_model_len:
                    continue
            workloads.append(
                get_preset(
                    "grid-point",
                    prompt_len=prompt_center,
                    output_len=output_center,
                    spread=spread,
                    num_requests=num_requests,
                    seed=seed,
                    arrival=arrival,
                    rate=rate,
                )
            )
    return tuple(workloads)
