"""`apex serve` exposed to hostile or careless clients, through real HTTP on loopback: bounded bodies, a server
that stays responsive while a large request is handled, read deadlines, the API key, the content type, CORS,
and errors that tell the truth (400 for what can never succeed, clipped echoes, no 500 for bad text).

Latency bounds here are loose on purpose (a loaded 2-core machine), and each is far below what the failure
they guard against costs (seconds of a blocked event loop, connections held forever)."""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import os
import re
import socket
import threading
import time

import httpx
import openai
import pytest
from serve_utils import LiveServer

pytestmark = pytest.mark.timeout(300)

MIB = 2**20


@pytest.fixture(scope="module")
def server(tiny_path):
    live = LiveServer(tiny_path("gqa"))
    yield live
    live.close()


def _metric(url: str, name: str, headers: dict | None = None) -> float:
    """A sample of /metrics (0 when absent), ``name`` as written there, labels included."""
    text = httpx.get(f"{url}/metrics", headers=headers or {}, timeout=30).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _Probe:
    """Polls ``/health`` from a thread until stopped; keeps every answer's latency."""

    def __init__(self, url: str) -> None:
        self.url, self.latencies, self.codes = url, [], []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as http:
            while not self._stop.is_set():
                started = time.monotonic()
                self.codes.append(http.get("/health").status_code)
                self.latencies.append(time.monotonic() - started)
                time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(90)


