"""The profiling-informed policies: ``neo`` (asymmetric pipelining) and ``apex`` (this paper).

Both place and move requests like NEO: new requests go to the GPU tier while it has room and
overflow to the CPU tier; when GPU blocks run out the newest GPU-resident decode is swapped out;
CPU-resident requests are swapped back under a 95% usage hysteresis. They differ in how each
iteration runs its CPU-resident decodes, decided from a ``CostModel``'s predictions:

- ``NeoPolicy``: NEO's load-aware rule. CPU decodes are admitted greedily (in FCFS order) into two
  sub-batches while each sub-batch's CPU attention fits under the device work it overlaps (the
  "slack" rule: sub-batch B's CPU job hides under A's linear work and device attention, A's under
  B's linear work); then the pipelined iteration is compared with the GPU-only one by predicted
  tokens per second and the better runs. CPU-resident requests do not advance in GPU-only iterations.
- ``NeoPublishedPolicy``: NEO's decision as its public code makes it (the launch charge of its
  predictor included), on its single-thread runtime (``CpuRuntime.INLINE``).
- ``ApexPolicy``: NEO's plan is the reference; APEX leaves it for a plan with a higher predicted rate
  that advances the same requests, or only the overdue one, by asynchronous overlap (one batch, CPU
  attention overlapping device attention), adds CPU decodes only while their job hides under the device
  attention, forces in the longest-waiting CPU decode once it is overdue (``max_stall_iterations``),
  and keeps an optional per-iteration time bound (a TPOT bound). The rule and its derivation are in
  its docstring.

Tokens per second counts the tokens an iteration emits (one per sampled sequence). Every plan
carries its prediction (``IterationPlan.predicted``) so the engine can compare it with measurement.
"""

from __future__ import annotations

from dataclasses import replace

from apexlib.core.plan import CpuRuntime, OverlapMode, PredictedTimes, ScheduledSequence, Tier
from apexlib.core.request import Request
from apexlib.costs import CostModel, IterationShape, predict_iteration
from apexlib.kvcache.manager import KVCacheManager
from apexlib.policies.base import IterationCandidate, IterationDecision, Policy
from apexlib.policies.options import DEFAULT_MAX_STALL_ITERATIONS, ApexOptions


