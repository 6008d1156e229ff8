"""Chat messages -> prompt text: the tokenizer's own chat template, or a simple one of ours.

A checkpoint whose tokenizer carries a chat template (``tokenizer.chat_template``) is rendered with it
(with the generation prompt for the assistant's turn); the template writes its own special tokens, so
the text is then tokenized without adding any. A tokenizer without one (the tiny checkpoints) gets
:data:`SIMPLE_TEMPLATE`: one ``role: content`` line per message and ``assistant:`` to answer, tokenized
with the tokenizer's usual special tokens (the BOS token).
"""

from __future__ import annotations

from typing import Any

SIMPLE_TEMPLATE = "{role}: {content}\n"
SIMPLE_GENERATION_PROMPT = "assistant:"


def render_chat(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, bool]:
    """(prompt text, whether tokenizing it should add the tokenizer's special tokens)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text, False
    text = "".join(SIMPLE_TEMPLATE.format(role=m["role"], content=m["content"]) for m in messages)
    return text + SIMPLE_GENERATION_PROMPT, True
