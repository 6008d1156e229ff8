"""The engine loop in its own process: the HTTP process never shares a GIL with the engine.

:class:`ProcessEngineLoop` has the HTTP-facing interface of :class:`~apexlib.serve.loop.EngineLoop`
(``submit``, ``abort``, ``snapshot``, ``num_pending``, ``alive``, ``fatal_error``, ``on_finished``,
``stop``), but the :class:`~apexlib.engine.LLMEngine` and the :class:`EngineLoop` that owns it live in a
child process (``spawn``). Why: on a small model the engine's step is mostly Python, and so is the HTTP
side's per-token work (detokenization, SSE chunks, uvicorn); in one process the two serialize on the GIL
and every token a client streams slows the engine down. Apart, each has its interpreter.

Protocol over one duplex pipe. Parent -> child: ``("add", request_id, prompt_token_ids, params,
arrival_time)``, ``("abort", request_id)``, ``("stop", timeout)``. Child -> parent: ``("ready",
engine_config)`` once the engine is built (or ``("startup_error", message)``), then ``("deltas", [(request_id,
Delta), ...])`` once per step -- the batch the in-process loop would hand to its event loop, or several steps'
batches in one when the parent reads more slowly than the engine steps --, ``("snapshot", LoopSnapshot,
fatal_error, submitted)`` after each step (only the newest when they queue up), and ``("stopped", None)`` at
the end. A sender thread writes them, so the engine never waits on the pipe. The child runs
the very same :class:`EngineLoop` (faults, retries, aborts, draining), so its guarantees carry over; the
child ignores SIGINT/SIGTERM (the HTTP process drains and then stops it) and stops when the pipe closes
(its parent is gone).
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import queue
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from apexlib.core.clock import clock
from apexlib.core.request import SamplingParams
from apexlib.engine.args import EngineArgs
from apexlib.serve.loop import Delta, EngineLoop, LoopSnapshot, RequestStream, deliver, pending_from

logger = logging.getLogger(__name__)


_SYNC = object()  # marks a message whose sender waits until it is written


class _PipeSender:
    """The child's side of the pipe: stands in for the asyncio event loop of the child's streams.

    The engine loop never writes to the pipe itself: ``post`` queues a step's deltas or snapshot and
    returns, and a sender thread writes them. When the HTTP process reads more slowly than the engine
    steps (the pipe is full), the engine keeps stepping, and the thread then sends everything that waits
    as one message of deltas (in order) plus the newest snapshot. Stepping the engine while the pipe write
    blocked cost the engine process ~11% of its samples (py-spy, tiny model, 32 streams).
    ``send`` (control messages: ready, startup_error, stopped) waits until its message is written, after
    everything posted before it, and raises what writing it raised (e.g. an exception that does not
    pickle)."""

    def __init__(self, conn) -> None:
        self.conn = conn
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="apex-engine-sender", daemon=True)
        self._thread.start()

    def post(self, message: tuple) -> None:
        if self._error is not None:
            raise self._failed()
        self._queue.put(message)

    def send(self, message: tuple) -> None:
        done, raised = threading.Event(), []
        self._queue.put((_SYNC, message, done, raised))
        while not done.wait(1.0):
            if not self._thread.is_alive():
                raise RuntimeError("the sender thread of the engine process is gone")
        if raised:
            raise raised[0]

    def call_soon_threadsafe(self, callback, items: list[tuple[RequestStream, Delta]]) -> None:
        self.post(("deltas", [(stream.request_id, delta) for stream, delta in items]))

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, then stop the thread."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _failed(self) -> RuntimeError:
        return RuntimeError(f"the pipe to the HTTP process failed: {self._error}")

    def _write(self, message: tuple) -> None:
        if self._error is None:
            try:
                self.conn.send(message)
            except Exception as error:  # the parent is gone (BrokenPipeError), or a bug: later posts raise it
                self._error = error

    def _flush(self, deltas: list, snapshot: tuple | None) -> None:
        """The queued steps' deltas as one message (in order), then the newest snapshot."""
        if deltas:
            self._write(("deltas", deltas))
        if snapshot is not None:
            self._write(snapshot)

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            deltas: list = []
            snapshot = None
            for item in batch:
                if item is None or item[0] is _SYNC:  # what was posted before it goes first
                    self._flush(deltas, snapshot)
                    deltas, snapshot = [], None
                    if item is None:
                        return
                    _, message, done, raised = item
                    try:
                        if self._error is not None:
                            raise self._failed()
                        self.conn.send(message)
                    except BaseException as error:  # handed to the waiting caller
                        raised.append(error)
                    done.set()
                elif item[0] == "deltas":
                    deltas.extend(item[1])
                else:  # a snapshot: only the newest one matters
                    snapshot = item
            self._flush(deltas, snapshot)