# -- bounded requests ------------------------------------------------------------------------------------
@pytest.mark.parametrize("max_request_bytes", [None, 16 * MIB], ids=["default-limit", "16MiB-limit"])
def test_health_answers_within_half_a_second_during_a_10mb_request(tiny_path, max_request_bytes):
    """With the default limit the body is refused (413); with a limit above it, the prompt is refused by its
    length in characters before any tokenization (400). Either way at once, and /health keeps answering."""
    serve = {} if max_request_bytes is None else {"max_request_bytes": max_request_bytes}
    live = LiveServer(tiny_path("gqa"), serve=serve)
    body = b'{"prompt": "' + b"story " * (10 * MIB // 6) + b'", "max_tokens": 4}'
    try:
        with httpx.Client(base_url=live.url, timeout=60) as http:
            assert http.get("/health").status_code == 200  # warm
            probe = _Probe(live.url)
            time.sleep(0.2)
            started = time.monotonic()
            response = http.post("/v1/completions", content=body, headers={"content-type": "application/json"})
            elapsed = time.monotonic() - started
            time.sleep(0.2)
            probe.stop()
        assert probe.codes and set(probe.codes) == {200}
        assert max(probe.latencies) < 0.5, sorted(probe.latencies)[-5:]
        if max_request_bytes is None:
            assert response.status_code == 413, response.text
            assert "--max-request-bytes" in response.json()["error"]["message"]
        else:
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert error["param"] == "prompt" and "characters" in error["message"], error
            assert len(response.content) < 1000  # the 10 MB are not echoed
        assert elapsed < 10, elapsed
    finally:
        live.close()


def test_a_50mb_body_is_refused_with_413_and_memory_stays_flat(server):
    chunk = b"story " * (MIB // 6)  # one MB of a prompt, sent 50 times

    def body():
        yield b'{"max_tokens": 2, "prompt": "'
        for _ in range(50):
            yield chunk
        yield b'"}'

    peak, stop = [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.01)

    with httpx.Client(base_url=server.url, timeout=30) as http:
        assert http.post("/v1/completions", json={"prompt": "warm", "max_tokens": 1}).status_code == 200
        baseline = _rss()
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            # no Content-Length (chunked): refused while reading
            streamed = http.post("/v1/completions", content=body(), headers={"content-type": "application/json"})
            # a declared Content-Length over the limit: refused before reading
            declared = http.post("/v1/completions", content=body(),
                                 headers={"content-type": "application/json",
                                          "content-length": str(50 * len(chunk) + 31)})
        finally:
            stop.set()
            sampler.join()
        assert streamed.status_code == 413 and streamed.json()["error"]["param"] == "body", streamed.text
        assert declared.status_code == 413 and str(50 * len(chunk) + 31) in declared.json()["error"]["message"]
        growth = (peak[0] - baseline) / MIB
        assert growth < 100, f"the HTTP process grew by {growth:.0f} MiB"
        # the rest of each refused body was discarded: the server keeps serving, on the same client
        assert http.post("/v1/completions", json={"prompt": "ok", "max_tokens": 2}).status_code == 200
    server.wait_idle()


def test_a_prompt_list_larger_than_max_waiting_is_a_400_not_a_503(tiny_path):
    live = LiveServer(tiny_path("gqa"), serve={"max_waiting": 2})
    try:
        with httpx.Client(base_url=live.url, timeout=60) as http:
            response = http.post("/v1/completions", json={"prompt": ["a", "b", "c"], "max_tokens": 2})
            assert response.status_code == 400 and "retry-after" not in response.headers, response.text
            error = response.json()["error"]
            assert error["param"] == "prompt" and "--max-waiting" in error["message"] and "3 prompts" in error["message"]
            assert http.post("/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 2}).status_code == 200
        live.wait_idle()
    finally:
        live.close()


def test_the_waiting_bound_is_never_exceeded(tiny_path, monkeypatch):
    """The bound is checked against one consistent count: a request the engine took from the queue during a
    step is still counted until the next snapshot shows where it is."""
    bound = 3
    live = LiveServer(tiny_path("gqa"), serve={"max_waiting": bound}, max_num_seqs=1)
    scheduler, step = live.engine.scheduler, live.engine.step
    waiting_seen = []

    def slow_step():
        waiting_seen.append(len(scheduler.waiting))
        time.sleep(0.03)
        return step()

    monkeypatch.setattr(live.engine, "step", slow_step)
    body = {"prompt": "Once upon a time", "max_tokens": 4, "ignore_eos": True}

    async def waves():
        async with httpx.AsyncClient(base_url=live.url, timeout=120) as http:
            answers = []
            for _ in range(6):
                answers += await asyncio.gather(*(http.post("/v1/completions", json=body) for _ in range(8)))
                await asyncio.sleep(0.045)
            return answers

    try:
        answers = asyncio.run(waves())
        live.wait_idle()
    finally:
        live.close()
    codes = [a.status_code for a in answers]
    assert set(codes) <= {200, 503} and 200 in codes and 503 in codes, codes
    reported = [int(re.search(r"(\d+) request\(s\) waiting", a.json()["error"]["message"]).group(1))
                for a in answers if a.status_code == 503]
    assert max(reported) <= bound, reported
    assert max(waiting_seen) <= bound, waiting_seen


# -- the event loop stays free -----------------------------------------------------------------------------
def test_streams_and_health_keep_their_latency_while_a_prompt_is_tokenized(tiny_path, monkeypatch):
    """A tokenizer that takes 2 s on one prompt (as a huge valid prompt of a real model can): the open stream's
    largest gap between chunks and /health stay far below it, since tokenization runs off the event loop."""
    live = LiveServer(tiny_path("gqa"))
    tokenizer = live.engine.tokenizer
    encode = type(tokenizer).__call__
    slow_text = "slow " * 100

    def slow_call(self, text, *args, **kwargs):
        if text == slow_text:
            time.sleep(2.0)  # releases the GIL, as the Rust tokenizer does while it encodes
        return encode(self, text, *args, **kwargs)

    monkeypatch.setattr(type(tokenizer), "__call__", slow_call)
    step = live.engine.step

    def paced_step():  # a stream that lasts a few seconds
        time.sleep(0.015)
        return step()

    monkeypatch.setattr(live.engine, "step", paced_step)
    gaps, slow_answer = [], {}
    sent = threading.Event()

    def send_slow():
        sent.set()
        slow_answer["response"] = httpx.post(f"{live.url}/v1/completions", json={"prompt": slow_text, "max_tokens": 2},
                                             timeout=60)

    try:
        probe = None
        with httpx.Client(base_url=live.url, timeout=60) as http, http.stream(
                "POST", "/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 200, "ignore_eos": True,
                                                 "stream": True}) as response:
            lines = response.iter_lines()
            for _ in range(5):
                next(line for line in lines if line.startswith("data: "))
            slow = threading.Thread(target=send_slow)
            slow.start()
            sent.wait()
            probe = _Probe(live.url)
            last = time.monotonic()
            for line in lines:
                if line.startswith("data: "):
                    now = time.monotonic()
                    gaps.append(now - last)
                    last = now
            probe.stop()
            slow.join(60)
        assert slow_answer["response"].status_code == 200, slow_answer["response"].text
        assert sum(gaps) > 2.0, f"the stream ended before the slow tokenization did ({sum(gaps):.2f} s)"
        assert max(gaps) < 1.0, f"largest inter-chunk gap {max(gaps):.2f} s"
        assert max(probe.latencies) < 0.5, sorted(probe.latencies)[-5:]
    finally:
        live.close()


# -- bad text and errors ----------------------------------------------------------------------------------
def test_a_lone_surrogate_is_a_400_and_the_keep_alive_connection_serves_the_next_request(server):
    host, port = server.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    headers = {"content-type": "application/json"}
    try:
        cases = [("/v1/completions", {"prompt": "\ud800abc"}, "prompt", "U+D800 at character 0"),
                 ("/v1/chat/completions", {"messages": [{"role": "user", "content": "ab\udc00"}]},
                  "messages[0].content", "U+DC00 at character 2"),
                 ("/v1/completions", {"prompt": ["fine", "x\udfff"]}, "prompt[1]", "U+DFFF at character 1")]
        sockets = set()
        for path, body, param, fragment in cases:
            connection.request("POST", path, body=json.dumps(body), headers=headers)  # ASCII JSON: \ud800 escapes
            sockets.add(connection.sock.getsockname())
            response = connection.getresponse()
            answer = json.loads(response.read())
            assert response.status == 400, answer
            assert answer["error"]["param"] == param and fragment in answer["error"]["message"], answer
            assert (response.getheader("connection") or "").lower() != "close"
        connection.request("POST", "/v1/completions", body=json.dumps({"prompt": "fine", "max_tokens": 2}),
                           headers=headers)
        sockets.add(connection.sock.getsockname())
        response = connection.getresponse()
        assert response.status == 200 and json.loads(response.read())["usage"]["completion_tokens"] == 2
        assert len(sockets) == 1  # one connection served them all
    finally:
        connection.close()
    assert _metric(server.url, 'apex_http_responses_total{endpoint="/v1/completions",status="500"}') == 0


@pytest.mark.parametrize("body", [b"[" * 100_000 + b"]" * 100_000, b'{"prompt": "x", "max_tokens": 1' + b"0" * 5000 + b"}",
                                  b'{"prompt": "\xff\xfe"}'], ids=["nested-too-deep", "huge-integer", "not-utf8"])
def test_json_that_python_cannot_read_is_a_400(server, body):
    response = httpx.post(f"{server.url}/v1/completions", content=body, headers={"content-type": "application/json"},
                          timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "body" and len(response.content) < 1000


def test_a_chat_the_template_refuses_is_a_400(server):
    tokenizer = server.engine.tokenizer
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                               "{{ raise_exception('system messages are not supported') }}{% endif %}"
                               "{{ m['content'] }}{% endfor %}")
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            response = http.post("/v1/chat/completions", json={"messages": [{"role": "system", "content": "x"}]})
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert error["param"] == "messages" and "system messages are not supported" in error["message"]
    finally:
        tokenizer.chat_template = None


REFUSED = [
    ({"min_p": 0.1}, "min_p"),
    ({"repetition_penalty": 1.2}, "repetition_penalty"),
    ({"guided_json": {"type": "object"}}, "guided_json"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"chat_template": "{{ 7 * 7 }}"}, "chat_template"),
    ({"frobnicate": True}, "frobnicate"),
]


@pytest.mark.parametrize(("extra", "param"), REFUSED, ids=[p for _, p in REFUSED])
def test_fields_that_would_change_the_output_are_refused(server, extra, param):
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for path, body in (("/v1/completions", {"prompt": "hi"}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
            response = http.post(path, json={**body, "max_tokens": 2, **extra})
            assert response.status_code == 400, (path, response.text)
            assert response.json()["error"]["param"] == param, response.json()


def test_default_values_and_bookkeeping_fields_are_accepted(server):
    with httpx.Client(base_url=server.url, timeout=60) as http:
        response = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "min_p": 0.0,
                                                      "repetition_penalty": 1.0, "tool_choice": "none",
                                                      "user": "someone", "metadata": {"k": "v"}})
        assert response.status_code == 200, response.text


def test_errors_echo_at_most_about_100_characters_of_a_value(server):
    with httpx.Client(base_url=server.url, timeout=60) as http:
        response = http.post("/v1/completions", json={"model": "m" * MIB, "prompt": "hi"})
        assert response.status_code == 400 and response.json()["error"]["param"] == "model"
        assert len(response.content) < 1000 and f"{MIB} characters" in response.text
        response = http.post("/v1/completions", json={"prompt": "hi", "stop": [[1] * 100_000]})
        assert response.status_code == 400 and len(response.content) < 1000


# -- content type, API key, CORS ----------------------------------------------------------------------------
def test_json_endpoints_need_a_json_content_type(server):
    body = json.dumps({"prompt": "hi", "max_tokens": 2})
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for headers in ({"content-type": "text/plain"}, {}, {"content-type": "application/x-www-form-urlencoded"}):
            response = http.post("/v1/completions", content=body, headers=headers)
            assert response.status_code == 415, (headers, response.text)
            assert "application/json" in response.json()["error"]["message"]
        ok = http.post("/v1/completions", content=body, headers={"content-type": "application/json; charset=utf-8"})
        assert ok.status_code == 200
        # and no CORS unless asked for: a preflight gets no allow-origin
        preflight = http.options("/v1/completions", headers={"origin": "http://evil.test",
                                                              "access-control-request-method": "POST"})
        assert "access-control-allow-origin" not in preflight.headers


@pytest.fixture(scope="module")
def keyed(tiny_path):
    live = LiveServer(tiny_path("gqa"), serve={"api_keys": ("sk-one", "sk-two"),
                                                 "allowed_origins": ("http://app.test",)})
    yield live
    live.close()


def test_an_api_key_guards_v1_and_leaves_health_and_metrics_open(keyed):
    with httpx.Client(base_url=keyed.url, timeout=60) as http:
        body = {"prompt": "hi", "max_tokens": 2}
        for headers in ({}, {"authorization": "Bearer sk-wrong"}, {"authorization": "sk-one"},
                        {"authorization": "Basic sk-one"}):
            response = http.post("/v1/completions", json=body, headers=headers)
            assert response.status_code == 401, (headers, response.text)
            assert response.headers["www-authenticate"] == "Bearer"
            assert response.json()["error"]["type"] == "authentication_error"
        assert http.get("/v1/models").status_code == 401
        assert http.get("/health").status_code == 200
        assert http.get("/metrics").status_code == 200
        for key in ("sk-one", "sk-two"):
            assert http.post("/v1/completions", json=body, headers={"authorization": f"Bearer {key}"}).status_code == 200
    client = openai.OpenAI(base_url=f"{keyed.url}/v1", api_key="sk-two", max_retries=0, timeout=60)
    assert client.completions.create(model="tiny", prompt="hi", max_tokens=2).usage.completion_tokens == 2
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{keyed.url}/v1", api_key="nope", max_retries=0).models.list()


def test_cors_answers_only_the_allowed_origins(keyed):
    with httpx.Client(base_url=keyed.url, timeout=60) as http:
        preflight = {"access-control-request-method": "POST",
                     "access-control-request-headers": "authorization, content-type"}
        allowed = http.options("/v1/chat/completions", headers={"origin": "http://app.test", **preflight})
        assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "http://app.test"
        assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
        other = http.options("/v1/chat/completions", headers={"origin": "http://evil.test", **preflight})
        assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
        refused = http.post("/v1/completions", json={"prompt": "hi"}, headers={"origin": "http://app.test"})
        assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == "http://app.test"


def test_protect_metrics_puts_metrics_behind_the_key(tiny_path):
    live = LiveServer(tiny_path("gqa"), serve={"api_keys": ("sk-m",), "protect_metrics": True})
    try:
        assert httpx.get(f"{live.url}/metrics", timeout=30).status_code == 401
        assert httpx.get(f"{live.url}/health", timeout=30).status_code == 200
        assert _metric(live.url, 'apex_http_responses_total{endpoint="/metrics",status="401"}',
                       {"authorization": "Bearer sk-m"}) == 1
    finally:
        live.close()


def test_apex_serve_takes_the_key_from_the_environment(tiny_path, monkeypatch):
    from apexlib import cli
    from apexlib.serve import server

    seen = {}
    monkeypatch.setattr(server, "serve", lambda engine_args, **kwargs: seen.update(kwargs) or 0)
    monkeypatch.setenv("APEX_API_KEY", "sk-env")
    argv = ["serve", "--model", str(tiny_path("gqa")), "--device", "cpu", "--dtype", "float32"]
    assert cli.main(argv) == 0 and seen["api_keys"] == ("sk-env",)
    assert cli.main([*argv, "--api-key", "sk-flag", "--limit-concurrency", "0"]) == 0
    assert seen["api_keys"] == ("sk-flag",) and seen["limit_concurrency"] is None
    assert seen["max_request_bytes"] == 4 * MIB and seen["allowed_origins"] == ()


# -- read deadlines, disconnects mid-body ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def strict(tiny_path):
    live = LiveServer(tiny_path("gqa"), serve={"header_timeout": 1.0, "body_timeout": 1.0})
    yield live
    live.close()


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=30)


