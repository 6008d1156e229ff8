"""The DRAM read probe of the CPU benchmark (apexlib/kernels/read_bandwidth.cpp)."""

from __future__ import annotations

import pytest
import torch

from apexlib.attention import cpu, dram_probe

ISAS = [i for i, name in enumerate(cpu.ISAS) if cpu._ext().cpu_supports(i)]


@pytest.mark.parametrize("isa", ISAS, ids=[cpu.ISAS[i] for i in ISAS])
@pytest.mark.parametrize("threads", [1, 2])
def test_widening_loop_reads_every_element(isa, threads):
    # 3 MiB of fp16 ones in 1 MiB chunks per thread: the widening loop sums every value
    buf = torch.ones(3 * 2**20 // 2, dtype=torch.float16)
    assert cpu._ext().read_bandwidth_pass(buf, isa, threads, 1) == buf.numel()
    buf[12345] = 3.0  # one changed element anywhere changes the checksum
    assert cpu._ext().read_bandwidth_pass(buf, isa, threads, 1) == buf.numel() + 2


@pytest.mark.parametrize("isa", ISAS, ids=[cpu.ISAS[i] for i in ISAS])
def test_wide_loop_checksum(isa):
    # per 1 MiB chunk the low 16 bits of the sum of its 64-bit words, summed over chunks:
    # one full chunk of ones (131072 words -> 0) and a 512-byte tail (64 words -> 64)
    buf = torch.ones(2**17 + 64, dtype=torch.int64)
    assert cpu._ext().read_bandwidth_pass(buf, isa, 2, 0) == 64


def test_measure_read_bandwidth_reports_both_loops():
    buf = torch.ones(16 * 2**20 // 8, dtype=torch.float64)
    median, best, by_loop = dram_probe.measure_read_bandwidth(buf, 2, repeats=3)
    assert set(by_loop) == set(dram_probe.READ_VARIANTS.values())
    assert median == max(by_loop.values()) and best >= median > 0


def test_bad_variant_is_refused():
    with pytest.raises(ValueError, match="variant"):
        dram_probe.read_bandwidth_pass(torch.ones(1024), variant=2)
