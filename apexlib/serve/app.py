"""The OpenAI-compatible HTTP API (FastAPI) over an :class:`~apexlib.serve.loop.EngineLoop`.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (streamed as server-sent events in
OpenAI's chunk format, ending with ``data: [DONE]``), ``GET /v1/models``, ``GET /health``,
``GET /metrics`` (Prometheus text).

A request is parsed and checked in full (field types and ranges, model name, prompt length against
``max_model_len``, whether it can ever fit the KV budget, the waiting-queue bound) before anything is
queued, so bad input costs the engine nothing. A client that disconnects -- while streaming or while
waiting for a non-streamed answer -- aborts its requests, whose KV blocks go back to the pools.

Exposure (:class:`ServeSettings`): a body is read only up to ``max_request_bytes`` (413 beyond), only as
``application/json`` (415 otherwise); parsing large bodies, the chat template and tokenization run in one
worker thread (:mod:`apexlib.serve.preprocess`), never on the event loop; ``api_keys`` protect ``/v1/*``
(and ``/metrics`` with ``protect_metrics``) with a 401 (:mod:`apexlib.serve.middleware`); CORS is off
unless ``allowed_origins`` names origins. Header/body read deadlines, the header size bound and the
connection limit are the HTTP protocol's (:func:`apexlib.serve.server.uvicorn_config`). A client that
leaves while sending its body is logged in one line and counted in ``apex_http_client_disconnects_total``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import ClientDisconnect

from apexlib.core.clock import clock
from apexlib.core.request import SamplingParams
from apexlib.policies.registry import policy_spec
from apexlib.serve.detok import IncrementalDetokenizer, StopStringMatcher
from apexlib.serve.http_protocol import TIMED_OUT_KEY
from apexlib.serve.loop import Delta, EngineLoop, RequestStream
from apexlib.serve.metrics import ServerMetrics
from apexlib.serve.middleware import ApiKeyMiddleware, UnexpectedErrorMiddleware
from apexlib.serve.preprocess import Preprocessor
from apexlib.serve.protocol import (
    ECHO_CHARS,
    ApiError,
    CompletionRequest,
    bad,
    clip,
    cut,
    parse_chat,
    parse_completion,
    parse_json,
)

logger = logging.getLogger(__name__)


MIB = 2**20


@dataclass(frozen=True)
class ServeSettings:
    #: names the server answers to in ``model`` (the first is what responses carry)
    served_model_names: tuple[str, ...]
    #: requests accepted but not yet running beyond which new ones get 503 + Retry-After
    max_waiting: int = 256
    #: Retry-After seconds of a 503
    retry_after: int = 1
    #: seconds a shutdown waits for in-flight requests
    drain_timeout: float = 30.0
    #: the largest request body read (413 beyond it, checked while reading)
    max_request_bytes: int = 4 * MIB
    #: keys accepted in ``Authorization: Bearer <key>`` on /v1/* (none: no key needed)
    api_keys: tuple[str, ...] = ()
    #: whether /metrics needs the key too (/health never does)
    protect_metrics: bool = False
    #: origins a browser may call from (CORS); none: no CORS headers at all
    allowed_origins: tuple[str, ...] = ()
    #: seconds from a connection's start (or its next request's first byte) to the end of the headers
    header_timeout: float = 10.0
    #: seconds from the end of the headers to the end of the body
    body_timeout: float = 30.0
    #: bytes of the request line and headers together (431 beyond)
    max_header_bytes: int = 32 * 1024
    #: connections plus requests in flight beyond which new requests get 503 (uvicorn's limit_concurrency)
    limit_concurrency: int | None = 512
    #: seconds an idle keep-alive connection stays open (uvicorn's timeout_keep_alive)
    keep_alive_timeout: int = 5
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        if not self.served_model_names or not all(isinstance(n, str) and n for n in self.served_model_names):
            raise ValueError(f"served_model_names must be non-empty strings, got {self.served_model_names!r}")
        if self.max_waiting < 1:
            raise ValueError(f"max_waiting must be >= 1, got {self.max_waiting}")
        if self.retry_after < 0:
            raise ValueError(f"retry_after must be >= 0, got {self.retry_after}")
        if self.max_request_bytes < 1024:
            raise ValueError(f"max_request_bytes must be >= 1024, got {self.max_request_bytes}")
        if not all(isinstance(k, str) and k and k.strip() == k for k in self.api_keys):
            raise ValueError("api_keys must be non-empty strings without surrounding spaces")
        for name in ("header_timeout", "body_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        if self.max_header_bytes < 1024:
            raise ValueError(f"max_header_bytes must be >= 1024, got {self.max_header_bytes}")
        if self.limit_concurrency is not None and self.limit_concurrency < 1:
            raise ValueError(f"limit_concurrency must be >= 1 (or None: no limit), got {self.limit_concurrency}")
        if self.keep_alive_timeout < 1:
            raise ValueError(f"keep_alive_timeout must be >= 1, got {self.keep_alive_timeout}")


@dataclass
class _Choice:
    """One prompt's output being assembled: its detokenizer, stop strings and counts."""

    index: int
    request_id: str
    num_prompt_tokens: int
    detok: IncrementalDetokenizer
    stop: StopStringMatcher
    num_tokens: int = 0
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None


