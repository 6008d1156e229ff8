"""The JSONL workload format: reading and validating a file (``Workload.from_jsonl``); see ``data/workloads/README.md``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from apexlib.workloads.types import (
    FORMAT_NAME,
    FORMAT_VERSION,
    WORKLOADS_DIR,
    Workload,
    WorkloadFormatError,
    WorkloadRequest,
    is_int,
    is_real,
)


def workload_path(name: str, directory: str | Path | None = None) -> Path:
    """``<directory or data/workloads>/<name>.jsonl``."""
    return Path(directory if directory is not None else WORKLOADS_DIR) / f"{name}.jsonl"


_HEADER_FIELDS = {"format", "version", "name", "seed", "description", "metadata"}
_REQUEST_FIELDS = {"request_id", "prompt_len", "output_len", "arrival_time", "prompt_token_ids"}
_REQUIRED_REQUEST_FIELDS = ("request_id", "prompt_len", "output_len", "arrival_time")


def _parse_header(path: Path, line_number: int, record: Any) -> dict[str, Any]:
    def fail(field_name: str | None, problem: str) -> WorkloadFormatError:
        return WorkloadFormatError(path, line_number, field_name, problem)

    if not isinstance(record, dict):
        raise fail(None, f"the header must be a JSON object, got {type(record).__name__}")
    if record.get("format") != FORMAT_NAME:
        raise fail(
            "format", f"expected {FORMAT_NAME!r} (is the first line a header?), got {record.get('format')!r}"
        )
    for name in sorted(set(record) - _HEADER_FIELDS):
        raise fail(name, "unknown header field")
    if record.get("version") != FORMAT_VERSION:
        raise fail(
            "version", f"unsupported version {record.get('version')!r}; this reader knows {FORMAT_VERSION}"
        )
    if "name" not in record:
        raise fail("name", "missing field")
    if not isinstance(record["name"], str) or not record["name"]:
        raise fail("name", f"expected a non-empty string, got {record['name']!r}")
    seed = record.get("seed")
    if seed is not None and not is_int(seed):
        raise fail("seed", f"expected an int or null, got {seed!r}")
    description = record.get("description", "")
    if not isinstance(description, str):
        raise fail("description", f"expected a string, got {type(description).__name__}")
    metadata = record.get("metadata", {})
    if not isinstance(metadata, dict):
        raise fail("metadata", f"expected an object, got {type(metadata).__name__}")
    return {"name": record["name"], "seed": seed, "description": description, "metadata": metadata}


def _parse_request(path: Path, line_number: int, record: Any) -> WorkloadRequest:
    def fail(field_name: str | None, problem: str) -> WorkloadFormatError:
        return WorkloadFormatError(path, line_number, field_name, problem)

    if not isinstance(record, dict):
        raise fail(None, f"a request must be a JSON object, got {type(record).__name__}")
    for name in _REQUIRED_REQUEST_FIELDS:
        if name not in record:
            raise fail(name, "missing field")
    for name in sorted(set(record) - _REQUEST_FIELDS):
        raise fail(name, "unknown field")
    request_id = record["request_id"]
    if not isinstance(request_id, str) or not request_id:
        raise fail("request_id", f"expected a non-empty string, got {request_id!r}")
    for name in ("prompt_len", "output_len"):
        value = record[name]
        if not is_int(value):
            raise fail(name, f"expected an integer, got {value!r}")
        if value < 0:
            raise fail(name, f"length must not be negative, got {value}")
        if value < 1:
            raise fail(name, f"must be >= 1, got {value}")
    arrival = record["arrival_time"]
    if not is_real(arrival):
        raise fail("arrival_time", f"expected a number, got {arrival!r}")
    if not math.isfinite(arrival):
        raise fail("arrival_time", f"must be finite, got {arrival!r}")
    if arrival < 0:
        raise fail("arrival_time", f"must be >= 0, got {arrival!r}")
    token_ids = record.get("prompt_token_ids")
    if token_ids is not None:
        if not isinstance(token_ids, list):
            raise fail(
                "prompt_token_ids", f"expected a list of integers or null, got {type(token_ids).__name__}"
            )
        for position, token in enumerate(token_ids):
            if not is_int(token) or token < 0:
                raise fail("prompt_token_ids", f"entry {position} must be an integer >= 0, got {token!r}")
        if len(token_ids) != record["prompt_len"]:
            raise fail(
                "prompt_token_ids", f"has {len(token_ids)} ids but prompt_len is {record['prompt_len']}"
            )
        token_ids = tuple(token_ids)
    return WorkloadRequest(
        request_id=request_id,
        prompt_len=record["prompt_len"],
        output_len=record["output_len"],
        arrival_time=float(arrival),
        prompt_token_ids=token_ids,
    )


def read_jsonl(path: Path) -> Workload:
    header: dict[str, Any] | None = None
    requests: list[WorkloadRequest] = []
    first_line_of: dict[str, int] = {}
    with path.open("r", encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise WorkloadFormatError(
                    path, line_number, None, f"bad JSON: {error.msg} (column {error.colno})"
                ) from None
            if header is None:
                header = _parse_header(path, line_number, record)
                continue
            request = _parse_request(path, line_number, record)
            if request.request_id in first_line_of:
                raise WorkloadFormatError(
                    path,
                    line_number,
                    "request_id",
                    f"duplicate request_id {request.request_id!r} (first on line {first_line_of[request.request_id]})",
                )
            first_line_of[request.request_id] = line_number
            requests.append(request)
    if header is None:
        raise WorkloadFormatError(path, 1, None, "empty file: expected a header line")
    if not requests:
        raise WorkloadFormatError(path, 2, None, "no requests after the header")
    return Workload(
        name=header["name"],
        seed=header["seed"],
        requests=tuple(requests),
        description=header["description"],
        metadata=header["metadata"],
    )
