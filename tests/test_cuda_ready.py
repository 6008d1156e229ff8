"""What the first run on a CUDA device depends on, observed without one: the host tier's allocation and
the swap staging, engine close and KV sizing (a fake ``mem_get_info``), the shapes and biases handed to
SDPA (a wrapped ``scaled_dot_product_attention``), no device read-back inside a layer (a tensor that
fails on ``.item()``/``int()``), and dtype resolution under a faked compute capability."""

from __future__ import annotations

import dataclasses
import gc
import inspect
import types
import weakref

import pytest
import torch

from apexlib.attention import base
from apexlib.attention.base import AttentionMetadata, TorchReferenceBackend
from apexlib.core.config import ModelConfig
from apexlib.engine import args as engine_args
from apexlib.engine.args import EngineArgs, activation_reserve_bytes
from apexlib.runner import kv_storage
from apexlib.runner.host_memory import HUGE_PAGE_BYTES, huge_pages_possible
from apexlib.runner.kv_storage import KVStorage, copy_blocks


# -- the host tier and the swaps ---------------------------------------------------------------------
def test_host_tier_is_not_pinned_on_a_cpu_run_beside_a_gpu(monkeypatch, tiny_path):
    """device=cpu on a machine with a GPU: the CPU tier is plain (huge-page) memory, no CUDA is touched."""
    from apexlib.engine.engine import LLMEngine

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    pinned = []
    real_empty = torch.empty

    def empty(*args, **kwargs):
        if kwargs.get("pin_memory"):
            pinned.append(args)
            raise AssertionError("the host tier was pinned")
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", empty)
    engine = LLMEngine(EngineArgs(model=str(tiny_path("gqa")), device="cpu", policy="hybrid",
                                  num_gpu_blocks=8, cpu_kv_gib=0.01, max_model_len=128))
    try:
        assert not pinned and engine.cpu_storage is not None
        assert engine.cpu_storage.kv.device.type == "cpu"
        if huge_pages_possible() and engine.cpu_storage.kv.numel() * 4 >= HUGE_PAGE_BYTES:
            assert engine.cpu_storage.kv.data_ptr() % HUGE_PAGE_BYTES == 0
    finally:
        engine.close()


def _tier(num_blocks: int, seed: int) -> KVStorage:
    storage = KVStorage(num_layers=3, num_blocks=num_blocks, block_size=4, num_kv_heads=2, head_dim=8,
                        dtype=torch.float32, device="cpu")
    storage.kv.copy_(torch.randn(storage.kv.shape, generator=torch.Generator().manual_seed(seed)))
    return storage


def test_swaps_stage_through_a_bounded_buffer_in_chunks():
    host, device = _tier(16, 0), _tier(12, 1)
    block_bytes = host.bytes_per_block
    staging = kv_storage.HostStaging(host.kv, torch.device("cpu"), max_bytes=4 * block_bytes, pin=False)
    assert staging.blocks_per_chunk == 2 and staging.nbytes <= 4 * block_bytes
    pairs = [(15, 0), (3, 7), (8, 2), (0, 11), (9, 5)]
    expected = device.kv.clone()
    for src, dst in pairs:
        expected[:, :, dst] = host.kv[:, :, src]
    staging.to_device(host.kv, device.kv, pairs)
    assert staging.num_chunks == 3  # 5 blocks in chunks of 2
    torch.testing.assert_close(device.kv, expected, rtol=0, atol=0)

    back = [(0, 1), (7, 4), (11, 6)]
    expected_host = host.kv.clone()
    for src, dst in back:
        expected_host[:, :, dst] = device.kv[:, :, src]
    staging.to_host(device.kv, host.kv, back)
    assert staging.num_chunks == 5
    torch.testing.assert_close(host.kv, expected_host, rtol=0, atol=0)


def test_copy_blocks_is_synchronous_without_a_non_blocking_switch():
    assert "non_blocking" not in inspect.signature(copy_blocks).parameters
    source, destination = _tier(4, 2), _tier(4, 3)
    copy_blocks(source, destination, [(1, 2), (3, 0)])
    torch.testing.assert_close(destination.kv[:, :, 2], source.kv[:, :, 1])
    torch.testing.assert_close(destination.kv[:, :, 0], source.kv[:, :, 3])


