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

The weights stage and the per-token columns it stores are described in
:mod:`tisdpo.estimate`.
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
    PreferenceObjective, SFTObjective, Trainer, read_done, stage_done,
)

__all__ = ["Context", "StageStopped", "make_context", "load_records", "tokenize_cfg", "run_sft",
           "run_contrastive", "run_weights", "run_policy", "run_pipeline", "make_collator",
           "tokenize_records", "load_stage_model", "SCORE_COLUMNS"]

log = logging.getLogger("tisdpo")
SCORE_COLUMNS = ("chosen_score", "rejected_score")
WEIGHT_COLUMNS = ("chosen_weight", "rejected_weight")
REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
_SHARD = 2048          # pairs per shard of the weights pass (tisdpo.estimate reads it)


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
    # a model FSDP2 will train loads on the CPU; fully_shard moves it layer by layer
    device = ctx.par.load_device(ctx.device) if trainable else ctx.device
    return load_model(ctx.cfg.model, path, device=device, tokenizer=ctx.tokenizer,
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
           train_tok, eval_tok, desc: str, extra: dict | None = None,
           seed: int | None = None) -> str:
    """Train a model from ``init`` into ``out_dir`` (resumable); returns out_dir/final."""
    final = os.path.join(out_dir, "final")
    if ctx.cfg.pipeline.resume and stage_done(out_dir):
        log.info("%s: already done (%s), skipping", desc, out_dir)
        return final
    model = load_stage_model(ctx, init, trainable=True)
    trainer = Trainer(model=model, objective=objective_fn(model), train_data=train_tok,
                      eval_data=eval_tok, collate_fn=make_collator(ctx), cfg=tcfg,
                      out_dir=out_dir, device=ctx.device,
                      seed=ctx.cfg.seed if seed is None else seed, log=ctx.cfg.log,
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


# ---------------------------------------------------------------------------- policy

def _policy_data(ctx: Context, pcfg: PolicyConfig, seed: int | None = None):
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
    made_with = (meta or {}).get("weight_method")
    if mode == "stored" and made_with and preset.weight_method not in (None, made_with) \
            and ctx.cfg.weights.method is None:
        log.info("policy (%s): using the stored %s weights (this preset's own rule is %s; "
                 "policy.token_weights=recompute applies it)", pcfg.method, made_with,
                 preset.weight_method)
    if mode == "stored" and not set(WEIGHT_COLUMNS) <= cols:
        raise ValueError(f"policy.method={pcfg.method!r} uses token weights but the data has no "
                         f"{WEIGHT_COLUMNS} columns: run `tisdpo weights` first (or set "
                         f"policy.token_weights=equal)")
    if mode in ("recompute", "random") and not has_scores:
        raise ValueError(f"policy.token_weights={mode} needs the weights stage's per-token "
                         f"columns ({SCORE_COLUMNS}); run `tisdpo weights` first")
    if mode == "recompute":
        from tisdpo.estimate import apply_rule, weight_rule

        rule, params = weight_rule(ctx.cfg, pcfg.method)
        kind = (meta or {}).get("score_kind", "c_t")
        train_raw, eval_raw = (apply_rule(r, rule, params, pcfg.impl, score_kind=kind)
                               for r in (train_raw, eval_raw))
    elif mode == "random":
        lo, hi = ctx.cfg.weights.w_min, ctx.cfg.weights.w_max
        from tisdpo.estimate import random_weights

        base = ctx.cfg.seed if seed is None else seed
        train_raw, eval_raw = (random_weights(r, lo, hi, 2 * base + k)
                               for k, r in enumerate((train_raw, eval_raw)))
    use = mode != "equal"
    if not use:
        drop = [c for c in WEIGHT_COLUMNS if c in train_raw.column_names]
        train_raw, eval_raw = train_raw.remove_columns(drop), eval_raw.remove_columns(drop)
    return train_raw, eval_raw, use, set(REF_COLUMNS) <= set(train_raw.column_names)


def run_policy(ctx: Context, pcfg: PolicyConfig | None = None, name: str = "policy",
               seed: int | None = None) -> str:
    """Policy training with ``policy.method`` on the weights stage's data; returns final dir.

    ``seed`` (default: the run's) sets the data order and the random-weight ablation's draws.
    """
    pcfg = pcfg or ctx.cfg.policy
    out_dir = ctx.path(name)
    if ctx.cfg.pipeline.resume and stage_done(out_dir):
        log.info("%s: already done (%s), skipping", name, out_dir)
        return os.path.join(out_dir, "final")
    from tisdpo_kernels import get_preset

    preset = get_preset(pcfg.method)
    train_raw, eval_raw, use_weights, has_ref = _policy_data(ctx, pcfg, seed)
    tok_train = tokenize_records(ctx, train_raw, pcfg.method, f"{name} train")
    tok_eval = tokenize_records(ctx, eval_raw, pcfg.method, f"{name} eval")
    needs_ref = not preset.config.reference_free and (preset.config.uses_kl or not has_ref)
    ref_path = reference_path(ctx) if needs_ref else None
    ref = load_stage_model(ctx, ref_path, trainable=False) if needs_ref else None
    return _train(ctx, pcfg, out_dir, init=init_path(ctx), train_tok=tok_train,
                  eval_tok=tok_eval, desc=name,
                  extra={"method": pcfg.method, "token_weights": pcfg.token_weights,
                         "reference": ref_path or "precomputed ref_logps",
                         "seed": ctx.cfg.seed if seed is None else seed}, seed=seed,
                  objective_fn=lambda m: _preference_objective(
                      ctx, m, pcfg.method, pcfg.beta, pcfg.impl, ref_model=ref,
                      use_weights=use_weights))


def run_weights(ctx: Context) -> str:
    """The offline weights stage (:func:`tisdpo.estimate.run_weights`)."""
    from tisdpo.estimate import run_weights as run

    return run(ctx)


def run_pipeline(ctx: Context) -> dict:
    """SFT (when enabled) → pi+ / pi− → weights → policy; returns the output locations."""
    out = {}
    if ctx.cfg.sft.enabled:
        out["sft"] = run_sft(ctx)
    out["contrastive"] = run_contrastive(ctx)
    out["weights"] = run_weights(ctx)
    out["policy"] = run_policy(ctx)
    return out
