"""The two-thread runtime: a CPU-attention worker thread beside the main (GPU-launching) thread.

The main thread keeps launching GPU work; each layer it hands the worker one job (copy the
CPU-resident rows' q/k/v to pinned host memory, append their K/V to the CPU cache, run paged
decode attention with the compiled kernel, copy the result back) and collects the result just
before the layer's output projection needs it. Jobs run in submission order on one thread, pinned
to its own cores; the kernel's OpenMP team is created by that thread and inherits its affinity,
so it stays off the main thread's core. The kernel and torch's ops release the GIL, so the two
threads really run at once.

On CUDA, copies run on a dedicated copy stream ordered by events; no ``torch.cuda.synchronize``
on the hot path. On a machine without a GPU the "device" is the CPU: the copies are no-ops and the
worker still runs concurrently with the main thread.

Every wait for a job is bounded (``timeout`` seconds, ``EngineArgs.cpu_attention_timeout``; generous by
default, since one job is one layer's attention and takes milliseconds): a job that never returns
raises :class:`CpuWorkerTimeout` in the main thread instead of hanging ``step()``, and the worker is
then marked stuck, so later submissions fail at once with the same explanation.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from apexlib.core.config import DEFAULT_CPU_JOB_TIMEOUT

logger = logging.getLogger(__name__)



class CpuWorkerTimeout(TimeoutError):
    """A CPU-attention job did not finish within the worker's timeout (the worker thread is stuck)."""


class CpuJob:
    """One unit of work for the worker; ``wait()`` returns its result or re-raises its error."""

    def __init__(self, function: Callable[[], Any]) -> None:
        self._function = function
        self._done = threading.Event()
        self._result: Any = None
        self._error: BaseException | None = None
        self.seconds = 0.0  # wall time the worker spent on it

    def run(self) -> None:
        started = time.perf_counter()
        try:
            self._result = self._function()
        except BaseException as error:  # handed to the waiting thread
            self._error = error
        finally:
            self.seconds = time.perf_counter() - started
            self._done.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> Any:
        """The job's result (re-raising its error); CpuWorkerTimeout when it is not done within ``timeout``."""
        if not self._done.wait(timeout):
            raise CpuWorkerTimeout(f"CPU-attention job not finished after {timeout:g} s")
        if self._error is not None:
            raise self._error
        return self._result


def default_worker_cpus() -> list[int]:
    """Every CPU this process may use except the first (left to the main thread), or all if only one."""
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    return allowed[1:] if len(allowed) > 1 else allowed


class CpuAttentionWorker:
    """A daemon thread that runs ``CpuJob``s in order, pinned to ``cpu_ids``."""

    def __init__(self, cpu_ids: Sequence[int] | None = None, num_threads: int | None = None,
                 timeout: float = DEFAULT_CPU_JOB_TIMEOUT) -> None:
        if not timeout > 0:
            raise ValueError(f"CPU-attention worker timeout must be > 0 seconds, got {timeout!r}")
        self.cpu_ids = list(cpu_ids) if cpu_ids is not None else default_worker_cpus()
        self.num_threads = num_threads or len(self.cpu_ids)
        self.timeout = float(timeout)
        self._stuck: str | None = None  # why the worker is considered stuck (a job outlived the timeout)
        self._queue: queue.SimpleQueue[CpuJob | None] = queue.SimpleQueue()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="apex-cpu-attention", daemon=True)
        self._thread.start()
        self._started.wait()

    def _loop(self) -> None:
        if hasattr(os, "sched_setaffinity") and self.cpu_ids:
            try:
                os.sched_setaffinity(0, self.cpu_ids)  # 0 = this thread
            except OSError as error:
                logger.warning("could not pin the CPU-attention worker to CPUs %s: %s", self.cpu_ids, error)
        try:
            from apexlib.attention import cpu as cpu_attention

            cpu_attention.set_num_threads(self.num_threads)
        except (ImportError, RuntimeError) as error:  # the kernel may fall back to the torch reference
            logger.warning("CPU attention threads not set: %s", error)
        logger.info("CPU-attention worker on CPUs %s with %d threads", self.cpu_ids, self.num_threads)
        self._started.set()
        with torch.inference_mode():
            while True:
                job = self._queue.get()
                if job is None:
                    return
                job.run()

    def submit(self, function: Callable[[], Any]) -> CpuJob:
        if self._stuck is not None:
            raise CpuWorkerTimeout(self._stuck)
        job = CpuJob(function)
        self._queue.put(job)
        return job

    def wait(self, job: CpuJob) -> Any:
        """``job``'s result, waiting at most ``timeout`` seconds; CpuWorkerTimeout (and the worker marked
        stuck) when it takes longer."""
        try:
            return job.wait(self.timeout)
        except CpuWorkerTimeout:
            self._stuck = (f"a CPU-attention job did not finish within cpu_attention_timeout={self.timeout:g} s; "
                           f"the worker thread on CPUs {self.cpu_ids} is stuck and this engine cannot run "
                           f"CPU-resident requests any more (raise cpu_attention_timeout if the jobs are "
                           f"merely slow)")
            raise CpuWorkerTimeout(self._stuck) from None

    def drain(self) -> None:
        """Wait (bounded) until every job submitted so far has run; errors of those jobs are dropped.

        Used after a failed iteration so that no job of it still writes the CPU cache afterwards."""
        if self._stuck is not None or not self._thread.is_alive():
            return
        try:
            self.wait(self.submit(lambda: None))
        except CpuWorkerTimeout:
            logger.error("%s", self._stuck)

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout=10)
