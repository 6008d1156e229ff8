"""Workload types: ``WorkloadRequest`` and ``Workload`` (immutable, with the parameters that made them), and the format constants."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_NAME = "apexlib-workload"
FORMAT_VERSION = 1

#: ``data/workloads/`` of this checkout (valid for the editable install the project uses).
WORKLOADS_DIR = Path(__file__).resolve().parents[2] / "data" / "workloads"

ARRIVAL_KINDS = ("offline", "poisson", "fixed")


class WorkloadFormatError(ValueError):
    """A workload or length-distribution file does not follow its schema.

    The message names the file, the 1-based line number and the offending field.
    """

    def __init__(self, path: str | Path, line: int, field_name: str | None, problem: str):
        self.path = str(path)
        self.line = line
        self.field = field_name
        self.problem = problem
        where = f"{self.path}, line {line}"
        if field_name is not None:
            where += f", field {field_name!r}"
        super().__init__(f"{where}: {problem}")


# --------------------------------------------------------------------------------------------------
# Requests and workloads


def is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_real(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )


@dataclass(frozen=True)
class WorkloadRequest:
    """One request of a trace.

    ``arrival_time`` is in seconds from the start of the workload. ``prompt_token_ids``, when present,
    has exactly ``prompt_len`` entries (see :meth:`Workload.with_token_ids`).
    """

    request_id: str
    prompt_len: int
    output_len: int
    arrival_time: float
    prompt_token_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.request_id, str) or not self.request_id:
            raise ValueError(f"request_id must be a non-empty string, got {self.request_id!r}")
        if not is_int(self.prompt_len) or self.prompt_len < 1:
            raise ValueError(
                f"request {self.request_id}: prompt_len must be an int >= 1, got {self.prompt_len!r}"
            )
        if not is_int(self.output_len) or self.output_len < 1:
            raise ValueError(
                f"request {self.request_id}: output_len must be an int >= 1, got {self.output_len!r}"
            )
        if not is_real(self.arrival_time) or not math.isfinite(self.arrival_time) or self.arrival_time < 0:
            raise ValueError(
                f"request {self.request_id}: arrival_time must be a finite number >= 0, got {self.arrival_time!r}"
            )
        if self.prompt_token_ids is not None:
            if not isinstance(self.prompt_token_ids, tuple):
                raise ValueError(
                    f"request {self.request_id}: prompt_token_ids must be a tuple of ints or None"
                )
            if len(self.prompt_token_ids) != self.prompt_len:
                raise ValueError(
                    f"request {self.request_id}: prompt_token_ids has {len(self.prompt_token_ids)} ids, "
                    f"prompt_len is {self.prompt_len}"
                )
            if not all(is_int(token) and token >= 0 for token in self.prompt_token_ids):
                raise ValueError(f"request {self.request_id}: prompt_token_ids must all be ints >= 0")

    @property
    def total_len(self) -> int:
        """Prompt plus output tokens: the context length this request reaches."""
        return self.prompt_len + self.output_len

    def to_dict(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "request_id": self.request_id,
            "prompt_len": int(self.prompt_len),
            "output_len": int(self.output_len),
            "arrival_time": float(self.arrival_time),
        }
        if self.prompt_token_ids is not None:
            record["prompt_token_ids"] = [int(token) for token in self.prompt_token_ids]
        return record


@dataclass(frozen=True)
class Workload:
    """An immutable request trace with its provenance.

    ``metadata`` holds the generating parameters (JSON-serialisable); it is excluded from hashing.
    """

    name: str
    seed: int | None
    requests: tuple[WorkloadRequest, ...]
    description: str = ""
    metadata: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Workload name must be a non-empty string, got {self.name!r}")
        if self.seed is not None and not is_int(self.seed):
            raise ValueError(f"Workload seed must be an int or None, got {self.seed!r}")
        if not isinstance(self.requests, tuple):
            raise ValueError("Workload requests must be a tuple of WorkloadRequest")
        seen: set[str] = set()
        for request in self.requests:
            if not isinstance(request, WorkloadRequest):
                raise ValueError(f"Workload requests must be WorkloadRequest, got {type(request).__name__}")
            if request.request_id in seen:
                raise ValueError(f"Workload {self.name!r}: duplicate request_id {request.request_id!r}")
            seen.add(request.request_id)
        try:
            json.dumps(dict(self.metadata))
        except (TypeError, ValueError) as error:
            raise ValueError(f"Workload metadata must be JSON-serialisable: {error}") from error

    def __len__(self) -> int:
        return len(self.requests)

    def __iter__(self):
        return iter(self.requests)

    @property
    def total_prompt_tokens(self) -> int:
        return sum(request.prompt_len for request in self.requests)

    @property
    def total_output_tokens(self) -> int:
        return sum(request.output_len for request in self.requests)

    @property
    def max_total_len(self) -> int:
        """The longest prompt + output of any request (compare with a model's max length)."""
        return max((request.total_len for request in self.requests), default=0)

    def with_token_ids(
        self, vocab_size: int, seed: int = 0, reserved_ids: Sequence[int] = (0, 1, 2, 3)
    ) -> Workload:
        """Return a copy whose requests carry deterministic prompt token ids.

        Ids are drawn uniformly from ``range(vocab_size)`` minus ``reserved_ids`` (special tokens: the
        default ``(0, 1, 2, 3)`` covers LLaMA's unk/bos/eos and the tiny models' pad; pass the model's
        own), one request after another in trace order, from ``Generator(PCG64(seed))``. The same
        workload, vocabulary and seed always give the same ids, so real engines (ours, vLLM) can be fed
        identical prompts. Existing token ids are replaced.
        """
        if not is_int(vocab_size) or vocab_size < 1:
            raise ValueError(f"vocab_size must be an int >= 1, got {vocab_size!r}")
        if not is_int(seed):
            raise ValueError(f"seed must be an int, got {seed!r}")
        reserved = sorted({int(token) for token in reserved_ids})
        for token in reserved:
            if not 0 <= token < vocab_size:
                raise ValueError(f"reserved id {token} is outside the vocabulary range [0, {vocab_size})")
        allowed = np.setdiff1d(np.arange(vocab_size, dtype=np.int64), np.asarray(reserved, dtype=np.int64))
        if allowed.size == 0:
            raise ValueError(
                f"vocab_size {vocab_size} leaves no ids once reserved_ids {reserved} are removed"
            )
        rng = np.random.Generator(np.random.PCG64(seed))
        new_requests = []
        for request in self.requests:
            picks = allowed[rng.integers(0, allowed.size, size=request.prompt_len)]
            new_requests.append(replace(request, prompt_token_ids=tuple(int(token) for token in picks)))
        metadata = dict(self.metadata)
        metadata["token_ids"] = {"vocab_size": int(vocab_size), "seed": int(seed), "reserved_ids": reserved}
        return replace(self, requests=tuple(new_requests), metadata=metadata)

    def header(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "name": self.name,
            "seed": None if self.seed is None else int(self.seed),
            "description": self.description,
            "metadata": dict(self.metadata),
        }

    def to_jsonl(self, path: str | Path) -> Path:
        """Write the header line and one line per request; creates missing parent folders."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as handle:
            handle.write(json.dumps(self.header(), sort_keys=True) + "\n")
            for request in self.requests:
                handle.write(json.dumps(request.to_dict()) + "\n")
        return path

    @classmethod
    def from_jsonl(cls, path: str | Path) -> Workload:
        """Read and validate a workload file; raises :class:`WorkloadFormatError` on any schema error."""
        from apexlib.workloads.jsonl import read_jsonl  # jsonl builds Workloads: imported here

        return read_jsonl(Path(path))


def prepare_workload(workload: Workload, vocab_size: int, reserved_ids: Sequence[int], token_seed: int) -> Workload:
    """The workload with prompt token ids: kept when every request already has them, else drawn."""
    if workload.requests and all(request.prompt_token_ids is not None for request in workload.requests):
        for request in workload.requests:
            bad = [token for token in request.prompt_token_ids if token >= vocab_size]
            if bad:
                raise ValueError(f"request {request.request_id}: prompt token id {bad[0]} is outside the "
                                 f"vocabulary [0, {vocab_size})")
        return workload
    return workload.with_token_ids(vocab_size, seed=token_seed, reserved_ids=reserved_ids)
