"""Per-token weight columns in TRL's alignment, from the ``weights`` stage's output.

The column format ``TISDPOTrainer`` reads (docs/trl.md): ``chosen_weight`` and
``rejected_weight``, one float per *completion token as TRL 1.16's DPOTrainer tokenises the
record*: plain text is tokenised as prompt + completion + EOS text in one call, and the
completion is what follows the longest prefix it shares with the prompt tokenised alone
(for both sides, the shorter); chat records render prompt (with the generation prompt) and
prompt + completion with the chat template, and the completion is likewise the rest — the
template's tokens after the response included. The collator truncates the columns with the
tokens (``max_length``).

The ``weights`` stage writes its columns aligned with tisdpo's own tokenisation
(:func:`tisdpo.train.data.tokenize_pairs`: prompt and completion separately, EOS per the
preset's rule — not for ``tisdpo*``). :func:`align_weights_to_trl` maps them over:

- where TRL's completion tokens start with tisdpo's (the usual case), values are copied one
  to one;
- otherwise (a token merged across the prompt/completion boundary, a different split) each
  TRL token takes the mean value of the tisdpo tokens its characters overlap (plain text,
  fast tokenizers; chat records that do not line up are an error naming the record);
- TRL tokens that no tisdpo token scored — the EOS TRL appends when the stage counted none,
  chat-template tokens after the response — get ``unscored_weight`` (default 0: not counted
  by the weighted sum, which is how TIS-DPO's official code treats EOS);
- TRL tokens of the part of a response the stage's ``data.max_length`` cut (it scored none of
  them) get NaN: ``TISDPOTrainer`` refuses a record whose NaN tokens its own ``max_length``
  keeps, naming it, rather than train them with a weight no one computed.
"""
from __future__ import annotations

import json
import math
import os

from tisdpo.train.data import TokenizeConfig, tokenize_pairs
from tisdpo.train.records import TEMPLATE_FIELDS, template_kwargs
from tisdpo.train.token_lists import per_token_floats

__all__ = ["align_weights_to_trl", "load_trl_weights", "export_trl_weights", "trl_weight_paths",
           "trl_completion_ids", "TISDPO_TOKEN_COLUMNS"]

#: Per-token columns of the weights stage (tisdpo alignment), dropped by the conversion.
TISDPO_TOKEN_COLUMNS = ("chosen_score", "rejected_score", "chosen_weight", "rejected_weight",
                        "ref_chosen_logps", "ref_rejected_logps", "chosen_span",
                        "rejected_span")


class _Unaligned(ValueError):
    pass


def _common_prefix(a: list, b: list) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def trl_completion_ids(tokenizer, prompt, chosen, rejected, *, offsets: bool = False,
                       template: dict | None = None):
    """TRL 1.16 DPOTrainer's (chosen, rejected) completion ids of one record, and with
    ``offsets`` each token's character span relative to the start of the completion text
    (plain text only; None for chat records). ``template``: the chat template's keyword
    arguments (the record's ``tools`` and ``chat_template_kwargs``: ``template_kwargs``)."""
    if not isinstance(prompt, str):                     # conversational
        def chat(msgs, **kw):
            return list(tokenizer.apply_chat_template(msgs, tokenize=True, return_dict=True,
                                                      **kw, **(template or {}))["input_ids"])
        p = chat(prompt, add_generation_prompt=True)
        full = [chat(list(prompt) + list(c)) for c in (chosen, rejected)]
        n = min(_common_prefix(p, f) for f in full)
        return tuple(f[n:] for f in full), None
    eos = tokenizer.eos_token
    texts = [c if c.endswith(eos) else c + eos for c in (chosen, rejected)]
    p = list(tokenizer(text=prompt)["input_ids"])
    encs = [tokenizer(text=prompt + t, return_offsets_mapping=offsets) for t in texts]
    full = [list(e["input_ids"]) for e in encs]
    n = min(_common_prefix(p, f) for f in full)
    spans = None
    if offsets:
        shift = len(prompt)
        spans = tuple([(a - shift, b - shift) for a, b in e["offset_mapping"][n:]]
                      for e in encs)
    return tuple(f[n:] for f in full), spans


def _align(src_ids, values, src_spans, trl_ids, trl_spans, eos_id, fill):
    n = len(src_ids)
    if list(trl_ids[:n]) == list(src_ids):
        return [float(v) for v in values] + [fill] * (len(trl_ids) - n)
    if src_spans is None or trl_spans is None:
        raise _Unaligned("its completion tokens differ between tisdpo's and TRL's "
                         "tokenisation and have no character offsets to align them by")
    src_eos = n > 0 and src_ids[-1] == eos_id and len(src_spans) == n - 1
    text_vals = values[:-1] if src_eos else values
    out = []
    for k, (a, b) in enumerate(trl_spans):
        if src_eos and k == len(trl_ids) - 1 and trl_ids[k] == eos_id:
            out.append(float(values[-1]))
            continue
        hit = [float(v) for (c, d), v in zip(src_spans, text_vals) if c < b and a < d]
        out.append(sum(hit) / len(hit) if hit else fill)
    return out


