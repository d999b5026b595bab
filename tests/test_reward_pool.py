"""The reward actor's scoring pool (``actors.reward_pool``; no Ray): two processes score a
step's answers as the pure scorers do one by one, in order; an answer past the time limit is
killed from whatever thread runs the pool, scores 0 with the timeout error, and the pool goes
on with a fresh process."""
from __future__ import annotations

import threading
import time

import pytest

from actors.reward_pool import VERIFY_TIMEOUT, TextScorerPool, text_rewards


def hang_on_request(text: str, *job):
    """``text_rewards``, except that a response saying "hang" never finishes."""
    if text == "hang":
        time.sleep(600)
    return text_rewards(text, *job)


JOBS = [(r"<think>x</think><answer>\frac{1}{2}</answer>", "0.5", "float", None, None),
        ("<think>x</think><answer>B</answer>", "B", "choice", ["1", "2", "3"], None),
        ("<answer>7</answer>", "8", "integer", None, None),
        ("no answer at all", "3", "integer", None, None),
        (r"<think>x</think><answer>x^2+2x+1</answer>", "(x+1)^2", "text", None, None),
        ("<answer>1</answer>", "1", "no such type", None, None)] * 3


def test_pool_scores_in_order_and_kills_an_answer_past_its_time_limit():
    serial = [text_rewards(*job) for job in JOBS[:6]]
    assert {r[:2] for r in serial} >= {(1.0, 1.0), (0.0, 0.0)} and serial[5][2]  # right, wrong, an error
    pool = TextScorerPool(2, timeout_s=60.0, fn=hang_on_request)  # generous: sympy on a loaded machine
    try:
        assert pool.score(JOBS) == [text_rewards(*job) for job in JOBS]  # the serial scorers, in order
        pool.timeout_s = 2.0  # the quick answers below take milliseconds
        jobs = JOBS[:2] + [("hang", "1", "integer", None, None)] + JOBS[2:4] + JOBS[:2]
        result: dict = {}
        # off the main thread, as in a Ray actor (math_verify's signal.alarm limit would not work there)
        labels = [f"s{i}" for i in range(len(jobs))]
        thread = threading.Thread(target=lambda: result.update(out=pool.score(jobs, labels)))
        start = time.monotonic()
        thread.start()
        thread.join(timeout=60)
        assert not thread.is_alive() and time.monotonic() - start < 30
        out = result["out"]
        assert out[2][:2] == (0.0, 0.0) and out[2][2].startswith(VERIFY_TIMEOUT)
        assert out[:2] + out[3:] == [text_rewards(*job) for job in JOBS[:4] + JOBS[:2]]
        assert pool.timeouts == 1 and len(pool.workers) == 2
        assert pool.score(JOBS[:4]) == [text_rewards(*job) for job in JOBS[:4]]  # the replacement serves
    finally:
        pool.close()


def test_pool_needs_a_worker():
    with pytest.raises(ValueError, match="reward_workers"):
        TextScorerPool(0, 1.0)
