"""Iteration-level continuous batching. Torch-free.

Every ``schedule()`` turns the queues and the KV manager's state into one ``IterationPlan``:

1. Running requests first, in admission order: each gets its next chunk (one token for a decode,
   up to the token budget for a prefill). When its tier has no room, the newest running request
   is preempted (its blocks freed, its tokens recomputed later: vLLM V1 semantics) until it fits.
2. Then waiting requests, FCFS, while the token budget, ``max_num_seqs`` and the policy's
   admission tier allow; nothing is admitted in an iteration that preempted.

``update_from_output()`` applies the runner's sampled tokens, checks stop conditions and frees
finished requests.

Failure semantics (what keeps one bad request or one transient fault from corrupting the engine):

- After ``schedule()`` the queues and block tables are a consistent state in which no request has
  advanced: an iteration whose execution fails is simply not applied, and the next ``schedule()``
  plans the same work again (its K/V writes only went to positions not yet counted as computed).
- The one exception is a tier move (swap): its bookkeeping is done in ``schedule()`` but its data
  moves in the runner. The engine calls ``commit_swaps()`` once the runner has copied the blocks; if
  ``schedule()`` or the copies fail first, ``fail_uncommitted_swaps()`` fails the moved requests
  (their blocks may hold nothing) instead of letting them decode from garbage.
- ``update_from_output()`` applies each request on its own: an error while applying one request's
  result (or the runner's report that sampling it failed) finishes that request with
  ``FINISHED_ERROR`` and frees its blocks; the others advance.
- Requests finished outside ``update_from_output()`` (aborted, failed) are handed out once by
  ``take_finished_elsewhere()`` so that their owners learn about it.
"""

from __future__ import annotations

import logging
from collections import deque

from apexlib.core.config import CacheConfig, SchedulerConfig
from apexlib.core.plan import IterationPlan, OverlapMode, RunnerOutput, ScheduledSequence, Tier
from apexlib.core.request import Request, RequestStatus
from apexlib.core.stats import EngineStats
from apexlib.kvcache.manager import KVCacheManager
from apexlib.policies.base import IterationCandidate, Policy

