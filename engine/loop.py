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


class InstanceStopped(RuntimeError):
    """A call reached an instance whose step loop has stopped (failed or shut down)."""


class Steppable(Protocol):
    def has_work(self) -> bool: ...
    def step(self) -> Any: ...


class StepLoop:
    def __init__(self, instance: Steppable, publish: Callable[[Any], None],
                 idle_tick_s: float = 0.5, housekeeping: Callable[[], None] | None = None,
                 on_failure: Callable[[BaseException], None] | None = None) -> None:
        """``on_failure(exc)`` runs (on the loop thread) once a step raises and the loop stops."""
        self.instance = instance
        self.publish = publish
        self.on_failure = on_failure
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
            future.set_exception(self._stopped_error())
        else:
            self._inbox.put((fn, future))
        return future

    def wake(self) -> None:
        """Make an idle loop look at its instance again (from any thread)."""
        self._inbox.put((lambda: None, Future()))

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
                self._guarded(self._step)
            if self.housekeeping is not None:
                self._guarded(self.housekeeping)
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
        self.publish(self.instance.step())

    def _guarded(self, work: Callable[[], None]) -> None:
        """Run a step (or housekeeping); if it raises, stop loudly: pending and later calls get
        InstanceStopped, and the owner is told at once through ``on_failure``."""
        if self._stopped.is_set():
            return
        try:
            work()
        except Exception as exc:
            log.exception("instance step failed")
            self.error = exc
            self._stopped.set()
            if self.on_failure is not None:
                try:
                    self.on_failure(exc)
                except Exception:
                    log.exception("reporting the step failure failed")

    def _fail_pending(self) -> None:
        while True:
            try:
                _, future = self._inbox.get_nowait()
            except queue.Empty:
                return
            if not future.done():
                future.set_exception(self._stopped_error())

    def failure(self) -> str | None:
        """Why the loop stopped on a failed step ("Type: message"), or None; safe from any thread."""
        return None if self.error is None else f"{type(self.error).__name__}: {self.error}"

    def _stopped_error(self) -> InstanceStopped:
        return InstanceStopped(f"instance loop is stopped ({self.failure() or 'shut down'})")
