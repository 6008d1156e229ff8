"""Two `apex serve` replicas of the tiny model behind vLLM's router (vllm-router), on loopback.

Completions and chats, streamed and not, go through the router; the load spreads over both replicas (their
own /metrics); killing one replica mid-run fails only the requests it had in flight, each with a clear error,
and every request sent after the kill is answered by the live one; everything stops cleanly. Needs the
optional router (``make test-scale-out``); skipped with the reason otherwise.
"""

from __future__ import annotations

import asyncio
import json
import re
import time

import pytest

from apexlib.serve.replicas import ReplicaSet, ReplicaSetConfig, find_router

try:
    ROUTER = find_router()
except FileNotFoundError as missing:
    pytest.skip(f"{missing} (optional: make test-scale-out)", allow_module_level=True)

httpx = pytest.importorskip("httpx")

MAX_TOKENS = 1000  # long enough that each replica's requests are still running at the kill


@pytest.fixture(scope="module")
def replica_set(tiny_path, tmp_path_factory):
    serve_args = ("--model", str(tiny_path()), "--device", "cpu", "--dtype", "float32", "--served-model-name", "tiny",
                  "--max-model-len", "1024", "--num-gpu-blocks", "1024", "--block-size", "8", "--log-level", "error")
    config = ReplicaSetConfig(replicas=2, port=0, serve_args=serve_args, health_check_interval_s=1,
                              health_failure_threshold=1, startup_timeout_s=180)
    replicas = ReplicaSet(config, log_dir=tmp_path_factory.mktemp("replicas")).start()
    yield replicas
    replicas.stop()


def metric(url: str, name: str, labels: str = "") -> float:
    """One sample of a replica's /metrics (0 when absent)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    match = re.search(rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def completions_served(url: str) -> float:
    return metric(url, "apex_http_responses_total", '{endpoint="/v1/completions",status="200"}')


async def complete(client, url: str, i: int, stream: bool, max_tokens: int = MAX_TOKENS,
                   started: asyncio.Event | None = None) -> dict:
    """One completion: its status, the tokens it got, its finish reason, and its error (if any); ``started`` is
    set when its first event arrives (a stream) or when it is sent."""
    body = {"model": "tiny", "prompt": f"request {i}", "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": stream, "return_token_ids": True}
    out = {"i": i, "status": None, "tokens": 0, "finish_reason": None, "done": False, "error": None}
    try:
        if not stream:
            if started is not None:
                started.set()
            response = await client.post(f"{url}/v1/completions", json=body)
            out["status"] = response.status_code
            if response.status_code == 200:
                choice = response.json()["choices"][0]
                out.update(tokens=len(choice["token_ids"]), finish_reason=choice["finish_reason"], done=True)
            else:
                out["error"] = response.text
            return out
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            out["status"] = response.status_code
            async for line in response.aiter_lines():
                if line == "data: [DONE]":
                    out["done"] = True
                elif line.startswith("data: "):
                    if started is not None:
                        started.set()
                    event = json.loads(line[6:])
                    if "error" in event:
                        out["error"] = event["error"]
                        continue
                    choice = event["choices"][0]
                    out["tokens"] += len(choice.get("token_ids") or [])
                    out["finish_reason"] = choice.get("finish_reason") or out["finish_reason"]
    except httpx.HTTPError as error:
        out["error"] = f"{type(error).__name__}: {error}"
    return out


def test_completions_and_chats_stream_through_the_router(replica_set):
    url = replica_set.router_url
    plain = httpx.post(f"{url}/v1/completions", timeout=60,
                       json={"model": "tiny", "prompt": "hello", "max_tokens": 8, "temperature": 0})
    assert plain.status_code == 200, plain.text
    assert plain.json()["choices"][0]["finish_reason"] == "length" and plain.json()["usage"]["completion_tokens"] == 8
    chat = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                      json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6})
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["message"]["role"] == "assistant"
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=60,
                      json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6,
                            "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and len(lines) >= 3  # role, content, finish, [DONE]: streamed as events
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"
    streamed = asyncio.run(_one_stream(url))
    assert streamed["done"] and streamed["tokens"] == 12 and streamed["finish_reason"] == "length"


async def _one_stream(url):
    async with httpx.AsyncClient(timeout=60) as client:
        return await complete(client, url, 0, True, max_tokens=12)


def test_load_spreads_over_both_replicas(replica_set):
    before = [completions_served(url) for url in replica_set.replica_urls]

    async def run():
        async with httpx.AsyncClient(timeout=60) as client:
            return [await complete(client, replica_set.router_url, i, stream=False, max_tokens=4) for i in range(8)]

    answers = asyncio.run(run())
    assert all(a["status"] == 200 and a["tokens"] == 4 for a in answers), answers
    served = [completions_served(url) - b for url, b in zip(replica_set.replica_urls, before, strict=True)]
    assert sum(served) == 8 and min(served) >= 2, served  # round robin: 4 and 4, give or take a retry


def test_a_replica_dies_mid_run(replica_set):
    live, doomed = replica_set.replica_urls

    async def run():
        async with httpx.AsyncClient(timeout=120) as client:
            # one after the other, each started before the next: round robin gives each replica 2 streams and
            # one non-streamed request, whatever its turn was
            in_flight = []
            for i, stream in enumerate((True, True, True, True, False, False)):
                started = asyncio.Event()
                in_flight.append(asyncio.create_task(complete(client, replica_set.router_url, i, stream,
                                                              started=started)))
                await asyncio.wait_for(started.wait(), 60)
                if not stream:
                    await asyncio.sleep(0.2)  # it reached the router before the next one
            deadline = time.monotonic() + 30
            while await asyncio.to_thread(metric, doomed, "apex_requests_running") < 3:  # 2 streams, 1 plain
                assert time.monotonic() < deadline, in_flight
                await asyncio.sleep(0.02)
            replica_set.kill_replica(1)
            # sent after the kill, before the router's next health check: none may be lost
            after = [asyncio.create_task(complete(client, replica_set.router_url, 100 + i, stream=i % 2 == 0,
                                                  max_tokens=16)) for i in range(6)]
            return await asyncio.gather(*in_flight), await asyncio.gather(*after)

    in_flight, after = asyncio.run(run())
    full = [a for a in in_flight if a["done"] and a["tokens"] == MAX_TOKENS and a["finish_reason"] == "length"]
    cut = [a for a in in_flight if a not in full]
    # the dead replica's two streams are cut: the client's stream ends with a transport error, no [DONE]
    assert len(cut) == 2, in_flight
    for answer in cut:
        assert answer["i"] < 4 and answer["status"] == 200 and not answer["done"], answer
        assert 0 < answer["tokens"] < MAX_TOKENS and "incomplete chunked read" in answer["error"], answer
    # its non-streamed request is re-sent by the router to the live replica and completes there
    assert {a["i"] for a in full} >= {4, 5}
    assert all(a["status"] == 200 and a["done"] and a["tokens"] == 16 for a in after), after

    time.sleep(3)  # the router's health check has seen the dead replica: later requests go to the live one
    before = completions_served(live)
    later = httpx.post(f"{replica_set.router_url}/v1/completions", timeout=60,
                       json={"model": "tiny", "prompt": "later", "max_tokens": 4})
    assert later.status_code == 200 and completions_served(live) == before + 1

    codes = replica_set.stop()
    assert codes["replica0"] == 0 and codes["router"] in (0, -15), codes  # drained; the router ends on SIGTERM
    assert codes["replica1"] == -9
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{replica_set.router_url}/health", timeout=5)
