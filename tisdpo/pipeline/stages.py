"""The stages of TIS-DPO(D) (docs/ALGORITHMS.md §2–§5, docs/DESIGN.md §6), each resumable.

Everything lives under ``run_dir`` and each stage reads what the previous one wrote:

    base/                     the tiny demo model's initial weights (when model.path is empty)
    sft/final/                optional SFT on the chosen responses          (stage ``sft``)
    contrastive/positive/final, contrastive/negative/final   pi+ and pi-    (``contrastive``)
    weights/{train,eval}/     records + per-token columns, save_to_disk      (``weights``)
    weights/{train,eval}.jsonl, weights/meta.json
    policy/final/             the trained policy                            (``train``)
    policies/<name>/final/    a named policy (``policy.name``), same upstream stages

A stage directory with ``done.json`` is finished and skipped on the next run (unless
``pipeline.resume`` is false); an unfinished training stage continues from its latest
checkpoint; the weight pass continues from its last finished shard.

Named policies: ``policy.name`` other than ``policy`` trains into ``policies/<name>/``
(:func:`policy_dir`), reading the run's sft, contrastive and weights stages like the default
policy does, so methods, learning rates and seeds compare on one set of upstream stages
(``tisdpo compare``). A policy folder's ``options.json`` records every ``policy.*`` option
except ``policy.name`` itself: the name is where the result is, not what it depends on, so
a changed option under an existing name is refused (never reported as done) while a new
name trains, and a finished policy folder can be renamed (``mv policies/a policies/b``)
and is still recognised under ``--policy.name b``.

The run's context (directories, data, tokenisation, collators) is
:mod:`tisdpo.pipeline.context`; the weights stage and the per-token columns it stores are
:mod:`tisdpo.pipeline.weights`.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, is_dataclass


from tisdpo.loss import TISDPOLoss
from tisdpo.pipeline.context import (
    REF_COLUMNS, SCORE_COLUMNS, WEIGHT_COLUMNS, Context, StageStopped, base_model_path,
    init_path, load_records, load_stage_model, log, make_collator, reference_path, tokenize_cfg,
    tokenize_records,
)
from tisdpo.pipeline.fingerprint import (
    StageOptionsChanged, contrastive_options, enter_stage, recorded_options, stage_options,
    upstream,
)
from tisdpo.pipeline.weights import apply_rule, random_weights, run_weights, weight_rule
from tisdpo.train.checkpoint import read_done, stage_done, write_json
from tisdpo.train.config import PolicyConfig, TrainConfig
from tisdpo.train.data import reverse_pairs, tokenize_pairs
from tisdpo.train.records import NEGATIVE_WEIGHTS, negative_values
from tisdpo.train.model import head
from tisdpo.train.objectives import PreferenceObjective, SFTObjective, displacement_warning
from tisdpo.train.trainer import Trainer
from tisdpo_kernels import get_preset

__all__ = ["run_sft", "run_dpo", "run_contrastive", "run_policy", "run_pipeline", "policy_dir",
           "POLICIES_DIR"]

#: where named policies live under run_dir (``policy.name`` other than "policy")
POLICIES_DIR = "policies"

# ---------------------------------------------------------------------------- training stages

def _train(ctx: Context, tcfg: TrainConfig, out_dir: str, *, init: str, objective_fn,
           train_tok, eval_tok, desc: str, options: dict, extra: dict | None = None,
           seed: int | None = None) -> str:
    """Train a model from ``init`` into ``out_dir`` (resumable); returns out_dir/final."""
    final = os.path.join(out_dir, "final")
    if enter_stage(ctx, out_dir, options, desc):
        return final
    model = load_stage_model(ctx, init, trainable=True, packed=True)
    trainer = Trainer(model=model, objective=objective_fn(model), train_data=train_tok,
                      eval_data=eval_tok, collate_fn=make_collator(ctx), cfg=tcfg,
                      out_dir=out_dir, device=ctx.device,
                      seed=ctx.cfg.seed if seed is None else seed, log=ctx.cfg.log,
                      tokenizer=ctx.tokenizer, desc=desc,
                      extra_done={"init": init, **(extra or {})}, parallel=ctx.par)
    result = trainer.train(resume=ctx.cfg.pipeline.resume)
    if result.get("stopped"):
        raise StageStopped(desc, result["step"], result.get("signal"))
    log.info("%s: done, %s", desc, _short(result))
    displacement_warning(result, desc)
    return final


def _short(metrics: dict) -> str:
    keys = ("loss", "eval/loss", "eval/rewards/accuracies", "eval/rewards/accuracies_unweighted",
            "eval/rewards/margins", "eval/logps/chosen_delta", "eval/logps/rejected_delta",
            "eval/nll")
    return ", ".join(f"{k}={metrics[k]:.4f}" for k in keys if k in metrics)


def _without(raw, columns):
    """``raw`` without the per-token ``columns`` a stage does not read (whose checks, e.g.
    NaN where another run's weights stage cut, would refuse records for nothing)."""
    return raw.remove_columns([c for c in columns if c in raw.column_names])


def run_sft(ctx: Context, *, side: str = "chosen", name: str = "sft", raw=None,
            init: str | None = None, tcfg: TrainConfig | None = None) -> str:
    """Supervised fine-tuning on one side's responses (token-mean NLL); returns final dir."""
    train_raw, eval_raw = (_without(r, SCORE_COLUMNS + WEIGHT_COLUMNS + REF_COLUMNS)
                           for r in (load_records(ctx) if raw is None else raw))
    tok_train = tokenize_records(ctx, train_raw, "sft", f"{name} train")
    tok_eval = tokenize_records(ctx, eval_raw, "sft", f"{name} eval")

    def objective(model):
        return SFTObjective(model_cfg=ctx.cfg.model, device=ctx.device, side=side,
                            impl=ctx.cfg.policy.impl, softcap=head(model).softcap)

    options = stage_options(ctx.cfg, ("sft",)) if tcfg is None else \
        contrastive_options(ctx, "sft")
    return _train(ctx, tcfg or ctx.cfg.sft, ctx.path(name), init=init or base_model_path(ctx),
                  objective_fn=objective, train_tok=tok_train, eval_tok=tok_eval, desc=name,
                  options=options, extra={"side": side})


def _preference_objective(ctx: Context, model, method: str, beta: float | None, impl: str, *,
                          ref_model, use_weights: bool, strategy: str = "auto",
                          filter_eps: float | None = None):
    loss = TISDPOLoss(method=method, beta=beta, softcap=head(model).softcap, impl=impl,
                      strategy=strategy, filter_eps=filter_eps)
    return PreferenceObjective(loss, model_cfg=ctx.cfg.model, device=ctx.device,
                               ref_model=ref_model, use_weights=use_weights,
                               eos_token_id=ctx.tokenizer.eos_token_id)


def run_dpo(ctx: Context, tcfg: TrainConfig, out_dir: str, *, method: str, beta: float | None,
            train_raw, eval_raw, impl: str, desc: str) -> str:
    """A DPO-family run with an on-the-fly reference model (no token weights)."""
    options = contrastive_options(ctx, "dpo")
    if enter_stage(ctx, out_dir, options, desc):
        return os.path.join(out_dir, "final")
    train_raw, eval_raw = (_without(r, SCORE_COLUMNS + WEIGHT_COLUMNS)   # unit weights
                           for r in (train_raw, eval_raw))
    tok_train = tokenize_records(ctx, train_raw, method, f"{desc} train")
    tok_eval = tokenize_records(ctx, eval_raw, method, f"{desc} eval")
    ref_path = reference_path(ctx)
    ref = load_stage_model(ctx, ref_path, trainable=False, packed=True)
    return _train(ctx, tcfg, out_dir, init=init_path(ctx), train_tok=tok_train,
                  eval_tok=tok_eval, desc=desc, options=options,
                  extra={"reference": ref_path, "method": method},
                  objective_fn=lambda m: _preference_objective(
                      ctx, m, method, beta, impl, ref_model=ref, use_weights=False))


def run_contrastive(ctx: Context) -> tuple[str, str]:
    """pi+ and pi− per ``contrastive.variant``; returns their model directories."""
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
        write_json(os.path.join(root, "done.json"),
                   {"variant": c.variant, "positive": pos, "negative": neg})
    ctx.par.barrier()
    return pos, neg


# ---------------------------------------------------------------------------- policy

#: the WeightParams fields each rule reads (docs/ALGORITHMS.md §2)
_RULE_FIELDS = {"exp_clamp": ("k", "lower", "upper"),
                "threshold_and_scale": ("clip_lower", "clip_upper", "w_min", "w_max"),
                "threshold": ("clip_lower", "clip_upper"), "rank_based": ("w_min", "w_max"),
                "binary": ("top_percent",), "cdpo": ("only_neg",), "origin": ()}


def _params_dict(params) -> dict:
    return asdict(params) if is_dataclass(params) else dict(vars(params))


def _rule_params(rule: str, params) -> str:
    """``k=1.0, lower=-0.5, ...``: the parameters ``rule`` uses (all of them if unknown)."""
    values = _params_dict(params)
    names = _RULE_FIELDS.get(rule, tuple(values))
    names = tuple(names) + (("round_decimals",) if values.get("round_decimals") is not None
                            else ())
    rule_fields = {f for fs in _RULE_FIELDS.values() for f in fs} | {"round_decimals"}
    names += tuple(n for n in values if n not in rule_fields)    # e.g. span options
    return ", ".join(f"{n}={values[n]}" for n in names if n in values) or "no parameters"


def policy_dir(name: str = "policy") -> str:
    """The folder (relative to run_dir) of the policy ``policy.name = name``: ``policy`` for
    the default name, else ``policies/<name>``."""
    return "policy" if name == "policy" else os.path.join(POLICIES_DIR, name)


def _recomputes_on_auto(ctx: Context, pcfg: PolicyConfig) -> bool:
    """Whether ``policy.token_weights=auto`` applies the preset's own rule to the stored
    scores: the weights stage made its weights with another rule (weights.method unset),
    under this tokenisation, from scores of the kind the preset's rule takes. Recorded
    among the policy's options, so a policy made before it was is not resumed as if it were."""
    rule, wdir = get_preset(pcfg.method).weight_method, ctx.path("weights")
    if pcfg.token_weights != "auto" or rule is None or ctx.cfg.weights.method is not None \
            or not stage_done(wdir):
        return False
    meta = read_done(wdir)
    made_with, kind = meta.get("weight_method"), meta.get("score_kind", "c_t")
    if made_with in (None, rule) or (rule == "cdpo") != (kind == "cdpo_log_score"):
        return False
    import datasets

    cols = datasets.load_from_disk(os.path.join(wdir, "train")).column_names
    return _same_tokenisation(ctx, pcfg, meta)[0] and set(SCORE_COLUMNS) <= set(cols)


def _same_tokenisation(ctx: Context, pcfg: PolicyConfig, meta: dict):
    """(whether the weights stage tokenised as ``pcfg.method`` does, then, now)."""
    tok_now = asdict(tokenize_cfg(ctx.cfg, pcfg.method))
    tok_then = dict(meta["tokenize"])
    return (all(tok_now[k] == tok_then.get(k) for k in tok_now if k != "skip_invalid"),
            tok_then, tok_now)


def _policy_data(ctx: Context, pcfg: PolicyConfig, seed: int | None = None):
    """(train_raw, eval_raw, use_weights, has_ref) for policy training."""
    return _policy_inputs(ctx, pcfg, seed)[:4]


def _policy_inputs(ctx: Context, pcfg: PolicyConfig, seed: int | None = None):
    """:func:`_policy_data` plus (the weights mode ``policy.token_weights`` resolved to, the
    rule of the weights used: None for equal or random ones)."""
    preset = get_preset(pcfg.method)
    wdir = ctx.path("weights")
    if stage_done(wdir):
        import datasets

        train_raw = datasets.load_from_disk(os.path.join(wdir, "train"))
        eval_raw = datasets.load_from_disk(os.path.join(wdir, "eval"))
        meta = read_done(wdir)
        same, tok_then, tok_now = _same_tokenisation(ctx, pcfg, meta)
    else:
        train_raw, eval_raw = load_records(ctx)
        meta, same = None, False
    cols = set(train_raw.column_names)
    hint = "run `tisdpo weights` first"
    if meta is not None and not same:      # a user's own per-token columns are used as given
        stale = [c for c in SCORE_COLUMNS + WEIGHT_COLUMNS + REF_COLUMNS if c in cols]
        hint = ("the weights stage's columns were made for another tokenisation ("
                + ", ".join(f"{k}={tok_then.get(k)!r} then, {v!r} now" for k, v in
                            tok_now.items() if k != "skip_invalid" and v != tok_then.get(k))
                + f", as method {pcfg.method!r} tokenises) and do not line up: run "
                  f"`tisdpo weights` for this tokenisation (another run_dir)")
        if stale:
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
            and ctx.cfg.weights.method is None and set(WEIGHT_COLUMNS) <= cols:
        if _recomputes_on_auto(ctx, pcfg):                   # this preset's own rule
            mode = "recompute"
        else:
            log.warning("policy (%s): using the stored %s weights, not this preset's own "
                        "rule %s (%s)", pcfg.method, made_with, preset.weight_method,
                        "policy.token_weights=stored" if pcfg.token_weights == "stored" else
                        "the data has no scores to apply it to" if not has_scores else
                        f"its scores are {(meta or {}).get('score_kind', 'c_t')}, which "
                        f"that rule does not take")
    if meta is not None and same:
        _check_stored_weights(ctx, pcfg, mode, made_with)
    if meta is None and mode == "stored" and set(WEIGHT_COLUMNS) <= cols:   # a user's own
        neg, total = negative_values(train_raw, WEIGHT_COLUMNS)
        if neg:
            log.warning(NEGATIVE_WEIGHTS, neg, total, "data.train")
    if mode == "stored" and not set(WEIGHT_COLUMNS) <= cols:
        raise ValueError(f"policy.method={pcfg.method!r} uses token weights but the data has no "
                         f"{WEIGHT_COLUMNS} columns: {hint} (or set "
                         f"policy.token_weights=equal)")
    if mode in ("recompute", "random") and not has_scores:
        raise ValueError(f"policy.token_weights={mode} needs the weights stage's per-token "
                         f"columns ({SCORE_COLUMNS}); {hint}")
    if mode == "recompute":
        rule, params = weight_rule(ctx.cfg, pcfg.method)
        kind = (meta or {}).get("score_kind", "c_t")
        log.info("policy (%s): token_weights=recompute: applying the weight rule %s (%s) to "
                 "the stored %s scores%s", pcfg.method, rule, _rule_params(rule, params), kind,
                 f" (the stored weights were made with {made_with})" if made_with else "")
        train_raw, eval_raw = (apply_rule(r, rule, params, pcfg.impl, score_kind=kind,
                                          kept=_kept(ctx, r, pcfg.method))
                               for r in (train_raw, eval_raw))
    elif mode == "random":
        lo, hi = ctx.cfg.weights.w_min, ctx.cfg.weights.w_max
        base = ctx.cfg.seed if seed is None else seed
        train_raw, eval_raw = (random_weights(r, lo, hi, 2 * base + k)
                               for k, r in enumerate((train_raw, eval_raw)))
    use = mode != "equal"
    if not use:
        drop = [c for c in WEIGHT_COLUMNS if c in train_raw.column_names]
        train_raw, eval_raw = train_raw.remove_columns(drop), eval_raw.remove_columns(drop)
    rule = weight_rule(ctx.cfg, pcfg.method)[0] if mode == "recompute" else \
        made_with if mode == "stored" else None
    return (train_raw, eval_raw, use, set(REF_COLUMNS) <= set(train_raw.column_names), mode,
            rule)


def _kept(ctx: Context, raw, method: str) -> dict[int, tuple[int, int]]:
    """By row of ``raw``, the (chosen, rejected) completion tokens the policy's tokenisation
    keeps: the weights stage's rule saw these alone (its columns are NaN past them)."""
    tok, _ = tokenize_pairs(raw, ctx.tokenizer, tokenize_cfg(ctx.cfg, method))
    return {int(i): (len(c), len(r)) for i, c, r in
            zip(tok["record_index"], tok["chosen_ids"], tok["rejected_ids"])}


def _check_stored_weights(ctx: Context, pcfg: PolicyConfig, mode: str, made_with) -> None:
    """Refuse ``weights.*`` options that policy training would ignore yet record: with the
    stored weights used as they are (``stored``) any of them, with ``recompute`` those only
    the weights stage applies (the scores' and reference log-probs' options)."""
    if mode not in ("stored", "recompute"):
        return
    wdir = ctx.path("weights")
    then = recorded_options(wdir)
    if then is None:                        # made before options were recorded
        return
    now = json.loads(json.dumps(stage_options(ctx.cfg, ("weights",))["options"]))
    _, params = weight_rule(ctx.cfg, pcfg.method)
    rule_keys = {"weights.method", *(f"weights.{n}" for n in _params_dict(params))}
    for k in sorted(k for k in then if k.startswith("weights.") and k in now):
        if then[k] == now[k] or (k == "weights.method" and now[k] in (None, made_with)):
            continue                        # unset: the stored rule, whichever it is
        if mode == "recompute" and k in rule_keys:
            continue                        # applied now, to the stored scores
        how = ("policy.token_weights=recompute applies this run's rule to the stored scores; "
               if k in rule_keys else "")
        raise StageOptionsChanged(
            f"policy ({pcfg.method}): the stored token weights ({wdir}) were made with other "
            f"weights.* options: {k}={then[k]!r} then, {now[k]!r} now; {how}give the options "
            f"they were made with, or rerun `tisdpo weights` with --pipeline.resume false to "
            f"remake them")


def run_policy(ctx: Context, pcfg: PolicyConfig | None = None, name: str | None = None,
               seed: int | None = None) -> str:
    """Policy training with ``policy.method`` on the weights stage's data; returns final dir.

    ``name``: the stage folder relative to run_dir (default: :func:`policy_dir` of
    ``pcfg.name``). ``seed`` (default: ``pcfg.seed``, else the run's) sets the data order and
    the random-weight ablation's draws.
    """
    pcfg = pcfg or ctx.cfg.policy
    name = name or policy_dir(pcfg.name)
    if seed is None:
        seed = pcfg.seed
    out_dir = ctx.path(name)
    options = stage_options(ctx.cfg, ("policy", "weights", "pipeline"), overrides={"policy": pcfg},
                            upstream=upstream(ctx, ctx.path("weights")))
    options["options"].pop("policy.name", None)      # the folder, not an option of the result
    # the policy's own seed (data order, random weights) as it resolves; ``seed`` stays the
    # run's, which made the base model, the train/eval split and the synthetic data
    options["options"]["policy.seed"] = ctx.cfg.seed if seed is None else seed
    if _recomputes_on_auto(ctx, pcfg):
        options["options"]["policy.token_weights_resolved"] = "recompute"
    if enter_stage(ctx, out_dir, options, name):
        return os.path.join(out_dir, "final")
    preset = get_preset(pcfg.method)
    train_raw, eval_raw, use_weights, has_ref, mode, rule = _policy_inputs(ctx, pcfg, seed)
    tok_train = tokenize_records(ctx, train_raw, pcfg.method, f"{name} train")
    tok_eval = tokenize_records(ctx, eval_raw, pcfg.method, f"{name} eval")
    needs_ref = not preset.config.reference_free and (preset.config.uses_kl or not has_ref)
    if preset.config.reference_free and not has_ref:
        log.info("%s (%s): reference-free, and the data has no stored reference log-probs: "
                 "rewards/accuracies_unweighted and logps/*_delta are not reported", name,
                 pcfg.method)
    ref_path = reference_path(ctx) if needs_ref else None
    ref = load_stage_model(ctx, ref_path, trainable=False, packed=True) if needs_ref \
        else None
    extra = {"method": pcfg.method, "token_weights": pcfg.token_weights,
             "reference": ref_path or "precomputed ref_logps",
             "seed": ctx.cfg.seed if seed is None else seed, "lr": pcfg.lr, "beta": pcfg.beta}
    extra.update(token_weights_used=mode, weight_rule=rule)
    if mode == "recompute":
        extra.update(weight_params=_params_dict(weight_rule(ctx.cfg, pcfg.method)[1]))
    return _train(ctx, pcfg, out_dir, init=init_path(ctx), train_tok=tok_train,
                  eval_tok=tok_eval, desc=name, options=options, extra=extra, seed=seed,
                  objective_fn=lambda m: _preference_objective(
                      ctx, m, pcfg.method, pcfg.beta, pcfg.impl, ref_model=ref,
                      use_weights=use_weights, strategy=pcfg.strategy,
                      filter_eps=pcfg.filter_eps))


def run_pipeline(ctx: Context) -> dict:
    """SFT (when enabled) → pi+ / pi− → weights → policy; returns the output locations."""
    out = {}
    if ctx.cfg.sft.enabled:
        out["sft"] = run_sft(ctx)
    out["contrastive"] = run_contrastive(ctx)
    out["weights"] = run_weights(ctx)
    out["policy"] = run_policy(ctx)
    return out
