"""Running the server: engine -> loop -> app -> uvicorn on a bound socket, with a graceful SIGTERM.

On SIGTERM or SIGINT uvicorn stops accepting connections and waits up to ``drain_timeout`` seconds for
the requests in flight, which the engine loop keeps serving; then the loop aborts whatever is left and
stops, and the process exits 0.

:func:`uvicorn_config` is the one place uvicorn is configured (the CLI and the tests both use it): the
httptools protocol with header/body read deadlines and a header size bound
(:mod:`apexlib.serve.http_protocol`), uvicorn's ``limit_concurrency`` and ``timeout_keep_alive``.
"""

from __future__ import annotations

import logging
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

from apexlib.engine.args import EngineArgs

logger = logging.getLogger(__name__)


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {error}") from None
    sock.set_inheritable(True)
    return sock


def make_app(engine_args: EngineArgs, served_model_names: tuple[str, ...] | None = None,
             iteration_retries: int = 1, engine_process: bool = False,
             engine_initializer: Callable[..., None] | None = None, engine_initargs: tuple = (), **settings: Any):
    """(app, loop) for ``engine_args``: the engine is built here (it loads the weights), in a thread of this
    process (``engine_process=False``) or in a process of its own (:mod:`apexlib.serve.process_loop`).
    ``engine_initializer(*engine_initargs)`` runs where the engine will run, just before it is built."""
    from apexlib.serve.app import ServeSettings, build_app

    serve_settings = ServeSettings(served_model_names=tuple(served_model_names or (engine_args.model,)), **settings)
    if engine_process:
        from apexlib.serve.process_loop import ProcessEngineLoop

        loop = ProcessEngineLoop(engine_args, iteration_retries=iteration_retries, initializer=engine_initializer,
                                 initargs=engine_initargs)
    else:
        from apexlib.engine.engine import LLMEngine
        from apexlib.serve.loop import EngineLoop

        if engine_initializer is not None:
            engine_initializer(*engine_initargs)
        loop = EngineLoop(LLMEngine(engine_args), iteration_retries=iteration_retries)
    return build_app(loop, serve_settings), loop


def uvicorn_config(app, log_level: str = "warning", graceful_timeout: float | None = None):
    """The :class:`uvicorn.Config` of ``app`` (built by :func:`make_app`), with its settings' HTTP limits."""
    import uvicorn

    from apexlib.serve.http_protocol import bounded_protocol

    settings = app.state.server.settings
    timeouts = app.state.server.metrics.read_timeouts
    protocol = bounded_protocol(settings.header_timeout, settings.body_timeout, settings.max_header_bytes,
                                on_timeout=lambda phase: timeouts.labels(phase).inc())
    drain = settings.drain_timeout if graceful_timeout is None else graceful_timeout
    return uvicorn.Config(app, http=protocol, log_level=log_level, access_log=log_level in ("info", "debug"),
                          timeout_graceful_shutdown=max(1, int(drain)), limit_concurrency=settings.limit_concurrency,
                          timeout_keep_alive=settings.keep_alive_timeout)


def serve(engine_args: EngineArgs, host: str = "127.0.0.1", port: int = 8000,
          served_model_names: tuple[str, ...] | None = None, iteration_retries: int = 1, log_level: str = "warning",
          engine_process: bool = True, **settings: Any) -> int:
    """Serve until SIGTERM/SIGINT; ``settings`` are :class:`~apexlib.serve.app.ServeSettings` fields."""
    import uvicorn

    from apexlib.serve.app import ServeSettings

    ServeSettings(served_model_names=("check",), **settings)  # bad settings fail before the engine loads
    sock = bind_socket(host, port)
    app, loop = make_app(engine_args, served_model_names, iteration_retries=iteration_retries,
                         engine_process=engine_process, **settings)
    drain_timeout = app.state.server.settings.drain_timeout
    server = uvicorn.Server(uvicorn_config(app, log_level))
    # uvicorn re-raises the signal that stopped it once it has shut down; with these handlers in place
    # that is a no-op and the process exits 0 after draining.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: None)
    bound_host, bound_port = sock.getsockname()[:2]
    sys.stderr.write(f"apex serve: {', '.join(app.state.server.settings.served_model_names)} on "
                     f"http://{bound_host}:{bound_port} (OpenAI API under /v1)\n")
    sys.stderr.flush()
    try:
        server.run(sockets=[sock])
    finally:
        loop.stop(timeout=drain_timeout)
        loop.engine.close()
        sock.close()
    return 0 if loop.fatal_error is None else 1