class _ProfiledPolicy(Policy):
    uses_cpu_tier = True

    def __init__(self, cost_model: CostModel, transfer_bytes_per_cpu_token: int = 0,
                 transfer_to_cpu_fraction: float = 0.75) -> None:
        self.cost_model = cost_model
        self.transfer_bytes_per_cpu_token = transfer_bytes_per_cpu_token
        self.transfer_to_cpu_fraction = transfer_to_cpu_fraction

    def admission_tier(self, request: Request, num_total_tokens: int, kv: KVCacheManager) -> Tier | None:
        for tier in (Tier.GPU, Tier.CPU):
            if kv.can_allocate(request.request_id, num_total_tokens, tier):
                return tier
        return None

    def overlap_mode(self, num_cpu_decodes: int) -> OverlapMode:  # decide() is the real entry point
        return OverlapMode.NONE

    # -- predictions ---------------------------------------------------------------------------
    def _base_shape(self, candidate: IterationCandidate) -> IterationShape:
        return IterationShape(
            mode=OverlapMode.NONE,
            prefill_lengths=tuple(s.num_new_tokens for s in candidate.prefills),
            gpu_decode_kv_tokens=sum(s.context_len for s in candidate.gpu_decodes),
            num_gpu_decodes=len(candidate.gpu_decodes),
            transfer_bytes_per_cpu_token=self.transfer_bytes_per_cpu_token,
            transfer_to_cpu_fraction=self.transfer_to_cpu_fraction,
            num_sampled=sum(1 for s in candidate.prefills if s.sample) + len(candidate.gpu_decodes),
        )

    @staticmethod
    def _rate(tokens: int, predicted: PredictedTimes) -> float:
        return tokens / predicted.total if predicted.total > 0 else float(tokens) * 1e12

    def _gpu_only(self, candidate: IterationCandidate) -> tuple[float, IterationDecision]:
        shape = self._base_shape(candidate)
        predicted = predict_iteration(self.cost_model, shape)
        decision = IterationDecision(mode=OverlapMode.NONE, cpu_decodes=(), predicted=predicted)
        return self._rate(shape.sampled_rows, predicted), decision

    def _pipelined(self, candidate: IterationCandidate, order: tuple[ScheduledSequence, ...] | None = None,
                   forced: frozenset[str] = frozenset()) -> tuple[float, IterationDecision] | None:
        """NEO's greedy slack rule over the CPU decodes in ``order`` (default FCFS), then the pipeline's
        prediction. Sequences in ``forced`` join even when they do not fit under the slack (into the
        second sub-batch, whose CPU job the first one's device work hides)."""
        model = self.cost_model
        base = self._base_shape(candidate)
        first_tokens = base.num_tokens
        first_device = model.linear(first_tokens, 0) + model.gpu_prefill_attention(base.prefill_lengths) \
            + model.gpu_decode_attention(base.gpu_decode_kv_tokens, base.num_gpu_decodes)
        per_token_transfer = self._transfer_seconds(1)
        first: list[ScheduledSequence] = []
        second: list[ScheduledSequence] = []
        first_kv = second_kv = 0
        for sequence in candidate.cpu_decodes if order is None else order:
            context = sequence.context_len
            # Sub-batch B's CPU job hides under A's device work (A grows with what joins it).
            second_cpu = model.cpu_decode_attention(second_kv + context, len(second) + 1) \
                + per_token_transfer * (len(second) + 1)
            if sequence.request_id in forced or second_cpu <= first_device \
                    + model.linear(first_tokens + len(first), 0) - model.linear(first_tokens, 0):
                second.append(sequence)
                second_kv += context
                continue
            # A's CPU job hides under B's linear work.
            first_cpu = model.cpu_decode_attention(first_kv + context, len(first) + 1) \
                + per_token_transfer * (len(first) + 1)
            if first_cpu <= model.linear(len(second), 0):
                first.append(sequence)
                first_kv += context
                continue
            if forced:
                continue  # later forced sequences must still join
            break
        if not second:
            return None
        shape = replace(base, mode=OverlapMode.ASYMMETRIC_PIPELINE,
                        cpu_decode_kv_tokens=first_kv + second_kv, num_cpu_decodes=len(first) + len(second),
                        pipeline_split=(first_kv, len(first)), num_sampled=base.sampled_rows + len(first) + len(second))
        predicted = predict_iteration(model, shape)
        decision = IterationDecision(mode=OverlapMode.ASYMMETRIC_PIPELINE, cpu_decodes=tuple(first + second),
                                     pipeline_split=len(first), predicted=predicted)
        return self._rate(shape.sampled_rows, predicted), decision

    def _transfer_seconds(self, count: int) -> float:
        if not self.transfer_bytes_per_cpu_token:
            return 0.0
        total = count * self.transfer_bytes_per_cpu_token
        to_cpu = int(total * self.transfer_to_cpu_fraction)
        return self.cost_model.transfer(to_cpu, "d2h") + self.cost_model.transfer(total - to_cpu, "h2d")


    def _neo_plan(self, candidate: IterationCandidate) -> tuple[float, IterationDecision]:
        """NEO's choice and its rate: the slack-rule pipeline when it beats GPU-only, else GPU-only."""
        best = self._gpu_only(candidate)
        if candidate.cpu_decodes:
            pipelined = self._pipelined(candidate)
            if pipelined is not None and pipelined[0] > best[0]:
                best = pipelined
        return best


class NeoPolicy(_ProfiledPolicy):
    name = "neo"

    def decide(self, candidate: IterationCandidate) -> IterationDecision:
        return self._neo_plan(candidate)[1]




