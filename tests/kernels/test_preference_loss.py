"""tisdpo_kernels.preference_loss through the public op: every preset, torch and triton.

Truth is the reference in float64 on the padded layout; both the padded and the packed
(shuffled tokens, unsorted sparse sequence ids, tokens outside every sequence) runs are
checked against it, so the two layouts also agree with each other. Ignored tokens hold NaN
(weights: finite garbage, since non-finite weights are rejected).
"""
import math

import pytest
import torch
from markers import requires_triton
from numerics import assert_oracle, nan_buffer_view

from tisdpo_kernels import PRESETS, PreferenceConfig, get_preset, preference_loss
from tisdpo_kernels._triton import configs


IMPLS = ["torch", pytest.param("triton", marks=requires_triton)]
DTYPES = [torch.float32, torch.bfloat16]
SEQ_PRESETS = [n for n, p in PRESETS.items() if p.config.granularity == "seq"]
B, T = 3, 13
F64 = torch.float64
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # GPU: compiled kernels


def _inputs(seed=0, b=B, t=T):
    """float64 padded inputs [2B, T]: pair B−1 fully ignored, a length-1 chosen sequence."""
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(2 * b, t, generator=g, dtype=F64) * 3
    lr = lp + torch.randn(2 * b, t, generator=g, dtype=F64) * 0.5
    w = torch.rand(2 * b, t, generator=g, dtype=F64) + 0.5
    kl = torch.rand(2 * b, t, generator=g, dtype=F64) * 0.3
    mask = torch.rand(2 * b, t, generator=g) > 0.25
    mask[b - 1] = mask[2 * b - 1] = False
    mask[0] = False
    mask[0, 4] = True
    # float32 values held in float64: every run, the float64 truth included, sees the same inputs
    return dict(lp=lp.float().double(), lr=lr.float().double(), w=w.float().double(),
                kl=kl.float().double(), mask=mask)


def _packing(mask, seed=1):
    """Token order, seq ids and pairs for a packed copy of a padded batch."""
    g = torch.Generator().manual_seed(seed)
    rows, t = mask.shape
    order = torch.randperm(rows * t, generator=g)
    seq_of_row = torch.randperm(rows, generator=g) * 3 + 2  # unsorted, sparse, < rows·t
    ids = torch.where(mask, seq_of_row.unsqueeze(1), -1).flatten()[order]
    return order, ids, seq_of_row[: rows // 2], seq_of_row[rows // 2:]


def _run(impl, cfg, x, dtype, layout="padded", *, poison=True, normalizer=None, grads=("lp", "kl"),
         lr=True, weights=True):
    """-> (loss, metrics, {name: grad in padded shape}) for inputs ``x`` rounded to ``dtype``."""
    mask = x["mask"]
    vals = {k: x[k].to(dtype) for k in ("lp", "lr", "w", "kl")}
    if poison and cfg.granularity == "seq":
        # weights must be finite (checked), so ignored weights get finite garbage instead
        vals = {k: v.masked_fill(~mask, 123.0 if k == "w" else float("nan"))
                for k, v in vals.items()}
    if layout == "packed":
        order, ids, cs, rs = _packing(mask)
        vals = {k: v.flatten()[order] for k, v in vals.items()}
        pairs = torch.stack([cs, rs], dim=1)  # pairs as strided column views
        kw = dict(seq_ids=ids, chosen_seq=pairs[:, 0], rejected_seq=pairs[:, 1])
    else:
        kw = dict(mask=mask)
    vals = {k: v.to(DEV) for k, v in vals.items()}
    kw = {k: (v.to(DEV) if v.device != DEV else v) for k, v in kw.items()}
    if impl != "reference":
        vals = {k: nan_buffer_view(v) for k, v in vals.items()}
    for k in grads:
        vals[k].requires_grad_(True)
    loss, metrics = preference_loss(vals["lp"], vals["lr"] if lr else None,
                                    vals["w"] if weights else None, config=cfg, kl=vals["kl"],
                                    normalizer=normalizer, impl=impl, **kw)
    if grads:
        loss.backward()
    out = {}
    for k in grads:
        g = vals[k].grad
        g = torch.zeros_like(vals[k]) if g is None else g
        g = g.cpu()
        if layout == "packed":
            g = torch.zeros(mask.numel(), dtype=g.dtype).index_put_((order,), g).view(mask.shape)
        out[k] = g
    return loss.detach().cpu(), {k: v.cpu() for k, v in metrics.items()}, out


def _oracle(impl, cfg, x, dtype, layout, **kw):
    loss, met, grads = _run(impl, cfg, x, dtype, layout, **kw)
    r_loss, r_met, r_grads = _run("reference", cfg, x, dtype, "padded", **kw)
    t_loss, t_met, t_grads = _run("reference", cfg, {**x, **{k: x[k].to(dtype).double()
                                                           for k in ("lp", "lr", "w", "kl")}},
                                  F64, "padded", **kw)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_oracle(loss, r_loss, t_loss, dtype=dtype, name="loss")
    assert sorted(met) == sorted(t_met)
    for k in t_met:
        assert_oracle(met[k], r_met[k], t_met[k], dtype=dtype, name=k)
    for k in t_grads:
        assert_oracle(grads[k], r_grads[k], t_grads[k], dtype=dtype, name=f"d{k}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("preset,layout", [(p, lay) for p in PRESETS for lay in ("padded", "packed")
                                           if lay == "padded" or p in SEQ_PRESETS])
