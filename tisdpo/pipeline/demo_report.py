"""The demo's report: per-method rows (mean ± standard error over seeds and held-out items),
the TIS-DPO-vs-DPO verdict with its Student-t bound, the Markdown table and the JSON file.

Standard errors (:func:`~tisdpo.pipeline.stats.combined_se`): every policy is scored on the
same held-out pairs and prompts, so with several policy seeds the SE of a mean (or of a paired
difference) combines the spread across seeds with the spread across items of the
seed-averaged values; with one seed it is the SE over the items. The verdict calls a
difference a win (a loss) when it exceeds the two-sided 95% Student-t quantile at the
Welch–Satterthwaite degrees of freedom times that SE.
"""
from __future__ import annotations

import json
import math

import numpy as np

from tisdpo.pipeline.stats import combined_se, standard_error
from tisdpo.train.checkpoint import jsonable

__all__ = ["ITEMS", "format_table", "verdict", "aggregate", "write_results"]

#: a run's per-item values behind each metric: per held-out pair, per prompt
ITEMS = {"accuracy": "wins", "reward": "prompt_rewards"}


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
    eos = {"count": "EOS counted for every method", "ignore": "EOS counted for none"}.get(
        res.get("data_eos", "preset"), "EOS counted for DPO")
    prompts = res.get("sample_prompts", "?")
    lines += ["", (f"Mean over {n_seeds} policy-training seeds ± one standard error "
                   f"combining seeds and held-out items, √(SE across seeds² + SE over the "
                   f"held-out pairs (accuracy) or prompts (reward) of the seed-averaged "
                   f"values²) (the reference row, one model: ± the SE over prompts); "
                   if n_seeds > 1 else "± one standard error over the held-out pairs "
                   "(accuracy) or the prompts' mean rewards (reward); ")
              + f"accuracy over {res['eval_pairs']} held-out pairs "
              f"(implicit reward = summed log-ratio over the text tokens, no EOS, unweighted, "
              f"for every method); reward over {res['rows'][0].get('samples', '?')} sampled "
              f"responses to the prompts of the first {prompts} held-out pairs (training "
              f"prompts too: only the response pairs are held out; {res.get('sampling', '')}); "
              f"last column: the "
              f"held-out accuracy of the implicit reward each method trains (weighted for "
              f"TIS-DPO and random, {eos})."]
    lines += ["", res["note"]]
    return "\n".join(lines)


def _paired(rows: dict, items: dict | None, key: str):
    """TIS-DPO − DPO on ``key``: (per-seed differences, per-item differences [seeds, items]
    or None, :func:`~tisdpo.pipeline.stats.combined_se` of them)."""
    diffs = (np.asarray(rows["TIS-DPO"][f"{key}_per_seed"], dtype=np.float64)
             - np.asarray(rows["DPO"][f"{key}_per_seed"], dtype=np.float64))
    per_item = None
    if items and key in items.get("TIS-DPO", {}) and key in items.get("DPO", {}):
        per_item = (np.atleast_2d(np.asarray(items["TIS-DPO"][key], dtype=np.float64))
                    - np.atleast_2d(np.asarray(items["DPO"][key], dtype=np.float64)))
    return diffs, per_item, combined_se(diffs, per_item)


