"""``tisdpo demo``: the whole TIS-DPO(D) pipeline on a synthetic task, on a CPU, in minutes.

No download: a tiny Llama built from a config (random init, seeded) and the byte-level BPE
tokenizer shipped in the package. The easy task (:mod:`tisdpo.train.synthetic`): responses mix
good, bad and neutral words, each one token; the response with more good than bad words is
chosen, so chosen responses contain bad words and rejected ones good words — a sequence label
with token-level causes. The hard task (``--task hard``,
:mod:`tisdpo.train.synthetic_hard`): words of several tokens whose quality flips with the
prompt's audience; its demo pools c_t over each word before the weight rule
(``weights.span=word``), and ``demo.token_scores=true`` adds a TIS-DPO row with the same rule
on the per-token c_t.

Stages: SFT on the chosen responses (so the model speaks the task) -> pi+ by DPO on the pairs,
pi- by DPO on the reversed pairs -> offline weights (rank_based, the official code's
recipe) and reference log-probs -> four policies from the SFT model with the same data, steps,
optimiser, learning rate and beta:

- ``DPO``: the ``dpo`` preset (counts EOS, as the DPO reference code);
- ``TIS-DPO``: the ``tisdpo`` preset with the estimated weights (EOS not counted);
- ``random weights``: ``tisdpo`` with weights drawn U(0.7, 1.3) per token — the official
  code's ``random`` transform, the range of its rank-based rule (paper Table 2 ablation);
- ``equal weights``: ``tisdpo`` with every weight 1 (DPO without the EOS token).

Reported, as measured (nothing is tuned per method):

- AUC of the estimated token scores c_t = log pi+ − log pi- separating planted good from bad
  tokens (P(c_good > c_bad)), per side, on the training pairs (whose weights training uses)
  and on held-out pairs; and the AUC of the final weights in the direction the method wants
  (chosen: good tokens weighted above bad ones; rejected: bad above good).
- per policy (each trained ``demo.policy_seeds`` times, 3 by default, with different data
  orders and random weights): held-out preference accuracy — the fraction of held-out pairs
  whose implicit reward Σ_t (log pi(y_t) − log pi_ref(y_t)) over the response's text tokens
  (no EOS whatever ``data.eos`` says, no weights: one yardstick for every method) is higher
  for the chosen response — and the task reward (#good − #bad words)/#words of responses
  sampled for the held-out pairs' prompts (the first ``demo.sample_prompts``; they are
  training prompts too: only the response pairs are held out), two samples per prompt at
  temperature 1 (``demo.do_sample=false`` for greedy). Every policy of one policy seed
  samples with that seed, so sampling noise varies across seeds as training noise does; the
  SFT reference row samples with the first policy seed (``seed``).
- ± one standard error (:func:`~tisdpo.pipeline.stats.combined_se`): with several seeds
  √(SE over seeds² + SE over the held-out pairs, or prompts, of the seed-averaged values²),
  with one seed (and the reference row) the SE over the pairs or the prompts' mean rewards.
- a verdict, TIS-DPO against DPO per metric: the mean paired difference, its standard error
  (the same combination, of the paired differences) and the two-sided 95% Student-t bound at
  the Welch–Satterthwaite degrees of freedom (:func:`~tisdpo.pipeline.demo_report.verdict`).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time

import datasets
import numpy as np
import torch

from tisdpo.pipeline import stages
from tisdpo.pipeline.context import (
    load_records, load_stage_model, make_collator, make_context, reference_path, tokenize_cfg,
    tokenize_records,
)
from tisdpo.pipeline.demo_report import ITEMS, aggregate, format_table, verdict, write_results
from tisdpo.pipeline.spans import pool_spans, word_span_ids
from tisdpo.pipeline.stats import standard_error
from tisdpo.pipeline.weights import completion_logps, run_weights, weight_rule
from tisdpo.train.checkpoint import read_done
from tisdpo.train.config import RunConfig
from tisdpo.train.data import TokenizeConfig, tokenize_pairs
from tisdpo.train.synthetic import synthetic_info
from tisdpo.train.trainer import rows_of

__all__ = ["demo_config", "run_demo", "auc", "format_table", "held_out_prompts",
           "sample_rewards", "standard_error", "write_results"]

log = logging.getLogger("tisdpo")

#: (row label, run name, policy method, policy.token_weights)
POLICIES = (
    ("DPO", "dpo", "dpo", "equal"),
    ("TIS-DPO", "tisdpo", "tisdpo", "stored"),
    ("random weights", "random", "tisdpo", "random"),
    ("equal weights", "equal", "tisdpo", "equal"),
)
#: with ``weights.span`` word/column: TIS-DPO with the same rule applied to the per-token c_t
TOKEN_SCORES_ROW = "TIS-DPO, token scores"


def demo_config(fast: bool = False, task: str = "easy") -> RunConfig:
    """The demo's defaults (YAML and flags still override them). ``task="hard"``: the hard
    task (:mod:`tisdpo.train.synthetic_hard`) in its own run_dir, weights from word-pooled
    scores (``weights.span=word``: its words are several tokens), a lower policy lr and more
    epochs."""
    cfg = RunConfig(run_dir="runs/demo" if task == "easy" else f"runs/demo-{task}")
    cfg.data.synthetic_task = task
    cfg.data.max_length, cfg.data.max_prompt_length = 48, 16
    cfg.sft.enabled = True
    for t in (cfg.sft, cfg.contrastive, cfg.policy):
        t.optimizer, t.batch_size, t.weight_decay = "adamw", 16, 0.0
        t.warmup_steps, t.schedule, t.eval_batch_size = 10, "constant", 64
        t.max_grad_norm = 10.0
    cfg.sft.lr, cfg.sft.epochs = 2e-3, 2.0
    cfg.contrastive.lr, cfg.contrastive.epochs = 5e-4, 2.0
    cfg.policy.lr, cfg.policy.epochs = 5e-4, 2.0
    cfg.weights.batch_size = 64
    cfg.log.every = 10
    cfg.data.synthetic_train, cfg.data.synthetic_eval = 1200, 200
    cfg.demo.sample_prompts = 200
    if task == "hard":
        # at policy lr 5e-4 every method's samples degenerated into broken pieces, at 1e-4
        # some still did; 5e-5 for 4 epochs keeps every method's sampled reward above the
        # SFT model's (each setting measured with 3 seeds: docs/demo_results.md)
        cfg.weights.span = "word"
        cfg.policy.lr, cfg.policy.epochs = 5e-5, 4.0
    # one CPU thread: these matmuls are tiny, and on a busy 2-core machine torch's default
    # two threads made a training step 17x slower (measured); override with --threads
    cfg.threads = 1
    if fast:
        cfg.demo.fast = True
        cfg.run_dir += "-fast"               # its own stages: never mixed with the full demo's
        cfg.data.synthetic_train, cfg.data.synthetic_eval = 48, 16
        cfg.demo.sample_prompts, cfg.demo.max_new_tokens = 8, 8
        cfg.demo.samples_per_prompt, cfg.demo.policy_seeds = 1, 1
        for t in (cfg.sft, cfg.contrastive, cfg.policy):
            t.epochs, t.warmup_steps, t.eval_max_pairs = 1.0, 1, 16
        cfg.log.progress = False
    return cfg


def auc(pos, neg) -> float:
    """P(a > b) + ½·P(a = b) for a from ``pos``, b from ``neg`` (Mann–Whitney); nan if empty."""
    pos, neg = np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    allv = np.concatenate([pos, neg])
    order = np.argsort(allv, kind="mergesort")
    ranks = np.empty_like(allv)
    sorted_v = allv[order]
    i = 0
    while i < sorted_v.size:                      # average ranks over ties
        j = i
        while j + 1 < sorted_v.size and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    r_pos = ranks[:pos.size].sum()
    return float((r_pos - pos.size * (pos.size + 1) / 2.0) / (pos.size * neg.size))


# ---------------------------------------------------------------------------- weights AUC

def weight_aucs(ctx, info) -> dict:
    """AUC of stored scores and weights against the planted token labels, per split/side:
    ``score`` the per-token c_t, ``word_score`` c_t summed over each word's tokens
    (:func:`~tisdpo.pipeline.spans.word_span_ids`), ``weight`` the weights as stored."""
    wdir = ctx.path("weights")
    tok_cfg = TokenizeConfig(**read_done(wdir)["tokenize"])
    out = {}
    for split in ("train", "eval"):
        raw = datasets.load_from_disk(os.path.join(wdir, split))
        tok, _ = tokenize_pairs(raw, ctx.tokenizer, tok_cfg)
        for side in ("chosen", "rejected"):
            scores = list(raw[f"{side}_score"])
            weights = list(raw[f"{side}_weight"])
            c, cw, w = ({1: [], -1: []} for _ in range(3))
            for rec in tok:
                i = int(rec["record_index"])
                ids = rec[f"{side}_ids"]
                labels = info.token_labels(ids, ctx.tokenizer, rec["prompt_ids"])
                sc = torch.tensor(scores[i][:len(ids)], dtype=torch.float64)
                pooled = pool_spans(sc, torch.tensor(word_span_ids(ids, ctx.tokenizer)),
                                    torch.zeros(len(ids), dtype=torch.long), "sum").tolist()
                for lab, x, xw, wt in zip(labels, sc.tolist(), pooled, weights[i]):
                    if lab:
                        c[lab].append(x)
                        cw[lab].append(xw)
                        w[lab].append(wt)
            out[f"{split}/{side}/score"] = auc(c[1], c[-1])
            out[f"{split}/{side}/word_score"] = auc(cw[1], cw[-1])
            out[f"{split}/{side}/weight"] = auc(w[1], w[-1]) if side == "chosen" \
                else auc(w[-1], w[1])
            out[f"{split}/{side}/tokens"] = {"good": len(c[1]), "bad": len(c[-1])}
    return out


# ---------------------------------------------------------------------------- evaluation

def _sequence_sums(ctx, model, tok, impl: str) -> torch.Tensor:
    """[n, 2] summed completion log-probs (chosen, rejected) of tokenised pairs."""
    collate = make_collator(ctx, packed=False)
    out = []
    for start in range(0, len(tok), 64):
        rows = rows_of(tok, range(start, min(start + 64, len(tok))))
        lps = completion_logps(ctx, model, collate(rows), impl)
        b = len(rows)
        out.append(torch.stack([torch.stack([lps[j].sum(), lps[j + b].sum()])
                                for j in range(b)]))
    return torch.cat(out).double()


def held_out_prompts(ctx):
    """(tokenised held-out pairs: text tokens, no EOS whatever ``data.eos`` says; the first
    ``demo.sample_prompts`` of their prompt ids): what the task reward is sampled for. The
    prompts are the held-out pairs' prompts, which are training prompts too (the synthetic
    tasks have 12 or 24 prompt strings): only the response pairs are held out."""
    _, eval_raw = load_records(ctx)
    text_only = dataclasses.replace(tokenize_cfg(ctx.cfg, "tisdpo"), add_eos=False)
    tok_eval = tokenize_records(ctx, eval_raw, "tisdpo", "demo eval", text_only)
    n = min(ctx.cfg.demo.sample_prompts, len(tok_eval))
    return tok_eval, [tok_eval[i]["prompt_ids"] for i in range(n)]


@torch.no_grad()
def sample_rewards(ctx, model, prompts: list[list[int]], info, *, seed: int) -> dict:
    """Mean task reward of ``demo.samples_per_prompt`` responses per prompt (one when
    greedy), sampled in an RNG stream of its own seeded with ``seed``. ``reward_se``: the
    standard error over the per-prompt mean rewards (``prompt_rewards``; a prompt's samples
    are not independent)."""
    d, tok = ctx.cfg.demo, ctx.tokenizer
    pad = tok.pad_token_id
    per_prompt = max(d.samples_per_prompt, 1) if d.do_sample else 1
    prompts = [p for p in prompts for _ in range(per_prompt)]
    rewards, examples = [], []
    devices = [ctx.device] if ctx.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for start in range(0, len(prompts), 50):
            chunk = prompts[start:start + 50]
            width = max(len(p) for p in chunk)
            ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in chunk])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
            gen = model.generate(
                input_ids=ids.to(ctx.device), attention_mask=mask.to(ctx.device),
                max_new_tokens=d.max_new_tokens, do_sample=d.do_sample,
                temperature=d.temperature if d.do_sample else None, top_k=0 if d.do_sample
                else None, top_p=1.0 if d.do_sample else None, eos_token_id=tok.eos_token_id,
                pad_token_id=pad)
            for prompt, row in zip(chunk, gen[:, width:].cpu()):
                text = tok.decode(row, skip_special_tokens=True)
                rewards.append(info.reward(text, prompt, tok))
                if len(examples) < 3:
                    examples.append(text)
    by_prompt = np.asarray(rewards, dtype=np.float64).reshape(-1, per_prompt).mean(1)
    return {"reward": float(np.mean(rewards)), "reward_se": standard_error(by_prompt),
            "samples": len(rewards), "examples": examples, "prompt_rewards": by_prompt.tolist()}


def check_demo_options(cfg: RunConfig) -> None:
    """The demo's table (its rows, its task reward) is the synthetic task's, relative to the
    SFT model: own data, an own model or no SFT are a ValueError naming the option."""
    for name, value in (("data.train", cfg.data.train), ("data.eval", cfg.data.eval),
                        ("model.path", cfg.model.path)):
        if value:
            raise ValueError(f"{name}={value}: the demo runs on its synthetic task and tiny "
                             f"model (its rewards are the task's); use `tisdpo pipeline` and "
                             f"`tisdpo compare` for your own data or model")
    if not cfg.sft.enabled:
        raise ValueError("sft.enabled=false: the demo's policies and its reference row start "
                         "from the SFT model; use `tisdpo pipeline` to skip SFT")


def run_demo(cfg: RunConfig) -> dict:
    """Run every stage (resumable), evaluate, print and save the table; returns the results."""
    t0 = time.perf_counter()
    check_demo_options(cfg)
    info = synthetic_info(cfg.data.synthetic_task)
    ctx = make_context(cfg)
    stages.run_sft(ctx)
    stages.run_contrastive(ctx)
    run_weights(ctx)
    seeds = [cfg.seed + k for k in range(max(cfg.demo.policy_seeds, 1))]
    policies = list(POLICIES)
    token_ctx = ctx
    if cfg.demo.token_scores and cfg.weights.span != "token":   # the rule on c_t itself
        policies.insert(2, (TOKEN_SCORES_ROW, "tisdpo-token", "tisdpo", "recompute"))
        token_ctx = dataclasses.replace(ctx, cfg=dataclasses.replace(
            cfg, weights=dataclasses.replace(cfg.weights, span="token", balance="none")))
    finals: dict[str, list[str]] = {label: [] for label, *_ in policies}
    for seed in seeds:
        for label, name, method, weights in policies:
            pcfg = dataclasses.replace(cfg.policy, method=method, token_weights=weights)
            run_ctx = token_ctx if label == TOKEN_SCORES_ROW else ctx
            finals[label].append(stages.run_policy(
                run_ctx, pcfg, name=f"policy-{name}-seed{seed}", seed=seed))
    log.info("demo: evaluating")

    impl = cfg.policy.impl
    tok_eval, prompts = held_out_prompts(ctx)
    ref = load_stage_model(ctx, reference_path(ctx), trainable=False)
    ref_sums = _sequence_sums(ctx, ref, tok_eval, impl)
    # each policy seed samples with its own seed (the reference: the first policy seed's)
    rows = [{"method": "reference (SFT)", "accuracy": None,
             **sample_rewards(ctx, ref, prompts, info, seed=seeds[0])}]
    rows[0].pop("prompt_rewards")
    by_label, items = {}, {}
    for label, paths in finals.items():
        runs = []
        for seed, path in zip(seeds, paths):
            model = load_stage_model(ctx, path, trainable=False)
            sums = _sequence_sums(ctx, model, tok_eval, impl) - ref_sums
            wins = (sums[:, 0] > sums[:, 1]).double().numpy()
            own = read_done(os.path.dirname(path))["metrics"].get("eval/rewards/accuracies")
            runs.append({"accuracy": float(wins.mean()), "accuracy_se": standard_error(wins),
                         "own_accuracy": own,
                         **sample_rewards(ctx, model, prompts, info, seed=seed)})
            runs[-1]["wins"] = wins.tolist()
        items[label] = {key: [r[name] for r in runs] for key, name in ITEMS.items()}
        by_label[label] = aggregate(label, runs)
        rows.append(by_label[label])
    res = {
        "task": cfg.data.synthetic_task, "weight_span": cfg.weights.span,
        "train_pairs": len(load_records(ctx)[0]), "eval_pairs": len(tok_eval),
        "policy_steps": read_done(ctx.path(f"policy-tisdpo-seed{seeds[0]}"))["steps"],
        "policy_seeds": seeds,
        "weight_method": weight_rule(cfg)[0],
        "auc": weight_aucs(ctx, info), "rows": rows,
        "note": verdict(by_label, len(seeds), items), "wall_s": time.perf_counter() - t0,
        "device": str(ctx.device), "data_eos": cfg.data.eos, "sample_prompts": len(prompts),
        "sampling": ("greedy" if not cfg.demo.do_sample else
                     f"{cfg.demo.samples_per_prompt} per prompt, temperature "
                     f"{cfg.demo.temperature}")
        + f"; each policy seed's models sample with that seed ({', '.join(map(str, seeds))}), "
        f"the reference with {seeds[0]}",
        "items": items,
    }
    table = format_table(res)
    print(table)
    write_results(ctx, res, table)
    return res
