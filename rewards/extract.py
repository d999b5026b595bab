"""Answer extraction from model responses: the final answer span and multiple-choice letters.

Pure string functions; no model, no Ray. The RL reward, SFT filtering (VARD step 4) and
evaluation all go through these, so that "what the model answered" means one thing.
"""
from __future__ import annotations

import re

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
