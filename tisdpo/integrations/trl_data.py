"""Batches for ``TISDPOTrainer``: TRL's preference collator plus per-token columns.

:class:`TISDPOCollator` is TRL 1.16's ``DataCollatorForPreference`` (input_ids,
attention_mask, completion_mask; chosen rows first) that also carries

- ``weights`` [2B, L] from the ``chosen_weight``/``rejected_weight`` columns (or the columns
  ``TISDPOConfig.token_weights`` names), and
- ``ref_logps`` [2B, L] from ``ref_chosen_logps``/``ref_rejected_logps`` when they are
  per-token lists (what ``precompute_ref_log_probs=True`` stores for ``TISDPOTrainer``),

each list holding one value per completion token as TRL tokenises the record (see
:mod:`tisdpo.integrations.trl_weights`), placed at the token's position, truncated exactly
as the tokens are, 0 at prompt and padding positions. A list whose length differs from the
record's completion is an error; :func:`check_token_columns` finds it before training and
names the record.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.trainer.utils import pad

from tisdpo.train.records import non_finite
from tisdpo.train.token_lists import UNSCORED

__all__ = ["TISDPOCollator", "check_token_columns", "kept_completion", "REF_COLUMNS",
           "ALIGNMENT"]

#: TRL's reference columns; per-token lists for TISDPOTrainer.
REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
ALIGNMENT = ("one value per completion token as TRL tokenises the record (prompt + "
             "completion jointly, the EOS TRL appends included)")


def _token_row(example: dict, side: str, values, column: str) -> list[float]:
    """The row of a per-token column: 0 at the prompt, then ``values`` (NaN, or None, where
    nothing was computed: precomputed reference log-probs where max_length cut the
    completion, weights the weights stage did not score; the caller checks what it keeps)."""
    if not isinstance(values, (list, tuple)):
        raise ValueError(f"column {column!r} holds {type(values).__name__} values; "
                         f"TISDPOTrainer needs per-token lists ({ALIGNMENT}), not TRL "
                         f"DPOTrainer's one reference sum per sequence")
    n = len(example[f"{side}_ids"])
    if len(values) != n:
        raise ValueError(f"column {column!r}: {len(values)} values for {n} completion tokens "
                         f"({ALIGNMENT})")
    return [0.0] * len(example["prompt_ids"]) + [math.nan if v is None else float(v)
                                                  for v in values]


_UNSCORED = f" ({UNSCORED})"


def _check_kept(values, kept: tuple[int, int], where: str) -> None:
    """ValueError ``{where}: value k is v, not a finite number`` for the first entry of
    ``values`` within ``kept`` [start, stop) that is not one."""
    lo, hi = kept
    for k in range(lo, hi):
        v = values[k]
        if non_finite((v,)):
            raise ValueError(f"{where}: value {k} is {v!r}, not a finite number"
                             + (_UNSCORED if v is None or v != v else ""))


def kept_completion(n_prompt: int, n_completion: int, max_length: int | None,
                    truncation_mode: str) -> tuple[int, int]:
    """The [start, stop) of the completion tokens TRL's collator keeps of a row of
    ``n_prompt`` + ``n_completion`` tokens: the first (keep_start) or last ``max_length``."""
    if max_length is None:
        return 0, n_completion
    if truncation_mode == "keep_start":
        return 0, max(0, min(n_completion, max_length - n_prompt))
    return max(0, n_completion - max_length), n_completion


@dataclass
class TISDPOCollator(DataCollatorForPreference):
    """TRL's preference collator plus the per-token ``weights`` and ``ref_logps`` (module
    docstring). ``weight_columns``, ``ref_columns``: (chosen, rejected) column names, None
    for none (``TISDPOTrainer`` reads the reference columns only when it precomputed them, as
    ``DPOTrainer`` ignores them otherwise). A batch that has one column of a pair but not the
    other is an error naming the missing one."""

    weight_columns: tuple[str, str] | None = ("chosen_weight", "rejected_weight")
    ref_columns: tuple[str, str] | None = REF_COLUMNS

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        ids = [{k: ex[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
               for ex in examples]
        out = super().torch_call(ids)
        if self.max_length is None:
            sl = slice(None)
        elif self.truncation_mode == "keep_start":
            sl = slice(None, self.max_length)
        else:
            sl = slice(-self.max_length, None)
        for key, cols in (("weights", self.weight_columns), ("ref_logps", self.ref_columns)):
            have = [] if cols is None else [c for c in cols if c in examples[0]]
            if not have:
                continue
            if len(have) == 1:
                missing = next(c for c in cols if c not in have)
                raise ValueError(f"column {missing!r} is missing but {have[0]!r} is given: "
                                 f"per-token columns come in (chosen, rejected) pairs")
            rows = [torch.tensor(_token_row(ex, side, ex[col], col)[sl], dtype=torch.float32)
                    for side, col in zip(("chosen", "rejected"), cols) for ex in examples]
            if key == "weights":          # every weight of a token the batch keeps is a number
                for side, col in zip(("chosen", "rejected"), cols):
                    for ex in examples:
                        _check_kept(ex[col], kept_completion(
                            len(ex["prompt_ids"]), len(ex[col]), self.max_length,
                            self.truncation_mode), f"column {col!r}")
            out[key] = pad(rows, padding_value=0.0, padding_side="right",
                           pad_to_multiple_of=self.pad_to_multiple_of)
        return out


def check_token_columns(dataset, columns, *, name: str, rows=None, max_length=None,
                        truncation_mode: str = "keep_start") -> None:
    """ValueError naming the first record whose per-token ``columns`` (chosen, rejected)
    do not have one value per completion token of the tokenised ``dataset``, or a value that
    is not a finite number at a token ``max_length`` keeps (:func:`kept_completion`);
    ``rows``: the record number of each row (default: its position)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    for side, col in zip(("chosen", "rejected"), columns):
        table = dataset.select_columns([col, f"{side}_ids"]).with_format("arrow")[:]
        kind = table.column(col).type
        if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)
                or pa.types.is_fixed_size_list(kind)):
            raise ValueError(f"{name} field {col!r} holds {kind} values; TISDPOTrainer needs "
                             f"per-token lists ({ALIGNMENT})")
        values = table.column(col)
        have = pc.list_value_length(values).to_pylist()
        want = pc.list_value_length(table.column(f"{side}_ids")).to_pylist()
        for i, (h, w) in enumerate(zip(have, want)):
            rec = i if rows is None else rows[i]
            if h is None:
                raise ValueError(f"{name} record {rec}, field {col!r}: missing")
            if h != w:
                raise ValueError(f"{name} record {rec}, field {col!r}: {h} values for {w} "
                                 f"completion tokens ({ALIGNMENT}; "
                                 f"tisdpo.integrations.trl.align_weights_to_trl builds them)")
        prompt = pc.list_value_length(dataset.select_columns(["prompt_ids"])
                                      .with_format("arrow")[:].column(0)).to_pylist()
        kept = [kept_completion(p, w, max_length, truncation_mode)
                for p, w in zip(prompt, want)]
        _check_finite(values, kept, col, name, rows)