class _RequestFailed(Exception):
    def __init__(self, error: ApiError) -> None:
        super().__init__(error.message)
        self.error = error


class OpenAIServer:
    """The application state: the engine loop, the tokenizer, limits, metrics."""

    def __init__(self, loop: EngineLoop, settings: ServeSettings) -> None:
        self.loop = loop
        self.settings = settings
        engine = loop.engine
        self.tokenizer = engine.tokenizer
        self.config = engine.config
        self.max_model_len = self.config.scheduler.max_model_len
        self.vocab_size = self.config.model.vocab_size
        cache = self.config.cache
        self.block_size = cache.block_size
        # A request lives wholly in one tier; without CPU attention it runs only from the GPU tier.
        self.max_request_blocks = (max(cache.num_gpu_blocks, cache.num_cpu_blocks)
                                   if policy_spec(self.config.scheduler.policy).cpu_attention
                                   else cache.num_gpu_blocks)
        self.engine_config = {
            "device": self.config.device, "dtype": self.config.dtype, "block_size": cache.block_size,
            "num_gpu_blocks": cache.num_gpu_blocks, "num_cpu_blocks": cache.num_cpu_blocks,
            "max_num_seqs": self.config.scheduler.max_num_seqs,
            "max_num_batched_tokens": self.config.scheduler.max_num_batched_tokens,
            "max_model_len": self.max_model_len, "policy": self.config.scheduler.policy}
        self.metrics = ServerMetrics(loop)
        loop.on_finished = self.metrics.observe_finished
        self.preprocessor = Preprocessor(self.tokenizer, self.max_model_len, self.vocab_size)

    # -- checks ---------------------------------------------------------------------------------------
    def check_model(self, model: str | None) -> str:
        names = self.settings.served_model_names
        if model is not None and model not in names:
            raise ApiError(400, f"model {clip(model)} is not served here; served: {list(names)}", "model",
                           "invalid_request_error")
        return names[0]

    def check_count(self, count: int, param: str) -> None:
        """A request of more prompts than can ever wait at once is a 400, not a 503 to retry forever."""
        if count > self.settings.max_waiting:
            raise bad(param, f"'{param}' has {count} prompts; at most {self.settings.max_waiting} requests can "
                             f"wait at once (--max-waiting), so it could never be accepted")

    def check_capacity(self, count: int) -> None:
        if not self.loop.alive:
            raise ApiError(503, f"the engine is not running ({self.loop.fatal_error or 'stopped'})", None,
                           "server_unavailable", {"Retry-After": str(self.settings.retry_after)})
        pending = self.loop.num_pending
        if pending + count > self.settings.max_waiting:
            raise ApiError(503, f"server overloaded: {pending} request(s) waiting, the bound is "
                                f"{self.settings.max_waiting} (--max-waiting); retry later", None,
                           "server_overloaded", {"Retry-After": str(self.settings.retry_after)})

    def sampling_params(self, parsed: CompletionRequest, num_prompt_tokens: int, param: str) -> SamplingParams:
        fields = parsed.sampling
        max_tokens = fields.max_tokens
        if max_tokens is None:
            max_tokens = self.max_model_len - num_prompt_tokens
        elif num_prompt_tokens + max_tokens > self.max_model_len:
            raise bad("max_tokens", f"'max_tokens' = {clip(max_tokens)} plus the {num_prompt_tokens} prompt tokens of "
                                    f"'{param}' exceed max_model_len = {self.max_model_len}; ask for at most "
                                    f"{self.max_model_len - num_prompt_tokens}")
        blocks = math.ceil((num_prompt_tokens + max_tokens) / self.block_size)
        if blocks > self.max_request_blocks:
            raise bad("max_tokens", f"'{param}' ({num_prompt_tokens} tokens) plus 'max_tokens' = {max_tokens} need "
                                    f"{blocks} KV blocks of {self.block_size} tokens, and the KV budget of one "
                                    f"request is {self.max_request_blocks} blocks: it could never run; ask for at "
                                    f"most {self.max_request_blocks * self.block_size - num_prompt_tokens} tokens")
        for token in fields.stop_token_ids:
            if token >= self.vocab_size:
                raise bad("stop_token_ids", f"'stop_token_ids' has {clip(token)}, outside the vocabulary [0, "
                                            f"{self.vocab_size})")
        # Non-streamed requests without stop strings need only the final output (no per-step copies).
        kind = "cumulative" if parsed.stream or fields.stop else "final_only"
        try:
            return SamplingParams(max_tokens=max_tokens, temperature=fields.temperature, top_p=fields.top_p,
                                  top_k=fields.top_k, seed=fields.seed, stop_token_ids=fields.stop_token_ids or None,
                                  ignore_eos=fields.ignore_eos, output_kind=kind)
        except (TypeError, ValueError) as error:  # a limit checked only there
            name = str(error).split(" ", 1)[0].removeprefix("SamplingParams.")
            raise bad(name[:ECHO_CHARS], cut(str(error), 3 * ECHO_CHARS)) from None

    # -- running requests -----------------------------------------------------------------------------
    def submit(self, parsed: CompletionRequest, prompts: list[list[int]], params: list[SamplingParams],
               prefix: str) -> tuple[list[_Choice], asyncio.Queue]:
        """Check the waiting bound and queue every prompt, in one step: no await in between, so no other
        request on this event loop is admitted between the check and the enqueue."""
        self.check_capacity(len(prompts))
        event_loop = asyncio.get_running_loop()
        output: asyncio.Queue = asyncio.Queue()
        choices = []
        arrival = clock()
        for index, (ids, sampling) in enumerate(zip(prompts, params, strict=True)):
            request_id = self.loop.new_request_id(prefix)
            stream = RequestStream(request_id, event_loop, output, index)
            choices.append(_Choice(index, request_id, len(ids), IncrementalDetokenizer(self.tokenizer),
                                   StopStringMatcher(parsed.sampling.stop)))
            try:
                self.loop.submit(stream, ids, sampling, arrival)
            except RuntimeError as error:
                for choice in choices[:-1]:
                    self.loop.abort(choice.request_id)
                raise ApiError(503, str(error), None, "server_unavailable",
                               {"Retry-After": str(self.settings.retry_after)}) from None
        return choices, output

    def abort_unfinished(self, choices: list[_Choice]) -> int:
        """Abort the choices still running; returns how many there were."""
        aborted = 0
        for choice in choices:
            if choice.finish_reason is None:
                self.loop.abort(choice.request_id)
                choice.finish_reason = "abort"
                aborted += 1
        return aborted

    async def events(self, choices: list[_Choice],
                     output: asyncio.Queue) -> AsyncIterator[tuple[_Choice, str, tuple[int, ...]]]:
        """(choice, new text, new token ids) as tokens arrive; a choice is done when its ``finish_reason`` is set.
        Raises _RequestFailed when a request failed (the others are aborted by the caller).

        Every delta already waiting in ``output`` is taken at once and merged per choice (each still goes
        through detokenization and the stop strings in order): a stream that lags behind the engine sends
        one chunk with several tokens instead of one chunk per token, as vLLM's server does, so the HTTP
        side's per-chunk cost (JSON, the send) does not grow with the engine's speed."""
        remaining = len(choices)
        while remaining:
            batch = [await output.get()]
            while True:
                try:
                    batch.append(output.get_nowait())
                except asyncio.QueueEmpty:
                    break
            merged: dict[int, tuple[list[str], list[int]]] = {}
            failure = None
            try:
                for index, delta in batch:
                    choice = choices[index]
                    if choice.finish_reason is not None:
                        continue  # stopped by a stop string: its late tokens are not wanted
                    text = self._advance(choice, delta)
                    if choice.finish_reason is not None:
                        remaining -= 1
                    texts, token_ids = merged.setdefault(index, ([], []))
                    texts.append(text)
                    token_ids.extend(delta.token_ids)
            except _RequestFailed as error:
                failure = error  # what advanced before it is still delivered, then the failure
            for index, (texts, token_ids) in merged.items():
                choice, text = choices[index], "".join(texts)
                if text or token_ids or choice.finish_reason is not None:
                    yield choice, text, tuple(token_ids)
            if failure is not None:
                raise failure

    def _advance(self, choice: _Choice, delta: Delta) -> str:
        if delta.finished and delta.finish_reason in ("error", "abort"):
            if delta.source == "rejected":
                raise _RequestFailed(bad("prompt", delta.error or "rejected"))
            raise _RequestFailed(ApiError(500, f"request {choice.request_id} failed: {delta.error or 'aborted'}",
                                          None, "internal_error"))
        choice.num_tokens += len(delta.token_ids)
        choice.token_ids.extend(delta.token_ids)
        text, stopped = choice.stop.push(choice.detok.push(delta.token_ids))
        if not stopped and delta.finished:
            more, stopped = choice.stop.push(choice.detok.flush())
            text += more + choice.stop.flush()
        if stopped:
            if not delta.finished:
                self.loop.abort(choice.request_id)  # the rest of its tokens are not wanted: free its blocks
            choice.finish_reason = "stop"
        elif delta.finished:
            choice.finish_reason = delta.finish_reason or "stop"
        choice.text += text
        return text


