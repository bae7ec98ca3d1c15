"""Span-level token scores and weight balance, around the weight rule (the ``weights`` stage
and ``policy.token_weights=recompute``, :mod:`tisdpo.pipeline.weights`).

Spans (``weights.span``, :func:`pool_spans`): the rule may see each token's c_t pooled over a
*span* of tokens instead of c_t itself — for quality that a word's pieces carry together
(a piece's c_t also depends on its position in the word: on the hard synthetic task first
pieces average c_t ≈ −3 on both sides, and per-token rank weights then favour later pieces in
chosen and first pieces in rejected responses, whatever the word).

- ``token`` (default): no pooling; the weights are bitwise those without this option.
- ``word``: spans are words, found from the completion's token ids alone
  (:func:`word_span_ids`): the decoded pieces (a ``Ġ``/``▁`` leading-space mark counts as a
  space) are joined and cut into segments — leading whitespace plus a run of letters/digits,
  or plus a run of other symbols — and each token belongs to the segment its first character
  is in. The first completion token always starts a word; special tokens (EOS) are spans of
  their own. A piece of a multi-byte character (decoded U+FFFD) and a combining mark (Unicode
  category M: Devanagari vowel signs, a decomposed accent) count as letters. Text
  without spaces between words (Chinese, Japanese) becomes one span per run: use ``column``.
- ``column``: spans come with the records, in the int list columns ``chosen_span`` /
  ``rejected_span``: one id per completion token, aligned like every per-token column of
  ``tisdpo.train.data`` (the response's tokens as ``tokenize_pairs`` makes them, plus EOS
  when the method counts it), e.g. ``[0, 0, 0, 1, 2, 2, -1]``. Tokens of one response with
  the same id form one span (they need not be adjacent); a negative id is a span of its own.

``weights.span_reduce``: ``sum`` gives every token of a span the span's summed c_t, ``mean``
its mean c_t. The pooled score is the rule's input (with rank_based, the pieces of a word
tie, and ties keep their order). The stored ``*_score`` columns stay the raw per-token c_t;
with ``span=word`` the stage also writes the word ids it used as ``chosen_span`` /
``rejected_span`` (replacing any in the data; −1 on tokens cut by ``data.max_length``), so
``pool_spans(score, span, ...)`` reproduces the rule's input and recompute pools the same
words. Not with cDPO, whose scores are log-scores, not c_t.

Balance (``weights.balance``, :func:`balance_weights`), after the rule:

- ``none`` (default): the rule's weights as they are;
- ``sequence``: each response's weights divided by their mean (mean 1 over its tokens);
- ``side``: every chosen weight of a split (train, eval) divided by the mean over all chosen
  tokens of the split, every rejected weight by the mean over all rejected tokens (each
  side's mean is 1; how much one response weighs against another is kept).

The weights stage and recompute (given the tokens truncation keeps) balance over the kept
tokens alone: tokens cut by ``data.max_length`` neither count nor change (they were not
scored: their weight is NaN, never read).
A side or response whose mean weight is not positive (a rule that gives 0 or negative
weights) is an error.
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

import numpy as np
import torch
from tisdpo_kernels.config import WeightParams

from tisdpo.pipeline.context import WEIGHT_COLUMNS

__all__ = ["SPAN_COLUMNS", "RuleParams", "word_span_ids", "pool_spans", "balance_weights",
           "span_rows"]

SPAN_COLUMNS = ("chosen_span", "rejected_span")
#: optional whitespace, then a run of letters/digits (U+FFFD: a piece of a multi-byte
#: character), a run of other symbols, or underscores; or trailing whitespace
_SEGMENT_RE = re.compile(r"\s*(?:(?:[^\W_]|\ufffd)+|[^\w\s\ufffd]+|_+)|\s+")
_SPACE_MARKS = ("\u0120", "\u2581")         # byte-level "Ġ", SentencePiece "▁"


@dataclass(frozen=True)
class RuleParams(WeightParams):
    """``WeightParams`` plus the options applied around the rule (``weights.span``,
    ``weights.span_reduce``, ``weights.balance``); the kernels read only the rule's fields."""

    span: str = "token"
    span_reduce: str = "sum"
    balance: str = "none"


def word_span_ids(ids, tokenizer) -> list[int]:
    """Word index (0, 1, ...) of each token of a completion (see the module docstring)."""
    special = set(tokenizer.all_special_ids)
    out: list[int] = []
    run: list[str] = []                        # pieces of the current text between specials

    def close():
        # marks are no \w in re: as letters, so 'नमस्ते' or 'e\u0301cole' stays one word
        text = "".join("a" if unicodedata.category(c)[0] == "M" else c for c in "".join(run))
        starts = [m.start() for m in _SEGMENT_RE.finditer(text)]
        base, pos = (out[-1] + 1 if out else 0), 0
        for piece in run:
            out.append(base + max(0, int(np.searchsorted(starts, pos, side="right")) - 1))
            pos += len(piece)
        run.clear()

    for i in (int(x) for x in ids):
        if i in special:
            close()
            out.append(out[-1] + 1 if out else 0)
            continue
        piece = tokenizer.decode([i])
        mark = tokenizer.convert_ids_to_tokens(i) or ""
        if mark[:1] in _SPACE_MARKS and not piece[:1].isspace():
            piece = " " + piece                # a SentencePiece decode drops the leading space
        run.append(piece)
    close()
    return out


