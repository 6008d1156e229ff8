"""Iteration composition: an ``IterationShape`` from a plan, and ``predict_iteration`` composing the subtasks per execution mode as the runner schedules them."""

from __future__ import annotations

import math
from dataclasses import dataclass

from apexlib.core.plan import CpuRuntime, IterationPlan, OverlapMode, PredictedTimes, Tier
from apexlib.costs.base import CostModel


@dataclass(frozen=True)
class IterationShape:
    """What a cost model needs to know about one iteration (torch-free, built from a plan or by a policy).

    ``pipeline_split`` = (kv tokens, count) of the CPU decodes in sub-batch 0 of an asymmetric
    pipeline (sub-batch 0 also holds every prefill and GPU decode; sub-batch 1 the other CPU
    decodes). ``transfer_bytes_per_cpu_token``: q+k+v to the CPU plus the output back, all layers
    (0 where the runner copies nothing, as with device=cpu); ``transfer_to_cpu_fraction`` of it goes
    device->host. ``swap_out_bytes`` / ``swap_in_bytes``: KV blocks moved before the forward.
    ``num_sampled``: rows that run the LM head (default: one per prefill and decode).
    """

    mode: OverlapMode | str = OverlapMode.NONE
    prefill_lengths: tuple[int, ...] = ()
    gpu_decode_kv_tokens: int = 0
    num_gpu_decodes: int = 0
    cpu_decode_kv_tokens: int = 0
    num_cpu_decodes: int = 0
    pipeline_split: tuple[int, int] | None = None
    transfer_bytes_per_cpu_token: int = 0
    transfer_to_cpu_fraction: float = 0.75
    swap_out_bytes: int = 0
    swap_in_bytes: int = 0
    num_sampled: int | None = None
    cpu_runtime: CpuRuntime | str = CpuRuntime.WORKER

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", OverlapMode(self.mode))
        object.__setattr__(self, "cpu_runtime", CpuRuntime(self.cpu_runtime))
        object.__setattr__(self, "prefill_lengths", tuple(int(n) for n in self.prefill_lengths))
        if self.mode is OverlapMode.NONE and self.num_cpu_decodes:
            raise ValueError("mode 'none' runs no CPU decodes (they wait); num_cpu_decodes must be 0")
        if min(self.gpu_decode_kv_tokens, self.num_gpu_decodes, self.cpu_decode_kv_tokens,
               self.num_cpu_decodes) < 0:
            raise ValueError("token and request counts must be >= 0")
        if self.pipeline_split is not None:
            kv, count = self.pipeline_split
            if not (0 <= count <= self.num_cpu_decodes and 0 <= kv <= self.cpu_decode_kv_tokens):
                raise ValueError(f"pipeline_split {self.pipeline_split} exceeds the CPU decodes "
                                 f"({self.cpu_decode_kv_tokens} kv tokens, {self.num_cpu_decodes} requests)")

    @property
    def num_sequences(self) -> int:
        return len(self.prefill_lengths) + self.num_gpu_decodes + self.num_cpu_decodes

    @property
    def num_tokens(self) -> int:
        return sum(self.prefill_lengths) + self.num_gpu_decodes + self.num_cpu_decodes

    @property
    def sampled_rows(self) -> int:
        return self.num_sequences if self.num_sampled is None else self.num_sampled


