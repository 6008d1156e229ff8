"""Known model shapes (no checkpoint needed) and the one resolver of a model argument to a ``ModelConfig``.

A model is named by a shape (``llama-2-7b``, ``llama-3.1-8b``, ``smollm2``, ``tiny-demo``), by ``shape:<name>``
(the ``path`` such a ``ModelConfig`` carries), or by a checkpoint directory (its ``config.json``).
``tiny-demo`` is the shape of the tiny ``demo`` checkpoint (``apexlib.model.tiny``): the engine takes the
checkpoint by its preset name, the simulator its shape (the rows of simulated runs name it
``shape:tiny-demo``). ``smollm2`` names both: the shape here and the real checkpoint the engine builds
from it (``apexlib.model.catalog``). Torch-free: the simulator and the cost models read it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from apexlib.core.config import ModelConfig

#: Real-model shapes (no checkpoint needed): ``model_config_for_shape(name)``. Values from the models'
#: Hugging Face ``config.json`` (meta-llama/Llama-2-7b-hf, meta-llama/Llama-3.1-8B) and, for
#: ``tiny-demo``, from ``apexlib.model.tiny.TINY_PRESETS["demo"]``.
MODEL_SHAPES: dict[str, dict[str, Any]] = {
    "llama-2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                       num_kv_heads=32, head_dim=128, max_position_embeddings=4096, rms_norm_eps=1e-5,
                       rope_theta=10000.0, rope_scaling=None, tie_word_embeddings=False, checkpoint_dtype="float16",
                       bos_token_id=1, eos_token_ids=(2,)),
    "llama-3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                         num_kv_heads=8, head_dim=128, max_position_embeddings=131072, rms_norm_eps=1e-5,
                         rope_theta=500000.0,
                         rope_scaling=(("factor", 8.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
                                       ("original_max_position_embeddings", 8192), ("rope_type", "llama3")),
                         tie_word_embeddings=False, checkpoint_dtype="bfloat16", bos_token_id=128000,
                         eos_token_ids=(128001, 128008, 128009)),
    "tiny-demo": dict(vocab_size=1024, hidden_size=256, intermediate_size=688, num_layers=4, num_heads=8,
                      num_kv_heads=2, head_dim=32, max_position_embeddings=2048, rms_norm_eps=1e-5,
                      rope_theta=10000.0, rope_scaling=None, tie_word_embeddings=False, checkpoint_dtype="float32",
                      bos_token_id=1, eos_token_ids=(2,)),
    # HuggingFaceTB/SmolLM2-135M-Instruct's config.json; the ``smollm2`` checkpoint
    # (``apexlib.model.catalog``) is built from its Q4_1 GGUF, checked against and described by this entry.
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                    num_kv_heads=3, head_dim=64, max_position_embeddings=8192, rms_norm_eps=1e-5,
                    rope_theta=100000.0, rope_scaling=None, tie_word_embeddings=True, checkpoint_dtype="float32",
                    bos_token_id=1, eos_token_ids=(2,)),
}
SHAPE_PATH_PREFIX = "shape:"


def model_config_for_shape(name: str) -> ModelConfig:
    """A ``ModelConfig`` of a known model shape (:data:`MODEL_SHAPES`), without a checkpoint.

    Its ``path`` is ``"shape:<name>"``; its special ids are the model's bos/eos (plus LLaMA's
    ``0, 1, 2`` and the tiny models' pad ``3`` where they apply).
    """
    key = name.lower()
    if key not in MODEL_SHAPES:
        raise ValueError(f"unknown model shape {name!r}; known: {sorted(MODEL_SHAPES)} (or a checkpoint directory)")
    return ModelConfig(path=SHAPE_PATH_PREFIX + key, **MODEL_SHAPES[key])


def resolve_model_config(model: ModelConfig | str | Path) -> ModelConfig:
    """A ``ModelConfig``: given, a shape name (:data:`MODEL_SHAPES`), or a checkpoint directory."""
    if isinstance(model, ModelConfig):
        return model
    name = str(model)
    if name.lower() in MODEL_SHAPES:
        return model_config_for_shape(name)
    if name.startswith(SHAPE_PATH_PREFIX):
        return model_config_for_shape(name[len(SHAPE_PATH_PREFIX):])
    return ModelConfig.from_pretrained(name)


def special_token_ids(model_path: str | Path, vocab_size: int) -> tuple[int, ...]:
    """Ids a benchmark prompt must not contain: the tokenizer's special tokens and bos/eos/pad.

    Read from ``tokenizer.json`` (``added_tokens`` marked special) and ``config.json``; without a
    tokenizer, LLaMA's ``(0, 1, 2)`` plus the config's ids.
    """
    directory = Path(model_path)
    ids: set[int] = set()
    tokenizer_file = directory / "tokenizer.json"
    if tokenizer_file.is_file():
        tokenizer = json.loads(tokenizer_file.read_text(encoding="utf-8"))
        ids.update(int(token["id"]) for token in tokenizer.get("added_tokens", []) if token.get("special"))
    else:
        ids.update((0, 1, 2))
    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = config.get(key)
        for token in value if isinstance(value, list) else [value]:
            if isinstance(token, int):
                ids.add(token)
    return tuple(sorted(token for token in ids if 0 <= token < vocab_size))
