"""The KV tensors of one tier: ``[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]``.

``key_cache(layer)`` / ``value_cache(layer)`` are contiguous per-layer views with the layout
``[num_blocks, block_size, num_kv_heads, head_dim]``.

The host tier is ordinary pageable memory on 2 MiB pages where the system allows it
(:mod:`apexlib.runner.host_memory`: fewer TLB misses for the CPU attention kernel's scattered block
reads), never pinned: torch's pinned allocator rounds every allocation up to a power of two and
keeps it (a 20 GiB tier would pin 32 GiB), pinned memory cannot be on huge pages, and pinning needs
a CUDA context even for a ``device=cpu`` run. Block copies between a CUDA tier and the host tier
(swaps) go through a bounded pinned staging buffer instead (:class:`HostStaging`, allocated the first
time a swap needs it): chunks of blocks are gathered, copied with non-blocking copies, and the host
side reads a chunk only after the event recorded behind its copy has completed. Copies within one
device (``device=cpu``: both tiers on the host) are one gather and one scatter over all layers.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch

from apexlib.runner.host_memory import host_empty

logger = logging.getLogger(__name__)

#: Upper bound of the pinned staging buffer of one host tier (two halves of half this, so that the
#: host gathers one chunk while the previous one is copied); at least two blocks whatever the bound.
STAGING_BYTES = 64 * 1024**2


class KVStorage:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim)
        # Uninitialised: pages are touched only when written, so a large budget costs nothing up front.
        if self.device.type == "cpu":
            self.kv = host_empty(shape, dtype)
        else:
            self.kv = torch.empty(shape, dtype=dtype, device=self.device)
        self._staging: HostStaging | None = None
        logger.info("KV storage on %s: %d blocks x %d tokens, %.2f GiB", self.device, num_blocks, block_size,
                    self.kv.numel() * self.kv.element_size() / 1024**3)

    def key_cache(self, layer: int) -> torch.Tensor:
        return self.kv[layer, 0]

    def value_cache(self, layer: int) -> torch.Tensor:
        return self.kv[layer, 1]

    @property
    def bytes_per_block(self) -> int:
        return self.kv[:, :, 0].numel() * self.kv.element_size()

    def staging(self, device: torch.device) -> HostStaging:
        """This host tier's staging buffer for copies to and from ``device`` (made on first use)."""
        if self.device.type != "cpu":
            raise ValueError(f"only a host tier stages copies; this tier is on {self.device}")
        if self._staging is None or self._staging.device != device:
            self._staging = HostStaging(self.kv, device)
        return self._staging