def test_only_a_host_tier_stages_and_its_buffer_is_made_once():
    host = _tier(4, 0)
    first = host.staging(torch.device("cpu"))
    assert host.staging(torch.device("cpu")) is first
    assert first.nbytes <= 2 * max(kv_storage.STAGING_BYTES // 2, host.bytes_per_block)


# -- engine close and KV sizing -----------------------------------------------------------------------
def test_close_releases_weights_and_kv_tiers(tiny_path):
    from apexlib.engine.engine import LLMEngine

    engine = LLMEngine(EngineArgs(model=str(tiny_path("gqa")), device="cpu", policy="hybrid", num_gpu_blocks=8,
                                  max_model_len=128,
                                  cpu_kv_gib=0.01))
    held = [weakref.ref(engine.gpu_storage.kv), weakref.ref(engine.cpu_storage.kv),
            weakref.ref(next(engine.model.parameters()) if hasattr(engine.model, "parameters")
                        else engine.model.embed_tokens)]
    with engine:
        engine.add_request(None, {"prompt_token_ids": [1, 2, 3]})
        while engine.has_unfinished_requests():
            engine.step()
    gc.collect()
    assert [ref() is None for ref in held] == [True, True, True]
    assert engine.config.cache.num_gpu_blocks == 8  # still readable
    with pytest.raises(RuntimeError, match="closed"):
        engine.step()
    engine.close()  # idempotent


class _FakeDevice:
    """torch.cuda's memory calls over a fake device: freed tensors stay cached until ``empty_cache``."""

    def __init__(self, total: int) -> None:
        self.total, self.live, self.cached, self.calls = total, 0, 0, []

    def mem_get_info(self, device=None):
        self.calls.append("mem_get_info")
        return self.total - self.live - self.cached, self.total

    def empty_cache(self):
        self.calls.append("empty_cache")
        self.cached = 0

    def synchronize(self, device=None):
        self.calls.append("synchronize")


def test_kv_sizing_returns_cached_blocks_first(monkeypatch):
    """A second engine in one process must not see the first one's freed-but-cached pools as used."""
    from apexlib.engine import engine as engine_module

    fake = _FakeDevice(total=16 * 2**30)
    for name in ("mem_get_info", "empty_cache", "synchronize"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))

    class Pool:  # a closed engine's pool caught in a reference cycle: freed only by the collector
        def __init__(self):
            self.me = self
            fake.live += 9 * 2**30

        def __del__(self):
            fake.live -= 9 * 2**30
            fake.cached += 9 * 2**30

    gc.disable()
    try:
        Pool()
        memory = engine_module.measure_device_memory("cuda", activation_reserve=2**30)
    finally:
        gc.enable()
    assert memory.free_after_load == 16 * 2**30 and memory.total == 16 * 2**30
    assert memory.kv_budget == 15 * 2**30
    assert fake.calls.index("empty_cache") < fake.calls.index("mem_get_info")


def test_run_benchmark_closes_the_engine_it_builds(monkeypatch, tiny_path):
    from apexlib.bench.benchmark import run_benchmark
    from apexlib.engine.engine import LLMEngine
    from apexlib.engine.settings import BenchmarkSettings
    from apexlib.workloads import get_preset

    closed = []
    real_close = LLMEngine.close

    def close(self):
        closed.append(self)
        real_close(self)

    monkeypatch.setattr(LLMEngine, "close", close)
    settings = BenchmarkSettings.create(model=str(tiny_path("gqa")), device="cpu", warmup_requests=0)
    run_benchmark(get_preset("tiny-smoke", num_requests=2), settings, progress=False)
    assert len(closed) == 1


# -- SDPA's inputs --------------------------------------------------------------------------------------
@pytest.fixture
def recorded_sdpa(monkeypatch):
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, is_causal=False, enable_gqa=False, **kwargs):
        calls.append(types.SimpleNamespace(query=query.shape, key=key.shape, value=value.shape, attn_mask=attn_mask,
                                           is_causal=is_causal, enable_gqa=enable_gqa))
        return real(query, key, value, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=enable_gqa, **kwargs)

    monkeypatch.setattr(base, "F", types.SimpleNamespace(scaled_dot_product_attention=sdpa))
    return calls


