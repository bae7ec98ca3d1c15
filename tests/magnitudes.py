"""Rounding magnitudes M (tests/numerics.py) of the LM-head ops and the preference loss, from
first-order error analysis.

All inputs are float64 tensors holding the test's exact (already rounded) values. Each
function returns, per output element, a bound on ‖c‖₂ = (Σ_r c_r²)^½ over the roundings r of
*any* correct implementation, c_r = (value rounded at r) × (the output's sensitivity to it):

- a logit z_tv = Σ_d h_td·w_vd (+ b_v) is a sum of D (+1) terms: m_z = √n·(|h|·|w|ᵀ + |b|);
  with a softcap cap·tanh(z/cap) the division, tanh (2 roundings) and product add 4|z_capped|
  and m_z scales by the softcap's slope;
- a normaliser lse_t = logsumexp_v z_tv carries the logits' errors (sensitivity p_tv) and its
  own: the shift z − max and exp (2 roundings) per term, the V-term sum, log, add —
  R² = Σ_v p_v²(|z_v − max| + 2)² + V + log²S + lse²;
- log p_t(y) = z_ty − lse_t: z_ty counted with sensitivity 1 (an implementation may gather it
  from another rounding of the logits than the one its normaliser saw);
- a backward recomputes the logits (an independent rounding of each z_tv, of the same size)
  and reads the forward's statistics: p_tv = exp(ẑ_tv − lse_t). The statistics' errors are
  common to a token's whole row (they add coherently over v), the recomputed logits' errors
  are independent;
- a gradient GEMM sums V (or N) terms: √n·Σ|terms|.

So a recomputing kernel may give p a relative error of a few units of u·m_z even where eager,
whose softmax is normalised from the very logits it exponentiates, cancels it (p ≈ 1): with
logits in the hundreds that is the 10⁻⁴-relative gradient error fp32 allows. (The Triton
kernels do exactly this on CPU: their backward packs out tokens without upstream gradient, so
a token's logits are recomputed at another row of the tile than in the forward, and numpy's
BLAS rounds a dot product differently by its position in the matrix.)

The preference loss (``preference``) sums per-token terms per sequence (√n·Σ|terms| each),
adds the per-token inputs' own magnitudes in quadrature, and carries them through the link
with its exact derivatives; it also gives the upstream gradients the heads receive and their
magnitudes. ``trained_metrics`` is a documented proxy for metrics of whole training runs.
"""
from __future__ import annotations

import math

import torch

F64 = torch.float64


def logits(h, w, b=None, softcap=None):
    """(z, m_z, slope): the exact (capped) logits [N, V], their rounding magnitudes, and
    d z_capped / d z (None without a softcap)."""
    z = h @ w.T
    a = h.abs() @ w.abs().T
    n = h.shape[-1]
    if b is not None:
        z, a, n = z + b, a + b.abs(), n + 1
    m = math.sqrt(n) * a
    if softcap is None:
        return z, m, None
    t = torch.tanh(z / softcap)
    zc, slope = softcap * t, 1 - t * t
    return zc, torch.sqrt((slope * m) ** 2 + (4 * zc) ** 2), slope


def _normaliser(z, m):
    """Softmax p, log-softmax, lse, the squared magnitude of lse (all roundings) and of its
    own roundings alone (R²)."""
    mx = z.max(-1, keepdim=True).values
    e = torch.exp(z - mx)
    s = e.sum(-1)
    p = e / s.unsqueeze(-1)
    lse = mx.squeeze(-1) + torch.log(s)
    own2 = ((p * ((z - mx).abs() + 2)) ** 2).sum(-1) + z.shape[-1] + torch.log(s) ** 2 + lse ** 2
    return p, z - lse.unsqueeze(-1), lse, (p ** 2 * m ** 2).sum(-1) + own2, own2


def _onehot(y, v):
    return torch.nn.functional.one_hot(y.clamp(min=0), v).to(F64)