def align_weights_to_trl(dataset, tokenizer, tokenize: TokenizeConfig | dict, *,
                         unscored_weight: float = 0.0, scored_by_stage: bool = False):
    """``dataset`` (records with prompt, chosen, rejected and per-token ``chosen_weight`` /
    ``rejected_weight`` aligned with ``tokenize_pairs`` under ``tokenize`` — the weights
    stage's output and its ``meta.json["tokenize"]``) with those columns re-aligned to TRL's
    tokenisation; the
    stage's other per-token columns (scores, reference log-probs, spans) are dropped, as
    they no longer line up (``TISDPOConfig(precompute_ref_log_probs=True)`` recomputes the
    reference log-probs in TRL's alignment). ``scored_by_stage``: the columns are a weights
    stage's, which scored only what ``tokenize`` kept: the tokens it cut are NaN (unscored)
    whatever their stored padding; otherwise every given value is used. Errors name the
    record."""
    import datasets

    columns = ("chosen_weight", "rejected_weight")
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise ValueError(f"record 0, field {missing[0]!r}: missing (no record has it; "
                         f"columns: {dataset.column_names})")
    cfg = tokenize if isinstance(tokenize, TokenizeConfig) else TokenizeConfig(**tokenize)
    full = cfg.replace(max_length=10 ** 9, max_prompt_length=10 ** 9 - 1, skip_invalid=False)
    keep = [c for c in dataset.column_names
            if c in ("prompt", "chosen", "rejected") + TEMPLATE_FIELDS or c in columns]
    text = dataset.select_columns([c for c in keep if c not in columns])
    src, _ = tokenize_pairs(text, tokenizer, full)
    # what the stage scored: the completion tokens its own truncation kept (the rest of each
    # column is its padding, NaN or, written before NaN was, 0.0)
    cut = tokenize_pairs(text, tokenizer, cfg.replace(skip_invalid=False))[0] \
        if scored_by_stage else src
    recs = text.to_list()
    given = dataset.select_columns(list(columns)).to_list()
    eos_id = tokenizer.eos_token_id
    fast = bool(getattr(tokenizer, "is_fast", False))
    out = {c: [] for c in columns}
    for i, (rec, row, scored, vals) in enumerate(zip(recs, src, cut, given)):
        plain = isinstance(rec["prompt"], str)
        trl_ids, trl_spans = trl_completion_ids(tokenizer, rec["prompt"], rec["chosen"],
                                                rec["rejected"], offsets=plain and fast,
                                                template=template_kwargs(rec)[0])
        for s, (side, col) in enumerate(zip(("chosen", "rejected"), columns)):
            src_spans = None
            if plain and fast:
                enc = tokenizer(rec[side], add_special_tokens=False,
                                return_offsets_mapping=True)
                src_spans = [tuple(x) for x in enc["offset_mapping"]]
            full_n, n = len(row[f"{side}_ids"]), len(scored[f"{side}_ids"])
            # finite where scored; the rest (the stage's padding, whatever it is) unscored
            values = per_token_floats(vals[col], f"record {i}", col, full_n, n)[:n] + \
                [math.nan] * (full_n - n)
            try:
                out[col].append(_align(row[f"{side}_ids"], values, src_spans, trl_ids[s],
                                       None if trl_spans is None else trl_spans[s], eos_id,
                                       float(unscored_weight)))
            except _Unaligned as e:
                raise ValueError(f"record {i}, field {col!r}: {e}") from None
    drop = [c for c in dataset.column_names if c in TISDPO_TOKEN_COLUMNS or c in columns]
    result = dataset.remove_columns(drop)
    seq = getattr(datasets, "List", None) or datasets.Sequence
    for col in columns:
        result = result.add_column(col, out[col],
                                   feature=seq(datasets.Value("float32")))
    return result


def load_trl_weights(weights_dir: str, tokenizer, split: str = "train", *,
                     unscored_weight: float = 0.0):
    """The ``weights`` stage's ``<weights_dir>/<split>`` records with their weights in TRL's
    alignment (:func:`align_weights_to_trl`, tokenisation read from ``meta.json``)."""
    import datasets

    meta_path = os.path.join(weights_dir, "meta.json")
    if not os.path.isfile(meta_path):
        raise ValueError(f"{weights_dir}: no meta.json (not a finished `tisdpo weights` "
                         f"output directory)")
    with open(meta_path, encoding="utf-8") as fh:
        meta = json.load(fh)
    raw = datasets.load_from_disk(os.path.join(weights_dir, split))
    return align_weights_to_trl(raw, tokenizer, meta["tokenize"],
                                unscored_weight=unscored_weight, scored_by_stage=True)


def trl_weight_paths(weights_dir: str, out_dir: str | None = None) -> list[str]:
    """Where :func:`export_trl_weights` writes: ``train/``, ``train.jsonl``, ``eval/``,
    ``eval.jsonl`` under ``out_dir`` (default ``<weights_dir>/trl``)."""
    out_dir = out_dir or os.path.join(weights_dir, "trl")
    return [os.path.join(out_dir, split) + ext for split in ("train", "eval")
            for ext in ("", ".jsonl")]


def export_trl_weights(weights_dir: str, tokenizer, out_dir: str | None = None, *,
                       unscored_weight: float = 0.0) -> list[str]:
    """Writes both splits of a finished ``weights`` stage in TRL's alignment
    (:func:`load_trl_weights`) to ``out_dir`` (default ``<weights_dir>/trl``): ``train/`` and
    ``eval/`` (``datasets.save_to_disk``, for ``load_from_disk``) and ``train.jsonl``,
    ``eval.jsonl``. Returns the written paths."""
    paths = trl_weight_paths(weights_dir, out_dir)
    os.makedirs(os.path.dirname(paths[0]), exist_ok=True)
    for split, path in zip(("train", "eval"), paths[::2]):
        ds = load_trl_weights(weights_dir, tokenizer, split, unscored_weight=unscored_weight)
        ds.save_to_disk(path)
        ds.to_json(path + ".jsonl", lines=True, force_ascii=False)
    return paths