def _naive_attention(q, k, v, positions):
    """q [n, H, D] at absolute positions, k/v [ctx, KVH, D] -> [n, H, D] (causal over absolute positions)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("nhd,thd->hnt", q, k) / q.shape[-1] ** 0.5
    allowed = torch.arange(k.shape[0]).unsqueeze(0) <= torch.tensor(positions).unsqueeze(1)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hnt,thd->nhd", scores.softmax(-1), v)


def _mixed_batch(seed: int = 0):
    """One prefill from 0 (5 tokens), one chunk from position 6 (4 tokens), two decodes: GQA 4 heads / 2."""
    generator = torch.Generator().manual_seed(seed)
    heads, kv_heads, dim, block_size = 4, 2, 16, 4
    key_cache = torch.randn(32, block_size, kv_heads, dim, generator=generator)
    value_cache = torch.randn(32, block_size, kv_heads, dim, generator=generator)
    tables = torch.tensor([[0, 1, 0], [2, 3, 4], [5, 6, 7], [8, 0, 0]], dtype=torch.int32)
    starts, contexts = (0, 6, 9, 3), (5, 10, 10, 4)
    rows = (5, 4, 1, 1)
    query_start = [0]
    for n in rows:
        query_start.append(query_start[-1] + n)
    total = query_start[-1]
    query = torch.randn(total, heads, dim, generator=generator)
    key = torch.randn(total, kv_heads, dim, generator=generator)
    value = torch.randn(total, kv_heads, dim, generator=generator)
    slots = []
    for index, n in enumerate(rows):
        for p in range(starts[index], starts[index] + n):
            slots.append(int(tables[index, p // block_size]) * block_size + p % block_size)
    metadata = AttentionMetadata(num_prefills=2, num_decodes=2, query_start_loc=tuple(query_start),
                                 start_positions=starts, context_lens_list=contexts,
                                 context_lens=torch.tensor(contexts, dtype=torch.int32), block_tables=tables,
                                 slot_mapping=torch.tensor(slots, dtype=torch.long))
    backend = TorchReferenceBackend()
    backend.store_kv(key, value, key_cache, value_cache, metadata.slot_mapping)
    expected = []
    for index, n in enumerate(rows):
        first = query_start[index]
        k = base.gather_sequence_kv(key_cache, tables[index], contexts[index])
        v = base.gather_sequence_kv(value_cache, tables[index], contexts[index])
        expected.append(_naive_attention(query[first:first + n], k, v, list(range(starts[index], contexts[index]))))
    return backend, (query, key, value, key_cache, value_cache, metadata), torch.cat(expected)


@pytest.mark.parametrize("gqa_native", [True, False], ids=["flash-gqa", "repeat-kv"])
def test_sdpa_gets_4d_inputs_and_a_lower_right_causal_bias(recorded_sdpa, monkeypatch, gqa_native):
    from torch.nn.attention.bias import CausalBias, CausalVariant

    monkeypatch.setattr(base, "native_gqa", lambda device, dtype, head_dim: gqa_native)
    backend, inputs, expected = _mixed_batch()
    out = backend.forward(*inputs)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    prefill_from_zero, chunk, decode = recorded_sdpa[0], recorded_sdpa[1], recorded_sdpa[-1]
    assert all(len(call.query) == len(call.key) == len(call.value) == 4 for call in recorded_sdpa)
    assert prefill_from_zero.is_causal and prefill_from_zero.attn_mask is None
    assert isinstance(chunk.attn_mask, CausalBias) and chunk.attn_mask.variant == CausalVariant.LOWER_RIGHT
    assert not chunk.is_causal
    for call in (prefill_from_zero, chunk):
        assert call.query[1] == 4
        # grouped K/V only where the kernel takes them; else repeated to the query's heads
        assert (call.key[1], call.enable_gqa) == ((2, True) if gqa_native else (4, False))
    # decode: the query heads of one KV head are rows of one query, so K/V keep their 2 heads, no enable_gqa
    assert decode.query[1:3] == (2, 2) and decode.key[1] == 2 and not decode.enable_gqa


@pytest.mark.parametrize(("capability", "dtype", "head_dim", "expected"), [
    ((7, 5), torch.float16, 128, False),  # T4: no flash kernel
    ((8, 6), torch.float16, 128, True),  # A10
    ((9, 0), torch.bfloat16, 128, True),
    ((9, 0), torch.float32, 128, False),  # flash is half precision only
    ((9, 0), torch.float16, 12, False),  # head size not a multiple of 8
])
def test_native_gqa_under_a_faked_compute_capability(monkeypatch, capability, dtype, head_dim, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert base.native_gqa(torch.device("cuda"), dtype, head_dim) is expected
    assert base.native_gqa(torch.device("cpu"), dtype, head_dim) is True


class _NoReadBack(torch.Tensor):
    """A tensor that refuses to be read back to the host (a device value would sync the host)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.item, torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.tolist,
                    torch.Tensor.__bool__, torch.Tensor.__float__):
            raise AssertionError(f"{func.__name__} read a device value back inside a layer")
        return super().__torch_function__(func, types, args, kwargs or {})