def _head_grads(h, w, dz, indep2, coherent, valid, slope, names):
    """Magnitudes of d_hidden, d_weight, d_bias from the per-(token, vocab) gradient dz
    [N, V] (after the softcap), the squared independent magnitudes ``indep2`` [N, V] and
    ``coherent``: (coefficient [N, V], squared magnitude [N]) per error source shared by a
    token's row. Only the gradients named in ``names`` are built."""
    n_eff = max(int(valid.sum()), 1)
    v = dz.shape[1]
    indep2 = indep2 + (4 * dz.abs()) ** 2          # dz's own arithmetic (and × slope)
    if slope is not None:
        # slope = 1 − (z_c/cap)² is recomputed from the capped logit: its error scales dz
        indep2 = indep2 + (3 * dz.abs()) ** 2
    out = {}
    if "d_hidden" in names:
        acc = indep2 @ (w * w)
        for coef, mag2 in coherent:
            acc = acc + (coef @ w) ** 2 * mag2.unsqueeze(-1)
        out["d_hidden"] = torch.sqrt(acc + v * (dz.abs() @ w.abs()) ** 2)
    per_row = indep2 + sum(coef ** 2 * mag2.unsqueeze(-1) for coef, mag2 in coherent)
    if "d_weight" in names:
        out["d_weight"] = torch.sqrt(per_row.T @ (h * h) + n_eff * (dz.abs().T @ h.abs()) ** 2)
    if "d_bias" in names:
        out["d_bias"] = torch.sqrt(per_row.sum(0) + n_eff * dz.abs().sum(0) ** 2)
    return out


def _flat(x, d):
    return None if x is None else x.reshape(-1, d)


def logprobs(hidden, weight, bias, targets, g_logp, g_lse=None, *, softcap=None,
             ignore_index=-100, grads=("d_hidden", "d_weight", "d_bias"), g_mags=None):
    """Magnitudes of linear_logprobs' outputs logp, lse and the named gradients.

    g_logp, g_lse: the upstream gradients (None = 0); g_mags: their own rounding magnitudes
    (the loss's, see ``loss``), default 0 (given exactly)."""
    shape = targets.shape
    h, y = _flat(hidden, hidden.shape[-1]), targets.reshape(-1)
    valid = y != ignore_index
    z, m, slope = logits(h, weight, bias, softcap)
    p, logp_all, lse, m2_lse, _ = _normaliser(z, m)
    oh = _onehot(y, z.shape[1])
    logp = (logp_all * oh).sum(-1)
    m_logp = torch.sqrt((m ** 2 * oh).sum(-1) + m2_lse + logp ** 2)
    vm = valid.to(F64)
    out = {"logp": (m_logp * vm).reshape(shape), "lse": (m2_lse.sqrt() * vm).reshape(shape)}
    if not grads:
        return out
    g1 = torch.zeros_like(lse) if g_logp is None else g_logp.reshape(-1).to(F64) * vm
    g2 = torch.zeros_like(lse) if g_lse is None else g_lse.reshape(-1).to(F64) * vm
    gd = (g2 - g1).unsqueeze(-1)                         # the coefficient of p in dz
    s = torch.ones_like(z) if slope is None else slope
    dz0 = g1.unsqueeze(-1) * (oh - p) + g2.unsqueeze(-1) * p
    dz = dz0 * s * vm.unsqueeze(-1)
    sens_z = (gd * p * s).abs() + (0 if slope is None else dz0.abs() * 2 * (1 - s).sqrt()
                                   / softcap)
    own = (gd * p * s).abs() * (logp_all.abs() + 2)     # ẑ − lse, exp
    indep2 = (sens_z ** 2 * m ** 2 + own ** 2) * vm.unsqueeze(-1)
    coherent = [(-gd * p * s * vm.unsqueeze(-1), m2_lse)]
    if g_mags is not None:
        for coef, gm in (((oh - p) * s, g_mags[0]), (p * s, g_mags[1])):
            if gm is not None:
                coherent.append((coef * vm.unsqueeze(-1), gm.reshape(-1).to(F64) ** 2))
    mags = _head_grads(h, weight, dz, indep2, coherent, valid, slope, grads)
    if "d_hidden" in mags:
        mags["d_hidden"] = mags["d_hidden"].reshape(*shape, h.shape[-1])
    return {**out, **mags}


