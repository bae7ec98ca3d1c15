"""The demo's verdict statistics: the Student-t quantile (no scipy), the standard error that
combines policy seeds with held-out items and its Welch–Satterthwaite degrees of freedom,
the verdict's decisions under that rule, the per-row ± it reports, the sampling seed each
policy seed samples with, and the held-out accuracy's text tokens whatever data.eos says."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tisdpo.pipeline import demo
from tisdpo.pipeline.demo import demo_config, held_out_prompts
from tisdpo.pipeline.demo_report import aggregate, verdict
from tisdpo.pipeline.stats import betainc, combined_se, t_cdf, t_quantile
from tisdpo.train.synthetic import load_tokenizer


@pytest.mark.parametrize("p,df,want", [
    (0.975, 1, 12.7062), (0.975, 2, 4.3027), (0.975, 3, 3.1824), (0.975, 10, 2.2281),
    (0.975, 30, 2.0423), (0.95, 3, 2.3534), (0.995, 5, 4.0321), (0.975, 1e6, 1.9600),
    (0.025, 2, -4.3027), (0.5, 7, 0.0)])
def test_t_quantile_matches_the_tables(p, df, want):
    assert t_quantile(p, df) == pytest.approx(want, abs=5e-5)


def test_t_distribution_and_incomplete_beta_closed_forms():
    for t in (-3.0, -0.5, 0.0, 0.7, 2.0, 9.0):
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)  # Cauchy
        assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(t * t + 2)), abs=1e-12)
    assert betainc(2, 3, 0.4) == pytest.approx(0.5248, abs=1e-12)     # binomial tail
    assert betainc(0.5, 0.5, 0.3) == pytest.approx(2 / math.pi * math.asin(math.sqrt(0.3)))
    assert t_cdf(t_quantile(0.9, 4), 4) == pytest.approx(0.9, abs=1e-12)


# paired differences of 3 seeds on 4 items: per-seed means 0.15, 0.2, 0.175 (SE 0.025/√3);
# seed-averaged items 0.1, 0.3, 0.1, 0.2 (SE √(0.0275/3/4)); combined √(0.0025) = 0.05;
# df = 0.0025² / ((0.025²/3)²/2 + (0.0275/12)²/3) = 3.53 -> 3
HAND = [[0.1, 0.3, 0.0, 0.2], [0.2, 0.4, 0.1, 0.1], [0.0, 0.2, 0.2, 0.3]]


def test_combined_se_and_df_on_a_hand_made_example():
    st = combined_se(np.mean(HAND, axis=1), HAND)
    assert st["se_seeds"] == pytest.approx(0.025 / math.sqrt(3))
    assert st["se_items"] == pytest.approx(math.sqrt(0.0275 / 12))
    assert st["se"] == pytest.approx(0.05)
    assert st["df"] == 3 and st["bound"] == pytest.approx(3.1824, abs=5e-5)
    one = combined_se([np.mean(HAND[0])], HAND[0])                 # one seed: the item SE
    assert one["se"] == pytest.approx(np.std(HAND[0], ddof=1) / 2) and one["df"] == 3
    flat = combined_se([0.1, 0.2, 0.3], [[0.1] * 5, [0.2] * 5, [0.3] * 5])  # no item spread
    assert flat["se"] == pytest.approx(0.1 / math.sqrt(3)) and flat["df"] == 2
    none = combined_se([0.1, 0.1], [[0.1] * 3, [0.1] * 3])
    assert none["se"] == 0 and math.isnan(none["df"])
    for bad in (combined_se([0.1, math.nan, 0.2], HAND),          # no SE from the rest alone
                combined_se(np.mean(HAND, axis=1), [[math.nan, *HAND[0][1:]], *HAND[1:]])):
        assert all(math.isnan(bad[k]) for k in ("se", "df", "bound", "se_seeds", "se_items"))


def _case(rew_items_t, rew_items_d, acc_items_t, acc_items_d):
    """Rows and items of TIS-DPO and DPO from per-seed item lists ([seeds, items])."""
    rows, items = {}, {}
    for label, rew, acc in (("TIS-DPO", rew_items_t, acc_items_t),
                            ("DPO", rew_items_d, acc_items_d)):
        rows[label] = {"reward_per_seed": [float(np.mean(r)) for r in rew],
                       "accuracy_per_seed": [float(np.mean(a)) for a in acc]}
        items[label] = {"reward": [list(r) for r in rew], "accuracy": [list(a) for a in acc]}
    return rows, items


def _noise(rng, seeds, n, sd):
    e = rng.normal(0.0, sd, (seeds, n))
    return e - e.mean(axis=1, keepdims=True)                 # exact per-seed means


def test_verdict_clear_win_states_the_t_rule():
    rng = np.random.default_rng(0)
    d_rew = rng.normal(0.3, 0.2, (3, 200))
    t_rew = d_rew + 0.1 + _noise(rng, 3, 200, 0.05)
    acc = (rng.random((3, 200)) < 0.8).astype(float)
    rows, items = _case(t_rew, d_rew, acc, acc)
    note = verdict(rows, 3, items)
    st = combined_se(np.mean(t_rew - d_rew, axis=1), t_rew - d_rew)
    z = 0.1 / st["se"]
    assert f"task reward +0.100 ({z:+.1f} SE of {st['se']:.4f}; 95% t bound " \
           f"{st['bound']:.2f}, t_{st['df']:.0f};" in note
    assert "TIS-DPO beat DPO on task reward beyond the two-sided 95% t bound" in note
    assert "Undecided on held-out accuracy" in note               # identical wins: SE 0
    assert "(the 200 held-out pairs for accuracy; the 200 prompts for the reward)" \
        in note and "counting the seed×item" in note
    assert "which are training prompts: only the response pairs are held out" in note


def test_verdict_small_spread_across_seeds_is_within_item_noise():
    """The hard task's shape: per-seed differences +0.014, +0.021, +0.019 (8.7 SE across
    seeds) on prompts whose rewards vary a lot: the combined SE makes it noise."""
    rng = np.random.default_rng(1)
    d_rew = rng.normal(0.1, 0.3, (3, 200))
    t_rew = d_rew + np.array([[0.014], [0.021], [0.019]]) + _noise(rng, 3, 200, 0.3)
    acc = (rng.random((3, 200)) < 0.7).astype(float)
    rows, items = _case(t_rew, d_rew, acc, acc)
    st = combined_se(np.mean(t_rew - d_rew, axis=1), t_rew - d_rew)
    assert 0.018 / st["se"] < st["bound"]                       # the case is what it claims
    note = verdict(rows, 3, items)
    assert "beat DPO on task reward" not in note
    assert "did NOT beat DPO beyond noise on task reward" in note


def test_verdict_three_seeds_need_the_t_bound_not_2_se():
    # no spread over items: df = 3 − 1 = 2, bound 4.30; the difference is 3.0 SE (old: a win)
    spread = np.array([-0.01, 0.0, 0.01])
    diffs = spread + 3 * 0.01 / math.sqrt(3)
    d_rew = np.full((3, 10), 0.2)
    acc = np.ones((3, 10))
    rows, items = _case(d_rew + diffs[:, None], d_rew, acc, acc)
    note = verdict(rows, 3, items)
    assert "(+3.0 SE of 0.0058; 95% t bound 4.30, t_2;" in note
    assert "did NOT beat DPO beyond noise on task reward" in note


def test_identical_seed_differences_are_decided_by_the_item_se():
    """Every seed +0.100 (SE across seeds 0): the items' spread gives the SE; the old verdict
    called both metrics undecided."""
    d_rew = np.stack([np.linspace(0.0, 0.5, 20)] * 3)
    t_rew = d_rew + 0.1 + 0.02 * np.array([(-1) ** i for i in range(20)])
    d_acc = np.stack([np.r_[np.ones(10), np.zeros(10)]] * 3)
    t_acc = d_acc.copy()
    t_acc[:, 10:12] = 1.0                                        # +0.1 on every seed
    rows, items = _case(t_rew, d_rew, t_acc, d_acc)
    note = verdict(rows, 3, items)
    assert "Undecided" not in note and "SE 0" not in note
    assert "TIS-DPO beat DPO on task reward beyond" in note
    assert "Within the bound on held-out accuracy" in note       # 2 of 20 pairs: 1.45 SE
    z = 0.1 / (np.std([1.0] * 2 + [0.0] * 18, ddof=1) / math.sqrt(20))
    assert f"held-out accuracy +0.100 ({z:+.1f} SE of" in note and "t_19;" in note


def test_row_plus_minus_is_the_combined_se():
    runs = [{"accuracy": float(np.mean(h)), "wins": h, "reward": float(np.mean(h)),
             "prompt_rewards": h, "own_accuracy": None, "samples": 4} for h in HAND]
    row = aggregate("TIS-DPO", runs)
    assert row["accuracy_se"] == pytest.approx(0.05) and row["reward_se"] == pytest.approx(0.05)
    assert row["accuracy_se_seeds"] == pytest.approx(0.025 / math.sqrt(3))


def _fake_demo(monkeypatch, tmp_path, calls):
    """run_demo with every stage and model replaced: records (model, sampling seed)."""
    ctx = SimpleNamespace(path=lambda name: str(tmp_path / name), device=torch.device("cpu"))
    monkeypatch.setattr(demo, "make_context", lambda cfg: ctx.__dict__.update(cfg=cfg) or ctx)
    for name in ("run_sft", "run_contrastive"):
        monkeypatch.setattr(demo.stages, name, lambda ctx: None)
    monkeypatch.setattr(demo.stages, "run_policy",
                        lambda ctx, pcfg, name, seed: f"/fake/{name}/final")
    monkeypatch.setattr(demo, "run_weights", lambda ctx: None)
    monkeypatch.setattr(demo, "load_records", lambda ctx: ([0] * 6, [0] * 4))
    monkeypatch.setattr(demo, "held_out_prompts", lambda ctx: ([0] * 4, [[1], [2]]))
    monkeypatch.setattr(demo, "reference_path", lambda ctx: "ref")
    monkeypatch.setattr(demo, "load_stage_model", lambda ctx, path, trainable: path)
    monkeypatch.setattr(demo, "_sequence_sums", lambda ctx, model, tok, impl: torch.tensor(
        [[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]]) * (model != "ref"))
    monkeypatch.setattr(demo, "read_done", lambda path: {"steps": 1, "metrics": {}})
    monkeypatch.setattr(demo, "weight_aucs", lambda ctx, info: {
        f"{s}/{side}/{k}": 0.5 for s in ("train", "eval") for side in ("chosen", "rejected")
        for k in ("score", "word_score", "weight")})

    def sample(ctx, model, prompts, info, *, seed):
        calls.append((model, seed))
        return {"reward": 0.1 * seed, "reward_se": 0.0, "samples": 2, "examples": [],
                "prompt_rewards": [0.1 * seed, 0.1 * seed + 0.2]}
    monkeypatch.setattr(demo, "sample_rewards", sample)


def test_each_policy_seed_samples_with_its_own_seed(monkeypatch, tmp_path):
    calls = []
    _fake_demo(monkeypatch, tmp_path, calls)
    cfg = demo_config(fast=True)
    cfg.run_dir, cfg.seed, cfg.demo.policy_seeds = str(tmp_path), 5, 2
    res = demo.run_demo(cfg)
    by_seed = {s: {seed for model, seed in calls if f"-seed{s}/" in model} for s in (5, 6)}
    assert by_seed == {5: {5}, 6: {6}}             # one seed per policy seed, all methods
    assert sum("-seed6/" in m for m, _ in calls) == len(demo.POLICIES)
    assert ("ref", 5) in calls                     # the reference: the first policy seed's
    assert "sample with that seed (5, 6), the reference with 5" in res["sampling"]


def test_held_out_accuracy_counts_text_tokens_whatever_data_eos_says():
    """`--data.eos count` made the demo's yardstick count EOS while its footnote said text
    tokens; the held-out pairs are tokenised without EOS for every setting."""
    tok = load_tokenizer()
    for eos in ("preset", "count", "ignore"):
        cfg = demo_config(fast=True)
        cfg.data.eos = eos
        tok_eval, prompts = held_out_prompts(SimpleNamespace(cfg=cfg, tokenizer=tok))
        assert len(prompts) == cfg.demo.sample_prompts
        for rec in tok_eval:
            assert tok.eos_token_id not in rec["chosen_ids"] + rec["rejected_ids"], eos
