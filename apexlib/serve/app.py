"""The OpenAI-compatible HTTP API (FastAPI) over an :class:`~apexlib.serve.loop.EngineLoop`.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (streamed as server-sent events in
OpenAI's chunk format, ending with ``data: [DONE]``), ``GET /v1/models``, ``GET /health``,
``GET /metrics`` (Prometheus text).

A request is parsed and checked in full (field types and ranges, model name, prompt length against
``max_model_len``, whether it can ever fit the KV budget, the waiting-queue bound) before anything is
queued, so bad input costs the engine nothing. A client that disconnects -- while streaming or while
waiting for a non-streamed answer -- aborts its requests, whose KV blocks go back to the pools.
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
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from apexlib.core.clock import clock
from apexlib.core.request import SamplingParams
from apexlib.serve.chat import render_chat
from apexlib.serve.detok import IncrementalDetokenizer, StopStringMatcher
from apexlib.serve.loop import Delta, EngineLoop, RequestStream
from apexlib.serve.metrics import ServerMetrics
from apexlib.serve.protocol import (
    ApiError,
    CompletionRequest,
    bad,
    parse_chat,
    parse_completion,
    parse_json,
)

logger = logging.getLogger(__name__)


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
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        if not self.served_model_names or not all(isinstance(n, str) and n for n in self.served_model_names):
            raise ValueError(f"served_model_names must be non-empty strings, got {self.served_model_names!r}")
        if self.max_waiting < 1:
            raise ValueError(f"max_waiting must be >= 1, got {self.max_waiting}")
        if self.retry_after < 0:
            raise ValueError(f"retry_after must be >= 0, got {self.retry_after}")


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
        # A request lives wholly in one tier; gpu_only never uses the CPU tier.
        self.max_request_blocks = (cache.num_gpu_blocks if self.config.scheduler.policy == "gpu_only"
                                   else max(cache.num_gpu_blocks, cache.num_cpu_blocks))
        self.engine_config = {
            "device": self.config.device, "dtype": self.config.dtype, "block_size": cache.block_size,
            "num_gpu_blocks": cache.num_gpu_blocks, "num_cpu_blocks": cache.num_cpu_blocks,
            "max_num_seqs": self.config.scheduler.max_num_seqs,
            "max_num_batched_tokens": self.config.scheduler.max_num_batched_tokens,
            "max_model_len": self.max_model_len, "policy": self.config.scheduler.policy}
        self.metrics = ServerMetrics(loop)
        loop.on_finished = self.metrics.observe_finished

    # -- checks ---------------------------------------------------------------------------------------
    def check_model(self, model: str | None) -> str:
        names = self.settings.served_model_names
        if model is not None and model not in names:
            raise ApiError(400, f"model {model!r} is not served here; served: {list(names)}", "model",
                           "invalid_request_error")
        return names[0]

    def check_capacity(self, count: int) -> None:
        if not self.loop.alive:
            raise ApiError(503, f"the engine is not running ({self.loop.fatal_error or 'stopped'})", None,
                           "server_unavailable", {"Retry-After": str(self.settings.retry_after)})
        pending = self.loop.num_pending
        if pending + count > self.settings.max_waiting:
            raise ApiError(503, f"server overloaded: {pending} request(s) waiting, the bound is "
                                f"{self.settings.max_waiting} (--max-waiting); retry later", None,
                           "server_overloaded", {"Retry-After": str(self.settings.retry_after)})

    def tokenize(self, prompt: str | tuple[int, ...], param: str, add_special_tokens: bool = True) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise bad(param, f"'{param}' is text but the model has no tokenizer; send token ids")
            ids = list(self.tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"])
            if not ids:
                raise bad(param, f"'{param}' encodes to no tokens")
        else:
            ids = list(prompt)
            for position, token in enumerate(ids):
                if not 0 <= token < self.vocab_size:
                    raise bad(param, f"'{param}[{position}]' = {token} is outside the vocabulary [0, "
                                     f"{self.vocab_size})")
        if len(ids) >= self.max_model_len:
            raise bad(param, f"'{param}' has {len(ids)} tokens; max_model_len is {self.max_model_len} (the "
                             f"prompt plus at least one generated token must fit)")
        return ids

    def sampling_params(self, parsed: CompletionRequest, num_prompt_tokens: int, param: str) -> SamplingParams:
        fields = parsed.sampling
        max_tokens = fields.max_tokens
        if max_tokens is None:
            max_tokens = self.max_model_len - num_prompt_tokens
        elif num_prompt_tokens + max_tokens > self.max_model_len:
            raise bad("max_tokens", f"'max_tokens' = {max_tokens} plus the {num_prompt_tokens} prompt tokens of "
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
                raise bad("stop_token_ids", f"'stop_token_ids' has {token}, outside the vocabulary [0, "
                                            f"{self.vocab_size})")
        # Non-streamed requests without stop strings need only the final output (no per-step copies).
        kind = "cumulative" if parsed.stream or fields.stop else "final_only"
        try:
            return SamplingParams(max_tokens=max_tokens, temperature=fields.temperature, top_p=fields.top_p,
                                  top_k=fields.top_k, seed=fields.seed, stop_token_ids=fields.stop_token_ids or None,
                                  ignore_eos=fields.ignore_eos, output_kind=kind)
        except (TypeError, ValueError) as error:  # a limit checked only there
            name = str(error).split(" ", 1)[0].removeprefix("SamplingParams.")
            raise bad(name, str(error)) from None

    # -- running requests -----------------------------------------------------------------------------
    def submit(self, parsed: CompletionRequest, prompts: list[list[int]], params: list[SamplingParams],
               prefix: str) -> tuple[list[_Choice], asyncio.Queue]:
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

    def abort_unfinished(self, choices: list[_Choice]) -> None:
        for choice in choices:
            if choice.finish_reason is None:
                self.loop.abort(choice.request_id)
                choice.finish_reason = "abort"

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

    app = FastAPI(title="apexlib OpenAI-compatible server", lifespan=lifespan)
    app.state.server = server

    def error_response(error: ApiError, endpoint: str) -> JSONResponse:
        server.metrics.responses.labels(endpoint, str(error.status)).inc()
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, error: ApiError) -> JSONResponse:
        return error_response(error, request.url.path)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        logger.exception("unhandled error in %s", request.url.path)
        return error_response(ApiError(500, f"internal error: {type(error).__name__}: {error}"), request.url.path)

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
        parsed = parse_completion(parse_json(await request.body()))
        model = server.check_model(parsed.model)
        many = len(parsed.prompts) > 1
        prompts, params = [], []
        for index, prompt in enumerate(parsed.prompts):
            param = f"prompt[{index}]" if many else "prompt"
            ids = server.tokenize(prompt, param)
            prompts.append(ids)
            params.append(server.sampling_params(parsed, len(ids), param))
        return await _respond(request, parsed, prompts, params, model, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        parsed = parse_chat(parse_json(await request.body()))
        model = server.check_model(parsed.model)
        if server.tokenizer is None:
            raise bad("messages", "the model has no tokenizer: chat needs one (use /v1/completions with token ids)")
        text, add_special = render_chat(server.tokenizer, list(parsed.messages))
        ids = server.tokenize(text, "messages", add_special_tokens=add_special)
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
            return StreamingResponse(_stream(parsed, choices, output, response_id, created, model, chat),
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
            return Response(status_code=499)
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
                      created: int, model: str, chat: bool) -> AsyncIterator[bytes]:
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
            server.abort_unfinished(choices)

    return app
