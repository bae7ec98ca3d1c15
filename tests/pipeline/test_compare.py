"""`tisdpo compare` on hand-written done.json files: grouping, means, standard errors and
paired differences, exact."""
import json
import math
import os

import pytest

from tisdpo import cli
from tisdpo.pipeline import compare

ACC, OWN = "eval/rewards/accuracies_unweighted", "eval/rewards/accuracies"
CD, RD = "eval/logps/chosen_delta", "eval/logps/rejected_delta"


def _policy(root, folder, *, seed, acc, own=0.99, cd=-0.1, rd=-0.5, method="dpo"):
    path = os.path.join(root, folder)
    os.makedirs(path)
    done = {"stage": folder, "steps": 2, "method": method, "token_weights": "auto",
            "seed": seed, "metrics": {ACC: acc, OWN: own, CD: cd, RD: rd, "eval/loss": 0.3}}
    with open(os.path.join(path, "done.json"), "w") as fh:
        json.dump(done, fh)


@pytest.fixture
def run(tmp_path):
    r = str(tmp_path)
    for seed, acc in ((0, 0.50), (1, 0.60), (2, 0.70)):
        _policy(r, f"policies/dpo-s{seed}", seed=seed, acc=acc)
    for seed, acc in ((0, 0.55), (1, 0.70), (2, 0.90)):
        _policy(r, f"policies/tisdpo-s{seed}", seed=seed, acc=acc, method="tisdpo")
    _policy(r, "policies/tisdpo_lr1e-2-s0", seed=0, acc=0.4, cd=-2.0, rd=-3.0, method="tisdpo")
    os.makedirs(os.path.join(r, "contrastive"))          # not a policy: ignored
    _policy(r, "policy", seed=0, acc=0.65)               # the default policy, named "policy"
    return r


def test_mean_se_exact():
    mean, se = compare.mean_se([1.0, 2.0, 4.0])
    sd = math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)
    assert mean == 7 / 3 and math.isclose(se, sd / math.sqrt(3), rel_tol=1e-15)
    assert compare.mean_se([0.3])[0] == 0.3 and math.isnan(compare.mean_se([0.3])[1])


def test_groups_means_and_paired_differences(run):
    found = compare.find_policies(run)
    assert set(found) == {"dpo-s0", "dpo-s1", "dpo-s2", "tisdpo-s0", "tisdpo-s1", "tisdpo-s2",
                          "tisdpo_lr1e-2-s0", "policy"}
    runs = compare.group_policies(found)
    res = compare.summarize(runs, (ACC, CD))
    assert res["baseline"] == "dpo"
    dpo, tis = res["methods"]["dpo"], res["methods"]["tisdpo"]
    assert dpo["seeds"] == [0, 1, 2] and dpo[ACC]["n"] == 3
    assert math.isclose(dpo[ACC]["mean"], 0.6) and math.isclose(dpo[ACC]["se"], 0.1 / math.sqrt(3))
    assert math.isclose(tis[ACC]["mean"], 2.15 / 3)
    # paired by seed: differences 0.05, 0.10, 0.20
    p = res["paired"]["tisdpo"][ACC]
    d = [0.05, 0.10, 0.20]
    m = sum(d) / 3
    se = math.sqrt(sum((x - m) ** 2 for x in d) / 2 / 3)
    assert p["seeds"] == [0, 1, 2] and math.isclose(p["mean"], m) and math.isclose(p["se"], se)
    # one seed: a mean, no standard error; paired only on the seed both have
    lr = res["paired"]["tisdpo_lr1e-2"][ACC]
    assert lr["seeds"] == [0] and math.isclose(lr["mean"], -0.1) and math.isnan(lr["se"])
    # "policy" has no seed in its name: the seed its done.json records
    assert res["methods"]["policy"]["seeds"] == [0]
    assert res["displacement"] == ["tisdpo_lr1e-2-s0: chosen -2.000, rejected -3.000 "
                                   "nats/token vs the reference"]
    text = compare.format_markdown(res)
    assert "| dpo | 0,1,2 | +0.6000 ± 0.0577 (n=3) |" in text
    assert "| tisdpo_lr1e-2 | 0 | -0.1000 (n=1) |" in text