def test_presets_against_reference(impl, dtype, layout, preset):
    # granularity='pos' (cdpo_code) is padded-only: packed raises, see the validation test
    _oracle(impl, get_preset(preset).config, _inputs(), dtype, layout)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("preset", ["tisdpo_paper", "tdpo2", "ipo", "simpo", "cdpo_code"])
def test_all_input_gradients(impl, preset):
    """Gradients of lp, lr, ω and k (lr and ω are constants in training, but exact anyway)."""
    _oracle(impl, get_preset(preset).config, _inputs(seed=3), torch.float32, "packed"
            if preset != "cdpo_code" else "padded", grads=("lp", "lr", "w", "kl"))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("normalizer", [7.0, 2, "tensor"])
def test_normalizer_override(impl, normalizer):
    norm = torch.tensor(5) if normalizer == "tensor" else normalizer
    for preset in ("tdpo1", "cdpo_code"):
        _oracle(impl, get_preset(preset).config, _inputs(seed=4), torch.float32, "padded",
                normalizer=norm)


@pytest.mark.parametrize("impl", IMPLS)
def test_pairs_sharing_a_sequence(impl):
    """Packed pairs may reuse a sequence (one chosen against two rejected, say)."""
    x = _inputs(seed=5)
    cfg = get_preset("tisdpo_token_level").config
    mask = x["mask"]
    ids = torch.where(mask, torch.arange(2 * B).unsqueeze(1), -1).flatten().to(DEV)
    cs, rs = torch.tensor([0, 1, 2, 1, 0], device=DEV), torch.tensor([3, 4, 5, 3, 4], device=DEV)
    res = {}
    for which, dt in ((impl, torch.float32), ("reference", torch.float32), ("reference", F64)):
        v = {k: x[k].to(torch.float32).to(dt).flatten().to(DEV).requires_grad_(
            k in ("lp", "lr", "w", "kl")) for k in ("lp", "lr", "w", "kl")}
        loss, met = preference_loss(v["lp"], v["lr"], v["w"], config=cfg, kl=v["kl"],
                                    seq_ids=ids, chosen_seq=cs, rejected_seq=rs, impl=which)
        loss.backward()
        res[which, dt] = (loss, met["rewards/margins"], v["lp"].grad, v["kl"].grad, v["w"].grad)
    for i, name in enumerate(("loss", "margins", "dlp", "dkl", "dw")):
        assert_oracle(res[impl, torch.float32][i], res["reference", torch.float32][i],
                      res["reference", F64][i], dtype=torch.float32, name=name)


# --------------------------------------------------------------------- hand-computed cases

def _nls(x):  # −log σ(x)
    return math.log1p(math.exp(-x))


