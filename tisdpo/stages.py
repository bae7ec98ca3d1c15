"""The stages of TIS-DPO(D) (algorithms.md §2–§5, design.md §6), each resumable.

Everything lives under ``run_dir`` and each stage reads what the previous one wrote:

    base/                     the tiny demo model's initial weights (when model.path is empty)
    sft/final/                optional SFT on the chosen responses          (stage ``sft``)
    contrastive/positive/final, contrastive/negative/final   pi+ and pi-    (``contrastive``)
    weights/{train,eval}/     records + per-token columns, save_to_disk      (``weights``)
    weights/{train,eval}.jsonl, weights/meta.json
    policy/final/             the trained policy                            (``train``)

A stage directory with ``done.json`` is finished and skipped on the next run (unless
``pipeline.resume`` is false); an unfinished training stage continues from its latest
checkpoint; the weight pass continues from its last finished shard.

Stored per-token columns (one value per completion token of ``tokenize_pairs`` under the
policy method's tokenisation, recorded in ``weights/meta.json``):

- ``chosen_score`` / ``rejected_score``: the raw contrastive score ``c_t = log pi+(y_t) −
  log pi−(y_t)`` — note: c_t itself, not the official code's stored ``−c_t``.
- ``chosen_weight`` / ``rejected_weight``: the final weights of the configured rule
  (``weights.method``, default the policy preset's: rank_based for ``tisdpo``), μ = +1 on
  chosen and −1 on rejected. Training uses these as they are; ``policy.token_weights=
  recompute`` applies another rule to the stored scores instead.
- ``ref_chosen_logps`` / ``ref_rejected_logps`` (``weights.ref_logps``): the reference
  model's log-probs, so policy training needs no reference model (unless its loss has a KL).

Tokens cut off by ``data.max_length`` get 0.0 in every column (they are cut again, with
their tokens, when the same configuration tokenises the records for training).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass

import torch

from tisdpo.config import PolicyConfig, RunConfig, TrainConfig
from tisdpo.model import head, load_model, load_tokenizer, resolve_device, save_model
from tisdpo.trainer import (
    PreferenceObjective, SFTObjective, Trainer, forward_hidden, read_done, rows_of, stage_done,
)

__all__ = ["Context", "StageStopped", "make_context", "load_records", "tokenize_cfg", "run_sft",
           "run_contrastive", "run_weights", "run_policy", "run_pipeline", "completion_logps",
           "make_collator", "weight_rule", "tokenize_records", "load_stage_model", "SCORE_COLUMNS"]

log = logging.getLogger("tisdpo")
SCORE_COLUMNS = ("chosen_score", "rejected_score")
WEIGHT_COLUMNS = ("chosen_weight", "rejected_weight")
REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
_SHARD = 2048


class StageStopped(Exception):
    """A training stage stopped early (``stop_after``), checkpointed and resumable."""

    def __init__(self, stage: str, step: int):
        super().__init__(f"{stage}: stopped after step {step}; run the same command again to "
                         f"resume")
        self.stage, self.step = stage, step


@dataclass
class Context:
    cfg: RunConfig
    device: torch.device
    tokenizer: object
    par: object = None      # tisdpo.distributed.Parallel (None: one process)

    def __post_init__(self):
        if self.par is None:
            from tisdpo.distributed import Parallel

            self.par = Parallel()

    def path(self, *parts: str) -> str:
        return os.path.join(self.cfg.run_dir, *parts)


def make_context(cfg: RunConfig) -> Context:
    """Device, tokenizer and run directory of a command (sets torch's CPU threads if asked)."""
    os.makedirs(cfg.run_dir, exist_ok=True)
    if cfg.threads is not None:
        if cfg.threads < 1:
            raise ValueError(f"threads must be >= 1, got {cfg.threads}")
        torch.set_num_threads(cfg.threads)
    from tisdpo.distributed import setup

    par = setup(cfg.distributed, cfg.device, cfg.model.dtype)   # torchrun: one rank of many
    if not par.is_main:
        log.setLevel(logging.WARNING)
    device = par.device if par.distributed else resolve_device(cfg.device)
    return Context(cfg, device, load_tokenizer(cfg.model), par)


# ---------------------------------------------------------------------------- models

def base_model_path(ctx: Context) -> str:
    """``model.path``, or ``run_dir/base`` holding the seeded tiny demo model (made once)."""
    if ctx.cfg.model.path:
        return ctx.cfg.model.path
    out = ctx.path("base")
    with ctx.par.main_first():
        if not os.path.isfile(os.path.join(out, "config.json")):
            model = load_model(ctx.cfg.model, None, device=torch.device("cpu"),
                               tokenizer=ctx.tokenizer, seed=ctx.cfg.seed, trainable=False)
            save_model(model, out + ".tmp", ctx.tokenizer)
            shutil.rmtree(out, ignore_errors=True)
            os.replace(out + ".tmp", out)
    return out


def init_path(ctx: Context) -> str:
    """Where every preference stage starts: the SFT model when SFT ran, else the base."""
    sft = ctx.path("sft")
    return os.path.join(sft, "final") if stage_done(sft) else base_model_path(ctx)


def reference_path(ctx: Context) -> str:
    choice = ctx.cfg.pipeline.reference
    sft = ctx.path("sft")
    if choice == "sft":
        if not stage_done(sft):
            raise ValueError("pipeline.reference=sft but the sft stage has not run "
                             f"({sft}/done.json missing); run `tisdpo sft` first")
        return os.path.join(sft, "final")
    if choice == "base":
        return base_model_path(ctx)
    return init_path(ctx)


def load_stage_model(ctx: Context, path: str, *, trainable: bool):
    return load_model(ctx.cfg.model, path, device=ctx.device, tokenizer=ctx.tokenizer,
                      seed=ctx.cfg.seed, trainable=trainable)


# ---------------------------------------------------------------------------- data

def load_records(ctx: Context):
    """(train, eval) raw preference records; the synthetic task when data.train is empty."""
    import datasets

    from tisdpo.data import load_preference_dataset

    cfg = ctx.cfg
    if not cfg.data.train:
        from tisdpo.synthetic import make_synthetic_task

        train, test, _ = make_synthetic_task(cfg.data.synthetic_train, cfg.data.synthetic_eval,
                                             seed=cfg.seed)
        train, test = datasets.Dataset.from_list(train), datasets.Dataset.from_list(test)
    else:
        train = load_preference_dataset(cfg.data.train)
        if cfg.data.eval:
            test = load_preference_dataset(cfg.data.eval)
        else:
            n_eval = max(1, round(len(train) * cfg.data.eval_fraction))
            split = train.train_test_split(test_size=n_eval, seed=cfg.seed, shuffle=True)
            train, test = split["train"], split["test"]
    if cfg.data.max_records is not None:
        train = train.select(range(min(cfg.data.max_records, len(train))))
    return train, test


def tokenize_cfg(cfg: RunConfig, method: str):
    """The TokenizeConfig of a stage whose loss is ``method`` ("sft" counts EOS)."""
    from tisdpo.data import TokenizeConfig, eos_counted_for_preset

    d = cfg.data
    add_eos = {"count": True, "ignore": False}.get(
        d.eos, True if method == "sft" else eos_counted_for_preset(method))
    return TokenizeConfig(max_length=d.max_length, max_prompt_length=d.max_prompt_length,
                          truncation=d.truncation, add_eos=add_eos, add_bos=d.add_bos,
                          skip_invalid=d.skip_invalid)


def tokenize_records(ctx: Context, raw, method: str, what: str, tok_cfg=None):
    from tisdpo.data import tokenize_pairs

    tok, report = tokenize_pairs(raw, ctx.tokenizer, tok_cfg or tokenize_cfg(ctx.cfg, method))
    log.info("%s: %s", what, report.summary())
    if len(tok) == 0:
        raise ValueError(f"{what}: no valid pairs left ({report.summary()})")
    return tok


def make_collator(ctx: Context, *, packed: bool | None = None):
    from tisdpo.collate import PackedPairCollator, PaddedPairCollator

    pad = ctx.tokenizer.pad_token_id
    mult = ctx.cfg.data.pad_to_multiple_of
    if ctx.cfg.data.packing if packed is None else packed:
        return PackedPairCollator(pad, pad_to_multiple_of=mult)
    return PaddedPairCollator(pad, pad_to_multiple_of=mult)


# ---------------------------------------------------------------------------- training stages

def _train(ctx: Context, tcfg: TrainConfig, out_dir: str, *, init: str, objective_fn,
           train_tok, eval_tok, desc: str, extra: dict | None = None) -> str:
    """Train a model from ``init`` into ``out_dir`` (resumable); returns out_dir/final."""
    final = os.path.join(out_dir, "final")
    if ctx.cfg.pipeline.resume and stage_done(out_dir):
        log.info("%s: already done (%s), skipping", desc, out_dir)
        return final
    model = load_stage_model(ctx, init, trainable=True)
    trainer = Trainer(model=model, objective=objective_fn(model), train_data=train_tok,
                      eval_data=eval_tok, collate_fn=make_collator(ctx), cfg=tcfg,
                      out_dir=out_dir, device=ctx.device, seed=ctx.cfg.seed, log=ctx.cfg.log,
                      tokenizer=ctx.tokenizer, desc=desc,
                      extra_done={"init": init, **(extra or {})}, parallel=ctx.par)
    result = trainer.train(resume=ctx.cfg.pipeline.resume)
    if result.get("stopped"):
        raise StageStopped(desc, result["step"])
    log.info("%s: done, %s", desc, _short(result))
    return final


def _short(metrics: dict) -> str:
    keys = ("loss", "eval/loss", "eval/rewards/accuracies", "eval/rewards/margins", "eval/nll")
    return ", ".join(f"{k}={metrics[k]:.4f}" for k in keys if k in metrics)


def run_sft(ctx: Context, *, side: str = "chosen", name: str = "sft", raw=None,
            init: str | None = None, tcfg: TrainConfig | None = None) -> str:
    """Supervised fine-tuning on one side's responses (token-mean NLL); returns final dir."""
    train_raw, eval_raw = load_records(ctx) if raw is None else raw
    tok_train = tokenize_records(ctx, train_raw, "sft", f"{name} train")
    tok_eval = tokenize_records(ctx, eval_raw, "sft", f"{name} eval")

    def objective(model):
        return SFTObjective(model_cfg=ctx.cfg.model, device=ctx.device, side=side,
                            impl=ctx.cfg.policy.impl, softcap=head(model).softcap)

    return _train(ctx, tcfg or ctx.cfg.sft, ctx.path(name), init=init or base_model_path(ctx),
                  objective_fn=objective, train_tok=tok_train, eval_tok=tok_eval, desc=name,
                  extra={"side": side})


def _preference_objective(ctx: Context, model, method: str, beta: float | None, impl: str, *,
                          ref_model, use_weights: bool):
    from tisdpo.loss import TISDPOLoss

    loss = TISDPOLoss(method=method, beta=beta, softcap=head(model).softcap, impl=impl)
    return PreferenceObjective(loss, model_cfg=ctx.cfg.model, device=ctx.device,
                               ref_model=ref_model, use_weights=use_weights)


def run_dpo(ctx: Context, tcfg: TrainConfig, out_dir: str, *, method: str, beta: float | None,
            train_raw, eval_raw, impl: str, desc: str) -> str:
    """A DPO-family run with an on-the-fly reference model (no token weights)."""
    if ctx.cfg.pipeline.resume and stage_done(out_dir):
        log.info("%s: already done (%s), skipping", desc, out_dir)
        return os.path.join(out_dir, "final")
    tok_train = tokenize_records(ctx, train_raw, method, f"{desc} train")
    tok_eval = tokenize_records(ctx, eval_raw, method, f"{desc} eval")
    ref_path = reference_path(ctx)
    ref = load_stage_model(ctx, ref_path, trainable=False)
    return _train(ctx, tcfg, out_dir, init=init_path(ctx), train_tok=tok_train,
                  eval_tok=tok_eval, desc=desc, extra={"reference": ref_path, "method": method},
                  objective_fn=lambda m: _preference_objective(
                      ctx, m, method, beta, impl, ref_model=ref, use_weights=False))


def run_contrastive(ctx: Context) -> tuple[str, str]:
    """pi+ and pi− per ``contrastive.variant``; returns their model directories."""
    from tisdpo.data import reverse_pairs

    c = ctx.cfg.contrastive
    root = ctx.path("contrastive")
    os.makedirs(root, exist_ok=True)
    pos_dir, neg_dir = os.path.join(root, "positive"), os.path.join(root, "negative")
    train_raw, eval_raw = load_records(ctx)
    if c.variant == "dpo":
        pos = run_dpo(ctx, c, pos_dir, method=c.method, beta=c.beta, train_raw=train_raw,
                      eval_raw=eval_raw, impl=ctx.cfg.policy.impl, desc="contrastive+")
        neg = run_dpo(ctx, c, neg_dir, method=c.method, beta=c.beta,
                      train_raw=reverse_pairs(train_raw), eval_raw=reverse_pairs(eval_raw),
                      impl=ctx.cfg.policy.impl, desc="contrastive-")
    elif c.variant == "sft":
        init = init_path(ctx)
        pos = run_sft(ctx, side="chosen", name="contrastive/positive",
                      raw=(train_raw, eval_raw), init=init, tcfg=c)
        neg = run_sft(ctx, side="rejected", name="contrastive/negative",
                      raw=(train_raw, eval_raw), init=init, tcfg=c)
    elif c.variant == "prompt":
        pos = neg = init_path(ctx)
    else:
        raise ValueError(f"contrastive.variant must be dpo, sft or prompt, got {c.variant!r}")
    if ctx.par.is_main:
        with open(os.path.join(root, "done.json"), "w", encoding="utf-8") as fh:
            json.dump({"variant": c.variant, "positive": pos, "negative": neg}, fh, indent=2)
    ctx.par.barrier()
    return pos, neg


def _contrastive_models(ctx: Context) -> dict:
    root = ctx.path("contrastive")
    if not stage_done(root):
        raise ValueError(f"the contrastive stage has not finished ({root}/done.json missing); "
                         f"run `tisdpo contrastive` first")
    return read_done(root)


# ---------------------------------------------------------------------------- weights

def weight_rule(cfg: RunConfig, method: str | None = None):
    """(weight method, WeightParams) from the weights section and the policy preset."""
    from tisdpo_kernels import WeightParams, get_preset

    w = cfg.weights
    rule = w.method or get_preset(method or cfg.policy.method).weight_method or "rank_based"
    params = WeightParams(k=w.k, lower=w.lower, upper=w.upper, clip_lower=w.clip_lower,
                          clip_upper=w.clip_upper, w_min=w.w_min, w_max=w.w_max,
                          top_percent=w.top_percent, round_decimals=w.round_decimals)
    return rule, params


@torch.no_grad()
def completion_logps(ctx: Context, model, batch: dict, impl: str) -> list[torch.Tensor]:
    """Per sequence (chosen rows, then rejected rows) the completion tokens' log-probs."""
    from tisdpo_kernels import linear_logprobs

    dev = {k: (v.to(ctx.device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    hidden, weight, bias = forward_hidden(model, dev, ctx.cfg.model, ctx.device, grad=False)
    logp = linear_logprobs(hidden, weight, dev["labels"], bias=bias,
                           softcap=head(model).softcap, impl=impl).float().cpu()
    labels = batch["labels"]
    return [logp[r][labels[r] != -100] for r in range(labels.shape[0])]


def _with_prefix(raw, prefix: str):
    """Records with ``prefix`` before each prompt (a system message for chat records)."""
    def fn(rec):
        p = rec["prompt"]
        if isinstance(p, str):
            return {"prompt": prefix + p}
        return {"prompt": [{"role": "system", "content": prefix.strip()}] + list(p)}
    return raw.map(fn, desc="contrastive prompt")


def _estimate_shard(ctx, rows_pol, rows_pos, rows_neg, models, rule, params, impl):
    """Columns for one shard of tokenised pairs (each list: rows in order)."""
    from tisdpo_kernels import token_weights

    collate = make_collator(ctx, packed=False)
    bs = ctx.cfg.weights.batch_size
    out = {k: [] for k in ("record_index",) + SCORE_COLUMNS + WEIGHT_COLUMNS + REF_COLUMNS}
    for start in range(0, len(rows_pol), bs):
        pol = rows_pol[start:start + bs]
        b = len(pol)
        lp_pos = completion_logps(ctx, models["positive"], collate(rows_pos[start:start + bs]), impl)
        lp_neg = completion_logps(ctx, models["negative"], collate(rows_neg[start:start + bs]), impl)
        ref = completion_logps(ctx, models["reference"], collate(pol), impl) \
            if models.get("reference") is not None else None
        for i in range(2 * b):
            if lp_pos[i].shape != lp_neg[i].shape:
                raise ValueError(f"record {pol[i % b]['record_index']}: pi+ and pi- see "
                                 f"different completion tokens ({lp_pos[i].numel()} vs "
                                 f"{lp_neg[i].numel()})")
        seq = torch.cat([torch.full((x.numel(),), i) for i, x in enumerate(lp_pos)])
        side = seq < b
        w = token_weights(torch.cat(lp_pos), torch.cat(lp_neg), side=side, method=rule,
                          params=params, seq_ids=seq, impl=impl)
        c = torch.cat(lp_pos) - torch.cat(lp_neg)
        if params.round_decimals is not None:
            c = torch.round(c, decimals=params.round_decimals)
        w_rows, c_rows = w.split([x.numel() for x in lp_pos]), c.split([x.numel() for x in lp_pos])
        for j, rec in enumerate(pol):
            out["record_index"].append(int(rec["record_index"]))
            for s, (cc, ww, rr) in enumerate(zip(SCORE_COLUMNS, WEIGHT_COLUMNS, REF_COLUMNS)):
                out[cc].append(c_rows[j + s * b].tolist())
                out[ww].append(w_rows[j + s * b].tolist())
                out[rr].append(ref[j + s * b].tolist() if ref is not None else None)
    return out


def run_weights(ctx: Context) -> str:
    """Offline token-weight estimation (+ reference log-probs); returns the weights dir."""
    import datasets

    cfg = ctx.cfg
    out_dir = ctx.path("weights")
    if cfg.pipeline.resume and stage_done(out_dir):
        log.info("weights: already done (%s), skipping", out_dir)
        return out_dir
    with ctx.par.main_first():
        if not cfg.pipeline.resume and ctx.par.is_main:
            shutil.rmtree(out_dir, ignore_errors=True)
        os.makedirs(out_dir, exist_ok=True)
    info = _contrastive_models(ctx)
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
    train_raw, eval_raw = load_records(ctx)
    for split, raw in (("train", train_raw), ("eval", eval_raw)):
        drop = [c for c in SCORE_COLUMNS + WEIGHT_COLUMNS + REF_COLUMNS if c in raw.column_names]
        raw = raw.remove_columns(drop)
        tok_pol = tokenize_records(ctx, raw, cfg.policy.method, f"weights {split}", tok_cfg)
        if variant == "prompt":
            c = cfg.contrastive
            tok_pos = tokenize_records(ctx, _with_prefix(raw, c.positive_prompt), "", "pi+ prompts",
                                tok_cfg)
            tok_neg = tokenize_records(ctx, _with_prefix(raw, c.negative_prompt), "", "pi- prompts",
                                tok_cfg)
        else:
            tok_pos = tok_neg = tok_pol
        shards = []
        for k, start in enumerate(range(0, len(tok_pol), _SHARD)):
            sdir = os.path.join(out_dir, "_shards", f"{split}-{k:05d}")
            if not os.path.isdir(sdir) and ctx.par.owns(k):      # shards round-robin to ranks
                idx = range(start, min(start + _SHARD, len(tok_pol)))
                cols = _estimate_shard(ctx, rows_of(tok_pol, idx), rows_of(tok_pos, idx),
                                       rows_of(tok_neg, idx), models, rule, params, impl)
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
        result = _merge(raw, est, _maybe_full(ctx, raw, tok_cfg, tok_pol))
        result.save_to_disk(os.path.join(out_dir, split))
        if cfg.weights.jsonl:
            result.to_json(os.path.join(out_dir, f"{split}.jsonl"), lines=True)
    meta = {"tokenize": asdict(tok_cfg), "policy_method": cfg.policy.method,
            "weight_method": rule, "weight_params": asdict(params),
            "score": "c_t = log pi+(y_t) - log pi-(y_t) (the official code stores -c_t)",
            "variant": variant, "positive": info["positive"], "negative": info["negative"],
            "reference": ref_path}
    if ctx.par.is_main:
        with open(os.path.join(out_dir, "meta.json"), "w", encoding="utf-8") as fh:
            json.dump(meta, fh, indent=2)
        shutil.rmtree(os.path.join(out_dir, "_shards"), ignore_errors=True)
        with open(os.path.join(out_dir, "done.json"), "w", encoding="utf-8") as fh:
            json.dump({"stage": "weights", **meta}, fh, indent=2)
    ctx.par.barrier()
    return out_dir


def _maybe_full(ctx, raw, tok_cfg, tok_pol):
    """Untruncated lengths only when the policy tokenisation cut something."""
    from tisdpo.data import tokenize_pairs

    probe = tok_cfg.replace(max_length=10**9, max_prompt_length=10**9 - 1)
    if all(len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"]))
           < tok_cfg.max_length for r in tok_pol):
        return None
    tok, _ = tokenize_pairs(raw, ctx.tokenizer, probe)
    return {int(r["record_index"]): (len(r["chosen_ids"]), len(r["rejected_ids"]))
            for r in tok}


def _merge(raw, est, full):
    """Raw records of the estimated pairs plus their per-token columns (0-padded to full)."""
    cols = est.to_dict()                       # plain lists (column access is lazy and slow)
    idx = cols.pop("record_index")             # tokenised order = increasing record index
    out = raw.select(idx)
    for name, vals in cols.items():
        if full is not None:
            side = 0 if "chosen" in name else 1
            vals = [v + [0.0] * (full[i][side] - len(v)) for i, v in zip(idx, vals)]
        out = out.add_column(name, vals)
    return out


# ---------------------------------------------------------------------------- policy

def _policy_data(ctx: Context, pcfg: PolicyConfig):
    """(train_raw, eval_raw, use_weights, has_ref) for policy training."""
    from tisdpo_kernels import get_preset

    preset = get_preset(pcfg.method)
    wdir = ctx.path("weights")
    if stage_done(wdir):
        import datasets

        train_raw = datasets.load_from_disk(os.path.join(wdir, "train"))
        eval_raw = datasets.load_from_disk(os.path.join(wdir, "eval"))
        meta = read_done(wdir)
        tok_now = asdict(tokenize_cfg(ctx.cfg, pcfg.method))
        tok_then = dict(meta["tokenize"])
        same = all(tok_now[k] == tok_then.get(k) for k in tok_now if k != "skip_invalid")
    else:
        train_raw, eval_raw = load_records(ctx)
        meta, same = None, False
    cols = set(train_raw.column_names)
    if not same:
        stale = [c for c in SCORE_COLUMNS + WEIGHT_COLUMNS + REF_COLUMNS if c in cols]
        if stale and meta is not None:
            log.info("policy (%s): the stored per-token columns were made for another "
                     "tokenisation (EOS/length); not using them", pcfg.method)
        train_raw, eval_raw = train_raw.remove_columns(stale), eval_raw.remove_columns(stale)
        cols -= set(stale)
    mode = pcfg.token_weights
    if mode == "auto":
        mode = "stored" if preset.weight_method is not None else "equal"
    has_scores = set(SCORE_COLUMNS) <= cols
    if mode == "stored" and not set(WEIGHT_COLUMNS) <= cols:
        raise ValueError(f"policy.method={pcfg.method!r} uses token weights but the data has no "
                         f"{WEIGHT_COLUMNS} columns: run `tisdpo weights` first (or set "
                         f"policy.token_weights=equal)")
    if mode in ("recompute", "random") and not has_scores:
        raise ValueError(f"policy.token_weights={mode} needs the weights stage's per-token "
                         f"columns ({SCORE_COLUMNS}); run `tisdpo weights` first")
    if mode == "recompute":
        rule, params = weight_rule(ctx.cfg, pcfg.method)
        train_raw, eval_raw = (_apply_rule(r, rule, params, pcfg.impl)
                               for r in (train_raw, eval_raw))
    elif mode == "random":
        lo, hi = ctx.cfg.weights.w_min, ctx.cfg.weights.w_max
        train_raw, eval_raw = (_random_weights(r, lo, hi, ctx.cfg.seed + k)
                               for k, r in enumerate((train_raw, eval_raw)))
    use = mode != "equal"
    if not use:
        drop = [c for c in WEIGHT_COLUMNS if c in train_raw.column_names]
        train_raw, eval_raw = train_raw.remove_columns(drop), eval_raw.remove_columns(drop)
    return train_raw, eval_raw, use, set(REF_COLUMNS) <= set(train_raw.column_names)


def _apply_rule(raw, rule, params, impl):
    from tisdpo_kernels import token_weights

    def fn(batch):
        out = {}
        for s_col, w_col, side in zip(SCORE_COLUMNS, WEIGHT_COLUMNS, ("chosen", "rejected")):
            scores = batch[s_col]
            c = torch.tensor([x for row in scores for x in row], dtype=torch.float32)
            seq = torch.cat([torch.full((len(r),), i) for i, r in enumerate(scores)])
            w = token_weights(c, torch.zeros_like(c), side=side, method=rule, params=params,
                              seq_ids=seq, impl=impl)
            out[w_col] = [x.tolist() for x in w.split([len(r) for r in scores])]
        return out
    return raw.map(fn, batched=True, desc=f"weights: {rule}")


def _random_weights(raw, lo: float, hi: float, seed: int):
    import numpy as np

    def fn(rec, i):
        rng = np.random.default_rng([seed, i])
        return {w: rng.uniform(lo, hi, len(rec[s])).tolist()
                for s, w in zip(SCORE_COLUMNS, WEIGHT_COLUMNS)}
    return raw.map(fn, with_indices=True, desc="weights: random")


def run_policy(ctx: Context, pcfg: PolicyConfig | None = None, name: str = "policy") -> str:
    """Policy training with ``policy.method`` on the weights stage's data; returns final dir."""
    pcfg = pcfg or ctx.cfg.policy
    out_dir = ctx.path(name)
    if ctx.cfg.pipeline.resume and stage_done(out_dir):
        log.info("%s: already done (%s), skipping", name, out_dir)
        return os.path.join(out_dir, "final")
    from tisdpo_kernels import get_preset

    preset = get_preset(pcfg.method)
    train_raw, eval_raw, use_weights, has_ref = _policy_data(ctx, pcfg)
    tok_train = tokenize_records(ctx, train_raw, pcfg.method, f"{name} train")
    tok_eval = tokenize_records(ctx, eval_raw, pcfg.method, f"{name} eval")
    needs_ref = not preset.config.reference_free and (preset.config.uses_kl or not has_ref)
    ref_path = reference_path(ctx) if needs_ref else None
    ref = load_stage_model(ctx, ref_path, trainable=False) if needs_ref else None
    return _train(ctx, pcfg, out_dir, init=init_path(ctx), train_tok=tok_train,
                  eval_tok=tok_eval, desc=name,
                  extra={"method": pcfg.method, "token_weights": pcfg.token_weights,
                         "reference": ref_path or "precomputed ref_logps"},
                  objective_fn=lambda m: _preference_objective(
                      ctx, m, pcfg.method, pcfg.beta, pcfg.impl, ref_model=ref,
                      use_weights=use_weights))


def run_pipeline(ctx: Context) -> dict:
    """SFT (when enabled) → pi+ / pi− → weights → policy; returns the output locations."""
    out = {}
    if ctx.cfg.sft.enabled:
        out["sft"] = run_sft(ctx)
    out["contrastive"] = run_contrastive(ctx)
    out["weights"] = run_weights(ctx)
    out["policy"] = run_policy(ctx)
    return out