def shape_from_plan(plan: IterationPlan, transfer_bytes_per_cpu_token: int = 0,
                    kv_bytes_per_block: int = 0, transfer_to_cpu_fraction: float = 0.75) -> IterationShape:
    """The ``IterationShape`` of a scheduled plan (decode kv tokens = context after the new token).

    A sequence counts as a decode by ``ScheduledSequence.is_decode`` (one token after at least one output,
    sampled), the rule the scheduler and the runner use; everything else is a prefill chunk.
    """
    prefill_lengths: list[int] = []
    gpu_kv = gpu_count = cpu_kv = cpu_count = sampled = 0
    cpu_tier = Tier.CPU
    for s in plan.sequences:
        sampled += s.sample
        if not s.is_decode:
            prefill_lengths.append(len(s.token_ids))
        elif s.tier is cpu_tier:
            cpu_kv += s.context_len
            cpu_count += 1
        else:
            gpu_kv += s.context_len
            gpu_count += 1
    split = None
    if cpu_count and plan.mode is OverlapMode.ASYMMETRIC_PIPELINE and plan.pipeline_batches is not None:
        first = set(plan.pipeline_batches[0])
        in_first = [s for s in plan.cpu_decodes if s.request_id in first]
        split = (sum(s.context_len for s in in_first), len(in_first))
    return IterationShape(
        mode=plan.mode if cpu_count else OverlapMode.NONE, prefill_lengths=tuple(prefill_lengths),
        gpu_decode_kv_tokens=gpu_kv, num_gpu_decodes=gpu_count, cpu_decode_kv_tokens=cpu_kv,
        num_cpu_decodes=cpu_count, pipeline_split=split, transfer_bytes_per_cpu_token=transfer_bytes_per_cpu_token,
        transfer_to_cpu_fraction=transfer_to_cpu_fraction, swap_out_bytes=len(plan.swap_out) * kv_bytes_per_block,
        swap_in_bytes=len(plan.swap_in) * kv_bytes_per_block, num_sampled=sampled, cpu_runtime=plan.cpu_runtime)


def _cpu_job_seconds(cost_model: CostModel, shape: IterationShape, kv_tokens: int, count: int) -> tuple[float, float]:
    """(CPU attention, transfers) of ``count`` CPU decodes, whole model; copies are one per layer and direction."""
    if count <= 0:
        return 0.0, 0.0
    layers = max(1, cost_model.num_layers)
    total_bytes = count * shape.transfer_bytes_per_cpu_token
    to_cpu = total_bytes * shape.transfer_to_cpu_fraction
    copies = layers * (cost_model.transfer(int(to_cpu / layers), "d2h")
                       + cost_model.transfer(int((total_bytes - to_cpu) / layers), "h2d"))
    return cost_model.cpu_decode_attention(kv_tokens, count), copies


