"""`apex serve` through real HTTP on loopback: the official `openai` client, bad input, stop strings,
disconnects, overload, /metrics. (Faults, SIGTERM and the soak: tests/test_serve_reliability.py.)"""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from serve_utils import LiveServer

from apexlib.serve.detok import IncrementalDetokenizer, StopStringMatcher

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module", params=["engine-thread", "engine-process"])
def server(tiny_path, request):
    """The server with its engine in a thread of its own process, and in a process of its own."""
    live = LiveServer(tiny_path("gqa"), engine_process=request.param == "engine-process")
    yield live
    live.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_openai_client_completions_streamed_and_not(server, client):
    full = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=12, temperature=0)
    choice = full.choices[0]
    assert choice.finish_reason == "length" and choice.text
    assert full.usage.completion_tokens == 12 and full.usage.prompt_tokens > 0
    assert full.usage.total_tokens == full.usage.prompt_tokens + 12
    chunks = list(client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text  # same greedy text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12 and not chunks[-1].choices
    # the engine's own answer for the same prompt (LLM.generate's path) is the same text
    engine = server.engine
    ids = engine.tokenizer("Once upon a time")["input_ids"]
    token_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=12, temperature=0)
    assert token_ids.choices[0].text == choice.text
    # several prompts in one request: one choice each, in order
    both = client.completions.create(model="tiny", prompt=["Once upon a time", "The cat"], max_tokens=4,
                                     temperature=0)
    assert [c.index for c in both.choices] == [0, 1] and both.usage.completion_tokens == 8
    server.wait_idle()


def test_openai_client_chat_streamed_and_not(server, client):
    messages = [{"role": "system", "content": "You tell stories."}, {"role": "user", "content": "A story, please"}]
    full = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0, seed=3)
    assert full.choices[0].message.role == "assistant" and full.choices[0].message.content
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 10
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                            stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"
    # sampling with a seed is reproducible through the API
    a, b = (client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0.8,
                                           top_p=0.9, seed=7, extra_body={"top_k": 20}).choices[0].message.content for _ in range(2))
    assert a == b
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    server.wait_idle()


