"""A GGUF file turned into a Hugging Face safetensors checkpoint that :mod:`apexlib.model.weights` loads.

transformers reads GGUF (``from_pretrained(directory, gguf_file=...)``, with the ``gguf`` package): it
maps GGUF's tensor names back to Hugging Face's, undoes llama.cpp's Q/K row permutation, dequantizes
every block (Q4_1 here) to float and rebuilds a fast tokenizer, with its chat template, from the GGUF
metadata. This module runs that loader once and writes what a checkpoint directory needs:

``model.safetensors``
    every tensor of the model's ``state_dict`` in the requested dtype. With tied embeddings there is no
    ``lm_head.weight`` (the loader reuses ``model.embed_tokens.weight``).
``tokenizer.json``, ``tokenizer_config.json``, ``chat_template.jinja`` (where the GGUF has a template)
    written by the tokenizer's own ``save_pretrained``.

``config.json`` is not written here: the caller knows the model's shape and writes it (the values a GGUF
round-trips through float32, such as ``rms_norm_eps``, would otherwise differ from the published
config). :func:`read_gguf_config` returns what transformers read, so the caller can check it.

The weights are the quantized model's values, not the original checkpoint's.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: Extra packages transformers' GGUF loader needs (besides torch and transformers).
GGUF_REQUIREMENTS = ("gguf", "accelerate")


def _require_gguf_packages() -> None:
    import importlib.util

    missing = [name for name in GGUF_REQUIREMENTS if importlib.util.find_spec(name) is None]
    if missing:
        raise ModuleNotFoundError(
            f"reading a GGUF file needs the packages {', '.join(missing)} (pinned in requirements/base.txt; "
            f"`make setup` installs them)")


def dequantize_gguf(gguf_file: Path, out_dir: Path, dtype: str = "float32") -> dict[str, Any]:
    """Write ``gguf_file``'s weights (dequantized to ``dtype``) and tokenizer into ``out_dir``.

    Returns the model config transformers read from the GGUF metadata (a plain dict), for the caller to
    check against the shape it expects.
    """
    _require_gguf_packages()
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if torch_dtype is None:
        raise ValueError(f"dtype {dtype!r}: expected one of float32, bfloat16, float16")
    gguf_file = Path(gguf_file)
    out_dir.mkdir(parents=True, exist_ok=True)
    logger.info("dequantizing %s to %s (transformers' GGUF loader)", gguf_file.name, dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                                 dtype=torch.float32)
    config = model.config.to_dict()
    state = model.state_dict()
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    tensors = {name: tensor.detach().to(torch_dtype).contiguous() for name, tensor in state.items()}
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(str(out_dir))
    # transformers writes its own config.json next to the tokenizer in some versions: the caller owns it.
    (out_dir / "config.json").unlink(missing_ok=True)
    del model, state, tensors
    return config


def read_gguf_config(config: dict[str, Any]) -> dict[str, Any]:
    """The shape fields of a transformers config dict, named as :data:`apexlib.core.models.MODEL_SHAPES` does."""
    rope = config.get("rope_parameters") or {}
    return dict(
        vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"], num_layers=config["num_hidden_layers"],
        num_heads=config["num_attention_heads"],
        num_kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
        head_dim=config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"],
        max_position_embeddings=config["max_position_embeddings"], rms_norm_eps=config["rms_norm_eps"],
        rope_theta=rope.get("rope_theta", config.get("rope_theta")),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
    )
