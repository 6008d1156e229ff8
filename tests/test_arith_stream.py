"""The minimum-arithmetic stream probe (apexlib.attention.cpu_probes.arith_stream_pass) and its benchmark columns.

The probe's checksum is sum over every valid K and V element x of x * sum_g q_g[j], where
q_g[j] = (8 g + j + 1) / 64 for the G = num_heads / num_kv_heads heads of a group and j is the
element's index in its token row mod 8 (see apexlib/kernels/arith_stream.cpp). The kernel
accumulates in fp32, so it is compared with a float64 reference to TOL times sum |x| * sum_g q_g[j]
(the scale of the rounding error; the signed sum itself may cancel). The errors seen are ~1e-8 of
that scale; TOL = 2e-6 still catches a single skipped 16-element group of the longest case (~3e-5).
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_inputs

from apexlib.attention import cpu
from apexlib.bench import cpu_probes

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = 2e-6

# (context_lens, num_kv_heads, head_dim, block_size): odd lengths and partial last blocks; a 16-element
# fp16 row (half a cache line) with blocks of 5 tokens; one long sequence crossing many blocks, so the
# prefetch cursor (16 KiB ahead) runs over several K/V segments and stops at the end of the item.
SHAPES = [
    ([1, 15, 17, 100, 33], 2, 32, 16),
    ([3, 7, 250, 0], 1, 16, 5),
    ([2000, 9], 2, 64, 16),
]


def _supported() -> list[str]:
    return cpu.available_isas()


def make_cache(context_lens, num_kv_heads, head_dim, block_size, dtype, extra_blocks=3, seed=0):
    """Random K/V, block tables in random order over a pool with unused blocks and junk trailing entries."""
    return make_inputs(context_lens, num_kv_heads, num_kv_heads, head_dim, block_size, dtype,
                       extra_blocks=extra_blocks, seed=seed)[1:]


def query_weights(group: int) -> torch.Tensor:
    """sum_g q_g[j] for j = 0..7, q_g[j] = (8 g + j + 1) / 64 (float64)."""
    g = torch.arange(group, dtype=torch.float64)[:, None]
    j = torch.arange(8, dtype=torch.float64)[None, :]
    return ((8 * g + j + 1) / 64).sum(0)


def reference(kc, vc, tables, lens, num_heads) -> tuple[float, float]:
    """(checksum, sum of |terms|) in float64, one sequence at a time."""
    _, bs, hkv, d = kc.shape
    row = hkv * d
    w = query_weights(num_heads // hkv).repeat(row // 8)  # weight of each element of a token row
    total = scale = 0.0
    for s in range(lens.shape[0]):
        ctx = int(lens[s])
        if ctx == 0:
            continue
        blocks = tables[s, :(ctx + bs - 1) // bs].long()
        for cache in (kc, vc):
            x = cache[blocks].reshape(-1, row)[:ctx].double()
            total += float((x * w).sum())
            scale += float((x.abs() * w).sum())
    return total, scale


@pytest.mark.parametrize("group", [1, 3, 4, 8, 16])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"kv{s[1]}D{s[2]}bs{s[3]}n{len(s[0])}")
def test_checksum_matches_reference(isa, shape, dtype, group):
    lens, hkv, d, bs = shape
    kc, vc, tables, cl = make_cache(lens, hkv, d, bs, dtype)
    heads = group * hkv
    ref, scale = reference(kc, vc, tables, cl, heads)
    for threads in (1, 2):
        got = cpu_probes.arith_stream_pass(kc, vc, tables, cl, heads, num_threads=threads)
        assert abs(got - ref) <= TOL * scale, (got, ref, scale)


@pytest.mark.parametrize("group", [1, 4, 8])
def test_deterministic(isa, group):
    kc, vc, tables, cl = make_cache([700, 31, 1], 2, 64, 16, torch.float16, seed=3)
    first = cpu_probes.arith_stream_pass(kc, vc, tables, cl, 2 * group, num_threads=2)
    for _ in range(3):
        assert cpu_probes.arith_stream_pass(kc, vc, tables, cl, 2 * group, num_threads=2) == first


def test_all_isas_agree(monkeypatch):
    kc, vc, tables, cl = make_cache([333, 64, 5], 4, 32, 16, torch.bfloat16, seed=7)
    _, scale = reference(kc, vc, tables, cl, 16)
    results = {}
    for name in _supported():
        monkeypatch.setenv("APEX_CPU_ISA", name)
        results[name] = cpu_probes.arith_stream_pass(kc, vc, tables, cl, 16)
    assert "scalar" in results
    for value in results.values():
        assert abs(value - results["scalar"]) <= TOL * scale, results


def test_exact_small_values():
    # all ones: every element contributes sum_g q_g[j] exactly; 20 tokens x 2 heads x 16 = 640 per cache
    kc = torch.ones(4, 16, 2, 16, dtype=torch.float16)
    tables = torch.tensor([[2, 0, 3]], dtype=torch.int32)
    got = cpu_probes.arith_stream_pass(kc, kc.clone(), tables, torch.tensor([20], dtype=torch.int32), 8)
    assert got == pytest.approx(2 * 640 * float(query_weights(4).mean()), rel=1e-6)


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda a: a[2].__setitem__((1, 0), a[0].shape[0]), "block_tables"),
        (lambda a: a[2].__setitem__((0, 0), -1), "block_tables"),
        (lambda a: a.__setitem__(2, a[2].to(torch.int64)), "block_tables"),
        (lambda a: a.__setitem__(2, a[2][:1]), "block_tables"),
        (lambda a: a[3].__setitem__(1, 10**6), "context_lens"),
        (lambda a: a[3].__setitem__(1, -1), "context_lens"),
        (lambda a: a.__setitem__(4, 3), "num_heads"),
        (lambda a: a.__setitem__(1, a[1].float()), "value_cache"),
        (lambda a: a.__setitem__(0, a[0].transpose(0, 1).contiguous().transpose(0, 1)), "key_cache"),
    ],
)
def test_bad_inputs_name_the_field(mutate, field):
    kc, vc, tables, cl = make_cache([5, 20], 2, 32, 16, torch.float16)
    args = [kc, vc, tables, cl, 4]
    mutate(args)
    with pytest.raises(ValueError, match=field):
        cpu_probes.arith_stream_pass(*args)


def test_bench_writes_arith_stream_fields(tmp_path):
    from apexlib.cli import main

    path = tmp_path / "rows.json"
    assert main(["bench", "cpu-attention", "--quick", "--no-sdpa", "--no-progress", "--json", str(path),
                 "--repeats", "5", "--batches", "1", "--contexts", "128", "--dram-gib", "0.0625"]) == 0
    data = json.loads(path.read_text())
    rows = data["rows"]
    assert {r["model"] for r in rows} == {"llama-2-7b", "llama-3.1-8b"}
    assert data["meta"]["arith_stream"] is True and "arith_stream" in data["meta"]["note"]
    for r in rows:
        assert r["arith_stream_gbps"] > 0 and r["arith_stream_seconds"] > 0
        assert r["arith_stream_ratio_to_dram"] == pytest.approx(r["arith_stream_gbps"] / r["dram_read_gbps"])
        assert r["kernel_vs_arith_stream"] == pytest.approx(r["achieved_gbps"] / r["arith_stream_gbps"])
        assert r["torch_sdpa_gbps"] is None and r["achieved_gbps"] > 0 and r["ratio_to_dram"] > 0

    path2 = tmp_path / "rows2.json"
    assert main(["bench", "cpu-attention", "--quick", "--no-sdpa", "--no-arith-stream", "--no-progress",
                 "--json", str(path2), "--repeats", "5", "--models", "llama-3.1-8b", "--batches", "1",
                 "--contexts", "128", "--dram-gib", "0.0625"]) == 0
    (row,) = json.loads(path2.read_text())["rows"]
    assert row["arith_stream_gbps"] is None and row["kernel_vs_arith_stream"] is None
    assert row["achieved_gbps"] > 0
