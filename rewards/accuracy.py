"""r_acc: what did the model answer, and is it right? Answer extraction (the final answer span,
multiple-choice letters) and one pure scorer per answer type plus a dispatcher.

Pure functions; no model, no Ray. The RL reward, SFT filtering (VARD step 4), eval and serve
all extract through here, so that "what the model answered" means one thing.

math_verify note: its parse/verify timeouts use signal.alarm, which raises ValueError outside
the main thread -- and Ray actors run methods in worker threads. We therefore pass
``parsing_timeout=None`` / ``timeout_seconds=None`` whenever we are not on the main thread
(and keep the 5 s signal timeout on the main thread). Without a timeout, the guard against a
pathological sympy expression is the length cap ``MAX_VERIFY_CHARS`` on what we hand it.
"""
from __future__ import annotations

import math
import re
import threading
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from fractions import Fraction

from math_verify import parse, verify
from math_verify.errors import TimeoutException

# --- the answer span --------------------------------------------------------------------

_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
# \boxed{...} and the \fbox{...} some models write instead.
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} with balanced braces; None if absent or unclosed.

    A regex cannot match nested braces (\\boxed{\\frac{1}{2}}), so scan depth by hand. An
    unclosed box (truncated generation) does not count as an answer.
    """
    starts = [m.end() for m in _BOXED_RE.finditer(text)]
    for start in reversed(starts):
        depth = 1
        for i in range(start, len(text)):
            c = text[i]
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    return text[start:i].strip()
        # this one is unclosed; an earlier, closed box is still a usable answer
    return None


def extract_answer(text: str) -> str | None:
    """The model's final answer: the content of the last ``<answer>...</answer>``, stripped.

    Fallback: the last balanced ``\\boxed{...}`` anywhere in the text; else None. A boxed
    expression inside the answer tag is unwrapped ("<answer>\\boxed{5}</answer>" -> "5"),
    since models trained on math data often box inside the tag. An empty answer tag counts as
    no answer (then the boxed fallback applies).
    """
    if not text:
        return None
    matches = _ANSWER_RE.findall(text)
    if matches:
        ans = matches[-1].strip()
        if ans:
            inner = _last_boxed(ans)
            return inner if inner else ans
    return _last_boxed(text)


# --- multiple choice -------------------------------------------------------------------

# \text{..}-style wrappers around an answer (letters, numbers, words)
_LATEX_WRAP_RE = re.compile(r"\\(?:text|textbf|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
# A bare letter, optionally bracketed, optionally followed by . : or ) -- the whole string.
_BARE_RE = re.compile(r"^[\(\[]?\s*([A-Za-z])\s*[\)\]]?\s*[.:)]?$")
# "B. text", "(B) text", "B) text", "B: text" at the start (capital only: "a. ..." is prose).
_PREFIX_RE = re.compile(r"^(?:\(([A-Z])\)|\[([A-Z])\]|([A-Z])[.:)])\s+\S")
# "answer is B", "Answer: (b)", "option b", "choice C", "correct option is D."
_KEYWORD_RE = re.compile(
    r"\b(?:answer|option|choice)s?\s*(?:is|:|=)?\s*(?:option\s*)?"
    r"[\(\[]?([A-Za-z])[\)\]]?(?![A-Za-z0-9])",
    re.IGNORECASE,
)
# A standalone capital letter (possibly bracketed) not glued to other letters or digits.
_STANDALONE_RE = re.compile(r"(?<![A-Za-z0-9\\])[\(\[]?([A-Z])[\)\]]?(?![A-Za-z0-9'])")


def _keyword_letters(s: str) -> list[str]:
    """Letters after answer/option/choice. A lowercase one only counts bracketed or at the end
    of a clause ("option b", "answer: (b) is right"), so that the article in "the answer is a
    triangle" is not read as option A."""
    out = []
    for m in _KEYWORD_RE.finditer(s):
        c = m.group(1)
        bracketed = m.group(0).endswith((")", "]"))
        if c.islower() and not bracketed and not re.match(r"\s*(?:$|[.,;:!?)\]])", s[m.end():]):
            continue
        out.append(c)
    return out


def _clean(pred: str) -> str:
    s = pred.strip()
    boxed = _last_boxed(s)
    if boxed is not None:
        s = boxed
    s = _LATEX_WRAP_RE.sub(r"\1", s)
    s = s.replace("$", "").replace("**", "").replace("`", "")
    return " ".join(s.split())


