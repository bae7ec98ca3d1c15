"""The statistics the demo and `tisdpo compare` report, checked against independent
computations: AUC with ties, standard errors (n−1, /√n, nan for one value), pairing by seed,
the verdict's "N SE" figures, and the sampled reward's standard error over prompts."""
import json
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tisdpo import cli
from tisdpo.pipeline import compare
from tisdpo.pipeline.demo import auc, sample_rewards, standard_error
from tisdpo.pipeline.demo_report import verdict
from tisdpo.train.config import RunConfig
from tisdpo.train.synthetic import load_tokenizer, synthetic_info

ACC = "eval/rewards/accuracies_unweighted"


def _brute_auc(pos, neg):
    return float(np.mean([(a > b) + 0.5 * (a == b) for a in pos for b in neg]))


def test_auc_equals_the_pairwise_definition_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(100):
        pos = rng.integers(0, 4, rng.integers(1, 9))
        neg = rng.integers(0, 4, rng.integers(1, 9))
        assert auc(pos, neg) == pytest.approx(_brute_auc(pos, neg), abs=1e-12)
    assert math.isnan(auc([1.0], [])) and math.isnan(auc([], [1.0]))


def test_standard_errors_use_n_minus_1_and_sqrt_n():
    v = [0.2, 0.5, 0.9, 0.4]
    want = float(np.std(v, ddof=1) / math.sqrt(len(v)))
    assert standard_error(v) == pytest.approx(want)
    assert compare.mean_se(v) == pytest.approx((float(np.mean(v)), want))
    assert math.isnan(standard_error([0.3])) and math.isnan(compare.mean_se([0.3])[1])
    assert compare.mean_se([0.7, 0.7, 0.7]) == (0.7, 0.0)


def _rows(t_acc, d_acc, t_rew, d_rew, **se):
    return {"DPO": {"accuracy_per_seed": d_acc, "reward_per_seed": d_rew, **se},
            "TIS-DPO": {"accuracy_per_seed": t_acc, "reward_per_seed": t_rew, **se}}


def test_verdict_n_se_is_the_mean_paired_difference_over_its_se():
    t, d = [0.35, 0.25, 0.31, 0.40], [0.30, 0.20, 0.30, 0.30]
    diffs = np.subtract(t, d)
    z = diffs.mean() / (diffs.std(ddof=1) / 2)
    note = verdict(_rows([0.8] * 4, [0.7, 0.8, 0.8, 0.8], t, d), 4)
    se = diffs.std(ddof=1) / 2
    # no per-item values: the SE is over the seeds only, with 3 df, and the note says so
    assert f"task reward {diffs.mean():+.3f} ({z:+.1f} SE of {se:.4f}; 95% t bound 3.18, t_3;" \
        in note
    assert "SE over the 4 policy seeds only" in note


def test_one_seed_verdict_pairs_the_same_pairs_and_prompts():
    # both models judged on the same 16 pairs and 8 prompts: TIS-DPO wins one pair more, and
    # each prompt's reward is 0.05 higher; the per-row SEs (0.125, 0.1) hide that pairing
    d_wins = [1.0] * 8 + [0.0] * 8
    t_wins = [1.0] * 9 + [0.0] * 7
    d_rew = [0.4, -0.2, 0.1, 0.3, -0.1, 0.2, 0.0, 0.5]
    t_rew = [r + 0.05 + 0.01 * (i % 2) for i, r in enumerate(d_rew)]
    rows = _rows([np.mean(t_wins)], [np.mean(d_wins)], [np.mean(t_rew)], [np.mean(d_rew)],
                 accuracy_se=0.125, reward_se=0.1)
    items = {"DPO": {"accuracy": d_wins, "reward": d_rew},
             "TIS-DPO": {"accuracy": t_wins, "reward": t_rew}}
    note = verdict(rows, 1, items)
    acc_d = np.subtract(t_wins, d_wins)
    z_acc = acc_d.mean() / (acc_d.std(ddof=1) / 4)
    rew_d = np.subtract(t_rew, d_rew)
    z_rew = rew_d.mean() / (rew_d.std(ddof=1) / math.sqrt(8))
    assert f"held-out accuracy +0.062 ({z_acc:+.1f} SE of" in note         # +1.0 SE
    assert "t_15;" in note and "t_7;" in note                     # 16 pairs, 8 prompts
    assert f"task reward {rew_d.mean():+.3f} ({z_rew:+.1f} SE of" in note
    assert "TIS-DPO beat DPO on task reward beyond the two-sided 95% t bound" in note


