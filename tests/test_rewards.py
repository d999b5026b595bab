"""Fast tests of the rewards package (no Ray, no model)."""
from __future__ import annotations

import math
import threading
from fractions import Fraction

import numpy as np
import pytest
import torch

from avar_ray.config import RewardConfig
from rewards import (
    accuracy_reward,
    combine_rewards,
    extract_answer,
    extract_choice,
    format_reward,
    normalise_visual,
    parse_number,
    score_choice,
    score_numeric,
    score_text,
    visual_ratio,
    is_correct,
)

# --- extraction --------------------------------------------------------------------------


def test_extract_answer_last_tag_wins():
    text = "<think>maybe <answer>1</answer>?</think><answer> 2 </answer> <answer>\n3\n</answer>"
    assert extract_answer(text) == "3"


def test_extract_answer_boxed_nested_braces():
    assert extract_answer(r"so \boxed{\frac{1}{2}} is it") == r"\frac{1}{2}"
    # last box wins; an unclosed (truncated) last box falls back to the earlier closed one
    assert extract_answer(r"\boxed{1} then \boxed{\sqrt{4}}") == r"\sqrt{4}"
    assert extract_answer(r"\boxed{7} and \boxed{\frac{1}{2}") == "7"
    # a box inside the answer tag is unwrapped
    assert extract_answer(r"<answer>The answer is \boxed{\{1,2\}}</answer>") == r"\{1,2\}"


def test_extract_answer_absent():
    assert extract_answer("no tags at all, the answer is 5") is None
    assert extract_answer("") is None
    assert extract_answer("<answer>  </answer>") is None
    assert extract_answer("<answer>5") is None  # unclosed tag
    assert extract_answer(r"<answer></answer> \boxed{4}") == "4"


@pytest.mark.parametrize(
    "pred,expected",
    [
        ("B", "B"),
        ("b", "B"),
        ("(B)", "B"),
        ("[C]", "C"),
        ("B.", "B"),
        ("B)", "B"),
        ("Answer: B", "B"),
        ("The answer is (b) clearly", "B"),
        ("The correct answer is option D.", "D"),
        ("option b", "B"),
        ("choice: c", "C"),
        ("B. 45°", "B"),
        (r"\boxed{C}", "C"),
        (r"$\text{D}$", "D"),
        ("**A**", "A"),
        ("I think B", "B"),  # "I" is not one of 4 options
        # ambiguous or absent -> None
        ("A or B", None),
        ("(A) and (C)", None),
        ("Answer: A, answer: C", None),
        ("the answer is a triangle", None),  # article, not option A
        ("E", None),  # out of range for 4 options
        ("42", None),
        ("", None),
    ],
)
def test_extract_choice_surface_forms(pred, expected):
    assert extract_choice(pred, 4) == expected


def test_extract_choice_option_text():
    choices = ["30°", "45°", "60°", "90°"]
    assert extract_choice("45°", 4, choices) == "B"
    assert extract_choice(" 60° .", 4, choices) == "C"
    assert extract_choice("50°", 4, choices) is None
    assert extract_choice("yes", 2, ["Yes", "yes"]) is None  # duplicate texts: ambiguous


# --- accuracy ----------------------------------------------------------------------------


def test_score_choice():
    choices = ["1/3", r"\frac{1}{2}", "1", "2"]
    assert score_choice("B", "B", choices) == 1.0
    assert score_choice("(b)", "B", choices) == 1.0
    assert score_choice("C", "B", choices) == 0.0
    assert score_choice("A or B", "B", choices) == 0.0  # ambiguous -> 0
    assert score_choice("0.5", "B", choices) == 1.0  # option text via math_verify
    assert score_choice("B", r"\frac{1}{2}", choices) == 1.0  # gold given as option text
    assert score_choice("B", "B", None) == 1.0


def test_parse_number_forms():
    assert parse_number("3/4") == parse_number(r"\frac{3}{4}") == parse_number(r"\dfrac34") == 0.75
    assert parse_number("-\\frac{3}{4}") == -0.75
    for s in ["45°", r"45^\circ", r"45^{\circ}", "45 degrees", "x = 45", "45 cm", "$45$"]:
        assert parse_number(s) == 45, s
    assert parse_number("1,234,567") == 1234567
    assert parse_number(r"1\,000") == 1000
    assert parse_number("1e-3") == Fraction(1, 1000)
    assert parse_number("2pi") is None  # not "2 with unit pi"
    assert parse_number("3 4") is None


