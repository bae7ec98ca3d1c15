"""TISDPOTrainer against stock TRL 1.16, step for step, on a tiny Llama (CPU).

Three optimizer steps (2 pairs × 2 accumulated micro-batches each) and an evaluation: the
same per-step logged loss and metrics as TRL's DPOTrainer (CPOTrainer for SimPO) and the same
final parameters, within 1e-5 relative (tests/integrations/trl_cases.py says relative to
what); under bf16 both train in bf16.
"""
import pytest
import torch

pytest.importorskip("trl", reason="the TRL integration needs trl (pip install 'tisdpo[trl]')")

import trl_cases as C  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from tisdpo.integrations.trl import TISDPOConfig, TISDPOTrainer  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return C.tokenizer()


@pytest.fixture(scope="module")
def data():
    return C.dataset(12, seed=0), C.dataset(4, seed=1)


def _both(tmp_path, tok, data, *, ours=None, with_ref=True, **overrides):
    train, evaluation = data
    kw = dict(tok=tok, train=train, evaluation=evaluation, with_ref=with_ref)
    stock = C.run(DPOTrainer, C.config(DPOConfig, tmp_path / "trl", **overrides), **kw)
    args = C.config(TISDPOConfig, tmp_path / "tisdpo", **{**overrides, **(ours or {})})
    return stock, C.run(TISDPOTrainer, args, **kw)


def _compare(stock, mine, beta, what):
    (logs_a, eval_a, final_a, init, _), (logs_b, eval_b, final_b, _, _) = stock, mine
    assert len(logs_a) == len(logs_b) == 3
    for step, (a, b) in enumerate(zip(logs_a, logs_b), 1):
        C.assert_logs_match(a, b, beta=beta, what=f"{what} step {step}")
    C.assert_logs_match(eval_a, eval_b, beta=beta, what=f"{what} eval",
                        keys=[k for k in eval_a if k.startswith("eval_") and "runtime" not in k
                              and "per_second" not in k])
    C.assert_params_match(final_a, final_b, init)


@pytest.mark.parametrize("loss_type,smoothing", [
    ("sigmoid", 0.0), ("ipo", 0.0), ("hinge", 0.0), ("robust", 0.1)])
def test_same_steps_as_dpo_trainer(tmp_path, tok, data, loss_type, smoothing):
    stock, mine = _both(tmp_path, tok, data, loss_type=[loss_type], label_smoothing=smoothing)
    _compare(stock, mine, 0.1, loss_type)
    logs = mine[0][-1]
    # the loss's own view sits beside TRL's names, the same names meaning the same (sums);
    # IPO's per-token means, what its link sees, come under their own names
    assert {"tisdpo/rewards/chosen", "tisdpo/logps/chosen", "tisdpo/weights/chosen"} <= set(logs)
    assert abs(logs["tisdpo/logps/chosen"] - logs["logps/chosen"]) <= \
        1e-5 * abs(logs["logps/chosen"])
    if loss_type == "ipo":
        assert abs(logs["tisdpo/logps_per_token/chosen"]) < abs(logs["logps/chosen"]) / 5


def test_one_sweep_strategy_takes_the_same_steps(tmp_path, tok, data, monkeypatch):
    """strategy="one_sweep" (every head gradient formed in the forward) against stock TRL."""
    import tisdpo.loss as loss_module

    calls = []
    sweep = loss_module.linear_preference_loss
    monkeypatch.setattr(loss_module, "linear_preference_loss",
                        lambda *a, **k: calls.append(1) or sweep(*a, **k))
    stock, mine = _both(tmp_path, tok, data, loss_type=["sigmoid"],
                        ours={"strategy": "one_sweep"})
    _compare(stock, mine, 0.1, "sigmoid one_sweep")
    assert len(calls) >= 6                  # 3 steps × 2 micro-batches, then evaluation


def test_gradient_checkpointing_and_a_tied_head(tmp_path, tok, data):
    """TRL's default gradient checkpointing on, embeddings tied to the head."""
    train, evaluation = data
    out = []
    for cls, cfg in ((DPOTrainer, DPOConfig), (TISDPOTrainer, TISDPOConfig)):
        args = C.config(cfg, tmp_path / cls.__name__, gradient_checkpointing=True)
        out.append(C.run(cls, args, tok=tok, train=train, evaluation=evaluation,
                         model=C.tiny_model(tok, tie=True)))
    assert out[1][4].model.is_gradient_checkpointing
    _compare(out[0], out[1], 0.1, "checkpointing")


def test_peft_reference_is_the_disabled_adapter(tmp_path, tok, data):
    from peft import LoraConfig

    train, evaluation = data
    out = []
    for cls, cfg in ((DPOTrainer, DPOConfig), (TISDPOTrainer, TISDPOConfig)):
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                          task_type="CAUSAL_LM")
        args = C.config(cfg, tmp_path / cls.__name__, learning_rate=1e-2)
        out.append(C.run(cls, args, tok=tok, train=train, evaluation=evaluation,
                         with_ref=False, peft_config=lora))
    trainer = out[1][4]
    assert trainer.ref_model is None and hasattr(trainer.model, "peft_config")
    trained = [k for k in out[1][2] if "lora_B" in k]
    assert trained and all(out[1][2][k].abs().max() > 0 for k in trained)
    _compare(out[0], out[1], 0.1, "peft")


