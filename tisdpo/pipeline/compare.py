"""``tisdpo compare``: the finished policies of one run directory, side by side.

Which policies: every finished policy stage under ``run_dir`` — ``policy/`` (named
``policy``), ``policies/<name>/`` (``--policy.name <name>``) and the demo's
``policy-<method>-seed<seed>/`` folders — optionally narrowed by ``--policies`` (shell-style
patterns over the names).

Methods and seeds: a policy's name is split by ``--group``, a regular expression with a
named group ``method`` and optionally ``seed``; the default, :data:`DEFAULT_GROUP`, reads
``<method>-s<seed>`` (also ``-seed<seed>``, ``_s<seed>``): ``tisdpo_lr3e-5-s1`` is method
``tisdpo_lr3e-5``, seed 1 (train it with ``--policy.name tisdpo_lr3e-5-s1 --policy.seed
1``; a name whose seed differs from the seed its done.json records is flagged). A name
without a seed part is its own method with the seed its done.json records. Two policies
with the same method and seed are an error.

Refused, naming the option and two policies (:func:`check_comparable`, from each policy's
``options.json``): policies evaluated on different held-out pairs (any ``data.*`` option,
the run's ``seed``, the model or tokenizer, ``policy.eval_max_pairs``), and, within a
method, policies trained differently (done.json's method or any recorded option other than
``policy.seed``): a method's seeds are repeats of one recipe.

What is compared: each policy's final held-out metrics from its ``done.json`` (by default
:data:`DEFAULT_METRICS`: the unweighted DPO implicit-reward accuracy, which means the same
for every method, the method's own accuracy, and the per-token likelihood displacement of
chosen and rejected responses; see ``tisdpo.train.objectives.comparable_metrics``), and, on
the synthetic task, the task reward of responses sampled from each policy for held-out
prompts (``tisdpo.pipeline.demo.sample_rewards``; same prompts and sampling seed for every
policy; ``--reward``).

Reported: per method the mean over its seeds ± the standard error across seeds (sample
standard deviation / √n; "n/a" for one seed), and per method the paired difference against
``--baseline`` (default ``dpo`` when present, else the first method in sorted order): the
mean over the seeds both have of (method − baseline) ± its standard error, which removes the
variation the seed shares (data order, random weights). Markdown on stdout, everything
(per policy values included) in ``<run_dir>/compare.json``. Policies whose chosen responses
lost likelihood against the reference (``objectives.displacement_warning``) are listed.
"""
from __future__ import annotations

import fnmatch
import logging
import math
import os
import re

from tisdpo.pipeline.fingerprint import OPTIONS_FILE, omitted_when_none
from tisdpo.pipeline.stages import POLICIES_DIR
from tisdpo.train.checkpoint import jsonable, read_done, read_json, stage_done, write_json
from tisdpo.train.config import RunConfig
from tisdpo.train.objectives import COLLAPSE_THRESHOLD

__all__ = ["DEFAULT_GROUP", "DEFAULT_METRICS", "find_policies", "group_policies", "summarize",
           "format_markdown", "run_compare", "mean_se", "check_comparable"]

log = logging.getLogger("tisdpo")

DEFAULT_GROUP = r"^(?P<method>.+?)(?:[-_]s(?:eed)?(?P<seed>\d+))?$"
DEFAULT_METRICS = ("eval/rewards/accuracies_unweighted", "eval/rewards/accuracies",
                   "eval/logps/chosen_delta", "eval/logps/rejected_delta")
REWARD = "reward"


def mean_se(values) -> tuple[float, float]:
    """(mean, standard error of the mean: sample standard deviation (n − 1) / √n); the error
    is nan for fewer than two values, exactly 0 for equal values."""
    v = [float(x) for x in values]
    if not v:
        return math.nan, math.nan
    if len(v) < 2:
        return v[0], math.nan
    if min(v) == max(v):                 # exactly 0, not a rounding residue of the mean
        return v[0], 0.0
    mean = sum(v) / len(v)
    var = sum((x - mean) ** 2 for x in v) / (len(v) - 1)
    return mean, math.sqrt(var / len(v))


def _is_policy(path: str) -> bool:
    if not stage_done(path):
        return False
    try:
        done = read_done(path)
    except (OSError, ValueError) as err:        # a finished stage whose record is damaged
        log.warning("%s: left out, %s", path, err)
        return False
    return isinstance(done, dict) and "token_weights" in done and "metrics" in done


