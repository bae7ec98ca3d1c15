"""Named policies (policy.name): several policies on one run's upstream stages."""
import json
import logging
import os
import shutil

import pytest

from test_stages import tiny_cfg
from tisdpo import cli
from tisdpo.pipeline import context, stages
from tisdpo.pipeline.fingerprint import StageOptionsChanged
from tisdpo.train import objectives
from tisdpo.train.checkpoint import read_done, stage_done
from tisdpo.train.config import build_config


def test_policy_dir_and_name_validation():
    assert stages.policy_dir() == "policy" and stages.policy_dir("policy") == "policy"
    assert stages.policy_dir("tisdpo_lr3e-5-s1") == os.path.join("policies", "tisdpo_lr3e-5-s1")
    for bad in ("../x", "a/b", "", ".hidden", "a b", "x" * 101):
        with pytest.raises(ValueError, match="policy.name must be a folder name"):
            build_config(None, {"policy.name": bad})
    assert build_config(None, {"policy.name": "dpo-s2"}).policy.name == "dpo-s2"


def test_two_named_policies_share_upstream_stages(tmp_path, caplog):
    cfg = tiny_cfg(tmp_path)
    cfg.policy.name = "tisdpo-s0"
    lr0 = cfg.policy.lr
    ctx = context.make_context(cfg)
    out = stages.run_pipeline(ctx)
    assert out["policy"] == str(tmp_path / "policies" / "tisdpo-s0" / "final")
    pos_cfg = tmp_path / "contrastive" / "positive" / "final" / "config.json"
    stamps = {p: os.path.getmtime(p) for p in (pos_cfg, tmp_path / "weights" / "meta.json")}
    opts = json.load(open(tmp_path / "policies" / "tisdpo-s0" / "options.json"))["options"]
    assert "policy.name" not in opts and opts["policy.lr"] == lr0

    # a second name with another lr: upstream stages skipped, a new policy trained
    ctx.cfg.policy.name, ctx.cfg.policy.lr = "tisdpo_lr1e-3-s0", 1e-3
    with caplog.at_level(logging.INFO, logger="tisdpo"):
        out2 = stages.run_pipeline(ctx)
    text = caplog.text
    assert "contrastive+: already done" in text and "weights: already done" in text
    assert {p: os.path.getmtime(p) for p in stamps} == stamps          # trained once
    assert stage_done(os.path.dirname(out2["policy"]))
    assert read_done(tmp_path / "policies" / "tisdpo_lr1e-3-s0")["lr"] == 1e-3
    assert not os.path.exists(tmp_path / "policy")                       # default untouched

    # a changed option under an existing name is refused, never reported done
    done_path = tmp_path / "policies" / "tisdpo-s0" / "done.json"
    before = os.path.getmtime(done_path)
    ctx.cfg.policy.name, ctx.cfg.policy.lr = "tisdpo-s0", 1e-3
    with pytest.raises(StageOptionsChanged, match="policy.lr"):
        stages.run_policy(ctx)
    assert os.path.getmtime(done_path) == before

    # renaming a finished policy folder keeps it recognised under the new name
    shutil.move(str(tmp_path / "policies" / "tisdpo-s0"), str(tmp_path / "policies" / "moved"))
    ctx.cfg.policy.name, ctx.cfg.policy.lr = "moved", lr0
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tisdpo"):
        stages.run_policy(ctx)
    assert "policies/moved: already done" in caplog.text


def test_recompute_logs_its_rule_and_a_forced_collapse_warns(tmp_path, caplog, monkeypatch):
    cfg = tiny_cfg(tmp_path, **{"contrastive.variant": "prompt"})
    ctx = context.make_context(cfg)
    stages.run_contrastive(ctx)
    from tisdpo.pipeline import weights

    weights.run_weights(ctx)
    ctx.cfg.weights.method, ctx.cfg.weights.k = "exp_clamp", 0.9
    ctx.cfg.policy.name, ctx.cfg.policy.token_weights = "recomputed", "recompute"
    real = objectives.comparable_metrics

    def collapsed(*args, **kw):            # force a collapse: every log-prob fell
        m = real(*args, **kw)
        return {**m, "logps/chosen_delta": m["logps/chosen_delta"] * 0 - 1.0,
                "logps/rejected_delta": m["logps/rejected_delta"] * 0 - 2.0}

    monkeypatch.setattr(objectives, "comparable_metrics", collapsed)
    with caplog.at_level(logging.INFO, logger="tisdpo"):
        stages.run_policy(ctx)
    assert "applying the weight rule exp_clamp (k=0.9, lower=-0.5, upper=1.5" in caplog.text
    done = read_done(tmp_path / "policies" / "recomputed")
    assert done["weight_rule"] == "exp_clamp" and done["weight_params"]["k"] == 0.9
    m = done["metrics"]
    assert m["eval/logps/chosen_delta"] == -1.0 and m["eval/logps/rejected_delta"] == -2.0
    warned = [r for r in caplog.records if r.levelname == "WARNING"
              and "likelihood displacement" in r.getMessage()]
    assert len(warned) == 1 and "policies/recomputed" in warned[0].getMessage()


TINY = ["--model.tiny_hidden_size", "32", "--model.tiny_layers", "1", "--model.tiny_heads", "2",
        "--model.tiny_kv_heads", "1", "--model.tiny_intermediate_size", "48",
        "--data.synthetic_train", "16", "--data.synthetic_eval", "4", "--device", "cpu",
        "--threads", "1", "--log.progress", "false", "--log.tensorboard", "false"]


