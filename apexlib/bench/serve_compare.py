"""``apex bench serve-compare``: the measured online comparison in one command.

Starts each server once as a subprocess -- ``apex serve`` (engine ``apexlib``) and vLLM's OpenAI server
from its own venv (engine ``vllm``) -- with the same checkpoint, block size, ``max_model_len``, dtype
and thread count, waits for ``/health``, then sends the same workload at each rate through the same
client (:mod:`apexlib.bench.serve_client`), alternating the engines' order from one rate (and repeat) to
the next. ``apexlib-engine`` is the reference without HTTP: the same workload on apexlib's engine stepped
in this process (``apex bench``); when it runs beside ``apexlib``, the tokens/s ratio of the server over the
engine (the HTTP layer's overhead) is reported per rate, median over the repeats.

``lock``: a file to hold an exclusive ``flock`` on during each timed run (not during server start-up), for
machines where other jobs agree to pause on it. All rows go to one results directory, with ``compare.json``
beside them: the commands of the servers and of this run, the CPU, the load average, the ratios.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx

from apexlib.bench.benchmark import load_workload
from apexlib.core.results import BenchmarkResult, write_results
from apexlib.engine.settings import BenchmarkSettings

logger = logging.getLogger(__name__)
logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would be the client's cost

#: apexlib: `apex serve` (engine in its own process); apexlib-thread: `apex serve --engine-thread`; vllm: vLLM's
#: OpenAI server; apexlib-engine: the engine stepped in this process, no HTTP (the reference of the overhead)
ENGINES = ("apexlib", "apexlib-thread", "vllm", "apexlib-engine")


class ServerStartError(RuntimeError):
    """A server did not come up (it exited, or /health did not answer in time); the message has its log tail."""


@dataclass(frozen=True)
class CompareSettings:
    model: str  # checkpoint directory both servers load
    workload: str = "tiny-online"
    num_requests: int | None = None
    rates: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 0.0)  # req/s, Poisson; 0 = all requests at once
    engines: tuple[str, ...] = ("apexlib", "vllm")
    repeats: int = 1
    block_size: int = 32
    max_model_len: int = 512
    dtype: str = "float32"
    threads: int = 1  # OMP/torch threads of every engine
    seed: int | None = None  # workload seed
    warmup: int = 2
    vllm_python: str | None = None
    vllm_kv_gib: int = 1  # VLLM_CPU_KVCACHE_SPACE
    apex_args: tuple[str, ...] = ()  # extra `apex serve` options
    vllm_args: tuple[str, ...] = ()  # extra vLLM server options
    lock: str | None = None
    startup_timeout: float = 600.0
    extra_env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = [e for e in self.engines if e not in ENGINES]
        if unknown or not self.engines:
            raise ValueError(f"engines must be some of {ENGINES}, got {list(self.engines)}")
        if not self.rates or any(r < 0 for r in self.rates):
            raise ValueError(f"rates must be >= 0 req/s (0: all at once), got {list(self.rates)}")
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def thread_env(threads: int) -> dict[str, str]:
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def apex_server_command(settings: CompareSettings, port: int) -> list[str]:
    return [sys.executable, "-m", "apexlib.cli", "serve", "--model", settings.model, "--device", "cpu",
            "--dtype", settings.dtype, "--block-size", str(settings.block_size), "--max-model-len",
            str(settings.max_model_len), "--host", "127.0.0.1", "--port", str(port), *settings.apex_args]


def vllm_server_command(settings: CompareSettings, port: int, python: str) -> list[str]:
    return [python, "-m", "vllm.entrypoints.openai.api_server", "--model", settings.model, "--enforce-eager",
            "--skip-tokenizer-init", "--block-size", str(settings.block_size), "--max-model-len",
            str(settings.max_model_len), "--gpu-memory-utilization", "0.5", "--no-enable-prefix-caching",
            "--dtype", settings.dtype, "--host", "127.0.0.1", "--port", str(port), *settings.vllm_args]


@dataclass
class RunningServer:
    engine: str
    command: list[str]
    env: dict[str, str]
    base_url: str
    process: subprocess.Popen
    log_path: Path

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@contextlib.contextmanager
def running_server(engine: str, command: list[str], env: dict[str, str], port: int, log_dir: Path,
                   startup_timeout: float) -> Iterator[RunningServer]:
    """Start ``command``, wait until ``/health`` answers 200, yield it; SIGTERM (then SIGKILL) at the end."""
    log_path = log_dir / f"{engine}-server.log"
    full_env = {**os.environ, **env}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    server = RunningServer(engine, command, env, f"http://127.0.0.1:{port}", process, log_path)
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if process.poll() is not None:
                raise ServerStartError(f"the {engine} server exited with {process.returncode} before answering "
                                       f"/health; its log ends:\n{server.log_tail()}")
            try:
                if httpx.get(f"{server.base_url}/health", timeout=2.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise ServerStartError(f"the {engine} server did not answer /health within {startup_timeout:.0f} s; "
                                       f"its log ends:\n{server.log_tail()}")
            time.sleep(0.5)
        logger.info("%s server up at %s", engine, server.base_url)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)


@contextlib.contextmanager
def exclusive(lock: str | None) -> Iterator[None]:
    """An exclusive flock on ``lock`` (nothing when None)."""
    if lock is None:
        yield
        return
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _bench_settings(settings: CompareSettings) -> BenchmarkSettings:
    return BenchmarkSettings.create(model=settings.model, device="cpu", dtype=settings.dtype, block_size=settings.block_size,
                             max_model_len=settings.max_model_len, warmup_requests=settings.warmup)


def _in_process(workload, offline: bool, settings: CompareSettings, experiment: str,
                engine_cache: dict) -> BenchmarkResult:
    import torch

    from apexlib.bench.benchmark import run_benchmark
    from apexlib.engine.engine import LLMEngine

    torch.set_num_threads(settings.threads)
    if "engine" not in engine_cache:
        engine_cache["engine"] = LLMEngine.from_engine_args(
            model=settings.model, dtype=settings.dtype, device="cpu", block_size=settings.block_size,
            max_model_len=settings.max_model_len)
    return run_benchmark(workload, _bench_settings(settings), mode="offline" if offline else "auto",
                         experiment=experiment, progress=False, engine=engine_cache["engine"])


def ratios(results: Sequence[BenchmarkResult], server: str = "apexlib-serve",
           reference: str = "apexlib") -> dict[str, dict[str, Any]]:
    """Per rate: the median output tokens/s of ``server`` and ``reference`` and their ratio."""
    by: dict[tuple[str, str], list[float]] = {}
    for result in results:
        rate = result.provenance["rate"]
        key = ("all" if rate is None else f"{rate:g}", result.provenance["engine"])
        by.setdefault(key, []).append(float(result.summary.output_throughput))
    out = {}
    for rate in dict.fromkeys(k[0] for k in by):
        if (rate, server) in by and (rate, reference) in by:
            s, r = statistics.median(by[rate, server]), statistics.median(by[rate, reference])
            out[rate] = {"server_tok_s": s, "reference_tok_s": r, "ratio": s / r,
                         "server_runs": by[rate, server], "reference_runs": by[rate, reference]}
    return out


def run_compare(settings: CompareSettings, out: str | Path | None, experiment: str,
                argv: Sequence[str] | None = None) -> tuple[Path, list[BenchmarkResult], dict[str, Any]]:
    """Run every engine at every rate (``repeats`` times, alternating order) and write the rows."""
    from apexlib.bench.serve_client import run_serve_benchmark

    env = {**thread_env(settings.threads), **settings.extra_env}
    results: list[BenchmarkResult] = []
    commands: dict[str, str] = {}
    loads: list[tuple[str, float, float]] = []
    with contextlib.ExitStack() as stack:
        log_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="apex-serve-compare-")))
        servers: dict[str, RunningServer] = {}
        for engine in settings.engines:
            if engine == "apexlib-engine":
                continue
            port = free_port()
            if engine == "apexlib":
                command, server_env = apex_server_command(settings, port), env
            elif engine == "apexlib-thread":
                command, server_env = [*apex_server_command(settings, port), "--engine-thread"], env
            else:
                from apexlib.bench.vllm_baseline import find_vllm_python

                python = str(find_vllm_python("cpu", settings.vllm_python))
                command = vllm_server_command(settings, port, python)
                server_env = {**env, "VLLM_CPU_KVCACHE_SPACE": str(settings.vllm_kv_gib)}
            commands[engine] = " ".join(f"{k}={v}" for k, v in sorted(server_env.items())) + " " + shlex.join(command)
            servers[engine] = stack.enter_context(running_server(engine, command, server_env, port, log_dir,
                                                                 settings.startup_timeout))
        engine_cache: dict = {}
        order = list(settings.engines)
        turn = 0
        for repeat in range(settings.repeats):
            for rate in settings.rates:
                offline = rate <= 0
                workload = load_workload(settings.workload, num_requests=settings.num_requests,
                                         rate=None if offline else rate, seed=settings.seed)
                engines = order if turn % 2 == 0 else order[::-1]
                turn += 1
                for engine in engines:
                    label = f"{experiment}/{engine}/r{'all' if offline else f'{rate:g}'}/{repeat}"
                    with exclusive(settings.lock):
                        load_before = os.getloadavg()[0]
                        if engine == "apexlib-engine":
                            result = _in_process(workload, offline, settings, experiment, engine_cache)
                        else:
                            server = servers[engine]
                            if server.process.poll() is not None:
                                raise ServerStartError(f"the {engine} server died; its log ends:\n"
                                                       f"{server.log_tail()}")
                            result = run_serve_benchmark(server.base_url, workload, _bench_settings(settings),
                                                         mode="offline" if offline else "auto",
                                                         experiment=experiment, engine=engine)
                        load_after = os.getloadavg()[0]
                    loads.append((label, load_before, load_after))
                    logger.info("%s: %.1f output tok/s (load %.2f -> %.2f)", label,
                                result.summary.output_throughput, load_before, load_after)
                    result = replace(result, extra={**result.extra, "repeat": repeat,
                                                    "load_average_1m": [load_before, load_after]})
                    results.append(result)
                    _write(results, out, experiment, settings, commands, loads, argv)
        if engine_cache.get("engine") is not None:
            engine_cache["engine"].close()
    directory, report = _write(results, out, experiment, settings, commands, loads, argv)
    return directory, results, report


def _write(results: list[BenchmarkResult], out: str | Path | None, experiment: str, settings: CompareSettings,
           commands: dict[str, str], loads: list[tuple[str, float, float]],
           argv: Sequence[str] | None) -> tuple[Path, dict[str, Any]]:
    """The rows so far and compare.json (rewritten after every run, so an interrupted comparison keeps its runs)."""
    from apexlib.envinfo import cpu_info

    directory = write_results(results, out, experiment)
    facts = cpu_info()
    report = {
        "what": "apex bench serve-compare: the same workload through each server's OpenAI API (streaming, "
                "client-side TTFT/TPOT/ITL/E2E), and apexlib's engine stepped in-process as the reference",
        "cpu_model": facts["cpu_model"],
        "cpu_count": facts["cpu_count"],
        "simd": facts["simd"],
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": shlex.join(["apex", *argv]) if argv is not None else None,
        "server_commands": commands,
        "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(settings).items()},
        "load_average_1m": [{"run": label, "before": b, "after": a} for label, b, a in loads],
        "http_over_engine_tokens_per_s": ratios(results),
        "http_engine_thread_over_engine_tokens_per_s": ratios(results, server="apexlib-thread-serve"),
    }
    (directory / "compare.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return directory, report
