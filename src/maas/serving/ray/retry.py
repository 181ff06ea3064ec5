"""When the front may send a request again after its replica died: which requests are safe to repeat, which
failures mean the replica died, and how long to keep trying.

Ray Serve's router retries a request only until a replica accepts it; a replica killed while running it fails the
call with ``ray.exceptions.ActorDiedError`` (a ``RayActorError``). The front retries those, before any byte of the
answer went out, for requests that change nothing when repeated: reads, and inference (which only meters usage: a
retried inference may be counted twice in usage and rate limits, once by the dead replica).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

#: Methods that change nothing on the server.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
#: POSTs that only compute an answer: Open Inference Protocol inference and the OpenAI-compatible API.
INFERENCE = re.compile(r"/v2/models/[^/]+(?:/versions/[^/]+)?/infer|/v1/(?:chat/completions|completions|embeddings)")


def retry_safe(method: str, path: str) -> bool:
    """Whether a request may run twice: a read, or an inference POST (never an admin mutation)."""
    method = method.upper()
    return method in SAFE_METHODS or (method == "POST" and INFERENCE.fullmatch(path) is not None)


def replica_died(exc: BaseException) -> bool:
    """Whether ``exc``, raised by a call to a replica, says the replica (or its process) died or is gone, rather
    than that the request failed there."""
    from ray import exceptions as ray_errors
    from ray.serve import exceptions as serve_errors

    gone = (
        ray_errors.RayActorError,  # ActorDiedError, ActorUnavailableError
        ray_errors.WorkerCrashedError,
        ray_errors.NodeDiedError,
        serve_errors.ReplicaUnavailableError,
        serve_errors.DeploymentUnavailableError,
    )
    if isinstance(exc, ray_errors.RayTaskError):  # raised in the replica: its cause says what happened
        exc = getattr(exc, "cause", None) or exc
    return isinstance(exc, gone)


def replica_crashed(exc: BaseException) -> bool:
    """Whether ``exc`` says the replica's process died while it ran the call (rather than that the replica could not be
    reached): the request itself may be what killed it."""
    from ray import exceptions as ray_errors

    if isinstance(exc, ray_errors.RayTaskError):
        exc = getattr(exc, "cause", None) or exc
    return isinstance(exc, ray_errors.ActorDiedError | ray_errors.WorkerCrashedError)


@dataclass
class Retries:
    """How often and how long a request is tried: at most ``attempts`` calls, a new one only while ``total_s`` has
    not passed since the first, after a wait of ``first_s`` doubling up to ``most_s``. Few attempts: a request that
    kills every replica it reaches (a crash in a runtime) must not take down the whole deployment in turn."""

    attempts: int = 4
    total_s: float = 30.0
    first_s: float = 0.05
    most_s: float = 1.0
    started: float = field(default_factory=time.monotonic)
    made: int = 1
    #: Replicas that died running the request: after the first, it is not sent again (a request that crashes its
    #: replica, e.g. out of memory in a runtime, would take down one replica per attempt).
    crashes: int = 0

    def next_wait(self, *, crashed: bool = False) -> float | None:
        """Seconds to wait before the next attempt (counted as made), or None when no attempt is left. ``crashed``:
        the last attempt's replica died running it (:func:`replica_crashed`)."""
        self.crashes += crashed
        wait = min(self.first_s * 2.0 ** (self.made - 1), self.most_s)
        if self.crashes > 1 or self.made >= self.attempts or time.monotonic() - self.started + wait > self.total_s:
            return None
        self.made += 1
        return wait
