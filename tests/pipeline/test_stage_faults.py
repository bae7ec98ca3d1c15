"""Faults across stages: changed options on resume, a second process on the run directory,
SIGTERM to a running command, a diverging stage, the user's own token weights."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import datasets
import pytest
import yaml

from tisdpo import cli
from tisdpo.pipeline import context, stages, weights
from tisdpo.pipeline.fingerprint import StageOptionsChanged
from tisdpo.pipeline.lock import RunLocked, run_lock
from tisdpo.train.checkpoint import checkpoints, stage_done
from tisdpo.train.data import tokenize_pairs
from tisdpo.train.synthetic import make_synthetic_task

TINY = ["--model.tiny_hidden_size", "32", "--model.tiny_layers", "1", "--model.tiny_heads", "2",
        "--model.tiny_kv_heads", "1", "--model.tiny_intermediate_size", "48",
        "--data.synthetic_train", "16", "--data.synthetic_eval", "4", "--device", "cpu",
        "--threads", "1", "--log.progress", "false", "--log.tensorboard", "false"]
DPO = ["train", "--policy.method", "dpo", "--policy.max_steps", "4", "--policy.batch_size", "4",
       "--policy.lr", "1e-3", "--policy.warmup_steps", "1"] + TINY


def _cli(args, capsys):
    code = cli.main(args)
    return code, capsys.readouterr().err


# ------------------------------------------------------------------ options on resume

def test_changed_option_after_a_stop_is_refused_by_name(tmp_path, capsys):
    run = ["--run_dir", str(tmp_path)]
    assert _cli(DPO + run + ["--policy.stop_after", "2"], capsys)[0] == 0
    code, err = _cli(DPO + run + ["--policy.lr", "5e-4"], capsys)
    assert code == 1 and "policy.lr=0.001 then, 0.0005 now" in err and err.count("\n") == 1
    assert len(checkpoints(str(tmp_path / "policy"))) == 1          # nothing touched
    # options that do not change the result may change; the same options resume
    code, err = _cli(DPO + run + ["--policy.save_every", "1", "--policy.eval_every", "3"],
                     capsys)
    assert code == 0, err
    assert json.load(open(tmp_path / "policy" / "done.json"))["steps"] == 4


def test_finished_stage_with_other_options_is_not_reported_done(tmp_path, capsys):
    run = ["--run_dir", str(tmp_path)]
    assert _cli(DPO + run, capsys)[0] == 0
    code, err = _cli(DPO + run + ["--policy.beta", "0.3"], capsys)
    assert code == 1 and "policy.beta" in err and "delete" in err
    # the refused command left the run's config.yaml as the finished one wrote it
    assert yaml.safe_load(open(tmp_path / "config.yaml"))["policy"]["beta"] is None
    # starting afresh is allowed and records the new options
    assert _cli(DPO + run + ["--policy.beta", "0.3", "--pipeline.resume", "false"], capsys)[0] == 0
    opts = json.load(open(tmp_path / "policy" / "options.json"))["options"]
    assert opts["policy.beta"] == 0.3
    assert yaml.safe_load(open(tmp_path / "config.yaml"))["policy"]["beta"] == 0.3


def test_filter_eps_is_an_option_of_the_policy_result(tmp_path, capsys, monkeypatch):
    """policy.filter_eps reaches the policy's loss and is recorded only when set, so a result
    made without it (or before the option existed) is refused with it, not mixed."""
    seen, real = [], stages.TISDPOLoss
    monkeypatch.setattr(stages, "TISDPOLoss",
                        lambda *a, **k: seen.append(k.get("filter_eps")) or real(*a, **k))
    run = ["--run_dir", str(tmp_path)]
    assert _cli(DPO + run, capsys)[0] == 0
    assert "policy.filter_eps" not in json.load(open(tmp_path / "policy" / "options.json"))[
        "options"] and seen == [None]
    code, err = _cli(DPO + run + ["--policy.filter_eps", "0.001"], capsys)
    assert code == 1 and "policy.filter_eps='<unset>' then, 0.001 now" in err
    assert _cli(DPO + run + ["--policy.filter_eps", "0.001", "--pipeline.resume", "false"],
                capsys)[0] == 0
    opts = json.load(open(tmp_path / "policy" / "options.json"))["options"]
    assert opts["policy.filter_eps"] == 0.001 and seen[-1] == 0.001


def test_eval_max_pairs_is_an_option_of_the_result(tmp_path, capsys):
    """It picks the pairs behind done.json's eval metrics (which compare reads): a finished
    stage evaluated on one pair is not reported done for a run that asks for all of them.
    Recorded only when set, so a stage made before it was recorded stays reusable."""
    run = ["--run_dir", str(tmp_path)]
    assert _cli(DPO + run + ["--policy.eval_max_pairs", "1"], capsys)[0] == 0
    code, err = _cli(DPO + run, capsys)
    assert code == 1 and "policy.eval_max_pairs=1 then, '<unset>' now" in err
    assert _cli(DPO + run + ["--policy.eval_max_pairs", "1"], capsys)[0] == 0
    other = ["--run_dir", str(tmp_path / "b")]
    assert _cli(DPO + other, capsys)[0] == 0
    assert "policy.eval_max_pairs" not in json.load(
        open(tmp_path / "b" / "policy" / "options.json"))["options"]


def test_a_damaged_record_of_a_stage_names_its_file(tmp_path, capsys, caplog):
    """options.json and done.json are written whole (beside, then renamed); damaged anyway,
    each is one line naming it: a refused run, a policy compare leaves out and says so."""
    run = ["--run_dir", str(tmp_path)]
    assert _cli(DPO + run, capsys)[0] == 0
    done, options = tmp_path / "policy" / "done.json", tmp_path / "policy" / "options.json"
    text = options.read_text()
    options.write_text(text[:10])
    code, err = _cli(DPO + run, capsys)
    assert code == 1 and err.count("\n") == 1 and f"{options}: not a readable JSON file" in err
    options.write_text(text)
    done.write_text(done.read_text()[:10])
    with caplog.at_level("WARNING", logger="tisdpo"):
        code, err = _cli(["compare", "--run_dir", str(tmp_path)], capsys)
    assert code == 1 and f"{done}: not a readable JSON file" in caplog.text


def test_redo_without_resume_is_never_done_with_old_results(tmp_path, capsys):
    run = ["--run_dir", str(tmp_path)]
    assert _cli(DPO + run, capsys)[0] == 0
    code, _ = _cli(DPO + run + ["--pipeline.resume", "false", "--policy.stop_after", "1"],
                   capsys)
    assert code == 0 and not stage_done(str(tmp_path / "policy"))


def test_interrupted_redo_never_resumes_the_old_checkpoints(tmp_path, capsys, monkeypatch):
    """A redo at a new lr that fails after recording its options, before its first step
    (here: loading the model): the next run trains afresh at that lr, instead of resuming
    the old run's checkpoint as if it had been made with it."""
    run, out = ["--run_dir", str(tmp_path), "--log.every", "1"], str(tmp_path / "policy")
    assert _cli(DPO + run + ["--policy.stop_after", "2"], capsys)[0] == 0
    assert checkpoints(out)

    def interrupted(*a, **k):
        raise ValueError("interrupted while loading the model")
    with monkeypatch.context() as m:
        m.setattr(stages, "load_stage_model", interrupted)
        code, err = _cli(DPO + run + ["--policy.lr", "5e-4", "--pipeline.resume", "false"],
                         capsys)
    assert code == 1 and "interrupted" in err and not checkpoints(out)
    assert _cli(DPO + run + ["--policy.lr", "5e-4"], capsys)[0] == 0
    rows = [json.loads(x) for x in open(tmp_path / "policy" / "metrics.jsonl")]
    assert [r["step"] for r in rows if "lr" in r] == [1, 2, 3, 4]
    assert all(r["lr"] <= 5e-4 for r in rows if "lr" in r), rows