def token_kl(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets, g_kl, g_logp,
             *, direction="policy_ref", softcap=None, ignore_index=-100,
             grads=("d_hidden", "d_weight", "d_bias"), g_mags=None):
    """Magnitudes of linear_token_kl's outputs kl, logp, ref_logp and the named gradients
    (g_kl, g_logp: upstream gradients, None = 0; g_mags: their magnitudes, default 0)."""
    shape = targets.shape
    h, y = _flat(hidden, hidden.shape[-1]), targets.reshape(-1)
    hr = _flat(ref_hidden, ref_hidden.shape[-1])
    valid = y != ignore_index
    vm = valid.to(F64)
    z, mz, slope = logits(h, weight, bias, softcap)
    r, mr, _ = logits(hr, ref_weight, ref_bias, softcap)
    p, lp, lse_p, m2p, own2p = _normaliser(z, mz)
    q, lq, lse_q, m2q, own2q = _normaliser(r, mr)
    oh = _onehot(y, z.shape[1])
    policy_ref = direction == "policy_ref"
    wt, ratio = (p, lp - lq) if policy_ref else (q, lq - lp)   # KL = Σ wt·ratio
    kl = (wt * ratio).sum(-1)
    centred = (ratio - kl.unsqueeze(-1)).abs()
    if policy_ref:
        sens_z, sens_r = p * (centred + 1), (q - p).abs()
        own_w2, own_o2 = own2p, own2q
    else:
        sens_z, sens_r = (p - q).abs(), q * (centred + 1)
        own_w2, own_o2 = own2q, own2p
    m2_kl = ((sens_z * mz) ** 2).sum(-1) + ((sens_r * mr) ** 2).sum(-1) \
        + (1 + kl.abs()) ** 2 * own_w2 + own_o2 + z.shape[1] * ((wt * ratio).abs().sum(-1)) ** 2 \
        + ((3 * wt * ratio) ** 2).sum(-1) + kl ** 2
    logp, ref_logp = (lp * oh).sum(-1), (lq * oh).sum(-1)
    out = {"kl": (m2_kl.sqrt() * vm).reshape(shape),
           "logp": (torch.sqrt((mz ** 2 * oh).sum(-1) + m2p + logp ** 2) * vm).reshape(shape),
           "ref_logp": (torch.sqrt((mr ** 2 * oh).sum(-1) + m2q + ref_logp ** 2) * vm)
           .reshape(shape)}
    if not grads:
        return out
    gk = torch.zeros_like(kl) if g_kl is None else g_kl.reshape(-1).to(F64) * vm
    gl = torch.zeros_like(kl) if g_logp is None else g_logp.reshape(-1).to(F64) * vm
    gk_, gl_ = gk.unsqueeze(-1), gl.unsqueeze(-1)
    s = torch.ones_like(z) if slope is None else slope
    if policy_ref:
        big = lp - lq - kl.unsqueeze(-1)
        gv = p * big
        c_z = gk_ * p * (big + 1) - gl_ * p                   # d dz / d z (and − d / d lse_p)
        c_r = -gk_ * p                                       # d dz / d r (and − d / d lse_q)
        c_kl = -gk_ * p
        own = gk_.abs() * p * (lp.abs() + lq.abs() + 3 * big.abs() + 2) \
            + gl_.abs() * p * (lp.abs() + 2)
    else:
        gv = p - q
        c_z = (gk_ - gl_) * p
        c_r = -gk_ * q
        c_kl = torch.zeros_like(p)
        own = (gk_.abs() + gl_.abs()) * p * (lp.abs() + 2) + gk_.abs() * q * (lq.abs() + 2)
    dz0 = gk_ * gv + gl_ * (oh - p)
    dz = dz0 * s * vm.unsqueeze(-1)
    sens_z_raw = (c_z * s).abs() + (0 if slope is None else dz0.abs() * 2 * (1 - s).sqrt()
                                    / softcap)
    vmu = vm.unsqueeze(-1)
    indep2 = (sens_z_raw ** 2 * mz ** 2 + (c_r * s) ** 2 * mr ** 2 + (own * s) ** 2) * vmu
    coherent = [(-c_z * s * vmu, m2p), (-c_r * s * vmu, m2q), (c_kl * s * vmu, m2_kl)]
    if g_mags is not None:
        for coef, gm in ((gv * s, g_mags[0]), ((oh - p) * s, g_mags[1])):
            if gm is not None:
                coherent.append((coef * vmu, gm.reshape(-1).to(F64) ** 2))
    mags = _head_grads(h, weight, dz, indep2, coherent, valid, slope, grads)
    if "d_hidden" in mags:
        mags["d_hidden"] = mags["d_hidden"].reshape(*shape, h.shape[-1])
    return {**out, **mags}