def _closed_after(sock: socket.socket, trickle: bytes, deadline: float) -> tuple[float, bytes]:
    """Sends ``trickle`` one byte per 0.1 s until the server closes; (seconds until closed, bytes received)."""
    started, received = time.monotonic(), b""
    sock.settimeout(0.1)
    index = 0
    while time.monotonic() - started < deadline:
        try:
            data = sock.recv(65536)
            if not data:
                return time.monotonic() - started, received
            received += data
        except TimeoutError:
            pass
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - started, received
        try:
            sock.send(trickle[index % len(trickle): index % len(trickle) + 1])
            index += 1
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - started, received
    return float("inf"), received


def test_slow_headers_are_closed_within_the_header_timeout(strict):
    before = _metric(strict.url, 'apex_http_read_timeouts_total{phase="header"}')
    sock = _connect(strict.url)
    try:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        seconds, received = _closed_after(sock, b"X-Slow: a\r\n", deadline=8)
    finally:
        sock.close()
    assert seconds < 4, "the server kept a slow-header connection open"
    assert received.startswith(b"HTTP/1.1 408")
    silent = _connect(strict.url)  # a connection that sends nothing is closed too
    try:
        silent.settimeout(8)
        started = time.monotonic()
        assert silent.recv(100) == b"" and time.monotonic() - started < 4
    finally:
        silent.close()
    assert _metric(strict.url, 'apex_http_read_timeouts_total{phase="header"}') == before + 2


