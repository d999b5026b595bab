"""Rule-based visual-anchor insertion (VARD step 3 without a teacher, or its fallback).

Pure functions: a reasoning chain, anchor phrases and relative positions in, a chain out.
Anchors go between sentences, never after the closing "The answer is ..." sentence, and the
choice of phrases is seeded by the row id, so reruns give the same text.
"""
from __future__ import annotations

import random
import re
from typing import Sequence

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=\S)")
_ELEMENTS_LINE = re.compile(r"^\s*Elements:\s*(.+)$", re.MULTILINE | re.IGNORECASE)
_ANCHOR_HINT = re.compile(r"\b(look(ing)? at|checking the image|in the image|the image shows|"
                          r"back to the (image|figure|picture))\b", re.IGNORECASE)


def split_sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_END.split(text.strip()) if s]


def caption_anchor_phrases(caption: str) -> list[str]:
    """Anchors that name elements of a caption: its "Elements:" items, else its sentences."""
    match = _ELEMENTS_LINE.search(caption or "")
    if match:
        items = [i.strip().rstrip(".") for i in match.group(1).split(";")]
        return [f"Checking the image: {i}." for i in items if i]
    return [f"Let me look at the image again: {s.rstrip('.')}." for s in split_sentences(caption or "")]


def has_anchor(text: str) -> bool:
    """Whether a chain already refers back to the image (a teacher did its job)."""
    return bool(_ANCHOR_HINT.search(text or ""))


def insert_anchors(chain: str, phrases: Sequence[str], positions: Sequence[float], seed_key: str) -> str:
    """Insert one phrase at each relative position (0..1 of the sentence boundaries), while the
    phrases last (positions beyond them are left empty).

    The last sentence (the final answer) stays last; positions that land on the same boundary
    insert their phrases there in order. Without phrases or sentences the chain is unchanged.
    """
    sentences = split_sentences(chain)
    if not phrases or not sentences or not positions:
        return chain.strip()
    rng = random.Random(f"avar-anchor-{seed_key}")
    pool = list(phrases)
    rng.shuffle(pool)
    picks = pool[:len(positions)]  # no phrase twice: a repeated anchor re-reads nothing new
    if len(sentences) == 1:  # nothing before the answer sentence: anchor ahead of it
        return " ".join(picks + sentences)
    # boundary b means "after sentence b"; the last one allowed is just before the final sentence
    inserts: dict[int, list[str]] = {}
    for p, phrase in zip(positions, picks):
        b = min(max(1, round(p * len(sentences))), len(sentences) - 1)
        inserts.setdefault(b, []).append(phrase)
    out: list[str] = []
    for i, sentence in enumerate(sentences, start=1):
        out.append(sentence)
        out.extend(inserts.get(i, []))
    return " ".join(out)