def _link(z, cfg):
    """ℓ(z), ℓ'(z), ℓ''(z) of the config's link, exactly (autograd in float64)."""
    from tisdpo_kernels._torch.preference_loss import link_loss
    z = z.detach().clone().requires_grad_(True)
    loss = link_loss(z, cfg)
    d1, = torch.autograd.grad(loss.sum(), z, create_graph=True)
    d2 = torch.autograd.grad(d1.sum(), z)[0] if d1.requires_grad else torch.zeros_like(z)
    return loss.detach(), d1.detach(), d2.detach()


def _mean_sq(terms2, terms, count):
    """Squared magnitude of Σ terms / count given the terms' squared magnitudes (summed over the
    last dim), with the sum's own roundings."""
    return terms2.sum(-1) / count ** 2 + terms.shape[-1] * (terms.abs().sum(-1) / count) ** 2


def preference(lp, lr, w, kl, mask, cfg, *, normalizer=None, m_lp=None, m_lr=None, m_w=None,
               m_kl=None):
    """Magnitudes of preference_loss on the padded layout [2B, T] (pair b = rows b, b + B).

    lp, lr, w, kl: exact per-token log-probs, reference log-probs, weights, KL (None: absent /
    unit weights); m_*: their rounding magnitudes (None = exact). Returns the loss's magnitude,
    per-pair metric magnitudes (TRL names), the exact upstream gradients d loss / d logp and
    d loss / d kl ("g_logp", "g_kl") with their magnitudes ("m_g_logp", "m_g_kl"), and the
    per-pair metric values ("values") for means over pairs.
    """
    m = mask.to(F64)
    zero = torch.zeros_like(lp)

    def on(x, default):
        return default if x is None else torch.where(mask, x, 0.0)

    lr = zero if (cfg.reference_free or lr is None) else on(lr, zero)
    lp, w_, kl = on(lp, zero), on(w, m), on(kl, zero)
    m_lp, m_lr, m_w, m_kl = (on(x, zero) for x in (m_lp, m_lr, m_w, m_kl))
    half = lp.shape[0] // 2
    beta, cc, cr = cfg.beta, cfg.kl_chosen_coef, cfg.kl_rejected_coef
    delta = lp - lr
    term = w_ * delta
    term2 = (w_ * m_lp) ** 2 + (w_ * m_lr) ** 2 + (delta * m_w) ** 2 + (2 * term) ** 2
    if cfg.granularity == "pos":
        return _preference_pos(lp, w_, term, term2, m_lp, m_w, m, cfg, normalizer)
    n = m.sum(-1)
    norm_row = n.clamp(min=1) if cfg.reduction == "mean" else torch.ones_like(n)
    a = term.sum(-1) / norm_row
    m2a = _mean_sq(term2, term, norm_row) + a ** 2
    nu, m_nu = (w_, m_w) if cfg.kl_token_weighted else (m, zero)
    k = (nu * kl).sum(-1)
    m2k = _mean_sq((nu * m_kl) ** 2 + (kl * m_nu) ** 2 + (2 * nu * kl) ** 2, nu * kl, 1.0) + k ** 2
    logps = lp.sum(-1) / norm_row
    m2l = _mean_sq(m_lp ** 2 + (2 * lp) ** 2, lp, norm_row) + logps ** 2
    sl_w, sl_l = slice(0, half), slice(half, 2 * half)
    z = a[sl_w] - a[sl_l] + cc * k[sl_w] + cr * k[sl_l] - cfg.margin
    m2z = m2a[sl_w] + m2a[sl_l] + cc ** 2 * m2k[sl_w] + cr ** 2 * m2k[sl_l] + z ** 2
    ell, d1, d2 = _link(z, cfg)
    valid = ((n[sl_w] + n[sl_l]) > 0).to(F64)
    norm = valid.sum().clamp(min=1) if normalizer is None else torch.tensor(float(normalizer),
                                                                          dtype=F64)
    loss = (ell * valid).sum() / norm
    m2loss = ((d1 ** 2 * m2z + (4 * ell) ** 2) * valid).sum() / norm ** 2 \
        + half * ((ell.abs() * valid).sum() / norm) ** 2 + loss ** 2
    chosen, rejected = beta * (a[sl_w] + cc * k[sl_w]), beta * (a[sl_l] - cr * k[sl_l])
    values = {"rewards/chosen": chosen, "rewards/rejected": rejected,
              "rewards/margins": chosen - rejected, "logps/chosen": logps[sl_w],
              "logps/rejected": logps[sl_l], "kl/chosen": k[sl_w], "kl/rejected": k[sl_l]}
    m2 = {"rewards/chosen": beta ** 2 * (m2a[sl_w] + cc ** 2 * m2k[sl_w]) + chosen ** 2,
          "rewards/rejected": beta ** 2 * (m2a[sl_l] + cr ** 2 * m2k[sl_l]) + rejected ** 2,
          "rewards/margins": beta ** 2 * (m2z - z ** 2) + (chosen - rejected) ** 2,
          "logps/chosen": m2l[sl_w], "logps/rejected": m2l[sl_l],
          "kl/chosen": m2k[sl_w], "kl/rejected": m2k[sl_l]}
    # d loss / d logp_t = ±ℓ'(z_b) ω_t / (n_s·norm); d loss / d k_t = c ℓ'(z_b) ν_t / norm
    s1 = torch.cat([d1, -d1]).unsqueeze(-1) * valid.repeat(2).unsqueeze(-1) / norm
    s2 = torch.cat([d2, d2]).unsqueeze(-1) * valid.repeat(2).unsqueeze(-1) / norm
    mz = torch.cat([m2z, m2z]).sqrt().unsqueeze(-1)
    nr = norm_row.unsqueeze(-1)
    g_lp = s1 * w_ / nr * m
    m_g_lp = torch.sqrt((s2 * mz * w_ / nr) ** 2 + (s1 * m_w / nr) ** 2 + (3 * g_lp) ** 2) * m
    coef = torch.cat([torch.full((half, 1), 0.0 if cfg.kl_stop_grad_chosen else cc, dtype=F64),
                      torch.full((half, 1), -cr, dtype=F64)])     # −: s1 is −ℓ' there
    g_kl = s1 * coef * nu
    m_g_kl = torch.sqrt((s2 * coef.abs() * mz * nu) ** 2 + (s1 * coef * m_nu) ** 2
                        + (3 * g_kl) ** 2) * m
    return {"loss": m2loss.sqrt(), "metrics": {k: v.sqrt() for k, v in m2.items()},
            "values": values, "g_logp": g_lp, "m_g_logp": m_g_lp, "g_kl": g_kl,
            "m_g_kl": m_g_kl}