class _ChildLoop(EngineLoop):
    """The in-process loop, publishing its snapshot to the parent as well."""

    def __init__(self, engine, sender: _PipeSender, **kwargs: Any) -> None:
        self.sender = sender
        super().__init__(engine, **kwargs)

    def _publish(self) -> None:
        super()._publish()
        try:
            self.sender.post(("snapshot", self.snapshot, self.fatal_error))
        except RuntimeError:
            self._stopping.set()  # the parent is gone: stop stepping


def _child_main(engine_args: EngineArgs, iteration_retries: int, conn,
                initializer: Callable[..., None] | None = None, initargs: tuple = ()) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the HTTP process decides when to stop
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from apexlib.engine.engine import LLMEngine

    sender = _PipeSender(conn)
    try:
        if initializer is not None:
            initializer(*initargs)
        engine = LLMEngine(engine_args)
    except BaseException as error:
        message = f"{type(error).__name__}: {error}"
        try:  # bad input (ValueError, OSError) reaches the caller as what it is
            sender.send(("startup_error", error if isinstance(error, (ValueError, OSError)) else message))
        except Exception:  # an exception that does not pickle
            sender.send(("startup_error", message))
        return
    loop = _ChildLoop(engine, sender, iteration_retries=iteration_retries)
    sender.send(("ready", engine.config))
    loop.start()
    timeout = 10.0
    try:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                logger.warning("the HTTP process is gone: stopping the engine")
                break
            kind = message[0]
            if kind == "add":
                _, request_id, prompt_token_ids, params, arrival_time = message
                stream = RequestStream(request_id, sender)  # type: ignore[arg-type]
                try:
                    loop.submit(stream, prompt_token_ids, params, arrival_time)
                except RuntimeError as error:
                    sender.call_soon_threadsafe(None, [(stream, Delta((), True, "error", str(error), "failed"))])
            elif kind == "abort":
                loop.abort(message[1])
            elif kind == "stop":
                timeout = message[1]
                break
    finally:
        loop.stop(timeout=timeout)
        try:
            engine.close()
        finally:
            try:
                sender.send(("stopped", loop.fatal_error))
            except (OSError, EOFError, RuntimeError):  # the parent is gone
                pass
            sender.close()


def describe_exit(code: int | None) -> str:
    """A process's exit code in words: ``killed by SIGKILL``, ``exit code 1``."""
    if code is None:
        return "still running, its pipe closed"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


@dataclass
class EngineInfo:
    """What the HTTP side reads of an engine that lives in another process: its config and tokenizer."""

    config: Any
    tokenizer: Any

    def close(self) -> None:  # the engine is closed by its own process
        pass


