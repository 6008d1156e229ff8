"""The KV tensors of one tier: ``[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]``.

``key_cache(layer)`` / ``value_cache(layer)`` are contiguous per-layer views with the layout
``[num_blocks, block_size, num_kv_heads, head_dim]``. The host tier is pinned where CUDA exists so
copies to and from the device can be asynchronous; an unpinned host tier lies on 2 MiB pages where
the system allows it (:mod:`apexlib.runner.host_memory`: fewer TLB misses for the CPU attention
kernel's scattered block reads). Block copies between tiers are batched: one
gather and one scatter over all layers, not one call per block.
"""

from __future__ import annotations

import logging

import torch

from apexlib.runner.host_memory import host_empty

logger = logging.getLogger(__name__)


class KVStorage:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, pin_memory: bool = False) -> None:
        self.device = torch.device(device)
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim)
        # Uninitialised: pages are touched only when written, so a large budget costs nothing up front.
        if self.device.type == "cpu" and not pin_memory:
            self.kv = host_empty(shape, dtype)
        else:
            self.kv = torch.empty(shape, dtype=dtype, device=self.device, pin_memory=pin_memory)
        logger.info("KV storage on %s: %d blocks x %d tokens, %.2f GiB%s", self.device, num_blocks, block_size,
                    self.kv.numel() * self.kv.element_size() / 1024**3, " (pinned)" if pin_memory else "")

    def key_cache(self, layer: int) -> torch.Tensor:
        return self.kv[layer, 0]

    def value_cache(self, layer: int) -> torch.Tensor:
        return self.kv[layer, 1]

    @property
    def bytes_per_block(self) -> int:
        return self.kv[:, :, 0].numel() * self.kv.element_size()


def copy_blocks(source: KVStorage, destination: KVStorage, pairs: tuple[tuple[int, int], ...] | list[tuple[int, int]],
                non_blocking: bool = False) -> None:
    """Copy whole blocks (all layers, K and V) from ``source`` to ``destination``: (src, dst) pairs."""
    if not pairs:
        return
    src = torch.tensor([p[0] for p in pairs], dtype=torch.long, device=source.device)
    dst = torch.tensor([p[1] for p in pairs], dtype=torch.long, device=destination.device)
    gathered = source.kv.index_select(2, src)
    destination.kv.index_copy_(2, dst, gathered.to(destination.device, non_blocking=non_blocking))