def _preference_pos(lp, w, term, term2, m_lp, m_w, m, cfg, normalizer):
    """``preference`` for granularity "pos": a link per (pair, position), mean over slots."""
    half = lp.shape[0] // 2
    beta = cfg.beta
    z = term[:half] - term[half:]
    m2z = term2[:half] + term2[half:] + z ** 2
    ell, d1, d2 = _link(z, cfg)
    norm = torch.tensor(float(max(z.numel(), 1) if normalizer is None else normalizer),
                        dtype=F64)
    loss = ell.sum() / norm
    m2loss = (d1 ** 2 * m2z + (4 * ell) ** 2).sum() / norm ** 2 \
        + z.numel() * (ell.abs().sum() / norm) ** 2 + loss ** 2
    scores, logps = term.sum(-1), lp.sum(-1)
    m2s = _mean_sq(term2, term, 1.0) + scores ** 2
    m2l = _mean_sq(m_lp ** 2 + (2 * lp) ** 2, lp, 1.0) + logps ** 2
    values = {"rewards/chosen": beta * scores[:half], "rewards/rejected": beta * scores[half:],
              "rewards/margins": beta * (scores[:half] - scores[half:]),
              "logps/chosen": logps[:half], "logps/rejected": logps[half:]}
    m2 = {"rewards/chosen": beta ** 2 * m2s[:half], "rewards/rejected": beta ** 2 * m2s[half:],
          "rewards/margins": beta ** 2 * (m2s[:half] + m2s[half:]),
          "logps/chosen": m2l[:half], "logps/rejected": m2l[half:]}
    s1, s2 = torch.cat([d1, -d1]) / norm, torch.cat([d2, d2]) / norm
    mz = torch.cat([m2z, m2z]).sqrt()
    g_lp = s1 * w * m
    m_g_lp = torch.sqrt((s2 * mz * w) ** 2 + (s1 * m_w) ** 2 + (3 * g_lp) ** 2) * m
    zero = torch.zeros_like(lp)
    return {"loss": m2loss.sqrt(), "metrics": {k: v.sqrt() for k, v in m2.items()},
            "values": values, "g_logp": g_lp, "m_g_logp": m_g_lp, "g_kl": zero,
            "m_g_kl": zero}