BAD = [
    ("/v1/completions", {"model": "nope", "prompt": "x"}, "model", "not served"),
    ("/v1/completions", {"prompt": ""}, "prompt", "empty"),
    ("/v1/completions", {"prompt": []}, "prompt", "empty"),
    ("/v1/completions", {}, "prompt", "required"),
    ("/v1/completions", {"prompt": list(range(5, 300))}, "prompt", "max_model_len is 256"),
    ("/v1/completions", {"prompt": [1, 2, 100000]}, "prompt", "outside the vocabulary"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens", ">= 1"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 255}, "max_tokens", "exceed max_model_len = 256"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "5"}, "max_tokens", "must be an integer"),
    ("/v1/completions", {"prompt": "x", "temperature": -0.5}, "temperature", ">= 0"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, "temperature", "must be a number"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, "top_p", "(0, 1]"),
    ("/v1/completions", {"prompt": "x", "top_p": 1.5}, "top_p", "(0, 1]"),
    ("/v1/completions", {"prompt": "x", "top_k": -3}, "top_k", ">= -1"),
    ("/v1/completions", {"prompt": "x", "n": 2}, "n", "must be 1"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, "stream", "must be a boolean"),
    ("/v1/completions", {"prompt": "x", "stop": 5}, "stop", "string or an array of strings"),
    ("/v1/completions", {"prompt": "x", "stop_token_ids": [9999]}, "stop_token_ids", "outside the vocabulary"),
    ("/v1/completions", {"prompt": "x", "seed": -1}, "seed", ">= 0"),
    ("/v1/completions", {"prompt": "x", "logprobs": 3}, "logprobs", "not supported"),
    ("/v1/completions", {"prompt": 3.5}, "prompt", "must be a string"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options", "stream"),
    ("/v1/chat/completions", {"messages": []}, "messages", "non-empty array"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "string"),
    ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, "messages[0].role", "non-empty string"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": -2}, "max_tokens",
     ">= 1"),
]


def test_bad_input_gets_400_naming_field_and_limit(server):
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for endpoint, body, param, fragment in BAD:
            response = http.post(endpoint, json=body)
            assert response.status_code == 400, (body, response.text)
            error = response.json()["error"]
            assert error["param"] == param and fragment in error["message"], (body, error)
            assert error["type"] == "invalid_request_error"
        for raw in (b"{not json", b"[1, 2]", b""):
            response = http.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
            assert response.status_code == 400 and response.json()["error"]["param"] == "body", raw
        # the server keeps serving, and nothing was queued by the bad requests
        assert http.post("/v1/completions", json={"prompt": "ok", "max_tokens": 2}).status_code == 200
    server.wait_idle()


def test_request_that_never_fits_the_kv_budget_gets_400(tiny_path):
    # The engine refuses a KV budget smaller than one max_model_len request, so max_model_len is the bound
    # that keeps every accepted request runnable: 6 blocks x 8 tokens = 48 tokens.
    live = LiveServer(tiny_path("gqa"), num_gpu_blocks=6, max_model_len=48)
    try:
        with httpx.Client(base_url=live.url, timeout=30) as http:
            response = http.post("/v1/completions", json={"prompt": list(range(5, 35)), "max_tokens": 30})
            assert response.status_code == 400
            error = response.json()["error"]
            assert error["param"] == "max_tokens" and "at most 18" in error["message"]
            ok = http.post("/v1/completions", json={"prompt": list(range(5, 35)), "max_tokens": 18,
                                                    "ignore_eos": True})
            assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 18
        live.wait_idle()
    finally:
        live.close()


def test_stop_strings_never_leak(server):
    with httpx.Client(base_url=server.url, timeout=60) as http:
        body = {"prompt": "Once upon a time", "max_tokens": 40, "temperature": 0, "ignore_eos": True}
        text = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
        stop = text[len(text) // 2: len(text) // 2 + 3]
        assert len(stop) == 3
        expected = text[:text.find(stop)]
        stopped = http.post("/v1/completions", json={**body, "stop": [stop, "\x00never"]}).json()
        assert stopped["choices"][0]["text"] == expected and stopped["choices"][0]["finish_reason"] == "stop"
        assert stopped["usage"]["completion_tokens"] < 40
        streamed = []
        with http.stream("POST", "/v1/completions", json={**body, "stop": stop, "stream": True}) as response:
            for line in response.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    streamed.append(json.loads(line[len("data: "):])["choices"][0])
        assert "".join(c["text"] for c in streamed) == expected
        assert all(stop not in c["text"] for c in streamed) and streamed[-1]["finish_reason"] == "stop"
    server.wait_idle()  # the stopped requests were aborted in the engine: their blocks are back


def test_incremental_detokenizer_never_splits_characters(server):
    tokenizer = server.engine.tokenizer
    text = "Grüße aus Köln – naïve café ✓ 日本語 🙂 end"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text.encode()) // 4  # byte-level pieces: multi-byte characters span tokens
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.push([token]) for token in ids]
    deltas.append(detok.flush())
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tokenizer.decode(ids) == text
    assert sum(1 for d in deltas if d == "") > 0  # some tokens were held back (an incomplete character)


def test_stop_string_matcher_holds_back_prefixes():
    matcher = StopStringMatcher(["STOP", "xyz"])
    out = [matcher.push(piece) for piece in ["abc S", "T", "x", "O", "Pq"]]
    assert out == [("abc ", False), ("", False), ("ST", False), ("xO", False), ("Pq", False)]
    matcher = StopStringMatcher(["STOP", "xyz"])
    assert [matcher.push(piece) for piece in ["ab", "cx", "y", "z!"]] == [("ab", False), ("c", False), ("", False),
                                                                         ("", True)]
    matcher = StopStringMatcher(["STOP"])
    assert matcher.push("ab ST") == ("ab ", False)
    assert matcher.push("OP tail") == ("", True)
    assert matcher.flush() == ""
    matcher = StopStringMatcher(["STOP"])
    assert matcher.push("ab ST") == ("ab ", False)
    assert matcher.flush() == "ST"  # the request ended without the stop string: the tail is output


