"""Load a Hugging Face LLaMA checkpoint (``*.safetensors``, sharded or not) into ``LlamaModel``.

The model is built on the meta device, then every tensor is read once from the safetensors
files straight to its target device and dtype and assigned (``load_state_dict(assign=True)``),
so no full extra copy of the weights is ever made. Q/K/V and gate/up are concatenated into the
fused projections one layer at a time.

Before anything is read, the checkpoint's tensor names and shapes (from the safetensors headers) are
checked against what ``config.json`` implies (:func:`expected_tensors`): every tensor must be there
with its shape, and none may be left over (weights for more layers than ``num_hidden_layers``, say);
the error names the tensor, the file and both shapes. A file that is not readable safetensors (a
truncated download) is named in the error.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open

from apexlib.core.config import ModelConfig
from apexlib.model.llama import LlamaModel

logger = logging.getLogger(__name__)

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def checkpoint_files(path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint directory (from the index when sharded)."""
    directory = Path(path)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted({directory / name for name in weight_map.values()})
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"model path {str(directory)!r} has no *.safetensors weights")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint index lists missing shards: {missing}")
    return files


#: Tensors some checkpoints carry that the model recomputes (RoPE frequencies): neither needed nor an error.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def expected_tensors(config: ModelConfig, prefix: str = "model.") -> dict[str, tuple[int, ...]]:
    """HF name -> shape of every tensor ``config`` implies (``lm_head.weight`` unless embeddings are tied)."""
    hidden, inter, head_dim = config.hidden_size, config.intermediate_size, config.head_dim
    q_out, kv_out = config.num_heads * head_dim, config.num_kv_heads * head_dim
    shapes: dict[str, tuple[int, ...]] = {
        f"{prefix}embed_tokens.weight": (config.vocab_size, hidden),
        f"{prefix}norm.weight": (hidden,),
    }
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, hidden)
    for index in range(config.num_layers):
        layer = f"{prefix}layers.{index}."
        shapes[layer + "input_layernorm.weight"] = (hidden,)
        shapes[layer + "post_attention_layernorm.weight"] = (hidden,)
        projections = {"self_attn.q_proj": (q_out, hidden), "self_attn.k_proj": (kv_out, hidden),
                       "self_attn.v_proj": (kv_out, hidden), "self_attn.o_proj": (hidden, q_out),
                       "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden),
                       "mlp.down_proj": (hidden, inter)}
        for name, shape in projections.items():
            shapes[layer + name + ".weight"] = shape
            if (config.attention_bias and name.startswith("self_attn")) or (config.mlp_bias and name.startswith("mlp")):
                shapes[layer + name + ".bias"] = (shape[0],)
    return shapes


class _TensorSource:
    """name -> tensor reader over all shards, reading each tensor once on demand."""

    def __init__(self, files: list[Path], device: torch.device, dtype: torch.dtype) -> None:
        self.device = device
        self.dtype = dtype
        self._handles = []
        self._where: dict[str, tuple[Path, object]] = {}
        for file in files:
            try:
                handle = safe_open(str(file), framework="pt", device="cpu")
                names = list(handle.keys())
            except Exception as error:  # SafetensorError, OSError: name the file, not just the library's reason
                raise ValueError(f"{file}: not a readable safetensors file (truncated or corrupt download?): "
                                 f"{error}") from None
            self._handles.append(handle)
            for name in names:
                self._where[name] = (file, handle)

    def names(self) -> set[str]:
        return set(self._where)

    def file_of(self, name: str) -> Path:
        return self._where[name][0]

    def shape(self, name: str) -> tuple[int, ...]:
        file, handle = self._where[name]
        try:
            return tuple(handle.get_slice(name).get_shape())
        except Exception as error:
            raise ValueError(f"{file}: cannot read the header of tensor {name!r}: {error}") from None

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise ValueError(f"checkpoint is missing tensor {name!r}")
        file, handle = self._where[name]
        try:
            tensor = handle.get_tensor(name)
        except Exception as error:
            raise ValueError(f"{file}: cannot read tensor {name!r} (truncated or corrupt file?): {error}") from None
        return tensor.to(device=self.device, dtype=self.dtype)


