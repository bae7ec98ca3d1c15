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
  orders; mean ± standard error across seeds): held-out preference accuracy — the fraction
  of held-out pairs whose implicit reward Σ_t (log pi(y_t) − log pi_ref(y_t)) over the
  response's text tokens (no EOS, no weights: one yardstick for every method) is higher for
  the chosen response — and the task reward (#good − #bad words)/#words of responses sampled
  for held-out prompts (two samples per prompt at temperature 1, the same seed for every
  model; ``demo.do_sample=false`` for greedy), with the SFT reference as a baseline row; each
  ± one standard error (the reference row's, and with one seed every row's: over the held-out
  pairs, or over the prompts' mean rewards).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time

import datasets
import numpy as np
import torch

from tisdpo.pipeline import stages
from tisdpo.pipeline.context import (
    load_records, load_stage_model, make_collator, make_context, reference_path, tokenize_records,
)
from tisdpo.pipeline.spans import pool_spans, word_span_ids
from tisdpo.pipeline.weights import completion_logps, run_weights, weight_rule
from tisdpo.train.checkpoint import jsonable, read_done
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
    """(tokenised held-out pairs: text tokens, no EOS; the first ``demo.sample_prompts`` of
    their prompt ids): what the task reward is sampled for."""
    _, eval_raw = load_records(ctx)
    tok_eval = tokenize_records(ctx, eval_raw, "tisdpo", "demo eval")  # text, no EOS
    n = min(ctx.cfg.demo.sample_prompts, len(tok_eval))
    return tok_eval, [tok_eval[i]["prompt_ids"] for i in range(n)]


@torch.no_grad()
def sample_rewards(ctx, model, prompts: list[list[int]], info, *, seed: int) -> dict:
    """Mean task reward of ``demo.samples_per_prompt`` responses per prompt (one when
    greedy; same RNG stream for every model). ``reward_se``: the standard error over the
    per-prompt mean rewards (``prompt_rewards``; a prompt's samples are not independent)."""
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
    return {"reward": float(np.mean(rewards)), "reward_se": _se(by_prompt),
            "samples": len(rewards), "examples": examples, "prompt_rewards": by_prompt.tolist()}


def standard_error(values) -> float:
    """Standard error of the mean (sample standard deviation / √n); nan for fewer than 2."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else float("nan")


_se = standard_error


# ---------------------------------------------------------------------------- table

def _finite(x) -> bool:
    return x is not None and math.isfinite(x)


def format_table(res: dict) -> str:
    a = res["auc"]
    f = lambda x: "n/a" if x is None or x != x else f"{x:.3f}"  # noqa: E731
    lines = [
        f"## TIS-DPO demo, {res.get('task', 'easy')} task ({res['train_pairs']} training pairs, "
        f"{res['eval_pairs']} held out; "
        f"{res['policy_steps']} policy steps per method and seed, "
        f"{len(res.get('policy_seeds', [0]))} seed(s); wall time {res['wall_s']:.0f} s)",
        "",
        "Token weights vs planted token quality (AUC, 0.5 = chance):",
        "",
        "| estimate | chosen | rejected |",
        "|---|---|---|",
        f"| c_t = log pi+ - log pi-: good > bad, train | {f(a['train/chosen/score'])} | "
        f"{f(a['train/rejected/score'])} |",
        f"| c_t: good > bad, held-out | {f(a['eval/chosen/score'])} | "
        f"{f(a['eval/rejected/score'])} |",
        f"| c_t summed over each word's tokens: good > bad, train | "
        f"{f(a['train/chosen/word_score'])} | {f(a['train/rejected/word_score'])} |",
        f"| c_t summed over each word's tokens: good > bad, held-out | "
        f"{f(a['eval/chosen/word_score'])} | {f(a['eval/rejected/word_score'])} |",
        f"| {res['weight_method']} weights as used ({res.get('weight_span', 'token')} scores), "
        f"train (chosen: good > bad; rejected: bad > good) | {f(a['train/chosen/weight'])} | "
        f"{f(a['train/rejected/weight'])} |",
        "",
        "Policies from the same SFT model (same data, steps, optimiser, lr and beta):",
        "",
        "| method | held-out preference accuracy | task reward of sampled responses | "
        "accuracy by its own training reward |",
        "|---|---|---|---|",
    ]
    for row in res["rows"]:
        acc = "-" if row["accuracy"] is None else f"{row['accuracy']:.3f}"
        rew = f"{row['reward']:+.3f}"
        if _finite(row.get("accuracy_se")):     # nan (one pair, one prompt): no ± at all
            acc += f" ± {row['accuracy_se']:.3f}"
        if _finite(row.get("reward_se")):
            rew += f" ± {row['reward_se']:.3f}"
        own = "-" if row.get("own_accuracy") is None else f"{row['own_accuracy']:.3f}"
        lines.append(f"| {row['method']} | {acc} | {rew} | {own} |")
    n_seeds = len(res.get("policy_seeds", [0]))
    lines += ["", (f"Mean over {n_seeds} policy-training seeds ± its standard error across "
                   f"seeds (the reference row: ± the sampling standard error); "
                   if n_seeds > 1 else "± one standard error; ")
              + f"accuracy over {res['eval_pairs']} held-out pairs "
              f"(implicit reward = summed log-ratio over the text tokens, unweighted, for every "
              f"method); reward over {res['rows'][0].get('samples', '?')} sampled responses "
              f"({res.get('sampling', '')}); last column: the held-out accuracy of the implicit "
              f"reward each method trains (weighted for TIS-DPO and random, EOS counted for "
              f"DPO)."]
    lines += ["", res["note"]]
    return "\n".join(lines)


def _verdict(rows: dict, n_seeds: int, items: dict | None = None) -> str:
    """TIS-DPO against DPO per metric: the mean paired difference over seeds and its SE.

    One seed: the SE of the per-item differences in ``items`` (``{label: {"accuracy":
    per-pair wins, "reward": per-prompt rewards}}``: both models saw the same held-out pairs
    and prompts), else the two rows' SEs combined as if independent. A zero or undefined SE
    decides nothing: no "beat" and no "did NOT beat" from a difference whose spread was not
    measured, the summary calls that metric undecided."""
    t, d = rows["TIS-DPO"], rows["DPO"]
    parts, wins, losses, level, untested = [], [], [], [], []
    for key, name in (("reward", "task reward"), ("accuracy", "held-out accuracy")):
        diffs = np.asarray(t[f"{key}_per_seed"]) - np.asarray(d[f"{key}_per_seed"])
        diff = float(diffs.mean())
        if diffs.size > 1:
            se = _se(diffs)
        elif items and key in items.get("TIS-DPO", {}) and key in items.get("DPO", {}):
            se = _se(np.asarray(items["TIS-DPO"][key], dtype=np.float64)
                     - np.asarray(items["DPO"][key], dtype=np.float64))
        else:
            se = math.hypot(t.get(f"{key}_se") or 0.0, d.get(f"{key}_se") or 0.0)
        se = 0.0 if se < 1e-9 else se        # equal differences up to rounding: spread 0
        z = diff / se if se > 0 else math.nan              # se 0 or nan: no test
        seeds = ", ".join(f"{x:+.3f}" for x in diffs)
        zs = f"{z:+.1f} SE" if math.isfinite(z) else "SE 0: untested" if se == 0 \
            else "SE n/a: untested"
        parts.append(f"{name} {diff:+.3f} ({zs}; per seed {seeds})")
        if not math.isfinite(z):
            untested.append(name)
        elif z > 2:
            wins.append(name)
        elif z < -2:
            losses.append(name)
        else:
            level.append(name)
    if wins and losses:
        summary = f"Mixed: better on {', '.join(wins)}, worse on {', '.join(losses)}."
    elif wins:
        summary = f"TIS-DPO beat DPO on {' and '.join(wins)} by more than 2 standard errors."
    elif losses:
        summary = f"TIS-DPO did NOT beat DPO: worse on {' and '.join(losses)}."
    elif level and untested:
        summary = (f"TIS-DPO did NOT beat DPO beyond noise on {' and '.join(level)} (its "
                   f"difference is within 2 standard errors).")
    elif level:
        summary = ("TIS-DPO did NOT beat DPO beyond noise (no difference exceeds 2 standard "
                   "errors).")
    else:
        summary = ""
    if untested:                         # a difference whose spread was not measured
        summary = (f"{summary} Undecided on {' and '.join(untested)}: the standard error of "
                   f"the difference is 0 or not available, so it was not tested.").lstrip()
    scope = (f"Standard errors over {n_seeds} policy-training seeds (paired by seed); the "
             f"data, SFT model and pi+/pi- come from one seed, so they do not cover that "
             f"variation."
             if n_seeds > 1 else "One seed: the standard errors cover sampling and held-out-"
             "set noise, not run-to-run training variance.")
    return f"TIS-DPO vs DPO: {'; '.join(parts)}. {summary} {scope}"


def _aggregate(label: str, runs: list[dict]) -> dict:
    """Mean over seeds; SE across seeds when there are several, else within the one run."""
    row = {"method": label}
    for key in ("accuracy", "reward", "own_accuracy"):
        vals = [r[key] for r in runs if r.get(key) is not None]
        if not vals:
            row[key] = None
            continue
        row[key] = float(np.mean(vals))
        row[f"{key}_per_seed"] = vals
        if key != "own_accuracy":
            row[f"{key}_se"] = _se(vals) if len(vals) > 1 else runs[0].get(f"{key}_se")
    row["samples"] = runs[0].get("samples")
    row["examples"] = runs[0].get("examples", [])
    return row


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
    rows = [{"method": "reference (SFT)", "accuracy": None,
             **sample_rewards(ctx, ref, prompts, info, seed=cfg.seed)}]
    rows[0].pop("prompt_rewards")
    by_label, items = {}, {}
    for label, paths in finals.items():
        runs = []
        for path in paths:
            model = load_stage_model(ctx, path, trainable=False)
            sums = _sequence_sums(ctx, model, tok_eval, impl) - ref_sums
            wins = (sums[:, 0] > sums[:, 1]).double().numpy()
            own = read_done(os.path.dirname(path))["metrics"].get("eval/rewards/accuracies")
            runs.append({"accuracy": float(wins.mean()), "accuracy_se": _se(wins),
                         "own_accuracy": own,
                         **sample_rewards(ctx, model, prompts, info, seed=cfg.seed)})
            runs[-1]["wins"] = wins.tolist()
        items[label] = {"accuracy": runs[0]["wins"], "reward": runs[0]["prompt_rewards"]}
        by_label[label] = _aggregate(label, runs)
        rows.append(by_label[label])
    res = {
        "task": cfg.data.synthetic_task, "weight_span": cfg.weights.span,
        "train_pairs": len(load_records(ctx)[0]), "eval_pairs": len(tok_eval),
        "policy_steps": read_done(ctx.path(f"policy-tisdpo-seed{seeds[0]}"))["steps"],
        "policy_seeds": seeds,
        "weight_method": weight_rule(cfg)[0],
        "auc": weight_aucs(ctx, info), "rows": rows,
        "note": _verdict(by_label, len(seeds), items), "wall_s": time.perf_counter() - t0,
        "device": str(ctx.device), "sampling": "greedy" if not cfg.demo.do_sample else
        f"{cfg.demo.samples_per_prompt} per prompt, temperature {cfg.demo.temperature}, "
        f"seed {cfg.seed}",
    }
    table = format_table(res)
    print(table)
    write_results(ctx, res, table)
    return res


def write_results(ctx, res: dict, table: str) -> None:
    """The results as strict JSON (a nan standard error or AUC is null) and the table as
    markdown, in the run directory."""
    with open(ctx.path("demo_results.json"), "w", encoding="utf-8") as fh:
        json.dump(jsonable(res), fh, indent=2, allow_nan=False)
    with open(ctx.path("demo_results.md"), "w", encoding="utf-8") as fh:
        fh.write(table + "\n")
