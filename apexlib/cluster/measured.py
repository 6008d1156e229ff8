"""Measured runs as Ray tasks, each on a node of the hardware kind its figure is about.

A measured run (a profile on a T4, an engine run on an A10G) asks Ray for a GPU and a sliver of the resource
``accelerator_type:<KIND>`` that Ray itself declares on every node with such a GPU (``ray start`` detects it;
``--resources='{"accelerator_type:T4": 1}'`` declares it by hand, as the CPU rehearsal in the tests does).
Each task returns its rows with the node's provenance (``node_*`` columns). A kind that no node of the
cluster has is reported by name and its runs are skipped; the rest go on. A failed run is retried once,
then reported with its node and its error (``MeasuredRuns.failures``), never dropped silently.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import socket
import subprocess
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from apexlib.cluster.executor import ensure_ray
from apexlib.core.host import cpu_info

logger = logging.getLogger(__name__)

ACCELERATOR_PREFIX = "accelerator_type:"
ACCELERATOR_SLIVER = 0.001  # Ray's convention: a task asks this much of the kind, so it only places it
CPU_KIND = "cpu"            # a run that needs no GPU: any node


def accelerator_resource(kind: str) -> str:
    """The Ray resource a node of ``kind`` (``T4``, ``A10G``, ...) declares."""
    return f"{ACCELERATOR_PREFIX}{kind}"


@dataclass(frozen=True)
class MeasuredTask:
    """``fn(*args)`` -> a list of row dicts, run on a node of ``kind`` (``cpu``: any node). ``fn`` is pickled
    by value when it is not importable on the nodes (cloudpickle), so a closure works; ``label`` names it in
    progress bars and failure reports."""

    label: str
    kind: str
    fn: Callable[..., Sequence[Mapping[str, Any]]]
    args: tuple = ()
    num_gpus: float = 1.0
    num_cpus: float = 1.0
    runtime_env: Mapping[str, Any] | None = None  # Ray's: e.g. the checkout to ship to the node

    def __post_init__(self) -> None:
        if not self.kind:
            raise ValueError(f"kind must name a hardware kind (T4, A10G) or {CPU_KIND!r}, got {self.kind!r}")
        if self.num_gpus < 0 or self.num_cpus < 0:
            raise ValueError(f"num_gpus and num_cpus must be >= 0, got {self.num_gpus}, {self.num_cpus}")

    def ray_options(self) -> dict[str, Any]:
        resources = {} if self.kind == CPU_KIND else {accelerator_resource(self.kind): ACCELERATOR_SLIVER}
        options = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus if self.kind != CPU_KIND else 0,
                   "resources": resources, "max_retries": 0}  # retries are ours, so that each is reported
        return options | ({"runtime_env": dict(self.runtime_env)} if self.runtime_env else {})


@dataclass(frozen=True)
class TaskFailure:
    """A run that failed on both attempts (or never ran: no node of its kind)."""

    label: str
    kind: str
    node: str | None
    error: str
    attempts: int

    def __str__(self) -> str:
        where = f"on {self.node}" if self.node else "on no node"
        return f"{self.label} [{self.kind}] failed {where} after {self.attempts} attempt(s): {self.error}"


@dataclass
class MeasuredRuns:
    """Every row that came back (with ``node_*`` provenance), the failures, and the kinds the cluster lacks."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    failures: list[TaskFailure] = field(default_factory=list)
    missing_kinds: list[str] = field(default_factory=list)

    def report(self) -> str:
        lines = [f"no node of kind {kind} in the cluster: its runs were skipped" for kind in self.missing_kinds]
        lines += [str(failure) for failure in self.failures if failure.kind not in self.missing_kinds]
        return "\n".join(lines)


def node_provenance() -> dict[str, Any]:
    """Where this process runs: hostname, IP, GPU names (nvidia-smi, torch-free) and CPU model."""
    gpus = None
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=20, check=True).stdout
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            names = [line.strip() for line in out.splitlines() if line.strip()]
            if visible:  # the GPUs Ray gave this task
                names = [names[int(i)] for i in visible.split(",") if i.strip().isdigit() and int(i) < len(names)]
            gpus = ";".join(names) or None
        except (OSError, subprocess.SubprocessError):
            gpus = None
    try:
        ip = socket.gethostbyname(socket.gethostname())
    except OSError:
        ip = None
    return {"node_hostname": platform.node(), "node_ip": ip, "node_gpu": gpus, "node_cpu": cpu_info()["cpu_model"]}


