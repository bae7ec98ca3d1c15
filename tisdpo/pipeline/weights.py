"""Offline token-weight estimation (the ``weights`` stage) and the weight rules of training.

The pass runs pi+ and pi- (and, optionally, the reference) over every pair in batches and
keeps only per-token log-probabilities: the hidden states of the completion tokens go
through the fused ``linear_logprobs`` (or ``contrastive_logscores`` for cDPO), so no
tokens x vocab logits are formed and nothing but per-token scalars reaches the host. It
writes ``<run_dir>/weights/{train,eval}`` (``save_to_disk``, plus JSONL) — the records with
per-token list columns aligned 1:1 with ``tokenize_pairs`` under the policy method's
tokenisation (recorded in ``weights/meta.json``):

- ``chosen_score`` / ``rejected_score``: the raw score. For every rule but cDPO it is
  ``c_t = log pi+(y_t) − log pi−(y_t)`` — c_t itself, **not** the official code's stored
  ``−c_t``. For ``weights.method=cdpo`` it is cDPO's log-score
  ``log softmax((1+b)·z+ − b·z−)[y_t]`` (``meta.json`` says which: ``score_kind``).
- ``chosen_weight`` / ``rejected_weight``: the final weights of the rule (``weights.method``,
  default the policy preset's: rank_based for ``tisdpo``; μ = +1 chosen, −1 rejected), used
  as they are in training. ``policy.token_weights=recompute`` applies another rule to the
  stored scores at training time instead; ``random`` replaces them by U(w_min, w_max).
- ``ref_chosen_logps`` / ``ref_rejected_logps`` (``weights.ref_logps``): the reference
  model's log-probs, so policy training needs no reference model (unless its loss has a KL).

Tokens cut off by ``data.max_length`` were not scored: they get NaN in every column (null
in the JSONL; −1 in the span columns), and are cut again, with their tokens, when the same
configuration tokenises the records for training; a tokenisation that keeps any of them (a
larger ``data.max_length``) refuses the record, naming it and the field
(:mod:`tisdpo.pipeline.weights_io`). Every token the policy keeps is scored, also under the
prompt variant, where pi+/pi- read the prefixed prompt followed by exactly the policy's
completion tokens. The pass writes shards of 2048 pairs and resumes from the last finished
shard.

Spans and balance (``weights.span``, ``weights.span_reduce``, ``weights.balance``; see
:mod:`tisdpo.pipeline.spans`): the rule may see c_t pooled over each word's (or a given
span's) tokens, and its weights may be rescaled to mean 1 afterwards — in this stage and,
identically, in ``policy.token_weights=recompute`` (:func:`apply_rule`). ``*_score`` stays
the raw per-token c_t.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import asdict

import torch

from tisdpo.pipeline.context import (
    REF_COLUMNS, SCORE_COLUMNS, WEIGHT_COLUMNS, Context, contrastive_models, load_records,
    load_stage_model, log, make_collator, reference_path, tokenize_cfg, tokenize_records,
)
from tisdpo.pipeline.fingerprint import enter_stage, stage_options, upstream
from tisdpo.pipeline.spans import (
    SPAN_COLUMNS, RuleParams, balance_weights, pool_spans, span_ids, span_rows,
)
from tisdpo.pipeline.weights_io import (
    UNSCORED_PAD, full_lengths, merge_columns, record_indices, untruncated,
)
from tisdpo.train.checkpoint import DONE_FILE, write_json
from tisdpo.train.config import RunConfig
from tisdpo.train.data import per_token_floats
from tisdpo.train.model import head
from tisdpo.train.objectives import forward_hidden
from tisdpo.train.records import SOURCE_COLUMN
from tisdpo.train.trainer import rows_of
from tisdpo.train.validation import max_positions_of

__all__ = ["run_weights", "weight_rule", "completion_logps", "apply_rule", "random_weights",
           "SHARD"]

SHARD = 2048           # pairs per shard of the pass (the unit it resumes from)


def weight_rule(cfg: RunConfig, method: str | None = None):
    """(weight method, RuleParams) from the weights section and the policy preset: the
    rule's ``WeightParams`` plus ``weights.span``, ``span_reduce`` and ``balance``."""
    from tisdpo_kernels import get_preset

    w = cfg.weights
    rule = w.method or get_preset(method or cfg.policy.method).weight_method or "rank_based"
    params = RuleParams(k=w.k, lower=w.lower, upper=w.upper, clip_lower=w.clip_lower,
                        clip_upper=w.clip_upper, w_min=w.w_min, w_max=w.w_max,
                        top_percent=w.top_percent, only_neg=w.only_neg,
                        round_decimals=w.round_decimals, span=w.span,
                        span_reduce=w.span_reduce, balance=w.balance)
    return rule, params


