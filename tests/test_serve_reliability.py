"""`apex serve` under faults, shutdown and load: a fault in the CPU-attention worker fails only the requests
it touched (500 naming it) while the server keeps serving; SIGTERM drains and exits 0; a soak at mixed
concurrency loses nothing, returns every KV block and keeps RSS bounded."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from serve_utils import (
    ATTENTION_BROKEN,
    ATTENTION_FAIL_ONCE,
    ATTENTION_OK,
    LiveServer,
    install_attention_fault,
)

from apexlib.attention import cpu as cpu_attention

pytestmark = pytest.mark.timeout(600)


@pytest.mark.parametrize("engine_process", [False, True], ids=["engine-thread", "engine-process"])
def test_cpu_worker_fault_fails_touched_requests_with_500_and_server_keeps_serving(tiny_path, monkeypatch,
                                                                                  engine_process):
    # The fault is installed where the engine runs (the child process, or here) and switched from the test
    # through a shared integer: healthy, one transient fault, or broken until switched back.
    monkeypatch.setattr(cpu_attention, "paged_decode_attention", cpu_attention.paged_decode_attention)  # restored
    fault = multiprocessing.get_context("spawn").Value("i", ATTENTION_OK)
    live = LiveServer(tiny_path("gqa"), policy="hybrid", policy_options={"cpu_placement": "cpu"}, num_cpu_blocks=96,
                      engine_process=engine_process,
                      serve={"engine_initializer": install_attention_fault, "engine_initargs": (fault,)})
    step_threads = set()
    if not engine_process:
        engine_step = live.engine.step

        def recording_step():
            step_threads.add(threading.get_ident())
            return engine_step()

        monkeypatch.setattr(live.engine, "step", recording_step)
    body = {"prompt": "Once upon a time", "max_tokens": 12, "ignore_eos": True}
    try:
        with httpx.Client(base_url=live.url, timeout=60) as http:
            healthy = http.post("/v1/completions", json=body)
            assert healthy.status_code == 200 and healthy.json()["usage"]["completion_tokens"] == 12
            live.wait_idle()
            assert live.loop.snapshot.engine_stats["cpu_decode_tokens"] >= 11  # it did decode on the CPU worker
            fault.value = ATTENTION_FAIL_ONCE  # a transient fault costs one retried iteration, not the request
            retried = http.post("/v1/completions", json=body)
            assert retried.status_code == 200 and retried.json()["usage"]["completion_tokens"] == 12
            live.wait_idle()
            assert fault.value == ATTENTION_OK and live.loop.snapshot.iteration_errors == 1
            fault.value = ATTENTION_BROKEN
            failed = http.post("/v1/completions", json=body)
            assert failed.status_code == 500
            error = failed.json()["error"]
            assert "CPU-attention worker" in error["message"] and "injected fault" in error["message"], error
            with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
                events = [line for line in response.iter_lines() if line.startswith("data: ")]
            assert events[-1] == "data: [DONE]"
            assert "CPU-attention worker" in json.loads(events[-2][len("data: "):])["error"]["message"]
            live.wait_idle()  # the failed requests' blocks are back
            fault.value = ATTENTION_OK
            after = http.post("/v1/completions", json=body)
            assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 12
            assert http.get("/health").status_code == 200
            metrics = http.get("/metrics").text
        if not engine_process:
            assert step_threads == {live.loop._thread.ident}  # only the loop thread ever stepped the engine
        assert re.search(r"^apex_request_errors_total [1-9]", metrics, re.M)
        assert re.search(r"^apex_iteration_errors_total [1-9]", metrics, re.M)
        live.wait_idle()
    finally:
        live.close()


def _read_url(process: subprocess.Popen, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    lines = []
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            if process.poll() is not None:
                break
            continue
        lines.append(line)
        match = re.search(r"on (http://\S+) ", line)
        if match:
            return match.group(1)
    process.kill()
    raise AssertionError(f"apex serve did not start: {''.join(lines)}")


@pytest.mark.parametrize("engine_thread", [pytest.param(False, id="engine-process"),
                                           pytest.param(True, id="engine-thread", marks=pytest.mark.slow)])
def test_sigterm_drains_in_flight_requests_and_exits_0(tiny_path, engine_thread):
    """The default (engine process) in make test, the engine thread in make test-all."""
    command = [sys.executable, "-m", "apexlib.cli", "serve", "--model", str(tiny_path("gqa")), "--port", "0",
               "--device", "cpu", "--dtype", "float32", "--max-model-len", "256", "--drain-timeout", "60",
               "--served-model-name", "tiny", *(["--engine-thread"] if engine_thread else [])]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        url = _read_url(process, timeout=120)
        results: dict[int, tuple[str, int]] = {}
        first_chunk = threading.Barrier(5)

        def client(index: int) -> None:
            body = {"prompt": "Once upon a time", "max_tokens": 80, "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}}
            usage, finish, arrived = 0, None, False
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
                for line in response.iter_lines():
                    if not arrived and line.startswith("data: "):
                        arrived = True
                        first_chunk.wait(60)
                    if line.startswith("data: {"):
                        chunk = json.loads(line[len("data: "):])
                        if chunk["choices"] and chunk["choices"][0]["finish_reason"]:
                            finish = chunk["choices"][0]["finish_reason"]
                        if chunk.get("usage"):
                            usage = chunk["usage"]["completion_tokens"]
            results[index] = (finish, usage)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        first_chunk.wait(60)  # every request is streaming
        process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        for thread in threads:
            thread.join(90)
        assert process.wait(60) == 0
        assert time.monotonic() - started < 60
        assert results == {i: ("length", 80) for i in range(4)}  # drained: every in-flight request completed
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health", timeout=5)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()


def _rss_bytes(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _server_rss(live: LiveServer) -> int:
    """This process (server and client), plus the engine process when the engine runs in one."""
    return _rss_bytes() + (_rss_bytes(live.loop._process.pid) if live.engine_process else 0)


async def _soak(url: str, num_requests: int, seed: int) -> dict[str, int]:
    """Phases of rising concurrency; each client sends a random mix of completions/chat, streamed or not,
    with stop strings, or leaves early. Returns counts by outcome (anything unexpected is 'errors')."""
    rng = random.Random(seed)
    counts = {"completed": 0, "rejected": 0, "client_left": 0, "errors": 0}
    problems: list[str] = []
    phases = [1, 4, 16, 48]
    per_phase = [num_requests // len(phases)] * len(phases)
    per_phase[-1] += num_requests - sum(per_phase)

    async def one(http: httpx.AsyncClient, index: int) -> None:
        kind = rng.random()
        max_tokens = rng.choice([1, 4, 8, 16, 24])
        stream = rng.random() < 0.5
        chat = rng.random() < 0.3
        body: dict = {"max_tokens": max_tokens, "ignore_eos": True, "temperature": rng.choice([0, 0.7]),
                      "seed": index, "stream": stream}
        if chat:
            path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": f"story {index}"}]
        else:
            path, body["prompt"] = "/v1/completions", rng.choice(["Once upon a time", "The cat sat",
                                                                 list(range(5, 5 + rng.randrange(1, 120)))])
        if kind < 0.1:
            body["stop"] = ["e", "the"]
        leave_early = 0.1 <= kind < 0.2 and max_tokens >= 8
        try:
            if stream:
                async with http.stream("POST", path, json=body) as response:
                    if response.status_code == 503:
                        counts["rejected"] += 1
                        return
                    if response.status_code != 200:
                        raise AssertionError(f"{response.status_code} {await response.aread()}")
                    finish, lines = None, 0
                    async for line in response.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        lines += 1
                        if leave_early and lines == 2:
                            counts["client_left"] += 1
                            return
                        if line == "data: [DONE]":
                            break
                        chunk = json.loads(line[len("data: "):])
                        if "error" in chunk:
                            raise AssertionError(chunk)
                        if chunk["choices"] and chunk["choices"][0]["finish_reason"]:
                            finish = chunk["choices"][0]["finish_reason"]
                    assert finish in ("length", "stop"), finish
            else:
                response = await http.post(path, json=body, timeout=httpx.Timeout(120, read=0.1) if leave_early else 120)
                if response.status_code == 503:
                    assert response.headers.get("retry-after")
                    counts["rejected"] += 1
                    return
                assert response.status_code == 200, response.text
                answer = response.json()
                assert answer["choices"][0]["finish_reason"] in ("length", "stop")
                if answer["choices"][0]["finish_reason"] == "length":
                    assert answer["usage"]["completion_tokens"] == max_tokens
            counts["completed"] += 1
        except httpx.ReadTimeout:
            if leave_early and not stream:
                counts["client_left"] += 1
                return
            counts["errors"] += 1
            problems.append(f"request {index}: timeout")
        except Exception as error:  # noqa: BLE001 - every other outcome is counted as an error
            counts["errors"] += 1
            problems.append(f"request {index}: {type(error).__name__}: {error}")

    index = 0
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        for concurrency, count in zip(phases, per_phase, strict=True):
            pending = list(range(index, index + count))
            index += count

            async def worker(queue: list[int]) -> None:
                while queue:
                    await one(http, queue.pop())

            await asyncio.gather(*(worker(pending) for _ in range(concurrency)))
    counts["problems"] = problems[:5]
    return counts


def _run_soak(tiny_path, num_requests: int, rss_bound_mib: float, engine_process: bool = False) -> None:
    live = LiveServer(tiny_path("gqa"), serve={"max_waiting": 24}, engine_process=engine_process, max_num_seqs=16,
                      num_gpu_blocks=64)
    try:
        asyncio.run(_soak(live.url, 40, seed=1))  # warm-up: allocator pools, lazy imports, code paths
        live.wait_idle()
        rss_start = _server_rss(live)
        started = time.monotonic()
        counts = asyncio.run(_soak(live.url, num_requests, seed=2))
        seconds = time.monotonic() - started
        live.wait_idle(timeout=60)
        rss_end = _server_rss(live)
        snap = live.loop.snapshot
        accounted = counts["completed"] + counts["rejected"] + counts["client_left"] + counts["errors"]
        summary = (f"soak ({'engine process' if engine_process else 'engine thread'}): {num_requests} requests in {seconds:.1f} s: {counts['completed']} completed, "
                   f"{counts['rejected']} rejected (503), {counts['client_left']} left early, {counts['errors']} "
                   f"errors, {num_requests - accounted} lost; RSS {rss_start / 2**20:.0f} -> {rss_end / 2**20:.0f} "
                   f"MiB; KV free at end {snap.free_blocks} of {snap.total_blocks}; preemptions "
                   f"{snap.engine_stats['preemptions']}")
        print(summary)
        assert counts["errors"] == 0, counts["problems"]
        assert accounted == num_requests  # nothing lost
        assert counts["completed"] > num_requests // 2
        assert snap.free_blocks == snap.total_blocks  # wait_idle checked the engine's pools too
        assert (rss_end - rss_start) / 2**20 < rss_bound_mib, summary
    finally:
        live.close()


#: RSS growth bound of the soak (the test process: server, engine and client together; with the engine in a
#: process of its own, both processes together).
SOAK_RSS_BOUND_MIB = 64


@pytest.mark.parametrize("engine_process", [pytest.param(False, id="engine-thread", marks=pytest.mark.slow),
                                            pytest.param(True, id="engine-process")])
def test_soak_mixed_concurrency(tiny_path, engine_process):
    """300 requests; the default (engine process) in make test, the engine thread in make test-all."""
    _run_soak(tiny_path, 300, SOAK_RSS_BOUND_MIB, engine_process)


@pytest.mark.slow
@pytest.mark.parametrize("engine_process", [False, True], ids=["engine-thread", "engine-process"])
def test_soak_mixed_concurrency_long(tiny_path, engine_process):
    _run_soak(tiny_path, 3000, SOAK_RSS_BOUND_MIB, engine_process)


def test_engine_process_death_fails_in_flight_requests_and_later_ones_get_503(tiny_path):
    live = LiveServer(tiny_path("gqa"), engine_process=True)
    body = {"prompt": "Once upon a time", "max_tokens": 200, "ignore_eos": True, "stream": True}
    try:
        with httpx.Client(base_url=live.url, timeout=60) as http:
            assert http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3}).status_code == 200
            engine_pid = live.loop._process.pid
            assert engine_pid != os.getpid()  # the engine is stepped in a process of its own
            with http.stream("POST", "/v1/completions", json=body) as response:
                lines = (line for line in response.iter_lines() if line.startswith("data: "))
                assert json.loads(next(lines)[6:])["choices"]  # it is streaming
                os.kill(engine_pid, signal.SIGKILL)
                rest = list(lines)
            assert rest[-1] == "data: [DONE]"
            error = json.loads(rest[-2][6:])["error"]
            assert error["code"] == 500 and error["type"] == "internal_error"
            assert "engine process exited" in error["message"] and "killed by SIGKILL" in error["message"], error
            health = http.get("/health")
            assert health.status_code == 503 and "engine process exited" in health.json()["error"]
            later = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3})
            assert later.status_code == 503 and later.headers["retry-after"]
            assert "killed by SIGKILL" in later.json()["error"]["message"]
            # /metrics says the engine is down instead of repeating its last state
            metrics = http.get("/metrics").text
            assert "apex_engine_up 0.0" in metrics, metrics
            assert "apex_requests_running" not in metrics and "apex_kv_free_blocks" not in metrics
    finally:
        live.close()