async def _disconnecting_clients(url: str, count: int) -> int:
    """``count`` clients that start long requests and go away: half streamed (closed after 2 chunks), half
    non-streamed (the client times out). Returns how many streams delivered a chunk before leaving."""
    body = {"prompt": "Once upon a time", "max_tokens": 200, "ignore_eos": True, "temperature": 0.7}
    started = 0

    async def streamed(http: httpx.AsyncClient) -> None:
        nonlocal started
        async with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
            assert response.status_code == 200
            seen = 0
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    seen += 1
                    if seen == 2:
                        started += 1
                        return  # leaves the stream open -> the context manager closes the connection

    async def waiting(http: httpx.AsyncClient) -> None:
        with pytest.raises(httpx.ReadTimeout):
            await http.post("/v1/completions", json=body, timeout=0.3)

    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        await asyncio.gather(*(streamed(http) if i % 2 else waiting(http) for i in range(count)))
    return started


def test_client_disconnects_abort_and_free_blocks(server):
    started = asyncio.run(_disconnecting_clients(server.url, 24))
    assert started == 12
    server.wait_idle(timeout=30)  # every aborted request's KV blocks are back
    snap = server.loop.snapshot
    assert snap.engine_stats["gpu_decode_tokens"] < 24 * 200  # they were aborted, not run to the end
    with httpx.Client(base_url=server.url, timeout=30) as http:  # and the server keeps serving
        assert http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3}).status_code == 200


def test_overload_gets_503_with_retry_after(tiny_path):
    live = LiveServer(tiny_path("gqa"), serve={"max_waiting": 2, "retry_after": 2}, max_num_seqs=1)
    body = {"prompt": "Once upon a time", "max_tokens": 30, "ignore_eos": True}

    async def burst():
        async with httpx.AsyncClient(base_url=live.url, timeout=120) as http:
            return await asyncio.gather(*(http.post("/v1/completions", json=body) for _ in range(12)))

    try:
        responses = asyncio.run(burst())
        codes = sorted(r.status_code for r in responses)
        # a burst arrives before the engine runs any of it: --max-waiting of them are accepted (more when the
        # engine's snapshot already shows some running)
        assert set(codes) == {200, 503} and codes.count(200) >= 2, codes
        for response in responses:
            if response.status_code == 503:
                assert response.headers["retry-after"] == "2"
                assert "max-waiting" in response.json()["error"]["message"]
            else:
                assert response.json()["usage"]["completion_tokens"] == 30
        live.wait_idle()
    finally:
        live.close()


def test_health_and_metrics(server):
    with httpx.Client(base_url=server.url, timeout=30) as http:
        assert http.get("/health").json() == {"status": "ok"}
        http.post("/v1/completions", json={"prompt": "Once", "max_tokens": 5, "ignore_eos": True})
        text = http.get("/metrics").text
    for name in ("apex_engine_up 1.0", "apex_requests_running", "apex_requests_waiting", "apex_requests_cpu_resident",
                 'apex_kv_usage_ratio{tier="gpu"}', 'apex_kv_free_blocks{tier="cpu"}', "apex_preemptions_total",
                 "apex_swapped_out_blocks_total", "apex_iteration_mode_total",
                 "apex_time_to_first_token_seconds_bucket", "apex_time_per_output_token_seconds_bucket",
                 "apex_inter_token_latency_seconds_bucket", 'apex_http_responses_total{endpoint="/v1/completions"'):
        assert name in text, name
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values["apex_time_to_first_token_seconds_count"] >= 1
    assert values["apex_inter_token_latency_seconds_count"] >= 4
    assert values['apex_kv_free_blocks{tier="gpu"}'] == values['apex_kv_total_blocks{tier="gpu"}'] == 96