def test_group_regex_baseline_and_errors(run):
    found = compare.find_policies(run, ["tisdpo*", "dpo-*"])
    assert "policy" not in found and len(found) == 7
    # a --group that puts the lr variant into tisdpo: two tisdpo runs with seed 0
    with pytest.raises(ValueError, match="both method 'tisdpo' with seed 0"):
        compare.group_policies(found, r"^(?P<method>[a-z]+)")
    with pytest.raises(ValueError, match="'tisdpo_lr1e-2-s0' does not match"):
        compare.group_policies(found, r"^(?P<method>[^-]+)-s(?P<seed>\d+)$")
    with pytest.raises(ValueError, match="named group"):
        compare.group_policies(found, r"^(.+)$")
    res = compare.summarize(compare.group_policies(
        {k: v for k, v in found.items() if "lr" not in k}), (ACC,), baseline="tisdpo")
    assert math.isclose(res["paired"]["dpo"][ACC]["mean"], -0.35 / 3)
    with pytest.raises(ValueError, match="--baseline 'ipo'"):
        compare.summarize(compare.group_policies(found), (ACC,), baseline="ipo")


def test_seed_in_name_differing_from_training_seed_is_flagged(tmp_path):
    _policy(str(tmp_path), "policies/dpo-s1", seed=0, acc=0.5)
    res = compare.summarize(compare.group_policies(compare.find_policies(str(tmp_path))))
    assert res["seed_notes"] == ["dpo-s1: named seed 1 but trained with seed 0 "
                                 "(set --policy.seed)"]


def test_cli_compare_writes_markdown_and_json(run, capsys):
    code = cli.main(["compare", "--run_dir", run, "--reward", "off", "--policies", "dpo-*",
                     "tisdpo-*", "--metrics", f"{ACC},{OWN}"])
    out = capsys.readouterr().out
    assert code == 0
    assert "Paired difference vs dpo" in out and "rewards/accuracies_unweighted" in out
    res = json.load(open(os.path.join(run, "compare.json")))
    assert res["metrics"] == [ACC, OWN] and set(res["methods"]) == {"dpo", "tisdpo"}
    assert math.isclose(res["paired"]["tisdpo"][ACC]["mean"], 0.35 / 3)
    assert math.isclose(res["methods"]["dpo"][OWN]["se"], 0.0, abs_tol=1e-12)
    # nothing to compare: one line, status 1
    code = cli.main(["compare", "--run_dir", os.path.join(run, "nowhere"), "--reward", "off"])
    assert code == 1 and "no finished policies" in capsys.readouterr().err


def test_a_misspelled_metric_and_unfinished_policies_are_said(run, capsys, caplog):
    """--metrics naming a key no policy has is one line, status 1 (it printed '-' cells); a
    policy folder with checkpoints but no done.json is left out with a warning, not quietly."""
    code = cli.main(["compare", "--run_dir", run, "--reward", "off", "--metrics",
                     f"{ACC},eval/rewards/acuracies"])
    err = capsys.readouterr().err
    assert code == 1 and "--metrics 'eval/rewards/acuracies': no policy's done.json" in err
    os.makedirs(os.path.join(run, "policies", "dpo-s3", "checkpoints"))
    with caplog.at_level("WARNING", logger="tisdpo"):
        found = compare.find_policies(run)
    assert "dpo-s3" not in found
    assert any("dpo-s3: not finished" in r.getMessage() for r in caplog.records)


def test_each_policy_samples_its_reward_with_its_own_seed(run, monkeypatch):
    """As the demo samples: policies of one seed share a sampling seed (paired), other
    seeds sample otherwise; the run's seed is not every policy's."""
    from tisdpo.pipeline import context, demo
    from tisdpo.train.config import build_config

    seen = {}
    monkeypatch.setattr(context, "make_context", lambda cfg: None)
    monkeypatch.setattr(context, "load_stage_model", lambda ctx, path, trainable: path)
    monkeypatch.setattr(demo, "held_out_prompts", lambda ctx: (None, ["p"]))
    monkeypatch.setattr(demo, "sample_rewards", lambda ctx, model, prompts, info, seed: (
        seen.__setitem__(os.path.basename(os.path.dirname(model)), seed)
        or {"reward": 0.0, "samples": [], "examples": []}))
    runs = [r for r in compare.group_policies(compare.find_policies(run))
            if r["name"] != "policy"]
    compare._sample_rewards(build_config(None, {"seed": 7}), runs)
    assert seen == {
        "dpo-s0": 0, "dpo-s1": 1, "dpo-s2": 2, "tisdpo-s0": 0, "tisdpo-s1": 1, "tisdpo-s2": 2,
        "tisdpo_lr1e-2-s0": 0}
