"""Times vLLM's own CPU paged decode-attention op. Executed by vLLM's venv's python, never imported by
apexlib's: ``<vllm venv>/bin/python -m apexlib.bench.vllm_attention_worker --threads N`` (see
``apexlib.bench.vllm_attention_peer``, which drives it for ``apex bench cpu-attention``).

It imports only the standard library, torch (vLLM's) and vllm. Protocol: one JSON object per line on
stdin, one JSON reply per line on stdout (logging goes to stderr). The first line written is
``{"ready": true, "vllm": ..., "torch": ..., "threads": ...}``. Requests (``op``):

* ``prepare``: ``kv_dtype`` (fp16/bf16/fp32), ``num_heads``, ``num_kv_heads``, ``head_dim``,
  ``block_size``, ``batch``, ``context_len``, ``min_rotation_bytes``, ``max_pool_bytes``, ``seed``.
  Allocates vLLM's CPU KV cache ([num_blocks, num_kv_heads, 2 * block_size, head_dim] per layer, K rows
  then V rows of each block and head) for enough independent KV sets (block tables over disjoint,
  randomly placed blocks) that their total exceeds ``min_rotation_bytes`` (capped by
  ``max_pool_bytes``), fills it with normal values, builds the decode scheduler metadata and replies
  ``{"isa", "kv_sets", "check_max_abs_err"}``. The check runs vLLM's op once on a small batch of the
  same shape whose K/V were written by vLLM's own ``cpu_attn_reshape_and_cache`` and compares it with a
  plain-torch softmax attention (fp32): it shows the call convention is right.
* ``time``: ``repeats``, ``warm_up_seconds``: median seconds per call of
  ``cpu_attention_with_kv_cache`` (one query token per sequence, causal, no sliding window), the calls
  rotating among the KV sets after ``warm_up_seconds`` of untimed calls. Reply ``{"seconds", "best"}``.
* ``quit``.

The ISA is the one vLLM's CPU backend picks for the block size and dtype (``vec16`` for blocks that
are not a multiple of 32 on x86 without AMX; see vllm.v1.attention.backends.cpu_attn). Errors reply
``{"error": "..."}`` and the worker keeps serving.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import time

logger = logging.getLogger("apexlib.bench.vllm_attention_worker")


def _dtype(name: str):
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


def _isa(dtype, block_size: int, head_dim: int) -> str:
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    return _get_attn_isa(dtype, block_size, head_dim)


def _metadata(ops, batch, heads, kv_heads, head_dim, seq_lens, dtype, isa):
    import torch

    qsl = torch.arange(batch + 1, dtype=torch.int32)
    md = ops.cpu_attn_get_scheduler_metadata(batch, heads, kv_heads, head_dim, seq_lens, dtype, qsl, True, -1, isa,
                                             True)
    return qsl, md


def check(spec: dict, isa: str) -> float:
    """Max |vLLM - reference| on 2 sequences of the row's shape (K/V written by vLLM's own cache op)."""
    import torch
    import vllm._custom_ops as ops

    dtype = _dtype(spec["kv_dtype"])
    h, hkv, d, bs = spec["num_heads"], spec["num_kv_heads"], spec["head_dim"], spec["block_size"]
    ctx = min(spec["context_len"], 256)
    b = 2
    g = torch.Generator().manual_seed(spec.get("seed", 0) + 1)
    nblk = (ctx + bs - 1) // bs
    nb = b * nblk + 3
    cache = torch.zeros(nb, hkv, 2 * bs, d, dtype=dtype)
    kc, vc = cache.chunk(2, dim=2)
    bt = torch.randperm(nb, generator=g)[: b * nblk].to(torch.int32).view(b, nblk)
    kt = torch.randn(b, ctx, hkv, d, generator=g).to(dtype)
    vt = torch.randn(b, ctx, hkv, d, generator=g).to(dtype)
    pos = torch.arange(ctx)
    slots = bt.long()[:, pos // bs] * bs + pos % bs
    ops.cpu_attn_reshape_and_cache(kt.reshape(-1, hkv, d), vt.reshape(-1, hkv, d), kc, vc, slots.reshape(-1), isa)
    seq_lens = torch.full((b,), ctx, dtype=torch.int32)
    qsl, md = _metadata(ops, b, h, hkv, d, seq_lens, dtype, isa)
    q = torch.randn(b, h, d, generator=g).to(dtype)
    out = torch.zeros_like(q)
    scale = d ** -0.5
    ops.cpu_attention_with_kv_cache(q, kc, vc, out, qsl, seq_lens, scale, True, None, -1, bt, 0.0, md, None)
    err = 0.0
    for s in range(b):
        qq = q[s].float().view(hkv, h // hkv, d)
        p = (torch.einsum("hgd,chd->hgc", qq, kt[s].float()) * scale).softmax(-1)
        ref = torch.einsum("hgc,chd->hgd", p, vt[s].float()).reshape(h, d)
        err = max(err, (ref - out[s].float()).abs().max().item())
    return err


class Row:
    def __init__(self, spec: dict):
        import torch
        import vllm._custom_ops as ops

        self.ops = ops
        dtype = _dtype(spec["kv_dtype"])
        h, hkv, d, bs = spec["num_heads"], spec["num_kv_heads"], spec["head_dim"], spec["block_size"]
        b, ctx = spec["batch"], spec["context_len"]
        esz = torch.tensor([], dtype=dtype).element_size()
        set_bytes = 2 * b * ctx * hkv * d * esz
        nblk = (ctx + bs - 1) // bs
        block_bytes = 2 * bs * hkv * d * esz
        max_sets = max(1, spec["max_pool_bytes"] // (b * nblk * block_bytes))
        nsets = min(max_sets, max(1, math.ceil(spec["min_rotation_bytes"] / set_bytes)))
        self.isa = _isa(dtype, bs, d)
        self.check_err = check(spec, self.isa)
        g = torch.Generator().manual_seed(spec.get("seed", 0))
        nb = nsets * b * nblk
        self.cache = torch.empty(nb, hkv, 2 * bs, d, dtype=dtype)
        flat = self.cache.view(-1)
        chunk = torch.randn(min(flat.numel(), 16 << 20), generator=g).to(dtype)
        for off in range(0, flat.numel(), chunk.numel()):
            n = min(chunk.numel(), flat.numel() - off)
            flat[off:off + n].copy_(chunk[:n])
        self.kc, self.vc = self.cache.chunk(2, dim=2)
        self.tables = torch.randperm(nb, generator=g).to(torch.int32).view(nsets, b, nblk).contiguous()
        self.seq_lens = torch.full((b,), ctx, dtype=torch.int32)
        self.qsl, self.md = _metadata(ops, b, h, hkv, d, self.seq_lens, dtype, self.isa)
        self.q = torch.randn(b, h, d, generator=g).to(dtype)
        self.out = torch.empty_like(self.q)
        self.scale = d ** -0.5
        self.nsets = nsets

    def call(self, r: int) -> None:
        self.ops.cpu_attention_with_kv_cache(self.q, self.kc, self.vc, self.out, self.qsl, self.seq_lens, self.scale,
                                             True, None, -1, self.tables[r % self.nsets], 0.0, self.md, None)

    def time(self, repeats: int, warm_up_seconds: float) -> tuple[float, float]:
        t0 = time.perf_counter()
        r = 0
        while True:  # untimed calls, rotating like the timed ones
            self.call(r)
            r += 1
            if time.perf_counter() - t0 >= warm_up_seconds or r >= 64:
                break
        times = []
        for r in range(repeats):
            t0 = time.perf_counter()
            self.call(r)
            times.append(time.perf_counter() - t0)
        return statistics.median(times), min(times)


def serve(threads: int) -> None:
    # replies go to the real stdout; anything vLLM prints from Python goes to stderr
    channel = sys.stdout
    sys.stdout = sys.stderr

    def reply_with(obj: dict) -> None:
        channel.write(json.dumps(obj) + "\n")
        channel.flush()

    import torch
    import vllm

    torch.set_num_threads(threads)
    reply_with({"ready": True, "vllm": vllm.__version__, "torch": torch.__version__,
                "threads": torch.get_num_threads()})
    row: Row | None = None
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            req = json.loads(line)
            op = req.get("op")
            if op == "quit":
                reply_with({"bye": True})
                return
            if op == "prepare":
                row = None  # free the previous row's cache first
                row = Row(req)
                reply = {"isa": row.isa, "kv_sets": row.nsets, "check_max_abs_err": row.check_err}
            elif op == "time":
                if row is None:
                    raise ValueError("time before prepare")
                sec, best = row.time(max(1, int(req.get("repeats", 7))), float(req.get("warm_up_seconds", 0.05)))
                reply = {"seconds": sec, "best": best}
            else:
                raise ValueError(f"unknown op {op!r}")
        except Exception as exc:  # reported to the parent, which decides
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        reply_with(reply)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    serve(args.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