def find_policies(run_dir: str, patterns=None) -> dict[str, str]:
    """{name: folder} of the finished policies under ``run_dir`` (see the module docstring),
    those matching one of ``patterns`` when given."""
    found: dict[str, str] = {}
    root = os.path.join(run_dir, POLICIES_DIR)
    named = sorted(os.listdir(root)) if os.path.isdir(root) else []
    top = sorted(d for d in (os.listdir(run_dir) if os.path.isdir(run_dir) else [])
                 if d == "policy" or d.startswith("policy-"))
    for name, path in [(n, os.path.join(root, n)) for n in named] + \
                      [(d, os.path.join(run_dir, d)) for d in top]:
        if not _is_policy(path):
            if os.path.isdir(os.path.join(path, "checkpoints")) and not stage_done(path) and \
                    (not patterns or any(fnmatch.fnmatchcase(name, p) for p in patterns)):
                log.warning("%s: not finished (checkpoints, no done.json), left out of the "
                            "comparison", path)
            continue
        if name in found:
            raise ValueError(f"two policies are named {name!r}: {found[name]} and {path}")
        found[name] = path
    if patterns:
        found = {n: p for n, p in found.items() if any(fnmatch.fnmatchcase(n, pat)
                                                      for pat in patterns)}
    return found


def group_policies(policies: dict[str, str], group: str | None = None) -> list[dict]:
    """One record per policy: name, folder, method, seed, the done.json metrics; policies
    that cannot be compared are refused (:func:`check_comparable`)."""
    try:
        rx = re.compile(group or DEFAULT_GROUP)
    except re.error as err:
        raise ValueError(f"--group {group!r} is not a regular expression: {err}") from None
    if "method" not in rx.groupindex:
        raise ValueError(f"--group {group!r} needs a named group (?P<method>...)")
    runs, seen = [], {}
    for name, path in sorted(policies.items()):
        done = read_done(path)
        m = rx.search(name)
        if m is None or not m.group("method"):
            raise ValueError(f"policy {name!r} does not match --group {rx.pattern!r}")
        seed = m.groupdict().get("seed")
        seed = int(seed) if seed is not None else int(done.get("seed", 0))
        key = (m.group("method"), seed)
        if key in seen:
            raise ValueError(f"policies {seen[key]!r} and {name!r} are both method {key[0]!r} "
                             f"with seed {seed}; name them <method>-s<seed> or pass --group")
        seen[key] = name
        metrics = {k: v for k, v in done.get("metrics", {}).items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        runs.append({"name": name, "dir": path, "method": key[0], "seed": seed,
                     "trained_seed": done.get("seed"),
                     "policy_method": done.get("method"), "steps": done.get("steps"),
                     "metrics": metrics})
    check_comparable(runs)
    return runs


#: the recorded options that say which held-out pairs a policy was evaluated on, and how
#: they were tokenised (``data.*`` by prefix); with the inputs' content identity
_EVAL_OPTIONS = ("seed", "model.path", "model.tokenizer", "policy.eval_max_pairs")


def _is_eval_option(name: str) -> bool:
    return name.startswith("data.") or name in _EVAL_OPTIONS


def _options(path: str) -> dict | None:
    """A policy's recorded options and its inputs' content identity (``input:<option>``);
    ``policy.seed`` also from an options.json written before it was recorded (then
    ``seed``). None without an options.json."""
    file = os.path.join(path, OPTIONS_FILE)
    if not os.path.isfile(file):
        return None
    doc = read_json(file)
    opts = dict(doc.get("options", {}))
    if "policy.seed" not in opts and "seed" in opts:   # then the policy's seed was ``seed``
        opts["policy.seed"] = opts.pop("seed")
    opts.pop("policy.name", None)
    return {**opts, **{f"input:{k}": v for k, v in doc.get("inputs", {}).items()}}


_UNRECORDED = object()


def _value(opts: dict, name: str):
    """An option's recorded value: one recorded only when set is None when absent, any other
    absent one (an older options.json) is not compared."""
    if name in opts:
        return opts[name]
    if omitted_when_none(name):
        return None
    return _UNRECORDED


def _difference(a: dict, b: dict, keep) -> str | None:
    """The first option (by name) ``keep`` selects whose values differ, said in words."""
    for name in sorted(k for k in set(a) | set(b) if keep(k)):
        va, vb = _value(a, name), _value(b, name)
        if _UNRECORDED not in (va, vb) and va != vb:
            if name.startswith("input:"):
                return f"{name.removeprefix('input:')} (its content: {va[:19]} vs {vb[:19]})"
            return f"{name}: {va!r} vs {vb!r}"
    return None


def check_comparable(runs: list[dict]) -> None:
    """Refuse (ValueError, one line naming two policies and the option) policies evaluated on
    different held-out pairs, and policies of one method trained differently (other than by
    their seed). Policies without an options.json are checked by done.json's method only."""
    opts = {r["name"]: _options(r["dir"]) for r in runs}
    recorded = [r["name"] for r in runs if opts[r["name"]] is not None]
    for name in recorded[1:]:
        diff = _difference(opts[recorded[0]], opts[name],
                           lambda k: _is_eval_option(k.removeprefix("input:")))
        if diff:
            raise ValueError(f"policies {recorded[0]!r} and {name!r} were evaluated on "
                             f"different held-out pairs: {diff}; compare policies trained "
                             f"with the same data and evaluation options")
    for method in sorted({r["method"] for r in runs}):
        first, *rest = [r for r in runs if r["method"] == method]
        for r in rest:
            a, b = opts[first["name"]], opts[r["name"]]
            if first["policy_method"] != r["policy_method"]:
                diff = f"done.json method: {first['policy_method']!r} vs {r['policy_method']!r}"
            elif a is not None and b is not None:
                diff = _difference(a, b, lambda k: k != "policy.seed")
            else:
                diff = None
            if diff:
                raise ValueError(f"policies {first['name']!r} and {r['name']!r} are both "
                                 f"method {method!r} but trained differently: {diff}; only "
                                 f"the seed may differ within a method (name them apart or "
                                 f"pass --group)")


def _stat(values) -> dict:
    mean, se = mean_se(values)
    return {"mean": mean, "se": se, "n": len(values)}


def summarize(runs: list[dict], metrics=DEFAULT_METRICS, baseline: str | None = None) -> dict:
    """Per method mean ± SE over seeds of each metric, and paired differences vs the
    baseline method over the seeds both have."""
    methods = sorted({r["method"] for r in runs})
    if not methods:
        raise ValueError("no policies to compare")
    if baseline is None:
        baseline = "dpo" if "dpo" in methods else methods[0]
    if baseline not in methods:
        raise ValueError(f"--baseline {baseline!r} is not one of the methods {methods}")
    by = {m: {r["seed"]: r for r in runs if r["method"] == m} for m in methods}
    table, paired = {}, {}
    for m in methods:
        row = {"seeds": sorted(by[m]), "policies": [by[m][s]["name"] for s in sorted(by[m])]}
        for k in metrics:
            row[k] = _stat([r["metrics"][k] for _, r in sorted(by[m].items())
                            if k in r["metrics"]])
        table[m] = row
        if m == baseline:
            continue
        prow = {}
        for k in metrics:
            common = sorted(s for s in by[m] if k in by[m][s]["metrics"]
                            and s in by[baseline] and k in by[baseline][s]["metrics"])
            diffs = [by[m][s]["metrics"][k] - by[baseline][s]["metrics"][k] for s in common]
            prow[k] = {**_stat(diffs), "seeds": common}
        paired[m] = prow
    warnings = [f"{r['name']}: chosen {r['metrics']['eval/logps/chosen_delta']:+.3f}, rejected "
                f"{r['metrics']['eval/logps/rejected_delta']:+.3f} nats/token vs the reference"
                for r in runs if r["metrics"].get("eval/logps/chosen_delta", 0.0)
                < -COLLAPSE_THRESHOLD and r["metrics"].get("eval/logps/rejected_delta", 0.0) < 0]
    notes = [f"{r['name']}: named seed {r['seed']} but trained with seed {r['trained_seed']} "
             f"(set --policy.seed)" for r in runs
             if r.get("trained_seed") is not None and r["trained_seed"] != r["seed"]]
    return {"baseline": baseline, "metrics": list(metrics), "methods": table,
            "paired": paired, "displacement": warnings, "seed_notes": notes, "policies": runs}


def _cell(stat: dict) -> str:
    if stat["n"] == 0:
        return "-"
    if math.isnan(stat["se"]):
        return f"{stat['mean']:+.4f} (n=1)"
    return f"{stat['mean']:+.4f} ± {stat['se']:.4f} (n={stat['n']})"


def _label(metric: str) -> str:
    return metric.removeprefix("eval/")


def format_markdown(res: dict, run_dir: str = "") -> str:
    metrics, base = res["metrics"], res["baseline"]
    head = "| method | seeds | " + " | ".join(_label(k) for k in metrics) + " |"
    rule = "|---|---|" + "---|" * len(metrics)
    n_pol = len(res["policies"])
    lines = [f"## tisdpo compare{': ' + run_dir if run_dir else ''} ({n_pol} policies, "
             f"{len(res['methods'])} methods)", "",
             "Per method: mean over seeds ± standard error across seeds.", "", head, rule]
    for m, row in res["methods"].items():
        seeds = ",".join(map(str, row["seeds"]))
        lines.append(f"| {m} | {seeds} | " + " | ".join(_cell(row[k]) for k in metrics) + " |")
    if res["paired"]:
        lines += ["", f"Paired difference vs {base} (method − {base} on the same seed; mean ± "
                      f"standard error over the seeds both have):", "",
                  head.replace("| seeds |", "| paired seeds |"), rule]
        for m, row in res["paired"].items():
            seeds = sorted({s for k in metrics for s in row[k]["seeds"]})
            lines.append(f"| {m} | {','.join(map(str, seeds)) or '-'} | "
                         + " | ".join(_cell(row[k]) for k in metrics) + " |")
    lines += ["", "rewards/accuracies_unweighted: the DPO implicit reward β·Σ(log π − log π_ref) "
                  "with unit token weights, one yardstick for every method; "
                  "rewards/accuracies: each method's own (weighted) reward, not comparable "
                  "across methods; logps/*_delta: per-token mean of log π − log π_ref."]
    if REWARD in metrics:
        lines += ["reward: task reward of responses sampled for the held-out pairs' prompts "
                  "(training prompts too: only the response pairs are held out), the same for "
                  "every policy, each sampling with its own seed (as the demo does)."]
    if res.get("seed_notes"):
        lines += ["", "Seeds: the name and the training seed differ (such runs may repeat "
                      "another seed's data order):"] + [f"- {n}" for n in res["seed_notes"]]
    if res["displacement"]:
        lines += ["", f"Likelihood displacement (chosen log-probs fell by more than "
                      f"{COLLAPSE_THRESHOLD} nats/token, rejected fell too; check samples):"]
        lines += [f"- {w}" for w in res["displacement"]]
    return "\n".join(lines)


def _sample_rewards(cfg: RunConfig, runs: list[dict]) -> None:
    """Adds ``metrics["reward"]`` to every run: the synthetic task's reward of sampled
    responses (the demo's sampling: the same prompts for every policy, each policy sampling
    with its own seed, so that policies of one seed are paired)."""
    from tisdpo.pipeline.context import load_stage_model, make_context
    from tisdpo.pipeline.demo import held_out_prompts, sample_rewards
    from tisdpo.train.synthetic import synthetic_info

    ctx = make_context(cfg)
    info = synthetic_info(cfg.data.synthetic_task)
    _, prompts = held_out_prompts(ctx)
    for r in runs:
        model = load_stage_model(ctx, os.path.join(r["dir"], "final"), trainable=False)
        out = sample_rewards(ctx, model, prompts, info, seed=r["seed"])
        r["metrics"][REWARD] = out["reward"]
        r["reward_samples"], r["reward_examples"] = out["samples"], out["examples"]
        del model


def run_compare(cfg: RunConfig, *, policies=None, group: str | None = None,
                baseline: str | None = None, metrics=None, reward: str = "auto",
                out: str | None = None) -> dict:
    """Compare the run's policies; prints Markdown, writes ``compare.json`` (or ``out``)."""
    if reward not in ("auto", "on", "off"):
        raise ValueError(f"--reward must be auto, on or off, got {reward!r}")
    synthetic = not cfg.data.train
    if reward == "on" and not synthetic:
        raise ValueError("--reward on: a task reward exists only for the synthetic task "
                         "(data.train empty)")
    found = find_policies(cfg.run_dir, policies)
    if not found:
        raise ValueError(f"no finished policies under {cfg.run_dir} (policy/, "
                         f"{POLICIES_DIR}/<name>/"
                         + (f" matching {list(policies)}" if policies else "") + ")")
    runs = group_policies(found, group)
    sampled = reward == "on" or (reward == "auto" and synthetic)
    if not metrics and not sampled and not any(k in r["metrics"] for r in runs
                                               for k in DEFAULT_METRICS):
        have = sorted({k for r in runs for k in r["metrics"]})
        raise ValueError(f"no held-out metrics: policies {[r['name'] for r in runs]} have none "
                         f"of {list(DEFAULT_METRICS)} in done.json (no eval split?); pass "
                         f"--metrics with keys they have: {have}")
    if metrics:
        have = sorted({k for r in runs for k in r["metrics"]})
        unknown = [k for k in metrics if k != REWARD and k not in have]
        if unknown:
            raise ValueError(f"--metrics {unknown[0]!r}: no policy's done.json has it; they "
                             f"have {have}")
    metrics = list(metrics or DEFAULT_METRICS)
    if sampled:
        _sample_rewards(cfg, runs)
        if REWARD not in metrics:
            metrics.append(REWARD)
    res = summarize(runs, metrics, baseline)
    text = format_markdown(res, cfg.run_dir)
    print(text)
    write_json(out or os.path.join(cfg.run_dir, "compare.json"), jsonable(res))
    return res
