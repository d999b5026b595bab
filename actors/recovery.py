"""Calling restartable actors so that a death costs a redo, not the run.

Actors are created with ``max_restarts``: when one dies (its process killed, its vLLM engine
dead), its in-flight call fails with a Ray actor error while Ray starts a new copy. The caller
then runs ``recover`` (wait for the new copy, give it the current weights) and submits the same
call again. Calls on healthy actors keep running meanwhile.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Sequence

log = logging.getLogger(__name__)


class ActorCallFailed(RuntimeError):
    """An actor call still failed after its attempts; the run stops with this message."""


def actor_death_errors() -> tuple[type[BaseException], ...]:
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    return (RayActorError, ActorDiedError, ActorUnavailableError)


def call_with_recovery(calls: Sequence[tuple[Any, str, tuple]], recover: Sequence[Callable[[], None]],
                       max_attempts: int = 3, what: str = "call") -> list:
    """Run ``actor.method(*args)`` for every ``(actor, method, args)`` at once; results in order.

    A call whose actor died is retried after ``recover[i]()``, up to ``max_attempts`` times in all.
    """
    import ray

    deaths = actor_death_errors()
    attempts = [1] * len(calls)
    results: list = [None] * len(calls)

    def submit(i: int):
        actor, method, args = calls[i]
        return getattr(actor, method).remote(*args)

    pending = {submit(i): i for i in range(len(calls))}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        i = pending.pop(ready[0])
        try:
            results[i] = ray.get(ready[0])
        except deaths as exc:
            if attempts[i] >= max_attempts:
                raise ActorCallFailed(f"{what} {i}: actor died {attempts[i]} times; giving up ({exc})") from exc
            log.warning("%s %d: actor died (%s); restarting and redoing its work (attempt %d of %d)",
                        what, i, type(exc).__name__, attempts[i] + 1, max_attempts)
            attempts[i] += 1
            _recover_with_retries(recover[i], deaths, max_attempts, what, i)
            pending[submit(i)] = i
    return results


# A restarted vLLM engine of a large model can take minutes to come up.
RESTART_TIMEOUT_S = 900.0


def _recover_with_retries(recover: Callable[[], None], deaths: tuple, max_attempts: int, what: str, i: int,
                          timeout_s: float = RESTART_TIMEOUT_S) -> None:
    """Run ``recover`` once the restarted actor answers. While Ray is still restarting it, calls
    fail at once with ``ActorUnavailableError``: wait and ask again (not a new death). The
    restarted actor may itself die while starting or loading weights: that counts."""
    from ray.exceptions import ActorUnavailableError

    deadline = time.monotonic() + timeout_s
    deaths_seen = 0
    while True:
        try:
            recover()
            return
        except ActorUnavailableError as exc:
            if time.monotonic() > deadline:
                raise ActorCallFailed(f"{what} {i}: not back {timeout_s:g} s after a restart ({exc})") from exc
            time.sleep(0.5)
        except deaths as exc:
            deaths_seen += 1
            if deaths_seen >= max_attempts:
                raise ActorCallFailed(f"{what} {i}: actor did not come back after {deaths_seen} restarts ({exc})") from exc


class ActorSet:
    """Restartable actors (rollout workers, the reward actor).

    Each actor class has ``ready()``; those holding the policy (rollout workers) also
    ``update_weights(handle)``. The set remembers the newest ``WeightHandle`` (or a callable
    that returns it), so an actor that
    Ray restarted (from the start-up checkpoint) gets the current policy before it redoes its
    share.

    A callable handle publishes from the learners (every rank: ZeRO-3 gathers are collectives),
    and a restart may be recovered in a background thread (asynchronous generation). It runs
    under ``handle_lock``, which the driver holds around each of its own learner calls, so that
    the learner ranks never see a publish interleaved with a train or score call (a hang)."""

    def __init__(self, cls: type, args: Sequence[tuple], actor_options: dict, max_attempts: int, what: str):
        import ray

        self.what = what
        self.handle_lock = threading.RLock()
        self.closes = hasattr(cls, "close")  # actors that own processes of their own (vLLM engines)
        self.max_attempts = max_attempts
        self.handle = None
        self.restarts = 0
        remote_cls = ray.remote(cls)
        self.actors = [remote_cls.options(**actor_options).remote(*a) for a in args]
        self.info = ray.get([a.ready.remote() for a in self.actors])

    def _recover(self, index: int, load: bool = True) -> None:
        import ray

        actor = self.actors[index]
        self.info[index] = ray.get(actor.ready.remote())
        self.restarts += 1  # after ready: a restart still under way is asked again, not counted again
        # a handle, or a callable giving one (the broadcast sync publishes on demand)
        with self.handle_lock:
            handle = None if not load else self.handle() if callable(self.handle) else self.handle
        if handle is not None:
            ray.get(actor.update_weights.remote(handle))
        log.warning("%s %d restarted (pid %s), %s", self.what, index, self.info[index]["pid"],
                    "weights to follow" if not load else f"now at policy version {handle.version if handle else 0}")

    def revive(self, indices: Sequence[int]) -> None:
        """Actors that died outside ``call`` (in a weight sync): wait until Ray restarted each,
        loading no weights (the caller redoes the sync); counted in ``restarts``."""
        deaths = actor_death_errors()
        for i in indices:
            _recover_with_retries(lambda i=i: self._recover(i, load=False), deaths, self.max_attempts, self.what, i)

    def call(self, calls: Sequence[tuple[int, str, tuple]]) -> list:
        """``(actor index, method, args)`` for several actors at once, redone after a death."""
        return call_with_recovery([(self.actors[i], method, args) for i, method, args in calls],
                                  recover=[lambda i=i: self._recover(i) for i, _, _ in calls],
                                  max_attempts=self.max_attempts, what=self.what)

    def update_weights(self, handle) -> float:
        """Every actor loads ``handle``; returns the slowest actor's seconds."""
        self.handle = handle
        return max(self.call([(i, "update_weights", (handle,)) for i in range(len(self.actors))]))

    def shutdown(self, close_timeout: float = 60.0) -> None:
        """``close()`` on each actor that has it (bounded: a hung or dead actor is killed anyway), then kill."""
        import ray

        if self.closes and self.actors:
            ray.wait([a.close.remote() for a in self.actors], num_returns=len(self.actors), timeout=close_timeout)
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