def predict_iteration(cost_model: CostModel, shape: IterationShape) -> PredictedTimes:
    """Predicted subtask and total seconds of one iteration, following the runner's schedule.

    Notation (whole model): ``Lin(n)`` linear work of n tokens without the LM head, ``S`` LM head and
    sampling of the sampled rows, ``G`` device attention (prefills + GPU decodes), ``C`` CPU attention
    of the CPU decodes, ``X`` their q/k/v and output copies, ``W`` KV swaps, ``O`` launch overhead
    (fixed + per sequence). Per layer, every term is divided by ``L`` (num_layers).

    - ``none``: ``W + Lin(all) + G + S + O``.
    - ``async_overlap`` (APEX): one batch; per layer the CPU job (copies + CPU attention) starts
      after the layer's pre-attention linear and the output projection waits for it, while the
      device runs G: ``W + Lin(all) + max(G, C + X) + S + O``.
    - ``asymmetric_pipeline`` (NEO, the runner's ``_forward_pipelined``): sub-batch A (prefills, GPU
      decodes, the split's CPU decodes), sub-batch B (the other CPU decodes). Per layer i the device
      runs ``pre_A(i), G(i), [wait B(i-1)] post_B(i-1), pre_B(i), [wait A(i)] post_A(i)`` and the
      CPU worker runs its queue ``A(i), B(i)`` in order (A(i) may start once pre_A(i) is done and
      B(i-1) is finished; B(i) once pre_B(i) is done and A(i) finished). The iteration's forward is
      the finish time of this two-resource schedule over L layers (simulated exactly, O(L)), then
      ``+ W + S + O``; each sub-batch pays its own pass over the weights (``Lin(A) + Lin(B)``).

    Measured hybrid adjustments (``cost_model.hybrid_adjustment(mode)``: per-job seconds j, device
    slowdown s, serial fraction a, CPU slowdown c, from the profile's ``hybrid_calibration``;
    (0, 1, 0, 1) for an ideal machine): device work (Lin, G) is multiplied by s and CPU attention C by
    c (the worker and the device thread compete: on device=cpu they share caches, memory and the
    interpreter lock), every CPU job costs the device thread j (hand-over and collection), and a share
    a of the shorter side does not overlap, so async_overlap becomes
    ``W + s*Lin + L*j + max(s*G, c*C + X) + a*min(s*G, c*C + X) + S + O``; the pipeline adds j to each
    pre-attention step and scales its device work by s and its CPU attention by c.
      In steady state a layer takes max(Lin(A)+G+Lin(B), C_A+X_A+C_B+X_B, C_A+X_A+Lin(A), C_B+X_B+Lin(B))/L.
      If either sub-batch is empty the runner runs one batch: as ``async_overlap``.
    """
    layers = max(1, cost_model.num_layers)
    swaps = cost_model.transfer(shape.swap_out_bytes, "d2h") + cost_model.transfer(shape.swap_in_bytes, "h2d")
    sample = cost_model.linear(0, shape.sampled_rows)  # LM head + sampling only
    overhead = cost_model.launch_overhead() + cost_model.launch_overhead_per_sequence() * shape.num_sequences
    prefill = cost_model.gpu_prefill_attention(shape.prefill_lengths)
    gpu_attention = prefill + cost_model.gpu_decode_attention(shape.gpu_decode_kv_tokens, shape.num_gpu_decodes)
    mode = shape.mode
    tokens = shape.num_tokens
    if mode is OverlapMode.NONE or shape.num_cpu_decodes == 0:
        linear = cost_model.linear(tokens, 0)
        forward = linear + gpu_attention
        return PredictedTimes(linear=linear + sample, gpu_attention=gpu_attention, transfer=swaps, overhead=overhead,
                              total=swaps + forward + sample + overhead)
    split = shape.pipeline_split
    first_count = split[1] if split is not None else 0
    second_count = shape.num_cpu_decodes - first_count
    first_tokens = tokens - second_count
    if mode is OverlapMode.ASYMMETRIC_PIPELINE and second_count > 0 and first_tokens > 0:
        adjustment = cost_model.hybrid_adjustment(OverlapMode.ASYMMETRIC_PIPELINE)
        job_seconds, slowdown = adjustment.per_job_seconds, adjustment.device_slowdown
        first_kv = split[0] if split is not None else 0
        cpu_a, copies_a = _cpu_job_seconds(cost_model, shape, first_kv, first_count)
        cpu_b, copies_b = _cpu_job_seconds(cost_model, shape, shape.cpu_decode_kv_tokens - first_kv, second_count)
        cpu_a, cpu_b = cpu_a * adjustment.cpu_slowdown, cpu_b * adjustment.cpu_slowdown
        linear_a = slowdown * cost_model.linear(first_tokens, 0)
        linear_b = slowdown * cost_model.linear(second_count, 0)
        gpu_attention *= slowdown
        if shape.cpu_runtime is CpuRuntime.INLINE:
            launch = cost_model.inline_launch_seconds
            forward = inline_pipeline_forward_seconds(
                layers, linear_a / layers, linear_b / layers, gpu_attention / layers,
                (cpu_a + copies_a) / layers, (cpu_b + copies_b) / layers, launch)
            job_overhead = 2 * layers * launch
        else:
            forward = pipeline_forward_seconds(
                layers, cost_model.pre_attention_fraction, linear_a / layers, linear_b / layers,
                gpu_attention / layers, (cpu_a + copies_a) / layers, (cpu_b + copies_b) / layers,
                job_seconds=job_seconds if first_count else 0.0, job_seconds_b=job_seconds,
                first_has_job=first_count > 0)
            job_overhead = layers * job_seconds * (2 if first_count else 1)
        return PredictedTimes(linear=linear_a + linear_b + sample, gpu_attention=gpu_attention,
                              cpu_attention=cpu_a + cpu_b, transfer=copies_a + copies_b + swaps,
                              overhead=overhead + job_overhead, total=swaps + forward + sample + overhead)
    # async overlap (and a pipeline with one empty sub-batch)
    adjustment = cost_model.hybrid_adjustment(OverlapMode.ASYNC_OVERLAP)
    cpu_attention, copies = _cpu_job_seconds(cost_model, shape, shape.cpu_decode_kv_tokens, shape.num_cpu_decodes)
    cpu_attention *= adjustment.cpu_slowdown
    linear = adjustment.device_slowdown * cost_model.linear(tokens, 0)
    gpu_attention *= adjustment.device_slowdown
    if shape.cpu_runtime is CpuRuntime.INLINE:  # one blocking thread: nothing overlaps the CPU job
        jobs = layers * cost_model.inline_launch_seconds
        forward = linear + jobs + gpu_attention + cpu_attention + copies
    else:
        jobs = layers * adjustment.per_job_seconds
        longer, shorter = sorted((gpu_attention, cpu_attention + copies), reverse=True)
        forward = linear + jobs + longer + adjustment.serial_fraction * shorter
    return PredictedTimes(linear=linear + sample, gpu_attention=gpu_attention, cpu_attention=cpu_attention,
                          transfer=copies + swaps, overhead=overhead + jobs,
                          total=swaps + forward + sample + overhead)


