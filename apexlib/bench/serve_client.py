"""``apex bench serve``: a workload sent over HTTP to an OpenAI-compatible server, measured by the client.

Each request is sent at its workload arrival time (Poisson arrivals for ``--rate``) to
``POST /v1/completions`` with its prompt as token ids, ``max_tokens`` = its output length,
``ignore_eos``, greedy sampling and ``stream: true``; the client records when it sent the request, when
each chunk with tokens arrived and when the stream ended. The metrics follow vLLM's serving benchmark
(``vllm bench serve``), measured the same way from the client side: TTFT = first chunk - send time,
E2E = end of stream - send time, TPOT = (E2E - TTFT) / (output tokens - 1), ITL = the gaps between
chunks. ``return_token_ids`` (a vLLM extension that ``apex serve`` implements too) makes each chunk
carry its token ids, so every token gets the arrival time of the chunk that brought it; a server that
does not send them is counted one token per chunk with text.

The same client drives ``apex serve`` and ``vllm serve``; the rows are those of ``apex bench`` (same
provenance columns, ``executor = "http"``), with the engine settings the server reports in
``/v1/models`` (apexlib's ``engine_config``) or, for another server, what was given on the command line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import aiohttp

from apexlib.core.config import ModelConfig
from apexlib.core.models import special_token_ids
from apexlib.core.results import BenchmarkResult, RequestRecord, build_provenance, finish_result
from apexlib.engine.settings import BenchmarkSettings, resolve_mode
from apexlib.envinfo import provenance_facts
from apexlib.workloads import Workload, prepare_workload

logger = logging.getLogger(__name__)


class ServeBenchmarkError(RuntimeError):
    """A request of the benchmark failed (the server answered an error or broke the stream)."""


@dataclass(frozen=True)
class ServerInfo:
    base_url: str
    model: str  # the name to send as 'model'
    owned_by: str
    max_model_len: int | None
    engine_config: Mapping[str, Any]


async def server_info(client: aiohttp.ClientSession, base_url: str, model: str | None) -> ServerInfo:
    async with client.get(f"{base_url}/v1/models") as response:
        if response.status != 200:
            raise ServeBenchmarkError(f"{base_url}/v1/models: HTTP {response.status}: {(await response.read())[:500]!r}")
        entries = (await response.json()).get("data") or []
    if not entries:
        raise ServeBenchmarkError(f"{base_url}/v1/models lists no model")
    entry = next((e for e in entries if e.get("id") == model), None) if model else entries[0]
    if entry is None:
        raise ServeBenchmarkError(f"model {model!r} is not served at {base_url}; served: {[e.get('id') for e in entries]}")
    return ServerInfo(base_url=base_url, model=entry["id"], owned_by=str(entry.get("owned_by", "")),
                      max_model_len=entry.get("max_model_len"), engine_config=entry.get("engine_config") or {})


async def _one(client: aiohttp.ClientSession, info: ServerInfo, request, start: float) -> RequestRecord:
    body = {"model": info.model, "prompt": list(request.prompt_token_ids), "max_tokens": request.output_len,
            "temperature": 0.0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
            "return_token_ids": True}
    sent = time.perf_counter()
    token_times: list[float] = []
    token_ids: list[int] = []
    usage_tokens = None
    async with client.post(f"{info.base_url}/v1/completions", json=body) as response:
        if response.status != 200:
            raise ServeBenchmarkError(f"request {request.request_id}: HTTP {response.status}: "
                                      f"{(await response.read())[:500]!r}")
        async for line in response.content:  # one SSE line at a time, b"data: {...}\n"
            if not line.startswith(b"data: "):
                continue
            now = time.perf_counter()
            payload = line[6:].strip()
            if payload == b"[DONE]":
                break
            chunk = json.loads(payload)
            if "error" in chunk:
                raise ServeBenchmarkError(f"request {request.request_id}: {chunk['error']}")
            if chunk.get("usage"):
                usage_tokens = chunk["usage"].get("completion_tokens")
            for choice in chunk.get("choices") or ():
                ids = choice.get("token_ids")
                if ids:
                    token_ids.extend(ids)
                    token_times.extend([now] * len(ids))
                elif ids is None and choice.get("text"):
                    token_times.append(now)
    finished = time.perf_counter()
    count = usage_tokens if usage_tokens is not None else len(token_times)
    if count != request.output_len or not token_times:
        raise ServeBenchmarkError(f"request {request.request_id}: {count} output tokens, the workload asked for "
                                  f"{request.output_len}")
    if len(token_times) != count:  # chunks without token ids: no per-token times (no ITL samples)
        first, times = token_times[0], ()
    else:
        first, times = token_times[0], tuple(t - start for t in token_times)
    return RequestRecord(request_id=request.request_id, prompt_len=request.prompt_len, arrival_time=sent - start,
                         first_scheduled_time=None, first_token_time=first - start, finish_time=finished - start,
                         token_times=times, output_token_ids=tuple(token_ids) if token_ids else (0,) * count)


async def _drive(base_url: str, workload: Workload, mode: str, model: str | None, max_concurrency: int | None,
                 timeout: float, warmup: int) -> tuple[ServerInfo, list[RequestRecord], float]:
    # aiohttp, as vLLM's serving benchmark uses: on a small machine the client shares the cores with the
    # server, and httpx's streaming path cost about 7x its CPU per chunk (cProfile, 2,600-token run).
    connector = aiohttp.TCPConnector(limit=max_concurrency or 0, keepalive_timeout=60)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)) as client:
        info = await server_info(client, base_url, model)
        for request in workload.requests[:warmup]:  # not counted: lazy paths, connection pools
            await _one(client, info, replace(request, output_len=min(request.output_len, 8)), time.perf_counter())
        semaphore = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        start = time.perf_counter()

        async def timed(request) -> RequestRecord:
            delay = 0.0 if mode == "offline" else start + request.arrival_time - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if semaphore is None:
                return await _one(client, info, request, start)
            async with semaphore:
                return await _one(client, info, request, start)

        records = await asyncio.gather(*(timed(request) for request in workload.requests))
        wall = time.perf_counter() - start
    return info, list(records), wall


def run_serve_benchmark(base_url: str, workload: Workload, settings: BenchmarkSettings, *, mode: str = "auto",
                        experiment: str | None = None, engine: str | None = None, served_model: str | None = None,
                        max_concurrency: int | None = None, timeout: float = 600.0) -> BenchmarkResult:
    """Send ``workload`` to the server at ``base_url``; ``settings.engine.model`` is the local checkpoint the
    prompts' token ids are drawn for (the one the server serves)."""
    from apexlib.model.catalog import resolve_checkpoint

    engine_args = settings.engine
    base_url = base_url.rstrip("/")
    if base_url.endswith("/v1"):
        base_url = base_url[:-3]
    model_config = ModelConfig.from_pretrained(resolve_checkpoint(engine_args.model))
    reserved = special_token_ids(model_config.path, model_config.vocab_size)
    workload = prepare_workload(workload, model_config.vocab_size, reserved, settings.token_seed)
    mode = resolve_mode(workload, mode)
    info, records, wall = asyncio.run(_drive(base_url, workload, mode, served_model, max_concurrency, timeout,
                                             min(settings.warmup_requests, len(workload))))
    if info.max_model_len is not None and workload.max_total_len > info.max_model_len:
        logger.warning("the workload reaches %d tokens, above the server's max_model_len %d",
                       workload.max_total_len, info.max_model_len)
    engine_name = engine or ("apexlib" if info.owned_by == "apexlib" else info.owned_by or "unknown")
    config = dict(info.engine_config)
    resolved = {
        "device": config.get("device", engine_args.device), "model_path": model_config.path,
        "dtype": config.get("dtype", engine_args.dtype),
        "block_size": config.get("block_size", engine_args.block_size),
        "num_gpu_blocks": config.get("num_gpu_blocks", engine_args.num_gpu_blocks),
        "num_cpu_blocks": config.get("num_cpu_blocks", engine_args.num_cpu_blocks),
        "max_num_seqs": config.get("max_num_seqs", engine_args.max_num_seqs),
        "max_num_batched_tokens": config.get("max_num_batched_tokens", engine_args.max_num_batched_tokens),
        "max_model_len": config.get("max_model_len", info.max_model_len),
        "policy": config.get("policy", engine_args.policy),
    }
    provenance = build_provenance(workload, mode, experiment, engine=f"{engine_name}-serve", engine_version=None,
                                  resolved=resolved, stats={}, environment=provenance_facts(),
                                  token_seed=settings.token_seed, warmup_requests=settings.warmup_requests,
                                  executor="http")
    return finish_result(provenance, records, wall,
                         extra={"base_url": base_url, "served_model": info.model, "settings": settings.to_dict(),
                                "max_concurrency": max_concurrency})