logger = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, scheduler_config: SchedulerConfig, cache_config: CacheConfig, policy: Policy,
                 stats: EngineStats | None = None) -> None:
        self.config = scheduler_config
        self.cache_config = cache_config
        self.policy = policy
        self.kv = KVCacheManager(cache_config.block_size, cache_config.num_gpu_blocks, cache_config.num_cpu_blocks)
        self.stats = stats if stats is not None else EngineStats()
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._released_ids: list[str] = []
        self._uncommitted_swaps: list[str] = []  # requests moved between tiers by the last schedule()
        self._finished_elsewhere: list[Request] = []  # aborted / failed since the last take
        self._iteration = 0
        # CPU-resident decodes offered to the policy and left out: consecutive iterations, per request id.
        self._cpu_stalls: dict[str, int] = {}

    # -- queue management ------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request_id {request.request_id!r} is already in the engine")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def abort_request(self, request_id: str, report: bool = True) -> Request | None:
        """Finish a request as aborted (blocks freed); ``report``: hand it out by ``take_finished_elsewhere``."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        self._finish_elsewhere(request, RequestStatus.FINISHED_ABORTED, report=report)
        return request

    def fail_request(self, request_id: str, error: str, now: float | None = None) -> Request | None:
        """Finish a request with ``FINISHED_ERROR`` (blocks freed, queued for ``take_finished_elsewhere``)."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        request.error = error
        self._finish_elsewhere(request, RequestStatus.FINISHED_ERROR, now)
        return request

    def _finish_elsewhere(self, request: Request, status: RequestStatus, now: float | None = None,
                          report: bool = True) -> None:
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self._finish(request, status, now)
        if report:
            self._finished_elsewhere.append(request)

    def has_finished_elsewhere(self) -> bool:
        return bool(self._finished_elsewhere)

    def take_finished_elsewhere(self) -> list[Request]:
        """Requests aborted or failed outside ``update_from_output`` since the last call (each once)."""
        taken, self._finished_elsewhere = self._finished_elsewhere, []
        return taken

    # -- tier moves: bookkeeping in schedule(), data in the runner ---------------------------------
    def commit_swaps(self) -> None:
        """The runner has copied the blocks of the last plan's swaps: the moved requests are whole again."""
        self._uncommitted_swaps.clear()

    def fail_uncommitted_swaps(self, error: str, now: float | None = None) -> list[Request]:
        """Fail every request the last ``schedule()`` moved between tiers whose blocks were never copied."""
        failed = []
        for request_id in dict.fromkeys(self._uncommitted_swaps):
            request = self.fail_request(request_id, f"its KV blocks were being moved between tiers when the "
                                                    f"iteration failed ({error})", now)
            if request is not None:
                failed.append(request)
        self._uncommitted_swaps.clear()
        return failed

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self.waiting) + len(self.running)

    # -- scheduling ------------------------------------------------------------------------------
    def schedule(self, now: float) -> IterationPlan:
        self._uncommitted_swaps.clear()  # the previous plan's moves were copied (engine) or need no data (simulator)
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledSequence] = []
        preempted = False
        swap_in = self._swap_in_candidates()
        swap_out: list[tuple[int, int]] = []

        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            tier = self.kv.tier_of(request.request_id) or Tier.GPU
            if tier is Tier.CPU and not self.policy.runs_cpu_decodes():
                index += 1  # CPU-resident requests wait in this policy's iterations
                continue
            remaining = request.num_tokens - request.num_computed_tokens
            if tier is Tier.CPU and remaining > budget:
                # A CPU-tier prefill runs in one chunk from position 0 (see admission below); one is only
                # running un-prefilled after an iteration that failed, and it waits for a whole budget.
                index += 1
                continue
            num_new = min(remaining, budget)
            total = request.num_computed_tokens + num_new
            evicted_self = False
            while self.kv.allocate(request.request_id, total, tier) is None:
                pairs, evicted_self = self._make_room(index, tier)
                swap_out.extend(pairs)
                preempted = preempted or not pairs
                if evicted_self:
                    break
                tier = self.kv.tier_of(request.request_id) or tier  # it may itself have been swapped out
            if evicted_self:
                break
            if tier is Tier.CPU and not self.policy.runs_cpu_decodes():
                index += 1  # it was itself just swapped out and waits like the other CPU-resident requests
                continue
            scheduled.append(self._scheduled(request, num_new, now))
            budget -= num_new
            index += 1

        while (not preempted and self.waiting and budget > 0
               and len(self.running) < self.config.max_num_seqs):
            request = self.waiting[0]
            remaining = request.num_tokens - request.num_computed_tokens
            if remaining > budget and not self.config.enable_chunked_prefill:
                break
            num_new = min(remaining, budget)
            total = request.num_computed_tokens + num_new
            tier = self.policy.admission_tier(request, total, self.kv)
            # A CPU-tier request prefills in one chunk on the GPU from its fresh K/V, which then go
            # to its CPU blocks: its earlier chunks would otherwise have to come back from the CPU.
            if tier is Tier.CPU and num_new < remaining:
                if remaining <= self.config.max_num_batched_tokens:
                    break  # it waits for an iteration with room for its whole prompt
                # Longer than any iteration's token budget: it could never prefill in the CPU tier (the
                # queue behind it would wait forever); it prefills in chunks in the GPU tier instead.
                tier = Tier.GPU
            if tier is None or self.kv.allocate(request.request_id, total, tier) is None:
                break
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled.append(self._scheduled(request, num_new, now))
            budget -= num_new

        prefills = tuple(s for s in scheduled if not s.is_decode)
        gpu_decodes = tuple(s for s in scheduled if s.is_decode and s.tier is Tier.GPU)
        offered = tuple(s for s in scheduled if s.is_decode and s.tier is Tier.CPU)
        decision = self.policy.decide(IterationCandidate(
            prefills=prefills, gpu_decodes=gpu_decodes, cpu_decodes=offered,
            cpu_stalls=tuple(self._cpu_stalls.get(s.request_id, 0) for s in offered)))
        cpu_decodes = decision.cpu_decodes
        advanced = {s.request_id for s in cpu_decodes}
        for sequence in offered:
            if sequence.request_id in advanced:
                self._cpu_stalls.pop(sequence.request_id, None)
            else:
                self._cpu_stalls[sequence.request_id] = self._cpu_stalls.get(sequence.request_id, 0) + 1
        mode = decision.mode
        pipeline_batches = None
        if mode is OverlapMode.ASYMMETRIC_PIPELINE:
            first = prefills + gpu_decodes + cpu_decodes[:decision.pipeline_split]
            pipeline_batches = (tuple(s.request_id for s in first),
                                tuple(s.request_id for s in cpu_decodes[decision.pipeline_split:]))
        self.stats.swapped_in_blocks += len(swap_in)
        self.stats.swapped_out_blocks += len(swap_out)
        plan = IterationPlan(
            iteration=self._iteration,
            prefills=prefills,
            gpu_decodes=gpu_decodes,
            cpu_decodes=cpu_decodes,
            mode=mode,
            pipeline_batches=pipeline_batches,
            predicted=decision.predicted,
            cpu_runtime=decision.cpu_runtime,
            swap_in=tuple(swap_in),
            swap_out=tuple(swap_out),
            finished_request_ids=tuple(self._released_ids),
        )
        self._released_ids.clear()
        self._iteration += 1
        return plan

    def _swap_in_candidates(self) -> list[tuple[int, int]]:
        """Move CPU-resident running requests (oldest first) back to the GPU tier while the policy allows.

        Done before anything else is scheduled, so the copies (CPU -> GPU) run before any block freed
        here is reused; the runner applies swap-ins before swap-outs for the same reason.
        """
        pairs: list[tuple[int, int]] = []
        for request in self.running:
            if self.kv.tier_of(request.request_id) is Tier.CPU and self.policy.may_swap_in(request, self.kv):
                moved = self.kv.swap_in(request.request_id)
                if moved is None:
                    break
                self._uncommitted_swaps.append(request.request_id)
                pairs.extend(moved)
        return pairs

    def _make_room(self, index: int, tier: Tier) -> tuple[list[tuple[int, int]], bool]:
        """Free blocks in ``tier`` for ``running[index]`` by evicting the newest request of that tier
        not yet scheduled (possibly itself). Returns (swap-out pairs, whether running[index] itself
        was preempted). A GPU-resident decode is swapped out to the CPU tier when the policy prefers
        it and the CPU tier has room; otherwise the victim is preempted (recomputed later)."""
        victim_index = next(j for j in range(len(self.running) - 1, index - 1, -1)
                            if (self.kv.tier_of(self.running[j].request_id) or Tier.GPU) is tier)
        victim = self.running[victim_index]
        is_decoding = victim.num_computed_tokens >= victim.num_prompt_tokens and victim.num_output_tokens > 0
        if (tier is Tier.GPU and is_decoding and self.policy.swap_out_instead_of_preempt()
                and self.kv.can_swap_out(victim.request_id)):
            self._uncommitted_swaps.append(victim.request_id)
            return self.kv.swap_out(victim.request_id), False
        del self.running[victim_index]
        self._preempt(victim)
        return [], victim_index == index

    def _scheduled(self, request: Request, num_new: int, now: float) -> ScheduledSequence:
        if request.first_scheduled_time is None:
            request.first_scheduled_time = now
        start = request.num_computed_tokens
        return ScheduledSequence(
            request_id=request.request_id,
            token_ids=request.token_ids_range(start, start + num_new),
            start_position=start,
            block_table=tuple(self.kv.block_table(request.request_id)),
            tier=self.kv.tier_of(request.request_id) or Tier.GPU,
            sample=start + num_new == request.num_tokens,
            sampling_params=request.sampling_params,
            num_output_tokens=request.num_output_tokens,
        )

    def _preempt(self, request: Request) -> None:
        """Free all of a running request's blocks; it will be recomputed from its tokens (V1 semantics)."""
        self.kv.free(request.request_id)
        self._cpu_stalls.pop(request.request_id, None)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)
        self.stats.preemptions += 1
        logger.debug("preempted %s (%d tokens)", request.request_id, request.num_tokens)

    # -- applying results ------------------------------------------------------------------------
    def update_from_output(self, plan: IterationPlan, output: RunnerOutput, now: float) -> list[Request]:
        """Apply one iteration's results; return the requests that produced a token or finished.

        Each request is applied on its own: when the runner reports that sampling it failed, or applying
        its result raises, it finishes with ``FINISHED_ERROR`` (and is returned) while the others advance."""
        updated: list[Request] = []
        failed = output.failed
        for sequence in plan.sequences:
            request = self.requests.get(sequence.request_id)
            if request is None or request.is_finished:
                continue
            try:
                if failed and sequence.request_id in failed:
                    raise RuntimeError(failed[sequence.request_id])
                if not sequence.sample:
                    request.num_computed_tokens += sequence.num_new_tokens
                    continue
                token = output.sampled_token_ids[sequence.request_id]
                status = self._stop_status(request, token)
            except Exception as error:  # this request's failure, not the iteration's
                message = str(error) if failed and sequence.request_id in failed else \
                    f"applying its iteration result failed: {type(error).__name__}: {error}"
                logger.warning("request %s failed: %s", request.request_id, message)
                request.error = message
                if request in self.running:
                    self.running.remove(request)
                self._finish(request, RequestStatus.FINISHED_ERROR, now)
                updated.append(request)
                continue
            request.num_computed_tokens += sequence.num_new_tokens
            request.output_token_ids.append(token)
            request.token_times.append(now)
            if status is not None:
                self.running.remove(request)
                self._finish(request, status, now)
            updated.append(request)
        self.stats.iterations += 1
        self.stats.mode_counts[plan.mode.value] = self.stats.mode_counts.get(plan.mode.value, 0) + 1
        self.stats.prefill_tokens += sum(s.num_new_tokens for s in plan.prefills)
        self.stats.gpu_decode_tokens += len(plan.gpu_decodes)
        self.stats.cpu_decode_tokens += len(plan.cpu_decodes)
        return updated

    def _stop_status(self, request: Request, token: int) -> RequestStatus | None:
        """The status ``request`` finishes with once ``token`` is appended (None: it goes on); changes nothing."""
        params = request.sampling_params
        if not params.ignore_eos and token in request.eos_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if params.stop_token_ids and token in params.stop_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if request.num_output_tokens + 1 >= params.max_tokens or request.num_tokens + 1 >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _finish(self, request: Request, status: RequestStatus, now: float | None = None) -> None:
        request.status = status
        request.finish_time = now
        self.kv.free(request.request_id)
        self._cpu_stalls.pop(request.request_id, None)
        del self.requests[request.request_id]
        self._released_ids.append(request.request_id)
