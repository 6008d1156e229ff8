"""Requests, sampling parameters and outputs (vLLM's names). Torch-free."""

from __future__ import annotations

import enum
import math
import numbers
import operator
from collections.abc import Iterable
from dataclasses import dataclass, field

OUTPUT_KINDS = ("cumulative", "final_only")
#: Seeds are 64-bit unsigned integers (what ``torch.Generator.manual_seed`` takes).
MAX_SEED = 2**64 - 1
#: The smallest temperature > 0: below it, logits / temperature overflows float32 for ordinary logits
#: (|logit| ~ 10 / 1e-38 = inf) and the probabilities become NaN. vLLM treats such values as greedy;
#: here they are rejected so that nobody gets greedy decoding who asked for sampling.
MIN_TEMPERATURE = 1e-5


def _type_name(value: object) -> str:
    return type(value).__name__


def as_int(value: object, field_name: str) -> int:
    """``value`` as a Python int: ints and integer scalars of numpy/torch (``__index__``), never a bool.

    Raises TypeError naming ``field_name`` and the type given."""
    if isinstance(value, bool) or _type_name(value) in ("bool_", "bool"):
        raise TypeError(f"{field_name} must be an integer, got bool {value!r}")
    if isinstance(value, int):
        return int(value)
    try:
        return operator.index(value)  # numpy integers, 0-d integer torch tensors
    except TypeError:
        raise TypeError(f"{field_name} must be an integer, got {_type_name(value)} {value!r}") from None


