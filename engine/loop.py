"""A worker thread that owns an instance: runs commands between model steps, publishes each step.

The instance (engine, scheduler, block tables) is touched only by this thread, so it needs no
locks; callers on other threads (an actor's event loop) ``call`` a function on it and get a
future. Steps run whenever the instance has work; otherwise the thread sleeps on its inbox.
"""
from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable, Protocol

log = logging.getLogger(__name__)


class Steppable(Protocol):
    def has_work(self) -> bool: ...
    def step(self) -> Any: ...


class StepLoop:
    def __init__(self, instance: Steppable, publish: Callable[[Any], None],
                 idle_tick_s: float = 0.5, housekeeping: Callable[[], None] | None = None) -> None:
        self.instance = instance
        self.publish = publish
        self.idle_tick_s = idle_tick_s
        self.housekeeping = housekeeping
        self.error: BaseException | None = None
        self.paused = False  # commands still run while paused; model steps do not
        self._inbox: queue.SimpleQueue[tuple[Callable[[], Any], Future]] = queue.SimpleQueue()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="step-loop", daemon=True)
        self._thread.start()

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run `fn` on the loop thread between steps; its result or exception lands in the future."""
        future: Future = Future()
        if self._stopped.is_set():
            future.set_exception(RuntimeError(f"instance loop is stopped ({self.error or 'shut down'})"))
        else:
            self._inbox.put((fn, future))
        return future

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stopped.set()
        self._inbox.put((lambda: None, Future()))
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while not self._stopped.is_set():
            can_step = not self.paused and self.instance.has_work()
            self._drain(block=not can_step)
            if self._stopped.is_set():
                break
            if not self.paused and self.instance.has_work():
                self._step()
            if self.housekeeping is not None:
                self.housekeeping()
        self._fail_pending()

    def _drain(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=self.idle_tick_s) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            fn, future = item
            try:
                future.set_result(fn())
            except BaseException as exc:  # delivered to the caller, never kills the loop
                future.set_exception(exc)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _step(self) -> None:
        try:
            output = self.instance.step()
        except Exception as exc:  # stop loudly: callers get errors, health checks see it
            log.exception("instance step failed")
            self.error = exc
            self._stopped.set()
            return
        self.publish(output)

    def _fail_pending(self) -> None:
        while True:
            try:
                _, future = self._inbox.get_nowait()
            except queue.Empty:
                return
            if not future.done():
                future.set_exception(RuntimeError(f"instance loop is stopped ({self.error or 'shut down'})"))
