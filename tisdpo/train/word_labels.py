"""Per-token labels from per-word classes, shared by the built-in synthetic tasks.

A completion's tokens are decoded piece by piece; each letter run of the decoded text is a
word, and every token gets the class of the first classified word its characters touch
(+1 good, −1 bad, 0 neutral or special).
"""
from __future__ import annotations

import re
from typing import Callable

__all__ = ["WORD_RE", "word_labels"]

WORD_RE = re.compile(r"[A-Za-z]+")


def word_labels(ids, tokenizer, classify: Callable[[str], int]) -> list[int]:
    """``classify(word)`` of the word each token of ``ids`` is part of (0 for special ids)."""
    ids = [int(i) for i in ids]
    special = set(tokenizer.all_special_ids)
    pieces = ["" if i in special else tokenizer.decode([i]) for i in ids]
    text = "".join(pieces)
    char_cls = [0] * len(text)
    for m in WORD_RE.finditer(text):
        c = classify(m.group())
        for k in range(m.start(), m.end()):
            char_cls[k] = c
    labels, pos = [], 0
    for piece in pieces:
        span = char_cls[pos:pos + len(piece)]
        labels.append(next((c for c in span if c != 0), 0))
        pos += len(piece)
    return labels