def test_score_numeric_precision_mathvista():
    # precision 1 and 2 as in MathVista float questions; rounding is half-up on exact values
    assert score_numeric("1.45", "1.5", 1) == 1.0
    assert score_numeric("1.44", "1.5", 1) == 0.0
    assert score_numeric("2.675", "2.68", 2) == 1.0  # float round() would give 2.67
    assert score_numeric("1.449", "1.45", 2) == 1.0
    assert score_numeric("1.44", "1.45", 2) == 0.0
    assert score_numeric("0.33", "1/3", 2) == 1.0
    assert score_numeric(r"\sqrt{2}", "1.41", 2) == 1.0  # sympy value via math_verify


def test_score_numeric_no_precision():
    assert score_numeric("45", "45", None) == 1.0
    assert score_numeric("45.0", "45", None) == 1.0
    assert score_numeric("45.01", "45", None) == 0.0  # integer gold: exact
    assert score_numeric("0.333333", "1/3", None) == 1.0  # float gold: rel tol 1e-4
    assert score_numeric("0.33", "1/3", None) == 0.0
    assert score_numeric("3/4", "0.75", None) == 1.0
    assert score_numeric(r"\frac{3}{4}", "0.75", None) == 1.0
    assert score_numeric("45°", "45", None) == 1.0
    assert score_numeric("1,000", "1000", None) == 1.0
    assert score_numeric("2^{10}", "1024", None) == 1.0
    assert score_numeric("banana", "4", None) == 0.0


def test_score_text():
    assert score_text(r"\frac{1}{2}", "0.5") == 1.0
    assert score_text("0.5", r"\frac{1}{2}") == 1.0
    assert score_text("x+1", "1+x") == 1.0
    assert score_text("  Yes. ", "yes") == 1.0
    assert score_text("Paris", "London") == 0.0
    assert score_text("yes", "sey") == 0.0  # math_verify would call $yes$ == $sey$ (e*s*y)
    assert score_text(r"\frac{1}{3}", "0.5") == 0.0


def test_accuracy_reward_dispatch():
    r = "<think>...</think><answer>{}</answer>"
    assert accuracy_reward(r.format("B"), "B", "choice", ["a", "b", "c"]) == 1.0
    assert accuracy_reward(r.format("7"), "7", "integer") == 1.0
    assert accuracy_reward(r.format("7.2"), "7", "integer", precision=0) == 0.0  # precision ignored
    assert accuracy_reward(r.format("3.14159"), "3.14", "float", precision=2) == 1.0
    assert accuracy_reward(r.format("3.15"), "3.14", "float", precision=2) == 0.0
    assert accuracy_reward(r.format(r"\frac{1}{2}"), "0.5", "text") == 1.0
    assert accuracy_reward("no answer here", "7", "integer") == 0.0
    with pytest.raises(ValueError, match="'multi'"):
        accuracy_reward(r.format("7"), "7", "multi")


def test_math_verify_default_timeout_breaks_in_threads():
    """Why the timeout arguments matter: math_verify's signal timeout refuses threads."""
    from math_verify import parse

    err: list[BaseException] = []

    def run():
        try:
            parse("$x+1$")
        except BaseException as e:  # noqa: BLE001
            err.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert err and isinstance(err[0], ValueError)


def test_accuracy_reward_in_non_main_thread():
    # Cases only math_verify can settle, so a swallowed threading error would show as 0.0.
    cases = [
        ("<answer>\\frac{1}{2}</answer>", "0.5", "text", None, None),
        ("<answer>x+1</answer>", "1+x", "text", None, None),
        ("<answer>\\sqrt{2}</answer>", "1.41", "float", None, 2),
        ("<answer>0.5</answer>", "B", "choice", ["1/3", r"\frac{1}{2}"], None),
    ]
    results: list[float] = []
    errors: list[BaseException] = []

    def run():
        try:
            for resp, ans, typ, ch, p in cases:
                results.append(accuracy_reward(resp, ans, typ, ch, p))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join(timeout=60)
    assert not t.is_alive()
    assert not errors
    assert results == [1.0] * len(cases)


