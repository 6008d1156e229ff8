"""OpenAI request bodies -> validated, typed requests; errors in OpenAI's shape. Torch-free.

Every check names the field and the limit: a bad request gets a 400 before anything is queued. Every field
of a body is one of: implemented, refused when it asks for something not implemented (:data:`UNSUPPORTED`:
its non-default values), accepted and ignored because it cannot change the output (:data:`IGNORED`, as
OpenAI's own bookkeeping fields), or unknown (refused, as OpenAI's API does). Texts must be valid Unicode
(no lone surrogates: JSON's ``"\\ud800"`` escape can carry one, and no tokenizer can encode it). A value
echoed in an error is cut to :data:`ECHO_CHARS` characters.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from apexlib.core.request import MAX_SEED, MIN_TEMPERATURE

#: At most this many stop strings per request (OpenAI allows 4; a few more cost nothing here).
MAX_STOP_STRINGS = 16
#: At most this many characters of a value are echoed in an error message.
ECHO_CHARS = 100
#: Fields that change the output and are not implemented: a non-default value is refused, not ignored.
UNSUPPORTED = {
    "best_of": (None, 1),
    "echo": (None, False),
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "suffix": (None, ""),
    "tools": (None, []),
    "response_format": (None, {"type": "text"}),
    "tool_choice": (None, "none", "auto"),  # without tools both mean: answer with text
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "min_p": (None, 0, 0.0),
    "repetition_penalty": (None, 1, 1.0),
    "length_penalty": (None, 1, 1.0),
    "min_tokens": (None, 0),
    "use_beam_search": (None, False),
    "bad_words": (None, []),
    "allowed_token_ids": (None,),
    "logits_processors": (None,),
    "prompt_logprobs": (None,),
    "truncate_prompt_tokens": (None,),
    "include_stop_str_in_output": (None, False),
    "skip_special_tokens": (None, True),
    "spaces_between_special_tokens": (None, True),
    "add_special_tokens": (None,),
    "guided_json": (None,),
    "guided_regex": (None,),
    "guided_choice": (None,),
    "guided_grammar": (None,),
    "guided_decoding_backend": (None,),
    "structured_outputs": (None,),
    # the server renders chats with the model's own template (a request's template would run on the server)
    "chat_template": (None,),
    "chat_template_kwargs": (None, {}),
    "add_generation_prompt": (None, True),
    "continue_final_message": (None, False),
    "documents": (None,),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "web_search_options": (None,),
    "verbosity": (None,),
    # SGLang's sampling extras: vLLM's router (and SGLang's) re-serialize every request with these at their
    # defaults, which are this server's behaviour (stop strings trimmed, no hidden states; the reasoning
    # flags do nothing on a server without a reasoning parser, as in SGLang)
    "no_stop_trim": (None, False),
    "return_hidden_states": (None, False),
    "include_reasoning": (None, True),
    "separate_reasoning": (None, True, False),
    "stream_reasoning": (None, True, False),
}
#: Fields accepted and ignored: they cannot change the output (OpenAI's bookkeeping and routing fields).
IGNORED = frozenset({"user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key",
                     "parallel_tool_calls"})
_COMMON = frozenset({"model", "n", "stream", "stream_options", "return_token_ids", "temperature", "top_p", "top_k",
                     "seed", "stop", "stop_token_ids", "ignore_eos"})
#: The fields each endpoint implements.
IMPLEMENTED = {"completions": _COMMON | {"prompt", "max_tokens"},
               "chat": _COMMON | {"messages", "max_tokens", "max_completion_tokens"}}


def clip(value: Any, limit: int = ECHO_CHARS) -> str:
    """``repr(value)`` cut to ``limit`` characters (saying how long it was), for error messages."""
    if isinstance(value, (str, bytes, list, tuple, dict)) and len(value) > limit:
        text = repr(value[:limit] if not isinstance(value, dict) else dict(list(value.items())[:8]))
        return f"{text[:limit]}... ({len(value)} {'characters' if isinstance(value, str) else 'items'})"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def cut(text: str, limit: int = ECHO_CHARS) -> str:
    """``text`` cut to ``limit`` characters (saying how long it was), for messages that quote another."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def check_text(value: str, param: str) -> str:
    """``value`` if it is valid Unicode text (encodable as UTF-8), else a 400 naming ``param`` and the position."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise bad(param, f"'{param}' is not valid Unicode text: a lone surrogate U+{ord(value[error.start]):04X} "
                         f"at character {error.start}") from None
    return value


class ApiError(Exception):
    """An error answered with ``status`` and OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.kind = kind or {400: "invalid_request_error", 404: "not_found_error", 500: "internal_error",
                             503: "server_overloaded"}.get(status, "error")
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}


