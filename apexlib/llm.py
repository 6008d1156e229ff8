"""``LLM``: offline batch generation with vLLM's interface."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from apexlib.engine.engine import LLMEngine, PromptType
from apexlib.request import RequestOutput, SamplingParams

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

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for every prompt; outputs in input order.

        Every prompt is validated before any is queued, so a bad prompt raises ``ValueError`` and
        nothing is half-submitted.
        """
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
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
        ids = [engine.add_request(None, prompt, params) for prompt, params in zip(prompts, params_list, strict=True)]
        order = {request_id: index for index, request_id in enumerate(ids)}
        results: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="generate", disable=not use_tqdm, unit="req") as bar:
            while len(results) < len(ids):
                for output in engine.step():
                    if output.finished and output.request_id in order:
                        results[output.request_id] = output
                        bar.update(1)
        return [results[request_id] for request_id in ids]
