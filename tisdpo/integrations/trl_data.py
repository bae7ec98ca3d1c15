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

from dataclasses import dataclass
from typing import Any

import torch
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.trainer.utils import pad

from tisdpo.train.records import non_finite

__all__ = ["TISDPOCollator", "check_token_columns", "REF_COLUMNS", "ALIGNMENT"]

#: TRL's reference columns; per-token lists for TISDPOTrainer.
REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
ALIGNMENT = ("one value per completion token as TRL tokenises the record (prompt + "
             "completion jointly, the EOS TRL appends included)")


def _token_row(example: dict, side: str, values, column: str, *, finite: bool) -> list[float]:
    """The row of a per-token column: 0 at the prompt, then ``values``; ``finite``: each
    value must be a finite number (weights; precomputed reference log-probs are NaN where
    max_length cut the completion, and those positions are sliced off)."""
    if not isinstance(values, (list, tuple)):
        raise ValueError(f"column {column!r} holds {type(values).__name__} values; "
                         f"TISDPOTrainer needs per-token lists ({ALIGNMENT}), not TRL "
                         f"DPOTrainer's one reference sum per sequence")
    n = len(example[f"{side}_ids"])
    if len(values) != n:
        raise ValueError(f"column {column!r}: {len(values)} values for {n} completion tokens "
                         f"({ALIGNMENT})")
    problem = non_finite(values) if finite else None
    if problem:
        raise ValueError(f"column {column!r}: {problem}")
    return [0.0] * len(example["prompt_ids"]) + [float(v) for v in values]


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
            rows = [torch.tensor(_token_row(ex, side, ex[col], col,
                                            finite=key == "weights")[sl], dtype=torch.float32)
                    for side, col in zip(("chosen", "rejected"), cols) for ex in examples]
            out[key] = pad(rows, padding_value=0.0, padding_side="right",
                           pad_to_multiple_of=self.pad_to_multiple_of)
        return out


def check_token_columns(dataset, columns, *, name: str, rows=None) -> None:
    """ValueError naming the first record whose per-token ``columns`` (chosen, rejected)
    do not have one value per completion token of the tokenised ``dataset``; ``rows``: the
    record number of each row (default: its position)."""
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
        _check_finite(values, col, name, rows)


def _check_finite(values, col: str, name: str, rows) -> None:
    """ValueError naming the record and the value of the first entry of the list column
    ``values`` that is not a finite number (a null, NaN or ±inf, or not a number at all)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    flat = pc.list_flatten(values)
    if not (pa.types.is_integer(flat.type) or pa.types.is_floating(flat.type)
            or pa.types.is_null(flat.type)):
        raise ValueError(f"{name} field {col!r} holds lists of {flat.type}, not numbers")
    if not len(flat):
        return
    finite = pc.is_finite(flat) if pa.types.is_floating(flat.type) else pc.is_valid(flat)
    first = pc.index(pc.fill_null(finite, False), False).as_py()
    if first < 0:
        return
    parents = pc.list_parent_indices(values)
    i = parents[first].as_py()
    k = first - pc.index(parents, i).as_py()
    rec = i if rows is None else rows[i]
    raise ValueError(f"{name} record {rec}, field {col!r}: value {k} is {flat[first].as_py()!r}, "
                     f"not a finite number")