def test_many_slowloris_connections_are_all_closed(strict):
    sockets = [_connect(strict.url) for _ in range(50)]
    try:
        for index, sock in enumerate(sockets):
            if index % 2:
                sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # slow headers
            else:
                sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
                             b"content-length: 1000\r\n\r\n{")  # slow body
        time.sleep(2.5)  # both deadlines are 1 s
        for sock in sockets:
            sock.settimeout(2)
            try:
                while sock.recv(65536):
                    pass
            except ConnectionResetError:
                pass
    finally:
        for sock in sockets:
            sock.close()
    with httpx.Client(base_url=strict.url, timeout=30) as http:  # and the server still serves
        assert http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200


def test_a_slow_body_gets_408_and_is_closed_within_the_body_timeout(strict):
    before = _metric(strict.url, 'apex_http_read_timeouts_total{phase="body"}')
    sock = _connect(strict.url)
    try:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: 1000\r\n\r\n")
        seconds, received = _closed_after(sock, b'{"prompt": "', deadline=8)
    finally:
        sock.close()
    assert seconds < 4, "the server kept a slow-body connection open"
    assert received.startswith(b"HTTP/1.1 408") and b"body" in received
    time.sleep(0.3)
    assert _metric(strict.url, 'apex_http_read_timeouts_total{phase="body"}') == before + 1


