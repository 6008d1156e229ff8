"""``apex gpu-check``: the one prepared check for a lent CUDA machine, in under 8 minutes on one H100/H200.

Size: one script with one time budget; its steps share the run's plan, budgets and report, so they
live together (each step is a function of its own).

Steps, in order; each is timed against its budget, followed by ``torch.cuda.synchronize()`` (so an
asynchronous CUDA error surfaces in the step that caused it), and the first exception ends the run
with the step's name (:class:`StepFailed`, exit 1). No step starts when the time used plus its budget
would pass the time limit (:class:`TimeLimitReached`, exit 3), so a run within budgets ends in time.

``cuda-tests``
    ``pytest -m cuda`` on the CUDA tests (a subprocess; junit XML parsed: every test must pass, none
    may skip), first, so a broken CUDA path ends the run in a minute or two, before the checkpoint is
    built. Skipped, with the reason, when ``device=cpu``.
``checkpoint``
    a random-weight checkpoint of the size's shape (Llama-2-7B: hidden 4096, intermediate 11008, 32
    layers, 32 heads, 32 KV heads, vocab 32000, fp16, ~13.5 GB), streamed shard by shard from a
    generator on the device (:func:`apexlib.model.tiny.write_random_checkpoint`), built once into
    ``build/gpu-check/checkpoints/`` and reused. From the start of the run a thread compiles the CPU
    kernels (a fresh machine has no kernel cache; the compile takes a minute or more).
``kernels``
    waits for that compile (``apexlib.kernels.build.load``).
``plan``
    the workload (the ``t4-decode-heavy`` preset, shortened), the GPU KV cap and the CPU KV budget. On
    CUDA also the device's memory as the engine's sizing sees it: ``total_memory``, free memory right
    after the CUDA context exists and after this process loaded the weights (``device_memory``: what
    the T4 memory assumption of :mod:`apexlib.costs.assumptions` stands for).
    A big GPU imitates a small one by capping its KV pool only, never by scaling times: the cap is
    what the engine itself would size on a T4 (:func:`t4_gpu_kv_gib`).
``profile``
    ``apex profile --quick`` of the checkpoint on this device (:func:`~apexlib.profiling.profiler.profile_model`);
    each engine it builds is closed (weights and pools released) before the next one is built.
``bench-gpu_only``, ``bench-neo``, ``bench-apex``
    the workload through the real engine (``run_benchmark``) and through the simulator with the
    measured profile (:func:`apexlib.sim.simulator.fidelity`).
``report``
    the rows, the engine-vs-simulator comparison and the step times.

Everything lands in ``data/results/gpu-check/<device>-<size>/``: ``comparison.csv``/``.json`` (one row
per policy, engine next to simulator, with the device provenance), ``rows.csv``/``meta.json`` (every
request of every run, engine and simulator), ``profile.json``, ``plan.json``, ``environment.json``,
``steps.json`` (rewritten after each step, so a run stopped half-way still says how far it got) and
the CUDA tests' ``cuda-tests.xml``/``.log``, and ``results.tgz`` holding all of them (rewritten after each
step: a remote runner may hand back only a few files).

``smoke=True`` (``--smoke``): a first contact in under 3 minutes on a GPU: the ``small`` shape (0.5B,
grouped-query attention) instead of Llama-2-7B, one policy (apex, which runs GPU-tier and CPU-tier
requests), no engine calibration runs; results in ``<device>-small-smoke/``.

``size="tiny"`` (hidden 128, 2 layers) runs the same pipeline in well under a minute with ``device=cpu``
(``--smoke`` too: one policy); that is how the tests exercise every part but ``pytest -m cuda``.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apexlib.model.tiny import TinyModelSpec
from apexlib.policies.registry import policy_spec

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_RESULTS_DIR = ROOT / "data" / "results" / "gpu-check"
DEFAULT_CHECKPOINT_DIR = ROOT / "build" / "gpu-check" / "checkpoints"
# the CUDA tests, the quickest first (a broken CUDA path fails before anything heavy runs)
CUDA_TEST_FILES = ("tests/test_cuda_ready.py", "tests/test_parity.py", "tests/test_hybrid.py")
POLICIES = ("gpu_only", "neo", "apex")
#: ``--smoke``: one hybrid policy (it runs GPU-tier and CPU-tier requests) on a small shape
SMOKE_POLICIES = ("apex",)
#: the size a ``--smoke`` run uses instead of each size
SMOKE_SIZES = {"llama-2-7b": "small", "small": "small", "tiny": "tiny"}
RESULTS_ARCHIVE = "results.tgz"
WORKLOAD_PRESET = "t4-decode-heavy"
GIB = 1024**3

#: Larger shapes are refused with --device cpu (a profile of them would take minutes to hours there).
CPU_MAX_PARAMETERS = 50_000_000

#: Exit codes of the CLI: a step failed, or the run passed its time limit (2: bad input / no CUDA).
EXIT_STEP_FAILED = 1
EXIT_TIME_LIMIT = 3

#: the longest the kernels step waits for the compile (a first one on a fresh machine)
KERNEL_COMPILE_TIMEOUT_S = 300


@dataclass(frozen=True)
class CheckSize:
    """Everything that differs between the real check and its CPU rehearsal.

    ``kv_cap``: ``"t4"`` (the GPU KV pool a T4 would have next to these weights, :func:`t4_gpu_kv_gib`)
    or ``"blocks"`` (``num_gpu_blocks``, for shapes where a T4's memory means nothing). ``budgets``:
    seconds per step (a step over its budget is logged and flagged); ``time_limit_s``: no step starts
    once the run has used this much.
    """

    name: str
    spec: TinyModelSpec
    dtype: str
    num_requests: int
    prompt_range: tuple[int, int]
    output_range: tuple[int, int]
    kv_cap: str
    num_gpu_blocks: int | None
    with_tokenizer: bool
    profile_repetitions: int
    profile_warmup: int
    #: entries replacing the profiler's quick grid (``ProfileSettings.grid``)
    profile_grid: Mapping[str, tuple[int, ...]]
    #: requests of each engine calibration run of the profile (None: the profiler's; 0: none)
    calibration_requests: int | None
    budgets: Mapping[str, float]
    time_limit_s: float
    note: str = ""

    def __post_init__(self) -> None:
        if self.kv_cap not in ("t4", "blocks"):
            raise ValueError(f"kv_cap must be 't4' or 'blocks', got {self.kv_cap!r}")
        if (self.kv_cap == "blocks") != (self.num_gpu_blocks is not None):
            raise ValueError("num_gpu_blocks is given exactly when kv_cap == 'blocks'")
        missing = [step for step in STEPS if step not in self.budgets]
        if missing:
            raise ValueError(f"size {self.name!r}: budgets lack step(s) {missing}")


STEPS = ("cuda-tests", "checkpoint", "kernels", "plan", "profile", *(f"bench-{policy}" for policy in POLICIES), "report")


def steps_of(policies: Sequence[str]) -> tuple[str, ...]:
    """The steps of a run over ``policies``, in order."""
    return ("cuda-tests", "checkpoint", "kernels", "plan", "profile", *(f"bench-{policy}" for policy in policies),
            "report")

LLAMA_2_7B = TinyModelSpec(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                           max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-5, dtype="float16",
                           name="llama-2-7b-random")
# a ~0.5B Llama shape with grouped-query attention (the CUDA GQA paths) for the smoke run
SMALL = TinyModelSpec(hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=16,
                      num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, rope_theta=10000.0,
                      rms_norm_eps=1e-5, dtype="float16", name="small-gqa-random")
TINY = TinyModelSpec(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024, dtype="float32",
                     name="gpu-check-tiny")

SIZES: dict[str, CheckSize] = {
    # Budgets are estimates for one H100/H200 with 16 host cores (not yet measured there: steps.json
    # records each step's time against its budget); their sum (475 s) stays under the 480 s limit.
    # cuda-tests come first; the hybrid ones wait for the CPU kernels' compile (started with the run),
    # so on a fresh machine the compile's time falls in that step and the kernels step only joins it.
    "llama-2-7b": CheckSize(
        name="llama-2-7b", spec=LLAMA_2_7B, dtype="float16", num_requests=32, prompt_range=(96, 160),
        output_range=(192, 320), kv_cap="t4", num_gpu_blocks=None,
        # a 32000-entry tokenizer padded with reserved tokens costs ~15 s per engine to load and
        # the benchmark feeds token ids: no tokenizer
        with_tokenizer=False, profile_repetitions=3, profile_warmup=1,
        # the quick grid with one more linear point; more would enlarge the profiled KV pools (one block
        # per linear row) and their random fill
        profile_grid={"linear_tokens": (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)},
        calibration_requests=None,
        budgets={"cuda-tests": 120, "checkpoint": 60, "kernels": 5, "plan": 10, "profile": 140,
                 "bench-gpu_only": 45, "bench-neo": 45, "bench-apex": 45, "report": 5},
        time_limit_s=480,
        note="Llama-2-7B shape, random fp16 weights; GPU KV capped to a T4's"),
    # --smoke on a GPU: a first contact in under 3 minutes (one policy, no engine calibration runs)
    "small": CheckSize(
        name="small", spec=SMALL, dtype="float16", num_requests=16, prompt_range=(64, 128), output_range=(64, 128),
        # 48 blocks of 16 tokens: three of the 16 requests at once, the rest decode on the CPU tier
        kv_cap="blocks", num_gpu_blocks=48, with_tokenizer=False, profile_repetitions=2, profile_warmup=1,
        profile_grid={"linear_tokens": (1, 4, 16, 64, 256)}, calibration_requests=0,
        # the smoke run's budgets sum to 175 s; the limit leaves room for a slow first kernel compile
        budgets={"cuda-tests": 90, "checkpoint": 15, "kernels": 10, "plan": 10, "profile": 30,
                 "bench-gpu_only": 15, "bench-neo": 15, "bench-apex": 15, "report": 5},
        time_limit_s=240,
        note="small GQA shape (0.5B), random fp16 weights: the smoke run"),
    "tiny": CheckSize(
        name="tiny", spec=TINY, dtype="float32", num_requests=8, prompt_range=(16, 48), output_range=(16, 32),
        # 8 blocks of 16 tokens: two or three of the 8 requests fit, the rest decode on the CPU tier
        kv_cap="blocks", num_gpu_blocks=8, with_tokenizer=True, profile_repetitions=2, profile_warmup=1,
        # a small grid and no engine calibration runs: the hybrid fit's search costs ~1 s per 10 points
        # on one core, and the calibration runs add hundreds of points
        profile_grid={"linear_tokens": (1, 4, 16, 64, 256), "prefill_lengths": (8, 32, 128),
                      "decode_batches": (1, 4, 16), "decode_contexts": (16, 64, 256), "transfer_blocks": (1, 16),
                      "hybrid_gpu_batches": (1, 4), "hybrid_cpu_batches": (2, 8), "hybrid_contexts": (64,)},
        calibration_requests=0,
        budgets={"cuda-tests": 60, "checkpoint": 10, "kernels": 600, "plan": 5, "profile": 40,
                 "bench-gpu_only": 10, "bench-neo": 10, "bench-apex": 10, "report": 5},
        time_limit_s=900,  # a first kernel compile on a 2-core machine takes minutes
        note="tiny shape (CPU rehearsal of the pipeline)"),
}


class CudaUnavailable(ValueError):
    """The real check was asked for on a machine where torch sees no CUDA device."""


class StepFailed(RuntimeError):
    """A step raised; ``step`` names it, ``__cause__`` is the original exception."""

    def __init__(self, step: str, seconds: float, error: BaseException) -> None:
        super().__init__(f"step {step!r} failed after {seconds:.1f} s: {type(error).__name__}: {error}")
        self.step = step
        self.seconds = seconds
        self.report: GpuCheckReport | None = None  # what ran before it


class TimeLimitReached(RuntimeError):
    """The run used its time limit before a step could start."""

    def __init__(self, step: str, elapsed: float, budget: float, limit: float) -> None:
        super().__init__(f"not starting step {step!r}: the run has used {elapsed:.0f} s and the step's budget is "
                         f"{budget:.0f} s, past the {limit:.0f} s time limit (--time-limit)")
        self.step = step
        self.report: GpuCheckReport | None = None  # what ran before it


@dataclass
class StepRecord:
    name: str
    status: str  # "ok" | "over-budget" | "skipped" | "failed" | "not-started"
    seconds: float
    budget_s: float
    detail: str = ""
    #: CUDA: the most GPU memory torch held allocated during the step (GiB)
    peak_gpu_gib: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class GpuCheckReport:
    """What a run produced: the step records, the comparison rows (one per policy) and where they are."""

    out_dir: Path
    steps: list[StepRecord] = field(default_factory=list)
    comparison: list[dict[str, Any]] = field(default_factory=list)
    plan: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)

    @property
    def total_seconds(self) -> float:
        return sum(step.seconds for step in self.steps)


# ----------------------------------------------------------------------------------------------
# the pieces
# ----------------------------------------------------------------------------------------------
def resolve_check_device(device: str, size: CheckSize) -> str:
    """``cuda``/``cuda:N`` (refused with :class:`CudaUnavailable` when torch sees none) or ``cpu``."""
    import torch

    if device == "cpu":
        if size.spec.num_parameters() > CPU_MAX_PARAMETERS:
            raise ValueError(f"--size {size.name} needs --device cuda (the {size.spec.num_parameters() / 1e9:.1f}B "
                             f"profile alone would take far too long on a CPU); rehearse on CPU with --size tiny")
        return device
    if not re.fullmatch(r"cuda(:\d+)?", device):
        raise ValueError(f"--device must be cuda, cuda:N or cpu, got {device!r}")
    if not torch.cuda.is_available():
        raise CudaUnavailable(
            f"--device {device}: torch {torch.__version__} sees no CUDA device (torch.version.cuda = "
            f"{torch.version.cuda}, torch.cuda.is_available() is False). This check needs an NVIDIA GPU with a "
            f"CUDA build of torch; rehearse it here with --device cpu --size tiny")
    index = int(device.split(":")[1]) if ":" in device else 0
    if index >= torch.cuda.device_count():
        raise CudaUnavailable(f"--device {device}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    return device


def device_provenance(device: str) -> dict[str, Any]:
    """Device name, date, torch/CUDA versions and the host facts (``apexlib.envinfo.environment``)."""
    import torch

    from apexlib.envinfo import environment

    env = environment()
    cuda = device.startswith("cuda")
    info = {
        "device": device,
        "device_name": torch.cuda.get_device_name(torch.device(device)) if cuda else f"{env['cpu_model']} (device=cpu)",
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": env["torch"], "cuda": env["cuda"],
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "nvidia_driver": _nvidia_driver() if cuda else None,
        **(_memory_after_init(device) if cuda else {}),
        **{key: env[key] for key in ("gpus", "cpu_model", "cpu_count", "cpu_affinity", "simd", "memory_gib",
                                     "git_commit", "apexlib_version", "python", "platform")},
    }
    return info


def _memory_after_init(device: str) -> dict[str, Any]:
    """The device's total memory and what ``mem_get_info`` leaves free right after the CUDA context exists."""
    import torch

    torch.cuda.init()
    free, total = torch.cuda.mem_get_info(torch.device(device))
    properties = torch.cuda.get_device_properties(torch.device(device))
    return {"total_memory": int(properties.total_memory), "mem_get_info_total": int(total),
            "free_after_cuda_init": int(free), "compute_capability": f"{properties.major}.{properties.minor}"}


def _nvidia_driver() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        result = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip().splitlines()[0] if result.stdout.strip() else None


def device_slug(provenance: Mapping[str, Any]) -> str:
    if str(provenance["device"]).startswith("cuda"):
        return re.sub(r"[^a-z0-9]+", "-", str(provenance["device_name"]).lower()).strip("-")
    from apexlib.core.host import cpu_short_name

    return "cpu-" + cpu_short_name(str(provenance["cpu_model"]), provenance.get("simd", ()))


def run_cuda_tests(out_dir: Path, files: Sequence[str] = CUDA_TEST_FILES, timeout_s: float = 300) -> str:
    """``pytest -m cuda FILES`` in a subprocess; every selected test must pass and none may skip.

    Writes ``cuda-tests.xml`` (junit) and ``cuda-tests.log``; returns a one-line summary. Raises
    RuntimeError naming the failures, errors or skip reasons, or when nothing was selected.
    """
    missing = [name for name in files if not (ROOT / name).is_file()]
    if missing:
        raise FileNotFoundError(f"the CUDA tests {missing} are not in {ROOT} (run from a checkout)")
    xml_path, log_path = out_dir / "cuda-tests.xml", out_dir / "cuda-tests.log"
    env = {key: value for key, value in os.environ.items() if key != "CUDA_LAUNCH_BLOCKING"}
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rs", "-p", "no:cacheprovider",
               f"--junitxml={xml_path}", *files]
    logger.info("running %s", " ".join(command))
    try:
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as error:
        log_path.write_text(str(error.stdout or "") + str(error.stderr or ""))
        raise RuntimeError(f"pytest -m cuda did not finish in {timeout_s:.0f} s (log: {log_path})") from None
    log_path.write_text(result.stdout + result.stderr)
    counts = junit_counts(xml_path) if xml_path.is_file() else None
    if counts is None:
        raise RuntimeError(f"pytest -m cuda exited {result.returncode} without a junit report; log: {log_path}\n"
                           + _tail(result.stdout + result.stderr))
    summary = (f"{counts['tests']} CUDA test(s): {counts['passed']} passed, {counts['failures']} failed, "
               f"{counts['errors']} errors, {counts['skipped']} skipped")
    if counts["tests"] == 0:
        raise RuntimeError(f"pytest -m cuda selected no test in {list(files)}")
    if counts["failures"] or counts["errors"] or result.returncode not in (0,):
        raise RuntimeError(f"{summary} (exit {result.returncode}); log: {log_path}\n"
                           + _tail(result.stdout + result.stderr))
    if counts["skipped"]:
        reasons = "; ".join(sorted(set(counts["skip_reasons"])))
        raise RuntimeError(f"{summary}: a CUDA machine must run them all (skip reason: {reasons})")
    return summary


