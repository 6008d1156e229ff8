"""Length distributions, arrival processes and ``make_workload`` (deterministic per seed)."""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from apexlib.workloads.types import (
    ARRIVAL_KINDS,
    Workload,
    WorkloadFormatError,
    WorkloadRequest,
    is_int,
    is_real,
)

# --------------------------------------------------------------------------------------------------
# Length distributions


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not is_int(value):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


@dataclass(frozen=True)
class Fixed:
    """Every request gets exactly ``n`` tokens."""

    n: int

    def __post_init__(self) -> None:
        _check_int("Fixed.n", self.n, 1)

    @property
    def bounds(self) -> tuple[int, int]:
        return (self.n, self.n)

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        return np.full(size, self.n, dtype=np.int64)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "fixed", "n": self.n}


@dataclass(frozen=True)
class Uniform:
    """Integers uniform on ``[low, high]``, both inclusive."""

    low: int
    high: int

    def __post_init__(self) -> None:
        _check_int("Uniform.low", self.low, 1)
        _check_int("Uniform.high", self.high, 1)
        if self.low > self.high:
            raise ValueError(f"Uniform.low ({self.low}) must be <= Uniform.high ({self.high})")

    @property
    def bounds(self) -> tuple[int, int]:
        return (self.low, self.high)

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        return rng.integers(self.low, self.high, size=size, endpoint=True, dtype=np.int64)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "uniform", "low": self.low, "high": self.high}


@dataclass(frozen=True)
class Normal:
    """A normal draw rounded to the nearest integer, then clipped to ``[low, high]``."""

    mean: float
    std: float
    low: int
    high: int

    def __post_init__(self) -> None:
        if not is_real(self.mean) or not math.isfinite(self.mean):
            raise ValueError(f"Normal.mean must be a finite number, got {self.mean!r}")
        if not is_real(self.std) or not math.isfinite(self.std) or self.std < 0:
            raise ValueError(f"Normal.std must be a finite number >= 0, got {self.std!r}")
        _check_int("Normal.low", self.low, 1)
        _check_int("Normal.high", self.high, 1)
        if self.low > self.high:
            raise ValueError(f"Normal.low ({self.low}) must be <= Normal.high ({self.high})")

    @property
    def bounds(self) -> tuple[int, int]:
        return (self.low, self.high)

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        draws = rng.normal(self.mean, self.std, size=size)
        return np.clip(np.rint(draws), self.low, self.high).astype(np.int64)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "normal", "mean": self.mean, "std": self.std, "low": self.low, "high": self.high}


@dataclass(frozen=True)
class RelativeUniform:
    """Integers uniform on ``center ± int(center * spread)``, both ends inclusive.

    This is NEO's ``_get_rand_array(n, avg_val, ratio)`` (evaluation/benchmark.py of its repository:
    ``delta = int(avg_val * ratio)``; ``avg_val + random.randint(-delta, delta)``), e.g. ``1000 ± 10%``
    gives 900..1100.
    """

    center: int
    spread: float = 0.1

    def __post_init__(self) -> None:
        _check_int("RelativeUniform.center", self.center, 1)
        if not is_real(self.spread) or not 0 <= self.spread < 1:
            raise ValueError(f"RelativeUniform.spread must be in [0, 1), got {self.spread!r}")

    @property
    def delta(self) -> int:
        return int(self.center * self.spread)

    @property
    def bounds(self) -> tuple[int, int]:
        return (self.center - self.delta, self.center + self.delta)

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        low, high = self.bounds
        return rng.integers(low, high, size=size, endpoint=True, dtype=np.int64)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "relative_uniform", "center": self.center, "spread": self.spread}


