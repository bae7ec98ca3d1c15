"""The weights stage's records as it writes them (:mod:`tisdpo.pipeline.weights`): the raw
records plus per-token columns, each as long as the record's whole completion. A token that
``data.max_length`` cut was not scored: its ``*_score``, ``*_weight`` and ``ref_*_logps``
value is NaN (null in the JSONL), its ``*_span`` id −1. Tokenising the records again under
the same configuration cuts those tokens first; one that keeps more of them refuses the
records (:func:`tisdpo.train.data.per_token_floats`), as 0.0 would be taken for a weight
and a reference log-prob.
"""
from __future__ import annotations

import math

from tisdpo.pipeline.spans import SPAN_COLUMNS

__all__ = ["untruncated", "full_lengths", "merge_columns", "record_indices", "UNSCORED_PAD"]

#: the value of a cut token in a float column (span columns get −1)
UNSCORED_PAD = math.nan


def untruncated(tok_cfg):
    """``tok_cfg`` with no length limit: every token of a record."""
    return tok_cfg.replace(max_length=10**9, max_prompt_length=10**9 - 1)


def full_lengths(ctx, raw, tok_cfg, tok_pol):
    """By record, the untruncated completion lengths (chosen, rejected) and prompt ids, only
    when the policy tokenisation ``tok_pol`` of ``raw`` cut something (else None)."""
    from tisdpo.train.data import tokenize_pairs

    if all(len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"]))
           < tok_cfg.max_length and len(r["prompt_ids"]) < tok_cfg.max_prompt_length
           for r in tok_pol):
        return None
    tok, _ = tokenize_pairs(raw, ctx.tokenizer, untruncated(tok_cfg))
    return {int(r["record_index"]): (len(r["chosen_ids"]), len(r["rejected_ids"]),
                                     r["prompt_ids"]) for r in tok}


def merge_columns(raw, est, full):
    """Raw records of the estimated pairs ``est`` plus their per-token columns, padded to
    ``full`` (:func:`full_lengths`; None: nothing was cut) with NaN (spans: −1)."""
    cols = est.to_dict()                       # plain lists (column access is lazy and slow)
    idx = cols.pop("record_index")             # tokenised order = increasing record index
    out = raw.select(idx)
    for name, vals in cols.items():
        if full is not None:
            side = 0 if "chosen" in name else 1
            pad = -1 if name in SPAN_COLUMNS else UNSCORED_PAD
            vals = [v + [pad] * (full[i][side] - len(v)) for i, v in zip(idx, vals)]
        out = out.add_column(name, vals)
    return out


def record_indices(ds) -> list[int]:
    """The ``record_index`` column as a list, read from Arrow at once (a datasets Column
    compares row by row)."""
    return ds.with_format("arrow")["record_index"].to_pylist()
