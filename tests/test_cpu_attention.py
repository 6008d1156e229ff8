"""CPU paged decode attention (apexlib.attention.cpu) against the plain-torch reference."""

from __future__ import annotations

import math
import threading

import pytest
import torch
from conftest import make_inputs

from apexlib.attention import cpu

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ALL_ISAS = list(cpu.ISAS)


def _supported_isas() -> list[str]:
    return cpu.available_isas()


def _tol(kv_dtype, q_dtype=torch.float32):
    if q_dtype == torch.float32:
        return dict(atol=2e-5, rtol=1e-4)
    return dict(atol=2e-2, rtol=2e-2)  # result rounded to the query's 16-bit dtype


def check(args, q_dtype=torch.float32, scale=None):
    out = cpu.paged_decode_attention(*args, scale=scale)
    ref = cpu.paged_decode_attention_reference(*args, scale=scale)
    assert out.dtype == args[0].dtype and out.shape == args[0].shape
    torch.testing.assert_close(out.float(), ref.float(), **_tol(args[1].dtype, q_dtype))
    return out


# (context_lens, heads, kv_heads, head_dim, block_size)
SHAPES = [
    ([1, 15, 16, 17, 100], 8, 8, 64, 16),         # MHA, block_size +-1, length 1
    ([33, 31, 32, 1, 250], 8, 4, 128, 32),        # GQA 2
    ([7, 1, 64, 129], 16, 4, 80, 16),             # GQA 4, head_dim 80
    ([1, 2, 3, 45], 16, 2, 64, 1),                # GQA 8, block size 1
    ([1, 300, 5, 2000], 8, 1, 128, 16),           # MQA, very different lengths
]