def as_real(value: object, field_name: str) -> float:
    """``value`` as a finite float: ints and floats (numpy scalars included), never a bool or a string."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{field_name} must be a number, got {_type_name(value)} {value!r}")
    result = float(value)
    if not math.isfinite(result):
        raise ValueError(f"{field_name} must be finite, got {value!r}")
    return result


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one request. ``temperature == 0`` is greedy decoding.

    Every field is checked here, at construction (type, then range; ``bool`` is not an int; numpy and
    torch integer scalars are taken as ints), so a bad value raises where it is written and can never
    reach an engine step."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop_token_ids: tuple[int, ...] | list[int] | None = None
    ignore_eos: bool = False
    # What ``LLMEngine.step`` returns for this request (vLLM's RequestOutputKind): "cumulative", every
    # step the request advanced in, all tokens so far; "final_only", once, when it finishes (what
    # ``LLM.generate`` and the benchmarks use: no per-step copy of the growing token list).
    output_kind: str = "cumulative"

    def __post_init__(self) -> None:
        def put(name: str, value: object) -> None:
            object.__setattr__(self, name, value)

        if not isinstance(self.output_kind, str) or self.output_kind not in OUTPUT_KINDS:
            raise ValueError(f"SamplingParams.output_kind must be one of {OUTPUT_KINDS}, got {self.output_kind!r}")
        put("max_tokens", as_int(self.max_tokens, "SamplingParams.max_tokens"))
        if self.max_tokens < 1:
            raise ValueError(f"SamplingParams.max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        put("temperature", as_real(self.temperature, "SamplingParams.temperature"))
        if not (self.temperature == 0.0 or self.temperature >= MIN_TEMPERATURE):
            raise ValueError(f"SamplingParams.temperature must be >= 0: 0 (greedy) or >= {MIN_TEMPERATURE} "
                             f"(smaller values overflow the scaled logits), got {self.temperature!r}")
        put("top_p", as_real(self.top_p, "SamplingParams.top_p"))
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p!r}")
        put("top_k", as_int(self.top_k, "SamplingParams.top_k"))
        if self.top_k != -1 and self.top_k < 1:
            raise ValueError(f"SamplingParams.top_k must be -1 (off) or an integer >= 1, got {self.top_k!r}")
        if self.seed is not None:
            put("seed", as_int(self.seed, "SamplingParams.seed"))
            if not 0 <= self.seed <= MAX_SEED:
                raise ValueError(f"SamplingParams.seed must be None or an integer in [0, 2**64 - 1], "
                                 f"got {self.seed!r}")
        if self.stop_token_ids is not None:
            if isinstance(self.stop_token_ids, (str, bytes)) or not isinstance(self.stop_token_ids, Iterable):
                raise TypeError(f"SamplingParams.stop_token_ids must be None or a list of token ids, got "
                                f"{_type_name(self.stop_token_ids)} {self.stop_token_ids!r}")
            ids = tuple(as_int(t, f"SamplingParams.stop_token_ids[{i}]") for i, t in enumerate(self.stop_token_ids))
            for index, token in enumerate(ids):
                if token < 0:
                    raise ValueError(f"SamplingParams.stop_token_ids[{index}] must be >= 0, got {token}")
            put("stop_token_ids", ids)
        if not isinstance(self.ignore_eos, bool):
            raise TypeError(f"SamplingParams.ignore_eos must be a bool, got {_type_name(self.ignore_eos)} "
                            f"{self.ignore_eos!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # not yet admitted, or preempted and waiting to be recomputed
    RUNNING = "running"  # holds KV blocks in some tier and is scheduled every iteration it can be
    SWAPPED = "swapped"  # its KV lives in the CPU tier and it is not running (waiting to be swapped in)
    FINISHED_STOPPED = "finished_stopped"  # EOS or a stop token
    FINISHED_LENGTH = "finished_length"  # max_tokens or max_model_len
    FINISHED_ABORTED = "finished_aborted"
    FINISHED_ERROR = "finished_error"  # processing this request raised; ``Request.error`` says what

    @property
    def finished(self) -> bool:
        return self.name.startswith("FINISHED")

    @property
    def finish_reason(self) -> str | None:
        return {"FINISHED_STOPPED": "stop", "FINISHED_LENGTH": "length", "FINISHED_ABORTED": "abort",
                "FINISHED_ERROR": "error"}.get(self.name)


@dataclass
class Request:
    """Control-plane state of one request.

    ``num_computed_tokens`` counts the tokens whose KV is in the cache; the request's tokens are
    its prompt followed by its outputs, so a preempted request is recomputed by prefilling all of
    them again (vLLM V1 recompute semantics).
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float
    prompt: str | None = None
    eos_token_ids: tuple[int, ...] = ()
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    token_times: list[float] = field(default_factory=list)
    finish_time: float | None = None
    error: str | None = None  # why it finished with FINISHED_ERROR

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    def token_id_at(self, position: int) -> int:
        prompt_len = len(self.prompt_token_ids)
        if position < prompt_len:
            return self.prompt_token_ids[position]
        return self.output_token_ids[position - prompt_len]

    def token_ids_range(self, start: int, stop: int) -> tuple[int, ...]:
        return tuple(self.token_id_at(p) for p in range(start, stop))


@dataclass(frozen=True)
class RequestMetrics:
    """Wall-clock times of one request on the engine clock (``apexlib.core.clock``), in seconds."""

    arrival_time: float
    first_scheduled_time: float | None
    first_token_time: float | None
    finished_time: float | None
    token_times: tuple[float, ...]
    num_preemptions: int


@dataclass(frozen=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None


@dataclass(frozen=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: tuple[int, ...]
    outputs: tuple[CompletionOutput, ...]
    finished: bool
    metrics: RequestMetrics
    error: str | None = None  # finish_reason "error": what went wrong with this request


def request_output(request: Request, text: str = "", error: str | None = None) -> RequestOutput:
    """What an engine returns for ``request`` now: its tokens, timings and finish reason."""
    finished = request.is_finished
    return RequestOutput(
        request_id=request.request_id,
        prompt=request.prompt,
        prompt_token_ids=tuple(request.prompt_token_ids),
        outputs=(CompletionOutput(index=0, text=text, token_ids=tuple(request.output_token_ids),
                                  finish_reason=request.status.finish_reason),),
        finished=finished,
        metrics=RequestMetrics(
            arrival_time=request.arrival_time,
            first_scheduled_time=request.first_scheduled_time,
            first_token_time=request.token_times[0] if request.token_times else None,
            finished_time=request.finish_time,
            token_times=tuple(request.token_times),
            num_preemptions=request.num_preemptions,
        ),
        error=error,
    )