def normalise_option_text(s: str) -> str:
    """Loose form for comparing free text with an option: case, spaces, trailing period."""
    s = " ".join(s.strip().lower().split())
    return s.rstrip(".").strip()


def _unique(letters: list[str], valid: set[str]) -> str | None | bool:
    """The one distinct valid letter; None if several (ambiguous); False if none found."""
    found = {c.upper() for c in letters} & valid
    if len(found) == 1:
        return found.pop()
    if len(found) > 1:
        return None
    return False


def extract_choice(pred: str, n_choices: int, choices: list[str] | None = None) -> str | None:
    """A choice letter (``"A"``..) from a short answer string; None when absent or ambiguous.

    Accepts "B", "(B)", "B.", "b", "B. 45°", "Answer: B", "the answer is (b)", "option b",
    "\\boxed{B}", "\\text{B}", or -- when ``choices`` is given -- the exact text of one option
    (case/whitespace/trailing period insensitive). Rules are tried from most to least
    explicit; at each level several distinct letters ("A or B") mean ambiguous -> None,
    rather than silently taking the first. Letters beyond ``n_choices`` are ignored.
    """
    if not pred or n_choices <= 0:
        return None
    n = min(n_choices, 26)
    valid = {chr(ord("A") + i) for i in range(n)}
    s = _clean(pred)
    if not s:
        return None

    m = _BARE_RE.match(s)
    if m:
        c = m.group(1).upper()
        return c if c in valid else None

    m = _PREFIX_RE.match(s)
    if m:
        c = next(g for g in m.groups() if g)
        # "B. 45°" names B; "(A) and (C)" names two, which the later levels call ambiguous
        others = {x for x in _STANDALONE_RE.findall(s[m.end() - 1 :]) if x in valid} - {c}
        if c in valid and not others:
            return c

    if choices:
        target = normalise_option_text(s)
        hits = [i for i, ch in enumerate(choices[:n]) if normalise_option_text(str(ch)) == target]
        if len(hits) == 1:
            return chr(ord("A") + hits[0])
        if len(hits) > 1:
            return None  # duplicate option texts: cannot tell which letter

    for letters in (_keyword_letters(s), _STANDALONE_RE.findall(s)):
        r = _unique(letters, valid)
        if r is not False:
            return r  # a letter, or None when ambiguous
    return None


# --- scoring ------------------------------------------------------------------------------

ANSWER_TYPES = ("choice", "integer", "float", "text")
MAX_VERIFY_CHARS = 1000  # extracted answers are short; longer ones are not worth sympy's time
_MV_TIMEOUT_S = 5

# --- math_verify, thread-safe --------------------------------------------------------------


def _mv_timeout() -> int | None:
    return _MV_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def _looks_mathy(s: str) -> bool:
    # Plain words are not wrapped in $...$: math_verify would read "yes" as e*s*y.
    return bool(re.search(r"[\d\\^_+\-*/=()]", s))


def _mv_parse(s: str) -> list:
    t = _mv_timeout()
    if _looks_mathy(s) and "$" not in s and "\\boxed" not in s:
        # Without math delimiters math_verify grabs the first number it sees: "1+x" -> 1,
        # "2^{10}" -> 2, and misses "x+1" entirely. The answer span is all math, so say so.
        out = parse(f"${s}$", parsing_timeout=t)
        if out:
            return out
    return parse(s, parsing_timeout=t)


def verify_math(pred: str, gold: str) -> bool:
    """math_verify equivalence of two short answer strings; False on any error or timeout."""
    pred, gold = pred.strip(), gold.strip()
    if not pred or not gold or len(pred) > MAX_VERIFY_CHARS or len(gold) > MAX_VERIFY_CHARS:
        return False
    try:
        g, p = _mv_parse(gold), _mv_parse(pred)
        if not g or not p:
            return False
        return bool(verify(g, p, timeout_seconds=_mv_timeout()))  # gold first: not symmetric
    except (Exception, TimeoutException):
        return False


# --- numbers -------------------------------------------------------------------------------

