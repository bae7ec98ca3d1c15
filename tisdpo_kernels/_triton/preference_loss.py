"""The weighted preference loss in Triton (docs/ALGORITHMS.md §8): 2 kernels forward, 2 backward.

Forward
  1. ``preference_loss_fwd_kernel`` (grid over token blocks): per token of sequence s, atomically
     adds into a float64 [num_seqs, 4] buffer the columns
        Σ ω(lp − ρ·lr),   Σ lp,   Σ 1 (= n_s),   Σ ν·k.
  2. ``preference_loss_pair_fwd_kernel`` (one program looping over pairs): N_s = max(n_s, 1) for
     "mean" (else 1), A_s, z = A_w − A_l + c_w·K_w + c_l·K_l − γ₀, ℓ = link(z) and
     g = ∂ℓ/∂z, the TRL metrics, Σ_valid ℓ / normaliser (default: #pairs with ≥ 1 token, ≥ 1).
Backward (docs/ALGORITHMS.md §8 "Gradients for a fused backward")
  3. ``preference_loss_pair_bwd_kernel`` (grid over pair blocks): G_b = dloss·g_b/normaliser is
     scattered into per-sequence coefficients α_s = Σ ±G_b/N_s (+ chosen, − rejected) and
     κ_s = Σ c_side·G_b (κ of the chosen side is 0 under TDPO2's stop-gradient).
  4. ``preference_loss_bwd_kernel`` (grid over token blocks): a_t = α_{s(t)}, and
        ∂loss/∂lp_t = a_t·ω_t,  ∂/∂lr_t = −ρ·a_t·ω_t,  ∂/∂k_t = κ_{s(t)}·ν_t,
        ∂/∂ω_t = a_t·(lp_t − ρ·lr_t) + κ_{s(t)}·k_t [ν = ω],
     written only for inputs that need a gradient.
Besides these, a step costs one memset per direction (the float64 buffers), one async copy
of five float64 constants from pinned memory, and the public op's range checks (device
assertions on CUDA; TISDPO_CHECKS=off drops them). All arithmetic is float64 (O(tokens)); the
float64 atomics' order changes only their float64 rounding, far below the float32 results
(these rarely differ in the last bit between runs; the head GEMMs, where the work is, have no
atomics). Nothing syncs with the
host: the normaliser stays on the device. (The cDPO "pos" granularity has one
implementation, in torch; ``tisdpo_kernels.ops`` sends it there for every impl.)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from tisdpo_kernels._common import first_order, normalizer_tensor, stat_dtype
from tisdpo_kernels._triton import configs
from tisdpo_kernels._triton.common import f64_constants, upcast
from tisdpo_kernels.config import PreferenceConfig

__all__ = ["preference_loss", "PreferenceLossFunction"]

_NCOL = 4  # columns of the per-sequence accumulator
_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
            "logps/chosen", "logps/rejected", "kl/chosen", "kl/rejected")


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _load_f64(ptr, offs, stride, mask, UPCAST: tl.constexpr):
    x = tl.load(ptr + offs * stride, mask=mask, other=0.0)
    if UPCAST:  # the interpreter computes bf16 on raw bits: go through fp32 there only
        x = x.to(tl.float32)
    return x.to(tl.float64)


@triton.jit
def _store_f64(ptr, offs, x, mask):
    """Store float64 ``x`` at ptr's dtype; to half types via fp32 (the interpreter's direct
    float64 -> bf16 cast is wrong, and fp32 is the dtype the reference's gradients pass)."""
    if ptr.dtype.element_ty == tl.float64:
        tl.store(ptr + offs, x, mask=mask)
    else:
        tl.store(ptr + offs, x.to(tl.float32).to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _log1p(x):
    """log(1 + x) for x ≥ 0, accurate for tiny x (Goldberg's trick)."""
    u = 1.0 + x
    tiny = u == 1.0
    return tl.where(tiny, x, tl.log(u) * (x / tl.where(tiny, 1.0, u - 1.0)))


@triton.jit
def _softplus_sigmoid(x):
    """(softplus(x), σ(x)) = (−log σ(−x), σ(x)), stable for any x."""
    e = tl.exp(-tl.abs(x))
    sp = tl.maximum(x, 0.0) + _log1p(e)
    sig = tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    return sp, sig


@triton.jit
def _link(z, beta, eps, LINK: tl.constexpr):
    """(ℓ(z), ∂ℓ/∂z) for the link (docs/ALGORITHMS.md §8)."""
    bz = beta * z
    if LINK == "ipo":
        r = z - 1.0 / (2.0 * beta)
        ell = r * r
        g = 2.0 * r
    elif LINK == "hinge":
        h = 1.0 - bz
        ell = tl.maximum(h, 0.0)
        g = tl.where(h > 0.0, -beta, 0.0)
    else:
        sp_neg, sig_neg = _softplus_sigmoid(-bz)  # −log σ(βz), σ(−βz)
        sp_pos, sig_pos = _softplus_sigmoid(bz)   # −log σ(−βz), σ(βz)
        if LINK == "sigmoid":
            ell = sp_neg
            g = -beta * sig_neg
        elif LINK == "conservative":
            ell = (1.0 - eps) * sp_neg + eps * sp_pos
            g = -beta * ((1.0 - eps) * sig_neg - eps * sig_pos)
        else:  # robust
            ell = ((1.0 - eps) * sp_neg - eps * sp_pos) / (1.0 - 2.0 * eps)
            g = -beta * ((1.0 - eps) * sig_neg + eps * sig_pos) / (1.0 - 2.0 * eps)
    return ell, g


@triton.jit
def preference_loss_fwd_kernel(
    LP, LR, W, KL, IDS, ACC, N,
    stride_lp, stride_lr, stride_w, stride_kl, stride_ids,
    HAS_REF: tl.constexpr, HAS_W: tl.constexpr, HAS_KL: tl.constexpr,
    KL_WEIGHTED: tl.constexpr, UPCAST: tl.constexpr, NCOL: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < N
    sid = tl.load(IDS + offs * stride_ids, mask=inb, other=-1)
    valid = inb & (sid >= 0)
    row = ACC + tl.where(valid, sid, 0) * NCOL  # [BLOCK] row pointers into ACC [S, NCOL]
    lp = _load_f64(LP, offs, stride_lp, valid, UPCAST)
    d = lp
    if HAS_REF:
        d = lp - _load_f64(LR, offs, stride_lr, valid, UPCAST)
    if HAS_W:
        w = _load_f64(W, offs, stride_w, valid, UPCAST)
        d = w * d
    tl.atomic_add(row + 0, d, mask=valid, sem="relaxed")
    tl.atomic_add(row + 1, lp, mask=valid, sem="relaxed")
    tl.atomic_add(row + 2, tl.where(valid, 1.0, 0.0).to(tl.float64), mask=valid, sem="relaxed")
    if HAS_KL:
        k = _load_f64(KL, offs, stride_kl, valid, UPCAST)
        if KL_WEIGHTED and HAS_W:
            k = w * k
        tl.atomic_add(row + 3, k, mask=valid, sem="relaxed")


@triton.jit
def preference_loss_pair_fwd_kernel(
    ACC, CS, RS, SC, NORM_IN, LOSS, MET, GZ, NORM_OUT, P,
    LINK: tl.constexpr, MEAN: tl.constexpr, USES_KL: tl.constexpr, HAS_NORM: tl.constexpr,
    NCOL: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # SC (float64): beta, epsilon, margin, c_w, c_l.  MET: [8, P] metrics.  GZ: [P] g·valid.
    beta = tl.load(SC + 0)
    eps = tl.load(SC + 1)
    margin = tl.load(SC + 2)
    c_w = tl.load(SC + 3)
    c_l = tl.load(SC + 4)
    total = tl.zeros([BLOCK_P], dtype=tl.float64)
    count = tl.zeros([BLOCK_P], dtype=tl.float64)
    for start in range(0, P, BLOCK_P):
        offs = start + tl.arange(0, BLOCK_P)
        m = offs < P
        rw = ACC + tl.load(CS + offs, mask=m, other=0) * NCOL
        rl = ACC + tl.load(RS + offs, mask=m, other=0) * NCOL
        n_w = tl.load(rw + 2, mask=m, other=0.0)
        n_l = tl.load(rl + 2, mask=m, other=0.0)
        if MEAN:
            d_w = tl.maximum(n_w, 1.0)
            d_l = tl.maximum(n_l, 1.0)
        else:
            d_w = tl.full([BLOCK_P], 1.0, tl.float64)
            d_l = tl.full([BLOCK_P], 1.0, tl.float64)
        a_w = tl.load(rw + 0, mask=m, other=0.0) / d_w
        a_l = tl.load(rl + 0, mask=m, other=0.0) / d_l
        if USES_KL:
            k_w = tl.load(rw + 3, mask=m, other=0.0)
            k_l = tl.load(rl + 3, mask=m, other=0.0)
        else:
            k_w = tl.zeros([BLOCK_P], dtype=tl.float64)
            k_l = tl.zeros([BLOCK_P], dtype=tl.float64)
        z = a_w - a_l + c_w * k_w + c_l * k_l - margin
        ell, g = _link(z, beta, eps, LINK)
        valid = m & ((n_w + n_l) > 0.0)
        total += tl.where(valid, ell, 0.0)
        count += tl.where(valid, 1.0, 0.0)
        tl.store(GZ + offs, tl.where(valid, g, 0.0), mask=m)
        r_w = beta * (a_w + c_w * k_w)
        r_l = beta * (a_l - c_l * k_l)
        ty = MET.dtype.element_ty
        tl.store(MET + 0 * P + offs, r_w.to(ty), mask=m)
        tl.store(MET + 1 * P + offs, r_l.to(ty), mask=m)
        tl.store(MET + 2 * P + offs, (r_w - r_l).to(ty), mask=m)
        tl.store(MET + 3 * P + offs, tl.where(r_w > r_l, 1.0, 0.0).to(ty), mask=m)
        tl.store(MET + 4 * P + offs, (tl.load(rw + 1, mask=m, other=0.0) / d_w).to(ty), mask=m)
        tl.store(MET + 5 * P + offs, (tl.load(rl + 1, mask=m, other=0.0) / d_l).to(ty), mask=m)
        tl.store(MET + 6 * P + offs, k_w.to(ty), mask=m)
        tl.store(MET + 7 * P + offs, k_l.to(ty), mask=m)
    if HAS_NORM:
        norm = tl.load(NORM_IN)
    else:
        norm = tl.maximum(tl.sum(count, axis=0), 1.0)
    tl.store(LOSS, (tl.sum(total, axis=0) / norm).to(LOSS.dtype.element_ty))
    tl.store(NORM_OUT, norm)


@triton.jit
def preference_loss_pair_bwd_kernel(
    ACC, CS, RS, SC, NORM, DLOSS, GZ, COEF, P,
    MEAN: tl.constexpr, USES_KL: tl.constexpr, SG_CHOSEN: tl.constexpr,
    NCOL: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # COEF: [S, 2] float64 per-sequence α_s (log-ratio) and κ_s (KL) coefficients.
    offs = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    m = offs < P
    scale = tl.load(DLOSS).to(tl.float64) / tl.load(NORM)
    gb = tl.load(GZ + offs, mask=m, other=0.0) * scale
    cs = tl.load(CS + offs, mask=m, other=0)
    rs = tl.load(RS + offs, mask=m, other=0)
    if MEAN:
        d_w = tl.maximum(tl.load(ACC + cs * NCOL + 2, mask=m, other=1.0), 1.0)
        d_l = tl.maximum(tl.load(ACC + rs * NCOL + 2, mask=m, other=1.0), 1.0)
        tl.atomic_add(COEF + cs * 2, gb / d_w, mask=m, sem="relaxed")
        tl.atomic_add(COEF + rs * 2, -gb / d_l, mask=m, sem="relaxed")
    else:
        tl.atomic_add(COEF + cs * 2, gb, mask=m, sem="relaxed")
        tl.atomic_add(COEF + rs * 2, -gb, mask=m, sem="relaxed")
    if USES_KL:
        if not SG_CHOSEN:
            tl.atomic_add(COEF + cs * 2 + 1, tl.load(SC + 3) * gb, mask=m, sem="relaxed")
        tl.atomic_add(COEF + rs * 2 + 1, tl.load(SC + 4) * gb, mask=m, sem="relaxed")


@triton.jit
def preference_loss_bwd_kernel(
    LP, LR, W, KL, IDS, COEF, DLP, DLR, DW, DKL, N,
    stride_lp, stride_lr, stride_w, stride_kl, stride_ids,
    HAS_REF: tl.constexpr, HAS_W: tl.constexpr, HAS_KL: tl.constexpr,
    KL_WEIGHTED: tl.constexpr, NEED_LP: tl.constexpr, NEED_LR: tl.constexpr,
    NEED_W: tl.constexpr, NEED_KL: tl.constexpr, UPCAST: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < N
    sid = tl.load(IDS + offs * stride_ids, mask=inb, other=-1)
    valid = inb & (sid >= 0)
    row = COEF + tl.where(valid, sid, 0) * 2
    alpha = tl.load(row, mask=valid, other=0.0)
    if HAS_W:
        w = _load_f64(W, offs, stride_w, valid, UPCAST)
        aw = alpha * w
    else:
        aw = alpha
    if NEED_LP:
        _store_f64(DLP, offs, aw, inb)
    if NEED_LR:
        _store_f64(DLR, offs, -aw, inb)
    if HAS_KL:
        kappa = tl.load(row + 1, mask=valid, other=0.0)
        if NEED_KL:
            if KL_WEIGHTED and HAS_W:
                _store_f64(DKL, offs, kappa * w, inb)
            else:
                _store_f64(DKL, offs, kappa, inb)
    if NEED_W:
        d = _load_f64(LP, offs, stride_lp, valid, UPCAST)
        if HAS_REF:
            d = d - _load_f64(LR, offs, stride_lr, valid, UPCAST)
        gw = alpha * d
        if HAS_KL:
            if KL_WEIGHTED:
                gw += kappa * _load_f64(KL, offs, stride_kl, valid, UPCAST)
        _store_f64(DW, offs, gw, inb)


# ----------------------------------------------------------------------------- launchers

@dataclass(frozen=True)
class _Options:
    """Non-tensor options crossing the autograd boundary."""

    cfg: PreferenceConfig
    num_seqs: int
    has_ref: bool
    has_w: bool
    has_kl: bool


def _configs(t):
    tok, pair = configs.get("preference_loss_tokens", t), configs.get("preference_loss_pairs", t)
    assert tok.meta["BLOCK"] >= 16 and pair.meta["BLOCK_P"] >= 16, (tok, pair)
    return tok, pair


def _stride(t, fallback):
    return (fallback if t is None else t).stride(0)


def preference_loss_fwd(lp, lr, w, kl, ids, cs, rs, norm, opts: _Options):
    """-> loss (0-d), metrics [8, P], gz [P] float64, normaliser (0-d float64), acc [S, 4]."""
    cfg, dev = opts.cfg, lp.device
    tok, pair = _configs(lp)
    out_dtype = stat_dtype(lp.dtype)
    n, p = lp.shape[0], cs.shape[0]
    acc = torch.zeros(opts.num_seqs, _NCOL, dtype=torch.float64, device=dev)
    if n > 0:
        preference_loss_fwd_kernel[(triton.cdiv(n, tok.meta["BLOCK"]),)](
            lp, lr if opts.has_ref else lp, w if opts.has_w else lp, kl if opts.has_kl else lp,
            ids, acc, n,
            lp.stride(0), _stride(lr if opts.has_ref else None, lp),
            _stride(w if opts.has_w else None, lp), _stride(kl if opts.has_kl else None, lp),
            ids.stride(0),
            HAS_REF=opts.has_ref, HAS_W=opts.has_w, HAS_KL=opts.has_kl,
            KL_WEIGHTED=cfg.kl_token_weighted, UPCAST=upcast(lp, lr, w, kl), NCOL=_NCOL,
            **tok.meta, **tok.launch_kwargs(lp),
        )
    sc = f64_constants([cfg.beta, cfg.epsilon, cfg.margin, cfg.kl_chosen_coef,
                        cfg.kl_rejected_coef], dev)
    loss = torch.empty((), dtype=out_dtype, device=dev)
    met = torch.empty(len(_METRICS), p, dtype=out_dtype, device=dev)
    gz = torch.empty(p, dtype=torch.float64, device=dev)
    norm_out = torch.empty((), dtype=torch.float64, device=dev)
    preference_loss_pair_fwd_kernel[(1,)](
        acc, cs, rs, sc, norm if norm is not None else norm_out, loss, met, gz, norm_out, p,
        LINK=cfg.link, MEAN=cfg.reduction == "mean", USES_KL=opts.has_kl,
        HAS_NORM=norm is not None, NCOL=_NCOL, **pair.meta, **pair.launch_kwargs(lp),
    )
    return loss, met, gz, norm_out, acc, sc


def preference_loss_bwd(dloss, lp, lr, w, kl, ids, cs, rs, acc, gz, norm, sc, opts: _Options,
                   need):
    """-> (d_lp, d_lr, d_w, d_kl), None where not needed."""
    cfg, dev = opts.cfg, lp.device
    tok, pair = _configs(lp)
    n, p = lp.shape[0], cs.shape[0]
    coef = torch.zeros(opts.num_seqs, 2, dtype=torch.float64, device=dev)
    if p > 0:
        preference_loss_pair_bwd_kernel[(triton.cdiv(p, pair.meta["BLOCK_P"]),)](
            acc, cs, rs, sc, norm, dloss, gz, coef, p,
            MEAN=cfg.reduction == "mean", USES_KL=opts.has_kl,
            SG_CHOSEN=cfg.kl_stop_grad_chosen, NCOL=_NCOL, **pair.meta,
            **pair.launch_kwargs(lp),
        )
    need_lp, need_lr, need_w, need_kl = need
    need_lr, need_w, need_kl = need_lr and opts.has_ref, need_w and opts.has_w, \
        need_kl and opts.has_kl
    # gradients in the inputs' dtypes; a 16-bit one is written in fp32 under the interpreter
    # (whose float -> 16-bit casts truncate) and rounded to nearest by torch below
    ins = (lp, lr, w, kl)
    grads = [torch.empty_like(t, dtype=torch.float32 if upcast(t) else t.dtype,
                              memory_format=torch.contiguous_format) if flag else None
             for t, flag in zip(ins, (need_lp, need_lr, need_w, need_kl))]
    if n > 0 and any(g is not None for g in grads):
        d_lp, d_lr, d_w, d_kl = (g if g is not None else lp for g in grads)
        preference_loss_bwd_kernel[(triton.cdiv(n, tok.meta["BLOCK"]),)](
            lp, lr if opts.has_ref else lp, w if opts.has_w else lp, kl if opts.has_kl else lp,
            ids, coef, d_lp, d_lr, d_w, d_kl, n,
            lp.stride(0), _stride(lr if opts.has_ref else None, lp),
            _stride(w if opts.has_w else None, lp), _stride(kl if opts.has_kl else None, lp),
            ids.stride(0),
            HAS_REF=opts.has_ref, HAS_W=opts.has_w, HAS_KL=opts.has_kl,
            KL_WEIGHTED=cfg.kl_token_weighted, NEED_LP=need_lp, NEED_LR=need_lr,
            NEED_W=need_w, NEED_KL=need_kl, UPCAST=upcast(lp, lr, w, kl),
            **tok.meta, **tok.launch_kwargs(lp),
        )
    return tuple(None if g is None else g.to(t.dtype) for g, t in zip(grads, ins))


# ----------------------------------------------------------------------------- autograd

class PreferenceLossFunction(torch.autograd.Function):
    """(lp, lr, w, kl, ids, cs, rs, norm, opts) -> (loss, metrics [8, P]); grads to lp/lr/w/kl."""

    @staticmethod
    def forward(ctx, lp, lr, w, kl, ids, cs, rs, norm, opts: _Options):
        loss, met, gz, norm_out, acc, sc = preference_loss_fwd(lp, lr, w, kl, ids, cs, rs, norm, opts)
        ctx.save_for_backward(lp, lr, w, kl, ids, cs, rs, acc, gz, norm_out, sc)
        ctx.opts = opts
        ctx.mark_non_differentiable(met)
        return loss, met

    @staticmethod
    @first_order("preference_loss")
    def backward(ctx, dloss, dmet):
        lp, lr, w, kl, ids, cs, rs, acc, gz, norm, sc = ctx.saved_tensors
        need = ctx.needs_input_grad[:4]
        d_lp, d_lr, d_w, d_kl = preference_loss_bwd(dloss.contiguous(), lp, lr, w, kl, ids, cs, rs,
                                               acc, gz, norm, sc, ctx.opts, need)
        return d_lp, d_lr, d_w, d_kl, None, None, None, None, None


# ----------------------------------------------------------------------------- public

def preference_loss(lp, lr, w, kl, seq_ids, chosen_seq, rejected_seq, num_seqs: int,
                    cfg: PreferenceConfig, normalizer):
    """Packed layout (backend contract of ``tisdpo_kernels.preference_loss``) -> (loss, metrics)."""
    norm = normalizer_tensor(normalizer, lp.device)
    has_ref = not cfg.reference_free and lr is not None
    opts = _Options(cfg=cfg, num_seqs=num_seqs, has_ref=has_ref, has_w=w is not None,
                    has_kl=cfg.uses_kl)
    loss, met = PreferenceLossFunction.apply(  # pairs may be strided views ([P, 2] columns)
        lp, lr if has_ref else None, w, kl if cfg.uses_kl else None, seq_ids,
        chosen_seq.contiguous(), rejected_seq.contiguous(), norm, opts)
    names = _METRICS if cfg.uses_kl else _METRICS[:6]
    return loss, {name: met[i] for i, name in enumerate(names)}