# --- format ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "resp",
    [
        "<think>reason</think><answer>5</answer>",
        "  <think>\nreason\n</think>\n\n<answer> 5 </answer>\n",
        "<think>r</think><answer>5</answer><|im_end|>",
        "<think>r</think> <answer>5</answer>\n<|endoftext|>\n",
        "<think></think><answer>5</answer>",
    ],
)
def test_format_reward_positive(resp):
    assert format_reward(resp) == 1.0


@pytest.mark.parametrize(
    "resp",
    [
        "",
        "<answer>5</answer>",  # no think
        "<think>r</think>",  # no answer
        "<think>r</think><answer>  </answer>",  # empty answer
        "Sure! <think>r</think><answer>5</answer>",  # text before <think>
        "<think>r</think><answer>5</answer> done.",  # text after </answer>
        "<think>r</think>so<answer>5</answer>",  # text between the blocks
        "<answer>5</answer><think>r</think>",  # wrong order
        "<think>r</think><answer>4</answer><answer>5</answer>",  # two answers
        "<think>a<think>b</think><answer>5</answer>",  # nested think
        "<think>r<answer>4</answer></think><answer>5</answer>",  # answer inside think
        "<think>r</think><answer>5</answer><|im_end|><|im_end|>",  # two end tokens
        "<think>r<answer>5</answer>",  # unclosed think
    ],
)
def test_format_reward_negative(resp):
    assert format_reward(resp) == 0.0


# --- visual ------------------------------------------------------------------------------


def _direct_ratio(v: np.ndarray, s: np.ndarray, eps: float, layers=None) -> float:
    L, H, T = v.shape
    ls = range(L) if layers is None else layers
    total = 0.0
    for t in range(T):
        per_layer = []
        for l in ls:
            abar_v = sum(v[l, h, t] for h in range(H)) / H
            abar_s = sum(s[l, h, t] for h in range(H)) / H
            per_layer.append(abar_v / (abar_s + eps))
        total += sum(per_layer) / len(per_layer)
    return total / T


def test_visual_ratio_matches_direct_numpy():
    rng = np.random.default_rng(0)
    L, H, T = 4, 3, 5
    v = rng.uniform(0.0, 0.5, size=(L, H, T))
    s = rng.uniform(0.01, 0.5, size=(L, H, T))
    eps = 1e-6
    want = _direct_ratio(v, s, eps)
    assert visual_ratio(v, s, eps=eps) == pytest.approx(want, rel=1e-12)
    # torch input (bf16 not used: precision), same value
    vt, st = torch.tensor(v, dtype=torch.float32), torch.tensor(s, dtype=torch.float32)
    got_t = visual_ratio(vt, st)
    assert got_t == pytest.approx(want, rel=1e-5)
    # a mean of per-(layer, token) ratios differs from a ratio of means
    assert want != pytest.approx(v.mean() / (s.mean() + eps), rel=1e-6)
    # layer subset (negative index allowed)
    want_sub = _direct_ratio(v, s, eps, layers=[0, 3])
    assert visual_ratio(v, s, eps, layers=[0, -1]) == pytest.approx(want_sub, rel=1e-12)
    assert want_sub != pytest.approx(want, rel=1e-6)


def test_visual_ratio_edges_and_the_correct_threshold():
    rng = np.random.default_rng(1)
    v = rng.uniform(size=(2, 2, 3))
    s = rng.uniform(0.1, 1.0, size=(2, 2, 3))
    raw = visual_ratio(v, s)
    assert raw > 0
    assert is_correct(1.0) and is_correct(0.5) and not is_correct(0.0) and not is_correct(0.49)
    assert is_correct(np.array([0.0, 1.0])).tolist() == [False, True]
    assert visual_ratio(np.zeros((2, 2, 0)), np.zeros((2, 2, 0))) == 0.0
    assert visual_ratio(np.ones((1, 1, 1)), np.zeros((1, 1, 1)), eps=1e-6) == pytest.approx(1e6)
    with pytest.raises(ValueError):
        visual_ratio(np.ones((2, 2, 3)), np.ones((2, 3, 3)))
    with pytest.raises(ValueError):
        visual_ratio(np.ones((2, 3)), np.ones((2, 3)))


# --- combine -----------------------------------------------------------------------------


