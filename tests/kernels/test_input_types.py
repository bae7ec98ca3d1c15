"""Argument types and devices the public ops take or refuse: each refusal one line naming the
argument; each accepted spelling (int16 targets, numpy scalars, empty packed sequences, a
device without autocast) computing what its plain spelling computes."""
import numpy as np
import pytest
import torch

from markers import requires_triton
from tisdpo import TISDPOLoss
from tisdpo_kernels import (
    PRESETS, PreferenceConfig, WeightParams, contrastive_logscores, linear_logprobs,
    linear_preference_loss, linear_token_kl, preference_loss, token_weights,
)

IMPLS = ["torch", "reference"]


def _one_line(err):
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("impl", IMPLS)
def test_int16_targets_with_a_vocabulary_beyond_int16(impl):
    """int16 targets index any vocabulary: the range check must not compare in int16 (40000
    wraps to a negative int16, so every target read as out of range)."""
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(4, 3, generator=g), torch.randn(40000, 3, generator=g) * 0.1
    y = torch.tensor([5, 32767, -100, 0])
    want = linear_logprobs(h, w, y, impl=impl)
    assert torch.equal(linear_logprobs(h, w, y.to(torch.int16), impl=impl), want)
    with pytest.raises(ValueError, match=r"targets\[1\] = -2 lies outside \[0, 40000\)"):
        linear_logprobs(h, w, torch.tensor([5, -2, 0, 0], dtype=torch.int16), impl=impl)


def test_meta_tensors_run_without_autocast():
    """'meta' (shape-only) tensors have no autocast to turn off; every backend gives a meta
    result of the right shape instead of torch's 'unsupported scalarType'."""
    h = torch.empty(6, 4, device="meta", requires_grad=True)
    w = torch.empty(9, 4, device="meta")
    y = torch.zeros(6, dtype=torch.long, device="meta")
    for impl in ("torch", "auto", "reference"):
        lp = linear_logprobs(h, w, y, impl=impl)
        assert lp.device.type == "meta" and lp.shape == (6,)


def test_ignore_index_must_be_an_int():
    h, w, y = torch.randn(4, 3), torch.randn(5, 3), torch.tensor([1, 2, 1, 3])
    for bad in (True, None, 1.0):
        with pytest.raises(ValueError, match="ignore_index must be an int") as err:
            linear_logprobs(h, w, y, ignore_index=bad, impl="torch")
        _one_line(err)
        with pytest.raises(ValueError, match="ignore_index must be an int"):
            linear_token_kl(h, w, h, w, y, ignore_index=bad, impl="torch")
    got = linear_logprobs(h, w, y, ignore_index=np.int64(1), impl="torch")
    assert torch.equal(got, linear_logprobs(h, w, y, ignore_index=1, impl="torch"))


def test_numpy_scalars_are_numbers_and_strings_are_not_bools():
    """numpy floats are hyperparameters like Python floats (stored as Python floats); a
    string where a bool goes would read as true, so it is refused."""
    loss = TISDPOLoss("dpo", beta=np.float32(0.25), softcap=np.float32(30.0))
    assert loss.config.beta == 0.25 and type(loss.softcap) is float
    cfg = PreferenceConfig(beta=np.float32(0.5), margin=np.float64(0.1))
    assert type(cfg.beta) is float and cfg == PreferenceConfig(beta=0.5, margin=0.1)
    assert type(WeightParams(k=np.float32(2.0)).k) is float
    for field in ("reference_free", "kl_stop_grad_chosen", "kl_token_weighted"):
        with pytest.raises(ValueError, match=f"{field} must be a bool, got 'false'") as err:
            PreferenceConfig(**{field: "false"})
        _one_line(err)
    with pytest.raises(ValueError, match="only_neg must be a bool"):
        WeightParams(only_neg=1)
    with pytest.raises(ValueError, match="round_decimals must be None or an int"):
        WeightParams(round_decimals=True)
    with pytest.raises(ValueError, match=r"beta must be a number, got np\.True_"):
        PreferenceConfig(beta=np.bool_(True))


