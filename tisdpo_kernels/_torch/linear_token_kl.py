"""Torch backend of ``linear_token_kl``: token-chunked, logits recomputed in the backward.

Per chunk of C tokens, with log p = log_softmax(softcap(H W^T + b)) for the policy and
log q the same for the (constant) reference head:

    policy_ref:  KL = Σ_v p_v (log p_v − log q_v)      G_v = p_v (log p_v − log q_v − KL)
    ref_policy:  KL = Σ_v q_v (log q_v − log p_v)      G_v = p_v − q_v

where G = d KL / d z (docs/ALGORITHMS.md §8). The backward's per-logit gradient is

    dz = g_kl · G + g_logp · (onehot(y) − p)

(times 1 − tanh² under a softcap). Everything is in log-softmax form, so probabilities that
underflow give 0 · finite = 0, never 0 · log 0. Saved for the backward: the inputs, each
head's log-softmax statistics (row max and log-sum) and the raw KL, each [N]. Each chunk's
work is a function whose [C, V] tensors die before the next chunk's are made: no pass
holds more than a few C × V tensors.
"""
from __future__ import annotations

import torch

from tisdpo_kernels._common import first_order
from tisdpo_kernels._torch.common import (
    HeadGrads, chunk_logits, chunk_size, chunks, kept_rows, log_softmax_, log_softmax_stats_,
    masked, no_autocast, softcap_grad_factor, stat_dtype, valid_and_safe,
)
from tisdpo_kernels.config import KLOptions

__all__ = ["linear_token_kl"]


def _chunk_fwd(h, weight, bias, ref_h, ref_weight, ref_bias, safe, opts: KLOptions, sd):
    """(kl, logp, ref_logp, m_p, s_p, m_q, s_q) [C] of one chunk; m/s are each head's row
    max and log-sum. Its [C, V] tensors die on return."""
    lp, m_p, s_p = log_softmax_stats_(chunk_logits(h, weight, bias, opts.softcap))
    lq, m_q, s_q = log_softmax_stats_(chunk_logits(ref_h, ref_weight, ref_bias, opts.softcap))
    lq = lq.to(sd)                                                            # [C, V] each
    logp = lp.gather(1, safe[:, None]).squeeze(1)
    ref_logp = lq.gather(1, safe[:, None]).squeeze(1)
    if opts.direction == "ref_policy":                                       # swap roles:
        lp, lq = lq, lp                                                       # KL(q‖p)
    diff = lq.neg_().add_(lp)                                                 # lp − lq
    kl = lp.exp_().mul_(diff).sum(1)                                          # Σ p·diff
    return kl, logp, ref_logp, m_p, s_p, m_q, s_q


def _chunk_dz(h, weight, bias, ref_h, ref_weight, ref_bias, safe, stats, kl, g_kl, g_logp,
              opts: KLOptions, sd):
    """d loss / d (pre-bias policy logits) [C, V] of one chunk: g_kl·G + g_logp·(onehot − p)."""
    m_p, s_p, m_q, s_q = stats
    lp = chunk_logits(h, weight, bias, opts.softcap)                          # [C, V]
    cap = softcap_grad_factor(lp, opts.softcap)
    lp = log_softmax_(lp, m_p, s_p)
    lq = log_softmax_(chunk_logits(ref_h, ref_weight, ref_bias, opts.softcap), m_q, s_q).to(sd)
    p = lp.exp()
    if opts.direction == "policy_ref":
        dz = lp.sub_(lq).sub_(kl[:, None]).mul_(p)                           # G
    else:
        dz = lq.exp_().neg_().add_(p)                                         # G = p − q
    del lp, lq
    dz.mul_(g_kl[:, None]).sub_(p.mul_(g_logp[:, None]))                     # − g_logp·p
    del p
    dz.scatter_add_(1, safe[:, None], g_logp[:, None])                       # + g_logp·onehot
    return dz if cap is None else dz.mul_(cap)


