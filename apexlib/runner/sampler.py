"""Token sampling: greedy, temperature, top-k, top-p, with per-request seeds.

Random draws happen on CPU generators so a seeded request samples the same tokens on any device
and in any batch composition. A request with ``seed`` draws its n-th output token from a generator
seeded with a mix of (``seed``, n) (:func:`step_seed`): the draw depends on nothing but the request,
so a preempted request that is recomputed, or an iteration that is retried after a fault, draws
exactly the tokens it would have drawn. The other requests share the engine's generator seeded from
``EngineConfig.seed``.

``sample`` isolates the requests of a batch from each other: an error while sampling one row (NaN
probabilities, say) fails that request only (:class:`SampleResult`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from apexlib.core.plan import ScheduledSequence

logger = logging.getLogger(__name__)

_MASK64 = (1 << 64) - 1


def step_seed(seed: int, step: int) -> int:
    """A 64-bit seed for output ``step`` of a request seeded with ``seed`` (splitmix64 of the pair)."""
    z = (seed + 0x9E3779B97F4A7C15 * (step + 1)) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


@dataclass
class SampleResult:
    """One token per sampled row, or, for the rows whose sampling raised, the error (by request id)."""

    tokens: list[int | None]
    errors: dict[str, str] = field(default_factory=dict)


class Sampler:
    def __init__(self, seed: int) -> None:
        self._shared = torch.Generator(device="cpu").manual_seed(seed)

    def sample(self, logits: torch.Tensor, sequences: list[ScheduledSequence]) -> list[int]:
        """logits fp32 [N, vocab], one row per sequence -> one token per sequence; raises on any error."""
        result = self.sample_rows(logits, sequences)
        if result.errors:
            raise RuntimeError(f"sampling failed: {result.errors}")
        return result.tokens

    def sample_rows(self, logits: torch.Tensor, sequences: list[ScheduledSequence]) -> SampleResult:
        """As ``sample``, but a row that raises gets ``None`` and its error, and the others are sampled."""
        tokens: list[int | None] = logits.argmax(dim=-1).tolist()
        errors: dict[str, str] = {}
        for row, sequence in enumerate(sequences):
            if sequence.sampling_params.greedy:
                continue
            try:
                tokens[row] = self._sample_one(logits[row], sequence)
            except Exception as error:  # one request's failure, not the batch's
                logger.warning("sampling request %s failed: %s: %s", sequence.request_id,
                               type(error).__name__, error)
                tokens[row] = None
                errors[sequence.request_id] = f"sampling failed: {type(error).__name__}: {error}"
        return SampleResult(tokens, errors)

    def _sample_one(self, logits: torch.Tensor, sequence: ScheduledSequence) -> int:
        params = sequence.sampling_params
        scaled = logits.to("cpu", torch.float32) / params.temperature
        if params.top_k > 0 and params.top_k < scaled.numel():
            kth = torch.topk(scaled, params.top_k).values[-1]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        probs = torch.softmax(scaled, dim=-1)
        if params.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            cumulative = sorted_probs.cumsum(0)
            drop = cumulative - sorted_probs > params.top_p  # keep the smallest prefix reaching top_p
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=self._generator(sequence)).item())

    def _generator(self, sequence: ScheduledSequence) -> torch.Generator:
        seed = sequence.sampling_params.seed
        if seed is None:
            return self._shared
        return torch.Generator(device="cpu").manual_seed(step_seed(seed, sequence.num_output_tokens))
