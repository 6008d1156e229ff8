"""An upper bound on offline output throughput that no schedule on a cost model can beat. Torch-free.

**What it bounds.** The simulator runs a workload as a sequence of iterations, each timed by
``predict_iteration(cost_model, shape)`` (plus non-negative scheduler and engine time). Whatever the
policy, that sequence must do the workload's work: prefill every prompt, decode every output token
after the first, and read, in each decode step, the KV cache of its context. This module finds the
least total time any sequence of iterations can take on that cost model, as a linear program over
**iteration types**, and returns ``total output tokens / that time``. No simulated run can have a
higher output throughput (``tests/test_bound.py`` checks that on every policy).

**Iteration types** (the branches of ``predict_iteration``): ``none`` with at least one GPU decode,
``none`` with prefill chunks only, ``async_overlap`` (at least one CPU decode, one batch) and
``asymmetric_pipeline`` (a first sub-batch with every prefill and GPU decode and some CPU decodes, a
non-empty second sub-batch of CPU decodes). For each type ``m`` the LP has the number of its
iterations ``n_m`` and the totals over them of prefill tokens ``f``, GPU decodes ``g``, CPU decodes
``c`` (per sub-batch for the pipeline), the KV tokens those decodes read ``Kg``, ``Kc``, sampled rows
``s``, and the time ``tau_m`` they take.

**Time.** Every subtask of the cost model is a maximum of affine functions of the iteration's counts
(the roofline: ``Lin(T) = max(W, F*T)`` for the weight pass against the FLOPs of ``T`` tokens, the
LM head likewise, attention ``a * kv tokens``, copies ``x0 + x * count``). For a convex function
``h`` of an iteration's counts ``v``, ``sum_j h(v_j) >= max_p (a_p * n + b_p . sum_j v_j)`` for each
affine piece ``a_p + b_p . v`` below ``h``; so ``tau_m >= a_p * n_m + b_p . V_m`` for every piece,
linear in the LP's variables, is never above what ``n_m`` iterations with totals ``V_m`` take. The
pieces per type:

- ``none``: ``Lin(f + g) + G + S + O``, ``G = a_p * f + a_d * Kg`` (prefill attention at least its
  KV write; its quadratic FLOPs are dropped), ``S`` the LM head of the sampled rows, ``O`` the
  launch overhead (fixed plus per sequence);
- ``async_overlap``: ``d * Lin + L * min(j, l) + (1 - a) * max(d * G, k * C + X) + a * (d * G + k * C
  + X) + S + O`` with the measured hybrid adjustment (``d`` device slowdown, ``k`` CPU slowdown, ``a``
  serial fraction, ``j`` per-job seconds; ``l`` the inline runtime's launch, so the same piece also
  holds for ``CpuRuntime.INLINE``, whose forward is longer), ``C = b * Kc``, ``X`` the copies;
- ``asymmetric_pipeline``: its two-resource schedule takes at least each of: all device work
  ``d * (Lin(A) + Lin(B) + G)``, all CPU work ``k * (C_A + C_B) + X_A + X_B``, and each sub-batch's
  dependency chain ``d * Lin(A) + k * C_A + X_A`` and ``d * Lin(B) + k * C_B + X_B`` (each layer's CPU
  job waits for its pre-attention linear and its post-attention linear waits for the job); then
  ``+ S + O``. Per-job times are dropped there.

KV swaps add time and are left out (``>= 0``): the cost model charges nothing for a CPU-tier prefill's
fresh K/V, so a schedule that places each request in its final tier when it is admitted moves no KV;
the PCIe bytes every schedule pays are the q/k/v and output copies of its CPU decodes (``X``).

**Constraints**, each true of every iteration and so of the totals of every type:

- KV capacity: the decodes of an iteration read at most its tier's KV (``Kg <= n * gpu_tokens``,
  ``Kc <= n * cpu_tokens``, and with the prefill chunks, which occupy at least their own tokens,
  ``Kg + Kc + f <= n * (gpu_tokens + cpu_tokens)``); each decode reads at least the shortest context
  (``Kg >= ctx_min * g``);
- the token budget ``f + g + c <= n * max_num_batched_tokens``, the running-request limit ``g + c <= n *
  min(max_num_seqs, requests)``, sampled rows ``g + c <= s <= g + c + f``, and the type's own
  ``>= 1`` per iteration (e.g. ``c >= n`` for ``async_overlap``);
- which contexts a tier gets: the GPU decodes of a run are some of the workload's decode steps, so in
  total they read at least what as many of its shortest steps read (``sum Kg >= F(sum g)``, ``F`` the
  sum of the ``m`` shortest contexts, convex, entered as tangents); the same for the CPU decodes. The
  per-iteration limits alone would let the LP give the GPU only short contexts and the CPU only long
  ones, which no run can do over a whole workload;
- the work: ``sum s >= output tokens``; ``sum (g + c) + E >= D`` and ``sum f >= P + (p_min + 1) * E``
  and ``sum (Kg + Kc) + ctx_max * E >= K``, where ``D`` is the decode steps, ``P`` the prompt tokens
  and ``K`` the sum over decode steps of their context (``prompt_len + j`` for the step that emits
  output ``j + 1``), and ``E >= 0`` the decode steps a schedule replaces by recomputing a preempted
  request (each costs a prefill of at least ``p_min + 1`` tokens instead).

The KV constraints are what make the bound informative: ``n * gpu_tokens >= Kg`` in total is the
mean-context batch size (``gpu_tokens / mean context``) of a GPU-only schedule, without assuming that
contexts are uniform over time.

**Why it is an upper bound.** Every simulated run maps to a feasible point of the LP (count each of its
iterations in its type; each piece is below that iteration's predicted time), so the LP's minimum is at
most the run's total predicted time, which is at most its duration; ``output tokens / minimum`` is at
least the run's output throughput. It holds exactly for cost models whose subtasks are maxima of affine
functions of the counts (the roofline ``RooflineCostModel``, and ``ZeroCostModel``); for a measured
``TableCostModel`` the pieces are read off the model at probe points and the bound is as good as the
table's convexity.

**What it does not assume.** No schedule is required to be realisable: the LP may use fractions of
iterations, run every iteration at full KV capacity (no block rounding, no ramp-up or drain), and
split work between types at will. So it is a ceiling, not a target: a policy's distance to it mixes
what a better rule could gain and what no rule can (``BoundResult.schedule`` says what the optimum
does).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from apexlib.core.config import EngineConfig
from apexlib.core.plan import OverlapMode
from apexlib.costs import CostModel
from apexlib.engine.assemble import cpu_transfer
from apexlib.workloads import Workload

logger = logging.getLogger(__name__)

__all__ = ["BOUND_POLICY", "BoundInputs", "BoundResult", "throughput_bound", "bound_inputs", "simulated_bound"]

#: The ``policy`` column of the bound's summary row (``apex simulate --bound``, the notebooks).
BOUND_POLICY = "bound"
BOUND_LABEL = "bound (best schedule on the cost model)"

_TYPES = ("none", "prefill_only", "async_overlap", "asymmetric_pipeline")
# per-type variables (the pipeline splits its CPU decodes into sub-batches A and B)
_FIELDS = {
    "none": ("n", "f", "g", "Kg", "s", "tau"),
    "prefill_only": ("n", "f", "s", "tau"),
    "async_overlap": ("n", "f", "g", "c", "Kg", "Kc", "s", "tau"),
    "asymmetric_pipeline": ("n", "f", "g", "cA", "cB", "Kg", "KcA", "KcB", "s", "tau"),
}
_PROBE_TOKENS = 1 << 16


@dataclass(frozen=True)
class BoundInputs:
    """The workload's work and the machine's limits that the LP needs (tokens and counts)."""

    prompt_tokens: int
    output_tokens: int
    decode_steps: int
    decode_kv_tokens: int  # sum over decode steps of their context
    min_prompt_len: int
    max_context: int
    num_requests: int
    gpu_kv_tokens: int
    cpu_kv_tokens: int
    max_num_batched_tokens: int
    max_num_seqs: int
    transfer_bytes_per_cpu_token: int = 0
    transfer_to_cpu_fraction: float = 0.75
    # (m, the sum of the m shortest decode contexts, the (m+1)-th shortest context) at breakpoints m:
    # tangents of the convex function "least KV any m decode steps read"
    context_tangents: tuple[tuple[int, int, int], ...] = ()


@dataclass(frozen=True)
class BoundResult:
    """The bound (``output_throughput``, tokens/s), the least total time and the optimum's schedule:
    per iteration type, its iterations and per-iteration means (``schedule``)."""

    output_throughput: float
    total_seconds: float
    inputs: BoundInputs
    schedule: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    recomputed_decodes: float = 0.0
    # the bound over schedules that never recompute (``throughput_bound(allow_recompute=False)``), when computed
    without_recompute: BoundResult | None = None

    def summary_row(self, **labels: Any) -> dict[str, Any]:
        """One summary row in the simulator's columns: ``policy`` = ``bound`` and its output throughput."""
        row: dict[str, Any] = {"row_type": "summary", "policy": BOUND_POLICY, "executor": "bound",
                               "output_throughput": self.output_throughput,
                               "duration_s": self.total_seconds, "completed": self.inputs.num_requests,
                               "total_output_tokens": self.inputs.output_tokens}
        row["bound_recomputed_decodes"] = self.recomputed_decodes
        if self.without_recompute is not None:
            row["bound_without_recompute"] = self.without_recompute.output_throughput
        plain = self.without_recompute or self  # the schedule a reader can follow: no recompute
        for kind, values in plain.schedule.items():
            for name in ("iterations", "gpu_decodes", "cpu_decodes", "gpu_kv_tokens", "cpu_kv_tokens",
                         "prefill_tokens"):
                row[f"bound_{kind}_{name}"] = values.get(name, 0.0)
        row.update(labels)
        return row


