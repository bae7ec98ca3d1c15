"""The thin loop: resume equality, accumulation normalisation, schedules, outputs."""
import json
import os

import pytest
import torch

from trainer_cases import CPU, MCFG, VOCAB
from trainer_cases import model as _model
from trainer_cases import pref_objective as _pref_objective
from trainer_cases import records as _records
from trainer_cases import trainer as _trainer
from numerics import assert_oracle
from tisdpo.train.collate import PackedPairCollator, PaddedPairCollator
from tisdpo.loss import TISDPOLoss
from tisdpo.train.checkpoint import latest_checkpoint, stage_done
from tisdpo.train.model import (
    enable_activation_checkpointing, head, hidden_states,
)
from tisdpo.train.objectives import PreferenceObjective, SFTObjective
from tisdpo.train.trainer import lr_factor


@pytest.mark.parametrize("optimizer", ["adamw", "rmsprop"])
def test_resume_between_steps_is_bitwise_identical(tmp_path, optimizer):
    # 16 pairs, micro-batch 3, accumulation 2 -> 6 micro-batches (3 steps) per epoch, last
    # window of each epoch holding a partial micro-batch; 2 epochs -> 6 steps. Stop after
    # step 4 (inside epoch 2), resume with new objects, compare with an uninterrupted run.
    data = _records(16)
    full = _trainer(_model(), _pref_objective(), data, tmp_path / "full", optimizer=optimizer)
    full.train()
    assert full.state.step == 6

    first = _trainer(_model(), _pref_objective(), data, tmp_path / "cut", optimizer=optimizer,
                     stop_after=4)
    out = first.train()
    assert out == {"stopped": True, "step": 4} and not stage_done(str(tmp_path / "cut"))
    assert latest_checkpoint(str(tmp_path / "cut")).endswith("step-0000004")
    torch.manual_seed(1234)                     # disturb the global RNG: resume restores it
    resumed_model = _model(seed=99)             # different init: everything must come from disk
    resumed = _trainer(resumed_model, _pref_objective(), data, tmp_path / "cut",
                       optimizer=optimizer)
    resumed.train()
    assert resumed.state.step == 6 and stage_done(str(tmp_path / "cut"))
    for (name, a), (_, b) in zip(full.model.named_parameters(), resumed_model.named_parameters()):
        assert torch.equal(a, b), f"{name} differs after resume"
    rows = [json.loads(x) for x in open(tmp_path / "cut" / "metrics.jsonl")]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]


def _captured_grads(trainer):
    grads = {}

    def capture(*_, **__):
        for name, p in trainer.model.named_parameters():
            grads[name] = p.grad.detach().clone()
    trainer.optimizer.step = capture
    trainer._step()
    return grads


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step")
@pytest.mark.parametrize("kind", ["preference", "preference_packed", "sft", "sft_packed"])
def test_grad_accumulation_equals_one_big_batch(tmp_path, kind):
    # 8 pairs: one micro-batch of 8 vs 4 accumulated micro-batches of 2 (same pairs: the
    # epoch order depends only on the seed). Truth: the big padded batch in float64
    # (reference ops); eager: the same in float32; actual: the accumulated float32 run
    # (padded, or padding-free packed rows with block-diagonal attention).
    data = _records(8)
    collate = PackedPairCollator(0) if kind.endswith("_packed") else PaddedPairCollator(0)

    def objective(impl):
        if kind.startswith("sft"):
            return SFTObjective(model_cfg=MCFG, device=CPU, impl=impl)
        return _pref_objective(impl)

    def grads(dtype, impl, bs, accum, collate=PaddedPairCollator(0)):
        t = _trainer(_model(dtype=dtype), objective(impl), data, tmp_path / f"{dtype}{bs}",
                     collate=collate, batch_size=bs, grad_accum=accum, max_grad_norm=None)
        return _captured_grads(t)

    truth = grads(torch.float64, "reference", 8, 1)
    eager = grads(torch.float32, "reference", 8, 1)
    actual = grads(torch.float32, "torch", 2, 4, collate)       # packed rows for _packed
    for name in truth:
        assert_oracle(actual[name], eager[name], truth[name], dtype=torch.float32,
                      name=f"{kind} grad {name}", metric="rms")


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_metrics_of_accumulated_micro_batches_are_the_big_batch_metrics(tmp_path, packed):
    """8 pairs of uneven lengths with random token weights: one batch of 8, or 4 micro-batches
    of 2. Per-pair metrics average over pairs, weights/* over each side's response tokens
    (micro-batches holding more tokens count more), so both give the big batch's values."""
    collate = PackedPairCollator(0) if packed else PaddedPairCollator(0)

    def metrics(bs, accum):
        t = _trainer(_model(), _pref_objective(), _records(8), tmp_path / f"{bs}",
                     collate=collate, batch_size=bs, grad_accum=accum, max_grad_norm=None)
        return {k: float(v) for k, v in t._step()[1].items()}
    big, small = metrics(8, 1), metrics(2, 4)
    tokens = {}
    for rec in _records(8):
        for side in ("chosen", "rejected"):
            tokens.setdefault(side, []).extend(rec[f"{side}_weight"])
    for side, ws in tokens.items():             # the token mean, not a mean of batch means
        assert big[f"weights/{side}"] == pytest.approx(sum(ws) / len(ws), rel=1e-5)
    for key in ("weights/chosen", "weights/rejected", "rewards/margins", "logps/chosen"):
        assert small[key] == pytest.approx(big[key], rel=1e-4, abs=1e-5), key