# chosen row: lp [-1, -2, -.5], lr [-1.5, -1.5, -1], ω [2, 1, 1], k [.125, .25, .375]
# rejected row: lp [-1, -3, ·], lr [-.5, -2, ·], ω [1, .5, ·], k [.5, .5, ·] (third masked)
# ⇒ Σ ωΔ: M_w = 1, M_l = −1;  n_w = 3, n_l = 2;  Σ lp: −3.5, −4;  Σ ω·lp: −4.5, −2.5
#   K (ν = 1): 0.75, 1.0;  K (ν = ω): 0.875, 0.75
_DPO = (_nls(0.2), 0.1, -0.1, -3.5, -4.0)
HAND = {  # preset: (loss, rewards/chosen, rewards/rejected, logps/chosen, logps/rejected)
    "dpo": _DPO, "cdpo": _DPO, "tisdpo": _DPO, "tisdpo_paper_no_eta": _DPO,
    "tisdpo_threshold_and_scale": _DPO, "tisdpo_binary": _DPO,
    "conservative": (0.9 * _nls(0.2) + 0.1 * _nls(-0.2), 0.1, -0.1, -3.5, -4.0),
    "robust": ((0.9 * _nls(0.2) - 0.1 * _nls(-0.2)) / 0.8, 0.1, -0.1, -3.5, -4.0),
    "ipo": ((1 / 3 + 1 / 2 - 5.0) ** 2, 0.1 / 3, -0.05, -3.5 / 3, -2.0),
    "ipo_sum": ((2.0 - 5.0) ** 2, 0.1, -0.1, -3.5, -4.0),
    "hinge": (1 - 0.1 * 2.0, 0.1, -0.1, -3.5, -4.0),
    # SimPO: ā_w = −4.5/3, ā_l = −2.5/2, z = ā_w − ā_l − 0.25 = −0.5, β = 2
    "simpo": (_nls(2 * -0.5), 2 * -1.5, 2 * -1.25, -3.5 / 3, -2.0),
    # z = M_w − M_l + c_w K_w + c_l K_l; rewards β(M_w + c_w K_w), β(M_l − c_l K_l)
    "tdpo1": (_nls(0.1 * (2 + 0.75 - 1.0)), 0.1 * 1.75, 0.0, -3.5, -4.0),
    "tdpo2": (_nls(0.1 * (2 + 0.375 - 0.5)), 0.1 * 1.375, 0.1 * -0.5, -3.5, -4.0),
    "tisdpo_paper": (_nls(0.1 * (2 - 0.875 + 0.75)), 0.1 * 0.125, 0.1 * -1.75, -3.5, -4.0),
    "tisdpo_token_level": (_nls(0.1 * (2 - 0.4375 + 0.375)), 0.1 * 0.5625, 0.1 * -1.375,
                           -3.5, -4.0),
    # per position: z_t = m ω Δ (chosen) − m ω Δ (rejected) = [1.5, 0, 0.5], mean of 3 slots
    "cdpo_code": ((_nls(0.15) + _nls(0.0) + _nls(0.05)) / 3, 0.1, -0.1, -3.5, -4.0),
}


def test_every_preset_has_a_hand_case():
    assert set(HAND) == set(PRESETS)


@pytest.mark.parametrize("impl", ["reference", *IMPLS])
@pytest.mark.parametrize("preset", list(PRESETS))
def test_preset_by_hand(impl, preset):
    nan = float("nan")
    lp = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -3.0, nan]])
    lr = torch.tensor([[-1.5, -1.5, -1.0], [-0.5, -2.0, nan]])
    w = torch.tensor([[2.0, 1.0, 1.0], [1.0, 0.5, 9.0]])
    kl = torch.tensor([[0.125, 0.25, 0.375], [0.5, 0.5, nan]])
    mask = torch.tensor([[True, True, True], [True, True, False]], device=DEV)
    lp, lr, w, kl = (t.to(DEV) for t in (lp, lr, w, kl))
    if preset == "cdpo_code":  # the per-position link multiplies by the mask: no NaN there
        lp, lr, w, kl = (t.nan_to_num(0.0) for t in (lp, lr, w, kl))
    if impl == "reference":  # the reference computes at the input dtype: give it float64
        lp, lr, w, kl = (t.double() for t in (lp, lr, w, kl))
    loss, met = preference_loss(lp, lr, w, config=get_preset(preset).config, mask=mask, kl=kl,
                                impl=impl)
    got = torch.stack([loss.reshape(1)] + [met[k] for k in (
        "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected")]).flatten()
    want = torch.tensor(HAND[preset], dtype=F64)
    assert_oracle(got, want, want, dtype=torch.float32, name=preset)


