"""Engine counters (``engine.stats``). Torch-free."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class EngineStats:
    """Cumulative counters of one engine; ``snapshot()`` returns a plain dict copy."""

    iterations: int = 0
    prefill_tokens: int = 0
    gpu_decode_tokens: int = 0
    cpu_decode_tokens: int = 0
    preemptions: int = 0
    swapped_out_blocks: int = 0
    swapped_in_blocks: int = 0
    mode_counts: dict[str, int] = field(default_factory=dict)

    def snapshot(self) -> dict:
        return asdict(self)
