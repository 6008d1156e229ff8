"""``LLM``: offline batch generation with vLLM's interface."""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from apexlib.core.request import RequestOutput, SamplingParams
from apexlib.engine.engine import LLMEngine, PromptType

logger = logging.getLogger(__name__)


class LLM:
    """``LLM(model=PATH, ...)``; the keyword arguments are ``apexlib.engine.args.EngineArgs``' fields."""

    def __init__(self, model: str, dtype: str = "auto", device: str = "auto", block_size: int = 16,
                 num_gpu_blocks: int | None = None, num_cpu_blocks: int | None = None,
                 gpu_kv_gib: float | None = None, cpu_kv_gib: float | None = None, policy: str = "gpu_only",
                 max_model_len: int | None = None, seed: int = 0, **engine_kwargs: Any) -> None:
        self.llm_engine = LLMEngine.from_engine_args(
            model=model, dtype=dtype, device=device, block_size=block_size, num_gpu_blocks=num_gpu_blocks,
            num_cpu_blocks=num_cpu_blocks, gpu_kv_gib=gpu_kv_gib, cpu_kv_gib=cpu_kv_gib, policy=policy,
            max_model_len=max_model_len, seed=seed, **engine_kwargs)
        self._generate_lock = threading.Lock()  # one generate() at a time: each reads the finished outputs

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for every prompt; outputs in input order.

        Every prompt is validated before any is queued, so a bad prompt raises ``ValueError`` and
        nothing is half-submitted.

        The call owns its requests: on any exit before they finish (an exception, KeyboardInterrupt) it
        aborts those still unfinished, so nothing of it stays queued ahead of later work. A request
        aborted from elsewhere (``llm_engine.abort_request``) comes back finished with finish_reason
        ``"abort"``, one that failed alone with ``"error"`` (``RequestOutput.error``). Calls from several
        threads run one after the other.
        """
        with self._generate_lock:
            return self._generate(prompts, sampling_params, use_tqdm)

    def _generate(self, prompts, sampling_params, use_tqdm: bool) -> list[RequestOutput]:
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and _is_token(prompts[0])):
            prompts = [prompts]  # one prompt: a string, a dict, or a list of token ids
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params_list = ([sampling_params] * len(prompts) if isinstance(sampling_params, SamplingParams)
                       else list(sampling_params))
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(params_list)} sampling_params for {len(prompts)} prompts")
        # only the finished outputs are read here: no per-step copies of the growing outputs (vLLM's LLM does the same)
        params_list = [dataclasses.replace(params, output_kind="final_only") for params in params_list]
        engine = self.llm_engine
        for index, prompt in enumerate(prompts):
            try:
                engine.prompt_token_ids(prompt)
            except ValueError as error:
                raise ValueError(f"prompts[{index}]: {error}") from error
        ids: list[str] = []
        results: dict[str, RequestOutput] = {}
        try:
            for prompt, params in zip(prompts, params_list, strict=True):
                ids.append(engine.add_request(None, prompt, params))
            order = set(ids)
            with tqdm(total=len(ids), desc="generate", disable=not use_tqdm, unit="req") as bar:
                while len(results) < len(ids):
                    if not engine.has_unfinished_requests() and not engine.scheduler.has_finished_elsewhere():
                        missing = [i for i in ids if i not in results]
                        raise RuntimeError(f"generate: the engine has no work left but {len(missing)} request(s) "
                                           f"never finished: {missing[:5]}")
                    for output in engine.step():
                        if output.finished and output.request_id in order:
                            results[output.request_id] = output
                            bar.update(1)
        finally:
            unfinished = [request_id for request_id in ids if request_id not in results]
            if unfinished:
                engine.abort_request(unfinished, report=False)  # the caller has left: nobody reads them
                logger.info("generate: aborted %d unfinished request(s) on exit", len(unfinished))
        return [results[request_id] for request_id in ids]


def _is_token(item: Any) -> bool:
    """A token id (int, numpy or 0-d torch integer), as opposed to a prompt (str, dict, list, 1-D array)."""
    return not isinstance(item, (str, dict, list, tuple)) and getattr(item, "ndim", 0) == 0
