"""The cost-model contract (``CostModel``: whole-model seconds of every subtask of one iteration) and ``ZeroCostModel``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from apexlib.core.plan import OverlapMode
from apexlib.costs.shape import DIRECTIONS, IDEAL_OVERLAP, NEO_LAUNCH_SECONDS, HybridAdjustment


# ----------------------------------------------------------------------------------------------
# the contract
# ----------------------------------------------------------------------------------------------
class CostModel(ABC):
    """Predicted seconds of one iteration's subtasks. Every method: the WHOLE MODEL (all layers).

    ``hardware`` and ``source`` describe where the numbers come from. ``num_layers`` and
    ``pre_attention_fraction`` (the share of a layer's linear time before attention) let
    :func:`predict_iteration` model per-layer schedules.
    """

    hardware: str = "unknown"
    source: str = "unknown"
    num_layers: int = 1
    pre_attention_fraction: float = 0.15
    # NEO's published runtime (CpuRuntime.INLINE): the launching thread's time per pipeline stage and
    # layer; NEO's predictor charges 0.8 ms (swiftllm/perfpredictor.py, TablePerfPredictor.lnch_T).
    inline_launch_seconds: float = NEO_LAUNCH_SECONDS

    @abstractmethod
    def linear(self, num_tokens: int, num_sampled: int | None = None) -> float:
        """All linear work of an iteration with ``num_tokens`` tokens, whole model: QKV, O, MLP, norms,
        RoPE of every layer, plus the LM head and sampling of ``num_sampled`` rows (default: every
        token samples, as in a decode-only batch). ``linear(n, 0)`` is the layers alone and
        ``linear(0, s)`` the LM head and sampling alone."""

    @abstractmethod
    def gpu_prefill_attention(self, prompt_lengths: Sequence[int]) -> float:
        """Device attention (and K/V store) of prefill chunks of these lengths, whole model."""

    @abstractmethod
    def gpu_decode_attention(self, num_kv_tokens: int, batch: int) -> float:
        """Device paged decode attention of ``batch`` sequences reading ``num_kv_tokens`` cached tokens
        in total, whole model."""

    @abstractmethod
    def cpu_decode_attention(self, num_kv_tokens: int, batch: int) -> float:
        """CPU paged decode attention (K/V append included) of ``batch`` sequences over ``num_kv_tokens``
        cached tokens in total, whole model, with the engine's CPU-attention thread setting."""

    @abstractmethod
    def transfer(self, num_bytes: int, direction: str) -> float:
        """One copy of ``num_bytes`` between device and host (``d2h`` or ``h2d``)."""

    @abstractmethod
    def launch_overhead(self) -> float:
        """Fixed cost of one iteration, whole model: scheduling, input preparation, launches, syncs."""

    def launch_overhead_per_sequence(self) -> float:
        """Extra per-iteration cost per scheduled sequence (input preparation); 0 unless measured."""
        return 0.0

    def hybrid_adjustment(self, mode: OverlapMode | str) -> HybridAdjustment:
        """Measured departures from ideal overlap for iterations with CPU decodes in ``mode``
        (:class:`HybridAdjustment`); ``IDEAL_OVERLAP`` unless measured."""
        return IDEAL_OVERLAP

    def engine_step_overhead(self, num_sequences: int) -> float:
        """What the engine spends per step outside the scheduler and the runner (building outputs, the
        driving loop): not part of an iteration's prediction (policies compare iterations), added by
        the simulator between iterations. 0 unless measured (a datasheet model cannot know the host)."""
        return 0.0


def _check_direction(direction: str) -> None:
    if direction not in DIRECTIONS:
        raise ValueError(f"transfer direction must be one of {DIRECTIONS}, got {direction!r}")


class ZeroCostModel(CostModel):
    """Every subtask costs nothing (tests of the scheduler and the simulator's bookkeeping)."""

    hardware = "none"
    source = "zero cost model"
    inline_launch_seconds = 0.0

    def linear(self, num_tokens: int, num_sampled: int | None = None) -> float:
        return 0.0

    def gpu_prefill_attention(self, prompt_lengths: Sequence[int]) -> float:
        return 0.0

    def gpu_decode_attention(self, num_kv_tokens: int, batch: int) -> float:
        return 0.0

    def cpu_decode_attention(self, num_kv_tokens: int, batch: int) -> float:
        return 0.0

    def transfer(self, num_bytes: int, direction: str) -> float:
        _check_direction(direction)
        return 0.0

    def launch_overhead(self) -> float:
        return 0.0


