"""TISDPOLoss's inputs: what it refuses (one line, naming the argument, option or variable)
and how much of the normaliser a batch holds."""
import numpy as np
import pytest
import torch

from tisdpo import TISDPOLoss
from tisdpo.train.objectives import PreferenceObjective
from tisdpo_kernels import token_weights

V_, D_ = 20, 8


def _packed(seed=0, scores=True):
    """Three packed sequences A (4 tokens), B (5), C (3) and their per-token inputs (the
    contrastive log-probs a weight rule reads when ``scores``)."""
    g = torch.Generator().manual_seed(seed)
    n = 12
    kw = dict(lm_head_weight=torch.randn(V_, D_, generator=g) * 0.5,
                hidden=torch.randn(n, D_, generator=g),
                labels=torch.randint(0, V_, (n,), generator=g),
                ref_hidden=torch.randn(n, D_, generator=g),
                pos_logps=-3 * torch.rand(n, generator=g),
                neg_logps=-3 * torch.rand(n, generator=g),
                seq_offsets=torch.tensor([0, 4, 9, 12]))
    if not scores:
        del kw["pos_logps"], kw["neg_logps"]
    return kw


def test_a_sequence_in_both_roles_refuses_computed_weights():
    """Ranked data (A > B, B > C) names B as rejected and as chosen. A weight rule gives B's
    tokens a different weight on each side, and a token has one weight: refused, naming B.
    Weights given per token are used as given."""
    kw = _packed()
    loss = TISDPOLoss("tisdpo_paper_no_eta", impl="torch")
    with pytest.raises(ValueError, match="sequence 1 is chosen in one pair and rejected") as e:
        loss(**kw, pairs=torch.tensor([[0, 1], [1, 2]]))
    assert "\n" not in str(e.value)
    out, _ = loss(**_packed(scores=False), pairs=torch.tensor([[0, 1], [1, 2]]),
                  weights=torch.rand(12))
    assert torch.isfinite(out)
    out, _ = loss(**kw, pairs=torch.tensor([[0, 1], [2, 1]]))    # B rejected twice: one side
    assert torch.isfinite(out)


def test_out_of_range_labels_are_named_labels():
    kw = _packed(scores=False)
    kw["labels"][5] = V_
    with pytest.raises(ValueError, match=rf"^labels\[5\] = {V_} lies outside \[0, {V_}\)"):
        TISDPOLoss("dpo", impl="torch")(**kw, pairs=torch.tensor([[0, 1]]))


def test_labels_that_cannot_hold_ignore_index_are_refused():
    kw = _packed(scores=False)
    with pytest.raises(ValueError, match=r"labels must be an integer tensor \(int64, int32 or "
                                         r"int16\), got dtype torch.uint8"):
        TISDPOLoss("dpo", impl="torch")(**{**kw, "labels": kw["labels"].to(torch.uint8)},
                                        pairs=torch.tensor([[0, 1]]))


@pytest.mark.parametrize("impl,strategy", [("torch", "recompute"), ("torch", "one_sweep"),
                                           ("reference", "recompute")])
@pytest.mark.parametrize("bad", [-1.0, 0.0, float("nan"), float("inf"), True])
def test_a_tensor_normalizer_is_checked_like_a_number(bad, impl, strategy):
    """Every backend, the float64 oracle too: a negative normaliser would flip the loss's
    sign and a zero one make every gradient NaN, silently."""
    kw = _packed(scores=False)
    loss = TISDPOLoss("dpo", impl=impl, strategy=strategy)
    for norm in (bad,) if bad is True else (bad, torch.tensor(bad)):
        with pytest.raises(ValueError, match="normalizer must be"):
            loss(**kw, pairs=torch.tensor([[0, 1]]), normalizer=norm)


@pytest.mark.parametrize("bad", [-2.0, 0.0])
def test_the_fused_loss_op_checks_its_normalizer_on_the_oracle_too(bad):
    from tisdpo_kernels import linear_preference_loss
    from tisdpo_kernels.config import PreferenceConfig

    kw = _packed(scores=False)
    with pytest.raises(ValueError, match="normalizer must be > 0.0"):
        linear_preference_loss(kw["hidden"], kw["lm_head_weight"], kw["labels"],
                               seq_offsets=kw["seq_offsets"], pairs=torch.tensor([[0, 1]]),
                               config=PreferenceConfig(), ref_hidden=kw["ref_hidden"],
                               ref_weight=kw["lm_head_weight"], normalizer=bad,
                               impl="reference")


def test_a_numpy_normalizer_is_a_number():
    kw, pairs = _packed(scores=False), torch.tensor([[0, 1], [2, 1]])
    loss = TISDPOLoss("dpo", impl="torch")
    assert torch.equal(loss(**kw, pairs=pairs, normalizer=np.int64(4))[0],
                       loss(**kw, pairs=pairs, normalizer=4.0)[0])


def test_token_weights_side_must_be_bool():
    """A ±1 side read as bool would make every token chosen."""
    lp = -torch.rand(2, 4)
    mu = torch.tensor([[1.0], [-1.0]]).expand(2, 4)
    with pytest.raises(ValueError, match=r"side as a tensor must be bool .* got torch.float32"):
        token_weights(lp, lp, side=mu, mask=torch.ones(2, 4, dtype=torch.bool))


