"""The typed boundary between the control plane (scheduler) and the data plane (runner/simulator).

One ``IterationPlan`` crosses the boundary per step; one ``RunnerOutput`` comes back. Both are
frozen and torch-free: token ids, positions and block tables are plain tuples of ints, turned
into tensors by the runner.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from apexlib.core.request import SamplingParams


class Tier(enum.Enum):
    """Where a request's KV blocks live."""

    GPU = "gpu"
    CPU = "cpu"


class OverlapMode(str, enum.Enum):
    """How an iteration's CPU-resident work runs against its GPU work."""

    NONE = "none"  # GPU-resident requests only; CPU-resident ones wait
    ASYNC_OVERLAP = "async_overlap"  # APEX: one batch, CPU attention overlaps GPU attention per layer
    ASYMMETRIC_PIPELINE = "asymmetric_pipeline"  # NEO: two sub-batches alternate per layer


class CpuRuntime(str, enum.Enum):
    """Which thread runs an iteration's CPU attention.

    ``worker``: apexlib's two-thread runtime; a worker thread runs each CPU job while the main thread
    keeps launching device work. ``inline``: NEO's published runtime (swiftllm
    ``worker/layers/transformer_layer.py``, ``TransformerLayer._attention``): the CPU attention is a
    blocking call on the thread that launches the device kernels, so no device work is launched while
    it runs, and every pipeline stage first pays the thread's kernel-launch time.
    """

    WORKER = "worker"
    INLINE = "inline"


@dataclass(frozen=True)
class ScheduledSequence:
    """One request's work in this iteration: ``len(token_ids)`` new tokens starting at ``start_position``.

    A decode feeds one token; a prefill (or a recompute after preemption) feeds a chunk of the
    prompt-plus-outputs. The runner writes the new tokens' K/V to ``slot`` positions given by
    ``block_table`` in ``tier`` and samples a token after the chunk when ``sample`` is set.
    """

    request_id: str
    token_ids: tuple[int, ...]  # [num_new_tokens]
    start_position: int  # = num_computed_tokens before this iteration
    block_table: tuple[int, ...]  # [num_blocks of the request], block ids in `tier`
    tier: Tier
    sample: bool
    sampling_params: SamplingParams
    num_output_tokens: int  # outputs already produced (seeded sampling advances per output)

    @property
    def num_new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def is_decode(self) -> bool:
        """One new token after at least one output, sampled: a decode step (everything else is a prefill
        chunk, including a recompute). The one rule the scheduler, the runner and the cost model share."""
        return len(self.token_ids) == 1 and self.num_output_tokens > 0 and self.sample

    @property
    def context_len(self) -> int:
        """Tokens in the cache after this iteration (what attention reads)."""
        return self.start_position + len(self.token_ids)


@dataclass(frozen=True)
class PredictedTimes:
    """The cost model's prediction of an iteration's subtasks, in seconds for the whole model."""

    linear: float = 0.0
    gpu_attention: float = 0.0
    cpu_attention: float = 0.0
    transfer: float = 0.0
    overhead: float = 0.0
    total: float = 0.0


@dataclass(frozen=True)
class IterationPlan:
    """What to run in one iteration. Sequences in execution order: prefills, GPU decodes, CPU decodes."""

    iteration: int
    prefills: tuple[ScheduledSequence, ...]
    gpu_decodes: tuple[ScheduledSequence, ...]
    cpu_decodes: tuple[ScheduledSequence, ...] = ()
    mode: OverlapMode = OverlapMode.NONE
    # For ASYMMETRIC_PIPELINE: request ids of the two sub-batches (the first holds prefills and
    # GPU decodes plus some CPU decodes, the second only CPU decodes).
    pipeline_batches: tuple[tuple[str, ...], tuple[str, ...]] | None = None
    swap_out: tuple[tuple[int, int], ...] = ()  # (gpu_block, cpu_block) copies done before the forward
    swap_in: tuple[tuple[int, int], ...] = ()  # (cpu_block, gpu_block)
    finished_request_ids: tuple[str, ...] = ()  # released since the previous plan (runner drops state)
    predicted: PredictedTimes | None = None
    cpu_runtime: CpuRuntime = CpuRuntime.WORKER

    @property
    def sequences(self) -> tuple[ScheduledSequence, ...]:
        return self.prefills + self.gpu_decodes + self.cpu_decodes

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.sequences)

    @property
    def is_empty(self) -> bool:
        return not (self.prefills or self.gpu_decodes or self.cpu_decodes or self.swap_in or self.swap_out)


@dataclass(frozen=True)
class RunnerOutput:
    """What the data plane returns for one plan."""

    sampled_token_ids: dict[str, int]  # request id -> token, for sequences with sample=True
    subtask_seconds: dict[str, float] = field(default_factory=dict)  # measured, when profiling is on
    # request id -> why its part of the iteration failed (sampling it raised, say); those requests are
    # failed alone by ``Scheduler.update_from_output`` and have no sampled token
    failed: dict[str, str] = field(default_factory=dict)