@torch.no_grad()
def completion_hidden(ctx: Context, model, batch: dict):
    """Hidden states [N, D] and targets [N] of every completion token of a padded batch
    (rows in order: the chosen sequences, then the rejected ones), the head, and the
    per-sequence token counts."""
    dev = {k: (v.to(ctx.device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    hidden, weight, bias = forward_hidden(model, dev, ctx.cfg.model, ctx.device, grad=False)
    mask = dev["labels"] != -100
    counts = (batch["labels"] != -100).sum(1).tolist()        # the CPU copy: no device sync
    return hidden[mask], dev["labels"][mask], weight, bias, counts


@torch.no_grad()
def completion_logps(ctx: Context, model, batch: dict, impl: str) -> list[torch.Tensor]:
    """Per sequence (chosen rows, then rejected rows) the completion tokens' log-probs."""
    from tisdpo_kernels import linear_logprobs

    h, y, weight, bias, counts = completion_hidden(ctx, model, batch)
    logp = linear_logprobs(h, weight, y, bias=bias, softcap=head(model).softcap, impl=impl)
    return list(logp.float().cpu().split(counts))


@torch.no_grad()
def _cdpo_logscores(ctx, models, batch_pos, batch_neg, impl) -> list[torch.Tensor]:
    from tisdpo_kernels import contrastive_logscores

    hp, yp, wp, bp, counts = completion_hidden(ctx, models["positive"], batch_pos)
    hn, yn, wn, bn, _ = completion_hidden(ctx, models["negative"], batch_neg)
    if not torch.equal(yp, yn):
        raise ValueError("cdpo scores: pi+ and pi- batches have different completion tokens")
    caps = (head(models["positive"]).softcap, head(models["negative"]).softcap)
    if caps[0] != caps[1]:
        raise ValueError(f"cdpo scores: pi+ and pi- cap their logits differently (softcap "
                         f"{caps[0]} and {caps[1]}); the contrast needs the same model family")
    s = contrastive_logscores(hp, wp, hn, wn, yp, b=ctx.cfg.weights.cdpo_b, bias_pos=bp,
                              bias_neg=bn, softcap=caps[0], impl=impl)
    return list(s.float().cpu().split(counts))


def _with_prefix(raw, prefix: str):
    """Records with ``prefix`` before each prompt (a system message for chat records)."""
    def fn(rec):
        p = rec["prompt"]
        if isinstance(p, str):
            return {"prompt": prefix + p}
        return {"prompt": [{"role": "system", "content": prefix.strip()}] + list(p)}
    return raw.map(fn, desc="contrastive prompt")


class _PromptedRows:
    """The prompt variant's rows for pi+ or pi-: each record's prompt with the side's prefix
    before it, then exactly the policy's completion tokens (every token the policy trains on
    gets a score). The prefixed prompt is tokenised whole (``tok``) and then loses what the
    policy's prompt lost to ``data.max_prompt_length``: its last tokens under keep_start;
    under keep_end the tokens between its head and the policy's kept tail, its head being
    all before the end it shares with the policy's prompt and with the prompt prefixed by a
    marker no prefix ends with (``other``), so the BOS and the whole prefix (or the system
    block a chat template made of it) stay. Made by :func:`_prompted_sides`. A row longer
    than the model's positions is refused, naming the option."""

    def __init__(self, tok, other, bos, tok_cfg, name: str, option: str, full, max_positions):
        self.tok, self.other, self.bos = tok, other, bos
        self.at = {int(r): i for i, r in enumerate(tok["record_index"])}
        self.other_at = {} if other is None else \
            {int(r): i for i, r in enumerate(other["record_index"])}
        self.name, self.option, self.full = name, option, full
        self.keep_end = tok_cfg.truncation == "keep_end"
        self.max_positions = max_positions

    def _prompt(self, pol: dict, whole: list[int], other: list[int]) -> list[int]:
        """The prefixed prompt ``whole`` cut as the policy's prompt was cut (``other``: the
        record's prompt prefixed by the marker)."""
        kept = list(pol["prompt_ids"])
        full = [] if self.full is None else list(self.full[int(pol["record_index"])][2])
        cut = len(full) - len(kept)                 # the policy's prompt, uncut, lost these
        if cut <= 0:
            return whole
        if not self.keep_end:
            return whole[:len(whole) - cut]

        def bos(x):
            return 1 if self.bos is not None and x and x[0] == self.bos else 0
        tail = len(kept) - bos(kept)                # kept = its head (a BOS) + its tail
        bound = min(len(whole) - bos(whole), len(full) - bos(kept), len(other) - bos(other))
        shared = 0
        while shared < bound and whole[-1 - shared] == full[-1 - shared] \
                == other[-1 - shared]:
            shared += 1
        if tail >= shared:
            return whole
        return whole[:len(whole) - shared] + whole[len(whole) - tail:]

    def __call__(self, pol_rows: list[dict]) -> list[dict]:
        missing = [r["record_index"] for r in pol_rows if int(r["record_index"]) not in self.at
                   or self.other is not None and int(r["record_index"]) not in self.other_at]
        if missing:
            raise ValueError(f"weights: record {missing[0]} has no {self.name} prompt "
                             f"(its prefixed prompt did not tokenise)")
        idx = [int(r["record_index"]) for r in pol_rows]
        pref = rows_of(self.tok, [self.at[i] for i in idx])
        other = [{"prompt_ids": []}] * len(idx) if self.other is None else \
            rows_of(self.other, [self.other_at[i] for i in idx])
        out = [{**r, "prompt_ids": self._prompt(r, list(p["prompt_ids"]),
                                                list(o["prompt_ids"]))}
               for r, p, o in zip(pol_rows, pref, other)]
        if self.max_positions is not None:
            limit, key = self.max_positions
            for r in out:
                n = len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"]))
                if n > limit:
                    raise ValueError(
                        f"{self.option}: record {r['record_index']}'s {self.name} row (the "
                        f"prefixed prompt and the policy's completion) has {n} tokens, more "
                        f"than the model's {limit} ({key}); shorten {self.option} or lower "
                        f"data.max_length")
        return out


def _prompted_sides(ctx, raw, prefixes: tuple[str, str], tok_cfg, full, max_positions):
    """(pi+ rows, pi- rows) of the prompt variant (:class:`_PromptedRows`), ``prefixes`` the
    positive and negative prompts; ``full``: ``full_lengths`` of the policy's tokenisation."""
    whole = untruncated(tok_cfg)
    toks = [tokenize_records(ctx, _with_prefix(raw, p), "", f"{n} prompts", whole)
            for p, n in zip(prefixes, ("pi+", "pi-"))]
    marked = None                      # where a prefix ends: no prefix ends as this one does
    if full is not None and tok_cfg.truncation == "keep_end":
        marked = tokenize_records(ctx, _with_prefix(raw, _MARK), "", "prefix end", whole)
    return tuple(_PromptedRows(toks[k], marked, ctx.tokenizer.bos_token_id, tok_cfg,
                               name, f"contrastive.{side}_prompt", full, max_positions)
                 for k, (name, side) in enumerate((("pi+", "positive"), ("pi-", "negative"))))


#: the prefix of a third rendering of the prompts, whose end no real prefix shares
_MARK = "\u2063\u2063"


def _estimate_shard(ctx, rows_pol, rows_pos, rows_neg, models, rule, params, impl,
                    spans=None):
    """Columns for one shard of tokenised pairs (each list: rows in order); ``spans``: per
    row (chosen, rejected) span ids to pool c_t over before the rule (``weights.span``)."""
    from tisdpo_kernels import token_weights

    collate = make_collator(ctx, packed=False)
    bs = ctx.cfg.weights.batch_size
    span_cols = SPAN_COLUMNS if spans is not None and params.span == "word" else ()
    out = {k: [] for k in ("record_index",) + SCORE_COLUMNS + WEIGHT_COLUMNS + REF_COLUMNS
           + span_cols}
    for start in range(0, len(rows_pol), bs):
        pol = rows_pol[start:start + bs]
        b = len(pol)
        batch_pos, batch_neg = collate(rows_pos[start:start + bs]), \
            collate(rows_neg[start:start + bs])
        if rule == "cdpo":
            score = _cdpo_logscores(ctx, models, batch_pos, batch_neg, impl)
            lp_pos, lp_neg = score, None
        else:
            lp_pos = completion_logps(ctx, models["positive"], batch_pos, impl)
            lp_neg = completion_logps(ctx, models["negative"], batch_neg, impl)
            for i in range(2 * b):
                if lp_pos[i].shape != lp_neg[i].shape:
                    raise ValueError(f"record {pol[i % b]['record_index']}: pi+ and pi- see "
                                     f"different completion tokens ({lp_pos[i].numel()} vs "
                                     f"{lp_neg[i].numel()})")
            score = [p - n for p, n in zip(lp_pos, lp_neg)]
        ref = completion_logps(ctx, models["reference"], collate(pol), impl) \
            if models.get("reference") is not None else None
        _check_finite(pol, b, {"score": score, "reference log-prob": ref})
        sizes = [x.numel() for x in lp_pos]
        seq = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])
        c = torch.cat(score)
        if params.round_decimals is not None and rule != "cdpo":
            c = torch.round(c, decimals=params.round_decimals)
        if spans is None:
            w = token_weights(torch.cat(lp_pos), None if lp_neg is None else torch.cat(lp_neg),
                              side=seq < b, method=rule, params=params, seq_ids=seq, impl=impl)
        else:                      # the rule on the pooled stored scores, as apply_rule does
            sid = [spans[start + j][s] for s in (0, 1) for j in range(b)]
            if [len(x) for x in sid] != sizes:
                raise ValueError("weights: span ids not aligned with the completion tokens")
            pooled = pool_spans(c, torch.tensor([x for r in sid for x in r]), seq,
                                params.span_reduce)
            w = token_weights(pooled, torch.zeros_like(pooled), side=seq < b, method=rule,
                              params=params, seq_ids=seq, impl=impl)
        w_rows, c_rows = w.split(sizes), c.split(sizes)
        for j, rec in enumerate(pol):
            out["record_index"].append(int(rec["record_index"]))
            for s, (cc, ww, rr) in enumerate(zip(SCORE_COLUMNS, WEIGHT_COLUMNS, REF_COLUMNS)):
                out[cc].append(c_rows[j + s * b].tolist())
                out[ww].append(w_rows[j + s * b].tolist())
                out[rr].append(ref[j + s * b].tolist() if ref is not None else None)
            for s, col in enumerate(span_cols):
                out[col].append(list(spans[start + j][s]))
    return out


def _check_finite(pol, b: int, columns: dict) -> None:
    """A non-finite score or log-prob (a diverged model) is an error naming the record."""
    for what, rows in columns.items():
        for i, row in enumerate(rows or ()):
            if not bool(torch.isfinite(row).all()):
                side = "chosen" if i < b else "rejected"
                raise ValueError(f"weights: record {pol[i % b]['record_index']} ({side}): "
                                 f"non-finite token {what} (the contrastive or reference "
                                 f"model gives NaN/inf log-probabilities)")


def run_weights(ctx: Context) -> str:
    """Offline token-weight estimation (+ reference log-probs); returns the weights dir."""
    import datasets

    cfg = ctx.cfg
    out_dir = ctx.path("weights")
    # the shards depend on these (a shard is never mixed into a pass with other options);
    # contrastive models made from other data or options are refused before anything is
    # deleted
    options = stage_options(cfg, ("contrastive", "weights", "pipeline"),
                            upstream=upstream(ctx, ctx.path("contrastive", "positive"),
                                              ctx.path("contrastive", "negative")))
    options["options"]["policy.method"] = cfg.policy.method
    if not cfg.pipeline.resume:
        contrastive_models(ctx)
    with ctx.par.main_first():
        if not cfg.pipeline.resume and ctx.par.is_main:
            shutil.rmtree(out_dir, ignore_errors=True)
        os.makedirs(out_dir, exist_ok=True)
    shards = os.path.join(out_dir, "_shards")
    if enter_stage(ctx, out_dir, options, "weights",
                   partial=os.path.isdir(shards) and bool(os.listdir(shards))):
        return out_dir
    info = contrastive_models(ctx)
    variant = info["variant"]
    rule, params = weight_rule(cfg)
    impl = cfg.weights.impl
    tok_cfg = tokenize_cfg(cfg, cfg.policy.method)
    models = {"positive": load_stage_model(ctx, info["positive"], trainable=False)}
    models["negative"] = models["positive"] if info["negative"] == info["positive"] \
        else load_stage_model(ctx, info["negative"], trainable=False)
    ref_path = reference_path(ctx) if cfg.weights.ref_logps else None
    if ref_path is not None:
        models["reference"] = load_stage_model(ctx, ref_path, trainable=False)
    span = cfg.weights.span
    if span != "token" and rule == "cdpo":
        raise ValueError(f"weights.span={span} with the cdpo rule: cDPO's scores are "
                         f"log-scores, not c_t, and are not pooled; use weights.span=token")
    train_raw, eval_raw = load_records(ctx)
    for split, raw in (("train", train_raw), ("eval", eval_raw)):
        drop = SCORE_COLUMNS + WEIGHT_COLUMNS + REF_COLUMNS + \
            (SPAN_COLUMNS if span == "word" else ())
        raw = raw.remove_columns([c for c in drop if c in raw.column_names])
        tok_pol = tokenize_records(ctx, raw, cfg.policy.method, f"weights {split}", tok_cfg)
        full = full_lengths(ctx, raw, tok_cfg, tok_pol)
        spans = span_rows(raw, tok_pol, span, ctx.tokenizer, full)
        if variant == "prompt":
            c = cfg.contrastive
            limit = max_positions_of(models["positive"].config.to_dict())
            pos_rows, neg_rows = _prompted_sides(ctx, raw, (c.positive_prompt,
                                                            c.negative_prompt),
                                                 tok_cfg, full, limit)
        else:
            pos_rows = neg_rows = list                # the policy's own rows
        shards, shard_size = [], SHARD
        for k, start in enumerate(range(0, len(tok_pol), shard_size)):
            sdir = os.path.join(out_dir, "_shards", f"{split}-{k:05d}")
            if not os.path.isdir(sdir) and ctx.par.owns(k):      # shards round-robin to ranks
                idx = range(start, min(start + shard_size, len(tok_pol)))
                pol = rows_of(tok_pol, idx)
                cols = _estimate_shard(ctx, pol, pos_rows(pol), neg_rows(pol),
                                       models, rule, params, impl,
                                       spans=None if spans is None else spans[idx.start:idx.stop])
                if ref_path is None:
                    for r in REF_COLUMNS:
                        cols.pop(r)
                datasets.Dataset.from_dict(cols).save_to_disk(sdir + ".tmp")
                os.replace(sdir + ".tmp", sdir)
                log.info("weights %s: shard %d (%d pairs) written", split, k, len(idx))
            shards.append(sdir)
        ctx.par.barrier()                        # every rank's shards are on disk
        if not ctx.par.is_main:                  # rank 0 merges them in record order
            continue
        est = datasets.concatenate_datasets([datasets.load_from_disk(d) for d in shards])
        if record_indices(est) != record_indices(tok_pol):   # shards of another split-up
            raise ValueError(f"weights {split}: the shards in {os.path.dirname(shards[0])} "
                             f"hold {len(est)} pairs, not this split's {len(tok_pol)} in "
                             f"order; delete that folder to redo them")
        if cfg.weights.balance != "none":        # over the kept tokens, before NaN-padding
            est = balance_weights(est, cfg.weights.balance,
                                  names=[f"record {i}" for i in est["record_index"]])
        if SOURCE_COLUMN in raw.column_names:    # file positions name records in errors only
            raw = raw.remove_columns(SOURCE_COLUMN)
        result = merge_columns(raw, est, full)
        result.save_to_disk(os.path.join(out_dir, split))
        if cfg.weights.jsonl:
            result.to_json(os.path.join(out_dir, f"{split}.jsonl"), lines=True)
    score_kind = "cdpo_log_score" if rule == "cdpo" else "c_t"
    meta = {"tokenize": asdict(tok_cfg), "policy_method": cfg.policy.method,
            "weight_method": rule, "weight_params": asdict(params), "score_kind": score_kind,
            "score": ("log softmax((1+b) z+ - b z-)[y_t], b = %g" % cfg.weights.cdpo_b
                      if rule == "cdpo" else
                      "c_t = log pi+(y_t) - log pi-(y_t) (the official code stores -c_t)"),
            "variant": variant, "positive": info["positive"], "negative": info["negative"],
            "reference": ref_path}
    if ctx.par.is_main:
        # each file renamed into place when complete; the shards go only once done.json is
        # there, so a kill at any point leaves either a finished pass or its shards
        write_json(os.path.join(out_dir, "meta.json"), meta)
        write_json(os.path.join(out_dir, DONE_FILE), {"stage": "weights", **meta})
        shutil.rmtree(os.path.join(out_dir, "_shards"), ignore_errors=True)
    ctx.par.barrier()
    return out_dir


# ---------------------------------------------------------------------------- at training time

def apply_rule(raw, rule, params, impl, *, score_kind: str = "c_t", span: str | None = None,
               span_reduce: str | None = None, balance: str | None = None, kept=None):
    """Records with ``*_weight`` recomputed from the stored ``*_score`` by ``rule``: the
    scores pooled over ``chosen_span``/``rejected_span`` first unless ``span`` is token, the
    weights balanced after (:mod:`tisdpo.pipeline.spans`). ``span``, ``span_reduce``,
    ``balance`` default to ``params``' (a ``RuleParams``; token, sum, none otherwise).
    ``kept``: by row, the (chosen, rejected) completion tokens that truncation keeps (None:
    all): the rule ranks, pools and balances those alone, as this stage did, and the tokens
    cut get weight NaN, as there (their stored scores are NaN: never read). A kept score
    that is not a finite number is an error naming the record and the field."""
    from tisdpo_kernels import token_weights

    span = span or getattr(params, "span", "token")
    reduce = span_reduce or getattr(params, "span_reduce", "sum")
    balance = balance or getattr(params, "balance", "none")
    if (rule == "cdpo") != (score_kind == "cdpo_log_score"):
        raise ValueError(f"policy.token_weights=recompute with weights.method={rule!r}: the "
                         f"stored scores are {score_kind!r}, which that rule cannot use; "
                         f"rerun `tisdpo weights` with weights.method={rule}")
    if span != "token":
        if rule == "cdpo":
            raise ValueError(f"weights.span={span} with the cdpo rule: cDPO's log-scores are "
                             f"not pooled; use weights.span=token")
        missing = [c for c in SPAN_COLUMNS if c not in raw.column_names]
        if missing:
            raise ValueError(f"policy.token_weights=recompute with weights.span={span}: the "
                             f"data has no {missing} column (`tisdpo weights` writes them "
                             f"with weights.span=word; span=column needs them in the records)")

    def fn(batch, indices):
        out = {}
        names = [s or f"record {i}" for i, s in zip(indices, batch[SOURCE_COLUMN])] \
            if SOURCE_COLUMN in batch else [f"record {i}" for i in indices]
        for k, (s_col, w_col, side) in enumerate(zip(SCORE_COLUMNS, WEIGHT_COLUMNS,
                                                     ("chosen", "rejected"))):
            full = batch[s_col]
            # a row absent from ``kept`` is one tokenisation skips (skip_invalid): none read
            n = [len(r) if kept is None else kept[i][k] if i in kept else 0
                 for i, r in zip(indices, full)]
            # the kept scores (the NaN of the tokens cut is never read), finite
            scores = [per_token_floats(r, name, s_col, len(r), m)[:m]
                      for r, m, name in zip(full, n, names)]
            c = torch.tensor([x for row in scores for x in row], dtype=torch.float32)
            seq = torch.cat([torch.full((len(r),), i) for i, r in enumerate(scores)])
            if span != "token":
                ids = batch[SPAN_COLUMNS[k]]
                for i, r, s in zip(indices, full, ids):
                    if s is None or len(s) != len(r):
                        raise ValueError(f"weights.span={span}: row {i}, field "
                                         f"{SPAN_COLUMNS[k]!r}: {0 if s is None else len(s)} "
                                         f"span ids for {len(r)} scores")
                ids = [s[:m] for s, m in zip(ids, n)]
                flat = [x for i, r in zip(indices, ids)
                        for x in span_ids(r, f"weights.span={span}: row {i}, field "
                                             f"{SPAN_COLUMNS[k]!r}")]
                c = pool_spans(c, torch.tensor(flat, dtype=torch.long), seq, reduce)
            w = token_weights(c, None if rule == "cdpo" else torch.zeros_like(c), side=side,
                              method=rule, params=params, seq_ids=seq, impl=impl)
            out[w_col] = [x.tolist() + [UNSCORED_PAD] * (len(r) - m)
                          for x, r, m in zip(w.split(n), full, n)]
        return out
    out = raw.map(fn, batched=True, with_indices=True, desc=f"weights: {rule}")
    return balance_weights(out, balance, kept=kept)


def random_weights(raw, lo: float, hi: float, seed: int):
    """Records with weights U(lo, hi) per token (seeded per record: order-independent)."""
    import numpy as np

    def fn(rec, i):
        rng = np.random.default_rng([seed, i])
        return {w: rng.uniform(lo, hi, len(rec[s])).tolist()
                for s, w in zip(SCORE_COLUMNS, WEIGHT_COLUMNS)}
    return raw.map(fn, with_indices=True, desc="weights: random")