@pytest.mark.parametrize("cap", [1e39, 1e-46])
def test_softcap_outside_float32_is_refused(cap):
    """The kernels read the cap as a float32: 1e39 would be inf and 1e-46 zero (NaN out)."""
    h, w, y = torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="softcap must lie within float32's normal range"):
        linear_logprobs(h, w, y, softcap=cap, impl="torch")
    with pytest.raises(ValueError, match="softcap must lie within"):
        TISDPOLoss("dpo", softcap=cap)


def test_contrastive_heads_must_share_a_vocabulary():
    h, y = torch.randn(3, 4), torch.tensor([0, 1, 2])
    for cap in (None, 5.0):
        with pytest.raises(ValueError, match="weight_neg has V=8 but weight_pos has V=7") as e:
            contrastive_logscores(h, torch.randn(7, 4), h, torch.randn(8, 4), y, softcap=cap)
        _one_line(e)
    # errors name the arguments as the signature spells them
    with pytest.raises(ValueError, match="hidden_neg has D=4 but weight_neg has D=3"):
        contrastive_logscores(h, torch.randn(7, 4), h, torch.randn(7, 3), y)
    with pytest.raises(ValueError, match="bias_pos must be"):
        contrastive_logscores(h, torch.randn(7, 4), h, torch.randn(7, 4), y,
                              bias_pos=torch.zeros(6))


def test_per_token_tensors_on_another_device_are_named():
    """A per-token input on another device than the head's tensors ('meta' stands in for a
    second device here) is named, not torch's unnamed device error."""
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(2, 3, 4, generator=g), torch.randn(7, 4, generator=g)
    y = torch.randint(0, 7, (2, 3), generator=g)
    elsewhere = torch.zeros(2, 3, device="meta")
    loss = TISDPOLoss("tisdpo", impl="torch")
    for name in ("weights", "ref_logps"):
        kw = {"weights": torch.ones(2, 3), "ref_hidden": h, name: elsewhere}
        if name == "ref_logps":
            del kw["ref_hidden"]
        with pytest.raises(ValueError, match=f"{name} on meta"):
            loss(w, h, y, **kw)
    with pytest.raises(ValueError, match="pos_logps on meta"):
        TISDPOLoss("tisdpo_paper_no_eta", impl="torch")(
            w, h, y, ref_hidden=h, pos_logps=elsewhere, neg_logps=elsewhere)
    mask = torch.ones(2, 3, dtype=torch.bool)
    cfg = PRESETS["dpo"].config
    with pytest.raises(ValueError, match="ref_logp on meta"):
        preference_loss(torch.zeros(2, 3), elsewhere, config=cfg, mask=mask, impl="torch")
    with pytest.raises(ValueError, match="logp_neg on meta"):
        token_weights(torch.zeros(2, 3), elsewhere, side="chosen", mask=mask, impl="torch")
    with pytest.raises(ValueError, match="weights on meta"):
        linear_preference_loss(h, w, y, config=cfg, ref_logp=torch.zeros(2, 3),
                               weights=elsewhere, impl="torch")


