"""DRAM read probe: a STREAM-like read of a buffer far larger than the last-level cache with the CPU
kernels' threads and ISA (apexlib/kernels/read_bandwidth.cpp). Not attention: it is the DRAM figure of
``this_machine`` (apexlib.runner.machine) and the reference of ``apex bench cpu-attention``; it lives
beside the attention kernel's wrapper because both use the same compiled extension, ISA choice and
threads (:func:`apexlib.attention.cpu.selected_isa`, :func:`apexlib.attention.cpu.set_num_threads`).
"""

from __future__ import annotations

import statistics
import time

import torch

from apexlib.attention.cpu import _ext, _isa_index

READ_VARIANTS = {0: "wide", 1: "widening"}


def read_bandwidth_pass(buf: torch.Tensor, num_threads: int | None = None, variant: int = 0) -> float:
    """Stream-read ``buf`` once with the kernels' threads and ISA (for the DRAM bandwidth probe).

    ``variant`` 0 sums the widest loads; 1 reads the bytes as fp16 widened to fp32 (the conversion
    paces the loads, which reads faster on some CPUs: apexlib/kernels/read_bandwidth.cpp). Returns a
    checksum.
    """
    if variant not in READ_VARIANTS:
        raise ValueError(f"variant must be one of {sorted(READ_VARIANTS)}, got {variant!r}")
    return float(_ext().read_bandwidth_pass(buf, _isa_index(), int(num_threads or 0), int(variant)))


def measure_read_bandwidth(buf: torch.Tensor, num_threads: int | None = None,
                           repeats: int = 5) -> tuple[float, float, dict[str, float]]:
    """This machine's read bandwidth over ``buf`` (far larger than the LLC) in GB/s (1e9 bytes/s).

    Times ``repeats`` passes of every :data:`READ_VARIANTS` loop (after one untimed pass each) and
    returns (median of the faster variant, best single pass of it, {variant name: median}): the
    reference is the fastest read this machine does, whichever loop gets it.
    """
    nbytes = buf.numel() * buf.element_size() // 512 * 512
    medians: dict[str, float] = {}
    bests: dict[str, float] = {}
    for variant, name in READ_VARIANTS.items():
        read_bandwidth_pass(buf, num_threads, variant)
        times = []
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            read_bandwidth_pass(buf, num_threads, variant)
            times.append(time.perf_counter() - t0)
        medians[name] = nbytes / statistics.median(times) / 1e9
        bests[name] = nbytes / min(times) / 1e9
    top = max(medians, key=medians.get)
    return medians[top], bests[top], medians