def _usage(choices: list[_Choice]) -> dict[str, int]:
    prompt = sum(c.num_prompt_tokens for c in choices)
    completion = sum(c.num_tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


async def _wait_disconnect(request: Request) -> None:
    """Returns when the client has gone (after the body was read, receive() only reports a disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def read_body(request: Request, server: OpenAIServer) -> bytes:
    """The request's body: ``application/json`` only (415), at most ``max_request_bytes`` (413: from
    Content-Length at once, else while reading). Raises ClientDisconnect when the client leaves before its
    body is complete."""
    if _media_type(request) != "application/json":
        got = request.headers.get("content-type")
        raise ApiError(415, f"the request body must be sent as 'Content-Type: application/json', got "
                            f"{clip(got) if got is not None else 'no Content-Type'}", "content-type",
                       "invalid_request_error")
    limit = server.settings.max_request_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body has {int(declared)} bytes; at most {limit} are accepted "
                            f"(--max-request-bytes)", "body", "invalid_request_error")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the request body exceeds {limit} bytes (--max-request-bytes)", "body",
                           "invalid_request_error")
        chunks.append(chunk)
    return b"".join(chunks)


def _completion_body(body: bytes) -> CompletionRequest:
    return parse_completion(parse_json(body))


def _chat_body(body: bytes) -> CompletionRequest:
    return parse_chat(parse_json(body))


def build_app(loop: EngineLoop, settings: ServeSettings) -> FastAPI:
    """The FastAPI application; its lifespan starts ``loop`` (if not running) and stops it at shutdown."""
    server = OpenAIServer(loop, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if not loop.alive:
            loop.start()
        try:
            yield
        finally:
            loop.stop(timeout=settings.drain_timeout)
            server.preprocessor.close()

    app = FastAPI(title="apexlib OpenAI-compatible server", lifespan=lifespan)
    app.state.server = server
    responses = server.metrics.responses
    # add_middleware puts each new one outside the previous: the error handler innermost, CORS outermost
    app.add_middleware(UnexpectedErrorMiddleware, on_error=lambda path: responses.labels(path, "500").inc())
    if settings.api_keys:
        app.add_middleware(ApiKeyMiddleware, api_keys=settings.api_keys, protect_metrics=settings.protect_metrics,
                           on_refused=lambda path: responses.labels(path, "401").inc())
    if settings.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.allowed_origins),
                           allow_methods=["GET", "POST"], allow_headers=["*"], allow_credentials=False)

    def error_response(error: ApiError, endpoint: str) -> JSONResponse:
        responses.labels(endpoint, str(error.status)).inc()
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, error: ApiError) -> JSONResponse:
        return error_response(error, request.url.path)

    def client_left(request: Request, phase: str) -> Response:
        """The client went away (``phase``: "body" while sending the request, "response" while waiting)."""
        endpoint = request.url.path
        server.metrics.client_disconnects.labels(endpoint, phase).inc()
        if phase == "body":
            client = request.client
            timed_out = request.scope.get(TIMED_OUT_KEY) == "body"
            logger.warning("%s %s from %s: %s", request.method, endpoint,
                           f"{client.host}:{client.port}" if client else "a client",
                           f"the body did not arrive within {settings.body_timeout:g} s (closed)" if timed_out
                           else "the client left before its request body was complete")
        return Response(status_code=499)

    @app.get("/health")
    async def health() -> Response:
        if loop.alive:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unavailable", "error": loop.fatal_error}, status_code=503)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [
            {"id": name, "object": "model", "created": settings.created, "owned_by": "apexlib",
             "root": server.config.model.path, "max_model_len": server.max_model_len,
             "engine_config": server.engine_config}
            for name in settings.served_model_names]})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        try:
            body = await read_body(request, server)
        except ClientDisconnect:
            return client_left(request, "body")
        parsed = await server.preprocessor.parse(body, _completion_body)
        model = server.check_model(parsed.model)
        many = len(parsed.prompts) > 1
        server.check_count(len(parsed.prompts), "prompt")
        prompts, params = [], []
        for index, prompt in enumerate(parsed.prompts):
            param = f"prompt[{index}]" if many else "prompt"
            ids = await server.preprocessor.encode(prompt, param)
            prompts.append(ids)
            params.append(server.sampling_params(parsed, len(ids), param))
        return await _respond(request, parsed, prompts, params, model, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        try:
            body = await read_body(request, server)
        except ClientDisconnect:
            return client_left(request, "body")
        parsed = await server.preprocessor.parse(body, _chat_body)
        model = server.check_model(parsed.model)
        ids = await server.preprocessor.encode_chat(list(parsed.messages))
        params = [server.sampling_params(parsed, len(ids), "messages")]
        return await _respond(request, parsed, [ids], params, model, chat=True)

    async def _respond(request: Request, parsed: CompletionRequest, prompts: list[list[int]],
                       params: list[SamplingParams], model: str, chat: bool) -> Response:
        endpoint = request.url.path
        prefix = "chatcmpl" if chat else "cmpl"
        response_id = f"{prefix}-{uuid.uuid4().hex}"
        created = int(time.time())
        choices, output = server.submit(parsed, prompts, params, prefix)
        if parsed.stream:
            server.metrics.responses.labels(endpoint, "200").inc()
            return StreamingResponse(_stream(parsed, choices, output, response_id, created, model, chat, endpoint),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        collector = asyncio.ensure_future(_collect(choices, output))
        watcher = asyncio.ensure_future(_wait_disconnect(request))
        try:
            await asyncio.wait({collector, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not collector.done():  # the client left (or this handler was cancelled): free its requests
                collector.cancel()
                server.abort_unfinished(choices)
            watcher.cancel()
        if not collector.done() or collector.cancelled():
            return client_left(request, "response")
        error = collector.exception()
        if error is not None:
            server.abort_unfinished(choices)
            if isinstance(error, _RequestFailed):
                return error_response(error.error, endpoint)
            raise error
        server.metrics.responses.labels(endpoint, "200").inc()
        if chat:
            body_choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                             "logprobs": None, "finish_reason": c.finish_reason} for c in choices]
            obj = "chat.completion"
        else:
            body_choices = [{"index": c.index, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
                            for c in choices]
            obj = "text_completion"
        if parsed.return_token_ids:
            for body_choice, choice in zip(body_choices, choices, strict=True):
                body_choice["token_ids"] = choice.token_ids
        return JSONResponse({"id": response_id, "object": obj, "created": created, "model": model,
                             "choices": body_choices, "usage": _usage(choices)})

    async def _collect(choices: list[_Choice], output: asyncio.Queue) -> None:
        async for _ in server.events(choices, output):
            pass

    async def _stream(parsed: CompletionRequest, choices: list[_Choice], output: asyncio.Queue, response_id: str,
                      created: int, model: str, chat: bool, endpoint: str) -> AsyncIterator[bytes]:
        obj = "chat.completion.chunk" if chat else "text_completion"
        extra = {"usage": None} if parsed.include_usage else {}

        def chunk(choice: _Choice, text: str | None, finish_reason: str | None, role: bool = False,
                  token_ids: tuple[int, ...] = ()) -> bytes:
            if chat:
                delta: dict[str, Any] = {}
                if role:
                    delta["role"] = "assistant"
                if text is not None:
                    delta["content"] = text
                body = {"index": choice.index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            else:
                body = {"index": choice.index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
            if parsed.return_token_ids:
                body["token_ids"] = list(token_ids)
            return _sse({"id": response_id, "object": obj, "created": created, "model": model, "choices": [body],
                         **extra})

        try:
            if chat:
                for choice in choices:
                    yield chunk(choice, "", None, role=True)
            try:
                async for choice, text, token_ids in server.events(choices, output):
                    # a token whose text is held back (an incomplete character, a possible stop string) is
                    # announced only to clients that asked for token ids
                    if text or (token_ids and parsed.return_token_ids):
                        yield chunk(choice, text, None, token_ids=token_ids)
                    if choice.finish_reason is not None:
                        yield chunk(choice, None if chat else "", choice.finish_reason)
            except _RequestFailed as failed:
                server.abort_unfinished(choices)
                yield _sse(failed.error.body())
                yield b"data: [DONE]\n\n"
                return
            if parsed.include_usage:
                yield _sse({"id": response_id, "object": obj, "created": created, "model": model, "choices": [],
                            "usage": _usage(choices)})
            yield b"data: [DONE]\n\n"
        finally:  # the client disconnected (this generator was cancelled or closed): free what still runs
            if server.abort_unfinished(choices):
                server.metrics.client_disconnects.labels(endpoint, "response").inc()

    return app