@dataclass(frozen=True)
class Empirical:
    """A joint (input_len, output_len) distribution: samples whole pairs, uniformly, with replacement.

    Pass it as ``prompt_lengths`` to :func:`make_workload` (with ``output_lengths=None``): prompt and
    output lengths of a request then come from the same row. Load one with :meth:`from_csv`.
    """

    pairs: tuple[tuple[int, int], ...]
    source: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.pairs, tuple) or not self.pairs:
            raise ValueError("Empirical.pairs must be a non-empty tuple of (input_len, output_len)")
        for index, pair in enumerate(self.pairs):
            if not isinstance(pair, tuple) or len(pair) != 2:
                raise ValueError(
                    f"Empirical.pairs[{index}] must be an (input_len, output_len) tuple, got {pair!r}"
                )
            _check_int(f"Empirical.pairs[{index}] input_len", pair[0], 1)
            _check_int(f"Empirical.pairs[{index}] output_len", pair[1], 1)

    @classmethod
    def from_csv(cls, path: str | Path) -> Empirical:
        """Read a CSV with a header row containing ``input_len`` and ``output_len`` (other columns are
        ignored). Lines starting with ``#`` are comments (put the data's source there). Raises
        :class:`WorkloadFormatError` naming the line and column on a bad value."""
        path = Path(path)
        pairs: list[tuple[int, int]] = []
        with path.open("r", encoding="utf-8", newline="") as handle:
            lines = [
                (number, text)
                for number, text in enumerate(handle, start=1)
                if not text.lstrip().startswith("#")
            ]
            lines = [(number, text) for number, text in lines if text.strip()]
            if not lines:
                raise WorkloadFormatError(
                    path, 1, None, "no header row (expected columns input_len,output_len)"
                )
            header_line, header_text = lines[0]
            columns = [name.strip() for name in next(csv.reader([header_text]))]
            for required in ("input_len", "output_len"):
                if required not in columns:
                    raise WorkloadFormatError(
                        path, header_line, required, f"missing column (header is {columns})"
                    )
            positions = {name: columns.index(name) for name in ("input_len", "output_len")}
            for line_number, text in lines[1:]:
                cells = next(csv.reader([text]))
                values = []
                for name in ("input_len", "output_len"):
                    position = positions[name]
                    if position >= len(cells):
                        raise WorkloadFormatError(path, line_number, name, "missing value")
                    cell = cells[position].strip()
                    try:
                        value = int(cell)
                    except ValueError:
                        raise WorkloadFormatError(
                            path, line_number, name, f"expected an integer, got {cell!r}"
                        ) from None
                    if value < 1:
                        raise WorkloadFormatError(path, line_number, name, f"must be >= 1, got {value}")
                    values.append(value)
                pairs.append((values[0], values[1]))
        if not pairs:
            raise WorkloadFormatError(path, header_line, None, "no data rows after the header")
        return cls(pairs=tuple(pairs), source=str(path))

    @property
    def bounds(self) -> tuple[int, int]:
        """Bounds of the input lengths (see :attr:`output_bounds`)."""
        inputs = [pair[0] for pair in self.pairs]
        return (min(inputs), max(inputs))

    @property
    def output_bounds(self) -> tuple[int, int]:
        outputs = [pair[1] for pair in self.pairs]
        return (min(outputs), max(outputs))

    @property
    def max_total_len(self) -> int:
        return max(pair[0] + pair[1] for pair in self.pairs)

    def sample_pairs(self, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
        table = np.asarray(self.pairs, dtype=np.int64)
        rows = rng.integers(0, len(self.pairs), size=size)
        return table[rows, 0], table[rows, 1]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "empirical", "source": self.source, "num_pairs": len(self.pairs)}


LengthDistribution = Fixed | Uniform | Normal | RelativeUniform | Empirical
_MARGINALS = (Fixed, Uniform, Normal, RelativeUniform)


# --------------------------------------------------------------------------------------------------
# Arrivals and the generator


def _check_rate(arrival: str, rate: float | None, burstiness: float) -> None:
    if arrival not in ARRIVAL_KINDS:
        raise ValueError(f"arrival must be one of {ARRIVAL_KINDS}, got {arrival!r}")
    if arrival == "offline":
        if rate is not None:
            raise ValueError("rate must be None for arrival='offline' (every request arrives at t=0)")
    else:
        if rate is None or not is_real(rate) or not math.isfinite(rate) or rate <= 0:
            raise ValueError(
                f"rate must be a finite number > 0 (requests/s) for arrival={arrival!r}, got {rate!r}"
            )
    if not is_real(burstiness) or not math.isfinite(burstiness) or burstiness <= 0:
        raise ValueError(f"burstiness must be a finite number > 0, got {burstiness!r}")
    if burstiness != 1.0 and arrival != "poisson":
        raise ValueError(f"burstiness only applies to arrival='poisson', got arrival={arrival!r}")