# --------------------------------------------------------------------- invariants

def _loss_grads(impl, cfg, x, **kw):
    loss, met, grads = _run(impl, cfg, x, torch.float32, **kw)
    return loss, met, grads


@pytest.mark.parametrize("impl", IMPLS)
def test_unit_weights_make_tisdpo_dpo(impl):
    x = _inputs(seed=6)
    x1 = {**x, "w": torch.ones_like(x["w"])}
    t_loss, t_met, t_g = _run("reference", get_preset("dpo").config, x, F64, weights=False)
    r_loss, r_met, r_g = _run("reference", get_preset("dpo").config, x, torch.float32,
                              weights=False)
    for name in ("tisdpo", "tisdpo_paper_no_eta", "tisdpo_binary"):
        loss, met, g = _run(impl, get_preset(name).config, x1, torch.float32, layout="packed")
        assert_oracle(loss, r_loss, t_loss, dtype=torch.float32, name=f"{name} loss")
        assert_oracle(met["rewards/margins"], r_met["rewards/margins"], t_met["rewards/margins"],
                      dtype=torch.float32, name=f"{name} margins")
        assert_oracle(g["lp"], r_g["lp"], t_g["lp"], dtype=torch.float32, name=f"{name} dlp")
    # the paper's η with unit weights is TDPO1's KL term with opposite signs and ν = 1
    paper = get_preset("tisdpo_paper").config
    mirror = paper.replace(kl_token_weighted=False)
    loss, _, g = _run(impl, paper, x1, torch.float32)
    r = _run("reference", mirror, x, torch.float32, weights=False)
    t = _run("reference", mirror, x, F64, weights=False)
    assert_oracle(loss, r[0], t[0], dtype=torch.float32, name="paper with unit weights")
    assert_oracle(g["kl"], r[2]["kl"], t[2]["kl"], dtype=torch.float32, name="paper dkl")


def _swap(x):
    return {k: (torch.cat([v[B:], v[:B]]) if isinstance(v, torch.Tensor) else v)
            for k, v in x.items()}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("preset", SEQ_PRESETS)
def test_swapping_chosen_and_rejected_negates_the_margin(impl, preset):
    cfg = get_preset(preset).config
    x = _inputs(seed=7)
    _, met, _ = _run(impl, cfg, _swap(x), torch.float32, grads=())
    _, r_met, _ = _run("reference", cfg, x, torch.float32, grads=())
    _, t_met, _ = _run("reference", cfg, x, F64, grads=())
    assert_oracle(-met["rewards/margins"], r_met["rewards/margins"], t_met["rewards/margins"],
                  dtype=torch.float32, name="−margin(swapped)")


@pytest.mark.parametrize("impl", IMPLS)
def test_simpo_ignores_the_reference(impl):
    cfg = get_preset("simpo").config
    x = _inputs(seed=8)
    base = _run(impl, cfg, x, torch.float32)
    other = _run(impl, cfg, {**x, "lr": x["lr"] * 3 - 1}, torch.float32)
    none = _run(impl, cfg, x, torch.float32, lr=False)
    for name, run in (("changed ref", other), ("no ref", none)):
        assert_oracle(run[0], base[0], base[0], dtype=torch.float32, name=f"{name} loss")
        assert_oracle(run[2]["lp"], base[2]["lp"], base[2]["lp"], dtype=torch.float32,
                      name=f"{name} dlp")