def test_decode_takes_its_padding_from_host_side_lengths(recorded_sdpa):
    backend, inputs, expected = _mixed_batch(1)
    query, key, value, key_cache, value_cache, metadata = inputs
    guarded = dataclasses.replace(metadata, context_lens=metadata.context_lens.as_subclass(_NoReadBack),
                                  block_tables=metadata.block_tables.as_subclass(_NoReadBack))
    out = backend.forward(query, key, value, key_cache, value_cache, guarded)
    torch.testing.assert_close(out.as_subclass(torch.Tensor), expected, rtol=1e-4, atol=1e-5)


def test_decode_groups_bound_the_padded_gather():
    lengths = [30, 2, 2, 40, 5, 100, 1]
    groups = base.decode_groups(lengths, max_tokens=64)
    assert [row for first, last in groups for row in range(first, last)] == list(range(len(lengths)))
    for first, last in groups:
        assert (last - first) * max(lengths[first:last]) <= 64 or last - first == 1
    assert base.decode_groups([], 64) == []


def test_decode_in_groups_matches_one_gather(monkeypatch):
    backend, inputs, expected = _mixed_batch(2)
    real = base.decode_groups
    monkeypatch.setattr(base, "decode_groups", lambda lens, max_tokens=4: real(lens, 4))
    torch.testing.assert_close(backend.forward(*inputs), expected, rtol=1e-4, atol=1e-5)


# -- cuda:N ------------------------------------------------------------------------------------------------
def test_cuda_n_becomes_the_current_device_before_anything_is_loaded(monkeypatch, tiny_path):
    from apexlib.engine import engine as engine_module

    calls = []

    class Loaded(Exception):
        pass

    def load_model(*args):
        calls.append(("load", args[-1]))
        raise Loaded

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    def set_device(device):
        if torch.device(device).index is None:  # as torch does
            raise ValueError(f"Expected a torch.device with a specified index or an integer, but got:{device}")
        calls.append(("set_device", str(device)))

    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(engine_module, "load_model", load_model)
    with pytest.raises(Loaded):
        engine_module.LLMEngine(EngineArgs(model=str(tiny_path("gqa")), device="cuda:1"))
    assert calls == [("set_device", "cuda:1"), ("load", "cuda:1")]
    calls.clear()
    with pytest.raises(Loaded):  # plain "cuda" is the current device already
        engine_module.LLMEngine(EngineArgs(model=str(tiny_path("gqa")), device="cuda"))
    assert calls == [("load", "cuda")]


def test_the_subtask_clock_records_on_the_runner_devices_stream(monkeypatch):
    """The clock's events go on cuda:N's current stream, not on the thread's current device's."""
    from apexlib.runner import model_runner

    recorded = []

    class Event:
        def __init__(self, enable_timing=False):
            pass

        def record(self, stream=None):
            recorded.append(stream)

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: f"stream of {device}")
    clock = model_runner._SubtaskClock(torch.device("cuda:1"), enabled=True)
    clock.stop("linear", clock.start())
    assert recorded == ["stream of cuda:1", "stream of cuda:1"]


# -- dtype, reserve, limits -----------------------------------------------------------------------------
def _model_config(dtype: str = "bfloat16", **overrides) -> ModelConfig:
    fields = dict(path="x", vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                  num_heads=32, num_kv_heads=8, head_dim=128, max_position_embeddings=4096, rms_norm_eps=1e-5,
                  rope_theta=10000.0, rope_scaling=None, tie_word_embeddings=False, checkpoint_dtype=dtype,
                  bos_token_id=1, eos_token_ids=(2,))
    fields.update(overrides)
    return ModelConfig(**fields)


def test_bfloat16_checkpoint_runs_in_float16_below_sm80(caplog):
    args = EngineArgs(model="x")
    assert args.resolve_dtype(_model_config(), "cuda", (7, 5)) == "float16"
    assert args.resolve_dtype(_model_config(), "cuda", (8, 0)) == "bfloat16"
    assert args.resolve_dtype(_model_config("float16"), "cuda", (7, 5)) == "float16"
    assert args.resolve_dtype(_model_config(), "cpu", None) == "bfloat16"
    with caplog.at_level("WARNING", logger="apexlib.engine.args"):
        assert EngineArgs(model="x", dtype="bfloat16").resolve_dtype(_model_config(), "cuda", (7, 5)) == "bfloat16"
    assert "emulated" in caplog.text


def test_the_engine_passes_the_device_capability(monkeypatch):
    from apexlib.engine import engine as engine_module

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert engine_module.compute_capability("cuda:0") == (7, 5)
    assert engine_module.compute_capability("cpu") is None