def bound_inputs(workload: Workload, config: EngineConfig, transfer_bytes_per_cpu_token: int = 0,
                 transfer_to_cpu_fraction: float = 0.75) -> BoundInputs:
    """The work of ``workload`` and the limits of a resolved engine config."""
    if not workload.requests:
        raise ValueError("the bound needs a workload with at least one request")
    requests = workload.requests
    steps = sum(r.output_len - 1 for r in requests)
    # the step that emits output j + 1 (j = 1 .. o - 1) reads prompt_len + j tokens
    kv = sum((r.output_len - 1) * r.prompt_len + (r.output_len - 1) * r.output_len // 2 for r in requests)
    block = config.cache.block_size
    return BoundInputs(context_tangents=_context_tangents(workload),
        prompt_tokens=sum(r.prompt_len for r in requests), output_tokens=sum(r.output_len for r in requests),
        decode_steps=steps, decode_kv_tokens=kv, min_prompt_len=min(r.prompt_len for r in requests),
        max_context=max(r.prompt_len + r.output_len for r in requests), num_requests=len(requests),
        gpu_kv_tokens=config.cache.num_gpu_blocks * block, cpu_kv_tokens=config.cache.num_cpu_blocks * block,
        max_num_batched_tokens=config.scheduler.max_num_batched_tokens, max_num_seqs=config.scheduler.max_num_seqs,
        transfer_bytes_per_cpu_token=transfer_bytes_per_cpu_token, transfer_to_cpu_fraction=transfer_to_cpu_fraction)


_TANGENTS = 64


def _context_tangents(workload: Workload) -> tuple[tuple[int, int, int], ...]:
    """Tangents of ``F(m)``, the sum of the ``m`` shortest decode-step contexts of ``workload`` (each
    request's steps read ``prompt_len + 1 .. prompt_len + output_len - 1``), at ``_TANGENTS`` + 1 evenly
    spaced ``m``. ``F`` is convex (its increments are the sorted contexts), so ``F(m) >= F(k) + c_(k+1) *
    (m - k)`` for every ``m``: any set of ``m`` decode steps reads at least that."""
    counts: dict[int, int] = {}
    for r in workload.requests:  # a histogram by context: requests share most of their range
        for context in range(r.prompt_len + 1, r.prompt_len + r.output_len):
            counts[context] = counts.get(context, 0) + 1
    total = sum(counts.values())
    if total == 0:
        return ()
    targets = sorted({round(total * i / _TANGENTS) for i in range(_TANGENTS + 1)})
    tangents: list[tuple[int, int, int]] = []
    taken = prefix = 0
    contexts = sorted(counts)
    index = 0
    for target in targets:
        while index < len(contexts) and taken + counts[contexts[index]] <= target:
            taken += counts[contexts[index]]
            prefix += contexts[index] * counts[contexts[index]]
            index += 1
        if index == len(contexts):
            tangents.append((total, prefix, contexts[-1]))
            break
        partial = target - taken  # part of the next context's steps
        tangents.append((target, prefix + partial * contexts[index], contexts[index]))
    return tuple(tangents)


@dataclass(frozen=True)
class _Coefficients:
    """The cost model read as maxima of affine functions (see the module docstring)."""

    weights: float        # W: one pass over the layers' weights (linear(1, 0))
    per_token: float      # F: linear seconds per token in the compute-bound regime
    head: float           # the LM head's fixed pass
    head_per_row: float
    prefill_kv: float     # a_p: prefill attention per token (its KV write)
    gpu_kv: float         # a_d: device decode attention per KV token
    cpu_kv: float         # b: CPU decode attention per KV token
    copy_fixed: float     # x0: copies of a non-empty CPU job, whole model
    copy_per_decode: float
    overhead: float
    overhead_per_sequence: float
    layers: int


def _coefficients(cost_model: CostModel, inputs: BoundInputs) -> _Coefficients:
    big = _PROBE_TOKENS
    weights = cost_model.linear(1, 0)
    per_token = max(0.0, min((cost_model.linear(4 * big, 0) - cost_model.linear(2 * big, 0)) / (2 * big),
                             cost_model.linear(big, 0) / big))
    head = cost_model.linear(0, 1)
    head_per_row = max(0.0, min((cost_model.linear(0, 4 * big) - cost_model.linear(0, 2 * big)) / (2 * big),
                                cost_model.linear(0, big) / big))
    prefill_kv = min(cost_model.gpu_prefill_attention((1,) * n) / n for n in (1, 64, 1024))
    gpu_kv = min(cost_model.gpu_decode_attention(k, 1) / k for k in (16, 1024, big))
    cpu_kv = min(cost_model.cpu_decode_attention(k, 1) / k for k in (16, 1024, big))
    layers = max(1, cost_model.num_layers)
    copy_fixed = copy_per_decode = 0.0
    if inputs.transfer_bytes_per_cpu_token:
        def copies(count: int) -> float:
            total = count * inputs.transfer_bytes_per_cpu_token
            to_cpu = total * inputs.transfer_to_cpu_fraction
            return layers * (cost_model.transfer(int(to_cpu / layers), "d2h")
                             + cost_model.transfer(int((total - to_cpu) / layers), "h2d"))
        copy_per_decode = max(0.0, (copies(1025) - copies(1)) / 1024)
        one_byte = max(0.0, cost_model.transfer(2, "d2h") - cost_model.transfer(1, "d2h"))
        copy_fixed = max(0.0, copies(1) - copy_per_decode - 4 * layers * one_byte)  # int() rounding per copy
    return _Coefficients(weights=weights, per_token=per_token, head=head, head_per_row=head_per_row,
                         prefill_kv=prefill_kv, gpu_kv=gpu_kv, cpu_kv=cpu_kv, copy_fixed=copy_fixed,
                         copy_per_decode=copy_per_decode, overhead=cost_model.launch_overhead(),
                         overhead_per_sequence=cost_model.launch_overhead_per_sequence(), layers=layers)


class _Program:
    """Variables by name, rows of ``A_ub x <= b_ub`` as {name: coefficient} dicts."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.rows: list[tuple[dict[str, float], float]] = []

    def var(self, name: str) -> str:
        self.names.append(name)
        return name

    def le(self, terms: Mapping[str, float], bound: float = 0.0) -> None:
        self.rows.append((dict(terms), bound))

    def ge(self, terms: Mapping[str, float], bound: float = 0.0) -> None:
        self.le({k: -v for k, v in terms.items()}, -bound)


def _add(*parts: Mapping[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for part in parts:
        for key, value in part.items():
            out[key] = out.get(key, 0.0) + value
    return out


def _scale(part: Mapping[str, float], factor: float) -> dict[str, float]:
    return {k: v * factor for k, v in part.items()}


def throughput_bound(inputs: BoundInputs, cost_model: CostModel, allow_recompute: bool = True) -> BoundResult:
    """Solve the LP of the module docstring: the bound on output throughput for ``inputs`` on ``cost_model``.

    ``allow_recompute=False`` bounds only the schedules that never replace a decode step by recomputing
    its request (``E = 0``): where weight passes leave FLOPs idle (few tokens per iteration), the LP
    may otherwise spend them on recomputing contexts instead of reading them, which is a schedule of the
    cost model (its prefill attention ignores earlier chunks) that no policy here runs on purpose."""
    from scipy.optimize import linprog

    k = _coefficients(cost_model, inputs)
    lp = _Program()
    v = {t: {name: lp.var(f"{t}.{name}") for name in _FIELDS[t]} for t in _TYPES}
    recompute, replaced = lp.var("E"), lp.var("R")
    seqs = min(inputs.max_num_seqs, inputs.num_requests)
    ctx_min = inputs.min_prompt_len + 1
    overlap = cost_model.hybrid_adjustment(OverlapMode.ASYNC_OVERLAP)
    pipe = cost_model.hybrid_adjustment(OverlapMode.ASYMMETRIC_PIPELINE)
    inline = cost_model.inline_launch_seconds

    def lin(n: str, tokens: Mapping[str, float], slowdown: float = 1.0) -> list[dict[str, float]]:
        """Pieces of the weight pass: slowdown * max(W per iteration, F per token)."""
        return [{n: slowdown * k.weights}, _scale(tokens, slowdown * k.per_token)]

    def head(n: str, rows: str, fixed: bool) -> list[dict[str, float]]:
        return ([{n: k.head}] if fixed else []) + [{rows: k.head_per_row}]

    def overhead(n: str, sequences: Mapping[str, float]) -> dict[str, float]:
        return _add({n: k.overhead}, _scale(sequences, k.overhead_per_sequence))

    def tau_at_least(tau: str, *choices: list[dict[str, float]], common: Mapping[str, float]) -> None:
        """tau >= common + one piece of each choice, for every combination."""
        combos: list[dict[str, float]] = [dict(common)]
        for options in choices:
            combos = [_add(c, o) for c in combos for o in options]
        for combo in combos:
            lp.ge(_add({tau: 1.0}, _scale(combo, -1.0)))

    # -- none (at least one GPU decode) ----------------------------------------------------------------
    x = v["none"]
    tau_at_least(x["tau"], lin(x["n"], {x["f"]: 1, x["g"]: 1}), head(x["n"], x["s"], True),
                 common=_add({x["f"]: k.prefill_kv, x["Kg"]: k.gpu_kv}, overhead(x["n"], {x["g"]: 1})))
    lp.ge({x["g"]: 1, x["n"]: -1})
    # -- prefill chunks only ---------------------------------------------------------------------------
    x = v["prefill_only"]
    tau_at_least(x["tau"], lin(x["n"], {x["f"]: 1}), head(x["n"], x["s"], False),
                 common=_add({x["f"]: k.prefill_kv}, overhead(x["n"], {})))
    lp.ge({x["f"]: 1, x["n"]: -1})
    lp.le({x["s"]: 1, x["f"]: -1})
    lp.le({x["f"]: 1, x["n"]: -inputs.max_num_batched_tokens})
    lp.le({x["f"]: 1, x["n"]: -(inputs.gpu_kv_tokens + inputs.cpu_kv_tokens)})
    # -- async overlap ---------------------------------------------------------------------------------
    x = v["async_overlap"]
    d, cs, a = overlap.device_slowdown, overlap.cpu_slowdown, overlap.serial_fraction
    device = {x["f"]: d * k.prefill_kv, x["Kg"]: d * k.gpu_kv}
    cpu_job = {x["Kc"]: cs * k.cpu_kv, x["n"]: k.copy_fixed, x["c"]: k.copy_per_decode}
    both = _add(device, cpu_job)
    longer = [_scale(device, 1 - a), _scale(cpu_job, 1 - a)]
    tau_at_least(x["tau"], lin(x["n"], {x["f"]: 1, x["g"]: 1, x["c"]: 1}, d), longer,
                 head(x["n"], x["s"], True),
                 common=_add(_scale(both, a), {x["n"]: k.layers * min(overlap.per_job_seconds, inline)},
                             overhead(x["n"], {x["g"]: 1, x["c"]: 1})))
    lp.ge({x["c"]: 1, x["n"]: -1})
    # -- asymmetric pipeline ---------------------------------------------------------------------------
    x = v["asymmetric_pipeline"]
    d, cs = pipe.device_slowdown, pipe.cpu_slowdown
    first_tokens = {x["f"]: 1, x["g"]: 1, x["cA"]: 1}
    lin_a, lin_b = lin(x["n"], first_tokens, d), lin(x["n"], {x["cB"]: 1}, d)
    device_attention = {x["f"]: d * k.prefill_kv, x["Kg"]: d * k.gpu_kv}
    job_a = {x["KcA"]: cs * k.cpu_kv, x["cA"]: k.copy_per_decode}
    job_b = {x["KcB"]: cs * k.cpu_kv, x["cB"]: k.copy_per_decode, x["n"]: k.copy_fixed}
    forward = [_add(p, q, device_attention) for p in lin_a for q in lin_b] + [_add(job_a, job_b)] \
        + [_add(p, job_a) for p in lin_a] + [_add(q, job_b) for q in lin_b]
    tau_at_least(x["tau"], forward, head(x["n"], x["s"], True),
                 common=overhead(x["n"], {x["g"]: 1, x["cA"]: 1, x["cB"]: 1}))
    lp.ge({x["cB"]: 1, x["n"]: -1})
    lp.ge(_add(first_tokens, {x["n"]: -1}))

    # -- per-type limits of every iteration ------------------------------------------------------------
    work_decodes: dict[str, float] = {recompute: 1.0}
    work_kv: dict[str, float] = {replaced: 1.0}
    rows: dict[str, float] = {}
    prefill: dict[str, float] = {replaced: -1.0}
    lp.ge({replaced: 1.0, recompute: -float(ctx_min)})
    if not allow_recompute:
        lp.le({recompute: 1.0}, 0.0)
    lp.le({replaced: 1.0, recompute: -float(inputs.max_context)})
    for t in ("none", "async_overlap", "asymmetric_pipeline"):
        x = v[t]
        cpu_counts = [x[name] for name in ("c", "cA", "cB") if name in x]
        cpu_kvs = [x[name] for name in ("Kc", "KcA", "KcB") if name in x]
        decodes = _add({x["g"]: 1}, {c: 1 for c in cpu_counts})
        lp.le(_add(decodes, {x["f"]: 1, x["n"]: -inputs.max_num_batched_tokens}))
        lp.le(_add(decodes, {x["n"]: -seqs}))
        lp.le({x["Kg"]: 1, x["n"]: -inputs.gpu_kv_tokens})
        lp.ge({x["Kg"]: 1, x["g"]: -ctx_min})
        lp.le({x["Kg"]: 1, x["g"]: -inputs.max_context})
        if cpu_kvs:
            lp.le(_add({kv: 1 for kv in cpu_kvs}, {x["n"]: -inputs.cpu_kv_tokens}))
            lp.ge(_add({kv: 1 for kv in cpu_kvs}, {c: -ctx_min for c in cpu_counts}))
            for kv_name, count_name in zip(cpu_kvs, cpu_counts, strict=True):
                lp.ge({kv_name: 1, count_name: -ctx_min})
                lp.le({kv_name: 1, count_name: -inputs.max_context})
        lp.le(_add({x["Kg"]: 1, x["f"]: 1}, {kv: 1 for kv in cpu_kvs},
                   {x["n"]: -(inputs.gpu_kv_tokens + inputs.cpu_kv_tokens)}))
        lp.ge(_add({x["s"]: 1}, _scale(decodes, -1)))
        lp.le(_add({x["s"]: 1, x["f"]: -1}, _scale(decodes, -1)))
        work_decodes = _add(work_decodes, decodes)
        work_kv = _add(work_kv, {x["Kg"]: 1}, {kv: 1 for kv in cpu_kvs})
    for t in _TYPES:
        rows[v[t]["s"]] = 1.0
        prefill[v[t]["f"]] = 1.0
    # GPU decodes (and CPU decodes) are some of the workload's decode steps: they read at least what the
    # same number of its shortest steps read
    for names in (("Kg",), ("Kc", "KcA", "KcB")):
        counts = {"Kg": ("g",), "Kc": ("c",), "KcA": ("cA",), "KcB": ("cB",)}
        for m, least, slope in inputs.context_tangents:
            terms: dict[str, float] = {}
            for t in ("none", "async_overlap", "asymmetric_pipeline"):
                for kv_name in names:
                    if kv_name in v[t]:
                        terms[v[t][kv_name]] = 1.0
                        terms[v[t][counts[kv_name][0]]] = -float(slope)
            lp.ge(terms, float(least - slope * m))
    lp.ge(work_decodes, inputs.decode_steps)
    lp.ge(work_kv, inputs.decode_kv_tokens)
    lp.ge(rows, inputs.output_tokens)
    lp.ge(prefill, inputs.prompt_tokens)
    if inputs.cpu_kv_tokens == 0:  # no CPU tier: no CPU decodes
        for t in ("async_overlap", "asymmetric_pipeline"):
            lp.le({v[t]["n"]: 1}, 0.0)

    index = {name: i for i, name in enumerate(lp.names)}
    objective = [0.0] * len(lp.names)
    for t in _TYPES:
        objective[index[v[t]["tau"]]] = 1.0
    a_ub = [[0.0] * len(lp.names) for _ in lp.rows]
    for row, (terms, _) in zip(a_ub, lp.rows, strict=True):
        for name, value in terms.items():
            row[index[name]] += value
    b_ub = [bound for _, bound in lp.rows]
    solution = linprog(objective, A_ub=a_ub, b_ub=b_ub, bounds=[(0, None)] * len(lp.names), method="highs")
    if solution.status != 0:
        raise RuntimeError(f"the bound's linear program did not solve: {solution.message}")
    values = dict(zip(lp.names, solution.x, strict=True))
    total = float(solution.fun)
    schedule: dict[str, dict[str, float]] = {}
    for t in _TYPES:
        x = v[t]
        n = values[x["n"]]
        if n <= 1e-9:
            continue
        cpu = sum(values[x[c]] for c in ("c", "cA", "cB") if c in x)
        schedule[t] = {"iterations": n, "seconds": values[x["tau"]],
                       "gpu_decodes": values.get(x.get("g", ""), 0.0) / n, "cpu_decodes": cpu / n,
                       "prefill_tokens": values[x["f"]] / n,
                       "gpu_kv_tokens": values.get(x.get("Kg", ""), 0.0) / n,
                       "cpu_kv_tokens": sum(values[x[c]] for c in ("Kc", "KcA", "KcB") if c in x) / n}
    throughput = inputs.output_tokens / total if total > 0 else math.inf
    logger.info("bound: %.1f output tok/s (%.3f s); schedule %s", throughput, total, schedule)
    return BoundResult(output_throughput=throughput, total_seconds=total, inputs=inputs, schedule=schedule,
                       recomputed_decodes=values[recompute])


def simulated_bound(workload: Workload, settings=None, *, cost_model: CostModel, **engine_args: Any) -> BoundResult:
    """The bound for ``workload`` on ``cost_model`` with the engine limits ``simulate`` would resolve from
    the same ``settings`` (or keywords): its GPU and CPU KV tiers, token budget and request limit; with
    ``without_recompute``, the bound over the schedules that never recompute."""
    from apexlib.core.models import resolve_model_config
    from apexlib.sim.simulator import simulated_engine_config, simulation_settings

    settings = simulation_settings(settings, dict(engine_args))
    config = simulated_engine_config(workload, settings, cost_model)
    transfer = cpu_transfer(resolve_model_config(settings.engine.model), config.dtype, config.device)
    inputs = bound_inputs(workload, config, transfer.bytes_per_token, transfer.to_cpu_fraction)
    result = throughput_bound(inputs, cost_model)
    return dataclasses.replace(result, without_recompute=throughput_bound(inputs, cost_model, allow_recompute=False))