_LINKS = {  # ℓ as a function of the margin β·z, for configs without KL and margin γ₀
    "sigmoid": lambda m, b, e: -torch.nn.functional.logsigmoid(m),
    "conservative": lambda m, b, e: -(1 - e) * torch.nn.functional.logsigmoid(m)
    - e * torch.nn.functional.logsigmoid(-m),
    "robust": lambda m, b, e: (-(1 - e) * torch.nn.functional.logsigmoid(m)
                               + e * torch.nn.functional.logsigmoid(-m)) / (1 - 2 * e),
    "ipo": lambda m, b, e: (m / b - 1 / (2 * b)) ** 2,
    "hinge": lambda m, b, e: torch.relu(1 - m),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("preset", ["dpo", "conservative", "robust", "ipo", "ipo_sum", "hinge"])
def test_link_formula_from_margins(impl, preset):
    """loss = mean over non-empty pairs of ℓ(rewards/margins), with ℓ written out here."""
    cfg = get_preset(preset).config
    x = _inputs(seed=9)
    x["lp"] = x["lp"] * 8  # spread the margins over the links' interesting ranges
    valid = (x["mask"][:B] | x["mask"][B:]).any(-1)
    loss, met, _ = _run(impl, cfg, x, torch.float32, grads=())
    r_loss, r_met, _ = _run("reference", cfg, x, torch.float32, grads=())
    _, t_met, _ = _run("reference", cfg, x, F64, grads=())
    f = _LINKS[cfg.link]
    truth = f(t_met["rewards/margins"], cfg.beta, cfg.epsilon)[valid].mean()
    assert_oracle(loss, r_loss, truth, dtype=torch.float32, name=preset)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("preset", ["dpo", "conservative", "robust"])
@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["won", "lost"])
def test_extreme_margins_stay_accurate(impl, preset, sign):
    """|βz| of 30–300: ℓ and ∂ℓ/∂z far below 1e-13 (or ℓ huge) must stay relatively exact."""
    x = _inputs(seed=13)
    side = torch.where(torch.arange(2 * B) < B, sign, -sign).unsqueeze(1).to(F64)
    x["lp"] = x["lr"] + 30.0 * side
    _oracle(impl, get_preset(preset).config, x, torch.float32, "packed",
            grads=("lp", "lr", "w"))