class HostStaging:
    """Two pinned host buffers of ``blocks_per_chunk`` blocks each (together at most ``max_bytes``, default
    :data:`STAGING_BYTES`, but one block each at least), through which block copies between a host tier
    and a device tier go; ``pin=False`` (tests) uses pageable memory."""

    def __init__(self, host_kv: torch.Tensor, device: torch.device, max_bytes: int | None = None,
                 pin: bool | None = None) -> None:
        max_bytes = STAGING_BYTES if max_bytes is None else max_bytes
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        pin = self.cuda if pin is None else pin
        layers, _, _, block_size, heads, head_dim = host_kv.shape
        self.block_shape = (layers, 2, block_size, heads, head_dim)
        block_bytes = math.prod(self.block_shape) * host_kv.element_size()
        self.blocks_per_chunk = max(1, max_bytes // (2 * block_bytes))
        numel = self.blocks_per_chunk * math.prod(self.block_shape)
        # pinned by torch's host allocator, which rounds each buffer up to a power of two (<= 2x the bound)
        self.buffers = [torch.empty(numel, dtype=host_kv.dtype, pin_memory=pin) for _ in range(2)]
        self.events: list[torch.cuda.Event | None] = [None, None]
        self.num_chunks = 0  # chunks moved so far (tests read it)
        logger.info("KV swap staging: 2 x %d block(s), %.1f MiB%s", self.blocks_per_chunk,
                    2 * numel * host_kv.element_size() / 1024**2, " pinned" if pin else "")

    @property
    def nbytes(self) -> int:
        return sum(buffer.numel() * buffer.element_size() for buffer in self.buffers)

    def _chunk(self, index: int, num_blocks: int) -> torch.Tensor:
        """Buffer ``index % 2`` as a contiguous ``[layers, 2, num_blocks, ...]`` tensor, once its last copy landed."""
        slot = index % 2
        event = self.events[slot]
        if event is not None:
            event.synchronize()
            self.events[slot] = None
        layers, two, block_size, heads, head_dim = self.block_shape
        numel = num_blocks * math.prod(self.block_shape)
        return self.buffers[slot][:numel].view(layers, two, num_blocks, block_size, heads, head_dim)

    def _record(self, index: int) -> torch.cuda.Event | None:
        if not self.cuda:
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        self.events[index % 2] = event
        return event

    def to_device(self, host_kv: torch.Tensor, device_kv: torch.Tensor, pairs: Sequence[tuple[int, int]]) -> None:
        """Host blocks -> device blocks: per chunk, gather on the host into a buffer, copy it up without
        blocking, scatter on the device; a buffer is refilled only after its copy completed."""
        for index, start in enumerate(range(0, len(pairs), self.blocks_per_chunk)):
            chunk = pairs[start: start + self.blocks_per_chunk]
            staged = self._chunk(index, len(chunk))
            torch.index_select(host_kv, 2, torch.tensor([p[0] for p in chunk], dtype=torch.long), out=staged)
            on_device = staged.to(self.device, non_blocking=True)
            dst = torch.tensor([p[1] for p in chunk], dtype=torch.long, device=self.device)
            device_kv.index_copy_(2, dst, on_device)
            self._record(index)
            self.num_chunks += 1
        self.wait()

    def to_host(self, device_kv: torch.Tensor, host_kv: torch.Tensor, pairs: Sequence[tuple[int, int]]) -> None:
        """Device blocks -> host blocks: per chunk, gather on the device, copy down into a buffer without
        blocking, and scatter on the host once the event behind the copy completed."""
        pending: tuple[torch.Tensor, torch.Tensor, torch.cuda.Event | None] | None = None
        for index, start in enumerate(range(0, len(pairs), self.blocks_per_chunk)):
            chunk = pairs[start: start + self.blocks_per_chunk]
            staged = self._chunk(index, len(chunk))
            src = torch.tensor([p[0] for p in chunk], dtype=torch.long, device=self.device)
            staged.copy_(device_kv.index_select(2, src), non_blocking=True)
            event = self._record(index)
            self.events[index % 2] = None  # consumed below, before this buffer is handed out again
            if pending is not None:
                _scatter_host(host_kv, *pending)
            pending = (staged, torch.tensor([p[1] for p in chunk], dtype=torch.long), event)
            self.num_chunks += 1
        if pending is not None:
            _scatter_host(host_kv, *pending)

    def wait(self) -> None:
        """Block until every copy out of the buffers has completed (the swap is then done)."""
        for slot, event in enumerate(self.events):
            if event is not None:
                event.synchronize()
                self.events[slot] = None


def _scatter_host(host_kv: torch.Tensor, staged: torch.Tensor, dst: torch.Tensor,
                  event: torch.cuda.Event | None) -> None:
    if event is not None:
        event.synchronize()  # the device-to-host copy into ``staged`` has landed
    host_kv.index_copy_(2, dst, staged)


def copy_blocks(source: KVStorage, destination: KVStorage, pairs: Sequence[tuple[int, int]]) -> None:
    """Copy whole blocks (all layers, K and V) from ``source`` to ``destination``: (src, dst) pairs.

    Synchronous: when it returns the destination holds the blocks and the source blocks may be reused.
    Between a device tier and the host tier the copy is staged (:class:`HostStaging`)."""
    if not pairs:
        return
    pairs = list(pairs)
    if source.device == destination.device:
        src = torch.tensor([p[0] for p in pairs], dtype=torch.long, device=source.device)
        dst = torch.tensor([p[1] for p in pairs], dtype=torch.long, device=destination.device)
        destination.kv.index_copy_(2, dst, source.kv.index_select(2, src))
    elif source.device.type == "cpu":
        source.staging(destination.device).to_device(source.kv, destination.kv, pairs)
    elif destination.device.type == "cpu":
        destination.staging(source.device).to_host(source.kv, destination.kv, pairs)
    else:
        raise ValueError(f"copy_blocks between two devices ({source.device} -> {destination.device}) is not supported")
