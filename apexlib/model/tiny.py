"""Deterministic tiny LLaMA checkpoints and an offline-trained tokenizer.

Size: one concern, a checkpoint on disk byte-identical on every machine (config, weights, tokenizer,
the cache that reuses it and the random 7B-shape writer); its pieces only make sense together.

Tests, examples and the notebooks' embedded demo need a real Hugging Face checkpoint that is
small, built offline, and identical on every machine. :func:`build_tiny_checkpoint` writes one:

``config.json``
    a ``LlamaForCausalLM`` config. RoPE is written the way Meta's hub checkpoints write it
    (top-level ``rope_theta`` plus a legacy ``rope_scaling`` dict, ``null`` when unscaled) and
    the dtype as ``torch_dtype``; transformers 5 maps these onto ``rope_parameters`` / ``dtype``.
``model.safetensors`` (or ``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json``)
    fp32 (or the spec's dtype) weights. With tied embeddings there is **no** ``lm_head.weight``
    tensor in the files (as in Llama-3.2-1B); loaders must reuse ``model.embed_tokens.weight``.
``generation_config.json``
    bos / eos / pad ids.
``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``
    a byte-level BPE trained with ``tokenizers`` on the embedded corpus
    (:mod:`apexlib.model.tiny_corpus`). Ids: ``<unk>`` = 0, ``<s>`` = 1, ``</s>`` = 2,
    ``<pad>`` = 3; the post-processor prepends ``<s>`` like LLaMA. If the corpus cannot supply
    enough merges for ``vocab_size``, the rest is filled with ``<|reserved_i|>`` special tokens.

Every byte is a function of (spec, seed, shards, code version): JSON is written with sorted keys,
safetensors headers are sorted by the library, weights come from a seeded CPU
``torch.Generator`` and nothing records a time or a path. Files are written into a temporary
sibling directory that is renamed into place, so a reader never sees half a checkpoint.

Weight initialisation is chosen for *robust greedy decoding*, not for realism: the usual
``std=0.02`` init gives near-uniform logits whose near-ties flip argmax between kernels that sum
in different orders. Here embeddings have unit scale, every projection is scaled by
``1/sqrt(fan_in)`` (so each sublayer adds O(1) to the residual stream and the prompt matters),
and the output head is scaled so the logits have standard deviation ``logit_std`` (8 by default):
the top-1 / top-2 gap is then typically a few units, far above fp32 rounding. Rows of the output
head that belong to special tokens are scaled down, so greedy and sampled generation practically
never emit ``</s>`` and always run to ``max_new_tokens``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import types
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from apexlib.model.tiny_corpus import CORPUS_PARAGRAPHS

logger = logging.getLogger(__name__)

#: Bump when anything that changes the bytes of a built checkpoint changes (invalidates caches).
TINY_CODE_VERSION = "1"

SPECIAL_TOKENS: tuple[str, ...] = ("<unk>", "<s>", "</s>", "<pad>")
UNK_TOKEN_ID, BOS_TOKEN_ID, EOS_TOKEN_ID, PAD_TOKEN_ID = 0, 1, 2, 3
_NUM_BYTE_TOKENS = 256

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
_LLAMA3_ROPE_KEYS = frozenset(
    {"rope_type", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
)


@dataclass(frozen=True)
class TinyModelSpec:
    """Shapes and initialisation of a tiny LLaMA model.

    ``head_dim`` is ``hidden_size // num_attention_heads`` and must be a multiple of 16 (the CPU
    attention kernel requires it). ``rope_scaling`` is ``None`` or a llama3 dict (stored
    read-only). The last four fields only shape the random initialisation (see the module doc).
    """

    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vocab_size: int = 512
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
    rope_scaling: Mapping[str, Any] | None = None
    tie_word_embeddings: bool = False
    dtype: str = "float32"
    rms_norm_eps: float = 1e-5
    #: gain of the fan-in scaled projections: std = init_std / sqrt(fan_in)
    init_std: float = 1.0
    #: std of the token embeddings
    embedding_std: float = 1.0
    #: target std of the output logits (controls the top-1 / top-2 gap)
    logit_std: float = 8.0
    #: RMSNorm weights are 1 + norm_jitter * N(0, 1), so a forgotten norm weight shows up
    norm_jitter: float = 0.1
    #: scale of the output-head rows of special tokens (keeps </s> from being generated)
    special_token_logit_scale: float = 0.1
    #: free-form label, part of the cache key only through the other fields
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        positive = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "vocab_size", "max_position_embeddings")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be divisible by num_attention_heads")
        if self.head_dim % 16:
            raise ValueError(f"head_dim must be a multiple of 16, got {self.head_dim}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.vocab_size < _NUM_BYTE_TOKENS + len(SPECIAL_TOKENS):
            raise ValueError(f"vocab_size must be >= {_NUM_BYTE_TOKENS + len(SPECIAL_TOKENS)}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.rope_theta <= 0:
            raise ValueError("rope_theta must be positive")
        if self.rope_scaling is not None:
            scaling = dict(self.rope_scaling)
            if scaling.get("rope_type") != "llama3" or set(scaling) != _LLAMA3_ROPE_KEYS:
                raise ValueError(f"rope_scaling must be None or a llama3 dict with keys "
                                 f"{sorted(_LLAMA3_ROPE_KEYS)}, got {scaling!r}")
            object.__setattr__(self, "rope_scaling", types.MappingProxyType(scaling))

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    @property
    def head_dim(self) -> int:
        """Per-head dimension (``hidden_size // num_attention_heads``)."""
        return self.hidden_size // self.num_attention_heads

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype the weights are stored in."""
        return _DTYPES[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON view of every field that changes the checkpoint (``name`` excluded)."""
        out: dict[str, Any] = {}
        for spec_field in fields(self):
            if spec_field.name == "name":
                continue
            value = getattr(self, spec_field.name)
            out[spec_field.name] = dict(value) if isinstance(value, Mapping) else value
        return out

    def num_parameters(self) -> int:
        """Number of distinct parameters (tied embeddings counted once)."""
        hidden, kv_dim = self.hidden_size, self.num_key_value_heads * self.head_dim
        attention = 2 * hidden * hidden + 2 * hidden * kv_dim
        mlp = 3 * hidden * self.intermediate_size
        per_layer = attention + mlp + 2 * hidden
        embeddings = self.vocab_size * hidden * (1 if self.tie_word_embeddings else 2)
        return embeddings + self.num_hidden_layers * per_layer + hidden

    def to_hf_config(self) -> dict[str, Any]:
        """The ``config.json`` contents (hub-style keys; see the module docstring)."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": BOS_TOKEN_ID,
            "eos_token_id": EOS_TOKEN_ID,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "mlp_bias": False,
            "model_type": "llama",
            "num_attention_heads": self.num_attention_heads,
            "num_hidden_layers": self.num_hidden_layers,
            "num_key_value_heads": self.num_key_value_heads,
            "pad_token_id": PAD_TOKEN_ID,
            "pretraining_tp": 1,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_scaling": None if self.rope_scaling is None else dict(self.rope_scaling),
            "rope_theta": float(self.rope_theta),
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": self.dtype,
            "use_cache": True,
            "vocab_size": self.vocab_size,
        }


_TEST_LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}

TINY_PRESETS: dict[str, TinyModelSpec] = {
    # multi-head attention, smallest shapes
    "mha": TinyModelSpec(hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, name="mha"),
    # grouped-query attention: 4 query heads share 2 KV heads
    "gqa": TinyModelSpec(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, name="gqa"),
    # GQA + llama3 RoPE scaling; original_max_position_embeddings=64 so that, with head_dim 32,
    # low frequencies are divided by 8, high ones kept and the middle band interpolated
    "llama3": TinyModelSpec(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0,
                            rope_scaling=_TEST_LLAMA3_SCALING, name="llama3"),
    # tied input / output embeddings (no lm_head.weight in the files)
    "tied": TinyModelSpec(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True,
                          name="tied"),
    # the notebooks' embedded default: big enough that CPU benchmarks show batching effects
    "demo": TinyModelSpec(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                          num_attention_heads=8, num_key_value_heads=2, vocab_size=1024,
                          max_position_embeddings=2048, name="demo"),
    # the end-to-end CPU comparison (apex bench e2e): hidden 512, 4 layers, 8 query / 2 KV heads
    "bench512": TinyModelSpec(hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                              num_attention_heads=8, num_key_value_heads=2, vocab_size=1024,
                              max_position_embeddings=2048, name="bench512"),
}


def resolve_spec(preset: str | TinyModelSpec) -> TinyModelSpec:
    """Return the spec for a preset name (or the spec itself)."""
    if isinstance(preset, TinyModelSpec):
        return preset
    try:
        return TINY_PRESETS[preset]
    except KeyError:
        raise ValueError(f"unknown tiny preset {preset!r}; choose from {sorted(TINY_PRESETS)}") from None


# ----------------------------------------------------------------------------------------------
# tokenizer
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def tiny_tokenizer_json(vocab_size: int) -> str:
    """Train the byte-level BPE on the embedded corpus; return its ``tokenizer.json`` text.

    Deterministic: the same ``vocab_size`` gives the same string in every process.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=0,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS_PARAGRAPHS, trainer=trainer)
    trained = tokenizer.get_vocab_size(with_added_tokens=True)
    if trained < vocab_size:
        logger.info("corpus gives %d tokens; padding to %d with reserved special tokens", trained, vocab_size)
        tokenizer.add_special_tokens(
            [AddedToken(f"<|reserved_{index}|>", special=True, normalized=False)
             for index in range(vocab_size - trained)]
        )
    if tokenizer.get_vocab_size(with_added_tokens=True) != vocab_size:
        raise RuntimeError(f"tokenizer has {tokenizer.get_vocab_size()} tokens, wanted {vocab_size}")
    for token_id, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.token_to_id(token) != token_id:
            raise RuntimeError(f"special token {token} got id {tokenizer.token_to_id(token)}")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A",
        pair="<s> $A <s> $B",
        special_tokens=[("<s>", BOS_TOKEN_ID)],
    )
    return tokenizer.to_str(pretty=True)


