"""What an instance's health answer means to the router (pure: no I/O).

An instance the router takes out of service is either *benched* (it may come back: it stalled,
or Ray is restarting its process) or *dropped* for good (its actor is dead and will not be
restarted, or its step loop stopped and nothing restarts it). The router keeps pinging benched
instances and puts one back in service once it answers healthy, after it has dropped every
request it held (their clients were told they failed).
"""
from __future__ import annotations

import asyncio
from typing import NamedTuple

import ray

from tandem.engine.loop import InstanceStopped
from tandem.transfer.protocol import HealthReport, remote_cause

BENCH, DROP = "bench", "drop"


class Verdict(NamedTuple):
    action: str  # BENCH or DROP
    why: str  # completes "<role> instance <id> ...", e.g. "stopped answering for 10s"


def health_verdict(answer: object, *, restartable: bool, known_incarnation: str | None,
                   timeout_s: float) -> Verdict | None:
    """None for a healthy answer from the incarnation the router knows; else what to do.
    ``answer`` is a HealthReport or the exception the health call ended with."""
    if isinstance(answer, HealthReport):
        if known_incarnation is not None and answer.incarnation != known_incarnation:
            return Verdict(BENCH, "was restarted (its process died)")
        if answer.failure is not None:
            return Verdict(BENCH if restartable else DROP, f"its step failed ({answer.failure})")
        return None
    if isinstance(answer, asyncio.TimeoutError):
        return Verdict(BENCH, f"stopped answering for {timeout_s:g}s")
    verdict = lost_verdict(answer, restartable=restartable)  # type: ignore[arg-type]
    return verdict or Verdict(BENCH, f"failed its health check ({remote_cause(answer)!r})")


def lost_verdict(exc: BaseException, *, restartable: bool) -> Verdict | None:
    """What a call that could not reach an instance says about it, or None if the call reached
    it and the instance itself raised (a refusal: not the instance's fault)."""
    if isinstance(exc, ray.exceptions.ActorUnavailableError):
        return Verdict(BENCH, f"is unavailable ({type(exc).__name__}: Ray may be restarting it)")
    if isinstance(exc, ray.exceptions.RayActorError):
        return Verdict(DROP, f"died ({type(exc).__name__})")
    cause = remote_cause(exc)
    if isinstance(cause, InstanceStopped):
        return Verdict(BENCH if restartable else DROP, f"is stopped ({cause})")
    return None
