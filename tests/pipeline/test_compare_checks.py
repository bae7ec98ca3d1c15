"""`tisdpo compare` refuses what it cannot compare: policies evaluated on different held-out
pairs, a method whose seeds were trained differently, and policies without held-out metrics."""
import json
import os

import pytest

from tisdpo import cli
from tisdpo.pipeline import compare

ACC = "eval/rewards/accuracies_unweighted"
#: a subset of what a policy's options.json records (tisdpo.pipeline.fingerprint)
OPTIONS = {"seed": 0, "data.train": "/data/pairs.jsonl", "data.eval": None,
           "data.eval_fraction": 0.25, "data.max_length": 512, "data.max_prompt_length": 256,
           "data.truncation": "keep_start", "data.add_bos": False, "data.eos": "preset",
           "model.path": None, "model.tokenizer": "/tok", "pipeline.reference": "auto",
           "policy.lr": 5e-7, "policy.beta": None, "policy.epochs": 1.0,
           "policy.token_weights": "auto", "weights.w_min": 0.7}
_ABSENT = object()                 # an option left out of options.json


def _policy(root, name, *, seed, method="dpo", metrics=None, options=True, changed=()):
    path = os.path.join(root, "policies", name)
    os.makedirs(path)
    done = {"stage": name, "steps": 2, "method": method, "token_weights": "auto",
            "seed": seed, "metrics": {ACC: 0.5} if metrics is None else metrics}
    with open(os.path.join(path, "done.json"), "w") as fh:
        json.dump(done, fh)
    if options:
        opts = {**OPTIONS, "policy.method": method, "policy.seed": seed, **dict(changed)}
        opts = {k: v for k, v in opts.items() if v is not _ABSENT}
        with open(os.path.join(path, "options.json"), "w") as fh:
            json.dump({"options": opts, "upstream": {},
                       "inputs": {"data.train": "sha256:" + "a" * 64}}, fh)


def _group(root):
    return compare.group_policies(compare.find_policies(str(root)))


def _compare(root, capsys):
    code = cli.main(["compare", "--run_dir", str(root), "--reward", "off"])
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("option,value,shown", [
    ("policy.eval_max_pairs", 1, "policy.eval_max_pairs: None vs 1"),  # unset: not recorded
    ("data.max_length", 48, "data.max_length: 512 vs 48"),
    ("data.max_prompt_length", 16, "data.max_prompt_length: 256 vs 16"),
    ("data.truncation", "keep_end", "data.truncation: 'keep_start' vs 'keep_end'"),
    ("data.add_bos", True, "data.add_bos: False vs True"),
    ("data.eos", "never", "data.eos: 'preset' vs 'never'")])
def test_policies_evaluated_on_other_held_out_pairs_are_refused(tmp_path, capsys, option,
                                                                value, shown):
    """A policy evaluated on other held-out pairs (fewer of them, or tokenised otherwise) than
    its partner is refused in one line naming both and the option, not paired silently."""
    _policy(tmp_path, "dpo-s0", seed=0)
    _policy(tmp_path, "tisdpo-s0", seed=0, method="tisdpo", changed={option: value})
    code, err = _compare(tmp_path, capsys)
    assert code == 1 and "\n" not in err
    assert "'dpo-s0' and 'tisdpo-s0' were evaluated on different held-out pairs" in err
    assert shown in err


def test_a_changed_data_file_is_refused(tmp_path):
    _policy(tmp_path, "dpo-s0", seed=0)
    _policy(tmp_path, "dpo-s1", seed=1)
    path = os.path.join(tmp_path, "policies", "dpo-s1", "options.json")
    doc = json.load(open(path))
    doc["inputs"]["data.train"] = "sha256:" + "b" * 64
    json.dump(doc, open(path, "w"))
    with pytest.raises(ValueError, match=r"data.train \(its content: sha256:aaa"):
        _group(tmp_path)


def test_a_method_trained_differently_across_seeds_is_refused(tmp_path, capsys):
    """mine-s0 (tisdpo) and mine-s1 (simpo) were averaged into one row, no note."""
    _policy(tmp_path, "base-s0", seed=0)
    _policy(tmp_path, "mine-s0", seed=0, method="tisdpo")
    _policy(tmp_path, "mine-s1", seed=1, method="simpo", options=False)
    code, err = _compare(tmp_path, capsys)
    assert code == 1 and "\n" not in err
    assert "'mine-s0' and 'mine-s1' are both method 'mine' but trained differently: " \
           "done.json method: 'tisdpo' vs 'simpo'" in err


def test_a_training_option_other_than_the_seed_is_refused_within_a_method(tmp_path):
    _policy(tmp_path, "dpo-s0", seed=0)
    _policy(tmp_path, "dpo-s1", seed=1, changed={"policy.lr": 1e-6})
    with pytest.raises(ValueError, match=r"'dpo-s0' and 'dpo-s1' are both method 'dpo' but "
                                         r"trained differently: policy.lr: 5e-07 vs 1e-06"):
        _group(tmp_path)


def test_seeds_alone_differ_within_a_method_and_seed_notes_stay(tmp_path):
    """Only the seed differs: compared; an options.json from before policy.seed was recorded
    (the seed then under ``seed``) is read the same way; a name/seed mismatch is a note."""
    _policy(tmp_path, "dpo-s0", seed=0)
    _policy(tmp_path, "dpo-s1", seed=1, changed={"policy.seed": _ABSENT, "seed": 1})
    _policy(tmp_path, "dpo-s2", seed=0, changed={"policy.seed": 0})     # named 2, trained with 0
    _policy(tmp_path, "tisdpo-s0", seed=0, method="tisdpo", changed={"policy.lr": 1e-6})
    res = compare.summarize(_group(tmp_path), (ACC,))
    assert res["methods"]["dpo"]["seeds"] == [0, 1, 2]
    assert res["seed_notes"] == ["dpo-s2: named seed 2 but trained with seed 0 "
                                 "(set --policy.seed)"]


def test_no_held_out_metrics_is_a_one_line_error(tmp_path, capsys):
    """Default metrics, no policy has any (no eval split): it printed an all-'-' table and
    exited 0."""
    _policy(tmp_path, "dpo-s0", seed=0, metrics={"loss": 0.5})
    _policy(tmp_path, "tisdpo-s0", seed=0, method="tisdpo", metrics={"loss": 0.4})
    code, err = _compare(tmp_path, capsys)
    assert code == 1 and "\n" not in err
    assert "no held-out metrics: policies ['dpo-s0', 'tisdpo-s0']" in err and \
        "no eval split" in err and "'loss'" in err
    assert not os.path.exists(os.path.join(tmp_path, "compare.json"))
