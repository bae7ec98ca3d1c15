"""Torch backend of ``linear_preference_loss``: the one-sweep preference head (docs/ONE_SWEEP.md).

The sweep over the pairs, their scalars s_b and the folding of each pair's gradients are
backend-neutral (``tisdpo_kernels/_one_sweep.py``); this module gives it the torch chunk step.
Per chunk of rows, :func:`_chunk` forms the logits z = softcap(h Wᵀ + b) once (the reference
head's too), computes logp, ref_logp and KL per token and the per-logit vector

    e_t = c_t·(onehot(y_t) − p_t) + κ'_t·G_t          (× 1 − tanh² under a softcap)

in place of the softmax buffer, with torch elementwise ops in the statistics dtype; then
``HeadGrads`` runs the GEMMs e·W and eᵀ·h. Memory: a few C × V chunk buffers.
"""
from __future__ import annotations

from tisdpo_kernels._one_sweep import SweepBackend, run_sweep
from tisdpo_kernels._torch.common import (
    HeadGrads, chunk_logits, chunk_size, log_softmax_stats_, logsumexp, softcap_grad_factor,
)
from tisdpo_kernels.config import PairHeadOptions

__all__ = ["linear_preference_loss"]


def _gather(x, safe):
    return x.gather(1, safe[:, None]).squeeze(1)


def _chunk(h, weight, bias, ref_h, ref_weight, ref_bias, safe, c, kg, opts: PairHeadOptions,
           sd, want_e):
    """(logp, ref_logp | None, kl | None, e | None) [C] / [C, V] of one chunk, from its
    logits formed once; its other [C, V] buffers die on return."""
    cfg = opts.config
    z = chunk_logits(h, weight, bias, opts.softcap)                            # [C, V]
    cap = softcap_grad_factor(z, opts.softcap) if want_e else None
    kl = e = ref_logp = None
    if cfg.uses_kl:
        lp = log_softmax_stats_(z)[0]
        lq = log_softmax_stats_(chunk_logits(ref_h, ref_weight, ref_bias, opts.softcap))[0]
        lq = lq.to(sd)
        logp, ref_logp = _gather(lp, safe), _gather(lq, safe)
        if cfg.kl == "policy_ref":                                            # Σ p(lp − lq)
            diff = lq.neg_().add_(lp)
            p = lp.exp_()
            kl = (p * diff).sum(1)
            if want_e:
                e = diff.sub_(kl[:, None]).mul_(p).mul_(kg[:, None])         # κ'·G
        else:                                                                 # Σ q(lq − lp)
            q = lq.exp()
            kl = (q * lq.sub_(lp)).sum(1)
            p = lp.exp_()
            if want_e:
                e = q.neg_().add_(p).mul_(kg[:, None])                        # κ'·(p − q)
        if want_e:
            e.sub_(p.mul_(c[:, None]))                                        # − c·p
    else:
        lse = logsumexp(z)
        logp = _gather(z, safe) - lse
        if ref_h is not None:
            zr = chunk_logits(ref_h, ref_weight, ref_bias, opts.softcap)
            ref_logp = (_gather(zr, safe) - logsumexp(zr)).to(sd)
            del zr
        if want_e:
            e = z.sub_(lse[:, None]).exp_().mul_(-c[:, None])                 # − c·p
    if e is not None:
        e.scatter_add_(1, safe[:, None], c[:, None])                          # + c·onehot
        if cap is not None:
            e.mul_(cap)
    return logp, ref_logp, kl, e


_BACKEND = SweepBackend(chunk=_chunk, head_grads=HeadGrads)


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