def test_normalise_visual_modes():
    r = np.array([0.0, 1.0, 9.0])
    assert np.array_equal(normalise_visual(r, "none"), r)
    assert np.allclose(normalise_visual(r, "squash"), [0.0, 0.5, 0.9])
    with pytest.raises(ValueError, match="group_ids"):
        normalise_visual(r, "group_z")
    with pytest.raises(ValueError, match="'minmax'"):
        normalise_visual(r, "minmax")  # type: ignore[arg-type]


def test_group_z_hand_checked():
    # group 0: correct visuals 10, 20, 30 (one wrong = 0); group 1: correct 5, 7; group 2: one
    r_vis = np.array([10.0, 20.0, 0.0, 30.0, 5.0, 0.0, 7.0, 12.0])
    gid = np.array([0, 0, 0, 0, 1, 1, 1, 2])
    z = normalise_visual(r_vis, "group_z", group_ids=gid, eps=0.0)
    k = math.sqrt(1.5)  # (30 - 20) / std(10, 20, 30) with ddof=0 = 10 / sqrt(200/3)
    assert np.allclose(z, [-k, 0.0, 0.0, k, -1.0, 0.0, 1.0, 0.0])


def test_group_z_treats_float_noise_as_no_spread():
    """Identical answers scored in different batches differ by float32 noise (~1e-7 in r_visual):
    that is no spread, so their z and totals are equal (the z-score made the noise +-0.17 of
    the totals); a spread of 1e-3 relative is still a difference."""
    noisy = 8.0 + np.array([0.0, 1.3e-7, -0.9e-7, 2.1e-7, 0.0])
    acc = np.array([1.0, 1.0, 1.0, 1.0, 0.0])
    gid = np.zeros(5)
    totals = combine_rewards(acc, np.ones(5), noisy * acc, **{**PAPER, "visual_norm": "group_z"}, group_ids=gid)
    assert np.array_equal(totals, [1.1, 1.1, 1.1, 1.1, 0.1])
    z = normalise_visual(noisy[:2] + np.array([0.0, 8e-3]), "group_z", group_ids=np.zeros(2), eps=0.0)
    assert np.allclose(z, [-1.0, 1.0])
    assert np.allclose(normalise_visual(np.array([1e-9, 3e-9]), "group_z", group_ids=np.zeros(2), eps=0.0), [-1.0, 1.0])


# the rl.reward defaults (SPEC.md §5: lambda_v 0.3, lambda_f 0.1, raw r_visual), from the schema
PAPER = {k: getattr(RewardConfig(), k) for k in ("lambda_v", "lambda_f", "visual_norm", "accuracy_weight")}


def test_combine_rewards_each_norm():
    acc = np.array([1.0, 1.0, 0.0, 1.0])
    fmt = np.array([1.0, 0.0, 1.0, 1.0])
    vis = np.array([10.0, 20.0, 0.0, 30.0])
    gid = np.array([0, 0, 0, 0])
    raw = combine_rewards(acc, fmt, vis, **PAPER)
    assert np.allclose(raw, [1 + 3.0 + 0.1, 1 + 6.0, 0.1, 1 + 9.0 + 0.1])
    sq = combine_rewards(acc, fmt, vis, **{**PAPER, "lambda_v": 0.5, "lambda_f": 0.2, "visual_norm": "squash"})
    want_sq = [1 + 0.5 * 10 / 11 + 0.2, 1 + 0.5 * 20 / 21, 0.2, 1 + 0.5 * 30 / 31 + 0.2]
    assert np.allclose(sq, want_sq)
    gz = combine_rewards(acc, fmt, vis, **{**PAPER, "visual_norm": "group_z"}, group_ids=gid)
    k = math.sqrt(1.5)
    assert np.allclose(gz, [1 - 0.3 * k + 0.1, 1.0, 0.1, 1 + 0.3 * k + 0.1], atol=1e-6)
    # correct set comes from r_acc: a correct rollout with zero visual still counts
    gz2 = combine_rewards(
        np.ones(2), np.zeros(2), np.array([0.0, 2.0]), **{**PAPER, "visual_norm": "group_z"}, group_ids=np.zeros(2)
    )
    assert np.allclose(gz2, [1 - 0.3, 1 + 0.3], atol=1e-5)
    with pytest.raises(ValueError):
        combine_rewards(acc, fmt[:3], vis, **PAPER)