def bad(param: str, message: str) -> ApiError:
    return ApiError(400, message, param)


@dataclass(frozen=True)
class SamplingFields:
    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: tuple[str, ...]
    stop_token_ids: tuple[int, ...]
    ignore_eos: bool


@dataclass(frozen=True)
class CompletionRequest:
    model: str | None
    #: one entry per prompt: a string or a list of token ids
    prompts: tuple[str | tuple[int, ...], ...]
    #: chat: the conversation (prompts is then empty)
    messages: tuple[dict[str, str], ...] | None
    sampling: SamplingFields
    stream: bool
    include_usage: bool
    #: vLLM's extension: each choice (each streamed chunk) also carries its new output token ids
    return_token_ids: bool = False


def parse_json(body: bytes) -> dict[str, Any]:
    if not body:
        raise bad("body", "the request body is empty; send a JSON object")
    try:
        value = json.loads(body)
    except (ValueError, RecursionError) as error:  # not JSON, not UTF-8, an integer of > 4300 digits, too deep
        raise bad("body", f"the request body is not valid JSON: {cut(str(error))}") from None
    if not isinstance(value, dict):
        raise bad("body", f"the request body must be a JSON object, got {type(value).__name__}")
    return value


def _type_name(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object",
            type(None): "null"}.get(type(value), type(value).__name__)