def test_accumulation_normaliser_is_the_whole_window(tmp_path):
    # the objective sees normalizer = pairs of the whole accumulated batch, not its own
    seen = []

    class Spy:
        def count(self, batch):
            return batch["input_ids"].shape[0] // 2

        def __call__(self, model, batch, *, normalizer):
            seen.append(normalizer)
            h = hidden_states(model, batch)
            return h.float().mean() * 0, {}

    t = _trainer(_model(), Spy(), _records(7), tmp_path, batch_size=2, grad_accum=3,
                 epochs=1.0)
    t._step()
    t._step()
    assert seen == [6.0, 6.0, 6.0, 1.0]      # 7 pairs: windows of 2+2+2 and then 1


def test_lr_schedules():
    assert lr_factor(0, warmup=4, total=10, schedule="constant") == 1 / 5
    assert lr_factor(3, warmup=4, total=10, schedule="constant") == 4 / 5
    assert lr_factor(9, warmup=4, total=10, schedule="constant") == 1.0
    assert lr_factor(4, warmup=4, total=10, schedule="linear") == 1.0
    assert lr_factor(7, warmup=4, total=10, schedule="linear") == 0.5
    assert lr_factor(7, warmup=4, total=10, schedule="cosine") == pytest.approx(0.5)
    assert lr_factor(10, warmup=4, total=10, schedule="cosine") == pytest.approx(0.0)
    with pytest.raises(ValueError, match="schedule"):
        lr_factor(5, warmup=0, total=10, schedule="exp")


def test_logged_lr_is_the_lr_each_update_used(tmp_path):
    """Five updates, warmup 2 then linear: metrics.jsonl gives each step the lr its update
    used (not the next step's, which would log 0 for the last update)."""
    t = _trainer(_model(), _pref_objective(), _records(6), tmp_path, lr=1.0, warmup_steps=2,
                 schedule="linear", batch_size=2, grad_accum=1, max_steps=5, optimizer="rmsprop")
    t.train()
    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    logged = [r["lr"] for r in rows if "loss" in r]
    assert logged == pytest.approx([lr_factor(k, warmup=2, total=5, schedule="linear")
                                    for k in range(5)])
    assert logged[-1] > 0


def test_fractional_epochs_count_exact_steps(tmp_path):
    """1.1 epochs of 50 steps is 55 steps (1.1 × 50 is 55.00000000000001 in floats)."""
    t = _trainer(_model(), _pref_objective(), _records(50), tmp_path, batch_size=1,
                 grad_accum=1, epochs=1.1)
    assert t.steps_per_epoch == 50 and t.state.total_steps == 55


