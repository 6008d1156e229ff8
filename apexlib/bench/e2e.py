"""End to end on this CPU: the same checkpoint and token prompts through three engines, in one run.

``apex bench e2e`` (``make bench-e2e``) runs a fixed offline workload (64 requests of 128 prompt and
128 output tokens by default, greedy, no EOS stop) through:

- apexlib's engine (``run_benchmark``, device=cpu);
- vLLM's CPU build in its own venv (``run_vllm_benchmark``; skipped, with the reason, without it);
- transformers' batched ``generate`` (one batch of every prompt; they have the same length, so no
  padding), EOS never stopping or masked, as ``ignore_eos`` does.

The three alternate for ``repeats`` rounds (so that a slow minute of a shared machine hits all of them)
and the table gives each engine's median output tokens/s, the ratios, and whether every engine's
greedy tokens equal apexlib's. One more apexlib run with subtask profiling and the engine's step
records says where its time goes: the linear layers, attention, sampling (the runner's subtask
clocks), scheduling and the scheduler's update (the step records), and the rest of the step.

The checkpoint is ``smollm2`` by default (SmolLM2-135M-Instruct, Q4_1 GGUF dequantized: 30 layers,
hidden 576, 9 query / 3 KV heads), or any checkpoint directory or tiny preset (``bench512``). Each run is
of one dtype; :func:`native_dtypes` says which this CPU computes natively (fp32 always, bf16 with
AVX512-BF16 or AMX-BF16), and the CLI runs each of them.

In the same run, the machine's limit (:mod:`apexlib.bench.linear_roofline`): the linear GEMMs of every
iteration apexlib ran, timed alone, and the weights' stream at the DRAM read bandwidth measured now.
``roofline / apexlib`` is the fraction of that limit the engine reaches.

Greedy agreement is counted per engine against apexlib. In 16-bit runs, every request whose tokens
differ is checked where they first differ: the two engines' tokens must be a near-tie of an fp32
reference (transformers' fp32 forward over the common prefix): their fp32 logits within
:data:`NEAR_TIE_LOGIT_GAP`. A larger gap is counted as a bug, not rounding.

The figures are of this CPU only: the JSON names it and the load average.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apexlib.core.host import cpu_info, cpu_short_name, load_average_1min
from apexlib.core.models import special_token_ids
from apexlib.core.results import RESULTS_DIR
from apexlib.engine.settings import BenchmarkSettings
from apexlib.workloads import Fixed, Workload, make_workload, prepare_workload

logger = logging.getLogger(__name__)

ENGINES = ("apexlib", "vllm", "transformers")
DEFAULT_MODEL = "smollm2"
#: Largest fp32 logit gap between two tokens that a 16-bit run may swap and still count as rounding.
#: bf16 keeps 8 significant bits: a logit of magnitude ~20 carries ~0.08 of rounding per operation, and
#: a 30-layer forward accumulates several; one logit unit (a probability ratio of e) is well above that
#: and well below the gaps of confident tokens.
NEAR_TIE_LOGIT_GAP = 1.0
#: KV block size of both paged engines (vLLM's CPU attention takes multiples of 32 only).
BLOCK_SIZE = 32


@dataclass(frozen=True)
class E2ESettings:
    num_requests: int = 64
    prompt_len: int = 128
    output_len: int = 128
    dtype: str = "float32"
    repeats: int = 3
    seed: int = 0
    vllm_python: str | None = None
    model: str = DEFAULT_MODEL

    def __post_init__(self) -> None:
        for name in ("num_requests", "prompt_len", "output_len", "repeats"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")


def e2e_workload(settings: E2ESettings, vocab_size: int, reserved: Sequence[int]) -> Workload:
    workload = make_workload("e2e", settings.num_requests, Fixed(settings.prompt_len), Fixed(settings.output_len),
                             seed=settings.seed, description="end-to-end comparison: fixed lengths, offline")
    return prepare_workload(workload, vocab_size, reserved, settings.seed)


def _bench_settings(path: str, settings: E2ESettings, **overrides: Any) -> BenchmarkSettings:
    """The one run configuration of every paged engine here: all requests at once, the same block size."""
    return BenchmarkSettings.create(**{
        "model": path, "device": "cpu", "dtype": settings.dtype, "warmup_requests": 2, "block_size": BLOCK_SIZE,
        "max_num_seqs": settings.num_requests, "max_model_len": settings.prompt_len + settings.output_len,
        **overrides})


def _apexlib_run(path: str, workload: Workload, settings: E2ESettings) -> tuple[float, dict[str, tuple[int, ...]]]:
    from apexlib.bench.benchmark import run_benchmark

    bench = _bench_settings(path, settings)
    result = run_benchmark(workload, bench, mode="offline", progress=False)
    return result.summary.output_throughput, result.output_token_ids


def _vllm_run(path: str, workload: Workload, settings: E2ESettings) -> tuple[float, dict[str, tuple[int, ...]]]:
    from apexlib.bench.vllm_baseline import run_vllm_benchmark

    bench = _bench_settings(path, settings)
    result = run_vllm_benchmark(workload, bench, mode="offline", python=settings.vllm_python)
    return result.summary.output_throughput, result.output_token_ids


def _transformers_run(path: str, workload: Workload,
                      settings: E2ESettings) -> tuple[float, dict[str, tuple[int, ...]]]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, settings.dtype)).eval()
    model.generation_config.eos_token_id = None  # ignore_eos: EOS neither stops nor is masked
    prompts = torch.tensor([list(r.prompt_token_ids) for r in workload.requests], dtype=torch.long)
    with torch.inference_mode():
        model.generate(prompts[:2], max_new_tokens=8, do_sample=False, pad_token_id=0)  # warm-up, as the others
        started = time.perf_counter()
        output = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=settings.output_len,
                                min_new_tokens=settings.output_len, do_sample=False, pad_token_id=0)
        elapsed = time.perf_counter() - started
    tokens = {r.request_id: tuple(int(t) for t in row[settings.prompt_len:])
              for r, row in zip(workload.requests, output.tolist(), strict=True)}
    return settings.num_requests * settings.output_len / elapsed, tokens


def time_breakdown(path: str, workload: Workload, settings: E2ESettings) -> dict[str, float]:
    """Shares of one apexlib run's wall time: linear, attention, sampling (runner subtasks), scheduling
    and update (step records), and the rest of each step (outputs, the driving loop)."""
    from apexlib.bench.benchmark import build_engine
    from apexlib.engine.drive import WallClock, drive

    bench = _bench_settings(path, settings, warmup_requests=0, profile_subtasks=True)
    engine = build_engine(bench, workload)
    try:
        with engine.recording_steps() as steps:
            _, wall = drive(engine, workload, "offline", WallClock())
    finally:
        engine.close()
    totals = {"linear": 0.0, "attention": 0.0, "sampling": 0.0, "scheduling": 0.0, "update": 0.0}
    for step in steps:
        seconds = step.subtask_seconds or {}
        totals["linear"] += seconds.get("linear", 0.0)
        totals["attention"] += seconds.get("gpu_attention", 0.0) + seconds.get("cpu_attention", 0.0)
        totals["sampling"] += seconds.get("sample", 0.0)
        totals["scheduling"] += step.schedule_seconds
        totals["update"] += step.update_seconds
    totals["other"] = max(0.0, wall - sum(totals.values()))
    return {name: value / wall for name, value in totals.items()} | {"wall_s": wall}, steps


def native_dtypes(simd: Sequence[str]) -> tuple[str, ...]:
    """The dtypes this CPU computes natively: float32, and bfloat16 with AVX512-BF16 or AMX-BF16."""
    return ("float32", "bfloat16") if {"avx512_bf16", "amx_bf16"} & set(simd) else ("float32",)


def machine_limit(config: Any, settings: E2ESettings, steps: Sequence[Any], apexlib_median: float
                  ) -> dict[str, Any]:
    """The in-run roofline of apexlib's iterations (:mod:`apexlib.bench.linear_roofline`)."""
    import torch

    from apexlib.bench.cpu_attention import llc_bytes
    from apexlib.bench.linear_roofline import roofline_seconds, step_shape, time_linears, weight_bytes
    from apexlib.runner.machine import measure_dram_read_gbps

    dtype = getattr(torch, settings.dtype)
    megabytes = max(1024, 2 * llc_bytes() // 2**20)  # far past the last-level cache
    dram_gbps = measure_dram_read_gbps(megabytes=megabytes)
    shapes = [step_shape(step.plan) for step in steps]
    gemm = time_linears(config, dtype, shapes)
    stream = weight_bytes(config, dtype) / (dram_gbps * 1e9)
    limit = roofline_seconds(shapes, gemm, stream)
    output_tokens = settings.num_requests * settings.output_len
    return {
        "dram_read_gbps": dram_gbps, "dram_buffer_mib": megabytes, "weight_bytes": weight_bytes(config, dtype),
        "weights_stream_s": stream, "iterations": len(shapes),
        "gemm_alone_s": {f"{s.tokens}x{s.sampled}": t for s, t in gemm.items()},
        "prefill_roofline_s": roofline_seconds([s for s in shapes if s.tokens > s.sampled], gemm, stream),
        "decode_roofline_s": roofline_seconds([s for s in shapes if s.tokens == s.sampled], gemm, stream),
        "roofline_s": limit,
        "roofline_output_tok_s": output_tokens / limit,
        "apexlib_fraction_of_roofline": apexlib_median / (output_tokens / limit),
    }


def near_tie_check(path: str, workload: Workload, reference: dict[str, tuple[int, ...]],
                   other: dict[str, tuple[int, ...]]) -> list[dict[str, Any]]:
    """Where ``other``'s greedy tokens first differ from ``reference``'s: the fp32 logit gap of the two."""
    import torch
    from transformers import AutoModelForCausalLM

    differing = [r for r in workload.requests if other[r.request_id] != reference[r.request_id]]
    if not differing:
        return []
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    checks = []
    with torch.inference_mode():
        for request in differing:
            ours, theirs = reference[request.request_id], other[request.request_id]
            position = next(i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b)
            prefix = list(request.prompt_token_ids) + list(ours[:position])
            logits = model(torch.tensor([prefix])).logits[0, -1]
            gap = float(logits[ours[position]] - logits[theirs[position]])
            top = int(torch.argmax(logits))
            checks.append({"request_id": request.request_id, "position": position, "tokens": [ours[position],
                           theirs[position]], "fp32_top_token": top, "fp32_logit_gap": gap,
                           "near_tie": abs(gap) <= NEAR_TIE_LOGIT_GAP})
    del model
    return checks


def run_e2e(settings: E2ESettings, out_dir: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Every engine ``settings.repeats`` times (alternating), the table and the time breakdown -> a JSON."""
    from tqdm.auto import tqdm

    from apexlib.bench.vllm_baseline import VllmUnavailable, find_vllm_python
    from apexlib.core.config import ModelConfig
    from apexlib.model.catalog import model_title, provenance, resolve_checkpoint

    path = resolve_checkpoint(settings.model)
    config = ModelConfig.from_pretrained(path)
    workload = e2e_workload(settings, config.vocab_size, special_token_ids(path, config.vocab_size))
    runners = {"apexlib": _apexlib_run, "vllm": _vllm_run, "transformers": _transformers_run}
    skipped: dict[str, str] = {}
    try:
        find_vllm_python("cpu", settings.vllm_python)
    except VllmUnavailable as error:
        skipped["vllm"] = error.reason
        runners.pop("vllm")
    load_before = load_average_1min()
    throughputs: dict[str, list[float]] = {name: [] for name in runners}
    tokens: dict[str, dict[str, tuple[int, ...]]] = {}
    with tqdm(total=settings.repeats * len(runners), desc="e2e", disable=not progress, leave=False) as bar:
        for round_index in range(settings.repeats):
            order = list(runners) if round_index % 2 == 0 else list(reversed(runners))
            for name in order:
                rate, outputs = runners[name](path, workload, settings)
                throughputs[name].append(rate)
                tokens.setdefault(name, outputs)
                bar.update()
    breakdown, steps = time_breakdown(path, workload, settings)
    medians = {name: statistics.median(values) for name, values in throughputs.items()}
    limit = machine_limit(config, settings, steps, medians["apexlib"])
    reference = tokens["apexlib"]
    rows = []
    for name in runners:
        same = sum(tokens[name][rid] == reference[rid] for rid in reference)
        row = {"engine": name, "output_tok_s_median": medians[name], "runs": throughputs[name],
               "ratio_apexlib_to_this": medians["apexlib"] / medians[name],
               "greedy_tokens_equal_to_apexlib": f"{same}/{len(reference)}"}
        if name != "apexlib" and settings.dtype != "float32":
            checks = near_tie_check(path, workload, reference, tokens[name])
            row["disagreements"] = checks
            row["disagreements_not_near_ties"] = sum(not check["near_tie"] for check in checks)
        rows.append(row)
    info = cpu_info()
    report = {
        "what": "end to end: the same checkpoint and token prompts through apexlib, vLLM (CPU) and transformers",
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpu_model": info["cpu_model"], "cpu_affinity": info["cpu_affinity"], "simd": info["simd"],
        "load_average_1min": {"before": load_before, "after": load_average_1min()},
        "native_dtypes": list(native_dtypes(info["simd"])),
        "model": {"name": settings.model, "title": model_title(path), "provenance": provenance(path),
                  "path": path, "hidden_size": config.hidden_size,
                  "num_layers": config.num_layers, "num_heads": config.num_heads, "num_kv_heads": config.num_kv_heads,
                  "vocab_size": config.vocab_size},
        "settings": {"num_requests": settings.num_requests, "prompt_len": settings.prompt_len,
                     "output_len": settings.output_len, "dtype": settings.dtype, "repeats": settings.repeats,
                     "block_size": BLOCK_SIZE},
        "rows": rows, "skipped": skipped, "apexlib_time_shares": breakdown, "machine_limit": limit,
        "near_tie_logit_gap": NEAR_TIE_LOGIT_GAP,
    }
    directory = Path(out_dir) if out_dir is not None else RESULTS_DIR / "e2e"
    directory.mkdir(parents=True, exist_ok=True)
    label = Path(settings.model).name
    name = (f"{report['date_utc'][:10]}-{cpu_short_name(info['cpu_model'], info['simd'])}-{label}-"
            f"{settings.dtype}.json")
    (directory / name).write_text(json.dumps(report, indent=1) + "\n")
    report["path"] = str(directory / name)
    return report


def format_report(report: dict[str, Any]) -> str:
    lines = [f"end to end on {report['cpu_model']} ({report['cpu_affinity']} CPUs), {report['model']['title']}, "
             f"{report['settings']}, load {report['load_average_1min']}",
             f"{'engine':<14}{'tok/s (median)':>16}{'apexlib / this':>16}  greedy tokens = apexlib's   runs"]
    for row in report["rows"]:
        lines.append(f"{row['engine']:<14}{row['output_tok_s_median']:>16.1f}{row['ratio_apexlib_to_this']:>16.2f}"
                     f"  {row['greedy_tokens_equal_to_apexlib']:<26}  {[round(r, 1) for r in row['runs']]}")
        if "disagreements" in row:
            lines.append(f"{'':<14}differing requests: {len(row['disagreements'])}, of which not near-ties "
                         f"(fp32 logit gap > {report['near_tie_logit_gap']}): {row['disagreements_not_near_ties']}")
    limit = report["machine_limit"]
    lines.append(f"machine limit: linear GEMMs alone + weights' stream at {limit['dram_read_gbps']:.1f} GB/s DRAM "
                 f"-> {limit['roofline_output_tok_s']:.1f} tok/s; apexlib reaches "
                 f"{limit['apexlib_fraction_of_roofline']:.2f} of it")
    for name, reason in report["skipped"].items():
        lines.append(f"{name}: skipped ({reason})")
    shares = report["apexlib_time_shares"]
    lines.append("apexlib's time: " + ", ".join(f"{k} {v:.1%}" for k, v in shares.items() if k != "wall_s")
                 + f" of {shares['wall_s']:.2f} s")
    lines.append(f"-> {report['path']}")
    return "\n".join(lines)