@pytest.mark.parametrize("ref_model", [True, False])
def test_precomputed_reference_log_probs_are_per_token(tmp_path, tok, data, ref_model):
    """precompute_ref_log_probs=True stores per-token lists (one per TRL completion token)
    and trains as TRL does with its per-sequence sums; without a ref_model the reference is
    the policy before training."""
    train, evaluation = data
    stock, mine = _both(tmp_path, tok, data, with_ref=ref_model, precompute_ref_log_probs=True)
    assert mine[4].ref_model is None or ref_model
    _compare(stock, mine, 0.1, "precompute")
    ds = mine[4].train_dataset
    row = ds[0]
    assert isinstance(row["ref_chosen_logps"], list)
    assert len(row["ref_chosen_logps"]) == len(row["chosen_ids"])
    assert abs(sum(row["ref_chosen_logps"]) - stock[4].train_dataset[0]["ref_chosen_logps"]) \
        < 1e-4 * abs(sum(row["ref_chosen_logps"]))


def test_simpo_same_steps_as_cpo_trainer(tmp_path, tok):
    """SimPO: TRL's CPOTrainer(loss_type='simpo', cpo_alpha=0) vs TISDPOTrainer(method=
    'simpo'); CPOTrainer's logits/* average every position (prompt and padding too), so they
    are not compared."""
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    train = C.dataset(12, seed=0, bos=tok.bos_token)   # CPOTrainer prepends BOS, DPO's doesn't
    beta, gamma = 2.0, 0.5
    stock = C.run(CPOTrainer, C.config(CPOConfig, tmp_path / "cpo", loss_type="simpo",
                                       cpo_alpha=0.0, beta=beta, simpo_gamma=gamma),
                  tok=tok, train=train, with_ref=False)
    mine = C.run(TISDPOTrainer, C.config(TISDPOConfig, tmp_path / "tisdpo", method="simpo",
                                         beta=beta, gamma_beta_ratio=gamma / beta),
                 tok=tok, train=train, with_ref=False)
    assert mine[4].ref_model is None
    keys = ["loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
            "rewards/margins", "logps/chosen", "logps/rejected"]
    for step, (a, b) in enumerate(zip(stock[0], mine[0]), 1):
        C.assert_logs_match(a, b, beta=beta, keys=keys, what=f"simpo step {step}")
    C.assert_params_match(stock[2], mine[2], stock[3])


def _dtype_probe(model, seen):
    layer = model.model.layers[0].self_attn.q_proj
    # training forwards only (tisdpo's load-time head check runs one in eval mode)
    return layer.register_forward_hook(lambda m, i, o: seen.add(o.dtype) if m.training else None)


def test_bf16_runs_in_bf16(tmp_path, tok):
    """bf16=True: both trainers run the decoder and the head in bf16 — their logged
    log-probs leave the float32 run by a bf16-sized gap, and stay that close to each other."""
    from tisdpo import TISDPOLoss

    train = C.dataset(8, seed=0)
    logs, seen, head_in = {}, {}, []

    def loss_input(module, args):              # what reaches the fused head
        if isinstance(module, TISDPOLoss):
            head_in.append((args[0].dtype, args[1].dtype))

    hook = torch.nn.modules.module.register_module_forward_pre_hook(loss_input)
    try:
        for name, cls, cfg, bf16 in (("trl", DPOTrainer, DPOConfig, True),
                                     ("tisdpo", TISDPOTrainer, TISDPOConfig, True),
                                     ("fp32", TISDPOTrainer, TISDPOConfig, False)):
            model = C.tiny_model(tok, init=0.2)
            seen[name] = set()
            _dtype_probe(model, seen[name])
            args = C.config(cfg, tmp_path / name, bf16=bf16, max_steps=1)
            logs[name] = C.run(cls, args, tok=tok, train=train, model=model)
    finally:
        hook.remove()
    assert seen["trl"] == seen["tisdpo"] == {torch.bfloat16} and seen["fp32"] == {torch.float32}
    assert set(head_in[:2]) == {(torch.bfloat16, torch.bfloat16)}          # bf16 run's steps
    assert set(head_in[2:]) == {(torch.float32, torch.float32)}            # fp32 run's
    gap = {}
    for key in ("logps/chosen", "logps/rejected", "entropy"):
        a, b, ref = (logs[n][0][0][key] for n in ("trl", "tisdpo", "fp32"))
        gap[key] = (abs(a - ref) / abs(ref), abs(b - ref) / abs(ref), abs(a - b) / abs(ref))
    for key, (trl_gap, our_gap, between) in gap.items():
        # both leave float32 by bf16 rounding (≥ 1e-5 here; float32's own is ~1e-7) and by
        # the same amount: the two bf16 runs agree far better than either agrees with fp32
        assert trl_gap > 1e-5 and our_gap > 1e-5, (key, gap[key])
        assert between < 0.1 * min(trl_gap, our_gap), (key, gap[key])


