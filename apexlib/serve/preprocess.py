"""Request bodies -> token ids, off the event loop: JSON parsing of large bodies, the chat template and
tokenization run in one worker thread (as vLLM's front end does), so ``/health`` and the open streams keep
their latency while a large prompt is handled. One thread, because a Hugging Face fast tokenizer must not
be used from two threads at once; the Rust tokenizer releases the GIL while it encodes.

A text prompt is bounded before it is tokenized: no token of the vocabulary stands for more than
``max_token_chars`` characters (its longest token string: byte-level BPE writes one character per byte,
SentencePiece one per character or more), so a prompt longer than ``max_model_len * max_token_chars``
characters has more than ``max_model_len`` tokens and is refused at once. (A tokenizer whose normalizer
deletes characters would break that bound; the byte-level BPE and SentencePiece tokenizers of the supported
models do not.)

Errors are the client's: a text the tokenizer cannot encode, or a chat the template refuses, is a 400 naming
the field.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from apexlib.serve.chat import render_chat
from apexlib.serve.protocol import bad, clip, cut

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Bodies up to this size are parsed on the event loop (a thread hand-off costs more than parsing them).
INLINE_PARSE_BYTES = 64 * 1024


def max_token_chars(tokenizer: Any) -> int:
    """The most characters any token of ``tokenizer`` stands for (its longest token string, added tokens
    included)."""
    vocab = tokenizer.get_vocab()
    longest = max((len(token) for token in vocab), default=1)
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    longest = max([longest] + [len(str(getattr(token, "content", token))) for token in added.values()])
    return max(1, longest)


class Preprocessor:
    """Parsing, chat rendering and tokenization for one server; ``close()`` stops its thread."""

    def __init__(self, tokenizer: Any, max_model_len: int, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.max_token_chars = max_token_chars(tokenizer) if tokenizer is not None else 0
        #: text prompts longer than this (in characters) cannot fit max_model_len
        self.max_prompt_chars = max_model_len * self.max_token_chars
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="apex-tokenizer")

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def run(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, function, *args)

    async def parse(self, body: bytes, parse: Callable[[bytes], T]) -> T:
        """``parse(body)``, in the worker thread when the body is large."""
        if len(body) <= INLINE_PARSE_BYTES:
            return parse(body)
        return await self.run(parse, body)

    def check_chars(self, length: int, param: str) -> None:
        if self.tokenizer is not None and length > self.max_prompt_chars:
            raise bad(param, f"'{param}' has {length} characters: at most {self.max_token_chars} characters per "
                             f"token of this tokenizer, that is more than max_model_len = {self.max_model_len} "
                             f"tokens (at most {self.max_prompt_chars} characters can fit)")

    async def encode(self, prompt: str | Sequence[int], param: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``prompt`` (text or ids), checked against the vocabulary and ``max_model_len``."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise bad(param, f"'{param}' is text but the model has no tokenizer; send token ids")
            self.check_chars(len(prompt), param)
            ids = await self.run(self._encode, prompt, param, add_special_tokens)
            if not ids:
                raise bad(param, f"'{param}' encodes to no tokens")
        else:
            ids = list(prompt)
            if len(ids) < self.max_model_len:
                for position, token in enumerate(ids):
                    if not 0 <= token < self.vocab_size:
                        raise bad(param, f"'{param}[{position}]' = {clip(token)} is outside the vocabulary [0, "
                                         f"{self.vocab_size})")
        if len(ids) >= self.max_model_len:
            raise bad(param, f"'{param}' has {len(ids)} tokens; max_model_len is {self.max_model_len} (the "
                             f"prompt plus at least one generated token must fit)")
        return ids

    def _encode(self, text: str, param: str, add_special_tokens: bool) -> list[int]:
        try:
            return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
        except Exception as error:  # the text is the client's: say so, with the tokenizer's reason
            raise bad(param, f"'{param}' could not be tokenized: {type(error).__name__}: "
                             f"{cut(str(error))}") from None

    async def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a chat rendered with the model's template."""
        if self.tokenizer is None:
            raise bad("messages", "the model has no tokenizer: chat needs one (use /v1/completions with token ids)")
        self.check_chars(sum(len(m["content"]) for m in messages), "messages")
        text, add_special = await self.run(self._render, messages)
        return await self.encode(text, "messages", add_special_tokens=add_special)

    def _render(self, messages: list[dict[str, str]]) -> tuple[str, bool]:
        try:
            return render_chat(self.tokenizer, messages)
        except Exception as error:  # e.g. a template that requires alternating roles (jinja2's TemplateError)
            raise bad("messages", f"the model's chat template refused 'messages': {type(error).__name__}: "
                                  f"{cut(str(error))}") from None