def _tiny_cfg(root):
    from test_stages import tiny_cfg

    return tiny_cfg(root)


def test_interrupted_weights_pass_is_not_mixed_with_another_rule(tmp_path, monkeypatch):
    ctx = context.make_context(_tiny_cfg(tmp_path))
    stages.run_contrastive(ctx)
    monkeypatch.setattr(weights, "SHARD", 8)
    real, calls = weights._estimate_shard, []

    def dies_on_second_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(weights, "_estimate_shard", dies_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        weights.run_weights(ctx)
    assert os.listdir(ctx.path("weights", "_shards"))            # one shard on disk
    other = _tiny_cfg(tmp_path)
    other.weights.method = "exp_clamp"
    with pytest.raises(StageOptionsChanged, match="weights.method=None then, 'exp_clamp' now"):
        weights.run_weights(context.make_context(other))
    # and a changed contrastive model (another digest) is refused too
    with open(ctx.path("contrastive", "positive", "done.json"), "a") as fh:
        fh.write(" ")
    with pytest.raises(StageOptionsChanged, match="contrastive/positive has changed"):
        weights.run_weights(ctx)


# ------------------------------------------------------------------ one process per run_dir

def test_second_process_on_a_run_dir_is_refused_naming_the_holder(tmp_path):
    with run_lock(str(tmp_path)):
        proc = subprocess.run([sys.executable, "-m", "tisdpo.cli"] + DPO
                              + ["--run_dir", str(tmp_path), "--seed", "1"],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 1
        assert f"in use by process {os.getpid()}" in proc.stderr
        assert not os.path.exists(tmp_path / "config.yaml")        # nothing written
    with run_lock(str(tmp_path)):                                 # released, then reusable
        with run_lock(str(tmp_path)):                              # nested: shared
            pass


def test_lock_is_released_when_the_holder_dies(tmp_path):
    code = ("import os, sys, time\n"
            "from tisdpo.pipeline.lock import run_lock\n"
            f"with run_lock({str(tmp_path)!r}):\n"
            "    print('locked', flush=True)\n"
            "    time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(RunLocked, match=f"process {proc.pid}"):
            with run_lock(str(tmp_path)):
                pass
    finally:
        proc.kill()
        proc.wait()
    with run_lock(str(tmp_path)):                                 # no stale lock after kill -9
        pass


# ------------------------------------------------------------------ signals, divergence

def test_sigterm_checkpoints_and_exits_128_plus_15_then_resumes(tmp_path):
    run = str(tmp_path)
    args = [sys.executable, "-m", "tisdpo.cli"] + DPO + ["--run_dir", run, "--policy.max_steps",
                                                        "400", "--log.every", "1"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "policy" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not (
            metrics.is_file() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    (ckpt,) = checkpoints(str(tmp_path / "policy"))
    assert "stopped on SIGTERM" in err and not stage_done(str(tmp_path / "policy"))
    step = int(ckpt.rsplit("-", 1)[1])
    assert 2 <= step < 400
    lines = [json.loads(x) for x in open(metrics)]
    assert max(r["step"] for r in lines) == step                # logged up to the checkpoint


def test_diverging_contrastive_stage_fails_and_is_not_done(tmp_path, capsys):
    code, err = _cli(["contrastive", "--run_dir", str(tmp_path), "--contrastive.lr", "1e30",
                      "--contrastive.max_steps", "6", "--contrastive.max_grad_norm", "1e30"]
                     + TINY, capsys)
    assert code == 1 and "non-finite at step" in err and err.count("\n") == 1
    assert not stage_done(str(tmp_path / "contrastive" / "positive"))
    assert not stage_done(str(tmp_path / "contrastive"))


def test_non_finite_contrastive_scores_are_an_error_naming_the_record(tmp_path, monkeypatch):
    ctx = context.make_context(_tiny_cfg(tmp_path))
    stages.run_contrastive(ctx)
    real = weights.completion_logps

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        out[1][0] = float("nan")
        return out

    monkeypatch.setattr(weights, "completion_logps", poisoned)
    with pytest.raises(ValueError, match=r"record \d+ \(chosen\): non-finite token score"):
        weights.run_weights(ctx)
    assert not stage_done(ctx.path("weights"))


# ------------------------------------------------------------------ the user's own weights

def test_train_uses_token_weights_from_the_users_file(tmp_path, capsys):
    cfg = _tiny_cfg(tmp_path)
    ctx = context.make_context(cfg)
    train, _, _ = make_synthetic_task(12, 0, seed=3)
    tok, _ = tokenize_pairs(datasets.Dataset.from_list(train), ctx.tokenizer,
                            context.tokenize_cfg(cfg, "tisdpo"))
    path = tmp_path / "mine.jsonl"
    with open(path, "w") as fh:
        for rec, t in zip(train, tok):
            rec = {k: rec[k] for k in ("prompt", "chosen", "rejected")}
            rec["chosen_weight"] = [0.5] * len(t["chosen_ids"])
            rec["rejected_weight"] = [1.5] * len(t["rejected_ids"])
            fh.write(json.dumps(rec) + "\n")
    args = ["train", "--data.train", str(path), "--data.max_length", str(cfg.data.max_length),
            "--data.max_prompt_length", str(cfg.data.max_prompt_length), "--policy.max_steps",
            "2", "--policy.batch_size", "4", "--policy.lr", "1e-2", "--policy.method", "tisdpo"] + TINY
    loss = {}
    for mode in ("auto", "equal"):              # auto: the file's weights; equal: all ones
        run = tmp_path / mode
        code, err = _cli(args + ["--run_dir", str(run), "--policy.token_weights", mode], capsys)
        assert code == 0, err
        loss[mode] = json.load(open(run / "policy" / "done.json"))["metrics"]["loss"]
    assert loss["auto"] != loss["equal"]        # the weights reached the loss (step 2)


def test_base_model_with_other_sizes_is_refused(tmp_path):
    context.base_model_path(context.make_context(_tiny_cfg(tmp_path)))
    other = _tiny_cfg(tmp_path)
    other.model.tiny_layers = 2
    with pytest.raises(StageOptionsChanged, match="model.tiny_layers=1 then, 2 now"):
        context.base_model_path(context.make_context(other))
    context.base_model_path(context.make_context(_tiny_cfg(tmp_path)))     # same: reused


def test_weights_refuse_a_contrastive_redo_stopped_half_way(tmp_path, monkeypatch):
    """A redo of the contrastive stage (other lr, no resume) stopped while pi- trains leaves
    the old pi- model on disk: the weights stage must not take it for the new one."""
    from test_stages import tiny_cfg
    from tisdpo.train import trainer as T

    over = {"contrastive.max_steps": 1}
    stages.run_contrastive(context.make_context(tiny_cfg(tmp_path, **over)))
    real = T.Trainer.train

    def stopped(self, **kw):
        if self.desc == "contrastive-":
            raise KeyboardInterrupt("stopped")
        return real(self, **kw)
    monkeypatch.setattr(T.Trainer, "train", stopped)
    redo = {**over, "contrastive.lr": 0.05}
    with pytest.raises(KeyboardInterrupt):
        stages.run_contrastive(context.make_context(
            tiny_cfg(tmp_path, **redo, **{"pipeline.resume": False})))
    monkeypatch.setattr(T.Trainer, "train", real)
    assert os.path.isdir(tmp_path / "contrastive" / "negative" / "final")    # the old pi-
    with pytest.raises(ValueError, match="has not finished"):
        weights.run_weights(context.make_context(tiny_cfg(tmp_path, **redo)))


@pytest.mark.parametrize("original", ["redone", "deleted"])
def test_weights_read_pi_plus_and_minus_of_their_own_run_folder(tmp_path, monkeypatch, original):
    """A copy of a run folder (or one named by a relative path from elsewhere) must read its
    own contrastive models, not the folder its contrastive stage recorded in done.json."""
    from test_stages import tiny_cfg

    over = {"contrastive.max_steps": 1}
    first, copy = tmp_path / "first", tmp_path / "copy"
    stages.run_contrastive(context.make_context(tiny_cfg(first, **over)))
    shutil.copytree(first, copy)
    if original == "deleted":
        shutil.rmtree(first)
    else:       # the original's pi+/pi- redone with another lr: the copy keeps the old ones
        stages.run_contrastive(context.make_context(
            tiny_cfg(first, **over, **{"contrastive.lr": 0.05, "pipeline.resume": False})))
    monkeypatch.chdir(tmp_path)                 # the copy named by a relative path
    ctx = context.make_context(tiny_cfg("copy", **over))
    assert context.contrastive_models(ctx)["positive"] == \
        os.path.join("copy", "contrastive", "positive", "final")
    loaded = []
    real = weights.load_stage_model
    monkeypatch.setattr(weights, "load_stage_model",
                        lambda ctx, path, **kw: loaded.append(path) or real(ctx, path, **kw))
    weights.run_weights(ctx)
    assert loaded[:2] == [os.path.join("copy", "contrastive", side, "final")
                          for side in ("positive", "negative")]