def junit_counts(path: Path) -> dict[str, Any]:
    """tests / failures / errors / skipped / passed and the skip messages of a pytest junit XML file."""
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts: dict[str, Any] = {key: sum(int(suite.get(key, 0)) for suite in suites)
                              for key in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["skip_reasons"] = [element.get("message", "") for element in root.iter("skipped")]
    return counts


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def checkpoint_path(size: CheckSize, device: str, seed: int = 0, root: Path | None = None) -> Path:
    """Where the size's random checkpoint lives: named by everything that changes its bytes."""
    import hashlib

    from apexlib.model.tiny import TINY_CODE_VERSION

    kind = "cuda" if device.startswith("cuda") else "cpu"
    payload = json.dumps({"spec": size.spec.to_dict(), "seed": seed, "drawn_on": kind, "code": TINY_CODE_VERSION,
                          "tokenizer": size.with_tokenizer}, sort_keys=True)
    key = hashlib.sha256(payload.encode()).hexdigest()[:12]
    return (root or DEFAULT_CHECKPOINT_DIR) / f"{size.spec.name}-seed{seed}-{kind}-{key}"


def build_checkpoint(size: CheckSize, device: str, path: Path, seed: int = 0) -> tuple[Path, str]:
    """The size's checkpoint at ``path`` (reused when complete); returns it and a one-line detail."""
    from apexlib.model.tiny import write_random_checkpoint

    if (path / "config.json").is_file():
        return path, f"reused {path}"
    weight_bytes = size.spec.num_parameters() * size.spec.torch_dtype.itemsize
    path.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path.parent).free
    if free < 1.1 * weight_bytes:
        raise OSError(f"{path.parent} has {free / GIB:.1f} GiB free; the {size.spec.name} checkpoint needs "
                      f"{weight_bytes / GIB:.1f} GiB (+10%)")
    write_random_checkpoint(path, size.spec, seed, device=device, with_tokenizer=size.with_tokenizer)
    return path, f"wrote {weight_bytes / 1e9:.2f} GB to {path}"