def arrival_times(
    num_requests: int,
    rng: np.random.Generator,
    *,
    arrival: str = "offline",
    rate: float | None = None,
    burstiness: float = 1.0,
) -> np.ndarray:
    """Arrival times in seconds, non-decreasing, the first at 0 (see the module docstring)."""
    _check_int("num_requests", num_requests, 1)
    _check_rate(arrival, rate, burstiness)
    if arrival == "offline":
        return np.zeros(num_requests)
    if arrival == "fixed":
        return np.arange(num_requests, dtype=np.float64) / rate
    if burstiness == 1.0:
        gaps = rng.exponential(1.0 / rate, size=num_requests - 1)
    else:
        gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=num_requests - 1)
    return np.concatenate([[0.0], np.cumsum(gaps)])


def make_workload(
    name: str,
    num_requests: int,
    prompt_lengths: LengthDistribution,
    output_lengths: LengthDistribution | None = None,
    *,
    arrival: str = "offline",
    rate: float | None = None,
    burstiness: float = 1.0,
    seed: int = 0,
    description: str = "",
    max_model_len: int | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Workload:
    """Generate a deterministic synthetic workload.

    ``prompt_lengths`` / ``output_lengths`` are length distributions; an :class:`Empirical` passed as
    ``prompt_lengths`` (with ``output_lengths=None``) gives both lengths jointly. ``max_model_len``, if
    given, is checked against the distributions' upper bounds before sampling (prompt + output must fit).
    ``metadata`` entries are added to the recorded generating parameters. Request ids are
    ``"<name>-<index>"``, zero-padded.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    _check_int("num_requests", num_requests, 1)
    _check_int("seed", seed, 0)
    _check_rate(arrival, rate, burstiness)
    if isinstance(prompt_lengths, Empirical):
        if output_lengths is not None:
            raise ValueError(
                "output_lengths must be None when prompt_lengths is Empirical (pairs are sampled jointly)"
            )
        max_total = prompt_lengths.max_total_len
    else:
        if not isinstance(prompt_lengths, _MARGINALS):
            raise ValueError(
                f"prompt_lengths must be a length distribution, got {type(prompt_lengths).__name__}"
            )
        if not isinstance(output_lengths, _MARGINALS):
            raise ValueError(
                f"output_lengths must be Fixed, Uniform, Normal or RelativeUniform, got {type(output_lengths).__name__}"
            )
        max_total = prompt_lengths.bounds[1] + output_lengths.bounds[1]
    if max_model_len is not None:
        _check_int("max_model_len", max_model_len, 2)
        if max_total > max_model_len:
            raise ValueError(
                f"workload {name!r}: prompt + output can reach {max_total} tokens, above max_model_len {max_model_len}"
            )

    prompt_stream, output_stream, arrival_stream = (
        np.random.Generator(np.random.PCG64(child)) for child in np.random.SeedSequence(seed).spawn(3)
    )
    if isinstance(prompt_lengths, Empirical):
        prompts, outputs = prompt_lengths.sample_pairs(prompt_stream, num_requests)
    else:
        prompts = prompt_lengths.sample(prompt_stream, num_requests)
        outputs = output_lengths.sample(output_stream, num_requests)
    arrivals = arrival_times(num_requests, arrival_stream, arrival=arrival, rate=rate, burstiness=burstiness)

    width = max(5, len(str(num_requests - 1)))
    requests = tuple(
        WorkloadRequest(
            request_id=f"{name}-{index:0{width}d}",
            prompt_len=int(prompts[index]),
            output_len=int(outputs[index]),
            arrival_time=float(arrivals[index]),
        )
        for index in range(num_requests)
    )
    recorded: dict[str, Any] = {
        "generator": "apexlib.workloads.make_workload",
        "num_requests": num_requests,
        "prompt_lengths": prompt_lengths.to_dict(),
        "output_lengths": None if output_lengths is None else output_lengths.to_dict(),
        "arrival": arrival,
        "rate": rate,
        "burstiness": burstiness,
        "seed": seed,
        "max_model_len": max_model_len,
    }
    recorded.update(metadata or {})
    return Workload(name=name, seed=seed, requests=requests, description=description, metadata=recorded)