def _int(body: dict, name: str, default: int | None, minimum: int | None = None,
         maximum: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(name, f"'{name}' must be an integer, got {_type_name(value)} {clip(value)}")
    if minimum is not None and value < minimum:
        raise bad(name, f"'{name}' must be >= {minimum}, got {clip(value)}")
    if maximum is not None and value > maximum:
        raise bad(name, f"'{name}' must be <= {maximum}, got {clip(value)}")
    return value


def _number(body: dict, name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad(name, f"'{name}' must be a number, got {_type_name(value)} {clip(value)}")
    if not math.isfinite(value):
        raise bad(name, f"'{name}' must be finite, got {value!r}")
    return float(value)


def _bool(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(name, f"'{name}' must be a boolean, got {_type_name(value)} {clip(value)}")
    return value


def _sampling(body: dict, max_tokens_names: tuple[str, ...], default_max_tokens: int | None) -> SamplingFields:
    max_tokens = default_max_tokens
    for name in max_tokens_names:  # chat: max_completion_tokens (new name) wins over max_tokens
        if body.get(name) is not None:
            max_tokens = _int(body, name, None, minimum=1)
            break
    temperature = _number(body, "temperature", 1.0)
    if temperature < 0:
        raise bad("temperature", f"'temperature' must be >= 0 (0 is greedy), got {temperature!r}")
    if 0 < temperature < MIN_TEMPERATURE:
        raise bad("temperature", f"'temperature' must be 0 (greedy) or >= {MIN_TEMPERATURE}, got {temperature!r}")
    top_p = _number(body, "top_p", 1.0)
    if not 0 < top_p <= 1:
        raise bad("top_p", f"'top_p' must be in (0, 1], got {top_p!r}")
    top_k = _int(body, "top_k", -1, minimum=-1)
    if top_k == 0:
        top_k = -1  # 0 and -1 both mean "off" (vLLM's convention)
    seed = _int(body, "seed", None, minimum=0, maximum=MAX_SEED)
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stop = tuple(stop)
    else:
        raise bad("stop", f"'stop' must be a string or an array of strings, got {_type_name(stop)} {clip(stop)}")
    if len(stop) > MAX_STOP_STRINGS:
        raise bad("stop", f"'stop' has {len(stop)} strings; at most {MAX_STOP_STRINGS} are allowed")
    if any(not s for s in stop):
        raise bad("stop", "'stop' strings must not be empty")
    for index, text in enumerate(stop):
        check_text(text, "stop" if len(stop) == 1 else f"stop[{index}]")
    stop_token_ids = body.get("stop_token_ids")
    if stop_token_ids is None:
        stop_token_ids = ()
    elif isinstance(stop_token_ids, list) and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                  for t in stop_token_ids):
        stop_token_ids = tuple(stop_token_ids)
    else:
        raise bad("stop_token_ids", f"'stop_token_ids' must be an array of token ids (integers >= 0), got "
                                    f"{clip(stop_token_ids)}")
    return SamplingFields(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                          stop=stop, stop_token_ids=stop_token_ids, ignore_eos=_bool(body, "ignore_eos", False))


def _check_fields(body: dict, endpoint: str) -> None:
    implemented = IMPLEMENTED[endpoint]
    for name in body:
        if name not in implemented and name not in UNSUPPORTED and name not in IGNORED:
            raise bad(str(name)[:ECHO_CHARS], f"unknown field {clip(name)}: this server implements "
                                              f"{sorted(implemented)} (and ignores {sorted(IGNORED)})")


def _common(body: dict, endpoint: str) -> tuple[str | None, bool, bool, bool]:
    _check_fields(body, endpoint)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("model", f"'model' must be a string, got {_type_name(model)} {clip(model)}")
    n = _int(body, "n", 1)
    if n != 1:
        raise bad("n", f"'n' must be 1 (one choice per prompt is supported), got {clip(n)}")
    for name, allowed in UNSUPPORTED.items():
        if name in body and body[name] not in allowed:
            raise bad(name, f"'{name}' is not supported by this server (allowed: {list(allowed)}), got "
                            f"{clip(body[name])}")
    stream = _bool(body, "stream", False)
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise bad("stream_options", f"'stream_options' must be an object, got {_type_name(options)}")
        if not stream:
            raise bad("stream_options", "'stream_options' is only allowed with 'stream': true")
        include_usage = _bool(options, "include_usage", False)
    return model, stream, include_usage, _bool(body, "return_token_ids", False)


def _token_list(value: list, param: str) -> tuple[int, ...]:
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise bad(param, f"'{param}' must be a string, an array of strings, an array of token ids, or an "
                         f"array of arrays of token ids")
    return tuple(value)


def parse_completion(body: dict) -> CompletionRequest:
    model, stream, include_usage, token_ids = _common(body, "completions")
    if "prompt" not in body or body["prompt"] is None:
        raise bad("prompt", "'prompt' is required")
    prompt = body["prompt"]
    if isinstance(prompt, str):
        prompts: tuple = (prompt,)
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = tuple(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
        prompts = tuple(_token_list(p, f"prompt[{i}]") for i, p in enumerate(prompt))
    elif isinstance(prompt, list):
        prompts = (_token_list(prompt, "prompt"),)
    else:
        raise bad("prompt", f"'prompt' must be a string, an array of strings, an array of token ids, or an "
                            f"array of arrays of token ids; got {_type_name(prompt)}")
    for index, one in enumerate(prompts):
        name = "prompt" if len(prompts) == 1 else f"prompt[{index}]"
        if len(one) == 0:
            raise bad(name, f"'{name}' is empty; give at least one character or token")
        if isinstance(one, str):
            check_text(one, name)
    return CompletionRequest(model=model, prompts=prompts, messages=None,
                             sampling=_sampling(body, ("max_tokens",), 16), stream=stream,
                             include_usage=include_usage, return_token_ids=token_ids)


def parse_chat(body: dict) -> CompletionRequest:
    model, stream, include_usage, token_ids = _common(body, "chat")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", f"'messages' must be a non-empty array of {{role, content}} objects, got "
                              f"{_type_name(messages)}")
    parsed = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise bad(where, f"'{where}' must be an object with 'role' and 'content', got {_type_name(message)}")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role:
            raise bad(f"{where}.role", f"'{where}.role' must be a non-empty string, got {clip(role)}")
        check_text(role, f"{where}.role")
        if isinstance(content, list):  # content parts: only text is supported
            texts = []
            for part_index, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise bad(f"{where}.content[{part_index}]", f"'{where}.content[{part_index}]' must be "
                                                                f"{{'type': 'text', 'text': ...}} (only text)")
                texts.append(check_text(part["text"], f"{where}.content[{part_index}].text"))
            content = "".join(texts)
        elif content is None:
            content = ""
        if not isinstance(content, str):
            raise bad(f"{where}.content", f"'{where}.content' must be a string or an array of text parts, got "
                                          f"{_type_name(content)}")
        check_text(content, f"{where}.content")
        parsed.append({"role": role, "content": content})
    return CompletionRequest(model=model, prompts=(), messages=tuple(parsed),
                             sampling=_sampling(body, ("max_completion_tokens", "max_tokens"), None),
                             stream=stream, include_usage=include_usage, return_token_ids=token_ids)