class ProcessEngineLoop:
    """An :class:`EngineLoop` in a child process; built (and the engine loaded) by the constructor.

    ``initializer(*initargs)``, when given, runs in the child before the engine is built, as
    :class:`multiprocessing.pool.Pool`'s does (e.g. a logging set-up, or a fault injected by a test); it must
    be importable by name (a module-level function) and its arguments picklable.
    """

    def __init__(self, engine_args: EngineArgs, iteration_retries: int = 1, startup_timeout: float = 900.0,
                 initializer: Callable[..., None] | None = None, initargs: tuple = ()) -> None:
        if iteration_retries < 0:
            raise ValueError(f"iteration_retries must be >= 0, got {iteration_retries}")
        from apexlib.engine.engine import load_tokenizer

        context = multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe(duplex=True)
        self._process = context.Process(target=_child_main, args=(engine_args, iteration_retries, child_conn,
                                                                    initializer, tuple(initargs)),
                                        name="apex-engine")
        self._process.start()
        child_conn.close()
        if not self._conn.poll(startup_timeout):
            self._process.kill()
            raise RuntimeError(f"the engine process did not start within {startup_timeout:.0f} s")
        kind, payload = "snapshot", None
        while kind == "snapshot":  # the loop publishes its first (empty) snapshot before "ready"
            try:
                kind, payload = self._conn.recv()[:2]
            except EOFError:
                self._process.join(5)
                raise RuntimeError(f"the engine process exited while starting "
                                   f"({describe_exit(self._process.exitcode)})") from None
        if kind != "ready":
            self._process.join(10)
            if isinstance(payload, (ValueError, OSError)):
                raise payload
            raise RuntimeError(f"the engine could not start: {payload}")
        self.engine = EngineInfo(payload, load_tokenizer(payload.model.path))
        self.on_finished = None  # called on the reader thread for every request the engine finished
        self.snapshot = LoopSnapshot()
        self.fatal_error: str | None = None
        self._streams: dict[str, RequestStream] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()  # sends, _streams, _submitted
        self._submitted = 0
        self._stopping = False
        self._reader = threading.Thread(target=self._read, name="apex-engine-reader", daemon=True)
        self._reader.start()

    # -- the interface of EngineLoop ------------------------------------------------------------------
    def start(self) -> None:
        """Nothing to do: the engine process steps from the moment it is built."""

    @property
    def alive(self) -> bool:
        return self._process.is_alive() and self._reader.is_alive() and self.fatal_error is None

    def new_request_id(self, prefix: str = "req") -> str:
        return f"{prefix}-{next(self._ids)}"

    @property
    def num_pending(self) -> int:
        """As :attr:`EngineLoop.num_pending`: the child counts what it received in its snapshot."""
        return pending_from(self.snapshot, self._submitted)

    def submit(self, stream: RequestStream, prompt_token_ids: list[int], params: SamplingParams,
               arrival_time: float | None = None) -> None:
        if self._stopping or not self.alive:
            raise RuntimeError("the engine loop is not running")
        with self._lock:
            self._streams[stream.request_id] = stream
            self._submitted += 1
            try:
                self._conn.send(("add", stream.request_id, list(prompt_token_ids), params,
                                 clock() if arrival_time is None else arrival_time))
            except (OSError, EOFError) as error:
                del self._streams[stream.request_id]
                raise RuntimeError(f"the engine process is gone: {error}") from None

    def abort(self, request_id: str) -> None:
        with self._lock:
            if self._streams.pop(request_id, None) is None:
                return
            try:
                self._conn.send(("abort", request_id))
            except (OSError, EOFError):
                pass

    def stop(self, timeout: float = 10.0) -> None:
        """Let the engine process abort what is left and exit (bounded by ``timeout``)."""
        with self._lock:
            first = not self._stopping
            self._stopping = True
            if first and self._process.is_alive():
                try:
                    self._conn.send(("stop", timeout))
                except (OSError, EOFError):
                    pass
        self._process.join(timeout + 10)
        if self._process.is_alive():
            logger.error("the engine process did not stop within %.1f s: killing it", timeout + 10)
            self._process.kill()
            self._process.join(5)
        self._reader.join(5)

    # -- the reader thread ----------------------------------------------------------------------------
    def _read(self) -> None:
        reason = "the engine process exited"
        try:
            while True:
                try:
                    message = self._conn.recv()
                except (EOFError, OSError):
                    break
                kind = message[0]
                if kind == "deltas":
                    self._dispatch(message[1])
                elif kind == "snapshot":
                    _, self.snapshot, fatal = message
                    if fatal:
                        self.fatal_error = fatal
                elif kind == "stopped":
                    if message[1]:
                        self.fatal_error = message[1]
                    reason = "the server is shutting down"
                    break
        finally:
            if self.fatal_error is None and not self._stopping:
                self._process.join(5)  # the pipe closed: the process is gone or going; reap it for its code
                self.fatal_error = f"{reason} ({describe_exit(self._process.exitcode)})"
            with self._lock:
                streams = list(self._streams.values())
                self._streams.clear()
            deliver([(stream, Delta((), True, "error", self.fatal_error or reason, "failed"))
                             for stream in streams])

    def _dispatch(self, deltas: list[tuple[str, Delta]]) -> None:
        items = []
        with self._lock:
            for request_id, delta in deltas:
                stream = self._streams.get(request_id)
                if stream is None:  # aborted by its caller
                    continue
                if delta.finished:
                    del self._streams[request_id]
                items.append((stream, delta))
        for _stream, delta in items:
            if delta.finished and delta.source == "engine" and self.on_finished is not None:
                try:
                    self.on_finished(None, delta)
                except Exception:  # metrics must never stop the reader
                    logger.exception("on_finished hook failed")
        deliver(items)