def test_reserve_follows_the_budget_without_chunked_prefill():
    config = _model_config(max_position_embeddings=8192)
    args = EngineArgs(model="x", enable_chunked_prefill=False, max_model_len=8192)
    assert args.resolve_limits(config) == (8192, 8192)
    resolved = args.create_engine_config(config, "cuda", "float16", 8 * 2**30)
    assert resolved.scheduler.max_num_batched_tokens == 8192
    assert EngineArgs(model="x").resolve_limits(config) == (8192, 2048)
    assert activation_reserve_bytes(config, 8192, 8192) > activation_reserve_bytes(config, 2048, 8192)


def test_reserve_covers_the_attention_working_set():
    config = _model_config("float16", num_kv_heads=32)
    workspace = engine_args.attention_workspace_bytes(config, 2048, 4096, "float16")
    # a late 2048-token chunk over 4096 tokens of context at 32 heads: K/V gathered and the query/output
    assert workspace >= (2 * 4096 + 2 * 2048) * 32 * 128 * 2
    plain = 2048 * 4 * (4096 * 4 + 11008 * 3 + 32000) + 512 * 2**20
    assert activation_reserve_bytes(config, 2048, 4096) == plain + workspace


# -- on a CUDA device (gpu-check's cuda-tests step runs these first) ------------------------------------
from conftest import requires_cuda  # noqa: E402


@requires_cuda
@pytest.mark.cuda
def test_swaps_between_a_cuda_tier_and_the_host_tier_on_cuda(monkeypatch):
    monkeypatch.setattr(kv_storage, "STAGING_BYTES", 0)  # the least: chunks of one block, both buffers in turn
    host = _tier(16, 0)
    device = KVStorage(num_layers=3, num_blocks=12, block_size=4, num_kv_heads=2, head_dim=8, dtype=torch.float32,
                       device="cuda")
    device.kv.zero_()
    pairs = [(15, 0), (3, 7), (8, 2), (0, 11), (9, 5)]
    copy_blocks(host, device, pairs)
    staging = host.staging(device.device)
    assert staging.blocks_per_chunk == 1 and all(buffer.is_pinned() for buffer in staging.buffers)
    assert not host.kv.is_pinned()
    for src, dst in pairs:
        torch.testing.assert_close(device.kv[:, :, dst].cpu(), host.kv[:, :, src], rtol=0, atol=0)
    device.kv.mul_(2.0)  # queued on the device before the copy back: the host must see it
    back = [(0, 1), (7, 4), (11, 6), (2, 9)]
    copy_blocks(device, host, back)
    for src, dst in back:
        torch.testing.assert_close(host.kv[:, :, dst], device.kv[:, :, src].cpu(), rtol=0, atol=0)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_reference_attention_runs_on_fused_kernels_on_cuda(dtype):
    """With SDPA's math path disabled, every prefill and decode still runs (flash or memory-efficient)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend, inputs, expected = _mixed_batch(3)
    query, key, value, key_cache, value_cache, metadata = inputs
    on = lambda t: t.to("cuda", dtype if t.is_floating_point() else t.dtype)  # noqa: E731
    moved = dataclasses.replace(metadata, context_lens=on(metadata.context_lens),
                                block_tables=on(metadata.block_tables), slot_mapping=on(metadata.slot_mapping))
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        out = backend.forward(on(query), on(key), on(value), on(key_cache), on(value_cache), moved)
    torch.cuda.synchronize()
    tolerance = 2e-2 if dtype == torch.float16 else 1e-4
    torch.testing.assert_close(out.float().cpu(), expected, rtol=tolerance, atol=tolerance)


@requires_cuda
@pytest.mark.cuda
def test_close_returns_the_device_memory_on_cuda(tiny_path):
    from apexlib.engine.engine import LLMEngine

    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    arguments = dict(model=str(tiny_path("gqa")), device="cuda", dtype="float32", max_model_len=128, max_num_seqs=8)
    first = LLMEngine(EngineArgs(**arguments))
    assert first.device_memory is not None and first.device_memory.total > 0
    assert torch.cuda.memory_allocated() > baseline
    first.close()
    assert torch.cuda.memory_allocated() <= baseline
    with LLMEngine(EngineArgs(**arguments)) as second:
        assert second.config.cache.num_gpu_blocks == first.config.cache.num_gpu_blocks
    capability = torch.cuda.get_device_capability()
    assert second.config.dtype == "float32" and capability >= (5, 0)
