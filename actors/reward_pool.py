"""The text rewards of a step scored by a pool of processes (issue 24): ``rl.placement.reward_workers``
processes inside the reward actor, each answer under a time limit (``rl.reward.verify_timeout_s``)
that holds whatever thread calls the pool (math_verify's own limit is a ``signal.alarm``: main
thread only). A verification that overruns has its process killed and replaced; it scores 0 with
the error ``VERIFY_TIMEOUT`` (so the step counts it: ``reward/verify_timeouts``).

Spawned, not forked: the reward actor runs Ray's threads. Each process imports the rewards
before it reports ready, so an answer's clock never includes start-up.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import time
from collections import deque
from multiprocessing.connection import wait
from typing import Callable, Sequence

log = logging.getLogger(__name__)

VERIFY_TIMEOUT = "verify timeout"  # the error of an answer whose verification was killed
AHEAD = 4  # jobs in a process's pipe at once (small: a full pipe would block the sender)


def text_rewards(text: str, answer: str, answer_type: str, choices, precision) -> tuple[float, float, str]:
    """``(r_acc, r_format, error)`` of one response (SPEC.md §5's text rewards, ``rewards``); a
    scorer that raises gives ``(0, 0, message)``."""
    from rewards import accuracy_reward, format_reward

    try:
        acc = accuracy_reward(text, answer, answer_type, choices or None, precision)
        return float(acc), float(format_reward(text)), ""
    except Exception as exc:  # noqa: BLE001 - one rollout's failure, not the step's
        return 0.0, 0.0, f"{type(exc).__name__}: {exc}"


def _serve(conn, fn: Callable) -> None:
    import rewards  # noqa: F401 - sympy and math_verify loaded before the first answer's clock

    conn.send("ready")
    while True:
        try:
            job = conn.recv()
        except EOFError:  # the pool (or its actor) is gone
            return
        conn.send(fn(*job))


class _Worker:
    def __init__(self, ctx, fn: Callable):
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child, fn), daemon=True)
        self.process.start()
        child.close()
        self.inflight: deque[int] = deque()  # jobs sent, oldest (the one in hand) first
        self.deadline = 0.0  # for the job in hand

    def ready(self) -> None:
        if self.conn.recv() != "ready":
            raise RuntimeError("reward worker: unexpected first message")

    def stop(self) -> None:
        self.conn.close()
        self.process.kill()
        self.process.join()


class TextScorerPool:
    """``workers`` scoring processes; ``score`` keeps them all busy and returns in job order."""

    def __init__(self, workers: int, timeout_s: float, fn: Callable = text_rewards):
        if workers < 1:
            raise ValueError(f"rl.placement.reward_workers must be >= 1, got {workers}")
        self.ctx, self.fn, self.timeout_s = mp.get_context("spawn"), fn, float(timeout_s)
        self.workers = [_Worker(self.ctx, fn) for _ in range(workers)]
        for w in self.workers:
            w.ready()
        self.timeouts = 0  # answers killed since the pool started

    def _replace(self, k: int) -> None:
        self.workers[k].stop()
        self.workers[k] = _Worker(self.ctx, self.fn)
        self.workers[k].ready()

    def score(self, jobs: Sequence[tuple], labels: Sequence[str] = ()) -> list:
        """``fn(*job)`` per job, in order; a job past the time limit gives ``(0, 0, VERIFY_TIMEOUT
        ...)``. ``labels`` name the jobs in the log (sample ids). Each process has up to
        ``AHEAD`` jobs in its pipe, so it never waits for this thread between answers; an
        answer's clock starts when the one before it is back."""
        out: list = [None] * len(jobs)
        queue = deque(range(len(jobs)))
        while queue or any(w.inflight for w in self.workers):
            for w in self.workers:
                while len(w.inflight) < AHEAD and queue:
                    if not w.inflight:
                        w.deadline = time.monotonic() + self.timeout_s
                    w.inflight.append(queue.popleft())
                    w.conn.send(jobs[w.inflight[-1]])
            busy = [w for w in self.workers if w.inflight]
            ready = wait([w.conn for w in busy], timeout=max(0.0, min(w.deadline for w in busy) - time.monotonic()))
            for k, w in enumerate(self.workers):
                if not w.inflight or (w.conn not in ready and time.monotonic() < w.deadline):
                    continue
                try:
                    while w.inflight and w.conn.poll():
                        out[w.inflight.popleft()] = w.conn.recv()
                        w.deadline = time.monotonic() + self.timeout_s
                    if not w.inflight or time.monotonic() < w.deadline:
                        continue
                except EOFError:  # the process died on this answer: as a timeout
                    pass
                index = w.inflight.popleft()
                label = labels[index] if labels else str(index)
                log.warning("reward: verification of %s killed after %.1f s (scored 0)", label, self.timeout_s)
                out[index] = (0.0, 0.0, f"{VERIFY_TIMEOUT} after {self.timeout_s:g} s")
                self.timeouts += 1
                queue.extendleft(reversed(w.inflight))  # its other jobs go to the front again
                self._replace(k)
        return out

    def close(self) -> None:
        for w in self.workers:
            w.stop()
        self.workers = []
