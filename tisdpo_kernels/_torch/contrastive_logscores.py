"""Torch backend of ``contrastive_logscores`` under a logit softcap: forward only, chunked.

cDPO's score log s_t = log_softmax((1+b)·z⁺ − b·z⁻)[y_t] with z± = softcap(W±h± + b±). The
cap bends each model's logits before they are combined, so the two heads do not fold into one
linear head as they do without a cap (``ops.contrastive_logscores``). Per chunk of C tokens:
both heads' capped logits [C, V], their combination in place, its log-softmax at the target.
No gradient: the scores are offline token weights.
"""
from __future__ import annotations

import torch

from tisdpo_kernels._torch.common import (
    chunk_logits, chunks, kept_rows, logsumexp, masked, no_autocast, stat_dtype, valid_and_safe,
)

__all__ = ["contrastive_logscores"]


@torch.no_grad()
def contrastive_logscores(hidden_pos, weight_pos, hidden_neg, weight_neg, targets, bias_pos,
                          bias_neg, b: float, softcap: float, ignore_index: int, chunk: int):
    """log s [N] (0 where ignored) from hidden_pos/neg [N, D±], weight_pos/neg [V, D±]."""
    n = hidden_pos.shape[0]
    valid, safe = valid_and_safe(targets, ignore_index)
    out = torch.empty(n, dtype=stat_dtype(hidden_pos.dtype), device=hidden_pos.device)
    with no_autocast(hidden_pos.device):
        for s, e in chunks(n, chunk):
            v = valid[s:e]
            z = chunk_logits(kept_rows(hidden_pos[s:e], v), weight_pos, bias_pos, softcap)
            z.mul_(1 + b).sub_(chunk_logits(kept_rows(hidden_neg[s:e], v), weight_neg,
                                            bias_neg, softcap).to(z.dtype), alpha=b)
            out[s:e] = z.gather(1, safe[s:e, None]).squeeze(1) - logsumexp(z)
    return masked(out, valid)