def check_tensors(config: ModelConfig, source: _TensorSource, prefix: str) -> None:
    """Every tensor ``config`` implies is present with its shape; no tensor is left over. ValueError naming
    the tensor (and its file, and both shapes) otherwise."""
    expected = expected_tensors(config, prefix)
    names = source.names()
    where = f"config.json at {config.path}"
    missing = [name for name in expected if name not in names]
    if "lm_head.weight" in missing:
        raise ValueError(f"checkpoint has no lm_head.weight and tie_word_embeddings is false ({where})")
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} tensor(s) that {where} implies "
                         f"(num_hidden_layers={config.num_layers}): {missing[:5]}")
    for name, shape in expected.items():
        found = source.shape(name)
        if found != shape:
            raise ValueError(f"tensor {name} in {source.file_of(name).name} has shape {found}, but {where} implies "
                             f"{shape}")
    allowed = set(expected) | ({"lm_head.weight"} if config.tie_word_embeddings else set())
    leftover = sorted(n for n in names if n not in allowed and not n.endswith(IGNORED_SUFFIXES))
    if leftover:
        raise ValueError(f"checkpoint has {len(leftover)} tensor(s) that {where} does not use "
                         f"(num_hidden_layers={config.num_layers}, attention_bias={config.attention_bias}, "
                         f"mlp_bias={config.mlp_bias}): {leftover[:5]}")


def _strip_prefix(names: set[str]) -> str:
    return "model." if any(n.startswith("model.") for n in names) else ""


def load_model(config: ModelConfig, dtype: str, device: str | torch.device) -> LlamaModel:
    """Build ``LlamaModel`` for ``config`` with weights from ``config.path`` on ``device`` in ``dtype``."""
    torch_dtype = TORCH_DTYPES[dtype]
    device = torch.device(device)
    with torch.device("meta"):
        model = LlamaModel(config)
    source = _TensorSource(checkpoint_files(config.path), device, torch_dtype)
    prefix = _strip_prefix(source.names())
    check_tensors(config, source, prefix)
    state: dict[str, torch.Tensor] = {}
    state["embed_tokens.weight"] = source.get(f"{prefix}embed_tokens.weight")
    state["norm.weight"] = source.get(f"{prefix}norm.weight")
    if config.tie_word_embeddings or "lm_head.weight" not in source.names():
        if not config.tie_word_embeddings:
            raise ValueError("checkpoint has no lm_head.weight and tie_word_embeddings is false")
        state["lm_head.weight"] = state["embed_tokens.weight"]
    else:
        state["lm_head.weight"] = source.get("lm_head.weight")
    for index in range(config.num_layers):
        hf = f"{prefix}layers.{index}."
        ours = f"layers.{index}."
        state[ours + "input_layernorm.weight"] = source.get(hf + "input_layernorm.weight")
        state[ours + "post_attention_layernorm.weight"] = source.get(hf + "post_attention_layernorm.weight")
        state[ours + "qkv_proj.weight"] = torch.cat(
            [source.get(hf + f"self_attn.{p}_proj.weight") for p in "qkv"], dim=0)
        state[ours + "o_proj.weight"] = source.get(hf + "self_attn.o_proj.weight")
        state[ours + "gate_up_proj.weight"] = torch.cat(
            [source.get(hf + "mlp.gate_proj.weight"), source.get(hf + "mlp.up_proj.weight")], dim=0)
        state[ours + "down_proj.weight"] = source.get(hf + "mlp.down_proj.weight")
        if config.attention_bias:
            state[ours + "qkv_proj.bias"] = torch.cat([source.get(hf + f"self_attn.{p}_proj.bias") for p in "qkv"])
            state[ours + "o_proj.bias"] = source.get(hf + "self_attn.o_proj.bias")
        if config.mlp_bias:
            state[ours + "gate_up_proj.bias"] = torch.cat(
                [source.get(hf + "mlp.gate_proj.bias"), source.get(hf + "mlp.up_proj.bias")])
            state[ours + "down_proj.bias"] = source.get(hf + "mlp.down_proj.bias")
    _check_shapes(model, state)
    model.load_state_dict(state, strict=False, assign=True)
    # Non-persistent buffers (RoPE tables) are still on meta: rebuild them on the device.
    from apexlib.model.llama import RotaryEmbedding

    with torch.device(device):
        model.rotary = RotaryEmbedding(config)
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:
        raise ValueError(f"checkpoint left parameters unset: {leftover[:5]}")
    model.eval().requires_grad_(False)
    logger.info("loaded %s (%d layers, %s) on %s", config.path, config.num_layers, dtype, device)
    return model


def _check_shapes(model: LlamaModel, state: dict[str, torch.Tensor]) -> None:
    expected = dict(model.named_parameters())
    for name, tensor in state.items():
        if name not in expected:
            raise ValueError(f"unexpected tensor {name}")
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ValueError(f"tensor {name} has shape {tuple(tensor.shape)}, config expects "
                             f"{tuple(expected[name].shape)}")