def linear_token_kl_fwd(hidden, weight, ref_hidden, ref_weight, targets, bias, ref_bias,
                 opts: KLOptions, chunk: int):
    """(kl, logp, ref_logp, stats, raw kl): the first three [N] are 0 where ignored; stats
    (policy max, log-sum, reference max, log-sum) and the raw KL are for the backward."""
    n = hidden.shape[0]
    sd, sd_ref = stat_dtype(hidden.dtype), stat_dtype(ref_hidden.dtype)
    dev = hidden.device
    valid, safe = valid_and_safe(targets, opts.ignore_index)
    kl, logp, ref_logp, m_p, s_p = (torch.empty(n, dtype=sd, device=dev) for _ in range(5))
    m_q, s_q = (torch.empty(n, dtype=sd_ref, device=dev) for _ in range(2))
    with no_autocast(dev):
        for s, e in chunks(n, chunk):
            kl[s:e], logp[s:e], ref_logp[s:e], m_p[s:e], s_p[s:e], m_q[s:e], s_q[s:e] = \
                _chunk_fwd(kept_rows(hidden[s:e], valid[s:e]), weight, bias,
                           kept_rows(ref_hidden[s:e], valid[s:e]), ref_weight, ref_bias,
                           safe[s:e], opts, sd)
    return (masked(kl, valid), masked(logp, valid), masked(ref_logp, valid),
            (m_p, s_p, m_q, s_q), kl)


def linear_token_kl_bwd(hidden, weight, ref_hidden, ref_weight, targets, bias, ref_bias, stats, kl,
                 g_kl, g_logp, opts: KLOptions, chunk: int, needs: tuple[bool, bool, bool]):
    """(d_hidden, d_weight, d_bias) for upstream grads g_kl, g_logp [N]; None where not needed."""
    sd = stat_dtype(hidden.dtype)
    valid, safe = valid_and_safe(targets, opts.ignore_index)
    g_kl = masked(g_kl.to(sd), valid)
    g_logp = masked(g_logp.to(sd), valid)
    grads = HeadGrads(hidden, weight, bias, *needs)
    with no_autocast(hidden.device):
        for s, e in chunks(hidden.shape[0], chunk):
            # ignored rows contribute exactly nothing, whatever their hidden states (even
            # NaN/inf): their dz rows are zeroed and their hidden rows never reach d_weight
            h = kept_rows(hidden[s:e], valid[s:e])
            dz = _chunk_dz(h, weight, bias, kept_rows(ref_hidden[s:e], valid[s:e]),
                           ref_weight, ref_bias, safe[s:e], tuple(t[s:e] for t in stats),
                           kl[s:e], g_kl[s:e], g_logp[s:e], opts, sd)
            grads.add(s, e, h, dz.masked_fill_(~valid[s:e, None], 0.0))
            del dz                                  # free it before the next chunk's is made
    return grads.finish()


class LinearTokenKLFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, ref_hidden, ref_weight, targets, bias, ref_bias,
                opts: KLOptions, chunk: int):
        kl, logp, ref_logp, stats, kl_raw = linear_token_kl_fwd(
            hidden, weight, ref_hidden, ref_weight, targets, bias, ref_bias, opts, chunk)
        ctx.save_for_backward(hidden, weight, ref_hidden, ref_weight, targets, bias, ref_bias,
                              kl_raw, *stats)
        ctx.opts, ctx.chunk = opts, chunk
        ctx.mark_non_differentiable(ref_logp)
        return kl, logp, ref_logp

    @staticmethod
    @first_order("linear_token_kl")
    def backward(ctx, g_kl, g_logp, _g_ref_logp):
        hidden, weight, ref_hidden, ref_weight, targets, bias, ref_bias, kl, *stats = \
            ctx.saved_tensors
        needs = ctx.needs_input_grad
        dh, dw, db = linear_token_kl_bwd(hidden, weight, ref_hidden, ref_weight, targets, bias,
                                  ref_bias, stats, kl, g_kl, g_logp, ctx.opts, ctx.chunk,
                                  (needs[0], needs[1], needs[5]))
        return dh, dw, None, None, None, db, None, None, None


def linear_token_kl(hidden, weight, ref_hidden, ref_weight, targets, bias, ref_bias,
                    opts: KLOptions, *, chunk_tokens: int | None = None):
    """(kl, logp, ref_logp), each [N], for policy hidden [N, D] / weight [V, D] and reference
    ref_hidden [N, D'] / ref_weight [V, D'] (constants), targets [N] int64.

    float32 outputs (float64 for float64 policy inputs), 0 where ignored; gradients reach
    hidden, weight and bias from kl and logp. ``chunk_tokens`` overrides
    ``TISDPO_CHUNK_TOKENS``.
    """
    return LinearTokenKLFunction.apply(hidden, weight, ref_hidden, ref_weight, targets, bias,
                                       ref_bias, opts, chunk_size(chunk_tokens, weight.shape[0]))
