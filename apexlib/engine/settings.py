"""``BenchmarkSettings``: one run's engine arguments (an ``EngineArgs``, never restated field by field)
plus the benchmark's own (the prompts' token seed, warm-up requests), and how a workload sets the
run's ``max_model_len`` and arrival mode. Shared by the real engine's benchmark, the simulator, the
vLLM baseline and the HTTP client. Torch-free.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from apexlib.engine.args import EngineArgs
from apexlib.workloads import Workload

logger = logging.getLogger(__name__)

MODES = ("offline", "online")
#: The model a benchmark runs when none is given: the embedded tiny ``demo`` checkpoint.
DEFAULT_MODEL = "demo"
_BENCH_FIELDS = ("token_seed", "warmup_requests")


@dataclass(frozen=True)
class BenchmarkSettings:
    """``engine``: the engine's arguments. ``engine.max_model_len=None`` takes the workload's stated
    limit (its preset's ``max_model_len``) capped by the checkpoint, lowered to the workload's longest
    request when the KV budget is smaller (:func:`resolve_max_model_len`). ``token_seed`` draws the
    prompts' token ids; ``warmup_requests`` requests (copies of the workload's first ones, at most 8
    output tokens) run before the timed run and are not counted."""

    engine: EngineArgs
    token_seed: int = 0
    warmup_requests: int = 2

    def __post_init__(self) -> None:
        if not isinstance(self.engine, EngineArgs):
            raise TypeError(f"engine must be EngineArgs, got {type(self.engine).__name__}")
        for name in _BENCH_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")

    @classmethod
    def create(cls, **kwargs: Any) -> BenchmarkSettings:
        """From flat keywords: ``token_seed`` and ``warmup_requests``, and every ``EngineArgs`` field
        (``model`` defaults to :data:`DEFAULT_MODEL`)."""
        bench = {name: kwargs.pop(name) for name in _BENCH_FIELDS if name in kwargs}
        if kwargs.get("model") is None:
            kwargs["model"] = DEFAULT_MODEL
        return cls(EngineArgs.from_kwargs(**kwargs), **bench)

    def replace_engine(self, **changes: Any) -> BenchmarkSettings:
        """These settings with some engine arguments changed (a new ``policy`` starts from its default
        options unless ``policy_options`` is given too)."""
        if "policy" in changes and changes["policy"] != self.engine.policy:
            changes.setdefault("policy_options", None)
        return dataclasses.replace(self, engine=dataclasses.replace(self.engine, **changes))

    @property
    def policy(self) -> str:
        return self.engine.policy

    def to_dict(self) -> dict[str, Any]:
        engine = {f.name: getattr(self.engine, f.name) for f in dataclasses.fields(self.engine)}
        engine["policy_options"] = dataclasses.asdict(self.engine.policy_options)
        if engine["cost_model"] is not None and not isinstance(engine["cost_model"], str):
            engine["cost_model"] = repr(engine["cost_model"])
        return {"engine": engine, **{name: getattr(self, name) for name in _BENCH_FIELDS}}


def resolve_mode(workload: Workload, mode: str = "auto") -> str:
    """``auto``: ``online`` when some request arrives after t = 0, else ``offline``."""
    if mode == "auto":
        return "online" if any(request.arrival_time > 0 for request in workload.requests) else "offline"
    if mode not in MODES:
        raise ValueError(f"mode must be 'auto' or one of {MODES}, got {mode!r}")
    return mode


def resolve_max_model_len(engine: EngineArgs, workload: Workload, checkpoint_max: int) -> int:
    """See :class:`BenchmarkSettings`; raises when the workload's longest request cannot fit."""
    longest = workload.max_total_len
    if engine.max_model_len is not None:
        limit = engine.max_model_len
    else:
        stated = workload.metadata.get("max_model_len")
        limit = min(int(stated), checkpoint_max) if isinstance(stated, int) else checkpoint_max
        limit = max(limit, min(longest, checkpoint_max))
        if engine.num_gpu_blocks is not None and engine.num_gpu_blocks * engine.block_size < limit:
            limit = max(longest, 2)
            logger.info("KV budget of %d blocks x %d tokens is below the workload's max_model_len; using the "
                        "longest request's length %d as max_model_len", engine.num_gpu_blocks,
                        engine.block_size, limit)
    if longest > limit:
        raise ValueError(f"workload {workload.name!r} has a request of {longest} tokens (prompt + output), above "
                         f"max_model_len {limit}")
    return limit
