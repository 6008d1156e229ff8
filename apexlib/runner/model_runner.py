"""The data plane: turns an ``IterationPlan`` into tensors, runs the model stage by stage, samples.

Initialisation protocol (see ``LLMEngine``): load weights -> measure free device memory -> size
the KV pools -> allocate them -> build this runner over the model and the pools.

Rows of a batch are ordered GPU-tier prefills, CPU-tier prefills, GPU decodes, CPU decodes. Every
linear layer runs over all rows on the device. Attention per layer: prefills (always on the
device; a prefill from position 0 attends over its fresh K/V, so a CPU-tier prefill never reads
the CPU cache) and GPU decodes on the device; CPU decodes on the CPU worker, which also appends the
K/V of every CPU-tier row to the CPU cache. Modes (``OverlapMode``):

- ``none`` / ``async_overlap``: one batch; the CPU job of a layer runs while the device computes
  the other rows' attention, and the layer's output projection waits for both (APEX).
- ``asymmetric_pipeline``: two sub-batches; while the CPU computes one sub-batch's attention the
  device runs the other's linear work, then they swap roles (NEO's ``forward_double``).

When the forward fails (any layer, a CPU job, a timeout), ``execute`` first waits for the CPU jobs
it already handed out, so none of them still writes the CPU cache after the error reaches the
engine; the engine then discards the iteration (``apexlib.engine.scheduler``: nothing is applied).
Sampling is per row: a row whose sampling raises is reported in ``RunnerOutput.failed``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from apexlib.attention import cpu as cpu_attention
from apexlib.attention.base import AttentionBackend, AttentionMetadata
from apexlib.core.plan import CpuRuntime, IterationPlan, OverlapMode, RunnerOutput, ScheduledSequence, Tier
from apexlib.model.llama import LlamaModel
from apexlib.runner.kv_storage import KVStorage, copy_blocks
from apexlib.runner.overlap import CpuAttentionWorker, CpuJob
from apexlib.runner.sampler import Sampler

logger = logging.getLogger(__name__)


@dataclass
class _Batch:
    """One (sub-)batch in device tensors, plus the host-side inputs of its CPU rows."""

    sequences: tuple[ScheduledSequence, ...]  # execution order (see module docstring)
    token_ids: torch.Tensor  # int64 [T]
    positions: torch.Tensor  # int64 [T]
    metadata: AttentionMetadata  # device attention over rows [0, num_device_rows)
    num_device_rows: int  # prefill rows + GPU-decode rows
    gpu_store_rows: torch.Tensor | None  # int64 [G] rows whose K/V go to the GPU cache (None: rows 0..G-1)
    num_gpu_store_rows: int
    gpu_slots: torch.Tensor  # int64 [G] their slots in the GPU cache
    cpu_store_rows: torch.Tensor | None  # int64 [C] rows whose K/V go to the CPU cache (device tensor)
    cpu_slots: torch.Tensor | None  # int64 [C] their slots in the CPU cache (host)
    cpu_block_tables: torch.Tensor | None  # int32 [num_cpu_decodes, max_blocks] (host)
    cpu_context_lens: torch.Tensor | None  # int32 [num_cpu_decodes] (host)
    sample_rows: list[int]  # last row of each sequence that samples
    hidden: torch.Tensor | None = None  # [T, hidden]

    @property
    def num_cpu_decodes(self) -> int:
        return 0 if self.cpu_context_lens is None else self.cpu_context_lens.shape[0]

    @property
    def has_cpu_work(self) -> bool:
        return self.cpu_store_rows is not None


@dataclass
class _PendingLayer:
    residual: torch.Tensor
    device_attention: torch.Tensor  # [num_device_rows, H, D]
    job: CpuJob | None


class _SubtaskClock:
    """Per-iteration subtask times: perf counters on the CPU, CUDA events on the GPU (resolved at the end)."""

    def __init__(self, device: torch.device, enabled: bool) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.enabled = enabled
        self.totals: dict[str, float] = {}
        self._events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    def start(self):
        if not self.enabled:
            return None
        if self.cuda:  # on the runner device's stream, whatever this thread's current device
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(self.device))
            return event
        return time.perf_counter()

    def stop(self, name: str, started) -> None:
        if started is None:
            return
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record(torch.cuda.current_stream(self.device))
            self._events.append((name, started, end))
        else:
            self.add(name, time.perf_counter() - started)

    def add(self, name: str, seconds: float) -> None:
        if self.enabled:
            self.totals[name] = self.totals.get(name, 0.0) + seconds

    def resolve(self) -> dict[str, float]:
        for name, start, end in self._events:
            end.synchronize()
            self.add(name, start.elapsed_time(end) / 1000.0)
        self._events.clear()
        return self.totals


class ModelRunner:
    def __init__(self, model: LlamaModel, gpu_storage: KVStorage, cpu_storage: KVStorage | None,
                 backend: AttentionBackend, device: torch.device, seed: int,
                 worker: CpuAttentionWorker | None = None, profile: bool = False) -> None:
        self.model = model
        self.gpu_storage = gpu_storage
        self.cpu_storage = cpu_storage
        self.backend = backend
        self.device = device
        self.sampler = Sampler(seed)
        self.worker = worker
        self._inline = False  # the current plan runs CPU jobs on this thread (CpuRuntime.INLINE)
        self.profile = profile
        self.cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None

    def close(self) -> None:
        """Stop the worker and drop the weights and KV tiers (the engine's ``close``)."""
        if self.worker is not None:
            self.worker.close()
        self.model = self.gpu_storage = self.cpu_storage = None

    @torch.inference_mode()
    def execute(self, plan: IterationPlan, apply_swaps: bool = True) -> RunnerOutput:
        """Run ``plan``; ``apply_swaps=False`` when the caller has already run :meth:`apply_swaps` for it."""
        started = time.perf_counter()
        clock = _SubtaskClock(self.device, self.profile)
        if apply_swaps:
            self._apply_swaps(plan, clock)
        self._inline = plan.cpu_runtime is CpuRuntime.INLINE
        if not plan.sequences:
            return RunnerOutput(sampled_token_ids={}, subtask_seconds=clock.resolve())
        try:
            batches = self._run_forward(plan, clock)
        except BaseException:
            if self.worker is not None:
                self.worker.drain()
            raise
        sampled, failed = self._sample(batches, clock)
        seconds = clock.resolve()
        seconds["iteration"] = time.perf_counter() - started
        return RunnerOutput(sampled_token_ids=sampled, subtask_seconds=seconds, failed=failed)

    @torch.inference_mode()
    def apply_swaps(self, plan: IterationPlan) -> dict[str, float]:
        """Copy the blocks of ``plan``'s tier moves (before :meth:`execute` with ``apply_swaps=False``);
        returns the subtask seconds (``swap``) when profiling."""
        clock = _SubtaskClock(self.device, self.profile)
        self._apply_swaps(plan, clock)
        return clock.resolve()

    def _run_forward(self, plan: IterationPlan, clock: _SubtaskClock) -> list[_Batch]:
        has_cpu_rows = bool(plan.cpu_decodes) or any(s.tier is Tier.CPU for s in plan.prefills)
        if has_cpu_rows and (self.cpu_storage is None or self.worker is None):
            raise ValueError(f"plan {plan.iteration} has CPU-resident work but the engine has no CPU KV tier")
        if plan.mode is OverlapMode.ASYMMETRIC_PIPELINE:
            first_ids, second_ids = plan.pipeline_batches
            by_id = {s.request_id: s for s in plan.sequences}
            batches = [self._prepare(tuple(by_id[i] for i in ids)) for ids in (first_ids, second_ids) if ids]
            if len(batches) == 2:
                self._forward_pipelined(batches[0], batches[1], clock)
            else:
                self._forward(batches[0], clock)
        else:
            if plan.mode is OverlapMode.NONE and plan.cpu_decodes:
                raise ValueError(f"plan {plan.iteration} is mode 'none' but has CPU-resident decodes")
            batches = [self._prepare(plan.sequences)]
            self._forward(batches[0], clock)
        return batches

    # -- swaps -----------------------------------------------------------------------------------
    def _apply_swaps(self, plan: IterationPlan, clock: _SubtaskClock) -> None:
        if not (plan.swap_out or plan.swap_in):
            return
        if self.cpu_storage is None:
            raise ValueError("plan swaps blocks but the engine has no CPU KV tier (num_cpu_blocks=0)")
        started = clock.start()
        # Swap-ins first: a CPU block a swap-in frees may be the destination of a swap-out.
        copy_blocks(self.cpu_storage, self.gpu_storage, plan.swap_in)
        copy_blocks(self.gpu_storage, self.cpu_storage, plan.swap_out)
        clock.stop("swap", started)

    # -- inputs ----------------------------------------------------------------------------------
    def _prepare(self, sequences: tuple[ScheduledSequence, ...]) -> _Batch:
        prefills = [s for s in sequences if not s.is_decode]
        ordered = ([s for s in prefills if s.tier is Tier.GPU] + [s for s in prefills if s.tier is Tier.CPU]
                   + [s for s in sequences if s.is_decode and s.tier is Tier.GPU]
                   + [s for s in sequences if s.is_decode and s.tier is Tier.CPU])
        for s in ordered:
            if s.tier is Tier.CPU and not s.is_decode and s.start_position != 0:
                raise ValueError(f"CPU-tier request {s.request_id} prefills from position {s.start_position}; "
                                 "CPU-tier prefills must start at 0")
        num_prefills = len(prefills)
        device_seqs = [s for s in ordered if not (s.is_decode and s.tier is Tier.CPU)]
        cpu_decodes = [s for s in ordered if s.is_decode and s.tier is Tier.CPU]
        block_size = self.gpu_storage.block_size

        token_ids: list[int] = []
        positions: list[int] = []
        gpu_rows: list[int] = []
        gpu_slots: list[int] = []
        cpu_rows: list[int] = []
        cpu_slots: list[int] = []
        query_start_loc = [0]
        sample_rows: list[int] = []
        for s in ordered:
            first_row = len(token_ids)
            token_ids.extend(s.token_ids)
            span = range(s.start_position, s.context_len)
            positions.extend(span)
            rows, slots = (gpu_rows, gpu_slots) if s.tier is Tier.GPU else (cpu_rows, cpu_slots)
            rows.extend(range(first_row, len(token_ids)))
            slots.extend(s.block_table[p // block_size] * block_size + p % block_size for p in span)
            query_start_loc.append(len(token_ids))
            if s.sample:
                sample_rows.append(len(token_ids) - 1)

        device = self.device
        max_blocks = max((len(s.block_table) for s in device_seqs), default=1)
        tables = [list(s.block_table) + [0] * (max_blocks - len(s.block_table)) if s.tier is Tier.GPU
                  else [0] * max_blocks for s in device_seqs]  # CPU-tier prefills never read the cache
        metadata = AttentionMetadata(
            num_prefills=num_prefills,
            num_decodes=len(device_seqs) - num_prefills,
            query_start_loc=tuple(query_start_loc[: len(device_seqs) + 1]),
            start_positions=tuple(s.start_position for s in device_seqs),
            context_lens_list=tuple(s.context_len for s in device_seqs),
            context_lens=torch.tensor([s.context_len for s in device_seqs], dtype=torch.int32, device=device),
            block_tables=torch.tensor(tables or [[0]], dtype=torch.int32, device=device),
            slot_mapping=torch.tensor(gpu_slots, dtype=torch.long, device=device),
        )
        contiguous_gpu_rows = gpu_rows == list(range(len(gpu_rows)))
        cpu_tables = cpu_lens = None
        if cpu_decodes:
            cpu_max = max(len(s.block_table) for s in cpu_decodes)
            cpu_tables = torch.tensor([list(s.block_table) + [0] * (cpu_max - len(s.block_table))
                                       for s in cpu_decodes], dtype=torch.int32)
            cpu_lens = torch.tensor([s.context_len for s in cpu_decodes], dtype=torch.int32)
        return _Batch(
            sequences=tuple(ordered),
            token_ids=torch.tensor(token_ids, dtype=torch.long, device=device),
            positions=torch.tensor(positions, dtype=torch.long, device=device),
            metadata=metadata,
            num_device_rows=query_start_loc[len(device_seqs)],
            gpu_store_rows=None if contiguous_gpu_rows else torch.tensor(gpu_rows, dtype=torch.long, device=device),
            num_gpu_store_rows=len(gpu_rows),
            gpu_slots=metadata.slot_mapping,
            cpu_store_rows=torch.tensor(cpu_rows, dtype=torch.long, device=device) if cpu_rows else None,
            cpu_slots=torch.tensor(cpu_slots, dtype=torch.long) if cpu_rows else None,
            cpu_block_tables=cpu_tables,
            cpu_context_lens=cpu_lens,
            sample_rows=sample_rows,
        )

    # -- one layer, in three steps ---------------------------------------------------------------
    def _launch_layer(self, batch: _Batch, index: int, clock: _SubtaskClock) -> _PendingLayer:
        """pre_attention on the device, hand the CPU rows to the worker, device attention for the rest."""
        layer = self.model.layers[index]
        started = clock.start()
        query, key, value = layer.pre_attention(batch.hidden, batch.positions, self.model.rotary)
        clock.stop("linear", started)
        job = self._submit_cpu_job(batch, index, query, key, value) if batch.has_cpu_work else None
        started = clock.start()
        if batch.num_gpu_store_rows:
            rows = batch.gpu_store_rows
            gpu_key = key[: batch.num_gpu_store_rows] if rows is None else key.index_select(0, rows)
            gpu_value = value[: batch.num_gpu_store_rows] if rows is None else value.index_select(0, rows)
            self.backend.store_kv(gpu_key, gpu_value, self.gpu_storage.key_cache(index),
                                  self.gpu_storage.value_cache(index), batch.gpu_slots)
        n = batch.num_device_rows
        device_attention = self.backend.forward(query[:n], key[:n], value[:n], self.gpu_storage.key_cache(index),
                                                self.gpu_storage.value_cache(index), batch.metadata)
        clock.stop("gpu_attention", started)
        return _PendingLayer(residual=batch.hidden, device_attention=device_attention, job=job)

    def _finish_layer(self, batch: _Batch, index: int, pending: _PendingLayer, clock: _SubtaskClock) -> None:
        """Wait for the CPU rows' attention, then post_attention over all rows."""
        attention = pending.device_attention
        if pending.job is not None:
            waited = time.perf_counter()
            cpu_output = self._collect_cpu_job(pending.job)
            clock.add("cpu_wait", time.perf_counter() - waited)
            clock.add("cpu_attention", pending.job.seconds)
            if cpu_output is not None:
                attention = torch.cat([attention, cpu_output], dim=0)
        started = clock.start()
        num_rows = attention.shape[0]
        batch.hidden = self.model.layers[index].post_attention(attention.reshape(num_rows, -1), pending.residual)
        clock.stop("linear", started)

    # -- the CPU side ----------------------------------------------------------------------------
    def _submit_cpu_job(self, batch: _Batch, index: int, query: torch.Tensor, key: torch.Tensor,
                        value: torch.Tensor) -> CpuJob:
        rows = batch.cpu_store_rows
        cpu_key, cpu_value = key.index_select(0, rows), value.index_select(0, rows)
        cpu_query = query[batch.num_device_rows:]
        ready = None
        if self.cuda:
            tensors = (cpu_query, cpu_key, cpu_value)
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.copy_stream):
                hosts = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
                for host, tensor in zip(hosts, tensors, strict=True):
                    host.copy_(tensor, non_blocking=True)
                    tensor.record_stream(self.copy_stream)
                ready = torch.cuda.Event()
                ready.record(self.copy_stream)
            cpu_query, cpu_key, cpu_value = hosts
        key_cache, value_cache = self.cpu_storage.key_cache(index), self.cpu_storage.value_cache(index)
        slots, tables, lens = batch.cpu_slots, batch.cpu_block_tables, batch.cpu_context_lens
        copy_stream, device = self.copy_stream, self.device

        def job():
            if ready is not None:
                ready.synchronize()
            cpu_attention.store_kv(cpu_key, cpu_value, key_cache, value_cache, slots)
            if tables is None:
                return None
            output = cpu_attention.paged_decode_attention(cpu_query.contiguous(), key_cache, value_cache, tables,
                                                          lens)
            if copy_stream is None:
                return output, None
            with torch.cuda.stream(copy_stream):
                on_device = output.pin_memory().to(device, non_blocking=True)
                done = torch.cuda.Event()
                done.record(copy_stream)
            return on_device, done

        if self._inline:  # NEO's published runtime: a blocking call on the launching thread
            inline = CpuJob(job)
            inline.run()
            return inline
        return self.worker.submit(job)

    def _collect_cpu_job(self, job: CpuJob) -> torch.Tensor | None:
        result = self.worker.wait(job)
        if result is None:
            return None
        output, done = result
        if done is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(done)
            output.record_stream(current)
        return output

    # -- forward passes ---------------------------------------------------------------------------
    def _forward(self, batch: _Batch, clock: _SubtaskClock) -> None:
        batch.hidden = self.model.embed(batch.token_ids)
        for index in range(len(self.model.layers)):
            self._finish_layer(batch, index, self._launch_layer(batch, index, clock), clock)

    def _forward_pipelined(self, first: _Batch, second: _Batch, clock: _SubtaskClock) -> None:
        """NEO's asymmetric pipelining: while the CPU runs one sub-batch's attention of layer i,
        the device runs the other sub-batch's linear work; the worker serializes the CPU jobs."""
        first.hidden = self.model.embed(first.token_ids)
        second.hidden = self.model.embed(second.token_ids)
        pending_second: _PendingLayer | None = None
        for index in range(len(self.model.layers)):
            pending_first = self._launch_layer(first, index, clock)  # CPU: first(i) starts
            if pending_second is not None:
                self._finish_layer(second, index - 1, pending_second, clock)  # device: second's post(i-1)
            pending_second = self._launch_layer(second, index, clock)  # device: second's pre(i); CPU queue
            self._finish_layer(first, index, pending_first, clock)  # device: first's post(i)
        self._finish_layer(second, len(self.model.layers) - 1, pending_second, clock)

    # -- sampling ---------------------------------------------------------------------------------
    def _sample(self, batches: list[_Batch], clock: _SubtaskClock) -> tuple[dict[str, int], dict[str, str]]:
        started = clock.start()
        rows, sequences = [], []
        for batch in batches:
            sampling = [s for s in batch.sequences if s.sample]
            if sampling:
                rows.append(batch.hidden.index_select(0, torch.tensor(batch.sample_rows, device=self.device)))
                sequences.extend(sampling)
        if not sequences:
            return {}, {}
        logits = self.model.compute_logits(torch.cat(rows, dim=0))
        result = self.sampler.sample_rows(logits, sequences)
        clock.stop("sample", started)
        return ({s.request_id: t for s, t in zip(sequences, result.tokens, strict=True) if t is not None},
                result.errors)