@pytest.mark.parametrize("kv_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"H{s[1]}kv{s[2]}D{s[3]}bs{s[4]}")
def test_matches_reference(isa, shape, kv_dtype):
    lens, h, hkv, d, bs = shape
    check(make_inputs(lens, h, hkv, d, bs, kv_dtype))


@pytest.mark.parametrize("head_dim", [16, 256])
def test_head_dim_extremes(isa, head_dim):
    check(make_inputs([1, 17, 70], 8, 2, head_dim, 16, torch.float16))


@pytest.mark.parametrize("kv_dtype", [torch.float16, torch.bfloat16], ids=str)
def test_query_dtype_equals_kv_dtype(isa, kv_dtype):
    args = make_inputs([5, 64, 130], 8, 2, 128, 16, kv_dtype, q_dtype=kv_dtype)
    check(args, q_dtype=kv_dtype)


def test_group_16_and_odd_block(isa):
    # more query heads per group than the register tile, block size not a power of two
    check(make_inputs([1, 7, 8, 50], 32, 2, 64, 7, torch.bfloat16))


@pytest.mark.parametrize("kv_dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gqa4_multi_block_steps(isa, kv_dtype):
    # Llama-3.1-8B heads: several 16-token blocks per softmax step, lengths around step boundaries
    check(make_inputs([1, 16, 63, 64, 65, 129, 200], 32, 8, 128, 16, kv_dtype))


@pytest.mark.parametrize(("kv_dtype", "block_size"), [(torch.float16, 64), (torch.float32, 16), (torch.float32, 9)],
                         ids=["fp16-bs64", "fp32-bs16", "fp32-bs9"])
def test_blocks_bigger_than_a_step(isa, kv_dtype, block_size):
    # MHA rows of 8-16 KiB: blocks of 144-512 KiB of K are cut into slices of <= 128 KiB per softmax
    # step (16, 8 and 3 rows here), with lengths around slice and block boundaries
    lens = [1, 3, 8, 9, 17, block_size - 1, block_size + 1, 2 * block_size + 5, 150]
    check(make_inputs(lens, 32, 32, 128, block_size, kv_dtype))


def test_scale_and_out(isa):
    args = make_inputs([3, 40], 4, 2, 64, 16, torch.float32)
    out = torch.empty_like(args[0])
    res = cpu.paged_decode_attention(*args, scale=0.3, out=out)
    assert res.data_ptr() == out.data_ptr()
    ref = cpu.paged_decode_attention_reference(*args, scale=0.3)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_zero_context_gives_zeros(isa):
    args = make_inputs([0, 5, 0], 4, 4, 64, 16, torch.float16)
    out = check(args)
    assert torch.all(out[0] == 0) and torch.all(out[2] == 0)


def test_long_single_sequence_split(isa):
    # one long request is split across threads and merged with log-sum-exp rescaling
    args = make_inputs([3001], 8, 2, 64, 16, torch.float16)
    check(args)


@pytest.mark.parametrize("lens", [[8192], [8192, 5000]], ids=["batch1-8k", "batch2-uneven"])
def test_few_long_sequences_split(isa, lens):
    # batch 1-2 at long context (Llama-3.1-8B heads, bf16): every sequence is cut into many whole-block
    # splits run by all threads and merged by log-sum-exp; the split boundaries fall inside 64-token steps
    args = make_inputs(lens, 32, 8, 128, 16, torch.bfloat16)
    before = cpu.get_num_threads()
    try:
        for threads in (1, 2, 3):
            cpu.set_num_threads(threads)
            check(args)
    finally:
        cpu.set_num_threads(before)


def test_large_logits_stable(isa):
    args = list(make_inputs([1, 90, 400], 4, 2, 64, 16, torch.float32))
    args[0] = args[0] * 30.0  # very peaked softmax, exercises the running-max rescale
    check(tuple(args))


def test_thread_count_invariance():
    args = make_inputs([1, 333, 1500, 17], 16, 4, 128, 16, torch.bfloat16)
    before = cpu.get_num_threads()
    try:
        cpu.set_num_threads(1)
        one = cpu.paged_decode_attention(*args)
        cpu.set_num_threads(2)
        two = cpu.paged_decode_attention(*args)
        per_call = cpu.paged_decode_attention(*args, num_threads=1)
    finally:
        cpu.set_num_threads(before)
    torch.testing.assert_close(one, two, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(one, per_call, atol=1e-5, rtol=1e-5)


def test_pinned_threads():
    import os

    cpus = sorted(os.sched_getaffinity(0))
    args = make_inputs([200, 3], 8, 2, 64, 16, torch.float16)
    ref = cpu.paged_decode_attention_reference(*args)
    before = cpu.get_num_threads()
    # pin in a helper thread: pinning affects the calling thread (thread 0 of the team) too
    result = {}

    def work():
        cpu.set_num_threads(2, cpu_ids=cpus)
        result["out"] = cpu.paged_decode_attention(*args)

    t = threading.Thread(target=work)
    t.start()
    t.join()
    cpu.set_num_threads(before)
    torch.testing.assert_close(result["out"].float(), ref.float(), atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="cpu_ids"):
        cpu.set_num_threads(1, cpu_ids=[max(cpus) + 1000])
    with pytest.raises(ValueError, match="num_threads"):
        cpu.set_num_threads(0)


def test_releases_gil():
    # a second Python thread keeps running while the kernel runs in the first
    args = make_inputs([4000] * 4, 32, 8, 128, 16, torch.float32)
    ticks = []
    stop = threading.Event()

    def ticker():
        while not stop.is_set():
            ticks.append(1)

    t = threading.Thread(target=ticker)
    t.start()
    try:
        n0 = len(ticks)
        for _ in range(3):
            cpu.paged_decode_attention(*args)
        n1 = len(ticks)
    finally:
        stop.set()
        t.join()
    assert n1 > n0


@pytest.mark.parametrize("src_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cache_dtype", DTYPES, ids=str)
def test_store_kv(src_dtype, cache_dtype):
    g = torch.Generator().manual_seed(1)
    num_blocks, bs, hkv, d = 6, 16, 2, 64
    kc = torch.randn(num_blocks, bs, hkv, d, generator=g).to(cache_dtype)
    vc = torch.randn(num_blocks, bs, hkv, d, generator=g).to(cache_dtype)
    kc0, vc0 = kc.clone(), vc.clone()
    slots = torch.tensor([5 * bs + 3, 0, 2 * bs + 15, 1], dtype=torch.int64)
    key = (torch.randn(4, hkv, d, generator=g) * 100).to(src_dtype)
    value = torch.randn(4, hkv, d, generator=g).to(src_dtype)
    cpu.store_kv(key, value, kc, vc, slots)
    ek, ev = kc0.view(-1, hkv, d).clone(), vc0.view(-1, hkv, d).clone()
    ek[slots] = key.to(cache_dtype)
    ev[slots] = value.to(cache_dtype)
    assert torch.equal(kc.view(-1, hkv, d), ek)
    assert torch.equal(vc.view(-1, hkv, d), ev)


def test_store_kv_special_values():
    key = torch.tensor([0.0, -0.0, 1e-8, -1e-5, 65504.0, 7e4, float("inf"), float("-inf"), 3.14159, 1e-40,
                        -2.5e-6, 1.0, 2.0, 1.0 + 2**-11, 1.0 + 3 * 2**-11, 6e-8]).view(1, 1, 16)
    for dt in (torch.float16, torch.bfloat16):
        kc = torch.zeros(1, 1, 1, 16, dtype=dt)
        vc = torch.zeros(1, 1, 1, 16, dtype=dt)
        cpu.store_kv(key, key, kc, vc, torch.tensor([0]))
        assert torch.equal(kc.view(16), key.view(16).to(dt)), dt
    nan = torch.full((1, 1, 16), float("nan"))
    kc = torch.zeros(1, 1, 1, 16, dtype=torch.float16)
    cpu.store_kv(nan, nan, kc, kc.clone(), torch.tensor([0]))
    assert torch.isnan(kc).all()


def test_store_kv_then_attend():
    bs, hkv, d, h = 16, 2, 64, 8
    kc = torch.zeros(4, bs, hkv, d, dtype=torch.bfloat16)
    vc = torch.zeros_like(kc)
    ctx = 37
    key, value = torch.randn(ctx, hkv, d), torch.randn(ctx, hkv, d)
    table = torch.tensor([[3, 0, 2, 1]], dtype=torch.int32)
    pos = torch.arange(ctx)
    slots = table[0, pos // bs].long() * bs + pos % bs
    cpu.store_kv(key, value, kc, vc, slots)
    q = torch.randn(1, h, d)
    out = cpu.paged_decode_attention(q, kc, vc, table, torch.tensor([ctx], dtype=torch.int32))
    k = key.to(torch.bfloat16).float().repeat_interleave(h // hkv, dim=1)
    v = value.to(torch.bfloat16).float().repeat_interleave(h // hkv, dim=1)
    p = torch.softmax(torch.einsum("hd,thd->ht", q[0], k) / math.sqrt(d), dim=-1)
    torch.testing.assert_close(out[0], torch.einsum("ht,thd->hd", p, v), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda a: a.__setitem__(3, a[3].to(torch.int64)), "block_tables"),
        (lambda a: a.__setitem__(4, a[4].to(torch.int64)), "context_lens"),
        (lambda a: a[3].__setitem__((1, 0), a[1].shape[0]), "block_tables"),
        (lambda a: a[3].__setitem__((0, 0), -1), "block_tables"),
        (lambda a: a[4].__setitem__(1, 10**6), "context_lens"),
        (lambda a: a[4].__setitem__(1, -1), "context_lens"),
        (lambda a: a.__setitem__(0, a[0][..., :48]), "query"),
        (lambda a: a.__setitem__(0, a[0][:, :3]), "key_cache"),
        (lambda a: a.__setitem__(0, a[0].to(torch.float64)), "query"),
        (lambda a: a.__setitem__(0, a[0][:1]), "block_tables"),
        (lambda a: a.__setitem__(1, a[1].to(torch.int8)), "key_cache"),
        (lambda a: a.__setitem__(2, a[2].float()), "value_cache"),
        (lambda a: a.__setitem__(1, a[1].transpose(0, 1)), "key_cache"),
        (lambda a: a.__setitem__(3, a[3].t().contiguous().t()), "block_tables"),
    ],
)
@pytest.mark.parametrize("backend", ["kernel", "torch"])
def test_bad_inputs_name_the_field(mutate, field, backend, monkeypatch):
    if backend == "torch":
        monkeypatch.setenv("APEX_CPU_ATTENTION", "torch")
    args = list(make_inputs([5, 20], 4, 2, 64, 16, torch.float16))
    mutate(args)
    with pytest.raises(ValueError, match=field):
        cpu.paged_decode_attention(*args)


def test_store_kv_bad_inputs():
    kc = torch.zeros(2, 4, 1, 16)
    key = torch.zeros(1, 1, 16)
    with pytest.raises(ValueError, match="slot_mapping"):
        cpu.store_kv(key, key, kc, kc.clone(), torch.tensor([8]))
    with pytest.raises(ValueError, match="slot_mapping"):
        cpu.store_kv(key, key, kc, kc.clone(), torch.tensor([0], dtype=torch.int32))
    with pytest.raises(ValueError, match="key"):
        cpu.store_kv(torch.zeros(1, 2, 16), key, kc, kc.clone(), torch.tensor([0]))


def test_isa_env(monkeypatch):
    monkeypatch.setenv("APEX_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="APEX_CPU_ISA"):
        cpu.selected_isa()
    missing = [i for i in ALL_ISAS if i not in _supported_isas()]
    if missing:
        monkeypatch.setenv("APEX_CPU_ISA", missing[0])
        with pytest.raises(RuntimeError, match=missing[0]):
            cpu.selected_isa()
    monkeypatch.delenv("APEX_CPU_ISA")
    assert cpu.selected_isa() == _supported_isas()[-1]
    assert "scalar" in _supported_isas()


def test_torch_fallback(monkeypatch):
    args = make_inputs([1, 17, 40], 8, 2, 64, 16, torch.float16)
    kernel = cpu.paged_decode_attention(*args)
    monkeypatch.setenv("APEX_CPU_ATTENTION", "torch")
    assert cpu.selected_isa() == "torch"
    fallback = cpu.paged_decode_attention(*args)
    torch.testing.assert_close(kernel, fallback, atol=2e-5, rtol=1e-4)
    kc = torch.zeros(2, 4, 1, 16, dtype=torch.bfloat16)
    cpu.store_kv(torch.ones(1, 1, 16), torch.ones(1, 1, 16), kc, kc, torch.tensor([5]))
    assert kc.view(-1, 16)[5].eq(1).all()


def test_missing_compiler_message(monkeypatch):
    from apexlib.kernels import build

    monkeypatch.setenv("CXX", "no-such-compiler-apex")
    with pytest.raises(RuntimeError, match="no-such-compiler-apex"):
        build._compiler_path()


def test_cache_key_is_stable():
    from apexlib.kernels import build

    assert build.source_hash("x") == build.source_hash("x") != build.source_hash("y")


def test_bench_quick_rows(tmp_path):
    import json

    from apexlib.bench import cpu_attention as bench

    path = tmp_path / "rows.json"
    assert bench.main(["--quick", "--json", str(path), "--repeats", "5", "--no-vllm"]) == 0
    data = json.loads(path.read_text())
    rows = data["rows"] if isinstance(data, dict) else data
    assert rows
    assert data["meta"]["load_average_start"] >= 0 and data["meta"]["load_average_end"] >= 0
    fields = {"kv_dtype", "batch", "context_len", "num_heads", "num_kv_heads", "seconds", "achieved_gbps",
              "dram_read_gbps", "ratio_to_dram", "torch_sdpa_gbps", "kernel_vs_sdpa", "threads", "isa", "cpu_model",
              "arith_stream_gbps", "arith_stream_ratio_to_dram", "kernel_vs_arith_stream", "vllm_gbps", "ratio_to_vllm"}
    for row in rows:
        assert fields <= set(row), fields - set(row)
        assert row["seconds"] > 0 and row["achieved_gbps"] > 0 and row["dram_read_gbps"] > 0


def test_bench_summary_of_target_rows():
    from apexlib.bench.cpu_attention import summarize

    def row(model, dt, batch, ctx, ratio, stream=None, sdpa=None, vllm=None):
        return {"model": model, "kv_dtype": dt, "batch": batch, "context_len": ctx, "ratio_to_dram": ratio,
                "arith_stream_ratio_to_dram": stream, "kernel_vs_arith_stream": None if stream is None else ratio / stream,
                "kernel_vs_sdpa": sdpa, "ratio_to_vllm": vllm}

    rows = [
        row("mha", "fp16", 8, 1024, 0.82, 0.9, 5.0, 2.0),
        row("mha", "bf16", 32, 4096, 0.78, 0.95, 7.0, 1.4),
        row("mha", "fp16", 1, 4096, 0.10, 0.2, 1.0),   # batch 1: not a target row
        row("mha", "fp16", 32, 128, 0.20, 0.3, 1.0),   # short context: not a target row
        row("mha", "fp32", 32, 4096, 0.95, 0.97, 2.0),  # fp32: not a target row
        row("gqa", "fp16", 8, 1024, 0.55),
    ]
    summary = {e["model"]: e for e in summarize(rows)}
    # at target: kernel / stream >= 0.9 (0.82 / 0.9 = 0.91 yes, 0.78 / 0.95 = 0.82 no)
    assert summary["mha"]["rows"] == 2 and summary["mha"]["rows_at_target"] == 1
    assert summary["mha"]["ratio_to_dram"] == (0.78, 0.82)
    assert summary["mha"]["arith_stream_ratio_to_dram"] == (0.9, 0.95)
    assert summary["mha"]["kernel_vs_sdpa"] == (5.0, 7.0)
    assert summary["mha"]["ratio_to_vllm"] == (1.4, 2.0) and summary["mha"]["rows_vs_vllm_at_target"] == 1
    assert summary["gqa"]["rows_at_target"] == 0 and summary["gqa"]["arith_stream_ratio_to_dram"] is None
    assert summary["gqa"]["ratio_to_vllm"] is None and summary["gqa"]["rows_vs_vllm_at_target"] is None


@pytest.mark.slow  # ~40 s: imports vLLM in its venv
def test_vllm_peer_times_its_op():
    # vLLM's CPU attention op in its own venv: the worker checks its call against a torch reference
    from apexlib.bench.vllm_attention_peer import open_peer
    from apexlib.bench.vllm_baseline import VllmUnavailable, find_vllm_python

    try:
        find_vllm_python("cpu")
    except VllmUnavailable as error:
        pytest.skip(error.reason)
    peer = open_peer(1)
    assert peer is not None
    try:
        info = peer.prepare(kv_dtype="fp16", num_heads=8, num_kv_heads=2, head_dim=64, block_size=16, batch=2,
                            context_len=100, min_rotation_bytes=1 << 20, max_pool_bytes=1 << 24, seed=0)
        assert info["check_max_abs_err"] < 1e-2 and info["kv_sets"] >= 1
        assert peer.time(3, 0.0) > 0
    finally:
        peer.close()
