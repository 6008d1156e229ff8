"""N ``apex serve`` replicas behind vLLM's router (``vllm-router``, the optional ``[cluster]`` extra), on one host.

Each replica is its own ``apex serve`` process owning one device (``--device``; on a multi-GPU host give each
replica its GPU with ``CUDA_VISIBLE_DEVICES``, see docs/SCALE-OUT.md); the router is vLLM's Rust router in
front of them: it health-checks each replica through ``GET /health``, spreads requests (round robin by
default), and stops sending to a replica whose health checks fail. Nothing here routes: this module only
starts, watches and stops the processes. Torch-free.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

ROUTER = "vllm-router"
ROUTER_POLICIES = ("round_robin", "power_of_two", "random", "cache_aware")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def find_router() -> str:
    """The ``vllm-router`` executable beside this Python (its venv), else on PATH; an error says how to get it."""
    beside = Path(sys.executable).parent / ROUTER
    found = str(beside) if beside.exists() else shutil.which(ROUTER)
    if not found:
        raise FileNotFoundError(f"{ROUTER} is not installed: pip install 'apexlib[cluster]' "
                                "(or make cluster-venv)")
    return found


@dataclass(frozen=True)
class ReplicaSetConfig:
    """N replicas on ``port + 1 .. port + N`` (or free ports with ``port=0``) and the router on ``port``.

    ``serve_args`` go to every ``apex serve`` (``--model``, ``--device``, ...); ``router_args`` to the router.
    ``health_check_interval_s``: how often the router probes each replica's ``/health``; a replica is taken out
    after ``health_failure_threshold`` failed probes in a row.
    """

    replicas: int = 2
    host: str = "127.0.0.1"
    port: int = 8000
    serve_args: tuple[str, ...] = ()
    router_args: tuple[str, ...] = ()
    policy: str = "round_robin"
    health_check_interval_s: int = 2
    health_failure_threshold: int = 2
    startup_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas}")
        if self.policy not in ROUTER_POLICIES:
            raise ValueError(f"policy must be one of {', '.join(ROUTER_POLICIES)}, got {self.policy!r}")
        if not 0 <= self.port <= 65535 - self.replicas:
            raise ValueError(f"port must be in 0..{65535 - self.replicas}, got {self.port}")
        if self.health_check_interval_s < 1 or self.health_failure_threshold < 1:
            raise ValueError("health_check_interval_s and health_failure_threshold must be >= 1, got "
                             f"{self.health_check_interval_s}, {self.health_failure_threshold}")
        for flag in ("--host", "--port"):
            if flag in self.serve_args:
                raise ValueError(f"serve_args must not set {flag}: each replica's comes from host and port")


def replica_command(config: ReplicaSetConfig, port: int) -> list[str]:
    return [sys.executable, "-m", "apexlib.cli", "serve", "--host", config.host, "--port", str(port),
            *config.serve_args]


def router_command(config: ReplicaSetConfig, port: int, replica_urls: Sequence[str], metrics_port: int) -> list[str]:
    return [find_router(), "--host", config.host, "--port", str(port), "--worker-urls", *replica_urls,
            "--policy", config.policy, "--health-check-endpoint", "/health",
            "--health-check-interval-secs", str(config.health_check_interval_s),
            "--health-failure-threshold", str(config.health_failure_threshold),
            "--worker-startup-timeout-secs", str(int(config.startup_timeout_s)),
            "--prometheus-host", config.host, "--prometheus-port", str(metrics_port), *config.router_args]


def _get(url: str, timeout: float = 2.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (a loopback URL we built)
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except (OSError, ValueError):
        return None


@dataclass
class ReplicaSet:
    """The running processes: ``replica_urls``, ``router_url``; ``stop()`` ends them all (SIGTERM: each replica
    drains its requests; then SIGKILL after ``timeout``) and returns their exit codes."""

    config: ReplicaSetConfig
    log_dir: Path | None = None
    replica_urls: list[str] = field(default_factory=list)
    router_url: str = ""
    router_metrics_url: str = ""
    replicas: list[subprocess.Popen] = field(default_factory=list)
    router: subprocess.Popen | None = None

    def start(self) -> ReplicaSet:
        config = self.config
        ports = ([free_port(config.host) for _ in range(config.replicas + 2)] if config.port == 0 else
                 [config.port, *range(config.port + 1, config.port + 1 + config.replicas), free_port(config.host)])
        router_port, replica_ports, metrics_port = ports[0], ports[1:-1], ports[-1]
        self.replica_urls = [f"http://{config.host}:{port}" for port in replica_ports]
        self.router_url = f"http://{config.host}:{router_port}"
        self.router_metrics_url = f"http://{config.host}:{metrics_port}/metrics"
        try:
            for index, port in enumerate(replica_ports):
                self.replicas.append(self._spawn(replica_command(config, port), f"replica{index}"))
            self._wait(lambda: all(_get(f"{url}/health") == 200 for url in self.replica_urls), "every replica's /health",
                       self.replicas)
            self.router = self._spawn(router_command(config, router_port, self.replica_urls, metrics_port), "router")
            self._wait(lambda: _get(f"{self.router_url}/health") == 200, "the router's /health", [self.router])
        except BaseException:
            self.stop()
            raise
        logger.info("router %s in front of %s", self.router_url, ", ".join(self.replica_urls))
        return self

    def _spawn(self, command: list[str], name: str) -> subprocess.Popen:
        out = subprocess.DEVNULL
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115 (the child owns it from here)
        logger.info("starting %s: %s", name, " ".join(command))
        try:
            return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            if out is not subprocess.DEVNULL:
                out.close()

    def _wait(self, ready, what: str, processes: Sequence[subprocess.Popen]) -> None:
        deadline = time.monotonic() + self.config.startup_timeout_s
        while not ready():
            dead = [p for p in processes if p.poll() is not None]
            if dead:
                raise RuntimeError(f"waiting for {what}: {' '.join(map(str, dead[0].args[:4]))} ... exited with "
                                   f"{dead[0].returncode}" + (f" (logs in {self.log_dir})" if self.log_dir else ""))
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} did not answer within {self.config.startup_timeout_s:.0f} s")
            time.sleep(0.2)

    def kill_replica(self, index: int, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to replica ``index`` (SIGKILL: a crash, as a lost machine)."""
        os.killpg(self.replicas[index].pid, sig)

    def stop(self, timeout: float = 30.0) -> dict[str, int | None]:
        """SIGTERM the router and the replicas, wait up to ``timeout``, SIGKILL what is left; the exit codes."""
        processes = {"router": self.router} if self.router else {}
        processes.update({f"replica{i}": p for i, p in enumerate(self.replicas)})
        for process in processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        codes: dict[str, int | None] = {}
        for name, process in processes.items():
            try:
                codes[name] = process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop within %.0f s: killing it", name, timeout)
                os.killpg(process.pid, signal.SIGKILL)
                codes[name] = process.wait()
        return codes

    def __enter__(self) -> ReplicaSet:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
