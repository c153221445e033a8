"""Serves an LLMEngine to asyncio code: one background thread steps the engine while there is work,
and every request streams its RequestOutputs through its own asyncio queue.

Only the step thread touches the engine's mutable state. Callers hand it work through an inbox
(add / abort) that it drains between steps; the same point runs the step-boundary hooks, which is
where an attention replica adopts a new placement epoch (invariant 2 in docs/architecture.md: never inside a step).
A step that raises is retried once (the scheduler state is only advanced after the model ran, so
the retry computes the same step); a request whose own sampling fails inside a step is failed
alone by the engine (RequestOutput.error). Only a step that fails twice fails every request.
A consumer that stops listening (client disconnect: the generator is cancelled or closed) aborts its
request, which frees its KV blocks at the next boundary.

The step thread hands out token ids only. Each stream makes its text on the consumer's event loop
(actors/engine/output/text_stream.py): detokenising and stop strings cost the step nothing, and a stop
string that ends a request aborts it from there (tokens the engine made after the stop are never
sent). A consumer that fell behind gets every output waiting in its queue folded into one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from actors.engine.engine import EngineStats, LLMEngine, RequestOutput
from actors.engine.output.request_output import coalesce
from actors.engine.output.text_stream import TextStream
from actors.engine.request_rejected import RequestRejected
from actors.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class EngineStopped(RuntimeError):
    """The engine was shut down; no new requests."""


@dataclasses.dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue  # RequestOutput items, or an exception that ends the stream
    text: TextStream


class AsyncEngine:
    def __init__(self, engine: LLMEngine, idle_wait_s: float = 0.05) -> None:
        self.engine = engine
        engine.make_text = False  # the streams make it, off the step thread
        # an idle thread still wakes this often, so step-boundary hooks run without traffic
        self.idle_wait_s = idle_wait_s
        self._lock = threading.Lock()  # guards the inbox, the streams and the hooks
        self._inbox: list[tuple[Any, ...]] = []  # ("add", id, prompt ids, params, generated) | ("abort", id)
        self._streams: dict[str, _Stream] = {}
        self._hooks: list[Callable[[], None]] = []
        self._once: list[tuple[Callable[[], Any], concurrent.futures.Future]] = []
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="engine-step", daemon=True)
        self._thread.start()

    # ---- caller side (any thread / event loop) -----------------------------------------------

    def generate(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams | None = None,
        generated: list[int] | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Validate now (RequestRejected raises here, before any streaming starts) and return the
        stream of outputs; the request is queued when iteration begins. `generated`: resume a request
        that already produced these tokens (LLMEngine.add_request)."""
        params = params or SamplingParams()
        if self._stopping:
            raise EngineStopped("the engine is shutting down")
        self.engine.check_request(prompt_ids, params)
        with self._lock:
            if request_id in self._streams:
                raise RequestRejected(f"request id {request_id!r} is already running")
        return self._stream(request_id, list(prompt_ids), params, list(generated or ()))

    async def _stream(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                      generated: list[int]) -> AsyncIterator[RequestOutput]:
        text = TextStream(self.engine.tokenizer, prompt_ids, params, generated)
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), text)
        with self._lock:
            if self._stopping:
                raise EngineStopped("the engine is shutting down")
            if request_id in self._streams:
                raise RequestRejected(f"request id {request_id!r} is already running")
            self._streams[request_id] = stream
            self._inbox.append(("add", request_id, prompt_ids, params, generated))
        self._wake.set()
        done = False
        try:
            while not done:
                outputs, error = _drain(stream.queue, await stream.queue.get())
                if outputs:
                    out = coalesce(outputs)
                    engine_finished = out.finished
                    out = stream.text.apply(out)
                    if stream.text.ended_early(engine_finished, out):
                        self.abort(request_id)  # a stop string: free the KV, drop what comes after
                    if out is not None:
                        done = out.finished
                        yield out
                if error is not None and not done:
                    done = True
                    raise error
        finally:
            if not done:  # cancelled or closed by the consumer: free the slot
                self.abort(request_id)

    async def compile_grammar(self, spec: Any) -> Any:
        """A GrammarSpec compiled on the engine's grammar threads, awaited here with the engine's time
        budget (the event loop and the step thread do none of the work): a SamplingParams.grammar
        that add_request only has to copy. RequestRejected if it is invalid, too big or too slow."""
        grammars = self.engine.grammars
        budget = grammars.limits.compile_timeout_s
        fut = grammars.submit(spec)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), budget)
        except TimeoutError:
            fut.cancel()
            raise RequestRejected(
                f"the {spec.kind.replace('_', ' ')} did not compile within {budget:g}s "
                "(engine.grammar_compile_timeout_s); simplify it") from None

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._streams.pop(request_id, None)
            self._inbox.append(("abort", request_id))
        self._wake.set()

    def on_step_boundary(self, fn: Callable[[], None]) -> None:
        """Run fn between every two steps (and periodically while idle), on the step thread."""
        with self._lock:
            self._hooks.append(fn)

    def run_at_step_boundary(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run fn once at the next step boundary; the future holds its result or exception."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._stopping:
                raise EngineStopped("the engine is shutting down")
            self._once.append((fn, fut))
        self._wake.set()
        return fut

    def is_alive(self) -> bool:
        """The step thread runs and no shutdown was asked for: what /health and Serve's probe report."""
        with self._lock:
            stopping = self._stopping
        return self._thread.is_alive() and not stopping

    def stats(self) -> EngineStats:
        stats = self.engine.stats()
        with self._lock:
            queued = sum(1 for item in self._inbox if item[0] == "add")
        return dataclasses.replace(stats, waiting=stats.waiting + queued)

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop stepping, end every open stream with finish_reason 'abort', join the thread."""
        with self._lock:
            self._stopping = True
        self._wake.set()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.error("engine step thread did not stop within %.1fs", timeout_s)
        grammars = getattr(self.engine, "grammars", None)
        if grammars is not None:
            grammars.close()

    # ---- step thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            self._wake.clear()
            self._boundary()
            if self._stopping:
                break
            if self.engine.has_unfinished():
                try:
                    outputs = self._step_with_retry()
                except Exception as exc:  # a failed step must not hang its requests
                    log.exception("engine step failed twice; aborting its requests")
                    self._fail_all(exc)
                    continue
                self._deliver(outputs)
            else:
                self._wake.wait(self.idle_wait_s)
        self._boundary()
        self._deliver([o for rid in self.engine.unfinished_request_ids() if (o := self.engine.abort_request(rid))])
        with self._lock:
            once, self._once = self._once, []
        for _, fut in once:
            fut.set_exception(EngineStopped("the engine was shut down"))

    def _step_with_retry(self) -> list[RequestOutput]:
        try:
            return self.engine.step()
        except Exception:  # noqa: BLE001 - e.g. a transient expert-call failure: try once more
            log.exception("engine step failed; retrying it once")
            return self.engine.step()

    def _boundary(self) -> None:
        with self._lock:
            inbox, self._inbox = self._inbox, []
            hooks = list(self._hooks)
            once, self._once = self._once, []
        for item in inbox:
            if item[0] == "add":
                _, rid, prompt, params, generated = item
                try:
                    self.engine.add_request(rid, prompt, params, generated or None)
                except Exception as exc:  # e.g. a duplicate id that raced past generate()
                    self._deliver_to(rid, exc)
            else:
                self.engine.abort_request(item[1])
        for hook in hooks:
            try:
                hook()
            except Exception:
                log.exception("step-boundary hook %r failed", hook)
        for fn, fut in once:
            try:
                fut.set_result(fn())
            except Exception as exc:
                fut.set_exception(exc)

    def _fail_all(self, exc: Exception) -> None:
        for rid in self.engine.unfinished_request_ids():
            self.engine.abort_request(rid)
            self._deliver_to(rid, exc)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Any]]] = {}
        with self._lock:
            for out in outputs:
                stream = self._streams.pop(out.request_id, None) if out.finished else self._streams.get(out.request_id)
                if stream is not None:
                    item = out.error if out.error is not None else out  # failed alone: the stream raises it
                    by_loop.setdefault(stream.loop, []).append((stream.queue, item))
        for loop, items in by_loop.items():
            self._post(loop, items)

    def _deliver_to(self, request_id: str, item: Any) -> None:
        with self._lock:
            stream = self._streams.pop(request_id, None)
        if stream is not None:
            self._post(stream.loop, [(stream.queue, item)])

    def _post(self, loop: asyncio.AbstractEventLoop, items: list[tuple[asyncio.Queue, Any]]) -> None:
        try:
            loop.call_soon_threadsafe(_put_all, items)
        except RuntimeError:  # the consumer's event loop is closed: nobody is listening
            for queue, item in items:
                if isinstance(item, RequestOutput) and not item.finished:
                    self.abort(item.request_id)


def _drain(queue: asyncio.Queue, first: Any) -> tuple[list[RequestOutput], BaseException | None]:
    """`first` and whatever else is queued now: the outputs up to the first exception, and it."""
    outputs: list[RequestOutput] = []
    item = first
    while True:
        if isinstance(item, BaseException):
            return outputs, item
        outputs.append(item)
        if item.finished or queue.empty():
            return outputs, None
        item = queue.get_nowait()


def _put_all(items: list[tuple[asyncio.Queue, Any]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)
