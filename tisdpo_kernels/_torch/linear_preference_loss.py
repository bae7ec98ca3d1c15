"""Torch backend of ``linear_preference_loss``: the one-sweep preference head (docs/ONE_SWEEP.md).

The sweep over the pairs, their scalars s_b and the folding of long pairs' gradients are
backend-neutral (``tisdpo_kernels/_one_sweep.py``); this module gives it the torch chunk step
and GEMMs. Per chunk of rows, :func:`_chunk` forms the logits z = softcap(h Wᵀ + b) once (the
reference head's too) and computes logp, ref_logp and KL per token; its ``grad(c, kg)`` then
turns the same buffers into the per-logit vector

    e_t = c_t·(onehot(y_t) − p_t) + κ'_t·G_t          (× 1 − tanh² under a softcap)

with torch elementwise ops in the statistics dtype; :class:`_GEMMs` runs e·W and eᵀ·h.
Memory: a few C × V chunk buffers.
"""
from __future__ import annotations

import torch

from tisdpo_kernels._common import accumulate_mm
from tisdpo_kernels._one_sweep import SweepBackend, run_sweep
from tisdpo_kernels._torch.common import (
    HeadGrads, chunk_logits, chunk_size, log_softmax_stats_, logsumexp, softcap_grad_factor,
    stat_dtype,
)
from tisdpo_kernels.config import PairHeadOptions

__all__ = ["linear_preference_loss"]


def _gather(x, safe):
    return x.gather(1, safe[:, None]).squeeze(1)


def _chunk(h, weight, bias, ref_h, ref_weight, ref_bias, safe, opts: PairHeadOptions, sd,
           want_e, coef=None):
    """(logp, ref_logp | None, kl | None, e | grad | None) of one chunk
    (``SweepBackend.chunk``), from its logits formed once; ``grad(c, kg)`` forms e [C, V] in
    place of the softmax buffers (at once for ``coef``)."""
    cfg = opts.config
    z = chunk_logits(h, weight, bias, opts.softcap)                            # [C, V]
    cap = softcap_grad_factor(z, opts.softcap) if want_e else None
    kl = ref_logp = None
    if cfg.uses_kl:
        lp = log_softmax_stats_(z)[0]
        lq = log_softmax_stats_(chunk_logits(ref_h, ref_weight, ref_bias, opts.softcap))[0]
        lq = lq.to(sd)
        logp, ref_logp = _gather(lp, safe), _gather(lq, safe)
        if cfg.kl == "policy_ref":                                            # Σ p(lp − lq)
            diff = lq.neg_().add_(lp)
            p = lp.exp_()
            kl = (p * diff).sum(1)

            def kl_part(kg):
                return diff.sub_(kl[:, None]).mul_(p).mul_(kg[:, None])       # κ'·G
        else:                                                                 # Σ q(lq − lp)
            q = lq.exp()
            kl = (q * lq.sub_(lp)).sum(1)
            p = lp.exp_()

            def kl_part(kg):
                return q.neg_().add_(p).mul_(kg[:, None])                     # κ'·(p − q)

        def minus_cp(c, kg):
            return kl_part(kg).sub_(p.mul_(c[:, None]))                       # − c·p
    else:
        lse = logsumexp(z)
        logp = _gather(z, safe) - lse
        if ref_h is not None:
            zr = chunk_logits(ref_h, ref_weight, ref_bias, opts.softcap)
            ref_logp = (_gather(zr, safe) - logsumexp(zr)).to(sd)
            del zr

        def minus_cp(c, kg):
            return z.sub_(lse[:, None]).exp_().mul_(-c[:, None])              # − c·p

    def grad(c, kg):
        e = minus_cp(c, kg)
        e.scatter_add_(1, safe[:, None], c[:, None])                          # + c·onehot
        return e if cap is None else e.mul_(cap)

    if not want_e:
        return logp, ref_logp, kl, None
    return logp, ref_logp, kl, (grad if coef is None else grad(*coef))


class _GEMMs:
    """The sweep's gradient GEMMs (``SweepBackend.gemms``) with ``HeadGrads``' dtype rules:
    e·W in the input dtype (e cast to it, as eager autograd does); eᵀ·h summed in the
    statistics dtype, with e rounded to the input dtype and fp32 accumulation on a GPU with
    16-bit inputs."""

    def __init__(self, hidden, weight):
        self.weight = weight
        self.acc_dtype = stat_dtype(hidden.dtype)
        self.half_gpu = hidden.is_cuda and hidden.dtype in (torch.bfloat16, torch.float16)

    def e_w(self, e, out):
        HeadGrads.matmul_dh(out, e.to(self.weight.dtype), self.weight)
        return out

    def et_h(self, acc, e, h, dtype=None):
        et = e.T.to(h.dtype) if self.half_gpu else e.T
        if dtype is not None:                   # the whole d_weight in one product
            return (et @ (h if self.half_gpu else h.to(et.dtype))).to(dtype)
        return accumulate_mm(acc, et, h, self.acc_dtype)


_BACKEND = SweepBackend(chunk=_chunk, gemms=_GEMMs)


def linear_preference_loss(hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias,
                           ref_logp, weights, normalizer, opts: PairHeadOptions, *,
                           chunk_tokens: int | None = None):
    """(loss, logp, ref_logp, kl) for hidden [N, D], weight [V, D], targets [N] int64, the
    reference head (ref_hidden [N, D′], ref_weight [V, D′], ref_bias) or precomputed ref_logp
    [N] or neither, token weights [N] or None, normalizer a float64 0-d tensor or None, and
    ``opts.pair_rows`` (each row in at most one pair).

    loss: 0-d float32 (float64 for float64 inputs), differentiable in hidden, weight and bias
    (those ``opts.needs`` names); logp, ref_logp, kl: [N], detached, 0 where ignored.
    ``chunk_tokens`` overrides ``TISDPO_CHUNK_TOKENS``.
    """
    return run_sweep(_BACKEND, hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias,
                     ref_logp, weights, normalizer, opts,
                     chunk_size(chunk_tokens, weight.shape[0]))
