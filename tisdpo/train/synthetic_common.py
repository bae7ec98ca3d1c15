"""What the two built-in synthetic tasks share: per-token labels from per-word classes, the
preference record of two scored responses, and the size checks.

A completion's tokens are decoded piece by piece; each letter run of the decoded text is a
word, and every token gets the class of the first classified word its characters touch
(+1 good, −1 bad, 0 neutral or special).
"""
from __future__ import annotations

import re
from typing import Callable

__all__ = ["WORD_RE", "word_labels", "preference_record", "check_sizes"]

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


def preference_record(prompt: str, a: str, b: str, score: Callable[[str], int],
                      chat: bool) -> dict | None:
    """The record of responses ``a`` and ``b`` to ``prompt``: the higher ``score`` is chosen;
    ``chosen_balance``/``rejected_balance`` hold the scores; chat messages with ``chat``.
    None on a tie."""
    ba, bb = score(a), score(b)
    if ba == bb:
        return None
    (chosen, bc), (rejected, br) = sorted([(a, ba), (b, bb)], key=lambda x: -x[1])
    if chat:
        rec = {"prompt": [{"role": "user", "content": prompt}],
               "chosen": [{"role": "assistant", "content": chosen}],
               "rejected": [{"role": "assistant", "content": rejected}]}
    else:
        rec = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    rec.update(chosen_balance=bc, rejected_balance=br)
    return rec


def check_sizes(n_train, n_test) -> None:
    for name, v in (("n_train", n_train), ("n_test", n_test)):
        if not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be a non-negative int, got {v!r}")