@pytest.mark.parametrize("impl", IMPLS)
def test_tdpo2_stops_the_chosen_kl_gradient(impl):
    x = _inputs(seed=10)
    _, _, g2 = _run(impl, get_preset("tdpo2").config, x, torch.float32)
    _, _, g1 = _run(impl, get_preset("tdpo1").config, x, torch.float32)
    chosen_valid, rejected_valid = x["mask"][:B], x["mask"][B:]
    assert torch.all(g2["kl"][:B] == 0)
    assert torch.all(g2["kl"][B:][rejected_valid] != 0)
    assert torch.all(g1["kl"][:B][chosen_valid] != 0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("preset", ["tdpo1", "tdpo2", "tisdpo_paper", "tisdpo_token_level"])
def test_kl_coefficient_signs(impl, preset):
    """∂ℓ/∂k_t = g·c_side·ν_t with g = ∂ℓ/∂z < 0 (sigmoid): its sign is −sign(c_side)."""
    cfg = get_preset(preset).config
    x = _inputs(seed=11)
    _, _, g = _run(impl, cfg, x, torch.float32)
    for rows, coef in ((slice(0, B), cfg.kl_chosen_coef), (slice(B, 2 * B), cfg.kl_rejected_coef)):
        d = g["kl"][rows][x["mask"][rows]]
        if rows.start == 0 and cfg.kl_stop_grad_chosen:
            assert torch.all(d == 0)
        else:
            assert torch.all(torch.sign(d) == -math.copysign(1.0, coef)), (preset, rows)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("preset", list(PRESETS))
def test_all_ignored_gives_zero_loss_and_grads(impl, preset):
    cfg = get_preset(preset).config
    x = {**_inputs(seed=12), "mask": torch.zeros(2 * B, T, dtype=torch.bool)}
    loss, met, g = _run(impl, cfg, x, torch.float32, grads=("lp", "lr", "w", "kl"))
    assert torch.isfinite(loss) and all(torch.isfinite(v).all() for v in met.values())
    for k, v in g.items():
        assert torch.all(v == 0), k
    if cfg.granularity == "seq":
        assert loss.item() == 0.0
    else:  # the released cDPO code averages ℓ(0) over every slot, as the reference does
        _oracle(impl, cfg, x, torch.float32, "padded")
    if cfg.granularity == "seq":
        loss, _, g = _run(impl, cfg, x, torch.float32, layout="packed")
        assert loss.item() == 0.0 and torch.all(g["lp"] == 0)


@pytest.mark.parametrize("impl", ["reference", *IMPLS])
@pytest.mark.parametrize("preset", ["dpo", "tdpo2"])
def test_no_pairs_gives_zero_loss_and_empty_metrics(impl, preset):
    """A packed batch with no pair: loss 0, zero gradients, [0] metrics, on every backend
    (the reference included: it is the oracle of this case too)."""
    cfg = get_preset(preset).config
    lp = torch.randn(6, requires_grad=True)
    none = torch.zeros(0, dtype=torch.long)
    loss, met = preference_loss(lp, torch.randn(6), config=cfg, seq_ids=torch.full((6,), -1),
                                kl=torch.rand(6) if cfg.uses_kl else None, chosen_seq=none,
                                rejected_seq=none, impl=impl)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(lp.grad, torch.zeros(6))
    assert met and all(v.shape == (0,) for v in met.values())


# --------------------------------------------------------------------- validation

@pytest.mark.parametrize("impl", IMPLS)
def test_validation_errors_name_the_argument(impl):
    x = {k: v.to(DEV) for k, v in _inputs().items()}
    lp, lr, w, mask = x["lp"].float(), x["lr"].float(), x["w"].float(), x["mask"]
    cfg = PreferenceConfig()
    ids = torch.where(mask, torch.arange(2 * B, device=DEV).unsqueeze(1), -1).flatten()
    cs, rs = torch.arange(B, device=DEV), torch.arange(B, 2 * B, device=DEV)
    flat = dict(seq_ids=ids, chosen_seq=cs, rejected_seq=rs, impl=impl)

    def raises(match, fn):
        with pytest.raises(ValueError, match=match):
            fn()

    raises("weights", lambda: preference_loss(lp, lr, w[:, :-1], config=cfg, mask=mask, impl=impl))
    raises("weights", lambda: preference_loss(lp, lr, w.masked_fill(mask, float("inf")),
                                              config=cfg, mask=mask, impl=impl))
    raises("seq_ids", lambda: preference_loss(lp.flatten(), lr.flatten(), config=cfg,
                                              **{**flat, "seq_ids": ids[:-1]}))
    raises("seq_ids", lambda: preference_loss(lp.flatten(), lr.flatten(), config=cfg,
                                              **{**flat, "seq_ids": ids + 1000}))
    raises("chosen_seq", lambda: preference_loss(lp.flatten(), lr.flatten(), config=cfg,
                                                 **{**flat, "chosen_seq": cs[:-1]}))
    raises("chosen_seq", lambda: preference_loss(lp.flatten(), lr.flatten(), config=cfg,
                                                 **{**flat, "chosen_seq": cs - 1}))
    raises("rejected_seq", lambda: preference_loss(lp.flatten(), lr.flatten(), config=cfg,
                                                   **{**flat, "rejected_seq": rs + 10_000}))
    raises("ref_logp", lambda: preference_loss(lp, None, config=cfg, mask=mask, impl=impl))
    raises("kl", lambda: preference_loss(lp, lr, config=get_preset("tdpo1").config, mask=mask,
                                         impl=impl))
    raises("granularity", lambda: preference_loss(lp.flatten(), lr.flatten(),
                                                  config=get_preset("cdpo_code").config, **flat))
    raises("normalizer", lambda: preference_loss(lp, lr, config=cfg, mask=mask, normalizer=0.0,
                                                 impl=impl))
    raises("beta", lambda: PreferenceConfig(beta=0.0))
    raises("beta", lambda: PreferenceConfig(beta=-1.0))
    raises("epsilon", lambda: PreferenceConfig(link="robust", epsilon=0.5))
    raises("epsilon", lambda: PreferenceConfig(link="conservative", epsilon=-0.1))
    # options the config would ignore: label smoothing without a smoothing link, KL terms
    # without a KL direction
    for link in ("sigmoid", "ipo", "hinge"):
        raises(rf"epsilon=0.3 .* link '{link}' has none",
               lambda: PreferenceConfig(link=link, epsilon=0.3))
    for opt in ({"kl_chosen_coef": 1.0}, {"kl_rejected_coef": -1.0},
                {"kl_stop_grad_chosen": True}, {"kl_token_weighted": True}):
        raises("need kl='policy_ref' or 'ref_policy'", lambda: PreferenceConfig(**opt))
    # per-position pairs have no margin and no length normalisation: refused, not ignored
    pos = get_preset("cdpo_code").config
    raises(r"margin must be 0 and reduction 'sum', got margin=5.0",
           lambda: pos.replace(margin=5.0))
    raises(r"got margin=0.0 and reduction='mean'", lambda: pos.replace(reduction="mean"))
    raises("lower", lambda: get_preset("tisdpo_paper") and
           __import__("tisdpo_kernels").WeightParams(lower=1.5, upper=-0.5))


@requires_triton
@pytest.mark.parametrize("preset", ["tisdpo_paper", "ipo", "tdpo2"])
def test_triton_many_programs(preset):
    """GPU-like small blocks: many token programs (atomics from several programs into one
    sequence), more pairs than one pair block (the forward's pair loop, several backward
    programs), pairs sharing sequences."""
    small = dict(preference_loss_tokens=configs.KernelConfig({"BLOCK": 16}),
                 preference_loss_pairs=configs.KernelConfig({"BLOCK_P": 16}))
    with configs.override(**small):
        _oracle("triton", get_preset(preset).config, _inputs(seed=14, b=37, t=21),
                torch.float32, "packed", grads=("lp", "lr", "w", "kl"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_no_host_sync_on_cuda(impl, layout):
    x = _inputs(seed=15)
    cfg = get_preset("tisdpo_paper").config
    _run(impl, cfg, x, torch.float32, layout, poison=False)  # warm-up: compile kernels
    # inputs are copied to the GPU before the check (host-to-device copies synchronise)
    leaves = {k: x[k].float().to(DEV).requires_grad_(k in ("lp", "kl"))
              for k in ("lp", "lr", "w", "kl")}
    vals = dict(leaves)
    if layout == "packed":
        order, ids, cs, rs = (t.to(DEV) for t in _packing(x["mask"]))
        vals = {k: v.flatten()[order] for k, v in vals.items()}
        kw = dict(seq_ids=ids, chosen_seq=cs, rejected_seq=rs)
    else:
        kw = dict(mask=x["mask"].to(DEV))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, metrics = preference_loss(vals["lp"], vals["lr"], vals["w"], config=cfg,
                                        kl=vals["kl"], impl=impl, **kw)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("granularity", ["seq", "pos"])
@pytest.mark.parametrize("impl", IMPLS + ["reference"])
@pytest.mark.parametrize("frozen", ["ref_logp", "weights", "mask"])
def test_inputs_made_under_inference_mode_give_the_same_loss_and_gradient(impl, frozen,
                                                                          granularity):
    """A frozen reference's log-probs (or weights, a mask) made under
    torch.inference_mode(): autograd cannot save such a tensor, so the op copies it."""
    config = PreferenceConfig() if granularity == "seq" else get_preset("cdpo_code").config

    def run(inference):
        g = torch.Generator().manual_seed(0)
        logp = (-3 * torch.rand(4, 3, generator=g)).requires_grad_()
        kw = dict(ref_logp=-3 * torch.rand(4, 3, generator=g),
                  weights=torch.rand(4, 3, generator=g) + 0.5,
                  mask=torch.tensor([[1, 1, 0]] * 4, dtype=torch.bool))
        if inference:
            with torch.inference_mode():
                kw[frozen] = kw[frozen].clone()
        loss, _ = preference_loss(logp, config=config, impl=impl, **kw)
        loss.backward()
        return loss.detach(), logp.grad
    for a, b in zip(run(False), run(True), strict=True):
        assert torch.equal(a, b)