@pytest.mark.parametrize("impl", IMPLS)
def test_packed_batch_with_empty_sequences(impl):
    """More sequences than tokens (empty responses) is a legal packed batch: it gives the
    padded batch's loss, not an error about internal sequence ids."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(7, 4, generator=g)
    h = torch.randn(1, 4, generator=g)
    y = torch.tensor([3])
    loss = TISDPOLoss("dpo", impl=impl)
    packed, _ = loss(w, h, y, ref_hidden=h, seq_offsets=torch.tensor([0, 1, 1]),
                     pairs=torch.tensor([[0, 1]]))
    hp = torch.cat([h, torch.zeros(1, 4)])[:, None]
    padded, _ = loss(w, hp, torch.tensor([[3], [-100]]), ref_hidden=hp)
    assert torch.equal(packed, padded) and padded > 0
    empty, _ = loss(w, h[:0], y[:0], ref_hidden=h[:0], seq_offsets=torch.tensor([0, 0, 0]),
                    pairs=torch.tensor([[0, 1]]))
    assert empty == 0


@pytest.mark.parametrize("method", ["dpo", "tisdpo", "cdpo_code"])
@pytest.mark.parametrize("impl", IMPLS)
def test_values_outside_the_mask_are_never_read(method, impl):
    """NaN in masked slots of logp, ref_logp and weights changes nothing (weights included,
    which were refused there; cdpo_code's reference multiplied NaN by a 0 mask)."""
    g = torch.Generator().manual_seed(0)
    lp, lr = -torch.rand(4, 4, generator=g), -torch.rand(4, 4, generator=g)
    w = 0.5 + torch.rand(4, 4, generator=g)
    mask = torch.ones(4, 4, dtype=torch.bool)
    mask[:, 0] = False
    nan = lambda t: torch.where(mask, t, float("nan"))  # noqa: E731
    cfg = PRESETS[method].config
    runs = []
    for fill in (lambda t: t.clone(), nan):
        leaves = [fill(t).requires_grad_() for t in (lp, lr, w)]
        loss = preference_loss(*leaves, config=cfg, mask=mask, impl=impl)[0]
        loss.backward()
        grads = [torch.zeros_like(t) if t.grad is None else t.grad for t in leaves]
        runs.append([loss.detach()] + [g.masked_fill(~mask, 0) for g in grads]
                    + [g[~mask] for g in grads])
    (clean, *gc), (dirty, *gd) = runs
    assert torch.isfinite(clean) and torch.equal(clean, dirty)
    for a, b in zip(gc, gd):             # gradients equal, and exactly 0 in masked slots
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"weights\[0, 1\] = nan is not finite"):
        bad = w.clone()
        bad[0, 1] = float("nan")
        preference_loss(lp, lr, bad, config=cfg, mask=mask, impl=impl)


def test_token_weights_names_the_seq_ids_shape():
    with pytest.raises(ValueError, match=r"seq_ids shape \(1, 6\) must equal logp_pos shape "
                                         r"\(6,\)"):
        token_weights(torch.zeros(6), torch.zeros(6), side="chosen",
                      seq_ids=torch.zeros(1, 6, dtype=torch.long))


@pytest.mark.parametrize("op", ["linear_logprobs", "linear_token_kl", "preference_loss"])
@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=requires_triton)])
def test_double_backward_through_a_fused_op_is_refused(op, impl):
    """create_graph=True (a gradient penalty) through a fused backward, which builds no
    graph, raises in one line instead of giving gradients without their second-order term
    (the torch backend of preference_loss is plain autograd: there it is exact)."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(6, 4, generator=g, requires_grad=True)
    w = torch.randn(9, 4, generator=g)
    y = torch.randint(0, 9, (6,), generator=g)
    if op == "linear_logprobs":
        out, leaf = linear_logprobs(h, w, y, impl=impl).sum(), h
    elif op == "linear_token_kl":
        out, leaf = linear_token_kl(h, w, h.detach() + 0.1, w, y, impl=impl)[0].sum(), h
    else:
        leaf = -torch.rand(2, 3, generator=g).requires_grad_()
        out = preference_loss(leaf, leaf.detach() * 0.9, config=PRESETS["dpo"].config,
                              mask=torch.ones(2, 3, dtype=torch.bool), impl=impl)[0]
    if op == "preference_loss" and impl == "torch":
        (grad,) = torch.autograd.grad(out, leaf, create_graph=True)
        assert grad.requires_grad
        return
    with pytest.raises(RuntimeError, match=f"{op}: the fused backward is first order") as err:
        torch.autograd.grad(out, leaf, create_graph=True)
    assert "\n" not in str(err.value)
