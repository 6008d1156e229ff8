"""Cost models without torch: interpolation, extrapolation flags, roofline arithmetic, iteration composition."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from apexlib.core.plan import OverlapMode
from apexlib.costs import (
    PROFILE_SCHEMA,
    HybridAdjustment,
    IterationShape,
    ModelShape,
    RooflineCostModel,
    TableCostModel,
    ZeroCostModel,
    pipeline_forward_seconds,
    predict_iteration,
)
from apexlib.costs.hardware import HARDWARE, HardwareSpec, get_hardware
from apexlib.costs.table import Curve, Grid

TOY = ModelShape("toy", hidden_size=4, intermediate_size=8, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=2,
                 vocab_size=10)


def toy_profile(hybrid=None):
    """Hand-made tables: linear 1 ms + 0.1 ms/token (layers), sample 0.01 ms/row, prefill 0.001 ms * L,
    decode attention: GPU 1e-6 s per kv token, CPU 4e-6 s per kv token, copies 1e-9 s/byte, overhead 0.5 ms."""
    batches, contexts = [1, 4, 16], [16, 64, 256]
    return {
        "schema": PROFILE_SCHEMA, "label": "toy", "provenance": {"device": "toy"}, "model_shape": TOY.to_dict(),
        "tables": {
            "linear": {"num_tokens": [1, 2, 4, 8], "seconds": [1.1e-3, 1.2e-3, 1.4e-3, 1.8e-3]},
            "sample": {"num_rows": [1, 8], "seconds": [1e-5, 8e-5]},
            "gpu_prefill_attention": {"prompt_length": [8, 64], "seconds": [8e-6, 64e-6]},
            "gpu_decode_attention": {"batch": batches, "context_length": contexts,
                                     "seconds": [[1e-6 * b * c for c in contexts] for b in batches], "model": "grid"},
            "cpu_decode_attention": {"batch": batches, "context_length": contexts,
                                     "seconds": [[4e-6 * b * c for c in contexts] for b in batches], "model": "grid"},
            "transfer": {d: {"bytes": [0, 1000], "seconds": [0.0, 1e-6]} for d in ("d2h", "h2d")},
            "launch_overhead": {"seconds": 5e-4},
            **({"hybrid_calibration": {"modes": hybrid}} if hybrid else {}),
        },
    }


def test_curve_exact_linear_and_flagged_extrapolation():
    curve = Curve([1, 2, 4], [10.0, 20.0, 30.0])
    assert curve(2) == (20.0, False)
    assert curve(3) == (25.0, False)
    assert curve(6) == (40.0, True)  # slope of the last two points
    assert curve(0) == (0.0, True)


def test_grid_bilinear_exact_and_flags():
    grid = Grid([1, 2], [10, 20], [[1.0, 2.0], [3.0, 4.0]])
    assert grid(1, 10) == (1.0, False) and grid(2, 20) == (4.0, False)
    assert grid(1.5, 15) == (2.5, False)
    value, outside = grid(3, 10)
    assert value == 5.0 and outside


def test_table_model_interpolates_and_counts_extrapolation():
    model = TableCostModel(toy_profile())
    assert model.linear(4, 0) == pytest.approx(1.4e-3)
    assert model.linear(3, 0) == pytest.approx(1.3e-3)
    assert model.linear(0, 8) == pytest.approx(8e-5)
    assert model.linear(2) == pytest.approx(1.2e-3 + 2e-5)
    assert model.extrapolated == 0
    # decode attention a * kv_tokens is reproduced exactly between grid points (bilinear)
    assert model.gpu_decode_attention(4 * 40, 4) == pytest.approx(1e-6 * 160)
    assert model.cpu_decode_attention(10 * 100, 10) == pytest.approx(4e-6 * 1000)
    assert model.extrapolated == 0
    assert model.linear(16, 0) == pytest.approx(1.8e-3 + 8 * 0.1e-3)
    assert model.extrapolated == 1 and model.extrapolations["linear"] == 1
    model.gpu_decode_attention(32 * 64, 32)
    assert model.extrapolations["gpu_decode_attention"] == 1
    assert model.gpu_prefill_attention([8, 64, 36]) == pytest.approx((8 + 64 + 36) * 1e-6)
    with pytest.raises(ValueError):
        model.transfer(10, "sideways")


def test_predict_none_and_async_by_hand():
    model = TableCostModel(toy_profile())
    shape = IterationShape(mode="none", prefill_lengths=(8,), gpu_decode_kv_tokens=3 * 64, num_gpu_decodes=3)
    predicted = predict_iteration(model, shape)
    # tokens 11 -> linear extrapolated 1.8 + 3*0.1 = 2.1 ms; sample 4 rows 0.04 ms; prefill 8 us; decode 192 us
    assert predicted.total == pytest.approx(2.1e-3 + 4e-5 + 8e-6 + 192e-6 + 5e-4)
    shape = IterationShape(mode="async_overlap", gpu_decode_kv_tokens=2 * 64, num_gpu_decodes=2,
                           cpu_decode_kv_tokens=2 * 64, num_cpu_decodes=2, transfer_bytes_per_cpu_token=1000,
                           transfer_to_cpu_fraction=0.5)
    predicted = predict_iteration(model, shape)
    # linear(4)=1.4 ms, sample 4 rows 40 us, G = 128 us, C = 512 us, X = 2 layers * (1000/2 bytes each way) = 2 us
    assert predicted.transfer == pytest.approx(2e-6)
    assert predicted.total == pytest.approx(1.4e-3 + 4e-5 + max(128e-6, 512e-6 + 2e-6) + 5e-4)
    with pytest.raises(ValueError):
        IterationShape(mode="none", num_cpu_decodes=1, cpu_decode_kv_tokens=5)


def test_async_hybrid_adjustment_by_hand():
    hybrid = {"async_overlap": {"per_job_seconds": 1e-5, "device_slowdown": 2.0, "serial_fraction": 0.5}}
    model = TableCostModel(toy_profile(hybrid))
    assert model.hybrid_adjustment("async_overlap") == HybridAdjustment(1e-5, 2.0, 0.5)
    shape = IterationShape(mode="async_overlap", gpu_decode_kv_tokens=2 * 64, num_gpu_decodes=2,
                           cpu_decode_kv_tokens=2 * 16, num_cpu_decodes=2)
    # s*Lin = 2.8 ms, jobs 2 layers * 10 us, s*G = 256 us, C = 128 us -> 256 + 0.5 * 128
    expected = 2.8e-3 + 2e-5 + 256e-6 + 64e-6 + 4e-5 + 5e-4
    assert predict_iteration(model, shape).total == pytest.approx(expected)


def test_cpu_slowdown_scales_cpu_attention_by_hand():
    hybrid = {"async_overlap": {"per_job_seconds": 0.0, "device_slowdown": 1.0, "serial_fraction": 0.0,
                                "cpu_slowdown": 1.5}}
    model = TableCostModel(toy_profile(hybrid))
    assert model.hybrid_adjustment("async_overlap") == HybridAdjustment(0.0, 1.0, 0.0, 1.5)
    shape = IterationShape(mode="async_overlap", gpu_decode_kv_tokens=2 * 64, num_gpu_decodes=2,
                           cpu_decode_kv_tokens=2 * 64, num_cpu_decodes=2)
    # Lin(4) 1.4 ms, sample 40 us, overhead 0.5 ms, max(G = 128 us, c*C = 1.5 * 512 us)
    predicted = predict_iteration(model, shape)
    assert predicted.cpu_attention == pytest.approx(768e-6)
    assert predicted.total == pytest.approx(1.4e-3 + 4e-5 + 768e-6 + 5e-4)
    # profiles from before the CPU slowdown was measured read as 1.0
    older = TableCostModel(toy_profile({"async_overlap": {"per_job_seconds": 0.0, "device_slowdown": 1.0}}))
    assert older.hybrid_adjustment("async_overlap").cpu_slowdown == 1.0


def test_engine_step_overhead_is_read_from_the_profile():
    assert TableCostModel(toy_profile()).engine_step_overhead(10) == 0.0  # not measured: nothing added
    profile = toy_profile()
    profile["tables"]["engine_step_overhead"] = {"seconds": 2e-5, "per_sequence_seconds": 1e-6}
    assert TableCostModel(profile).engine_step_overhead(10) == pytest.approx(3e-5)


def test_pipeline_schedule_by_hand():
    # one layer: device pre_A=1, G=1, pre_B=1, post_A=3 ... A's CPU job 10 starts at 1 -> post_A at 11..14,
    # B's job starts after A's (11) and pre_B (3): 11..21; post_B 21..24
    assert pipeline_forward_seconds(1, 0.25, 4.0, 4.0, 1.0, 10.0, 10.0) == pytest.approx(24.0)
    # device-bound: tiny CPU jobs, two layers = every device step in sequence
    assert pipeline_forward_seconds(2, 0.5, 2.0, 2.0, 1.0, 0.0, 0.0) == pytest.approx(2 * (2 + 1 + 2))
    # CPU-bound steady state: layers * (cpu_a + cpu_b) plus the start (pre_A) and the drain (post_B)
    assert pipeline_forward_seconds(3, 0.5, 0.2, 0.2, 0.0, 5.0, 5.0) == pytest.approx(0.1 + 30.0 + 0.1)


def test_predict_pipeline_uses_the_schedule():
    model = TableCostModel(toy_profile())
    shape = IterationShape(mode="asymmetric_pipeline", gpu_decode_kv_tokens=64, num_gpu_decodes=1,
                           cpu_decode_kv_tokens=4 * 64, num_cpu_decodes=4, pipeline_split=(2 * 64, 2))
    predicted = predict_iteration(model, shape)
    layers = TOY.num_layers
    linear_a, linear_b = model.linear(3, 0), model.linear(2, 0)
    forward = pipeline_forward_seconds(layers, TOY.pre_attention_fraction, linear_a / layers, linear_b / layers,
                                       64e-6 / layers, 512e-6 / layers, 512e-6 / layers)
    assert predicted.total == pytest.approx(forward + model.linear(0, 5) + 5e-4)
    assert predicted.linear == pytest.approx(linear_a + linear_b + model.linear(0, 5))
    # an empty second sub-batch runs as one batch: the async-overlap formula
    one = IterationShape(mode="asymmetric_pipeline", gpu_decode_kv_tokens=64, num_gpu_decodes=1,
                         cpu_decode_kv_tokens=64, num_cpu_decodes=1, pipeline_split=(64, 1))
    assert predict_iteration(model, one).total == pytest.approx(
        predict_iteration(model, IterationShape(mode="async_overlap", gpu_decode_kv_tokens=64, num_gpu_decodes=1,
                                                cpu_decode_kv_tokens=64, num_cpu_decodes=1)).total)


def test_zero_model():
    shape = IterationShape(mode=OverlapMode.ASYNC_OVERLAP, prefill_lengths=(5,), num_cpu_decodes=2,
                           cpu_decode_kv_tokens=20)
    assert predict_iteration(ZeroCostModel(), shape).total == 0.0


def test_roofline_by_hand():
    spec = HardwareSpec(name="toy", memory_bandwidth_gbps=1.0, peak_fp16_flops=1e9, peak_fp32_flops=1e9,
                        memory_gib=1.0, pcie_gbps=1.0, cpu_name="toy", cpu_cores=1, dram_gbps=0.5, source="test")
    model = RooflineCostModel(spec, TOY, dtype="float16", memory_efficiency=1.0, attention_efficiency=1.0,
                              compute_efficiency=1.0, cpu_attention_efficiency=1.0, transfer_efficiency=1.0,
                              transfer_latency_seconds=0.0, per_layer_launch_seconds=1e-3,
                              iteration_overhead_seconds=0.0)
    params = 2 * (4 * (2 + 2) * 2 + 2 * 2 * 4 + 3 * 4 * 8)  # 2 layers x (QKV 32 + O 16 + MLP 96) = 288
    assert TOY.layer_parameters * 2 == params
    # 1 token: bytes 288*2 = 576 B at 1 GB/s; FLOPs 576 at 1 GFLOP/s -> both 576 ns; LM head none
    assert model.linear(1, 0) == pytest.approx(576e-9)
    # 1000 tokens: compute bound, 2*288*1000 FLOPs
    assert model.linear(1000, 0) == pytest.approx(576e-6)
    # decode: kv bytes per token = 2 * 2 layers * 1 head * 2 dim * 2 B = 16 B
    assert TOY.kv_bytes_per_token("float16") == 16
    assert model.gpu_decode_attention(1000, 4) == pytest.approx(max(16e3 / 1e9, 4 * 1000 * 2 * 2 * 2 / 1e9))
    assert model.cpu_decode_attention(1000, 4) == pytest.approx(16e3 / 0.5e9)
    assert model.transfer(1000, "h2d") == pytest.approx(1e-6)
    assert model.launch_overhead() == pytest.approx(2e-3)


def test_hardware_entries_have_sources():
    for key, spec in HARDWARE.items():
        assert spec.source
        for name in ("memory_bandwidth_gbps", "peak_fp16_flops", "pcie_gbps", "dram_gbps"):
            assert spec.source_of(name), (key, name)
        assert "ASSUMPTION" in spec.source_of("dram_gbps")
    assert get_hardware("t4").memory_bandwidth_gbps == 320.0
    assert get_hardware("a10g-32vcpu").cpu_cores == 16
    assert math.isclose(get_hardware("t4").pcie_gbps, 15.75)
    with pytest.raises(ValueError):
        get_hardware("v100")


def test_cost_model_imports_no_torch():
    code = ("import sys; import apexlib.costs, apexlib.costs.hardware; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
