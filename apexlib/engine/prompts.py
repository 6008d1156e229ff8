"""Prompt validation shared by every engine (``LLMEngine``, the simulator's ``VirtualEngine``): a prompt as
text, ``{"prompt_token_ids": [...]}`` or a list of ids becomes checked token ids, or a ValueError that
names the field and the limit. Torch-free.
"""

from __future__ import annotations

import operator
from typing import Any

from apexlib.core.config import ModelConfig

PromptType = str | dict[str, Any] | list[int]


def prompt_token_ids(prompt: PromptType, model: ModelConfig, max_model_len: int,
                     tokenizer: Any = None) -> tuple[list[int], str | None]:
    """The prompt's token ids (and its text when given as a string), each checked against the vocabulary,
    and the whole against ``max_model_len`` (the prompt plus one generated token must fit)."""
    vocab_size = model.vocab_size
    text = None
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("prompt is empty")
        if tokenizer is None:
            raise ValueError(f"prompt is a string but the checkpoint at {model.path} has no "
                             f"tokenizer; pass {{'prompt_token_ids': [...]}}")
        text = prompt
        token_ids = list(tokenizer(prompt)["input_ids"])
    elif isinstance(prompt, dict):
        if "prompt_token_ids" not in prompt:
            raise ValueError(f"prompt dict needs the field 'prompt_token_ids', got fields {sorted(prompt)}")
        token_ids = _as_token_list(prompt["prompt_token_ids"], "prompt_token_ids")
        text = prompt.get("prompt")
    elif isinstance(prompt, (list, tuple)) or hasattr(prompt, "tolist"):
        token_ids = _as_token_list(prompt, "prompt")
    else:
        raise ValueError(f"prompt must be a string or {{'prompt_token_ids': [...]}}, got {type(prompt).__name__}")
    if not token_ids:
        raise ValueError("prompt is empty (prompt_token_ids has no tokens)")
    token_ids = [_token_id(token, index, vocab_size) for index, token in enumerate(token_ids)]
    if len(token_ids) >= max_model_len:
        raise ValueError(f"prompt has {len(token_ids)} tokens; max_model_len is {max_model_len} (the prompt "
                         f"plus at least one generated token must fit)")
    return token_ids, text


def _token_id(token: Any, index: int, vocab_size: int) -> int:
    """A prompt token id as an int (numpy/torch integer scalars included), checked against the vocabulary."""
    if isinstance(token, bool) or type(token).__name__ in ("bool_", "bool"):
        raise ValueError(f"prompt_token_ids[{index}]={token!r} is a bool, not a token id")
    try:
        value = operator.index(token)
    except TypeError:
        raise ValueError(f"prompt_token_ids[{index}]={token!r} is not an integer token id "
                         f"(got {type(token).__name__})") from None
    if not 0 <= value < vocab_size:
        raise ValueError(f"prompt_token_ids[{index}]={value!r} is outside the vocabulary [0, {vocab_size})")
    return value


def _as_token_list(value: Any, field_name: str) -> list[Any]:
    """A list of token ids from a list, tuple, or a 1-D numpy array / torch tensor."""
    if hasattr(value, "tolist") and not isinstance(value, (list, tuple)):
        if getattr(value, "ndim", 1) != 1:
            raise ValueError(f"{field_name} must be one-dimensional, got shape {tuple(value.shape)}")
        value = value.tolist()
    if isinstance(value, (str, bytes, dict)):
        raise ValueError(f"{field_name} must be a list of token ids, got {type(value).__name__}")
    try:
        return list(value)
    except TypeError:
        raise ValueError(f"{field_name} must be a list of token ids, got {type(value).__name__}") from None