@pytest.mark.parametrize("name,value", [
    ("TISDPO_TMA", "maybe"), ("TISDPO_HEAD_LOGITS", "cublas"), ("TISDPO_DZ_MB", "abc"),
    ("TISDPO_AUTOTUNE", "2"), ("TISDPO_ONE_SWEEP_MIN_TOKENS", "0"), ("TISDPO_CHECKS", "some"),
    ("TISDPO_CHUNK_TOKENS", "x"),
])
def test_a_bad_environment_variable_is_named_on_any_machine(name, value, monkeypatch):
    """Variables only a GPU's code path reads are still checked when the loss is made."""
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=rf"^environment variable {name}={value!r}"):
        TISDPOLoss("dpo", impl="torch")


@pytest.mark.parametrize("name", ["TISDPO_TMA", "TISDPO_HEAD_LOGITS", "TISDPO_DZ_MB",
                                  "TISDPO_AUTOTUNE", "TISDPO_ONE_SWEEP_MIN_TOKENS",
                                  "TISDPO_CHECKS", "TISDPO_CHUNK_TOKENS"])
def test_an_empty_environment_variable_is_its_default(name, monkeypatch):
    from tisdpo_kernels import _env

    monkeypatch.setenv(name, "")
    _env.check_all()
    TISDPOLoss("dpo", impl="torch")


def test_normalizer_count_is_pairs_or_position_slots():
    """Padded [2B, T]: B pairs; packed: P pairs; cdpo_code averages over its B·T slots. The
    count is what the default normaliser divides by when every pair has a response token,
    so passing it changes nothing, and the trainer's count is the loss's."""
    g = torch.Generator().manual_seed(1)
    b, t = 3, 5
    w, h, rh = (torch.randn(*s, generator=g) for s in ((V_, D_), (2 * b, t, D_), (2 * b, t, D_)))
    labels = torch.randint(0, V_, (2 * b, t), generator=g)
    labels[:, :2] = -100
    packed = _packed(scores=False)
    for method, count in (("dpo", b), ("cdpo_code", b * t)):
        loss = TISDPOLoss(method, impl="torch")
        assert loss.normalizer_count(labels) == count
        default, _ = loss(w, h, labels, ref_hidden=rh)
        given, _ = loss(w, h, labels, ref_hidden=rh, normalizer=count)
        torch.testing.assert_close(given, default, rtol=1e-6, atol=0)
        objective = PreferenceObjective(loss, model_cfg=None, device="cpu")
        assert objective.count({"input_ids": labels, "labels": labels}) == count
    pairs = torch.tensor([[0, 1], [2, 1]])
    assert TISDPOLoss("dpo").normalizer_count(packed["labels"], pairs) == 2
    assert PreferenceObjective(TISDPOLoss("dpo"), model_cfg=None, device="cpu").count(
        {"labels": packed["labels"], "seq_offsets": packed["seq_offsets"], "pairs": pairs}) == 2


def test_arguments_a_call_would_ignore_are_refused():
    """cDPO's rule reads only the log-score; pair_metrics is a flag."""
    kw = _packed()
    with pytest.raises(ValueError, match="weight rule 'cdpo' reads only pos_logps"):
        TISDPOLoss("cdpo", impl="torch")(**kw, pairs=torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="pair_metrics must be True or False, got 'yes'"):
        TISDPOLoss("dpo", impl="torch")(**_packed(scores=False), pairs=torch.tensor([[0, 1]]),
                                        pair_metrics="yes")


@pytest.mark.parametrize("strategy", ["recompute", "one_sweep"])
@pytest.mark.parametrize("method,frozen", [("tdpo1", "ref_hidden"), ("tdpo1", "labels"),
                                           ("dpo", "labels"), ("tisdpo", "weights")])
def test_inputs_made_under_inference_mode_give_the_same_loss_and_gradients(method, frozen,
                                                                          strategy):
    """A frozen reference run under ``torch.inference_mode()`` (or labels collated there):
    autograd cannot save such tensors, so the loss copies them, whatever the preset."""
    def run(inference: bool):
        g = torch.Generator().manual_seed(0)
        kw = dict(lm_head_weight=(torch.randn(V_, D_, generator=g) * 0.5).requires_grad_(),
                  hidden=torch.randn(4, 3, D_, generator=g).requires_grad_(),
                  labels=torch.randint(0, V_, (4, 3), generator=g),
                  ref_hidden=torch.randn(4, 3, D_, generator=g),
                  weights=torch.rand(4, 3, generator=g))
        kw["labels"][:, 0] = -100
        if inference:
            with torch.inference_mode():
                kw[frozen] = kw[frozen].clone()
        if method != "tisdpo":
            del kw["weights"]
        out, _ = TISDPOLoss(method, impl="torch", strategy=strategy)(**kw)
        out.backward()
        return out.detach(), kw["hidden"].grad, kw["lm_head_weight"].grad
    for a, b in zip(run(False), run(True), strict=True):
        assert torch.equal(a, b)