def _check_finite(values, kept, col: str, name: str, rows) -> None:
    """ValueError naming the record and the value of the first entry of the list column
    ``values`` within its row's ``kept`` [start, stop) that is not a finite number (a null,
    NaN or ±inf, or not a number at all). One chunk at a time (any list type)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    chunks = values.chunks if isinstance(values, pa.ChunkedArray) else [values]
    lo, hi = np.asarray(kept, dtype=np.int64).reshape(-1, 2).T
    row0 = 0                                       # the first row of the chunk
    for chunk in chunks:
        flat = pc.list_flatten(chunk)
        if not (pa.types.is_integer(flat.type) or pa.types.is_floating(flat.type)
                or pa.types.is_null(flat.type)):
            raise ValueError(f"{name} field {col!r} holds lists of {flat.type}, not numbers")
        rows_here, row0 = row0, row0 + len(chunk)
        if not len(flat):
            continue
        finite = pc.is_finite(flat) if pa.types.is_floating(flat.type) else pc.is_valid(flat)
        bad = ~pc.fill_null(finite, False).to_numpy(zero_copy_only=False)
        parents = pc.list_parent_indices(chunk).to_numpy()
        starts = np.concatenate([[0], np.cumsum(np.bincount(parents, minlength=len(chunk)))])
        pos = np.arange(len(flat)) - starts[parents]                # index within its row
        row = parents + rows_here
        bad &= (pos >= lo[row]) & (pos < hi[row])
        if bad.any():
            first = int(np.argmax(bad))
            i, value = int(row[first]), flat[first].as_py()
            rec = i if rows is None else rows[i]
            raise ValueError(f"{name} record {rec}, field {col!r}: value {int(pos[first])} is "
                             f"{value!r}, not a finite number"
                             + (_UNSCORED if value is None or value != value else ""))