def test_oversized_headers_get_431(strict):
    sock = _connect(strict.url)
    try:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 64 * 1024 + b"\r\n\r\n")
        sock.settimeout(10)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
    finally:
        sock.close()
    assert received.startswith(b"HTTP/1.1 431"), received[:100]


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_a_client_leaving_mid_body_is_one_log_line_and_a_disconnect_not_a_500(server):
    records = _Records()
    loggers = [logging.getLogger(name) for name in ("uvicorn.error", "apexlib")]
    for logger in loggers:
        logger.addHandler(records)
    name = 'apex_http_client_disconnects_total{endpoint="/v1/completions",phase="body"}'
    before = _metric(server.url, name)
    try:
        sock = _connect(server.url)
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: 5000\r\n\r\n" + b'{"prompt": "' + b"a" * 1000)
        time.sleep(0.3)
        sock.close()
        deadline = time.monotonic() + 10
        while _metric(server.url, name) == before and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        for logger in loggers:
            logger.removeHandler(records)
    assert _metric(server.url, name) == before + 1
    assert _metric(server.url, 'apex_http_responses_total{endpoint="/v1/completions",status="500"}') == 0
    lines = [r for r in records.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1 and "left before its request body was complete" in lines[0].getMessage(), \
        [r.getMessage() for r in lines]
    assert lines[0].exc_info is None and "\n" not in lines[0].getMessage()


def test_a_bug_is_one_logged_500_naming_only_its_type_on_a_live_connection(server, monkeypatch):
    records = _Records()
    loggers = [logging.getLogger(name) for name in ("uvicorn.error", "apexlib")]
    for logger in loggers:
        logger.addHandler(records)
    openai_server = server.app.state.server

    def broken(*args, **kwargs):
        raise RuntimeError("internal detail that stays in the log")

    host, port = server.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    headers = {"content-type": "application/json"}
    try:
        with monkeypatch.context() as patch:
            patch.setattr(openai_server, "sampling_params", broken)
            connection.request("POST", "/v1/completions", body=json.dumps({"prompt": "hi"}), headers=headers)
            first = connection.sock.getsockname()
            response = connection.getresponse()
            answer = json.loads(response.read())
        assert response.status == 500 and "RuntimeError" in answer["error"]["message"]
        assert "internal detail" not in answer["error"]["message"]
        connection.request("POST", "/v1/completions", body=json.dumps({"prompt": "hi", "max_tokens": 2}),
                           headers=headers)
        assert connection.sock.getsockname() == first  # the same connection
        assert connection.getresponse().status == 200
    finally:
        connection.close()
        for logger in loggers:
            logger.removeHandler(records)
    errors = [r for r in records.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None, [r.getMessage() for r in errors]


def test_limit_concurrency_answers_503_beyond_it(tiny_path):
    live = LiveServer(tiny_path("gqa"), serve={"limit_concurrency": 3})
    try:
        idle = [_connect(live.url) for _ in range(3)]
        time.sleep(0.2)
        try:
            assert httpx.get(f"{live.url}/health", timeout=30).status_code == 503
        finally:
            for sock in idle:
                sock.close()
        time.sleep(0.2)
        assert httpx.get(f"{live.url}/health", timeout=30).status_code == 200
    finally:
        live.close()
