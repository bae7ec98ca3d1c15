"""`tisdpo demo --fast` end to end, its table, the AUC helper, and `tisdpo inspect`."""
import json
import os

import numpy as np
import pytest
import torch

from tisdpo import cli
from tisdpo.pipeline.demo import (
    POLICIES, TOKEN_SCORES_ROW, auc, format_table, sample_rewards,
)
from tisdpo.pipeline.demo_report import verdict
from tisdpo.train.synthetic import load_tokenizer


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("demo"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = cli.main(["demo", "--fast", "--run_dir", run_dir, "--device", "cpu",
                         "--log.tensorboard", "false"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    return run_dir


def test_demo_fast_runs_every_stage_and_reports(demo_run, capsys):
    res = json.load(open(os.path.join(demo_run, "demo_results.json")))
    for stage in ("sft", "contrastive/positive", "contrastive/negative", "weights",
                  *(f"policy-{name}-seed0" for _, name, _, _ in POLICIES)):
        assert os.path.isfile(os.path.join(demo_run, stage, "done.json")), stage
    methods = [r["method"] for r in res["rows"]]
    assert methods == ["reference (SFT)"] + [label for label, *_ in POLICIES]
    for r in res["rows"][1:]:
        assert 0.0 <= r["accuracy"] <= 1.0 and -1.0 <= r["reward"] <= 1.0
    for key, value in res["auc"].items():
        if not key.endswith("tokens"):
            assert 0.0 <= value <= 1.0, key
    md = open(os.path.join(demo_run, "demo_results.md")).read()
    assert "| TIS-DPO |" in md and "AUC" in md and res["note"] in md
    steps = {json.load(open(os.path.join(demo_run, f"policy-{n}-seed0", "done.json")))["steps"]
             for _, n, _, _ in POLICIES}
    assert steps == {res["policy_steps"]}                        # equal steps per method
    import datasets
    assert res["train_pairs"] == len(datasets.load_from_disk(
        os.path.join(demo_run, "weights", "train")))
    # a second run resumes: every stage is skipped, the table is printed again
    capsys.readouterr()
    assert cli.main(["demo", "--fast", "--run_dir", demo_run, "--device", "cpu"]) == 0
    assert "| equal weights |" in capsys.readouterr().out


@pytest.mark.parametrize("option,value,why", [
    ("--data.train", "pairs.jsonl", "runs on its synthetic task"),
    ("--sft.enabled", "false", "start from the SFT model")])
def test_demo_refuses_options_its_table_cannot_mean(tmp_path, option, value, why, capsys):
    """The demo's rows and rewards are the synthetic task's, relative to its SFT model: own
    data (or model) or no SFT are refused in one line before any stage runs."""
    (tmp_path / "pairs.jsonl").write_text(json.dumps(
        {"prompt": "p", "chosen": " a", "rejected": " b"}) + "\n")
    run = tmp_path / "run"
    if option == "--data.train":
        value = str(tmp_path / value)
    code = cli.main(["demo", "--fast", "--run_dir", str(run), "--device", "cpu", option, value])
    err = capsys.readouterr().err.strip()
    assert code == 2 and option[2:] in err and why in err and "\n" not in err
    assert not run.exists()                       # no run folder, no config.yaml


def test_inspect_writes_html_and_png(demo_run, tmp_path):
    out = str(tmp_path / "views")
    assert cli.main(["inspect", "--run_dir", demo_run, "--pairs", "2", "--out", out]) == 0
    html = open(os.path.join(out, "inspect.html")).read()
    assert html.count("class='pair'") == 2 and "title='w=" in html
    with open(os.path.join(out, "inspect.png"), "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    # from an exported JSONL as well
    jsonl = os.path.join(demo_run, "weights", "train.jsonl")
    assert cli.main(["inspect", "--run_dir", demo_run, "--data", jsonl, "--pairs", "1",
                     "--out", out]) == 0
    assert open(os.path.join(out, "inspect.html")).read().count("class='pair'") == 1


def test_inspect_without_weights_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["inspect", "--run_dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "tisdpo weights" in err and err.count("\n") == 1
    with pytest.raises(ValueError, match="tisdpo weights"):       # --debug: the exception
        cli.main(["inspect", "--run_dir", str(tmp_path), "--debug"])


def test_auc_mann_whitney():
    assert auc([3, 4, 5], [0, 1, 2]) == 1.0
    assert auc([0, 1], [2, 3]) == 0.0
    assert auc([1, 1], [1, 1]) == 0.5
    assert auc([1, 2], [1, 0]) == 0.875          # pairs: (1,1)=.5, (1,0)=1, (2,1)=1, (2,0)=1
    assert auc([], [1]) != auc([], [1])          # nan


def test_table_reports_a_loss_for_tisdpo_honestly():
    # one seed, 100 held-out pairs (DPO wins 80) and 100 prompts: TIS-DPO differs from DPO on
    # ``flips`` pairs and by ``dr`` ± 0.01 on every prompt (paired SE 0.001)
    d_wins = (np.arange(100) < 80).astype(float)
    d_rew = np.linspace(-0.2, 0.8, 100)

    def judged(flips, dr):
        t_wins = d_wins.copy()
        if flips < 0:
            t_wins[:-flips] = 0.0                  # loses -flips of the pairs DPO wins
        else:
            t_wins[80:80 + flips] = 1.0            # wins flips of the pairs DPO loses
        t_rew = d_rew + dr + 0.01 * (-1.0) ** np.arange(100)
        rows = {"DPO": {"accuracy_per_seed": [d_wins.mean()], "reward_per_seed": [d_rew.mean()]},
                "TIS-DPO": {"accuracy_per_seed": [t_wins.mean()],
                            "reward_per_seed": [t_rew.mean()]}}
        items = {"DPO": {"accuracy": d_wins, "reward": d_rew},
                 "TIS-DPO": {"accuracy": t_wins, "reward": t_rew}}
        return verdict(rows, 1, items)
    assert "did NOT beat DPO: worse on task reward and held-out accuracy" in judged(-10, -0.1)
    assert "did NOT beat DPO beyond noise" in judged(1, 0.0005)
    assert "TIS-DPO beat DPO on task reward beyond the two-sided 95% t bound" in \
        judged(1, 0.1)
    assert "Mixed: better on task reward, worse on held-out accuracy" in judged(-10, 0.1)
    # several seeds, no per-item values: the paired differences' spread decides
    many = {"DPO": {"accuracy_per_seed": [0.8, 0.8, 0.8], "reward_per_seed": [0.3, 0.3, 0.3]},
            "TIS-DPO": {"accuracy_per_seed": [0.8, 0.8, 0.8],
                        "reward_per_seed": [0.35, 0.25, 0.31]}}
    note = verdict(many, 3)
    assert "beyond noise" in note and "per seed +0.050, -0.050, +0.010" in note
    res = {"train_pairs": 10, "eval_pairs": 5, "policy_steps": 3, "wall_s": 1.0,
           "weight_method": "rank_based", "note": "n",
           "auc": {f"{s}/{side}/{k}": 0.5 for s in ("train", "eval")
                   for side in ("chosen", "rejected")
                   for k in ("score", "word_score", "weight")},
           "rows": [{"method": "reference (SFT)", "accuracy": None, "reward": 0.0},
                    {"method": "DPO", "accuracy": 0.5, "reward": -0.25}]}
    table = format_table(res)
    assert "| reference (SFT) | - | +0.000 | - |" in table
    assert "| DPO | 0.500 | -0.250 | - |" in table


def test_demo_fast_hard_task_compares_word_and_token_scores(tmp_path):
    """The hard task: word-pooled weights by default, the same rule on per-token scores beside
    them, and `tisdpo compare` on the demo's policies samples the same task rewards."""
    run_dir = str(tmp_path / "hard")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli.main(["demo", "--fast", "--task", "hard", "--run_dir", run_dir,
                         "--device", "cpu", "--log.tensorboard", "false",
                         "--demo.token_scores", "true"]) == 0
        res = json.load(open(os.path.join(run_dir, "demo_results.json")))
        assert res["task"] == "hard" and res["weight_span"] == "word"
        labels = [label for label, *_ in POLICIES]
        assert [r["method"] for r in res["rows"]] == \
            ["reference (SFT)"] + labels[:2] + [TOKEN_SCORES_ROW] + labels[2:]
        opts = json.load(open(os.path.join(run_dir, "policy-tisdpo-token-seed0",
                                           "options.json")))["options"]
        assert opts["weights.span"] == "token" and opts["policy.token_weights"] == "recompute"
        assert {f"{s}/{side}/word_score" for s in ("train", "eval")
                for side in ("chosen", "rejected")} <= set(res["auc"])
        assert "hard task" in open(os.path.join(run_dir, "demo_results.md")).read()
        assert cli.main(["compare", "--run_dir", run_dir, "--policies", "policy-dpo-*",
                         "policy-tisdpo-seed0"]) == 0
    finally:
        torch.set_num_threads(threads)
    methods = json.load(open(os.path.join(run_dir, "compare.json")))["methods"]
    by_label = {r["method"]: r for r in res["rows"]}
    assert methods["policy-dpo"]["reward"]["mean"] == by_label["DPO"]["reward"]
    assert methods["policy-tisdpo"]["reward"]["mean"] == by_label["TIS-DPO"]["reward"]


class _FixedCompletion:
    """Generates the same completion after any prompt (left-padded batch)."""

    def __init__(self, ids):
        self.ids = torch.tensor(ids)

    def generate(self, input_ids, attention_mask, **kw):
        tail = self.ids.expand(input_ids.shape[0], -1)
        return torch.cat([input_ids, tail], dim=1)


def test_sampled_reward_reads_each_prompt_on_the_hard_task():
    from types import SimpleNamespace

    from tisdpo.train.config import RunConfig
    from tisdpo.train.synthetic import synthetic_info

    tok = load_tokenizer()
    cfg = RunConfig()
    cfg.demo.do_sample, cfg.demo.max_new_tokens = False, 8
    ctx = SimpleNamespace(cfg=cfg, tokenizer=tok, device=torch.device("cpu"))
    info = synthetic_info("hard")
    word = info.child_words[0]
    model = _FixedCompletion(tok.encode(f" {word} clever", add_special_tokens=False))
    kids = tok.encode("Write about cats for children:", add_special_tokens=False)
    pros = tok.encode("Write about cats for experts:", add_special_tokens=False)
    out = sample_rewards(ctx, model, [kids, pros, kids], info, seed=0)
    # children: both words good (+1); experts: the child word bad, "clever" good (0)
    assert out["samples"] == 3 and out["reward"] == pytest.approx(2 / 3)
