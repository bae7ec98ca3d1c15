"""Recovery at the edges of a stage: a signal during the final evaluation or saves, a NaN
gradient without clipping, a torn or damaged metrics.jsonl, a checkpoint written twice, a
kill between the last checkpoint and done.json, and a rerun already at ``stop_after``. Each
ends as an uninterrupted run would, or stops with a one-line message naming what to do."""
import json
import logging
import os
import signal

import pytest
import torch

from trainer_cases import Poisoned, die_writing, model, pref_objective, records, trainer
from tisdpo import cli
from tisdpo.train import checkpoint, trainer as trainer_module
from tisdpo.train.checkpoint import checkpoints, read_state, stage_done, write_state
from tisdpo.train.trainer import TrainingDiverged


DATA, HELD = records(16), records(4, seed=1)       # 6 steps with the trainer_cases defaults


def _run(out, objective=None, **cfg):
    t = trainer(model(), objective or pref_objective(), DATA, out, **cfg)
    t.eval_data = HELD
    return t


def _rows(out):
    rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    for r in rows:
        r.pop("elapsed_s", None)                  # wall time: the one field allowed to differ
    return rows


def _done(out):
    return json.load(open(os.path.join(out, "done.json")))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """metrics.jsonl and done.json of an uninterrupted run (with held-out records)."""
    out = tmp_path_factory.mktemp("reference")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _run(out).train()
    finally:
        torch.set_num_threads(n)
    return _rows(out), _done(out)


@pytest.fixture
def writes(monkeypatch):
    """The steps whose checkpoints the trainer writes, in order."""
    steps = []
    real = trainer_module.write_state

    def counting(final, state):
        steps.append(state["state"]["step"])
        real(final, state)

    monkeypatch.setattr(trainer_module, "write_state", counting)
    return steps


# ------------------------------------------------------------------ a signal at the stage's end

class _SignalAt:
    """Wraps a trainer method: sends ``sig`` to this process when the method is entered."""

    def __init__(self, method, sig):
        self.method, self.sig = method, sig

    def __call__(self, *a, **k):
        os.kill(os.getpid(), self.sig)
        return self.method(*a, **k)


