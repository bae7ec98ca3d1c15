"""TISDPOLoss cases shared by the loss-module tests: one padded batch (and its packing), the
three-way runs, and the rounding magnitudes (tests/magnitudes.py) of the module's outputs.
"""
from dataclasses import replace

import torch

import magnitudes as M
from numerics import assert_oracle, nan_buffer_view
from tisdpo import TISDPOLoss
from tisdpo_kernels import PRESETS
from tisdpo_kernels import reference as R

B, T, D, V = 3, 11, 31, 123
IGNORE = -100
# prompt length, response length per row (chosen rows 0..B−1, rejected rows B..2B−1);
# row 5 is one token long, so a rank-based sequence of length 1 is covered too.
ROWS = [(2, 7), (3, 8), (1, 5), (2, 9), (4, 3), (2, 1)]
CONTINUOUS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
              "logps/rejected", "weights/chosen", "weights/rejected", "kl/chosen", "kl/rejected",
              "rewards_per_token/chosen", "rewards_per_token/rejected",
              "rewards_per_token/margins", "logps_per_token/chosen", "logps_per_token/rejected")


def make_case(seed=0):
    """Float64 master tensors of one padded batch (plus the packing index)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.full((2 * B, T), IGNORE)
    for r, (p, n) in enumerate(ROWS):
        labels[r, p:p + n] = torch.randint(0, V, (n,), generator=g)
    f64 = dict(dtype=torch.float64)
    case = {
        "hidden": torch.randn(2 * B, T, D, generator=g, **f64),
        "weight": torch.randn(V, D, generator=g, **f64) * 0.4,
        "bias": torch.randn(V, generator=g, **f64) * 0.5,
        "ref_hidden": torch.randn(2 * B, T, D, generator=g, **f64),
        "ref_weight": torch.randn(V, D, generator=g, **f64) * 0.4,
        "weights": 0.5 + torch.rand(2 * B, T, generator=g, **f64),
        "pos_logps": -3 * torch.rand(2 * B, T, generator=g, **f64),
        "neg_logps": -3 * torch.rand(2 * B, T, generator=g, **f64),
        "labels": labels,
    }
    for k in ("weights", "pos_logps", "neg_logps"):
        case[k] = case[k].float().double()   # passed as float32: the truth sees the same values
        case[k][labels == IGNORE] = float("nan")   # padding may hold anything: it must not count
    # packed order: chosen 0, rejected 0, chosen 1, ... (prompt + response tokens of each row),
    # then 3 trailing tokens outside every sequence (the second has a real label: it must
    # not count)
    idx, offsets, pairs = [], [0], []
    for b in range(B):
        pairs.append([len(offsets) - 1, len(offsets)])
        for r in (b, b + B):
            p, n = ROWS[r]
            idx += [r * T + t for t in range(p + n)]
            offsets.append(len(idx))
    idx += [T - 1, 2 * T - 1, 3 * T - 1]
    case["pack_index"] = torch.tensor(idx)
    case["seq_offsets"] = torch.tensor(offsets, dtype=torch.int32)
    case["pairs"] = torch.tensor(pairs)
    return case


def case_with_ref_logps(seed=0):
    """``make_case`` plus ``ref_logps``: the reference head's float32 log-probs (what a
    precomputed column holds), NaN where ignored (padding may hold anything)."""
    case = make_case(seed)
    with torch.no_grad():
        lr = R.linear_logprobs(case["ref_hidden"].float(), case["ref_weight"].float(),
                               case["labels"])
    lr[case["labels"] == IGNORE] = float("nan")
    case["ref_logps"] = lr.double()
    return case


def inputs(case, dtype, layout, *, nan_views=True):
    """(leaves {hidden, weight, bias} at dtype, call args) for one layout."""
    view = nan_buffer_view if nan_views else (lambda t: t)
    leaves = {k: view(case[k].to(dtype)).requires_grad_(True) for k in ("hidden", "weight", "bias")}
    ref_hidden = case["ref_hidden"].to(dtype)
    tok = {k: case[k].to(torch.float32 if dtype != torch.float64 else dtype)
           for k in ("weights", "pos_logps", "neg_logps")}
    hidden, labels = leaves["hidden"], case["labels"]
    extra = {}
    if layout == "packed":
        idx = case["pack_index"]
        hidden = hidden.reshape(-1, D)[idx]
        ref_hidden = ref_hidden.reshape(-1, D)[idx]
        labels = labels.reshape(-1)[idx]
        tok = {k: v.reshape(-1)[idx] for k, v in tok.items()}
        extra = {"seq_offsets": case["seq_offsets"], "pairs": case["pairs"]}
    args = {"lm_head_weight": leaves["weight"], "hidden": hidden, "labels": labels,
            "bias": leaves["bias"], "ref_hidden": ref_hidden,
            "ref_weight": case["ref_weight"].to(dtype), **tok, **extra}
    return leaves, args


def call_kwargs(method, args, *, reference="hidden", weights="auto"):
    """The call arguments a method takes: its reference and its weights."""
    preset = PRESETS[method]
    kw = {k: args[k] for k in ("lm_head_weight", "hidden", "labels", "bias")}
    kw.update({k: args[k] for k in ("seq_offsets", "pairs") if k in args})
    if not preset.config.reference_free:
        if reference == "hidden":
            kw.update(ref_hidden=args["ref_hidden"], ref_weight=args["ref_weight"])
        else:
            kw["ref_logps"] = args["ref_logps"]
    if weights == "auto":
        weights = "onthefly" if preset.weight_method else None
    if weights == "onthefly":
        kw["pos_logps"] = args["pos_logps"]
        if preset.weight_method != "cdpo":
            kw["neg_logps"] = args["neg_logps"]
    elif weights == "given":
        kw["weights"] = args["weights"]
    return kw


def run(method, impl, case, dtype, layout, *, module_kw=None, loss_kw=None, nan_views=True,
        override=None, **call):
    """One forward + backward: (loss, metrics, grads of hidden / weight / bias)."""
    leaves, args = inputs(case, dtype, layout, nan_views=nan_views)
    args.update(override or {})
    loss, metrics = TISDPOLoss(method, impl=impl, **(module_kw or {}))(
        **call_kwargs(method, args, **call), **(loss_kw or {}))
    loss.backward()
    return loss, metrics, {k: v.grad for k, v in leaves.items()}


def check(actual, ref, truth, dtype, label, mags):
    """Loss, gradients and continuous metrics of three runs through the oracle, with the
    rounding magnitudes ``mags`` of ``module_magnitudes``."""
    assert_oracle(actual[0], ref[0], truth[0], dtype=dtype, name=f"{label} loss",
                  magnitude=mags["loss"])
    for k in truth[2]:
        assert_oracle(actual[2][k], ref[2][k], truth[2][k], dtype=dtype, name=f"{label} d{k}",
                      magnitude=mags["grads"][k])
    assert set(actual[1]) == set(truth[1]), f"{label}: metric names differ"
    for k in CONTINUOUS:
        if k in truth[1]:
            assert_oracle(actual[1][k], ref[1][k], truth[1][k], dtype=dtype,
                          name=f"{label} {k}", magnitude=mags["metrics"][k])


def three_way(method, impl, dtype, layout, case=None, truth_layout=None, **kw):
    case = make_case() if case is None else case
    tl = truth_layout or layout
    truth = run(method, "reference", case, torch.float64, tl, **kw)
    ref = run(method, "reference", case, dtype, tl, **kw)
    actual = run(method, impl, case, dtype, layout, **kw)
    check(actual, ref, truth, dtype, f"{method}/{layout}/{impl}/{dtype}",
          module_magnitudes(method, case, dtype, **kw))
    return actual


def _weight_magnitude(w, pos, neg):
    """Magnitude of weights computed from (exact) log-probs: the log-ratio's rounding scaled
    by the rule's slope (≤ |w| per unit of c for exp_clamp, smaller for the others), plus a few
    roundings of w itself."""
    return w.abs() * ((pos - neg).abs() + pos.abs() + neg.abs() + 4)


def module_magnitudes(method, case, dtype, *, module_kw=None, loss_kw=None, reference="hidden",
                      weights="auto", ref_head=None, **_):
    """Rounding magnitudes of ``TISDPOLoss(method)``'s loss, metrics and gradients on ``case``
    at ``dtype``: the per-token ops, the preference loss and the heads' backward composed as the
    module composes them (padded layout: packing only permutes the tokens). ``ref_head="policy"``:
    the reference head is the policy's own weight and bias."""
    mod = TISDPOLoss(method, impl="reference", **(module_kw or {}))
    cfg, cap = mod.config, mod.softcap
    x = {k: case[k].to(dtype).double() for k in ("hidden", "weight", "bias", "ref_hidden",
                                                 "ref_weight")}
    labels = case["labels"]
    mask = labels != IGNORE
    rw, rb = (x["weight"], x["bias"]) if ref_head == "policy" else (x["ref_weight"], None)
    h, w, b, rh = x["hidden"], x["weight"], x["bias"], x["ref_hidden"]
    kl = m_kl = lr = m_lr = None
    if cfg.uses_kl:
        kl, lp, lr = R.linear_token_kl(h, w, rh, rw, labels, bias=b, ref_bias=rb,
                                       direction=cfg.kl, softcap=cap)
        fm = M.token_kl(h, w, b, rh, rw, rb, labels, None, None, direction=cfg.kl,
                        softcap=cap, grads=())
        m_lp, m_lr, m_kl = fm["logp"], fm["ref_logp"], fm["kl"]
    else:
        lp = R.linear_logprobs(h, w, labels, bias=b, softcap=cap)
        m_lp = M.logprobs(h, w, b, labels, None, softcap=cap, grads=())["logp"]
        if not cfg.reference_free:   # a reference head, or the same values precomputed
            lr = R.linear_logprobs(rh, rw, labels, bias=rb, softcap=cap)
            m_lr = M.logprobs(rh, rw, rb, labels, None, softcap=cap, grads=())["logp"]
    mode = ("onthefly" if PRESETS[method].weight_method else None) if weights == "auto" \
        else weights
    side = (torch.arange(2 * B) < B)[:, None].expand(2 * B, T)
    wt = m_w = None
    if mode == "given":
        wt = torch.where(mask, case["weights"], 0.0)
    elif mode == "onthefly":
        rule = mod.weight_method
        pos, neg = (torch.where(mask, case[k], 0.0) for k in ("pos_logps", "neg_logps"))
        wt = R.token_weights(pos, None if rule == "cdpo" else neg, side=side, method=rule,
                             params=mod.weight_params, mask=mask)
        m_w = _weight_magnitude(wt, pos, neg if rule != "cdpo" else torch.zeros_like(pos))
    p = M.preference(lp, lr, wt, kl, mask, cfg, normalizer=(loss_kw or {}).get("normalizer"),
                     m_lp=m_lp, m_lr=m_lr, m_w=m_w, m_kl=m_kl)
    metrics = {k: M.pair_mean(v, p["metrics"][k]) for k, v in p["values"].items()}
    if cfg.reduction == "mean" and not cfg.reference_free:    # ipo: TRL's names are sums
        p_sum = M.preference(lp, lr, wt, kl, mask, replace(cfg, reduction="sum"),
                             m_lp=m_lp, m_lr=m_lr, m_w=m_w, m_kl=m_kl)
        for k in [k for k in metrics if k.startswith(("rewards/", "logps/"))]:
            head, _, tail = k.partition("/")
            metrics[f"{head}_per_token/{tail}"] = metrics[k]
            metrics[k] = M.pair_mean(p_sum["values"][k], p_sum["metrics"][k])
    unit = mask.double() if wt is None else wt
    m_unit = torch.zeros_like(unit) if m_w is None else m_w
    for name, sel in (("weights/chosen", mask & side), ("weights/rejected", mask & ~side)):
        n = max(int(sel.sum()), 1)
        metrics[name] = torch.sqrt((m_unit[sel] ** 2).sum() / n ** 2
                                   + n * (unit[sel].abs().sum() / n) ** 2
                                   + (unit[sel].sum() / n) ** 2)
    if cfg.uses_kl:
        g = M.token_kl(h, w, b, rh, rw, rb, labels, p["g_kl"], p["g_logp"], direction=cfg.kl,
                       softcap=cap, g_mags=(p["m_g_kl"], p["m_g_logp"]))
    else:
        g = M.logprobs(h, w, b, labels, p["g_logp"], None, softcap=cap,
                       g_mags=(p["m_g_logp"], None))
    return {"loss": p["loss"], "metrics": metrics,
            "grads": {k: g[f"d_{k}"] for k in ("hidden", "weight", "bias")}}