def pipeline_forward_seconds(num_layers: int, pre_fraction: float, linear_a: float, linear_b: float,
                             gpu_attention_a: float, cpu_a: float, cpu_b: float, job_seconds: float = 0.0,
                             job_seconds_b: float | None = None, first_has_job: bool = True) -> float:
    """Finish time of the runner's two-sub-batch schedule (per-layer inputs; see ``predict_iteration``).

    ``job_seconds`` (``job_seconds_b``): device-thread time to hand sub-batch A's (B's) CPU job over
    and collect it, charged to the device right after the pre-attention linear."""
    job_b = job_seconds if job_seconds_b is None else job_seconds_b
    pre_a, post_a = pre_fraction * linear_a + job_seconds, (1.0 - pre_fraction) * linear_a
    pre_b, post_b = pre_fraction * linear_b + job_b, (1.0 - pre_fraction) * linear_b
    device = cpu = 0.0
    end_b_previous = -math.inf
    for layer in range(num_layers):
        device += pre_a  # launch A(i): pre-attention, hand the CPU job over
        if first_has_job:
            end_a = max(device, cpu) + cpu_a  # the worker runs jobs in submission order
            cpu = end_a
        else:  # sub-batch A has no CPU rows: nothing to wait for
            end_a = device
        device += gpu_attention_a
        if layer > 0:  # finish B(i-1)
            device = max(device, end_b_previous) + post_b
        device += pre_b  # launch B(i)
        end_b = max(device, cpu) + cpu_b
        cpu = end_b
        device = max(device, end_a) + post_a  # finish A(i)
        end_b_previous = end_b
    return max(device, end_b_previous) + post_b


def inline_pipeline_forward_seconds(num_layers: int, linear_a: float, linear_b: float, gpu_attention_a: float,
                                    cpu_a: float, cpu_b: float, launch_seconds: float) -> float:
    """Finish time of NEO's published two-sub-batch schedule on ONE thread (per-layer inputs).

    swiftllm ``worker/layers/transformer_layer.py``, ``TransformerLayer.forward_double`` /
    ``_forward_pipeline_stage``: every layer runs two stages. Stage 0 launches sub-batch A's linear
    work (post-projection of layer i, pre-projection of layer i+1), then runs B's CPU attention as a
    blocking call (``torch.ops.pacpu.paged_attention_cpu`` in ``_attention``); stage 1 launches B's
    linear work and A's device attention, then runs A's CPU attention. The thread first spends
    ``launch_seconds`` launching the stage's kernels (NEO's predictor charges this as ``lnch_T``,
    ``swiftllm/perfpredictor.py`` ``TablePerfPredictor``), then waits for the q/k/v of the previous
    stage's device work (``qkvtr_e.synchronize()``) before its CPU attention; the device cannot start a
    stage before the thread has finished the previous stage's blocking call and launched it, and the
    stage's linear work needs the previous stage's attention output (``_compute_wait_comm``).
    """
    device_end = thread_end = 0.0
    stages = ((linear_a, cpu_b), (linear_b + gpu_attention_a, cpu_a))
    for _ in range(num_layers):
        for device_work, cpu_work in stages:
            start = thread_end
            device_start = max(device_end, start)
            launched = start + launch_seconds
            thread_end = max(launched, device_end) + cpu_work if cpu_work > 0 else launched
            device_end = max(device_start + device_work, launched)
    return max(device_end, thread_end)