def test_cli_train_named_policies_then_compare(tmp_path, capsys):
    run = ["--run_dir", str(tmp_path)]
    cmds = [["train", "--policy.method", "dpo", "--policy.max_steps", "2", "--policy.batch_size",
             "4", "--policy.lr", "1e-3", "--policy.warmup_steps", "0"] + TINY + run]
    for name, seed, method in (("dpo-s0", 0, "dpo"), ("dpo-s1", 1, "dpo"),
                               ("ipo-s0", 0, "ipo"), ("ipo-s1", 1, "ipo")):
        args = list(cmds[0])
        args[args.index("--policy.method") + 1] = method
        assert cli.main(args + ["--policy.name", name, "--policy.seed", str(seed)]) == 0
        assert read_done(tmp_path / "policies" / name)["seed"] == seed
    capsys.readouterr()
    code = cli.main(["compare", "--run_dir", str(tmp_path), "--baseline", "dpo",
                     "--demo.sample_prompts", "2", "--demo.max_new_tokens", "3"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "| dpo | 0,1 |" in out and "Paired difference vs dpo" in out and "reward" in out
    res = json.load(open(tmp_path / "compare.json"))
    assert res["baseline"] == "dpo" and set(res["methods"]) == {"dpo", "ipo"}
    assert res["methods"]["ipo"]["eval/rewards/accuracies_unweighted"]["n"] == 2
    assert res["paired"]["ipo"]["reward"]["seeds"] == [0, 1]


def test_auto_applies_the_presets_own_rule_to_stored_scores(tmp_path, caplog):
    """Weights made for tisdpo (rank-based) and a policy of tisdpo_paper_no_eta (exp-clamp):
    token_weights=auto applies the preset's own rule to the stored scores, as recompute
    does; stored keeps the stored weights and says so."""
    import dataclasses

    from tisdpo.pipeline import weights

    ctx = context.make_context(tiny_cfg(tmp_path, **{"contrastive.variant": "prompt"}))
    stages.run_contrastive(ctx)
    weights.run_weights(ctx)

    def inputs(mode):
        pcfg = dataclasses.replace(ctx.cfg.policy, method="tisdpo_paper_no_eta",
                                   token_weights=mode)
        return stages._policy_inputs(ctx, pcfg)

    auto, recompute = inputs("auto"), inputs("recompute")
    assert auto[4:] == ("recompute", "exp_clamp") and \
        auto[0]["chosen_weight"] == recompute[0]["chosen_weight"]
    with caplog.at_level(logging.WARNING, logger="tisdpo"):
        stored = inputs("stored")
    assert stored[4:] == ("stored", "rank_based")
    assert stored[0]["chosen_weight"] != auto[0]["chosen_weight"]
    assert "using the stored rank_based weights, not this preset's own rule exp_clamp" \
        in caplog.text


def test_negative_weights_in_a_users_data_are_used_and_named(tmp_path, caplog):
    """A data file's own weights (no weights stage) are used as given; negative ones, as in
    files of TIS-DPO's official code (sign-flipped raw scores), get a warning."""
    import dataclasses

    import datasets

    from tisdpo.train.data import tokenize_pairs
    from tisdpo.train.synthetic import make_synthetic_task

    train, _, _ = make_synthetic_task(12, 0)
    ds = datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")}
                                     for r in train])
    cfg = tiny_cfg(tmp_path / "run")
    probe = context.make_context(cfg)
    tok, _ = tokenize_pairs(ds, probe.tokenizer, context.tokenize_cfg(cfg, "tisdpo"))
    rows = ds.to_list()
    for r, t in zip(rows, tok):
        for side in ("chosen", "rejected"):
            r[f"{side}_weight"] = [0.5 - k % 2 for k in range(len(t[f"{side}_ids"]))]
    path = tmp_path / "w.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg.data.train = str(path)
    ctx = context.make_context(cfg)
    pcfg = dataclasses.replace(ctx.cfg.policy, method="tisdpo")
    with caplog.at_level(logging.WARNING, logger="tisdpo"):
        stages._policy_data(ctx, pcfg)
    assert "token weights in data.train are negative: used as given" in caplog.text


def test_auto_recompute_is_recorded_and_other_score_kinds_keep_the_stored_weights(tmp_path,
                                                                                  caplog):
    """The resolved mode is among the policy's options: a policy made while auto meant the
    stored weights is not resumed as if it had applied the preset's own rule. Scores of
    another kind than the preset's rule takes (c_t for cdpo) leave the stored weights, said
    once as a warning; weights dropped for another tokenisation get only the error."""
    import dataclasses

    from tisdpo.pipeline import weights

    ctx = context.make_context(tiny_cfg(tmp_path, **{"contrastive.variant": "prompt",
                                                     "data.eos": "count"}))
    stages.run_contrastive(ctx)
    weights.run_weights(ctx)
    paper = dataclasses.replace(ctx.cfg.policy, method="tisdpo_paper_no_eta", name="paper")
    stages.run_policy(ctx, paper)
    opts_path = tmp_path / "policies" / "paper" / "options.json"
    opts = json.load(open(opts_path))
    assert opts["options"]["policy.token_weights_resolved"] == "recompute"
    del opts["options"]["policy.token_weights_resolved"]          # as made before
    json.dump(opts, open(opts_path, "w"))
    with pytest.raises(StageOptionsChanged, match=r"policy.token_weights_resolved="
                                                  r"'<unset>' then, 'recompute' now"):
        stages.run_policy(ctx, paper)
    cdpo = dataclasses.replace(ctx.cfg.policy, method="cdpo")
    with caplog.at_level(logging.WARNING, logger="tisdpo"):
        got = stages._policy_inputs(ctx, cdpo)
    assert got[4:] == ("stored", "rank_based")
    assert "its scores are c_t, which that rule does not take" in caplog.text