class ApexPolicy(_ProfiledPolicy):
    """APEX: one batch with asynchronous CPU overlap when it pays, NEO's pipeline or GPU-only otherwise.

    **The rule, every iteration** (rates are the cost model's predicted emitted tokens per second):

    1. *NEO's plan is the reference.* Compute the plan :class:`NeoPolicy` would run in this state
       (its slack-rule pipeline when that beats GPU-only, else GPU-only) and the set ``A`` of CPU
       decodes it advances.
    2. *Required progress.* ``R = A`` plus the offered CPU decode that has waited longest, once it has
       waited ``max_stall_iterations`` consecutive iterations (``IterationCandidate.cpu_stalls``); the
       other overdue requests go first wherever the slack rule has room.
    3. *Free riders.* Further CPU decodes join an overlap set, in order of increasing context, only
       while their CPU job stays hidden under the device attention of the same layers
       (``C + X <= G`` after the measured hybrid adjustments) and the predicted rate rises: they fill
       CPU time that is idle anyway and never lengthen the iteration beyond its extra linear rows.
    4. *Candidates* advance every request of ``R``: NEO's plan (when no request is overdue; otherwise
       NEO's slack rule run with the overdue requests first and the longest-waiting one forced in, so
       the overdue requests take the CPU time NEO's own set would have used), and asynchronous overlap
       (one batch, no split) of ``R`` plus the free riders. One more advances only the forced overdue
       request of ``R``: the *hidden overlap*, asynchronous overlap of it plus the free riders, every
       other CPU decode waiting. It is left out under an ``iteration_time_bound``: a TPOT bound asks
       that every running request advance, and the hidden overlap, always within the bound, would
       otherwise win there by default and leave the CPU-resident requests waiting (simulated T4,
       Llama-2-7B, 32 requests at 2 req/s with a 90 ms bound: 132 -> 98 tok/s, TPOT p99 205 -> 349 ms).
    5. *Choice.* Among the candidates within ``iteration_time_bound`` (all, when none is), the higher
       predicted rate runs.

    **Why the hidden overlap.** The throughput bound (``apexlib.sim.bound``) says what the best schedule
    on the cost model does: where the device's decode attention is long beside the host's (the A10G
    shapes), it keeps the GPU tier full and runs, every iteration, only the CPU decodes whose job hides
    under that attention; the other CPU-resident requests wait for GPU room. NEO's plan serves more of
    them per iteration but through a second pass over the weights, at a lower rate; requiring its set
    (as steps 2 and 4 do) made APEX follow it there (0.68-0.81 of the bound on the simulated A10G
    Llama-2-7B grid; with the hidden overlap 0.75-0.87, and +6-15% throughput). Where the pipeline
    is the better iteration (the T4 shapes, a slow GPU beside a fast host), the hidden overlap is the
    lower rate and NEO's plan still runs. The waiting requests lose nothing to it: the longest-waiting
    overdue one is in every candidate, so the progress bound below holds unchanged.

    APEX never slows an iteration down to serve cheap extra tokens: picking the cheapest CPU decodes
    first by a per-iteration tokens/s alone starves long CPU-resident requests while they hold CPU KV
    (more requests wait, the CPU tier fills, preemptions follow) and only moves the expensive tokens to
    later, slower iterations; free riders join only while their job hides. Which mode wins follows from the composition in
    ``predict_iteration``: overlap costs ``Lin(all) + max(G, C + X)`` (one weight pass, the CPU job
    hidden only under the device attention), the pipeline about ``max(Lin(A) + G + Lin(B), C + X)``
    (two weight passes, the CPU job hidden under linear work too). With the same CPU set, overlap wins
    while ``C + X`` stays below about ``G + Lin(B)``; past that NEO's plan wins, and when neither hides
    enough CPU work to beat one weight pass, GPU-only does (plus any free riders).

    **Progress bound.** A CPU-resident decode offered to the policy in consecutive iterations (the
    scheduler offers every running decode whose tier has room while the token budget allows) is left
    out of at most ``max_stall_iterations + k - 1`` of them, ``k`` the number of CPU decodes offered:
    once overdue, every iteration advances the longest-waiting overdue request, so it moves up one place
    per iteration. Forcing in every overdue request at once would give a bound of
    ``max_stall_iterations`` but, when the CPU is the bottleneck, exposes their whole CPU work in one
    iteration (measured: up to 40% below NEO on an A10G in the simulated grid). The default of 32
    iterations is a measured trade-off, not a fitted constant: on the simulated A10G (Llama-2-7B,
    prompts 512, outputs 1024, slow-host corner of the assumptions) APEX reached 0.966 / 0.985 / 1.007 x
    NEO's throughput with 8 / 32 / 128, since every forced CPU decode is one the cost model says does
    not pay; the latency a stalled request accumulates grows with the bound.
    """

    name = "apex"

    def __init__(self, cost_model: CostModel, transfer_bytes_per_cpu_token: int = 0,
                 transfer_to_cpu_fraction: float = 0.75, iteration_time_bound: float | None = None,
                 enable_pipeline: bool = True, max_stall_iterations: int = DEFAULT_MAX_STALL_ITERATIONS) -> None:
        super().__init__(cost_model, transfer_bytes_per_cpu_token, transfer_to_cpu_fraction)
        ApexOptions(iteration_time_bound, enable_pipeline, max_stall_iterations)  # validates them
        self.iteration_time_bound = iteration_time_bound
        self.enable_pipeline = enable_pipeline
        self.max_stall_iterations = max_stall_iterations

    def decide(self, candidate: IterationCandidate) -> IterationDecision:
        if not candidate.cpu_decodes:
            return self._gpu_only(candidate)[1]
        reference = self._neo_plan(candidate) if self.enable_pipeline else self._gpu_only(candidate)
        reference_ids = {s.request_id for s in reference[1].cpu_decodes}
        overdue = sorted(((candidate.stalls_of(i), -i, s) for i, s in enumerate(candidate.cpu_decodes)
                          if candidate.stalls_of(i) >= self.max_stall_iterations
                          and s.request_id not in reference_ids), reverse=True)
        overdue_first = [s for _, _, s in overdue]
        forced = overdue_first[:1]  # the longest-waiting one; others join where the slack allows
        required = [s for s in candidate.cpu_decodes if s.request_id in reference_ids] + forced
        options: list[tuple[float, IterationDecision]] = []
        if not forced:
            options.append(reference)
        elif self.enable_pipeline:
            # NEO's slack rule with the overdue requests first, the longest-waiting one forced in: the
            # overdue requests take the CPU time NEO's own set would have used, under two weight passes.
            overdue_ids = {s.request_id for s in overdue_first}
            rest = tuple(s for s in candidate.cpu_decodes if s.request_id not in overdue_ids)
            pipelined = self._pipelined(candidate, tuple(overdue_first) + rest,
                                        frozenset(s.request_id for s in forced))
            if pipelined is not None:
                options.append(pipelined)
        overlap = self._async_overlap(candidate, required)
        if overlap is not None:
            options.append(overlap)
        # the overlap whose CPU work all hides, only the overdue one required (not under a TPOT bound: see above)
        if self.iteration_time_bound is None and len(required) > len(forced):
            hidden = self._async_overlap(candidate, forced)
            if hidden is not None:
                options.append(hidden)
        within = [option for option in options if self._within_bound(option[1].predicted)]
        return max(within or options, key=lambda option: option[0])[1]

    def _within_bound(self, predicted: PredictedTimes | None) -> bool:
        return self.iteration_time_bound is None or predicted is None or predicted.total <= self.iteration_time_bound

    def _async_overlap(self, candidate: IterationCandidate,
                       required: list[ScheduledSequence]) -> tuple[float, IterationDecision] | None:
        """Overlap of ``required`` plus free riders (hidden CPU jobs) by increasing context while the rate rises."""
        base = self._base_shape(candidate)
        required_ids = {s.request_id for s in required}
        optional = sorted((s for s in candidate.cpu_decodes if s.request_id not in required_ids),
                          key=lambda s: s.context_len)
        chosen = list(required)
        kv_tokens = sum(s.context_len for s in chosen)

        def predict(count: int, kv: int) -> tuple[float, PredictedTimes]:
            shape = replace(base, mode=OverlapMode.ASYNC_OVERLAP, cpu_decode_kv_tokens=kv, num_cpu_decodes=count,
                            num_sampled=base.sampled_rows + count)
            predicted = predict_iteration(self.cost_model, shape)
            return self._rate(shape.sampled_rows, predicted), predicted

        best = predict(len(chosen), kv_tokens) if chosen else None
        for sequence in optional:
            rate, predicted = predict(len(chosen) + 1, kv_tokens + sequence.context_len)
            hidden = predicted.cpu_attention + predicted.transfer <= predicted.gpu_attention
            if not hidden or not self._within_bound(predicted) or (best is not None and rate < best[0]):
                break  # it would lengthen the iteration, pass the bound, or lower the rate
            chosen.append(sequence)
            kv_tokens += sequence.context_len
            best = (rate, predicted)
        if best is None:
            return None
        rate, predicted = best
        return rate, IterationDecision(mode=OverlapMode.ASYNC_OVERLAP, cpu_decodes=tuple(chosen),
                                       predicted=predicted)