def test_outputs_metrics_and_eval(tmp_path):
    data, held = _records(6), _records(5, seed=1)
    t = _trainer(_model(), _pref_objective(), data, tmp_path, epochs=1.0)
    t.eval_data = held
    result = t.train()
    assert {"eval/loss", "eval/rewards/accuracies", "eval/rewards/margins",
            "eval/rewards/chosen", "eval/rewards/rejected"} <= set(result)
    assert 0.0 <= result["eval/rewards/accuracies"] <= 1.0
    assert os.path.isfile(tmp_path / "final" / "config.json")
    assert any(f.endswith(".safetensors") for f in os.listdir(tmp_path / "final"))
    done = json.load(open(tmp_path / "done.json"))
    assert done["steps"] == 1 and "eval/loss" in done["metrics"]
    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert rows[0]["step"] == 1 and {"loss", "lr", "grad_norm"} <= set(rows[0])


def test_model_hidden_states_feed_the_head():
    # hidden states before the head + the head weight reproduce the model's own logits
    model = _model().eval()
    ids = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        h = hidden_states(model, {"input_ids": ids})
        spec = head(model)
        ours = h @ spec.weight.T
        eager = model(input_ids=ids).logits
        truth = _model(dtype=torch.float64).eval()(input_ids=ids).logits
    assert spec.weight is model.get_input_embeddings().weight      # tied
    assert_oracle(ours, eager, truth, dtype=torch.float32, name="logits")


def test_empty_data_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        _trainer(_model(), _pref_objective(), [], tmp_path)


def _one_step_grads(tmp_path, model, model_cfg, impl="torch"):
    objective = PreferenceObjective(TISDPOLoss(method="tisdpo", impl=impl), model_cfg=model_cfg,
                                    device=CPU, use_weights=True)
    t = _trainer(model, objective, _records(6), tmp_path, batch_size=6, grad_accum=1,
                 max_grad_norm=None)
    return _captured_grads(t)


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step")
def test_activation_checkpointing_gives_the_same_gradients(tmp_path):
    import dataclasses

    ckpt_cfg = dataclasses.replace(MCFG, gradient_checkpointing=True)
    model = _model()
    enable_activation_checkpointing(model)
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    actual = _one_step_grads(tmp_path / "a", model, ckpt_cfg)
    eager = _one_step_grads(tmp_path / "b", _model(), MCFG, impl="reference")
    truth = _one_step_grads(tmp_path / "c", _model(dtype=torch.float64), MCFG, impl="reference")
    for name in truth:
        assert_oracle(actual[name], eager[name], truth[name], dtype=torch.float32,
                      name=f"checkpointed grad {name}", metric="rms")


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step")
@pytest.mark.parametrize("mode", ["autocast", "weights"])
def test_bf16_training_step_runs(tmp_path, mode):
    import dataclasses

    cfg = dataclasses.replace(MCFG, dtype="bfloat16", bf16_mode=mode)
    model = _model(dtype=torch.bfloat16 if mode == "weights" else torch.float32)
    grads = _one_step_grads(tmp_path, model, cfg)
    assert all(torch.isfinite(g).all() for g in grads.values())
    want = torch.bfloat16 if mode == "weights" else torch.float32
    assert all(g.dtype == want for g in grads.values())


@pytest.mark.parametrize("optimizer", ["adamw", "rmsprop"])
def test_weight_decay_leaves_biases_and_norms_alone(optimizer):
    """As HF's Trainer (and TRL): matrices decay, biases and normalisation weights do not.
    With no gradient at all, one step moves exactly the decayed parameters."""
    from tisdpo.train.config import PolicyConfig
    from tisdpo.train.trainer import make_optimizer

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = make_optimizer(model.parameters(), PolicyConfig(optimizer=optimizer, lr=0.1,
                                                          weight_decay=0.5))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    moved = {k for k, v in model.named_parameters() if not torch.equal(v, before[k])}
    assert moved == {"0.weight"}
    assert len(make_optimizer(model.parameters(), PolicyConfig(weight_decay=0.0)).param_groups) \
        == 1