def build_tiny_tokenizer(vocab_size: int = 512) -> Any:
    """A fresh ``tokenizers.Tokenizer`` (see :func:`tiny_tokenizer_json`)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tiny_tokenizer_json(vocab_size))


def _tokenizer_files(spec: TinyModelSpec) -> dict[str, str]:
    special = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    tokenizer_config = {
        **special,
        "clean_up_tokenization_spaces": False,
        "model_max_length": spec.max_position_embeddings,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    return {
        "tokenizer.json": tiny_tokenizer_json(spec.vocab_size),
        "tokenizer_config.json": _json_text(tokenizer_config),
        "special_tokens_map.json": _json_text(special),
    }


# ----------------------------------------------------------------------------------------------
# weights
# ----------------------------------------------------------------------------------------------


def _draw_tensors(spec: TinyModelSpec, generator: torch.Generator,
                  device: torch.device | str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors one at a time, in file order, drawn in fp32 on ``device`` from ``generator``.

    One fixed order of draws (embeddings, each layer, final norm, output head), so a seeded
    generator of one device kind always gives the same values.
    """

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(shape, generator=generator, dtype=torch.float32, device=device) * std

    def projection(out_features: int, in_features: int) -> torch.Tensor:
        return normal(out_features, in_features, std=spec.init_std / math.sqrt(in_features))

    def norm_weight(mean: float = 1.0) -> torch.Tensor:
        return mean * (1.0 + normal(spec.hidden_size, std=spec.norm_jitter))

    hidden, kv_dim = spec.hidden_size, spec.num_key_value_heads * spec.head_dim
    embedding = normal(spec.vocab_size, hidden, std=spec.embedding_std)
    if spec.tie_word_embeddings:
        embedding[: len(SPECIAL_TOKENS)] *= spec.special_token_logit_scale
    yield "model.embed_tokens.weight", embedding
    del embedding
    for layer in range(spec.num_hidden_layers):
        prefix = f"model.layers.{layer}"
        yield f"{prefix}.input_layernorm.weight", norm_weight()
        yield f"{prefix}.self_attn.q_proj.weight", projection(hidden, hidden)
        yield f"{prefix}.self_attn.k_proj.weight", projection(kv_dim, hidden)
        yield f"{prefix}.self_attn.v_proj.weight", projection(kv_dim, hidden)
        yield f"{prefix}.self_attn.o_proj.weight", projection(hidden, hidden)
        yield f"{prefix}.post_attention_layernorm.weight", norm_weight()
        yield f"{prefix}.mlp.gate_proj.weight", projection(spec.intermediate_size, hidden)
        yield f"{prefix}.mlp.up_proj.weight", projection(spec.intermediate_size, hidden)
        yield f"{prefix}.mlp.down_proj.weight", projection(hidden, spec.intermediate_size)
    # logits = lm_head @ (final_norm * rmsnorm(h)); rmsnorm(h) has unit RMS
    if spec.tie_word_embeddings:
        # With lm_head == embed_tokens the residual's own-token component e_t would give token t
        # a logit ~ |e_t|^2 and the model would repeat its input forever. Random signs on the
        # final norm weight make that self term zero-mean, so the layers decide the next token.
        signs = torch.randint(0, 2, (hidden,), generator=generator, dtype=torch.float32, device=device) * 2 - 1
        scale = spec.logit_std / (spec.embedding_std * math.sqrt(hidden))
        yield "model.norm.weight", signs * norm_weight(scale)
    else:
        yield "model.norm.weight", norm_weight()
        lm_head = normal(spec.vocab_size, hidden, std=spec.logit_std / math.sqrt(hidden))
        lm_head[: len(SPECIAL_TOKENS)] *= spec.special_token_logit_scale
        yield "lm_head.weight", lm_head