def pool_spans(scores: torch.Tensor, span_ids, seq_ids, reduce: str = "sum") -> torch.Tensor:
    """Each token's score replaced by the sum (or mean) over its span: the tokens of one
    sequence (``seq_ids``) with the same ``span_ids`` value; a negative id is a span of its
    own. Accumulates in float64; returns the scores' dtype (a one-token span keeps its
    value exactly)."""
    if reduce not in ("sum", "mean"):
        raise ValueError(f"weights.span_reduce must be sum or mean, got {reduce!r}")
    span_ids = torch.as_tensor(span_ids).long().reshape(-1)
    seq_ids = torch.as_tensor(seq_ids).long().reshape(-1)
    if not span_ids.numel() == seq_ids.numel() == scores.numel():
        raise ValueError(f"pool_spans: {scores.numel()} scores, {span_ids.numel()} span ids, "
                         f"{seq_ids.numel()} sequence ids")
    if scores.numel() == 0:
        return scores.clone()
    own = -1 - torch.arange(span_ids.numel())
    keys = torch.stack([seq_ids, torch.where(span_ids < 0, own, span_ids)], 1)
    _, inv = torch.unique(keys, dim=0, return_inverse=True)
    n = int(inv.max()) + 1
    total = torch.zeros(n, dtype=torch.float64).index_add_(0, inv, scores.double().reshape(-1))
    if reduce == "mean":
        total = total / torch.bincount(inv, minlength=n).double()
    return total[inv].to(scores.dtype).view(scores.shape)


def _mean(values, what: str, mode: str) -> float:
    m = float(np.mean(values)) if len(values) else 1.0
    if not np.isfinite(m) or m <= 0:
        raise ValueError(f"weights.balance={mode}: {what} has mean weight {m:g}; only a "
                         f"positive mean can be rescaled to 1")
    return m


def balance_weights(ds, mode: str, *, names=None, kept=None):
    """``ds`` (a ``datasets.Dataset`` with ``chosen_weight``/``rejected_weight``) with its
    weights rescaled to mean 1 per response (``sequence``) or per side (``side``); float32
    values. ``names``: a label per row for errors (default "row i"). ``kept``: by row, the
    (chosen, rejected) tokens that truncation keeps: the means are over those, and the
    weights of the tokens cut are NaN (never read)."""
    if mode == "none":
        return ds
    if mode not in ("sequence", "side"):
        raise ValueError(f"weights.balance must be none, sequence or side, got {mode!r}")

    def cut(i, r, k):      # a row absent from ``kept`` is skipped by tokenisation: none read
        return r if kept is None else r[:kept[i][k]] if i in kept else r[:0]
    side_mean = {}
    if mode == "side":
        for k, w in enumerate(WEIGHT_COLUMNS):
            rows = [np.asarray(cut(i, r, k), np.float64) for i, r in enumerate(ds[w])]
            side_mean[w] = _mean(np.concatenate(rows) if rows else [], f"the {w} column", mode)

    def fn(batch, indices):
        out = {}
        for k, w in enumerate(WEIGHT_COLUMNS):
            rows = []
            for i, full in zip(indices, batch[w]):
                r = np.asarray(cut(i, full, k), np.float64)
                name = names[i] if names is not None else f"row {i}"
                m = side_mean[w] if mode == "side" else _mean(r, f"{name}, {w}", mode)
                rows.append((r / m).astype(np.float32).tolist() + [np.nan] * (len(full) - len(r)))
            out[w] = rows
        return out
    return ds.map(fn, batched=True, with_indices=True, desc=f"weights: balance {mode}")


def span_ids(ids, where: str) -> list[int]:
    """A record's span ids as ints: ints, or floats holding whole numbers (a JSON file with
    one ``1.0`` makes datasets read the whole column as floats); anything else is a
    ValueError naming ``where`` and the value."""
    out = []
    for k, x in enumerate(ids):
        whole = isinstance(x, (int, float)) and not isinstance(x, bool) and float(x).is_integer()
        if not whole:
            raise ValueError(f"{where}: value {k} is {x!r}, not an int span id")
        out.append(int(x))
    return out


def span_rows(raw, tok_pol, span: str, tokenizer, full=None) -> list | None:
    """Per tokenised pair, (chosen, rejected) span ids aligned with its completion tokens
    (cut with them); None for ``span=token``. ``full``: ``{record_index: (chosen tokens,
    rejected tokens)}`` before truncation (None: nothing was cut)."""
    if span == "token":
        return None
    if span == "word":
        return [(word_span_ids(r["chosen_ids"], tokenizer),
                 word_span_ids(r["rejected_ids"], tokenizer)) for r in tok_pol]
    if span != "column":
        raise ValueError(f"weights.span must be token, word or column, got {span!r}")
    missing = [c for c in SPAN_COLUMNS if c not in raw.column_names]
    if missing:
        raise ValueError(f"weights.span=column: the records have no {missing} column (one "
                         f"int span id per completion token, per side)")
    cols = {c: raw[c] for c in SPAN_COLUMNS}
    out = []
    for r in tok_pol:
        i, pair = int(r["record_index"]), []
        for s, (c, ids_col) in enumerate(zip(SPAN_COLUMNS, ("chosen_ids", "rejected_ids"))):
            n = len(r[ids_col])
            want = full[i][s] if full is not None else n
            ids = cols[c][i]
            where = f"weights.span=column: record {i}, field {c!r}"
            if ids is None or len(ids) != want:
                got = "missing" if ids is None else f"{len(ids)} values"
                raise ValueError(f"{where}: {got} for {want} completion tokens (one int per "
                                 f"token)")
            pair.append(span_ids(ids[:n], where))
        out.append(tuple(pair))
    return out