class NeoPublishedPolicy(_ProfiledPolicy):
    """NEO as its public code runs: its scheduler's decision rule on its single-thread runtime.

    Decision, after swiftllm ``server/scheduler.py`` ``Scheduler._decide_mode_and_gen_batch`` (step 3
    and step 5) with the quantities of ``swiftllm/structs.py`` ``BatchPerfData``: sub-batch 0 holds
    the prefills and GPU decodes; CPU decodes are taken in FCFS order into the sub-batch ``next``
    (starting with sub-batch 1); after each, ``remains[j] = linr(batch j^1) + pref(j) + gdec(j) -
    (cdec(j) + lnch)`` (``Scheduler._get_remains``); when ``min(remains) < 0`` the request is skipped
    and from then on only requests shorter than it are tried; otherwise ``next`` becomes the
    sub-batch with more remaining slack. With an empty sub-batch 1 the iteration is GPU-only;
    otherwise the pipeline runs when ``(|b0| + |b1|) / (gpu_time(b0) + gpu_time(b1))`` beats
    ``|gpu_only| / gpu_time(gpu_only)``, ``gpu_time = linr + pref + gdec`` (the CPU side is assumed
    hidden by the slack rule). ``lnch`` is the cost model's ``inline_launch_seconds`` per layer
    (NEO: 0.8 ms). Not modelled: its steps 2 and 4 (trimming prefills out of a batch; here the
    engine's token budget decides prefills) and its token budget check on CPU decodes.

    Execution: ``CpuRuntime.INLINE`` (``inline_pipeline_forward_seconds``): the CPU attention blocks
    the thread that launches the device kernels, and each stage pays the launch time first.
    """

    name = "neo_published"

    def decide(self, candidate: IterationCandidate) -> IterationDecision:
        model = self.cost_model
        layers = max(1, model.num_layers)
        launch = model.inline_launch_seconds * layers
        base = self._base_shape(candidate)
        prefill = model.gpu_prefill_attention(base.prefill_lengths)
        gpu_decode = model.gpu_decode_attention(base.gpu_decode_kv_tokens, base.num_gpu_decodes)
        per_token_transfer = self._transfer_seconds(1)
        first_width = base.num_tokens  # prefill tokens + GPU decodes (NEO's iteration width s)
        batches: list[list[ScheduledSequence]] = [[], []]
        kv = [0, 0]

        def remains() -> tuple[float, float]:
            width = (first_width + len(batches[0]), len(batches[1]))
            cpu = [model.cpu_decode_attention(kv[j], len(batches[j])) + per_token_transfer * len(batches[j])
                   + launch for j in (0, 1)]
            own_gpu = (prefill + gpu_decode, 0.0)
            return tuple(model.linear(width[j ^ 1], 0) + own_gpu[j] - cpu[j] for j in (0, 1))

        shortest_skipped = float("inf")
        target = 1
        for sequence in candidate.cpu_decodes:
            context = sequence.context_len
            if context >= shortest_skipped:
                continue
            batches[target].append(sequence)
            kv[target] += context
            slack = remains()
            if min(slack) < 0:
                shortest_skipped = context
                batches[target].pop()
                kv[target] -= context
                continue
            target = 1 if slack[1] > slack[0] else 0
        gpu_rate, gpu_only = self._gpu_only(candidate)
        gpu_only = replace(gpu_only, cpu_runtime=CpuRuntime.INLINE)
        if not batches[1]:
            return gpu_only
        sequential_time = model.linear(first_width, 0) + prefill + gpu_decode
        pipelined_time = model.linear(first_width + len(batches[0]), 0) + prefill + gpu_decode \
            + model.linear(len(batches[1]), 0)
        sequential_rate = base.num_sequences / sequential_time if sequential_time > 0 else base.num_sequences * 1e12
        pipelined_count = base.num_sequences + len(batches[0]) + len(batches[1])
        pipelined_rate = pipelined_count / pipelined_time if pipelined_time > 0 else pipelined_count * 1e12
        if pipelined_rate <= sequential_rate:
            return gpu_only
        cpu_decodes = tuple(batches[0] + batches[1])
        shape = replace(base, mode=OverlapMode.ASYMMETRIC_PIPELINE, cpu_decode_kv_tokens=kv[0] + kv[1],
                        num_cpu_decodes=len(cpu_decodes), pipeline_split=(kv[0], len(batches[0])),
                        num_sampled=base.sampled_rows + len(cpu_decodes), cpu_runtime=CpuRuntime.INLINE)
        return IterationDecision(mode=OverlapMode.ASYMMETRIC_PIPELINE, cpu_decodes=cpu_decodes,
                                 pipeline_split=len(batches[0]), predicted=predict_iteration(model, shape),
                                 cpu_runtime=CpuRuntime.INLINE)