def test_apex_serve_reports_bad_arguments(tmp_path, capsys):
    from apexlib.cli import main

    assert main(["serve", "--model", str(tmp_path / "missing"), "--port", "0"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_bench_serve_measures_through_http(server, tmp_path):
    from apexlib.bench.benchmark import load_workload
    from apexlib.bench.serve_client import run_serve_benchmark
    from apexlib.core.results import write_results
    from apexlib.engine.settings import BenchmarkSettings

    workload = load_workload("tiny-smoke", num_requests=6, rate=20.0, seed=1)
    settings = BenchmarkSettings.create(model=server.engine.config.model.path, warmup_requests=1)
    result = run_serve_benchmark(f"{server.url}/v1", workload, settings, experiment="serve-test")
    assert result.provenance["executor"] == "http" and result.provenance["engine"] == "apexlib-serve"
    assert result.provenance["num_gpu_blocks"] == 96 and result.provenance["arrival"] == "poisson"
    summary = result.summary
    assert summary.completed == 6 and summary.ttft.count == 6 and summary.itl.count > 0
    assert 0 < summary.ttft.median <= summary.e2e_latency.median
    for record, request in zip(result.records, workload.requests, strict=True):
        assert len(record.output_token_ids) == request.output_len == len(record.token_times)
    directory = write_results([result], tmp_path, "serve-test")
    assert (directory / "rows.csv").is_file()
    server.wait_idle()


def test_return_token_ids_matches_text(server):
    with httpx.Client(base_url=server.url, timeout=60) as http:
        body = {"prompt": "Once upon a time", "max_tokens": 10, "temperature": 0, "return_token_ids": True}
        full = http.post("/v1/completions", json=body).json()["choices"][0]
        ids = []
        with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    ids.extend(json.loads(line[6:])["choices"][0]["token_ids"])
    assert ids == full["token_ids"] and len(ids) == 10
    assert server.engine.tokenizer.decode(ids, skip_special_tokens=True) == full["text"]


def test_a_lagging_stream_gets_the_waiting_tokens_in_one_chunk(tiny_path):
    """Deltas already queued for a request are merged into one event (one SSE chunk), each still passing
    through the detokenizer and the stop strings in order; the text equals the one-by-one text."""
    import asyncio

    from transformers import AutoTokenizer

    from apexlib.serve.app import OpenAIServer, _Choice
    from apexlib.serve.detok import IncrementalDetokenizer, StopStringMatcher
    from apexlib.serve.loop import Delta

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_path("gqa")))
    ids = tokenizer("Once upon a time there was a tiny model")["input_ids"][1:9]

    def choice():
        return _Choice(index=0, request_id="r", num_prompt_tokens=1, detok=IncrementalDetokenizer(tokenizer),
                       stop=StopStringMatcher(()))

    async def run(queued_at_once: bool):
        server = OpenAIServer.__new__(OpenAIServer)  # events() needs no engine loop for these deltas
        output: asyncio.Queue = asyncio.Queue()
        deltas = [Delta(token_ids=(t,)) for t in ids[:-1]] + [Delta(token_ids=(ids[-1],), finished=True,
                                                                     finish_reason="length")]
        one = choice()
        events = []
        if queued_at_once:
            for delta in deltas:
                output.put_nowait((0, delta))
            async for event in server.events([one], output):
                events.append(event)
        else:
            async def feed():
                for delta in deltas:
                    await output.put((0, delta))
                    await asyncio.sleep(0)
            feeder = asyncio.ensure_future(feed())
            async for event in server.events([one], output):
                events.append(event)
                await asyncio.sleep(0)
            await feeder
        return events, one

    merged, merged_choice = asyncio.run(run(True))
    single, single_choice = asyncio.run(run(False))
    assert len(merged) == 1 and merged[0][2] == tuple(ids)
    assert len(single) > 1
    assert merged_choice.text == single_choice.text == "".join(text for _, text, _ in single)
    assert merged_choice.finish_reason == single_choice.finish_reason == "length"
