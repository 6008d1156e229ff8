"""Runs one benchmark workload through real vLLM. Executed by vLLM's own venv's python, never imported
by apexlib's: ``<vllm venv>/bin/python -m apexlib.bench.vllm_worker --settings S.json --workload W.jsonl
--out R.json`` with ``PYTHONPATH`` pointing at apexlib's source (see ``apexlib.bench.vllm_baseline``).

It imports only torch-free apexlib modules (``apexlib.workloads``) plus vllm. The workload must
carry prompt token ids. Both modes go through ``LLM.llm_engine`` (what ``LLM.generate`` does inside,
``LLM._run_engine``): ``offline`` adds every request, then steps; ``online`` adds each request once
its arrival time has passed and steps, sleeping while idle. Every request is greedy with
``ignore_eos`` and ``max_tokens = output_len``. The time of each new token is the return of the
``step()`` that delivered it (``time.perf_counter``, seconds since the run's start).

The settings JSON holds ``model``, ``dtype``, ``device``, ``block_size``, ``num_gpu_blocks`` (usable
blocks, or null to let vLLM size its pool), ``kv_cache_memory_bytes`` (or null),
``gpu_memory_utilization``, ``max_num_seqs``, ``max_model_len``, ``max_num_batched_tokens``, ``seed``,
``mode`` and ``warmup_requests``. The result JSON: versions, timings and output token ids per request.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

from apexlib.workloads import Workload

logger = logging.getLogger("apexlib.bench.vllm_worker")


def build_llm(settings: dict[str, Any]):
    from vllm import LLM

    kwargs: dict[str, Any] = {
        "model": settings["model"],
        "dtype": settings["dtype"],
        "enforce_eager": True,
        # prompts are token ids; a checkpoint may have no tokenizer (and vLLM's transformers may not
        # read ours)
        "skip_tokenizer_init": True,
        "block_size": settings["block_size"],
        "max_num_seqs": settings["max_num_seqs"],
        "max_model_len": settings["max_model_len"],
        "max_num_batched_tokens": settings["max_num_batched_tokens"],
        "enable_chunked_prefill": True,
        # apexlib has no prefix cache: compare like with like
        "enable_prefix_caching": False,
        "gpu_memory_utilization": settings["gpu_memory_utilization"],
        "seed": settings["seed"],
        "disable_log_stats": False,
    }
    if settings.get("num_gpu_blocks") is not None:
        # vLLM's block pool keeps one block back as its null block: ask for one more so that the
        # usable blocks equal apexlib's.
        kwargs["num_gpu_blocks_override"] = settings["num_gpu_blocks"] + 1
    if settings.get("kv_cache_memory_bytes") is not None:
        kwargs["kv_cache_memory_bytes"] = settings["kv_cache_memory_bytes"]
    logger.info("vllm.LLM(%s)", kwargs)
    return LLM(**kwargs)


def _preemptions(llm) -> int | None:
    try:
        for metric in llm.get_metrics():
            if metric.name == "vllm:num_preemptions":
                return int(metric.value)
    except Exception as error:  # metrics are an optional extra
        logger.warning("could not read vLLM's preemption counter: %s", error)
    return None


def run(workload: Workload, settings: dict[str, Any]) -> dict[str, Any]:
    import torch
    import vllm
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    def params(max_tokens: int) -> SamplingParams:
        return SamplingParams(max_tokens=int(max_tokens), temperature=0.0, ignore_eos=True, detokenize=False)

    init_started = time.perf_counter()
    llm = build_llm(settings)
    init_time = time.perf_counter() - init_started
    engine = llm.llm_engine

    for index, request in enumerate(workload.requests[: settings.get("warmup_requests", 0)]):
        engine.add_request(f"warmup-{index}", TokensPrompt(prompt_token_ids=list(request.prompt_token_ids)),
                           params(min(request.output_len, 8)))
    while engine.has_unfinished_requests():
        engine.step()
    preemptions_before = _preemptions(llm)

    mode = settings["mode"]
    pending = deque(sorted(workload.requests, key=lambda request: request.arrival_time))
    arrival: dict[str, float] = {}
    token_times: dict[str, list[float]] = {request.request_id: [] for request in workload.requests}
    token_ids: dict[str, list[int]] = {}
    finish: dict[str, float] = {}
    iterations = 0
    start = time.perf_counter()

    def add(request) -> None:
        arrival[request.request_id] = 0.0 if mode == "offline" else request.arrival_time
        engine.add_request(request.request_id, TokensPrompt(prompt_token_ids=list(request.prompt_token_ids)),
                           params(request.output_len))

    if mode == "offline":
        while pending:
            add(pending.popleft())
    while pending or engine.has_unfinished_requests():
        now = time.perf_counter() - start
        while pending and pending[0].arrival_time <= now:
            add(pending.popleft())
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, pending[0].arrival_time - (time.perf_counter() - start)))
            continue
        outputs = engine.step()
        stamp = time.perf_counter() - start
        iterations += 1
        for output in outputs:
            if output.request_id not in token_times:
                continue
            ids = list(output.outputs[0].token_ids)
            times = token_times[output.request_id]
            times.extend([stamp] * (len(ids) - len(times)))
            token_ids[output.request_id] = ids
            if output.finished:
                finish[output.request_id] = stamp
    wall_time = time.perf_counter() - start
    preemptions_after = _preemptions(llm)

    cache_config = engine.vllm_config.cache_config
    records = []
    for request in workload.requests:
        times = token_times[request.request_id]
        records.append({
            "request_id": request.request_id,
            "prompt_len": request.prompt_len,
            "arrival_time": arrival[request.request_id],
            "first_token_time": times[0],
            "finish_time": finish[request.request_id],
            "token_times": times,
            "output_token_ids": token_ids[request.request_id],
        })
    return {
        "vllm_version": vllm.__version__,
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "init_time_s": init_time,
        "wall_time_s": wall_time,
        "iterations": iterations,
        "preemptions": (None if preemptions_before is None or preemptions_after is None
                        else preemptions_after - preemptions_before),
        "num_gpu_blocks_vllm": cache_config.num_gpu_blocks,
        "block_size_vllm": cache_config.block_size,
        "requests": records,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", required=True, help="settings JSON (see the module docstring)")
    parser.add_argument("--workload", required=True, help="workload JSONL with prompt token ids")
    parser.add_argument("--out", required=True, help="where to write the result JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = json.loads(Path(args.settings).read_text(encoding="utf-8"))
    workload = Workload.from_jsonl(args.workload)
    if any(request.prompt_token_ids is None for request in workload.requests):
        raise SystemExit(f"{args.workload}: every request needs prompt_token_ids")
    result = run(workload, settings)
    Path(args.out).write_text(json.dumps(result) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":  # vLLM starts its engine core with spawn: this guard is required
    sys.exit(main())
