"""A record's per-token list columns (token weights, reference log-probs, scores) checked
and read as floats, for :func:`tisdpo.train.data.tokenize_pairs` and what reads such columns
beside it. The weights stage pads the tokens its ``data.max_length`` cut (it scored none of
them) with NaN, JSON null in its JSONL: accepted where truncation cuts them again, refused
with :data:`UNSCORED`'s reason where it keeps them.
"""
from __future__ import annotations

import math

from tisdpo.train.records import non_finite

__all__ = ["RecordError", "UNSCORED", "per_token_floats"]


class RecordError(ValueError):
    """An invalid record: ``{where}, field {field!r}: {message}``, where is ``record {index}``
    or the record's SOURCE_COLUMN ("data.train pairs.jsonl line 5 (record 4)")."""

    def __init__(self, where, field_name, message):
        super().__init__(f"{where}, field {field_name!r}: {message}")


#: why a per-token value is NaN (JSON null), most likely: the weights stage's padding of the
#: tokens it cut (a user's own NaN reads the same)
UNSCORED = ("no value was computed for this token: a weights stage writes NaN for the tokens "
            "its data.max_length cut; rerun it with a data.max_length that keeps as much as "
            "this one")


def per_token_floats(value, where: str, name: str, n_tokens: int,
                     kept: int | None = None) -> list[float]:
    """A record's per-token list ``name`` as floats: ``n_tokens`` numbers, finite in the first
    ``kept`` (default all: those truncation keeps); past them NaN or None (JSON null, the
    weights stage's padding of tokens it did not score: never read) is NaN. Else a
    ValueError ``{where}, field {name!r}: ...``."""
    if value is None:
        raise RecordError(where, name, "missing")
    if not isinstance(value, (list, tuple)):
        raise RecordError(where, name, f"expected a list of floats, got {type(value).__name__}")
    if len(value) != n_tokens:
        raise RecordError(where, name, f"{len(value)} values for {n_tokens} completion tokens")
    if non_finite(value):
        kept = n_tokens if kept is None else kept
        for k, v in enumerate(value):
            unscored = v is None or isinstance(v, float) and math.isnan(v)
            if non_finite((v,)) and (k < kept or not unscored):
                raise RecordError(where, name, f"value {k} is {v!r}, not a finite number"
                                  + (f" ({UNSCORED})" if unscored else ""))
    return [math.nan if v is None else float(v) for v in value]
