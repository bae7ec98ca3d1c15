"""The backend-neutral sweep of ``linear_preference_loss``, the one-sweep preference head
(docs/ONE_SWEEP.md). Both backends run it (they never import each other); each supplies a
:class:`SweepBackend`: its per-chunk function and its gradient accumulator.

For a loss that is a sum of per-pair terms, loss = Σ_b ℓ(z_b) / norm with

    z_b = Σ_{t∈b} c_t·(lp_t − ρ·lr_t) + Σ_{t∈b} κ_t·KL_t − γ₀
    c_t = ±m_t·ω_t / N_s          κ_t = c_side·m_t·ν_t   (docs/ALGORITHMS.md §8)

the gradient reaching token t's logits is s_b·e_t, with one scalar per pair
s_b = [pair b has a token]·ℓ'(z_b) / norm and a per-token vector known in the forward:

    e_t = c_t·(onehot(y_t) − p_t) + κ'_t·G_t          (× 1 − tanh² under a softcap)

(G_t = ∂KL_t/∂z_t; κ'_t = κ_t, or 0 on the chosen side when its KL is stop-gradient). The
forward sweeps pair b's rows chunk by chunk: the backend's chunk function forms the chunk's
logits once and returns its logp, ref_logp, KL and e; the backend's accumulator writes e_t·W
into the pair's d_hidden rows and sums M_b = Σ_t e_tᵀ·h_t (and Σ_t e_t) into one [V, D]
float32 scratch. When the pair's last chunk is done the sweep has z_b, hence s_b (a device
tensor: no host sync); it scales the pair's d_hidden rows by s_b and adds s_b·M_b into
d_weight. The backward multiplies the stored gradients by the upstream scalar: no logits are
recomputed and no head GEMM runs. Memory: d_hidden, d_weight, the scratch (none for a single
pair) and the backend's chunk buffers; nothing grows with the tokens of a pair.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

from tisdpo_kernels._common import (
    chunks, kept_rows, link_loss, masked, no_autocast, stat_dtype, valid_and_safe,
)
from tisdpo_kernels.config import PairHeadOptions

__all__ = ["SweepBackend", "linear_preference_loss_fwd", "LinearPreferenceLossFunction",
           "run_sweep"]

_F64 = torch.float64
_HALF = (torch.bfloat16, torch.float16)


class SweepBackend(NamedTuple):
    """What a backend gives the sweep.

    chunk(h, weight, bias, ref_h, ref_weight, ref_bias, safe, c, kg, opts, sd, want_e) ->
    (logp [C], ref_logp [C] | None, kl [C] | None, e [C, V] | None) for one chunk of rows:
    h [C, D] (ignored rows already zero), safe [C] the targets (0 where ignored), c and kg [C]
    the coefficients c_t and κ'_t in the statistics dtype ``sd`` (0 on ignored rows); e is
    wanted when ``want_e``, in whatever dtype the accumulator takes.

    head_grads(hidden, weight, bias, needs_hidden, needs_weight, needs_bias) -> an accumulator
    with attributes ``dh`` (d_hidden [N, D] in hidden's dtype), ``dw`` and ``db`` (float32
    sums, or None when not wanted) and ``add(start, end, h, e)``: d_hidden[start:end] = e·W,
    dw += eᵀ·h, db += Σ_rows e.
    """

    chunk: Callable
    head_grads: Callable


def _scale_rows_(t: torch.Tensor, s: torch.Tensor, chunk: int) -> None:
    """t *= s (a 0-d device tensor) in place, in float32 for 16-bit t, chunk rows at a time."""
    if t.dtype in _HALF:
        for a, b in chunks(t.shape[0], chunk):
            r = t[a:b]
            r.copy_(r.float().mul_(s.float()))
    else:
        t.mul_(s.to(t.dtype))


class _PairGrads:
    """Σ_b s_b·(the gradients of pair b), one pair at a time: the backend's accumulator
    collects the current pair's unscaled d_hidden rows, M_b (its ``dw``) and Σ e (its ``db``)."""

    def __init__(self, head_grads, hidden, weight, bias, needs, chunk):
        self.head = head_grads(hidden, weight, bias, *needs)
        self.weight, self.bias, self.chunk = weight, bias, chunk
        self.dw = self.db = None

    def add(self, start, end, h, e):
        self.head.add(start, end, h, e)

    def close(self, ranges, s, last: bool):
        """Scale pair b's d_hidden rows by s and fold s·M_b into d_weight (s·Σe into d_bias)."""
        head = self.head
        if head.dh is not None:
            for a, b in ranges:
                _scale_rows_(head.dh[a:b], s, self.chunk)
        for name in ("dw", "db"):
            m = getattr(head, name)
            if m is None:
                continue
            total = getattr(self, name)
            if total is None:               # the first pair's scratch becomes the sum
                setattr(self, name, m.mul_(s.to(m.dtype)))
                setattr(head, name, None if last else torch.zeros_like(m))
            else:
                total.addcmul_(m, s.to(m.dtype))
                if not last:
                    m.zero_()

    def finish(self, uncovered):
        """(d_hidden, d_weight, d_bias), None where not wanted; rows in no pair get 0."""
        dh = self.head.dh
        if dh is not None:
            for a, b in uncovered:
                dh[a:b] = 0
        dw = db = None
        if self.head.dw is not None or self.dw is not None:
            dw = (self.dw if self.dw is not None else self.head.dw).to(self.weight.dtype)
        if self.head.db is not None or self.db is not None:
            db = (self.db if self.db is not None else self.head.db).to(self.bias.dtype)
        return dh, dw, db


