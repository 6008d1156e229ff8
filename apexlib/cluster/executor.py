"""One interface for running many independent, deterministic calls: ``Executor.map(fn, items)``.

``ProcessExecutor`` is the default (one process per core, or this process for one worker); ``RayExecutor``
sends each call to a Ray cluster as a task (``RAY_ADDRESS`` names the cluster; without one, a local cluster
is started in this process). Both return results in the items' order, so a sweep's rows are the same row for
row whichever ran it. ``fn`` must be a module-level function (it is pickled by both).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Protocol

logger = logging.getLogger(__name__)

EXECUTORS = ("process", "ray")
ENV_EXECUTOR = "APEX_EXECUTOR"   # process | ray: overrides the choice RAY_ADDRESS implies
ENV_RAY_ADDRESS = "RAY_ADDRESS"  # Ray's own variable: the cluster to join (e.g. ray://head:10001 or auto)


class Executor(Protocol):
    """Runs ``fn`` over ``items``; yields the results in the items' order as they become available."""

    name: str

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> Iterator[Any]: ...


def default_workers() -> int:
    """Every CPU this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class ProcessExecutor:
    """A local process pool of ``workers`` processes (default: every usable CPU); 1 runs in this process."""

    name = "process"

    def __init__(self, workers: int | None = None) -> None:
        self.workers = default_workers() if workers is None else workers
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> Iterator[Any]:
        if self.workers == 1 or len(items) <= 1:
            yield from map(fn, items)
            return
        with ProcessPoolExecutor(max_workers=min(self.workers, len(items))) as pool:
            yield from pool.map(fn, items)


def ray_module():
    """``ray``, or an ImportError that says how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise ImportError("the Ray executor needs Ray: pip install 'apexlib[cluster]' (or make cluster-venv)") from exc
    return ray


def ensure_ray(address: str | None = None, **init_kwargs: Any):
    """Ray, connected: to ``address`` (default ``RAY_ADDRESS``; none: a local cluster in this process) unless
    this process is already connected."""
    ray = ray_module()
    if not ray.is_initialized():
        address = address or os.environ.get(ENV_RAY_ADDRESS) or None
        logger.info("connecting to Ray at %s", address or "a new local cluster")
        ray.init(address=address, log_to_driver=False, **init_kwargs)
    return ray


class RayExecutor:
    """One Ray task per item (``num_cpus`` each, 1 by default), at most ``max_in_flight`` submitted at once
    (default: the cluster's CPUs x 2), so that a grid of thousands does not flood the object store."""

    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: float = 1.0, max_in_flight: int | None = None) -> None:
        self.address = address
        self.num_cpus = num_cpus
        self.max_in_flight = max_in_flight

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> Iterator[Any]:
        ray = ensure_ray(self.address)
        remote = ray.remote(num_cpus=self.num_cpus, max_retries=1)(fn)
        window = self.max_in_flight or max(2, int(2 * ray.cluster_resources().get("CPU", 1)))
        pending: list[Any] = []
        next_item = 0
        while next_item < len(items) or pending:
            while next_item < len(items) and len(pending) < window:
                pending.append(remote.remote(items[next_item]))
                next_item += 1
            yield ray.get(pending.pop(0))  # in order: the head of the window


def choose_executor(executor: str | Executor | None = None, workers: int | None = None) -> Executor:
    """``executor`` as given; by name (``process``/``ray``); else ``APEX_EXECUTOR``; else Ray when
    ``RAY_ADDRESS`` is set; else the process pool of ``workers``."""
    if executor is not None and not isinstance(executor, str):
        return executor
    name = executor or os.environ.get(ENV_EXECUTOR) or ("ray" if os.environ.get(ENV_RAY_ADDRESS) else "process")
    if name == "process":
        return ProcessExecutor(workers)
    if name == "ray":
        return RayExecutor()
    raise ValueError(f"executor must be one of {', '.join(EXECUTORS)}, got {name!r}")