def test_zero_spread_across_seeds_claims_nothing():
    # the same difference on every seed (up to float rounding) and no per-item values: SE 0,
    # so no "N SE" (it would be infinite, or 1e15 from the rounding residue); with per-item
    # values the items' spread decides (test_demo_stats.py)
    note = verdict(_rows([0.8] * 3, [0.8] * 3, [0.35, 0.45, 0.55], [0.30, 0.40, 0.50]), 3)
    assert "inf" not in note and "SE 0" in note
    assert "did NOT beat" not in note
    assert "Undecided on task reward and held-out accuracy" in note


def test_undefined_se_claims_nothing():
    # one seed, one sampled response each: the per-run SE is nan
    nan = float("nan")
    note = verdict(_rows([0.9], [0.8], [0.4], [0.3], accuracy_se=nan, reward_se=nan), 1)
    assert "inf" not in note and "SE n/a" in note
    assert "did NOT beat" not in note
    assert "Undecided on task reward and held-out accuracy" in note


class _PerPromptCompletion:
    """Generates " clear" after prompts ending in token ``good_last``, else " rude"."""

    def __init__(self, tok, good_last):
        self.good = torch.tensor(tok.encode(" clear", add_special_tokens=False))
        self.bad = torch.tensor(tok.encode(" rude", add_special_tokens=False))
        self.good_last = good_last

    def generate(self, input_ids, attention_mask, **kw):
        tails = [self.good if int(row[-1]) == self.good_last else self.bad
                 for row in input_ids]
        return torch.cat([input_ids, torch.stack(tails)], dim=1)


def test_sampled_reward_se_is_over_prompts_not_correlated_samples():
    tok = load_tokenizer()
    cfg = RunConfig()
    cfg.demo.do_sample, cfg.demo.samples_per_prompt, cfg.demo.max_new_tokens = True, 2, 4
    ctx = SimpleNamespace(cfg=cfg, tokenizer=tok, device=torch.device("cpu"))
    a = tok.encode("Write about cats:", add_special_tokens=False)
    b = tok.encode("Write about rivers", add_special_tokens=False)
    assert a[-1] != b[-1]
    out = sample_rewards(ctx, _PerPromptCompletion(tok, a[-1]), [a, b], synthetic_info(),
                         seed=0)
    # rewards [+1, +1, -1, -1]: two prompts, each answered identically twice
    assert out["samples"] == 4 and out["reward"] == 0.0
    assert out["reward_se"] == pytest.approx(standard_error([1.0, -1.0]))       # 1.0, not 0.58
    assert out["prompt_rewards"] == [1.0, -1.0]


def _policy(root, folder, seed, acc):
    path = os.path.join(root, "policies", folder)
    os.makedirs(path)
    with open(os.path.join(path, "done.json"), "w") as fh:
        json.dump({"stage": folder, "steps": 1, "method": "dpo", "token_weights": "auto",
                   "seed": seed, "metrics": {ACC: acc}}, fh)


def test_compare_pairs_by_seed_with_missing_seeds_and_zero_variance(tmp_path):
    r = str(tmp_path)
    base = {0: 0.50, 1: 0.62, 2: 0.71}
    other = {0: 0.55, 2: 0.90, 3: 0.40}                    # no seed 1; seed 3 unpaired
    flat = {0: 0.60, 1: 0.72}                              # the same +0.10 on both seeds
    for name, vals in (("dpo", base), ("tis", other), ("flat", flat)):
        for s, v in vals.items():
            _policy(r, f"{name}-s{s}", s, v)
    res = compare.summarize(compare.group_policies(compare.find_policies(r)), (ACC,))
    assert res["baseline"] == "dpo"
    tis = res["methods"]["tis"][ACC]
    assert tis["mean"] == pytest.approx(np.mean(list(other.values())))
    assert tis["se"] == pytest.approx(np.std(list(other.values()), ddof=1) / math.sqrt(3))
    p = res["paired"]["tis"][ACC]
    assert p["seeds"] == [0, 2] and p["n"] == 2
    d = [other[0] - base[0], other[2] - base[2]]
    assert p["mean"] == pytest.approx(np.mean(d))
    assert p["se"] == pytest.approx(np.std(d, ddof=1) / math.sqrt(2))
    assert res["paired"]["flat"][ACC]["se"] == pytest.approx(0.0, abs=1e-12)
    one = compare.summarize(compare.group_policies(
        {k: v for k, v in compare.find_policies(r).items() if k in ("dpo-s0", "tis-s0")}),
        (ACC,))
    assert math.isnan(one["paired"]["tis"][ACC]["se"])                   # n/a, not 0
    assert "(n=1)" in compare.format_markdown(one)


def test_compare_unknown_baseline_is_one_line(tmp_path, capsys):
    r = str(tmp_path)
    _policy(r, "dpo-s0", 0, 0.5)
    code = cli.main(["compare", "--run_dir", r, "--reward", "off", "--baseline", "ipo"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "--baseline 'ipo'" in err and len(err.splitlines()) == 1