_DECORATION_RE = re.compile(
    r"\^\s*\{?\\circ\}?|\\circ|\\degree|°|\\%|%|\\left|\\right|\\[,;!: ]|\$"
    r"|\b(?:degrees?|deg)\b\.?",
    re.IGNORECASE,
)
_PLAIN_RE = re.compile(r"^[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$")
_THOUSANDS_RE = re.compile(r"^[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_SLASH_RE = re.compile(r"^([+-]?\d+)\s*/\s*(\d+)$")
_NUM = r"[+-]?\d+(?:\.\d+)?"
_FRAC_ARG = rf"(?:\{{\s*({_NUM})\s*\}}|(\d))"  # {3.5} or a single digit (\frac34)
_FRAC_RE = re.compile(rf"^([+-])?\\[dt]?frac\s*{_FRAC_ARG}\s*{_FRAC_ARG}$")
_SPACED_THOUSANDS_RE = re.compile(r"^[+-]?\d{1,3}(?: \d{3})+(?:\.\d+)?$")
# "5 cm", "12 apples", "3.5 m^2": a number followed by a unit word (>= 2 letters, and not a
# math name: "2pi" is not 2).
_UNIT_RE = re.compile(r"^(\S+?)\s*([A-Za-z]{2,})(?:\^\{?\d\}?)?\.?$")
_NOT_UNITS = {"pi", "sqrt", "ln", "log", "sin", "cos", "tan", "exp", "inf", "infty", "nan"}


def _parse_plain_number(s: str) -> Fraction | None:
    if _THOUSANDS_RE.match(s):
        s = s.replace(",", "")
    if _PLAIN_RE.match(s):
        return Fraction(s)
    m = _SLASH_RE.match(s)
    if m and int(m.group(2)) != 0:
        return Fraction(int(m.group(1)), int(m.group(2)))
    m = _FRAC_RE.match(s)
    if m:
        num = Fraction(m.group(2) or m.group(3))
        den = Fraction(m.group(4) or m.group(5))
        if den != 0:
            return -num / den if m.group(1) == "-" else num / den
    return None


def parse_number(s: str) -> Fraction | None:
    """An exact number from a short answer string, or None.

    Handles ints, decimals, scientific notation, thousands separators ("1,000"), fractions
    ("3/4", "\\frac{3}{4}", "\\dfrac34"), degrees ("45°", "45^\\circ", "45 degrees"), percent
    signs, "x = 5" and a trailing unit word ("5 cm"). Anything else is left to math_verify.
    """
    if not s:
        return None
    boxed = _last_boxed(s)
    if boxed is not None:
        s = boxed
    s = _LATEX_WRAP_RE.sub(r" \1", s)
    s = _DECORATION_RE.sub(" ", s)
    if "=" in s:
        s = s.rsplit("=", 1)[1]  # "x = 5": the right-hand side
    s = s.strip().rstrip(".").strip()
    if _SPACED_THOUSANDS_RE.match(s):  # LaTeX "1\,000" became "1 000"
        s = s.replace(" ", "")
    n = _parse_plain_number(s)
    if n is None:
        m = _UNIT_RE.match(s)
        if m and m.group(2).lower() not in _NOT_UNITS:
            n = _parse_plain_number(m.group(1))
    return n


def _mv_number(s: str) -> Fraction | None:
    """A real number via math_verify/sympy (e.g. "\\sqrt{2}", "2^{10}"), or None."""
    if not s.strip() or len(s) > MAX_VERIFY_CHARS:
        return None
    try:
        for item in _mv_parse(s):
            if getattr(item, "is_number", False) and getattr(item, "is_real", False):
                v = float(item.evalf())
                if math.isfinite(v):
                    return Fraction(v)
    except (Exception, TimeoutException):
        return None
    return None


def _round(x: Fraction, p: int) -> Decimal:
    # Half-up on the exact value: round(2.675, 2) on floats gives 2.67, humans expect 2.68.
    d = Decimal(x.numerator) / Decimal(x.denominator)
    return d.quantize(Decimal(1).scaleb(-p), rounding=ROUND_HALF_UP)


def numbers_match(
    pred: Fraction, gold: Fraction, precision: int | None, rel_tol: float = 1e-4
) -> bool:
    """Precision p: equal after rounding both to p decimals. Otherwise an integer gold must be
    hit exactly ("45.0" is fine, "45.01" is not) and a non-integer one within rel_tol."""
    if precision is not None:
        try:
            return _round(pred, precision) == _round(gold, precision)
        except InvalidOperation:  # absurd magnitudes: fall through to tolerance
            pass
    if gold.denominator == 1 and precision is None:
        return pred == gold
    return math.isclose(float(pred), float(gold), rel_tol=rel_tol, abs_tol=1e-12)


# --- scorers ---------------------------------------------------------------------------


def score_numeric(
    pred_text: str, answer: str, precision: int | None = None, rel_tol: float = 1e-4
) -> float:
    """1.0 if the predicted number equals ``answer`` (see ``numbers_match``), else 0.0.

    Own parser first (exact fractions), then sympy's value via math_verify ("\\sqrt{2}"), then
    plain math_verify equivalence for anything neither side could reduce to a number.
    """
    if pred_text is None or answer is None:
        return 0.0
    pred_text, answer = str(pred_text), str(answer)
    gold = parse_number(answer)
    if gold is None:
        gold = _mv_number(answer)
    pred = parse_number(pred_text)
    if pred is None:
        pred = _mv_number(pred_text)
    if gold is not None and pred is not None:
        return 1.0 if numbers_match(pred, gold, precision, rel_tol) else 0.0
    return 1.0 if verify_math(pred_text, answer) else 0.0


def _normalise_text(s: str) -> str:
    s = _LATEX_WRAP_RE.sub(r"\1", s).replace("$", "")
    return normalise_option_text(s)


def score_text(pred_text: str, answer: str) -> float:
    """1.0 if equal after normalisation (case, whitespace, trailing period, $ and \\text{}) or
    math_verify-equivalent ("\\frac{1}{2}" vs "0.5"), else 0.0."""
    if pred_text is None or answer is None:
        return 0.0
    pred_text, answer = str(pred_text), str(answer)
    if _normalise_text(pred_text) and _normalise_text(pred_text) == _normalise_text(answer):
        return 1.0
    return 1.0 if verify_math(pred_text, answer) else 0.0


def _gold_letter(answer: str, choices: list[str] | None) -> str | None:
    a = answer.strip()
    if len(a) == 1 and a.isalpha():
        return a.upper()
    n = len(choices) if choices else 26
    return extract_choice(a, n, choices)  # "(B)", or the option text itself (MathVista style)


def score_choice(pred_text: str, answer_letter: str, choices: list[str] | None = None) -> float:
    """1.0 if the predicted option is ``answer_letter``, else 0.0 (also when ambiguous).

    ``answer_letter`` may also be the correct option's text when ``choices`` is given. Without
    ``choices``, letters up to max(E, the gold letter) are recognised. A prediction that names
    no letter but matches exactly one option's text via ``score_text`` ("0.5" for option
    "\\frac{1}{2}") counts as that option.
    """
    if pred_text is None or answer_letter is None:
        return 0.0
    gold = _gold_letter(str(answer_letter), choices)
    if gold is None:
        return 0.0
    n = len(choices) if choices else max(5, ord(gold) - ord("A") + 1)
    pred = extract_choice(str(pred_text), n, choices)
    if pred is None and choices:
        hits = [i for i, c in enumerate(choices) if score_text(str(pred_text), str(c)) == 1.0]
        if len(hits) == 1:
            pred = chr(ord("A") + hits[0])
    return 1.0 if pred == gold else 0.0


def accuracy_reward(
    response: str,
    answer: str,
    answer_type: str,
    choices: list[str] | None = None,
    precision: int | None = None,
) -> float:
    """r_acc in {0, 1}: extract the final answer from ``response`` and score it by type.

    answer_type: "choice" | "integer" | "float" | "text". "integer" ignores ``precision``;
    "float" uses it when given (MathVista), else a relative tolerance. No extractable answer
    scores 0.
    """
    if answer_type not in ANSWER_TYPES:
        raise ValueError(f"unknown answer_type {answer_type!r}; expected one of {ANSWER_TYPES}")
    pred = extract_answer(response or "")
    if pred is None:
        return 0.0
    if answer_type == "choice":
        return score_choice(pred, answer, choices)
    if answer_type == "integer":
        return score_numeric(pred, answer, None)
    if answer_type == "float":
        return score_numeric(pred, answer, precision)
    return score_text(pred, answer)
