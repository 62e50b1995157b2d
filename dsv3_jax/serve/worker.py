"""The engine thread: the one thread that owns the JAX loop, and the asyncio side that talks to it.

Handlers (on the event loop) never touch the engine. They put commands on a thread-safe queue:
    submit(prompt ids, parameters) -> a future resolved with the request id (or the UserError that refused it)
    cancel(request id)
and read their request's events from an asyncio.Queue that the engine thread fills with
loop.call_soon_threadsafe: ('tokens', [ids], ...) as tokens are committed (`_on_tokens`), ('done', Request) at
the end (a request whose step raised ends with finish_reason 'error': the engine isolates the failure and goes on).
The thread steps the engine while it has work and blocks on the command queue when idle. `stop(deadline)`
stops admitting new requests, lets running ones finish until the deadline, cancels the rest, and joins.

If the engine thread itself dies (a failure the engine could not recover from), `error` holds it, every request
in flight gets ('error', text), every submit waiting for the thread and every later one raises EngineDead (HTTP
503) within a second, and `on_fatal` is called so the server can exit non-zero for its supervisor to restart it.
"""
from __future__ import annotations

import asyncio
import queue
import threading
import time

from dsv3_jax.cli import UserError
from dsv3_jax.infer.engine import Engine


class QueueFull(Exception):
    """More requests waiting than the server accepts (HTTP 429)."""


class EngineDead(Exception):
    """The engine thread has stopped (HTTP 503)."""


class EngineWorker:
    def __init__(self, engine: Engine, max_waiting: int = 256):
        self.engine, self.max_waiting = engine, max_waiting
        self.commands: queue.Queue = queue.Queue()
        self.streams: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self.accepting = True
        self._stop_at: float | None = None
        self.thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self.error: BaseException | None = None
        self.on_finish = None  # callback(Request) in the engine thread (metrics)
        self.on_fatal = None  # callback(exception) in the engine thread once it dies
        self.on_tokens = None  # callback(Request, new ids) in the engine thread (metrics)

    def start(self):
        self.thread.start()

    # ------------------------------------------------------------------ event-loop side
    @property
    def dead(self) -> bool:
        return self.error is not None or (self.thread.ident is not None and not self.thread.is_alive()
                                          and self._stop_at is None)

    def why_dead(self) -> str:
        return f"the engine stopped: {self.error!r}" if self.error is not None else "the engine thread stopped"

    async def submit(self, prompt: list[int], max_tokens: int, sampling, **kw):
        """-> (request id, asyncio.Queue of events); `kw` as for Engine.submit (stop_strings, stop_ids, logprobs,
        ...). Raises UserError (bad request), QueueFull or EngineDead."""
        if self.dead:
            raise EngineDead(self.why_dead())
        if not self.accepting:
            raise QueueFull("the server is shutting down")
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        events: asyncio.Queue = asyncio.Queue()
        self.commands.put(("submit", (prompt, max_tokens, sampling, kw), loop, fut, events))
        while True:  # a thread that dies before answering would leave this waiting: look every half second
            done, _ = await asyncio.wait({fut}, timeout=0.5)
            if done:
                return fut.result(), events
            if self.dead:
                raise EngineDead(self.why_dead())

    def cancel(self, rid: int):
        self.commands.put(("cancel", rid, None, None, None))

    def stats(self) -> dict:
        sch, pool = self.engine.scheduler, self.engine.pool
        return {"running": len(sch.running), "waiting": len(sch.waiting),
                "requests_held": len(self.engine.requests), "pages_used": pool.used,
                "pages_free": pool.available, "pages": pool.pages - 1, "prefix_queries": sch.prefix_queries,
                "prefix_hits": sch.prefix_hits, "preemptions": sch.preemptions}

    def stop(self, deadline_s: float = 30.0):
        self.accepting = False
        self._stop_at = time.monotonic() + deadline_s
        self.commands.put(("wake", None, None, None, None))
        self.thread.join(deadline_s + 30)

    # ------------------------------------------------------------------ engine thread
    def _post(self, rid, item):
        target = self.streams.get(rid)
        if target is not None:
            loop, events = target
            loop.call_soon_threadsafe(events.put_nowait, item)

    def _on_tokens(self, req, new):
        """('tokens', new ids, the text so far when the request has stop strings (cut before one it found), the
        new tokens' log-probabilities when it asked, the request)."""
        if self.on_tokens is not None:
            self.on_tokens(req, new)
        text = req.text if req.stop_strings else None
        lps = req.token_logprobs[-len(new):] if req.logprobs is not None else None
        self._post(req.rid, ("tokens", list(new), text, lps, req))

    def _handle(self, cmd):
        kind, arg, loop, fut, events = cmd
        if kind == "submit":
            prompt, max_tokens, sampling, kw = arg
            try:
                if len(self.engine.scheduler.waiting) >= self.max_waiting:
                    raise QueueFull(f"{len(self.engine.scheduler.waiting)} requests are waiting; retry later")
                rid = self.engine.submit(prompt, max_tokens, sampling, on_tokens=self._on_tokens, **kw)
            except (UserError, QueueFull) as e:
                loop.call_soon_threadsafe(_set, fut, None, e)
                return
            self.streams[rid] = (loop, events)
            loop.call_soon_threadsafe(_set, fut, rid, None)
        elif kind == "cancel":
            req = self.engine.requests.get(arg)
            if req is not None and not req.done:
                self.engine.cancel(arg)
                self._finish(req)

    def _finish(self, req):
        if self.on_finish is not None:
            self.on_finish(req)
        self._post(req.rid, ("done", req))
        self.streams.pop(req.rid, None)
        self.engine.release(req.rid)  # the engine keeps nothing of a request it has answered

    def _loop(self):
        try:
            while True:
                idle = self.engine.idle
                try:
                    cmd = self.commands.get(block=idle, timeout=None if idle else 0)
                    self._handle(cmd)
                    while True:
                        self._handle(self.commands.get_nowait())
                except queue.Empty:
                    pass
                if self._stop_at is not None and (self.engine.idle or time.monotonic() > self._stop_at):
                    for req in list(self.engine.scheduler.running) + list(self.engine.scheduler.waiting):
                        self.engine.cancel(req.rid)
                        self._finish(req)
                    return
                if not self.engine.idle:
                    for req in self.engine.step():
                        self._finish(req)
        except BaseException as e:  # the server reports it on /health instead of hanging its clients
            self.error = e
            for rid in list(self.streams):
                self._post(rid, ("error", f"the engine stopped: {e!r}"))
            while True:  # submits that reached the queue: refused now, not in half a second
                try:
                    _, _, loop, fut, _ = self.commands.get_nowait()
                except queue.Empty:
                    break
                if fut is not None:
                    loop.call_soon_threadsafe(_set, fut, None, EngineDead(self.why_dead()))
            if self.on_fatal is not None:
                self.on_fatal(e)


def _set(fut, value, error):
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(value)
