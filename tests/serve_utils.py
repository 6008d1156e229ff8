"""A real `apex serve` application on a loopback port, in this process (uvicorn in a thread)."""

from __future__ import annotations

import threading
import time

from apexlib.core.plan import Tier
from apexlib.engine.args import EngineArgs
from apexlib.serve.server import bind_socket, make_app, uvicorn_config

ATTENTION_OK, ATTENTION_FAIL_ONCE, ATTENTION_BROKEN = 0, 1, 2


class InjectedFault(RuntimeError):
    pass


def install_attention_fault(state) -> None:
    """Wrap the CPU-attention kernel where the engine runs (an engine initializer, so a module-level function):
    ``state.value`` (a shared int) switches it between healthy, one transient fault and broken."""
    from apexlib.attention import cpu as cpu_attention

    original = cpu_attention.paged_decode_attention

    def maybe_failing(*args, **kwargs):
        with state.get_lock():
            mode = state.value
            if mode == ATTENTION_FAIL_ONCE:
                state.value = ATTENTION_OK
        if mode == ATTENTION_BROKEN:
            raise InjectedFault("injected fault in paged_decode_attention")
        if mode == ATTENTION_FAIL_ONCE:
            raise InjectedFault("injected transient fault")
        return original(*args, **kwargs)

    cpu_attention.paged_decode_attention = maybe_failing


ENGINE = dict(dtype="float32", device="cpu", block_size=8, max_model_len=256, num_gpu_blocks=96)


class LiveServer:
    """``LiveServer(model_path, **engine_args)``: ``.url``, ``.loop`` (the engine loop), ``.close()``."""

    def __init__(self, model: str, serve: dict | None = None, engine_process: bool = False, **engine: object) -> None:
        import uvicorn

        args = EngineArgs(model=str(model), **{**ENGINE, **engine})
        serve = dict(serve or {})
        names = serve.pop("served_model_names", ("tiny",))
        retries = serve.pop("iteration_retries", 1)
        self.engine_process = engine_process
        self.app, self.loop = make_app(args, names, iteration_retries=retries, engine_process=engine_process,
                                       **serve)
        self.engine = self.loop.engine
        sock = bind_socket("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn_config(self.app, log_level="warning", graceful_timeout=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    def kv_free(self) -> dict[str, tuple[int, int]]:
        """{tier: (free, total)} as the loop last published it."""
        snap = self.loop.snapshot
        return {tier: (snap.free_blocks[tier], snap.total_blocks[tier]) for tier in snap.total_blocks}

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Until no request is in the engine and every KV block is free (fails after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            snap = self.loop.snapshot
            if (snap.running == 0 and snap.waiting == 0 and snap.queued == 0
                    and all(snap.free_blocks[t] == snap.total_blocks[t] for t in snap.total_blocks)):
                if not self.engine_process:  # the loop is idle: the engine's own count agrees
                    kv = self.engine.scheduler.kv
                    assert all(kv.pools[t].num_free_blocks == kv.pools[t].num_blocks for t in Tier)
                return
            time.sleep(0.02)
        raise AssertionError(f"the server did not become idle: {self.loop.snapshot}")

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.loop.stop(timeout=5)
        self.engine.close()