@pytest.mark.parametrize("where", ["evaluate", "_finish"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_the_final_evaluation_or_save_finishes_then_stops(tmp_path, reference,
                                                                         where, sig):
    before = signal.getsignal(sig)
    t = _run(tmp_path)
    setattr(t, where, _SignalAt(getattr(t, where), sig))   # only the end calls them: no eval_every
    out = t.train()
    assert out["stopped"] and out["signal"] == signal.Signals(sig).name and out["step"] == 6
    assert signal.getsignal(sig) is before
    assert stage_done(str(tmp_path)) and _done(tmp_path) == reference[1]
    assert _rows(tmp_path) == reference[0]


@pytest.mark.parametrize("others", [(1.0, 0.0), (0.0, 1.0), (1.0, 1.0)])
def test_a_signal_on_another_rank_is_named_on_this_one(tmp_path, others):
    """Only another rank received the signal (the sum over ranks says which): this rank
    stops after the same step and names that signal, which the CLI turns into its exit
    status (128 + its number), never a placeholder."""
    t = _run(tmp_path)
    local = t.par.sum_host

    def sum_host(values):
        out = local(values)
        if len(values) == 2 and t.state.step == 2:      # the signal reduction after step 2
            out = [a + b for a, b in zip(out, others)]
        return out

    t.par.sum_host = sum_host
    out = t.train()
    name = "SIGTERM" if others[0] else "SIGINT"
    assert out == {"stopped": True, "step": 2, "signal": name}
    assert signal.Signals[out["signal"]].value in (signal.SIGTERM, signal.SIGINT)


def test_sigterm_during_a_stages_final_evaluation_exits_143_before_the_next(tmp_path, capsys,
                                                                           monkeypatch):
    tiny = ["--model.tiny_hidden_size", "32", "--model.tiny_layers", "1", "--model.tiny_heads",
            "2", "--model.tiny_kv_heads", "1", "--model.tiny_intermediate_size", "48",
            "--data.synthetic_train", "16", "--data.synthetic_eval", "4", "--device", "cpu",
            "--threads", "1", "--log.progress", "false", "--log.tensorboard", "false"]
    args = ["contrastive", "--run_dir", str(tmp_path), "--contrastive.max_steps", "2",
            "--contrastive.batch_size", "4"] + tiny
    real, sent = trainer_module.Trainer.evaluate, []

    def evaluate(self):
        if self.state.step == self.state.total_steps and not sent:
            sent.append(self.desc)
            os.kill(os.getpid(), signal.SIGTERM)       # a preemption notice arrives now
        return real(self)

    monkeypatch.setattr(trainer_module.Trainer, "evaluate", evaluate)
    pos, neg = tmp_path / "contrastive" / "positive", tmp_path / "contrastive" / "negative"
    assert cli.main(args) == 128 + signal.SIGTERM
    assert stage_done(str(pos)) and not os.path.exists(neg)      # the next stage never began
    capsys.readouterr()
    assert cli.main(args) == 0 and stage_done(str(neg))          # the rerun goes on from there


# ------------------------------------------------------------------ a NaN gradient, no clipping

def test_nan_gradient_without_clipping_stops_before_the_update(tmp_path):
    # grad_accum 2: calls 5 and 6 form step 3
    t = trainer(model(), Poisoned(pref_objective(), at=5, gradient=True), DATA, tmp_path,
                save_every=1, max_grad_norm=None)
    with pytest.raises(TrainingDiverged, match=r"gradient norm became non-finite at step 3 "
                                               r"\(loss [0-9.]+, gradient norm nan\)") as info:
        t.train()
    assert "\n" not in str(info.value) and not stage_done(str(tmp_path))
    assert t.state.step == 2 and all(torch.isfinite(p).all() for p in t.model.parameters())
    newest = checkpoints(str(tmp_path))[0]
    assert os.path.basename(newest) == "step-0000002"
    assert all(torch.isfinite(v).all() for v in read_state(newest)["model"].values())


def test_gradient_norm_is_logged_without_clipping(tmp_path):
    t = trainer(model(), pref_objective(), DATA, tmp_path, max_grad_norm=None, max_steps=2)
    result = t.train()
    rows = [r for r in _rows(tmp_path) if "loss" in r]
    assert len(rows) == 2 and all(r["grad_norm"] > 0 for r in rows)
    assert result["grad_norm"] == rows[-1]["grad_norm"]


# ------------------------------------------------------------------ metrics.jsonl on resume

def test_torn_last_metrics_line_is_dropped_on_resume(tmp_path, reference, caplog):
    assert _run(tmp_path, stop_after=4).train()["stopped"]
    log = tmp_path / "metrics.jsonl"
    with open(log, "ab") as fh:
        fh.write(b'{"step": 5, "loss": 0.69, "lr": 0.00')   # an append cut short by kill -9
    with caplog.at_level(logging.WARNING, logger="tisdpo"):
        _run(tmp_path).train()
    assert "incomplete last line" in caplog.text and str(log) in caplog.text
    assert _rows(tmp_path) == reference[0] and _done(tmp_path) == reference[1]


def test_damaged_metrics_line_before_the_last_names_the_file_and_line(tmp_path):
    assert _run(tmp_path, stop_after=4).train()["stopped"]
    log = tmp_path / "metrics.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    lines[1] = '{"step": 2, "loss": \n'
    log.write_text("".join(lines))
    with pytest.raises(ValueError, match=r"metrics\.jsonl line 2 is not a JSON object") as info:
        _run(tmp_path).train()
    assert str(log) in str(info.value) and "\n" not in str(info.value)


def test_kill_while_cutting_back_metrics_leaves_the_log_whole(tmp_path, monkeypatch):
    assert _run(tmp_path, stop_after=4).train()["stopped"]
    log = tmp_path / "metrics.jsonl"
    before = log.read_bytes()
    die_writing(monkeypatch, "metrics.jsonl")
    with pytest.raises(SystemExit):
        _run(tmp_path).train()
    monkeypatch.undo()
    assert log.read_bytes() == before


# ------------------------------------------------------------------ a checkpoint written twice

def test_rewriting_a_checkpoint_never_leaves_the_step_missing(tmp_path, monkeypatch):
    final = str(tmp_path / "checkpoints" / "step-0000003")
    write_state(final, {"model": {"w": torch.arange(3)}, "optimizer": {}, "state": {}})

    def killed(src, dst):                    # the process dies where the new copy is renamed
        raise SystemExit("killed")

    monkeypatch.setattr(checkpoint.os, "replace", killed)
    with pytest.raises(SystemExit):
        write_state(final, {"model": {"w": torch.arange(4)}, "optimizer": {}, "state": {}})
    monkeypatch.undo()
    assert checkpoints(str(tmp_path)) == [final]
    assert torch.equal(read_state(final)["model"]["w"], torch.arange(3))
    assert checkpoint.remove_partial(str(tmp_path)) == [final + ".tmp"]
    write_state(final, {"model": {"w": torch.arange(5)}, "optimizer": {}, "state": {}})
    assert torch.equal(read_state(final)["model"]["w"], torch.arange(5))
    assert os.listdir(tmp_path / "checkpoints") == ["step-0000003"]


def test_each_step_is_checkpointed_once(tmp_path, writes):
    t = trainer(model(), pref_objective(), DATA, tmp_path, save_every=1, keep_checkpoints=1,
                stop_after=2)
    assert t.train() == {"stopped": True, "step": 2}
    assert writes == [1, 2]                            # not step 2 again for stop_after
    trainer(model(), pref_objective(), DATA, tmp_path, save_every=1).train()
    assert writes == [1, 2, 3, 4, 5, 6] and stage_done(str(tmp_path))


# ------------------------------------------------------------------ between checkpoint and done

@pytest.mark.parametrize("lost", ["done_and_final", "final_evaluation", "last_step_signal"])
def test_stage_resumed_at_its_last_step_ends_as_an_uninterrupted_one(tmp_path, reference,
                                                                      lost):
    t = _run(tmp_path)
    if lost == "done_and_final":             # killed after the last checkpoint was written
        t.train()
        os.remove(tmp_path / "done.json")
        for name in os.listdir(tmp_path / "final"):
            os.remove(tmp_path / "final" / name)
        os.rmdir(tmp_path / "final")
    elif lost == "final_evaluation":         # killed while evaluating at the end
        def dying():
            with open(tmp_path / "metrics.jsonl", "a") as fh:
                fh.write('{"step": 6, "eval/lo')
            raise SystemExit("killed")

        t.evaluate = dying
        with pytest.raises(SystemExit):
            t.train()
    else:                                    # SIGTERM during the last step
        run = t._run

        def signalling(batch, normalizer):
            if t.state.step == 5:
                os.kill(os.getpid(), signal.SIGTERM)
            return run(batch, normalizer)

        t._run = signalling
        assert t.train()["stopped"]
        assert os.path.basename(checkpoints(str(tmp_path))[0]) == "step-0000006"
    assert not stage_done(str(tmp_path))
    _run(tmp_path).train()
    assert _done(tmp_path) == reference[1]
    assert _rows(tmp_path) == reference[0]


# ------------------------------------------------------------------ a rerun at stop_after

def test_rerun_at_stop_after_writes_nothing_and_says_how_to_continue(tmp_path, writes, caplog):
    assert trainer(model(), pref_objective(), DATA, tmp_path, stop_after=2).train()["stopped"]
    (ckpt,) = checkpoints(str(tmp_path))
    stamp = os.stat(os.path.join(ckpt, "state.pt")).st_mtime_ns
    writes.clear()
    with caplog.at_level(logging.INFO, logger="tisdpo"):
        again = trainer(model(), pref_objective(), DATA, tmp_path, stop_after=2).train()
    assert again == {"stopped": True, "step": 2} and writes == []
    assert os.stat(os.path.join(ckpt, "state.pt")).st_mtime_ns == stamp
    assert "already at step 2" in caplog.text and "without stop_after" in caplog.text


def test_kill_while_writing_done_leaves_the_stage_not_done(tmp_path, reference, monkeypatch):
    real_dump = json.dump

    def dying_dump(obj, fh, **k):
        fh.write(json.dumps(obj, **k)[:20])
        fh.flush()
        raise SystemExit("killed")

    monkeypatch.setattr(json, "dump", dying_dump)
    with pytest.raises(SystemExit):
        _run(tmp_path).train()
    monkeypatch.setattr(json, "dump", real_dump)
    assert not stage_done(str(tmp_path))            # not "done" with half a done.json
    _run(tmp_path).train()
    assert _done(tmp_path) == reference[1] and _rows(tmp_path) == reference[0]


def test_checkpoint_without_the_log_length_resumes_as_before(tmp_path, reference):
    """A checkpoint from before the log length was recorded: rows up to its step are kept."""
    assert _run(tmp_path, stop_after=4).train()["stopped"]
    (ckpt,) = checkpoints(str(tmp_path))
    state = read_state(ckpt)
    del state["metrics_rows"], state["last_metrics"]
    torch.save(state, os.path.join(ckpt, "state.pt"))
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 5, "loss": 1.0}\n')           # logged after it: redone
    _run(tmp_path).train()
    assert _rows(tmp_path) == reference[0] and _done(tmp_path) == reference[1]


def test_metrics_are_weighted_by_pairs_not_by_the_normaliser(tmp_path):
    """cdpo_code's normaliser counts position slots (padding included), but its metrics are
    means over pairs: batches of equal pairs weigh equally however long their padding."""
    objective = pref_objective(method="cdpo_code")
    t = _run(tmp_path, objective, eval_batch_size=2, eval_max_pairs=4)
    seen = []
    real = objective.__call__

    class _Probe:
        count, metric_weight = objective.count, objective.metric_weight

        def __call__(self, model, batch, *, normalizer):
            loss, metrics = real(model, batch, normalizer=normalizer)
            seen.append((objective.count(batch), objective.metric_weight(batch)))
            return loss, {"probe": torch.tensor(float(len(seen)))}

    t.objective = _Probe()
    t._run = t.par.wrap(t.model, t.objective)
    out = t.evaluate()
    assert len(seen) == 2 and seen[0][0] != seen[1][0] and seen[0][1] == seen[1][1] == 2
    assert out["eval/probe"] == 1.5                     # (1 + 2) / 2, not slot-weighted