def verdict(rows: dict, n_seeds: int, items: dict | None = None) -> str:
    """TIS-DPO against DPO per metric: the mean paired difference, its SE and the two-sided
    95% Student-t bound; beyond the bound it is a win (or a loss), else within noise.

    ``items`` (``{label: {"accuracy": per-pair wins, "reward": per-prompt rewards}}``, one
    list per seed, or one flat list for one seed; every model saw the same held-out pairs and
    prompts): the SE is :func:`~tisdpo.pipeline.stats.combined_se` of the paired differences
    (seeds and items, Welch–Satterthwaite df); without ``items`` it is over seeds only (and
    with one seed there is none). An SE that is 0 or undefined decides nothing: no "beat" and
    no "did NOT beat"; the summary calls that metric undecided."""
    parts, wins, losses, level, untested, n_items = [], [], [], [], [], {}
    for key, name in (("reward", "task reward"), ("accuracy", "held-out accuracy")):
        diffs, per_item, st = _paired(rows, items, key)
        if per_item is not None:
            n_items[key] = per_item.shape[1]
        diff, se = float(diffs.mean()), st["se"]
        z = diff / se if se > 0 else math.nan              # se 0 or nan: no test
        seeds = ", ".join(f"{x:+.3f}" for x in diffs)
        zs = (f"{z:+.1f} SE of {se:.4f}; 95% t bound {st['bound']:.2f}, t_{st['df']:.0f}"
              if math.isfinite(z) else "SE 0: untested" if se == 0 else "SE n/a: untested")
        parts.append(f"{name} {diff:+.3f} ({zs}; per seed {seeds})")
        if not math.isfinite(z):
            untested.append(name)
        elif z > st["bound"]:
            wins.append(name)
        elif z < -st["bound"]:
            losses.append(name)
        else:
            level.append(name)
    rule = "the two-sided 95% t bound (|difference| / SE > t_df)"
    if wins and losses:
        summary = (f"Mixed: better on {', '.join(wins)}, worse on {', '.join(losses)}, each "
                   f"beyond {rule}.")
    elif wins:
        summary = f"TIS-DPO beat DPO on {' and '.join(wins)} beyond {rule}."
    elif losses:
        summary = f"TIS-DPO did NOT beat DPO: worse on {' and '.join(losses)} beyond {rule}."
    elif level and untested:
        summary = (f"TIS-DPO did NOT beat DPO beyond noise on {' and '.join(level)} (its "
                   f"difference is within {rule}).")
    elif level:
        summary = f"TIS-DPO did NOT beat DPO beyond noise (no difference is beyond {rule})."
    else:
        summary = ""
    if (wins or losses) and level:
        summary += f" Within the bound on {' and '.join(level)}."
    if untested:                         # a difference whose spread was not measured
        summary = (f"{summary} Undecided on {' and '.join(untested)}: the standard error of "
                   f"the difference is 0 or not available, so it was not tested.").lstrip()
    return f"TIS-DPO vs DPO: {'; '.join(parts)}. {summary} {_scope(n_seeds, n_items)}"


def _scope(n_seeds: int, n_items: dict) -> str:
    """What the verdict's standard errors cover, and what they do not."""
    fixed = "the data set, the SFT model and pi+/pi-: one of each (one seed)."
    what = "held-out items (" + "; ".join(
        f"the {n} {w}" for k, w in (("accuracy", "held-out pairs for accuracy"),
                                    ("reward", "prompts for the reward")) if (n := n_items.get(k)))
    what += ")"
    prompts = (" (the reward's prompts are the held-out pairs' prompts, which are training "
               "prompts: only the response pairs are held out)" if "reward" in n_items else "")
    if n_seeds > 1 and n_items:
        return (f"SE = √(SE over the {n_seeds} policy seeds² + SE over the {what} of the "
                f"seed-averaged paired differences²){prompts}: it covers training-seed "
                f"variation (data order, random weights), the draw of the held-out pairs and "
                f"prompts, and sampling (each policy seed samples with its own seed), counting "
                f"the seed×item interaction twice (conservative). Not covered: {fixed}")
    if n_seeds > 1:
        return (f"SE over the {n_seeds} policy seeds only (no per-item values): it leaves out "
                f"held-out-set and sampling noise shared by the seeds. Not covered either: "
                f"{fixed}")
    if n_items:
        return (f"One policy seed: SE over the {what} of the paired differences{prompts}: it "
                f"covers the draw of the held-out pairs and prompts, and sampling. Not "
                f"covered: training-seed variation; {fixed}")
    return "One policy seed and no per-item values: no standard error."


def aggregate(label: str, runs: list[dict]) -> dict:
    """Mean over seeds ± :func:`~tisdpo.pipeline.stats.combined_se` of the per-seed values
    and, where every run carries them (``wins``, ``prompt_rewards``), the per-item values;
    without those: the SE across seeds, or with one seed the run's own SE."""
    row = {"method": label}
    for key in ("accuracy", "reward", "own_accuracy"):
        vals = [r[key] for r in runs if r.get(key) is not None]
        if not vals:
            row[key] = None
            continue
        row[key] = float(np.mean(vals))
        row[f"{key}_per_seed"] = vals
        if key == "own_accuracy":
            continue
        per_item = [r[ITEMS[key]] for r in runs if ITEMS[key] in r]
        if len(per_item) == len(vals) == len(runs):
            st = combined_se(vals, per_item)
            row[f"{key}_se"], row[f"{key}_se_seeds"] = st["se"], st["se_seeds"]
        else:
            row[f"{key}_se"] = (standard_error(vals) if len(vals) > 1
                                else runs[0].get(f"{key}_se"))
    row["samples"] = runs[0].get("samples")
    row["examples"] = runs[0].get("examples", [])
    return row


def write_results(ctx, res: dict, table: str) -> None:
    """The results as strict JSON (a nan standard error or AUC is null) and the table as
    markdown, in the run directory."""
    with open(ctx.path("demo_results.json"), "w", encoding="utf-8") as fh:
        json.dump(jsonable(res), fh, indent=2, allow_nan=False)
    with open(ctx.path("demo_results.md"), "w", encoding="utf-8") as fh:
        fh.write(table + "\n")