def checkpoint_weight_bytes(path: Path) -> int:
    """Bytes of the checkpoint's tensors (the index's total_size, else the safetensors file sizes)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        total = json.loads(index.read_text()).get("metadata", {}).get("total_size")
        if isinstance(total, int):
            return total
    return sum(file.stat().st_size for file in path.glob("*.safetensors"))


def t4_gpu_kv_gib(model_config: Any, weight_bytes: int, max_num_batched_tokens: int | None = None) -> tuple[float, str]:
    """The GPU KV budget the engine would size on a T4 next to these weights, and how it is derived.

    The engine's own rule (``EngineArgs.create_engine_config``): (device memory - weights - activation
    reserve) x ``DEVICE_MEMORY_UTILIZATION``, with the T4's memory from its datasheet entry
    (``apexlib.costs.hardware``); the same rule the simulator applies to a T4 roofline.
    """
    from apexlib.costs.hardware import get_hardware
    from apexlib.engine.args import DEVICE_MEMORY_UTILIZATION, activation_reserve_bytes

    t4 = get_hardware("t4")
    reserve = activation_reserve_bytes(model_config, max_num_batched_tokens)
    free = t4.memory_gib * GIB - weight_bytes - reserve
    if free <= 0:
        raise ValueError(f"{weight_bytes / GIB:.2f} GiB of weights + {reserve / GIB:.2f} GiB activation reserve do "
                         f"not fit in a T4's {t4.memory_gib} GiB")
    gib = free * DEVICE_MEMORY_UTILIZATION / GIB
    reason = (f"T4: {t4.memory_gib:g} GiB ({t4.name} datasheet) - weights {weight_bytes / GIB:.2f} GiB - activation "
              f"reserve {reserve / GIB:.2f} GiB = {free / GIB:.2f} GiB, x {DEVICE_MEMORY_UTILIZATION} (the engine's "
              f"share of free device memory for KV) = {gib:.2f} GiB: the pool the engine would size on a T4")
    return gib, reason


def make_plan(size: CheckSize, model_path: Path, num_requests: int | None = None, block_size: int = 16) -> dict[str, Any]:
    """The workload, the GPU KV cap and the CPU KV budget of the benchmark runs (plain JSON)."""
    from apexlib.core.config import ModelConfig

    model_config = ModelConfig.from_pretrained(model_path)
    workload = plan_workload(size, num_requests)
    kv_per_token = model_config.kv_bytes_per_token(size.dtype)
    demand = sum(-(-request.total_len // block_size) for request in workload.requests) * block_size * kv_per_token
    plan: dict[str, Any] = {
        "size": size.name, "note": size.note, "model_path": str(model_path), "dtype": size.dtype,
        "block_size": block_size, "weight_bytes": checkpoint_weight_bytes(model_path),
        "workload": {"preset": WORKLOAD_PRESET, "num_requests": len(workload), "prompt_range": list(size.prompt_range),
                     "output_range": list(size.output_range), "arrival": "offline", "seed": workload.seed,
                     "prompt_tokens": sum(r.prompt_len for r in workload.requests),
                     "output_tokens": sum(r.output_len for r in workload.requests),
                     "max_total_len": workload.max_total_len},
        "kv_bytes_per_token": kv_per_token, "kv_demand_gib": demand / GIB,
    }
    if size.kv_cap == "t4":
        gib, reason = t4_gpu_kv_gib(model_config, plan["weight_bytes"])
        plan.update(gpu_kv_gib=round(gib, 4), num_gpu_blocks=None, gpu_kv_reason=reason)
        gpu_bytes = gib * GIB
    else:
        plan.update(gpu_kv_gib=None, num_gpu_blocks=size.num_gpu_blocks,
                    gpu_kv_reason=f"{size.num_gpu_blocks} blocks of {block_size} tokens: a fraction of the workload's "
                                  f"KV demand, so the hybrid policies decode on the CPU tier")
        gpu_bytes = size.num_gpu_blocks * block_size * kv_per_token
    plan["gpu_kv_tokens"] = int(gpu_bytes // kv_per_token)
    plan["gpu_kv_share_of_demand"] = gpu_bytes / demand
    # neo/apex: a host tier that holds the whole workload (+10%, whole 1/8 GiB), so only the GPU cap binds
    plan["cpu_kv_gib"] = math.ceil(demand * 1.1 / GIB * 8) / 8
    return plan


def measure_load(model_path: Path, dtype: str, device: str) -> dict[str, Any]:
    """Free device memory after this process loads the checkpoint's weights (what the engine's KV sizing
    starts from), then the weights are released again. CUDA only."""
    import torch

    from apexlib.core.config import ModelConfig
    from apexlib.engine.args import DEVICE_MEMORY_UTILIZATION, activation_reserve_bytes
    from apexlib.engine.engine import measure_device_memory
    from apexlib.model.weights import load_model

    config = ModelConfig.from_pretrained(model_path)
    before = measure_device_memory(device, 0)
    model = load_model(config, dtype, device)
    memory = measure_device_memory(device, activation_reserve_bytes(config, None, None, dtype))
    allocated = torch.cuda.memory_allocated(torch.device(device))
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return {"total_memory": memory.total, "free_before_load": before.free_after_load,
            "free_after_load": memory.free_after_load, "weights_allocated": int(allocated),
            "activation_reserve": memory.activation_reserve, "kv_budget_after_load": memory.kv_budget,
            "engine_kv_gib_here": memory.kv_budget * DEVICE_MEMORY_UTILIZATION / GIB}


def plan_workload(size: CheckSize, num_requests: int | None = None):
    from apexlib.workloads import get_preset

    return get_preset(WORKLOAD_PRESET, num_requests=num_requests or size.num_requests, arrival="offline",
                      prompt_low=size.prompt_range[0], prompt_high=size.prompt_range[1],
                      output_low=size.output_range[0], output_high=size.output_range[1])


def run_profile(size: CheckSize, device: str, model_path: Path, out_dir: Path, command: str) -> Path:
    from apexlib.profiling.profiler import ProfileSettings, profile_model, write_profile

    settings = ProfileSettings(model=str(model_path), device=device, dtype=size.dtype, quick=True,
                               repetitions=size.profile_repetitions, warmup=size.profile_warmup, progress=False,
                               command=command, grid=size.profile_grid,
                               calibration_requests=size.calibration_requests)
    return write_profile(profile_model(settings), out_dir / "profile.json")


def run_policy(policy: str, device: str, plan: Mapping[str, Any], profile_path: Path,
               results: list[Any], num_requests: int | None = None) -> dict[str, Any]:
    """One policy through the engine and the simulator (``fidelity``); returns its comparison row."""
    from apexlib.bench.fidelity import fidelity
    from apexlib.engine.settings import BenchmarkSettings

    size = SIZES[plan["size"]]
    settings = BenchmarkSettings.create(
        model=plan["model_path"], policy=policy, device=device, dtype=plan["dtype"], block_size=plan["block_size"],
        gpu_kv_gib=plan["gpu_kv_gib"], num_gpu_blocks=plan["num_gpu_blocks"],
        cpu_kv_gib=plan["cpu_kv_gib"] if policy_spec(policy).uses_cpu_tier else None, warmup_requests=2)
    frame = fidelity(plan_workload(size, num_requests), settings, profile_path, policies=[policy], mode="offline",
                     results=results, scheduler_overhead="measured")
    row = {key: _plain(value) for key, value in frame.iloc[0].to_dict().items()}
    engine_result = results[-2]
    row["num_cpu_blocks"] = engine_result.provenance["num_cpu_blocks"]
    row["engine_wall_time_s"] = engine_result.wall_time_s
    return row


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    return value


def _write_json(path: Path, payload: Any) -> None:
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")


def write_archive(out_dir: Path) -> Path:
    """``results.tgz`` in ``out_dir``: every other file there, under the directory's name (a remote runner
    may hand back only a few files). Rewritten after each step, so a stopped run still has one."""
    import tarfile

    target = out_dir / RESULTS_ARCHIVE
    partial = out_dir / (RESULTS_ARCHIVE + ".partial")
    with tarfile.open(partial, "w:gz") as archive:
        for path in sorted(out_dir.rglob("*")):
            if path.is_file() and path.name not in (RESULTS_ARCHIVE, partial.name):
                archive.add(path, arcname=str(Path(out_dir.name) / path.relative_to(out_dir)))
    partial.replace(target)
    return target


def write_comparison(report: GpuCheckReport) -> None:
    """``comparison.csv`` / ``comparison.json``: one row per policy with the device provenance columns."""
    import pandas as pd

    env = report.environment
    provenance = {"device": env.get("device"), "device_name": env.get("device_name"), "date_utc": env.get("date_utc"),
                  "torch": env.get("torch"), "cuda": env.get("cuda"), "nvidia_driver": env.get("nvidia_driver"),
                  "cpu_model": env.get("cpu_model"), "cpu_count": env.get("cpu_affinity"),
                  "git_commit": env.get("git_commit"), "size": report.plan.get("size"),
                  "gpu_kv_gib": report.plan.get("gpu_kv_gib"), "gpu_kv_reason": report.plan.get("gpu_kv_reason"),
                  "cpu_kv_gib": report.plan.get("cpu_kv_gib")}
    rows = [{**provenance, **row} for row in report.comparison]
    pd.DataFrame(rows).to_csv(report.out_dir / "comparison.csv", index=False)
    _write_json(report.out_dir / "comparison.json", rows)


# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------
class _KernelBuild:
    """``apexlib.kernels.build.load()`` in a daemon thread (it releases the GIL while ninja compiles)."""

    def __init__(self) -> None:
        import threading

        self.started = self.finished = time.perf_counter()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._build, name="apex-kernel-build", daemon=True)
        self.thread.start()

    def _build(self) -> None:
        try:
            from apexlib.kernels.build import load

            load()
        except BaseException as error:  # re-raised in wait(), in the kernels step
            self.error = error
        self.finished = time.perf_counter()

    def wait(self, timeout_s: float) -> str:
        self.thread.join(timeout_s)
        if self.thread.is_alive():
            raise TimeoutError(f"the CPU kernels did not compile within {timeout_s:.0f} s")
        if self.error is not None:
            raise RuntimeError(f"compiling the CPU kernels failed: {self.error}") from self.error
        from apexlib.attention import cpu as cpu_attention

        return (f"loaded {self.finished - self.started:.1f} s after the run started (a first build compiles); "
                f"ISA {cpu_attention.selected_isa()}")


class _Steps:
    """Runs steps in order: budget check, synchronize after, record, rewrite steps.json and the archive."""

    def __init__(self, report: GpuCheckReport, size: CheckSize, device: str, time_limit_s: float,
                 smoke: bool = False) -> None:
        self.report, self.size, self.device, self.limit, self.smoke = report, size, device, time_limit_s, smoke
        self.started = time.perf_counter()

    def _write(self) -> None:
        _write_json(self.report.out_dir / "steps.json",
                    {"time_limit_s": self.limit, "elapsed_s": time.perf_counter() - self.started,
                     "size": self.size.name, "smoke": self.smoke,
                     "steps": [step.to_dict() for step in self.report.steps]})
        write_archive(self.report.out_dir)

    def skip(self, name: str, reason: str) -> None:
        logger.info("[%s] skipped: %s", name, reason)
        self.report.steps.append(StepRecord(name, "skipped", 0.0, self.size.budgets[name], reason))
        self._write()

    def run(self, name: str, action: Callable[[], str | None]) -> None:
        elapsed = time.perf_counter() - self.started
        budget = self.size.budgets[name]
        if elapsed + budget > self.limit:
            self.report.steps.append(StepRecord(name, "not-started", 0.0, budget, "time limit"))
            self._write()
            error = TimeLimitReached(name, elapsed, budget, self.limit)
            error.report = self.report
            raise error
        logger.info("[%s] start (budget %.0f s, %.0f s used of %.0f s)", name, budget, elapsed, self.limit)
        cuda = self.device.startswith("cuda")
        if cuda:
            import torch

            torch.cuda.reset_peak_memory_stats(torch.device(self.device))
        started = time.perf_counter()
        peak = None
        try:
            detail = action() or ""
            if cuda:
                torch.cuda.synchronize(torch.device(self.device))
                peak = torch.cuda.max_memory_allocated(torch.device(self.device)) / GIB
                # engines of this step are garbage now: give their memory back before the next builds its own
                gc.collect()
                torch.cuda.empty_cache()
        except Exception as error:
            seconds = time.perf_counter() - started
            logger.error("[%s] failed after %.1f s: %s: %s", name, seconds, type(error).__name__, error)
            self.report.steps.append(StepRecord(name, "failed", seconds, budget, f"{type(error).__name__}: {error}"))
            self._write()
            failure = StepFailed(name, seconds, error)
            failure.report = self.report
            raise failure from error
        seconds = time.perf_counter() - started
        status = "ok"
        if seconds > budget:
            status = "over-budget"
            logger.warning("[%s] took %.1f s, over its %.0f s budget", name, seconds, budget)
        logger.info("[%s] %s in %.1f s%s%s", name, status, seconds,
                    f" (peak GPU memory {peak:.2f} GiB)" if peak is not None else "", f": {detail}" if detail else "")
        self.report.steps.append(StepRecord(name, status, seconds, budget, detail, peak))
        self._write()


def run_gpu_check(*, device: str = "cuda", size: str = "llama-2-7b", out_dir: str | Path | None = None,
                  checkpoint_dir: str | Path | None = None, skip_tests: bool = False,
                  time_limit_s: float | None = None, num_requests: int | None = None, smoke: bool = False,
                  cuda_test_files: Sequence[str] = CUDA_TEST_FILES, command: str = "apex gpu-check") -> GpuCheckReport:
    """Run every step (see the module doc); returns the report, raises :class:`StepFailed`,
    :class:`TimeLimitReached`, or :class:`CudaUnavailable` / ValueError before anything runs.

    ``smoke``: a first contact: the size's smoke size (:data:`SMOKE_SIZES`) and one policy
    (:data:`SMOKE_POLICIES`), results in ``<device>-<size>-smoke/``."""
    if size not in SIZES:
        raise ValueError(f"--size must be one of {sorted(SIZES)}, got {size!r}")
    check = SIZES[SMOKE_SIZES[size]] if smoke else SIZES[size]
    policies = SMOKE_POLICIES if smoke else POLICIES
    if num_requests is not None and num_requests < 1:
        raise ValueError(f"--num-requests must be >= 1, got {num_requests}")
    if os.environ.pop("CUDA_LAUNCH_BLOCKING", None) is not None:
        logger.warning("CUDA_LAUNCH_BLOCKING was set: unset for this run (it serialises every kernel and changes "
                       "the timings); errors still surface at the synchronize after each step")
    device = resolve_check_device(device, check)
    environment = device_provenance(device)
    name = f"{device_slug(environment)}-{check.name}" + ("-smoke" if smoke else "")
    out = Path(out_dir) if out_dir is not None else DEFAULT_RESULTS_DIR / name
    out.mkdir(parents=True, exist_ok=True)
    report = GpuCheckReport(out_dir=out, environment=environment)
    _write_json(out / "environment.json", environment)
    steps = _Steps(report, check, device, time_limit_s if time_limit_s is not None else check.time_limit_s, smoke)
    logger.info("gpu-check: %s%s on %s (%s), results in %s", check.name, " (smoke)" if smoke else "", device,
                environment["device_name"], out)

    kernels = _KernelBuild()  # compiles while the CUDA tests run and the checkpoint is written
    state: dict[str, Any] = {}
    target = checkpoint_path(check, device, root=Path(checkpoint_dir) if checkpoint_dir else None)

    # first, so that a broken CUDA path ends the run before the checkpoint is built
    if device.startswith("cuda") and not skip_tests:
        steps.run("cuda-tests", lambda: run_cuda_tests(out, cuda_test_files, timeout_s=4 * check.budgets["cuda-tests"]))
    else:
        steps.skip("cuda-tests", "--skip-tests" if skip_tests else
                   "device=cpu: pytest -m cuda needs a CUDA GPU (those tests skip here)")

    def checkpoint() -> str:
        state["model"], detail = build_checkpoint(check, device, target)
        return detail

    steps.run("checkpoint", checkpoint)
    steps.run("kernels", lambda: kernels.wait(timeout_s=max(KERNEL_COMPILE_TIMEOUT_S, 4 * check.budgets["kernels"])))

    def plan() -> str:
        report.plan = make_plan(check, state["model"], num_requests)
        if device.startswith("cuda"):
            # what a T4's memory assumption stands for, measured on this device (apexlib.costs.assumptions)
            report.plan["device_memory"] = {
                **{key: environment[key] for key in ("total_memory", "mem_get_info_total", "free_after_cuda_init",
                                                     "compute_capability")},
                **measure_load(state["model"], check.dtype, device)}
        _write_json(out / "plan.json", report.plan)
        return report.plan["gpu_kv_reason"]

    steps.run("plan", plan)

    def profile() -> str:
        state["profile"] = run_profile(check, device, state["model"], out, command)
        return str(state["profile"])

    steps.run("profile", profile)

    results: list[Any] = []
    for policy in policies:
        def bench(policy: str = policy) -> str:
            from apexlib.core.results import write_results

            row = run_policy(policy, device, report.plan, state["profile"], results, num_requests)
            report.comparison.append(row)
            write_comparison(report)
            write_results(results, out.parent, out.name)
            return (f"engine {row['engine_output_throughput']:.1f} tok/s, simulator "
                    f"{row['sim_output_throughput']:.1f} tok/s ({row['error_output_throughput']:+.1%})")

        steps.run(f"bench-{policy}", bench)

    def finish() -> str:
        write_comparison(report)
        return f"{len(report.comparison)} policies -> {out / 'comparison.csv'}, all files in {out / RESULTS_ARCHIVE}"

    steps.run("report", finish)
    return report


def format_report(report: GpuCheckReport) -> str:
    """The summary table (engine vs simulator per policy) and each step's time, as text."""
    env = report.environment
    lines = [f"gpu-check on {env.get('device_name')} ({env.get('device')}), torch {env.get('torch')}, "
             f"CUDA {env.get('cuda')}, {env.get('date_utc')}",
             f"workload: {report.plan.get('workload', {}).get('num_requests')} requests, prompts "
             f"{report.plan.get('workload', {}).get('prompt_range')}, outputs "
             f"{report.plan.get('workload', {}).get('output_range')}; GPU KV cap: {report.plan.get('gpu_kv_reason')}",
             "",
             f"{'policy':<9} {'tok/s engine':>12} {'tok/s sim':>10} {'error':>7} {'TPOT ms engine':>15} "
             f"{'TPOT ms sim':>12} {'error':>7} {'iters eng/sim':>14} {'preempt':>8}"]
    for row in report.comparison:
        lines.append(
            f"{row['policy']:<9} {row['engine_output_throughput']:>12.1f} {row['sim_output_throughput']:>10.1f} "
            f"{row['error_output_throughput']:>+7.1%} {row['engine_tpot_median_s'] * 1e3:>15.2f} "
            f"{row['sim_tpot_median_s'] * 1e3:>12.2f} {row['error_tpot_median_s']:>+7.1%} "
            f"{row['engine_iterations']!s:>6}/{row['sim_iterations']!s:<7} {row['engine_preemptions']!s:>8}")
    lines += ["", f"{'step':<16} {'status':<12} {'seconds':>8} {'budget':>7} {'GPU GiB':>8}  detail"]
    for step in report.steps:
        peak = f"{step.peak_gpu_gib:.1f}" if step.peak_gpu_gib is not None else "-"
        lines.append(f"{step.name:<16} {step.status:<12} {step.seconds:>8.1f} {step.budget_s:>7.0f} {peak:>8}  "
                     f"{step.detail[:100]}")
    lines.append(f"{'total':<16} {'':<12} {report.total_seconds:>8.1f}")
    lines.append(f"results: {report.out_dir}")
    return "\n".join(lines)


__all__ = [
    "POLICIES",
    "SIZES",
    "SMOKE_POLICIES",
    "SMOKE_SIZES",
    "STEPS",
    "CheckSize",
    "CudaUnavailable",
    "GpuCheckReport",
    "StepFailed",
    "StepRecord",
    "TimeLimitReached",
    "build_checkpoint",
    "checkpoint_path",
    "device_provenance",
    "format_report",
    "junit_counts",
    "make_plan",
    "resolve_check_device",
    "run_cuda_tests",
    "run_gpu_check",
    "steps_of",
    "t4_gpu_kv_gib",
    "write_archive",
]
