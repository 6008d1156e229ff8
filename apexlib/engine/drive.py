"""The one driving loop: feed a workload to an engine (the real ``LLMEngine`` or the simulator's
``VirtualEngine``) and step it until every request is done, on a wall clock or a virtual one.

* ``offline``: every request is added at the start (its arrival time is the run's start), then the
  engine steps until all are done (vLLM ``benchmark_throughput.py``).
* ``online``: request ``i`` is added once the clock passes ``start + arrival_time[i]``, with that
  scheduled time as its ``arrival_time``, so TTFT counts the queueing from the arrival, not from when
  the loop noticed it. When the engine has nothing to do the clock waits for the next arrival: the
  wall clock sleeps, the virtual clock jumps (vLLM ``benchmark_serving.py``).

Every request runs with ``SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)``,
so the output lengths are exactly the workload's. Torch-free.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from typing import Any, Protocol

from apexlib.core.clock import clock as wall_clock
from apexlib.core.request import RequestOutput, SamplingParams
from apexlib.core.results import RequestRecord
from apexlib.workloads import Workload


class EngineLike(Protocol):
    """What :func:`drive` needs of an engine (``LLMEngine`` and ``VirtualEngine`` have it)."""

    def add_request(self, request_id: str | None, prompt: Any, sampling_params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> str: ...

    def step(self) -> list[RequestOutput]: ...

    def has_unfinished_requests(self) -> bool: ...


class WallClock:
    """Real time (``apexlib.core.clock.clock``); waiting sleeps."""

    def now(self) -> float:
        return wall_clock()

    def wait_until(self, when: float) -> None:
        time.sleep(max(0.0, when - wall_clock()))

    def expect(self, when: float | None) -> None:
        """The next arrival (nothing to do on a wall clock: an idle engine's loop polls it)."""


class VirtualClock:
    """Simulated time: ``now`` only moves when the engine's steps or a wait move it."""

    def __init__(self, start: float = 0.0) -> None:
        self.time = start
        self.next_arrival: float | None = None

    def now(self) -> float:
        return self.time

    def wait_until(self, when: float) -> None:
        self.time = max(self.time, float(when))

    def expect(self, when: float | None) -> None:
        """The next arrival: a virtual engine whose iteration was empty jumps to it."""
        self.next_arrival = when


def benchmark_sampling_params(output_len: int) -> SamplingParams:
    return SamplingParams(max_tokens=int(output_len), temperature=0.0, ignore_eos=True, output_kind="final_only")


def drive(engine: EngineLike, workload: Workload, mode: str, clock: WallClock | VirtualClock,
          progress: bool = False) -> tuple[list[RequestRecord], float]:
    """Run ``workload`` through ``engine`` (``mode``: ``offline`` or ``online``) on ``clock``.

    Returns one record per request (times relative to the run's start) and the run's duration.
    """
    from tqdm.auto import tqdm

    pending = deque(sorted(workload.requests, key=lambda request: request.arrival_time))
    by_id = {request.request_id: request for request in workload.requests}
    finished: dict[str, RequestOutput] = {}
    start = clock.now()

    def add(request) -> None:
        arrival = start if mode == "offline" else start + request.arrival_time
        engine.add_request(request.request_id, {"prompt_token_ids": list(request.prompt_token_ids)},
                           benchmark_sampling_params(request.output_len), arrival_time=arrival)

    with tqdm(total=len(workload), desc=f"{workload.name} ({mode})", unit="req", disable=not progress,
              leave=False) as bar:
        if mode == "offline":
            while pending:
                add(pending.popleft())
        while pending or engine.has_unfinished_requests():
            now = clock.now()
            while pending and start + pending[0].arrival_time <= now:
                add(pending.popleft())
            clock.expect(start + pending[0].arrival_time if pending else None)
            if not engine.has_unfinished_requests():
                clock.wait_until(start + pending[0].arrival_time)
                continue
            for output in engine.step():
                if output.finished and output.request_id in by_id:
                    finished[output.request_id] = output
                    bar.update(1)
    return _records(workload.requests, finished, start), clock.now() - start


def _records(requests: Sequence[Any], finished: dict[str, RequestOutput], start: float) -> list[RequestRecord]:
    records = []
    for request in requests:
        output = finished[request.request_id]
        metrics = output.metrics
        token_ids = tuple(output.outputs[0].token_ids)
        if len(token_ids) != request.output_len:
            raise RuntimeError(f"request {request.request_id}: produced {len(token_ids)} tokens, the workload "
                               f"asked for exactly {request.output_len} (finish reason "
                               f"{output.outputs[0].finish_reason})")
        records.append(RequestRecord(
            request_id=request.request_id,
            prompt_len=request.prompt_len,
            arrival_time=metrics.arrival_time - start,
            first_scheduled_time=None if metrics.first_scheduled_time is None else metrics.first_scheduled_time - start,
            first_token_time=metrics.first_token_time - start,
            finish_time=metrics.finished_time - start,
            token_times=tuple(t - start for t in metrics.token_times),
            output_token_ids=token_ids,
            num_preemptions=metrics.num_preemptions,
        ))
    return records