def pair_mean(values, mags):
    """Magnitude of the mean over pairs of a per-pair metric (values, magnitudes [P])."""
    p = max(values.numel(), 1)
    return torch.sqrt((mags ** 2).sum() / p ** 2 + p * (values.abs().sum() / p) ** 2
                      + (values.sum() / p) ** 2)


def trained_metrics(result, *, beta, weight_max=1.0, kl_coefs=(0.0, 0.0), link_slope=1.0,
                    prefix=""):
    """A documented proxy for the magnitudes of a whole training run's TRL-named metrics
    (``result``: the trainer's float metrics), where the model forward behind every log-prob is
    not modelled (the eager term carries its rounding):

    rewards/x = β(A_π − A_ref) + β·c_x·kl/x, with A = Σ_t ω_t log p_t / n over the side's
    tokens (the normaliser of logps/x). Log-probs are ≤ 0 and 0 ≤ ω ≤ W, so per pair
    A_π, A_ref ≤ 0, and over the pairs' mean |A_π| ≤ W·|logps/x| and
    |A_ref| ≤ W·|logps/x| + |rewards/x|/β + |c_x|·|kl/x|: the terms summed are at most
    M(rewards/x) = 2βW·|logps/x| + |rewards/x| + 2β|c_x|·|kl/x|. Then
    M(rewards/margins) = M(chosen) + M(rejected) and M(loss) = |loss| + s·M(margins), s the
    link's largest slope in the margin (1 for the sigmoid family)."""
    def get(k):
        return abs(float(result.get(prefix + k, 0.0)))

    out = {}
    for side, c in zip(("chosen", "rejected"), kl_coefs):
        out[f"rewards/{side}"] = (2 * beta * weight_max * get(f"logps/{side}")
                                  + get(f"rewards/{side}") + 2 * beta * abs(c) * get(f"kl/{side}"))
    out["rewards/margins"] = out["rewards/chosen"] + out["rewards/rejected"]
    out["loss"] = get("loss") + link_slope * out["rewards/margins"]
    return {prefix + k: v for k, v in out.items()}
