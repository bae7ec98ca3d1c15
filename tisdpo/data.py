"""Preference records → tokenised pairs (design.md §6, algorithms.md §2.3, §5, §7).

Record format (one row per preference pair):

- ``prompt``, ``chosen``, ``rejected``: plain strings, or chat messages (lists of
  ``{"role", "content"}``; ``prompt`` the conversation so far, ``chosen``/``rejected`` the
  assistant turn(s) that follow, or a plain string taken as one assistant message).
- optional ``chosen_weight`` / ``rejected_weight``: per completion-token float lists (TIS-DPO
  token weights, as the offline pass writes them);
- optional ``ref_chosen_logps`` / ``ref_rejected_logps``: per completion-token reference
  log-probs (precomputed so the reference model need not be loaded during training).

Every per-token list has exactly one value per *completion token* as :func:`tokenize_pairs`
produces it under the same :class:`TokenizeConfig`: the response's text tokens, plus the
appended EOS when ``add_eos`` is on. The official TIS-DPO files store weights for the text
tokens only (no EOS) — load them with ``add_eos=False``, which is how TIS-DPO treats EOS
anyway (weight 0, i.e. not counted).

Plain-text records are tokenised as *prompt and completion separately* (no special tokens;
BOS in front of the prompt only with ``add_bos``) and concatenated, so the completion tokens
are exactly ``tokenizer(completion, add_special_tokens=False)`` — the tokens the weights
refer to — whatever a joint tokenisation would merge across the boundary. Chat records are
rendered with the tokenizer's chat template: the prompt with ``add_generation_prompt=True``,
the completion being what the full conversation adds after it, restricted to the template's
``{% generation %}`` block(s) when it has them (trailing template tokens outside the block,
e.g. a newline after the end-of-turn token, are dropped).

EOS rule (``TokenizeConfig.add_eos``): when on, the completion ends with the tokenizer's EOS
(appended for plain text; kept, or appended if the template did not emit it, for chat) and
that EOS is a completion token like any other — labelled, counted and weighted (1.0 when the
dataset has no weights). When off, no EOS is a completion token (a chat template's trailing
EOS is dropped). The official TIS-DPO code appends EOS but gives it weight 0, which for every
weighted loss equals not counting it: the ``tisdpo*`` presets use ``add_eos=False``; every
other preset (DPO, IPO, SimPO, TDPO, cDPO, ...) counts EOS as the DPO reference code does
(``add_eos=True``). :meth:`TokenizeConfig.for_preset` applies this rule.

Truncation (as the official code, ``tokenize_batch_element``): if prompt + the longer
completion exceed ``max_length``, the prompt is cut to ``max_prompt_length`` (its start kept
with ``truncation="keep_start"``, its end with ``"keep_end"``); if still too long, both
completions are cut to ``max_length − max_prompt_length`` tokens, keeping their start — the
per-token columns are cut together with them, so they stay aligned (a cut completion loses
its EOS). Unlike the official code, the last kept token's weight is *not* zeroed.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "PER_TOKEN_COLUMNS", "TokenizeConfig", "TokenizeReport", "load_preference_dataset",
    "tokenize_pairs", "reverse_pairs", "eos_counted_for_preset",
]

#: Per-token list columns, per side: (chosen column, rejected column).
PER_TOKEN_COLUMNS = {
    "weight": ("chosen_weight", "rejected_weight"),
    "ref_logps": ("ref_chosen_logps", "ref_rejected_logps"),
}
_TEXT_FIELDS = ("prompt", "chosen", "rejected")
_DATA_EXTS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def eos_counted_for_preset(preset: str) -> bool:
    """Whether EOS is a counted completion token under a loss preset (the EOS rule).

    ``tisdpo*`` presets: False (the official TIS-DPO code gives EOS weight 0). All others:
    True (the DPO reference code counts EOS).
    """
    if not isinstance(preset, str):
        raise ValueError(f"preset must be a preset name, got {preset!r}")
    return not preset.startswith("tisdpo")


@dataclass(frozen=True)
class TokenizeConfig:
    """How :func:`tokenize_pairs` tokenises, truncates and validates.

    max_length: prompt + completion tokens at most (per side), ≥ 2.
    max_prompt_length: the prompt's cap when truncation is needed, < max_length.
    truncation: "keep_start" or "keep_end" — which part of an over-long prompt is kept
        (completions always keep their start).
    add_eos: whether EOS ends each completion and counts as a completion token (see the
        module docstring's EOS rule; ``for_preset`` picks it per loss preset).
    add_bos: prepend the tokenizer's BOS to plain-text prompts (chat templates add their own).
    skip_invalid: drop invalid records (counted in the report) instead of raising.
    """

    max_length: int = 512
    max_prompt_length: int = 256
    truncation: Literal["keep_start", "keep_end"] = "keep_start"
    add_eos: bool = True
    add_bos: bool = False
    skip_invalid: bool = False

    def __post_init__(self):
        if not isinstance(self.max_length, int) or self.max_length < 2:
            raise ValueError(f"max_length must be an int >= 2, got {self.max_length!r}")
        if not isinstance(self.max_prompt_length, int) or not \
                1 <= self.max_prompt_length < self.max_length:
            raise ValueError(f"max_prompt_length must be an int in [1, max_length="
                             f"{self.max_length}), got {self.max_prompt_length!r}")
        if self.truncation not in ("keep_start", "keep_end"):
            raise ValueError(f"truncation must be 'keep_start' or 'keep_end', "
                             f"got {self.truncation!r}")
        for name in ("add_eos", "add_bos", "skip_invalid"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")

    @classmethod
    def for_preset(cls, preset: str, **kwargs) -> TokenizeConfig:
        """A config whose ``add_eos`` follows the preset's EOS rule (overridable)."""
        kwargs.setdefault("add_eos", eos_counted_for_preset(preset))
        return cls(**kwargs)

    def replace(self, **changes) -> TokenizeConfig:
        return dataclasses.replace(self, **changes)


@dataclass
class TokenizeReport:
    """What :func:`tokenize_pairs` did.

    n_records: input records; n_kept: output pairs; n_skipped: invalid records dropped
    (only with skip_invalid); reasons: the first few skip reasons ("record i, field 'f': …");
    n_prompt_truncated / n_completion_truncated: pairs whose prompt / completions were cut.
    """

    n_records: int = 0
    n_kept: int = 0
    n_skipped: int = 0
    reasons: list[str] = field(default_factory=list)
    n_prompt_truncated: int = 0
    n_completion_truncated: int = 0

    def summary(self) -> str:
        s = (f"{self.n_kept}/{self.n_records} pairs kept, {self.n_skipped} invalid skipped, "
             f"{self.n_prompt_truncated} prompts and {self.n_completion_truncated} "
             f"completions truncated")
        if self.reasons:
            s += "; first reasons: " + "; ".join(self.reasons)
        return s


def load_preference_dataset(path_or_dir, split: str | None = None):
    """Load preference records as a ``datasets.Dataset``.

    path_or_dir: a ``.json``/``.jsonl``/``.parquet`` file, a list of such files, a directory
    written by ``Dataset.save_to_disk``/``DatasetDict.save_to_disk``, or a directory of data
    files (``{split}.jsonl`` etc.). split: which split of a DatasetDict or data directory
    (default: "train" if present, else the only one). Nothing is fetched from the network.
    Records are not validated here (see :func:`tokenize_pairs`).
    """
    raise NotImplementedError


def tokenize_pairs(dataset, tokenizer, cfg: TokenizeConfig | None = None):
    """Tokenise preference records into pairs of completion token ids; returns (dataset, report).

    Output columns: ``record_index`` (row in the input), ``prompt_ids``, ``chosen_ids``,
    ``rejected_ids`` (completion token ids), and, when the input has them, ``chosen_weight``,
    ``rejected_weight``, ``ref_chosen_logps``, ``ref_rejected_logps`` (float32 lists aligned
    1:1 with ``chosen_ids``/``rejected_ids`` after truncation). Other input columns are
    dropped. See the module docstring for plain vs chat records, the EOS rule and truncation.

    Invalid records raise ``ValueError("record 17, field 'chosen_weight': 12 values for 11
    completion tokens")``: a missing field, a non-string (or malformed chat) value, an empty
    response, a per-token list whose length differs from the completion's token count, a
    non-finite value. With ``cfg.skip_invalid`` they are dropped instead and counted in the
    report (a column missing from every record still raises).
    """
    raise NotImplementedError


def reverse_pairs(dataset):
    """Swap chosen and rejected (and their weight/ref columns): the data for π⁻.

    Works on raw records and on :func:`tokenize_pairs` output alike.
    """
    raise NotImplementedError