def _uncovered(pair_rows, n):
    """Row ranges of [0, n) in no pair (host ints)."""
    covered = sorted(r for pair in pair_rows for side in pair for r in side if r[1] > r[0])
    out, pos = [], 0
    for a, b in covered:
        if a > pos:
            out.append((pos, a))
        pos = max(pos, b)
    return out + ([(pos, n)] if pos < n else [])


def _pair_link(z, cfg, want_grad):
    """(ℓ(z), ℓ'(z)) through the same ``link_loss`` the recompute path differentiates."""
    if not want_grad:
        return link_loss(z, cfg), None
    zz = z.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = link_loss(zz, cfg)
    (g,) = torch.autograd.grad(loss, zz)
    return loss.detach(), g


def linear_preference_loss_fwd(backend: SweepBackend, hidden, weight, targets, bias, ref_hidden,
                               ref_weight, ref_bias, ref_logp, weights, normalizer,
                               opts: PairHeadOptions, chunk):
    """(loss, logp, ref_logp, kl, (d_hidden, d_weight, d_bias)) in one sweep over the pairs.

    Per-token outputs [N] are 0 where ignored or in no pair; ref_logp is None without a
    reference, kl None without KL terms; gradients are None where not wanted."""
    cfg = opts.config
    n, dev = hidden.shape[0], hidden.device
    sd = stat_dtype(hidden.dtype)
    valid, safe = valid_and_safe(targets, opts.ignore_index)
    w64 = valid.to(_F64) if weights is None else torch.where(valid, weights.to(_F64), 0.0)
    nu64 = w64 if (cfg.kl_token_weighted and weights is not None) else valid.to(_F64)
    logp = torch.zeros(n, dtype=sd, device=dev)
    kl = torch.zeros(n, dtype=sd, device=dev) if cfg.uses_kl else None
    if ref_hidden is not None:
        ref_out = torch.zeros(n, dtype=sd, device=dev)
    else:
        ref_out = None if ref_logp is None else torch.where(valid, ref_logp.to(sd), 0.0)
    use_ref = ref_out is not None and not cfg.reference_free
    want_e = any(opts.needs)
    grads = _PairGrads(backend.head_grads, hidden, weight, bias, opts.needs, chunk)
    # the pairs' token counts, validity and the normaliser are known before the sweep
    counts = [torch.stack([sum((valid[a:b].sum() for a, b in side),
                               torch.zeros((), dtype=torch.long, device=dev)) for side in pair])
              for pair in opts.pair_rows]
    counts = (torch.stack(counts).to(_F64) if counts
              else torch.zeros(0, 2, dtype=_F64, device=dev))
    pair_valid = counts.sum(1) > 0
    norm = normalizer if normalizer is not None else pair_valid.sum().clamp(min=1).to(_F64)
    total = torch.zeros((), dtype=_F64, device=dev)
    sides = ((1.0, cfg.kl_chosen_coef, not cfg.kl_stop_grad_chosen), (-1.0, cfg.kl_rejected_coef,
                                                                         True))
    with no_autocast(dev):
        for b, pair in enumerate(opts.pair_rows):
            z = torch.full((), -cfg.margin, dtype=_F64, device=dev)
            for side, (sign, kc, kl_grad), cnt in zip(pair, sides, counts[b]):
                inv_n = 1.0 / cnt.clamp(min=1) if cfg.reduction == "mean" else 1.0
                for start, end in side:
                    for lo, hi in chunks(end - start, chunk):
                        s, e = start + lo, start + hi
                        c = sign * w64[s:e] * inv_n                       # ∂z/∂lp_t, f64
                        kz = kc * nu64[s:e]                                # ∂z/∂KL_t, f64
                        kg = kz if kl_grad else torch.zeros_like(kz)
                        v = valid[s:e]
                        ref_h = None if ref_hidden is None else kept_rows(ref_hidden[s:e], v)
                        h = kept_rows(hidden[s:e], v)
                        lp_c, lr_c, kl_c, e_c = backend.chunk(
                            h, weight, bias, ref_h, ref_weight, ref_bias, safe[s:e],
                            c.to(sd), kg.to(sd), opts, sd, want_e)
                        logp[s:e] = masked(lp_c, v)
                        delta = logp[s:e].to(_F64)
                        if lr_c is not None:
                            ref_out[s:e] = masked(lr_c, v)
                        if use_ref:
                            delta = delta - ref_out[s:e].to(_F64)
                        z = z + (c * delta).sum()
                        if kl_c is not None:
                            kl[s:e] = masked(kl_c, v)
                            z = z + (kz * kl[s:e].to(_F64)).sum()
                        if e_c is not None:
                            grads.add(s, e, h, e_c)
                        del e_c
            loss_b, g_b = _pair_link(z, cfg, want_e)
            total = total + torch.where(pair_valid[b], loss_b, 0.0)
            if want_e:
                s_b = torch.where(pair_valid[b], g_b, 0.0) / norm
                grads.close([r for side in pair for r in side], s_b,
                            last=b == len(opts.pair_rows) - 1)
    dgrads = grads.finish(_uncovered(opts.pair_rows, n))
    return (total / norm).to(sd), logp, ref_out, kl, dgrads


class LinearPreferenceLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, backend: SweepBackend, hidden, weight, bias, targets, ref_hidden, ref_weight,
                ref_bias, ref_logp, weights, normalizer, opts: PairHeadOptions, chunk: int):
        loss, logp, ref_out, kl, grads = linear_preference_loss_fwd(
            backend, hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias, ref_logp,
            weights, normalizer, opts, chunk)
        ctx.save_for_backward(*grads)
        ctx.chunk = chunk
        ctx.mark_non_differentiable(*(t for t in (logp, ref_out, kl) if t is not None))
        return loss, logp, ref_out, kl

    @staticmethod
    @once_differentiable
    def backward(ctx, g_loss, *_):
        def scaled(t):
            if t is None:
                return None
            out = t.clone()
            _scale_rows_(out, g_loss.to(stat_dtype(t.dtype)), ctx.chunk)
            return out

        dh, dw, db = ctx.saved_tensors
        return (None, scaled(dh), scaled(dw), scaled(db)) + (None,) * 9


def run_sweep(backend: SweepBackend, hidden, weight, targets, bias, ref_hidden, ref_weight,
              ref_bias, ref_logp, weights, normalizer, opts: PairHeadOptions, chunk: int):
    """(loss, logp, ref_logp, kl) of the sweep with ``backend``'s chunks; the loss is
    differentiable in hidden, weight and bias (the backward only scales the stored gradients).
    """
    return LinearPreferenceLossFunction.apply(
        backend, hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias, ref_logp,
        weights, normalizer, opts, chunk)
