"""The serving loop: one background thread owns an :class:`~apexlib.engine.LLMEngine` and steps it.

Requests enter through a thread-safe command queue (``submit``/``abort`` never touch the engine) and
leave through one :class:`RequestStream` each: the loop thread hands every step's new tokens to the
asyncio event loop of the HTTP server with one ``call_soon_threadsafe`` per step, so the HTTP side
never blocks the engine and the engine is stepped by this thread alone.

The loop thread blocks on the command queue while the engine is idle and steps while work exists.
After each step it publishes a :class:`LoopSnapshot` (queue lengths, KV blocks per tier, engine
counters) that the HTTP side reads for admission control and ``/metrics`` without a lock.

Faults: a request that fails alone comes back finished with finish_reason ``"error"`` (the engine
does that). An iteration that fails as a whole (:class:`~apexlib.engine.engine.IterationError`) was
discarded by the engine and may be run again; a transient fault therefore costs one retry. When
``iteration_retries`` consecutive iterations failed, the loop fails the requests the failing part
touched -- the CPU-resident ones when the error came from the CPU-attention worker, every running one
otherwise -- so a persistent fault fails its requests with a message instead of spinning, and the
requests that arrive afterwards are served.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

from apexlib.core.clock import clock
from apexlib.core.plan import Tier
from apexlib.core.request import RequestMetrics, RequestOutput, SamplingParams
from apexlib.engine.engine import IterationError, LLMEngine
from apexlib.runner.overlap import CpuWorkerTimeout

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Delta:
    """What one step produced for one request: its new tokens, and how it ended when it did."""

    token_ids: tuple[int, ...]
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None
    #: "engine" (the engine finished it), "rejected" (add_request refused it: the caller's input),
    #: "failed" (the loop failed it, or the loop stopped)
    source: str = "engine"
    metrics: RequestMetrics | None = None


class RequestStream:
    """The receiving end of one request, read from an asyncio event loop (``await stream.get()``).

    Several streams may share one ``asyncio.Queue`` (a completion request with several prompts): each
    item is ``(index, Delta)``."""

    def __init__(self, request_id: str, event_loop: asyncio.AbstractEventLoop,
                 output: asyncio.Queue | None = None, index: int = 0) -> None:
        self.request_id = request_id
        self.event_loop = event_loop
        self.queue: asyncio.Queue = output if output is not None else asyncio.Queue()
        self.index = index
        self.num_tokens = 0  # tokens handed out so far (the loop thread's count)
        self.finished = False  # set on the event loop when the final delta is read

    async def get(self) -> Delta:
        index, delta = await self.queue.get()
        return delta


@dataclass
class _Submission:
    stream: RequestStream
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float


@dataclass(frozen=True)
class LoopSnapshot:
    """The loop's state after its last step (or idle wake-up)."""

    time: float = 0.0
    running: int = 0
    waiting: int = 0  # in the engine's waiting queue
    queued: int = 0  # submitted, not yet handed to the engine
    submitted: int = 0  # requests ever submitted, as counted when ``queued`` was (so the two agree)
    cpu_resident: int = 0  # running requests whose KV lives in the CPU tier
    free_blocks: dict[str, int] = field(default_factory=dict)
    total_blocks: dict[str, int] = field(default_factory=dict)
    engine_stats: dict = field(default_factory=dict)
    iteration_errors: int = 0
    failed_requests: int = 0
    steps: int = 0
    alive: bool = True


def _from_cpu_worker(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) was raised in the CPU-attention worker."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, CpuWorkerTimeout):
            return True
        for frame, _ in traceback.walk_tb(error.__traceback__):
            if frame.f_code.co_name == "run" and frame.f_code.co_filename.endswith("overlap.py"):
                return True
        error = error.__cause__ or error.__context__
    return False