def _run_on_node(fn: Callable[..., Sequence[Mapping[str, Any]]], args: tuple) -> dict[str, Any]:
    """The task's body: the rows or the error, both with this node's provenance."""
    node = node_provenance()
    try:
        rows = [dict(row) for row in fn(*args)]
    except BaseException as exc:  # reported to the driver with the node: nothing is lost silently
        return {"ok": False, "node": node, "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc()}
    return {"ok": True, "node": node, "rows": rows}


def cluster_kinds(ray) -> set[str]:
    """The hardware kinds some node of the cluster declares."""
    return {name.removeprefix(ACCELERATOR_PREFIX) for name in ray.cluster_resources()
            if name.startswith(ACCELERATOR_PREFIX)}


def run_measured(tasks: Sequence[MeasuredTask], retries: int = 1, progress: bool = True,
                 address: str | None = None) -> MeasuredRuns:
    """Run every task on a node of its kind (at most ``1 + retries`` attempts each); rows in the tasks' order,
    each with ``node_*`` provenance, ``node_kind``, ``task`` and ``attempt``."""
    from tqdm.auto import tqdm

    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    ray = ensure_ray(address)
    present = cluster_kinds(ray)
    result = MeasuredRuns()
    kinds = list(dict.fromkeys(task.kind for task in tasks))
    result.missing_kinds = [kind for kind in kinds if kind != CPU_KIND and kind not in present]
    for kind in result.missing_kinds:
        logger.warning("no node of kind %s in the cluster (it has: %s): skipping its %d run(s)", kind,
                       ", ".join(sorted(present)) or "no accelerator kind",
                       sum(task.kind == kind for task in tasks))
    bars = {kind: tqdm(total=sum(task.kind == kind for task in tasks), desc=f"measured runs on {kind}",
                       position=i, disable=not progress, leave=True) for i, kind in enumerate(kinds)}
    remote = ray.remote(_run_on_node)
    outcome: dict[int, dict[str, Any]] = {}
    pending: dict[Any, tuple[int, int]] = {}  # object ref -> (task index, attempt)

    def submit(index: int, attempt: int) -> None:
        task = tasks[index]
        pending[remote.options(**task.ray_options()).remote(task.fn, task.args)] = (index, attempt)

    try:
        for index, task in enumerate(tasks):
            if task.kind in result.missing_kinds:
                outcome[index] = {"ok": False, "node": None, "attempt": 0,
                                  "error": f"no node of kind {task.kind} in the cluster"}
            else:
                submit(index, 1)
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            index, attempt = pending.pop(done[0])
            task = tasks[index]
            try:
                answer = ray.get(done[0])
            except Exception as exc:  # the worker or its node died: Ray's own error, no provenance from it
                answer = {"ok": False, "node": None, "error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
            answer["attempt"] = attempt
            if not answer["ok"] and attempt <= retries:
                logger.warning("%s [%s] failed on %s (attempt %d), retrying: %s", task.label, task.kind,
                               (answer["node"] or {}).get("node_hostname"), attempt, answer["error"])
                submit(index, attempt + 1)
                continue
            outcome[index] = answer
            bars[task.kind].update()
    finally:
        for bar in bars.values():
            bar.close()
    for index, task in enumerate(tasks):
        answer = outcome[index]
        node = answer["node"] or {}
        if answer["ok"]:
            result.rows += [{**row, "task": task.label, "node_kind": task.kind, "attempt": answer["attempt"], **node}
                            for row in answer["rows"]]
        else:
            failure = TaskFailure(task.label, task.kind, node.get("node_hostname"), answer["error"],
                                  answer["attempt"])
            if task.kind not in result.missing_kinds:
                logger.error("%s", failure)
            result.failures.append(failure)
    return result