@pytest.mark.parametrize("options,match", [
    ({"loss_type": ["exo_pair"]}, "loss_type='exo_pair'"),
    ({"loss_type": ["nca_pair"]}, "loss_type='nca_pair'"),
    ({"loss_type": ["bco_pair"]}, "loss_type='bco_pair'"),
    ({"loss_type": ["sppo_hard"]}, "loss_type='sppo_hard'"),
    ({"loss_type": ["apo_zero"]}, "loss_type='apo_zero'"),
    ({"loss_type": ["apo_down"]}, "loss_type='apo_down'"),
    ({"loss_type": ["discopop"]}, "loss_type='discopop'"),
    ({"loss_type": ["sigmoid_norm"]}, "loss_type='sigmoid_norm'"),
    ({"loss_type": ["aot"]}, "loss_type='aot'"),
    ({"loss_type": ["sft"]}, "loss_type='sft'"),
    ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 1.0]}, r"loss_type=\['sigmoid'"),
    ({"f_divergence_type": "js_divergence"}, "f_divergence_type='js_divergence'"),
    ({"use_weighting": True}, "use_weighting=True"),
    ({"ld_alpha": 0.5}, "ld_alpha=0.5"),
    ({"label_smoothing": 0.1}, "label_smoothing=0.1"),
    ({"loss_type": ["ipo"], "label_smoothing": 0.1}, "label_smoothing=0.1"),
    ({"method": "tisdpo", "loss_type": ["hinge"]}, "method='tisdpo' with loss_type='hinge'"),
    ({"method": "nope"}, "method='nope'"),
    ({"token_weights": "a,b,c"}, "token_weights='a,b,c'"),
    ({"method": "tisdpo_paper", "precompute_ref_log_probs": True}, "precompute_ref_log_probs"),
    ({"method": "tisdpo_paper", "filter_eps": 0.01}, "filter_eps=0.01"),
    ({"filter_eps": 1.5}, "filter_eps must be < 1"),
])
def test_unsupported_options_are_refused_in_one_line(tmp_path, tok, options, match):
    with pytest.raises(ValueError, match=match) as err:
        args = C.config(TISDPOConfig, tmp_path, **options)
        TISDPOTrainer(model=C.tiny_model(tok), args=args, train_dataset=C.dataset(2),
                      processing_class=tok)
    assert "\n" not in str(err.value)


def test_filter_eps_reaches_the_loss(tmp_path, tok):
    from tisdpo.integrations.trl_options import build_loss
    args = C.config(TISDPOConfig, tmp_path, filter_eps=0.01)
    assert build_loss(args).filter_eps == 0.01
    assert build_loss(C.config(TISDPOConfig, tmp_path)).filter_eps is None


def test_a_plain_dpo_config_is_refused_the_same_way(tmp_path, tok):
    """A stock DPOConfig (tisdpo options at their defaults) is checked by the trainer."""
    args = C.config(DPOConfig, tmp_path, loss_type=["nca_pair"])
    with pytest.raises(ValueError, match="loss_type='nca_pair'"):
        TISDPOTrainer(model=C.tiny_model(tok), args=args, train_dataset=C.dataset(2),
                      processing_class=tok)


def test_cdpo_code_is_a_mean_over_its_position_slots(tmp_path, tok, data, monkeypatch):
    """cdpo_code averages over every position slot of a micro-batch, as the released cDPO
    trainer (a DPOTrainer subclass) does; a pair count would scale its loss by T."""
    from tisdpo.loss import TISDPOLoss
    seen, forward = [], TISDPOLoss.forward

    def spy(self, weight, hidden, labels, **kw):
        seen.append((labels.shape[0] // 2 * labels.shape[1], kw.get("normalizer")))
        return forward(self, weight, hidden, labels, **kw)

    monkeypatch.setattr(TISDPOLoss, "forward", spy)
    args = C.config(TISDPOConfig, tmp_path / "cdpo", method="cdpo_code", token_weights="none",
                    max_steps=1)
    C.run(TISDPOTrainer, args, tok=tok, train=data[0], with_ref=True)
    assert seen and all(norm == slots for slots, norm in seen), seen


def test_one_sweep_with_fp16_is_refused_at_config_time():
    """fp16 training asks for float16 hidden states, which one_sweep refuses (its gradients
    would be rounded before the loss scale): TISDPOConfig says so at once, not at step 1.
    (TrainingArguments refuses fp16 on a machine without CUDA, so the check is called here.)"""
    from types import SimpleNamespace

    from tisdpo import TISDPOLoss
    from tisdpo.integrations.trl import _check_trainer_options

    loss = TISDPOLoss("dpo")
    with pytest.raises(ValueError, match="strategy='one_sweep' with fp16=True: float16") as e:
        _check_trainer_options(SimpleNamespace(strategy="one_sweep", fp16=True), loss, "dpo")
    assert "\n" not in str(e.value)
    for ok in (SimpleNamespace(strategy="auto", fp16=True),
               SimpleNamespace(strategy="one_sweep", fp16=False, bf16=True)):
        _check_trainer_options(ok, loss, "dpo")