class EngineLoop:
    """Owns ``engine``; start with ``start()``, stop with ``stop()``."""

    def __init__(self, engine: LLMEngine, iteration_retries: int = 1, idle_wait: float = 0.5,
                 on_finished: Callable[[RequestOutput | None, Delta], None] | None = None) -> None:
        if iteration_retries < 0:
            raise ValueError(f"iteration_retries must be >= 0, got {iteration_retries}")
        self.engine = engine
        self.iteration_retries = iteration_retries
        self.idle_wait = idle_wait
        self.on_finished = on_finished  # called on the loop thread for every finished request
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}
        self._ids = itertools.count()
        self._submitted = 0  # written by submitters (under _submit_lock)
        self._consumed = 0  # written by the loop thread
        self._submit_lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._consecutive_failures = 0
        self._iteration_errors = 0
        self._failed_requests = 0
        self._steps = 0
        self.snapshot = LoopSnapshot()
        self.fatal_error: str | None = None
        self._publish()

    # -- the HTTP side ------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="apex-engine-loop", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.fatal_error is None

    def new_request_id(self, prefix: str = "req") -> str:
        return f"{prefix}-{next(self._ids)}"

    @property
    def num_pending(self) -> int:
        """Requests submitted but not running yet: those submitted since the last snapshot, plus the
        snapshot's queued and waiting ones. Every count comes from the one snapshot, so a request the loop
        took from the queue after it is still counted (until the next snapshot shows it waiting or running)
        and the bound is never undercounted; it may overcount a request that started since."""
        return pending_from(self.snapshot, self._submitted)

    def submit(self, stream: RequestStream, prompt_token_ids: list[int], params: SamplingParams,
               arrival_time: float | None = None) -> None:
        """Queue one request; its deltas arrive on ``stream``. Never blocks on the engine."""
        if self._stopping.is_set() or not self.alive:
            raise RuntimeError("the engine loop is not running")
        with self._submit_lock:
            self._submitted += 1
        self._commands.put(("add", _Submission(stream, list(prompt_token_ids), params,
                                               clock() if arrival_time is None else arrival_time)))

    def abort(self, request_id: str) -> None:
        """Abort a request (its blocks return to the pool); nothing more arrives on its stream."""
        self._commands.put(("abort", request_id))

    def stop(self, timeout: float = 10.0) -> None:
        """Abort what is left and stop the thread (bounded by ``timeout``)."""
        self._stopping.set()
        self._commands.put(("wake", None))
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.error("engine loop did not stop within %.1f s", timeout)

    # -- the loop thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                engine = self.engine
                busy = engine.has_unfinished_requests() or engine.scheduler.has_finished_elsewhere()
                if self._stopping.is_set():
                    self._drain_commands(block=False)
                    self._abort_all("the server is shutting down")
                    return
                self._drain_commands(block=not busy)
                if engine.has_unfinished_requests() or engine.scheduler.has_finished_elsewhere():
                    self._step()
                self._publish()
        except BaseException as error:  # a bug of the loop itself: tell every waiting request
            self.fatal_error = f"engine loop died: {type(error).__name__}: {error}"
            logger.exception("engine loop died")
            self._abort_all(self.fatal_error)
            self._publish()

    def _drain_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=self.idle_wait) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._apply(*command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _apply(self, kind: str, payload) -> None:
        if kind == "add":
            self._consumed += 1
            self._add(payload)
        elif kind == "abort":
            stream = self._streams.pop(payload, None)
            if stream is not None:
                self.engine.abort_request(payload, report=False)

    def _add(self, submission: _Submission) -> None:
        stream = submission.stream
        try:
            self.engine.add_request(stream.request_id, {"prompt_token_ids": submission.prompt_token_ids},
                                    submission.params, arrival_time=submission.arrival_time)
        except Exception as error:  # the caller's input (ValueError) or the engine's refusal
            deliver([(stream, Delta((), True, "error", f"{type(error).__name__}: {error}",
                                          "rejected" if isinstance(error, ValueError) else "failed"))])
            return
        self._streams[stream.request_id] = stream

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as error:
            self._iteration_failed(error)
            return
        self._steps += 1
        self._consecutive_failures = 0
        deliveries = []
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:  # aborted by its caller
                continue
            completion = output.outputs[0]
            new = completion.token_ids[stream.num_tokens:]
            stream.num_tokens = len(completion.token_ids)
            if output.finished:
                del self._streams[output.request_id]
                delta = Delta(tuple(new), True, completion.finish_reason, output.error, "engine", output.metrics)
                if completion.finish_reason == "error":
                    self._failed_requests += 1
                if self.on_finished is not None:
                    self._notify(output, delta)
            elif not new:
                continue
            else:
                delta = Delta(tuple(new))
            deliveries.append((stream, delta))
        deliver(deliveries)

    def _notify(self, output: RequestOutput | None, delta: Delta) -> None:
        try:
            self.on_finished(output, delta)
        except Exception:  # metrics must never stop the loop
            logger.exception("on_finished hook failed")

    def _iteration_failed(self, error: Exception) -> None:
        self._iteration_errors += 1
        self._consecutive_failures += 1
        named = list(error.failed_request_ids) if isinstance(error, IterationError) else []
        logger.error("engine step failed (%d in a row): %s: %s", self._consecutive_failures,
                     type(error).__name__, error)
        if self._consecutive_failures <= self.iteration_retries and isinstance(error, IterationError):
            return  # the engine discarded the iteration: run it again (a transient fault costs one retry)
        scheduler = self.engine.scheduler
        cpu_worker = _from_cpu_worker(error)
        touched = [request.request_id for request in scheduler.running
                   if not cpu_worker or scheduler.kv.tier_of(request.request_id) is Tier.CPU]
        cause = error.__cause__ if isinstance(error, IterationError) and error.__cause__ is not None else error
        where = ("the CPU-attention worker" if cpu_worker else
                 f"the engine iteration ({getattr(error, 'stage', 'step')})")
        message = (f"{where} failed {self._consecutive_failures} time(s) in a row: {type(cause).__name__}: "
                   f"{cause}")
        now = clock()
        for request_id in touched:
            if request_id not in named:
                scheduler.fail_request(request_id, message, now)
        logger.error("failed %d request(s) touched by the fault: %s", len(touched), touched[:8])
        self._consecutive_failures = 0
        if not touched and not named:
            time.sleep(0.01)  # nothing to fail (a fault outside any request): do not spin

    def _abort_all(self, reason: str) -> None:
        streams = list(self._streams.values())
        self._streams.clear()
        for stream in streams:
            try:
                self.engine.abort_request(stream.request_id, report=False)
            except Exception:  # pragma: no cover - shutting down anyway
                logger.exception("abort of %s failed", stream.request_id)
        while True:  # submissions that never reached the engine
            try:
                kind, payload = self._commands.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                self._consumed += 1
                streams.append(payload.stream)
        deliver([(stream, Delta((), True, "error", reason, "failed")) for stream in streams])

    def _publish(self) -> None:
        engine = self.engine
        scheduler = engine.scheduler
        kv = scheduler.kv
        cpu_resident = sum(1 for request in scheduler.running if kv.tier_of(request.request_id) is Tier.CPU)
        submitted = self._submitted  # read once: queued and submitted must agree
        self.snapshot = LoopSnapshot(
            time=time.time(),
            running=len(scheduler.running),
            waiting=len(scheduler.waiting),
            queued=submitted - self._consumed,
            submitted=submitted,
            cpu_resident=cpu_resident,
            free_blocks={tier.value: kv.pools[tier].num_free_blocks for tier in Tier},
            total_blocks={tier.value: kv.pools[tier].num_blocks for tier in Tier},
            engine_stats=engine.stats.snapshot(),
            iteration_errors=self._iteration_errors,
            failed_requests=self._failed_requests,
            steps=self._steps,
            alive=self.fatal_error is None,
        )


def pending_from(snapshot: LoopSnapshot, submitted: int) -> int:
    """Requests not running yet, given ``submitted`` requests so far and the loop's last ``snapshot``."""
    return (submitted - snapshot.submitted) + snapshot.queued + snapshot.waiting


def deliver(deliveries: list[tuple[RequestStream, Delta]]) -> None:
    """Hand the deltas to their event loops: one thread-safe call per event loop per step (the thread
    loop and the engine-process loop both deliver this way)."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for stream, delta in deliveries:
        by_loop.setdefault(stream.event_loop, []).append((stream, delta))
    for event_loop, items in by_loop.items():
        try:
            event_loop.call_soon_threadsafe(_put_all, items)
        except RuntimeError:  # that event loop is closed: its clients are gone
            logger.warning("dropping %d output(s) for a closed event loop", len(items))


def _put_all(items: list[tuple[RequestStream, Delta]]) -> None:
    for stream, delta in items:
        stream.queue.put_nowait((stream.index, delta))