def init_tiny_state_dict(spec: TinyModelSpec, seed: int = 0) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, in HF ``LlamaForCausalLM`` names (no ``lm_head`` when tied).

    Drawn in fp32 from one seeded CPU generator in a fixed order, then cast to ``spec.dtype``.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return {name: tensor.to(spec.torch_dtype).contiguous() for name, tensor in _draw_tensors(spec, generator)}


def _split_into_shards(tensors: dict[str, torch.Tensor], shards: int) -> list[list[str]]:
    """Split tensor names, in file order, into ``shards`` contiguous groups of similar byte size."""
    names = list(tensors)
    if not 1 <= shards <= len(names):
        raise ValueError(f"shards must be in [1, {len(names)}], got {shards}")
    sizes = [tensors[name].numel() * tensors[name].element_size() for name in names]
    total = sum(sizes)
    groups: list[list[str]] = [[] for _ in range(shards)]
    cumulative = 0
    for index, (name, size) in enumerate(zip(names, sizes, strict=True)):
        shard = min(shards - 1, cumulative * shards // total)
        # leave at least one tensor for each remaining shard
        shard = max(shard, shards - (len(names) - index))
        groups[shard].append(name)
        cumulative += size
    if any(not group for group in groups):
        raise RuntimeError("empty shard; use fewer shards")
    return groups


# ----------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------


def _json_text(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def _write_text_files(directory: Path, spec: TinyModelSpec, with_tokenizer: bool) -> None:
    """config.json, generation_config.json and (optionally) the tokenizer files."""
    directory.mkdir(parents=True, exist_ok=True)
    texts = {
        "config.json": _json_text(spec.to_hf_config()),
        "generation_config.json": _json_text(
            {"bos_token_id": BOS_TOKEN_ID, "eos_token_id": EOS_TOKEN_ID, "pad_token_id": PAD_TOKEN_ID}
        ),
    }
    if with_tokenizer:
        texts.update(_tokenizer_files(spec))
    for filename, text in texts.items():
        (directory / filename).write_text(text, encoding="utf-8")


def _write_checkpoint_files(directory: Path, spec: TinyModelSpec, seed: int, shards: int,
                            with_tokenizer: bool) -> None:
    from safetensors.torch import save_file

    _write_text_files(directory, spec, with_tokenizer)
    tensors = init_tiny_state_dict(spec, seed)
    metadata = {"format": "pt"}
    if shards == 1:
        save_file(tensors, str(directory / "model.safetensors"), metadata=metadata)
        return
    weight_map: dict[str, str] = {}
    for index, names in enumerate(_split_into_shards(tensors, shards), start=1):
        filename = f"model-{index:05d}-of-{shards:05d}.safetensors"
        save_file({name: tensors[name] for name in names}, str(directory / filename), metadata=metadata)
        weight_map.update(dict.fromkeys(names, filename))
    total_size = sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())
    index_json = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(_json_text(index_json), encoding="utf-8")


def _publish_permissions(directory: Path) -> None:
    """World-readable like a normal download (safetensors creates its files 0600)."""
    os.chmod(directory, 0o755)
    for path in directory.iterdir():
        os.chmod(path, 0o644)


def _is_nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def _assemble(out_dir: str | os.PathLike[str], overwrite: bool, write: Callable[[Path], Any]) -> Path:
    """``write(staging)`` into a temporary sibling of ``out_dir``, then rename it into place."""
    out = Path(out_dir)
    if _is_nonempty_dir(out) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(staging)
        _publish_permissions(staging)
        if _is_nonempty_dir(out):  # overwrite: move the old one aside, then swap in the new one
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, trash / "old")
            os.replace(staging, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def build_tiny_checkpoint(
    out_dir: str | os.PathLike[str],
    preset: str | TinyModelSpec = "gqa",
    seed: int = 0,
    with_tokenizer: bool = True,
    *,
    shards: int = 1,
    overwrite: bool = False,
) -> Path:
    """Write a tiny LLaMA checkpoint directory and return its path.

    The directory is assembled in a temporary sibling and renamed into place. ``out_dir`` may
    exist if it is empty; a non-empty ``out_dir`` raises :class:`FileExistsError` unless
    ``overwrite`` (then it is replaced). ``shards > 1`` writes a sharded checkpoint with a
    ``model.safetensors.index.json``.
    """
    spec = resolve_spec(preset)
    out = _assemble(out_dir, overwrite, lambda staging: _write_checkpoint_files(staging, spec, seed, shards,
                                                                                  with_tokenizer))
    logger.info("wrote tiny checkpoint %s (%s, seed %d, %d params, %d shard(s))",
                out, spec.name, seed, spec.num_parameters(), shards)
    return out


def _write_streamed_files(directory: Path, spec: TinyModelSpec, seed: int, device: torch.device,
                          shard_bytes: int, with_tokenizer: bool) -> int:
    """Draw tensor by tensor on ``device``, write a shard whenever ``shard_bytes`` are pending; returns shards."""
    from safetensors.torch import save_file

    _write_text_files(directory, spec, with_tokenizer)
    generator = torch.Generator(device=device).manual_seed(seed)
    pending: dict[str, torch.Tensor] = {}
    groups: list[list[str]] = []
    pending_bytes = total_size = 0

    def flush() -> None:
        nonlocal pending, pending_bytes
        groups.append(list(pending))
        save_file(pending, str(directory / f".shard-{len(groups)}.safetensors"), metadata={"format": "pt"})
        pending, pending_bytes = {}, 0

    for name, tensor in _draw_tensors(spec, generator, device):
        host = tensor.to(spec.torch_dtype).to("cpu").contiguous()
        del tensor
        size = host.numel() * host.element_size()
        if pending and pending_bytes + size > shard_bytes:
            flush()
        pending[name] = host
        pending_bytes += size
        total_size += size
    flush()
    if len(groups) == 1:
        os.replace(directory / ".shard-1.safetensors", directory / "model.safetensors")
        return 1
    weight_map: dict[str, str] = {}
    for index, names in enumerate(groups, start=1):
        filename = f"model-{index:05d}-of-{len(groups):05d}.safetensors"
        os.replace(directory / f".shard-{index}.safetensors", directory / filename)
        weight_map.update(dict.fromkeys(names, filename))
    index_json = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(_json_text(index_json), encoding="utf-8")
    return len(groups)


def write_random_checkpoint(
    out_dir: str | os.PathLike[str],
    spec: str | TinyModelSpec,
    seed: int = 0,
    *,
    device: str | torch.device = "cpu",
    shard_bytes: int = 2 * 1024**3,
    with_tokenizer: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write a random-weight checkpoint of any size (e.g. a 7B shape) without holding it in memory.

    The same files, initialisation and staging as :func:`build_tiny_checkpoint`, but each tensor is
    drawn on ``device`` and written into shards of at most ``shard_bytes`` (one tensor larger than
    that gets a shard of its own), so peak host memory is about one shard. With ``device="cpu"`` the
    values equal :func:`init_tiny_state_dict`'s; a CUDA generator draws billions of weights in
    seconds, with values of its own (deterministic per seed on that device kind).
    """
    spec = resolve_spec(spec)
    if shard_bytes < 1:
        raise ValueError(f"shard_bytes must be >= 1, got {shard_bytes}")
    device = torch.device(device)
    counted: list[int] = []
    out = _assemble(out_dir, overwrite, lambda staging: counted.append(
        _write_streamed_files(staging, spec, seed, device, shard_bytes, with_tokenizer)))
    logger.info("wrote random checkpoint %s (%s, seed %d, %.2fB params, %s, drawn on %s, %d shard(s))",
                out, spec.name, seed, spec.num_parameters() / 1e9, spec.dtype, device, counted[0])
    return out


def default_cache_dir() -> Path:
    """``$APEX_TINY_CACHE`` if set, else ``~/.cache/apexlib/tiny``."""
    configured = os.environ.get("APEX_TINY_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "apexlib" / "tiny"


def tiny_checkpoint_key(spec: TinyModelSpec, seed: int = 0, shards: int = 1) -> str:
    """Hash of everything that determines a built checkpoint's bytes."""
    import safetensors
    import tokenizers

    payload = {
        "code_version": TINY_CODE_VERSION,
        "seed": seed,
        "shards": shards,
        "spec": spec.to_dict(),
        "versions": {"safetensors": safetensors.__version__, "tokenizers": tokenizers.__version__,
                     "torch": torch.__version__.split("+")[0]},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def tiny_checkpoint(
    preset: str | TinyModelSpec = "gqa",
    seed: int = 0,
    *,
    shards: int = 1,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Build a tiny checkpoint once into the cache and return its path (reused afterwards).

    Safe under concurrency: each builder writes its own temporary directory and renames it into
    place; whoever loses the race discards its copy and uses the winner's.
    """
    spec = resolve_spec(preset)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    label = preset if isinstance(preset, str) else spec.name
    suffix = f"-shards{shards}" if shards != 1 else ""
    target = root / f"{label}-seed{seed}{suffix}-{tiny_checkpoint_key(spec, seed, shards)}"
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=root))
    try:
        _write_checkpoint_files(staging, spec, seed, shards, with_tokenizer=True)
        _publish_permissions(staging)
        try:
            os.rename(staging, target)
            logger.info("cached tiny checkpoint %s", target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
            logger.debug("another process built %s first; reusing it", target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def main_tiny(out_dir: str, preset: str = "gqa", seed: int = 0) -> Path:
    """Entry point for ``apex tiny --out DIR [--preset P] [--seed S]``."""
    spec = resolve_spec(preset)
    path = build_tiny_checkpoint(out_dir, spec, seed=seed)
    logger.info("preset %s: hidden %d, %d layers, %d/%d heads, vocab %d, %.2fM params -> %s",
                preset, spec.hidden_size, spec.num_hidden_layers, spec.num_attention_heads,
                spec.num_key_value_heads, spec.vocab_size, spec.num_parameters() / 1e6, path)
    return path


__all__ = [
    "BOS_TOKEN_ID",
    "EOS_TOKEN_ID",
    "PAD_TOKEN_ID",
    "SPECIAL_TOKENS",
    "TINY_PRESETS",
    "UNK_TOKEN_ID",
    "TinyModelSpec",
    "build_tiny_checkpoint",
    "build_tiny_tokenizer",
    "default_cache_dir",
    "init_tiny_state_dict",
    "main_tiny",
    "resolve_spec",
    "tiny_checkpoint",
    "tiny_checkpoint_key",
    "tiny_tokenizer_json",
    "write_random_checkpoint",
]

