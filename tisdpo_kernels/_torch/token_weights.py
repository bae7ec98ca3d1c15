"""Token weights in vectorised torch (docs/ALGORITHMS.md §2, §6.2): no loops, no host syncs.

Everything is computed in float64 (as the reference does) and returned in float32 (float64
for float64 inputs). The per-sequence rules (rank_based, binary) sort once by score and once,
stably, by sequence id, so each sequence becomes a contiguous run ordered by score with ties
in position order; run starts, lengths and dense run ids come from cumsum/cummax over the
sorted ids, so sequence ids may be any integers (unsorted, sparse) and nothing depends on
``num_seqs``.
"""
from __future__ import annotations

import torch

from tisdpo_kernels._common import per_sequence_weights, stat_dtype
from tisdpo_kernels.config import WeightParams

__all__ = ["token_weights", "contrastive_score"]

_F64 = torch.float64


def contrastive_score(lp_pos, lp_neg, mu, params: WeightParams):
    """(c, s): c = log π⁺ − log π⁻ (rounded when ``params.round_decimals``), s = μ·c, float64."""
    c = lp_pos.to(_F64) - lp_neg.to(_F64)
    if params.round_decimals is not None:
        c = torch.round(c, decimals=params.round_decimals)
    return c, mu.to(_F64) * c


def token_weights(lp_pos, lp_neg, mu, seq_ids, num_seqs: int, method: str,
                  params: WeightParams):
    """Weights [N] from log π⁺ (``lp_pos``), log π⁻ (``lp_neg``), μ = ±1 per token.

    seq_ids [N] int64, −1 outside every sequence (weight 0). ``num_seqs`` is part of the
    backend contract but not needed here. For ``cdpo``, lp_pos is the log-score log s_t.
    """
    del num_seqs
    out_dtype = stat_dtype(lp_pos.dtype)
    valid = seq_ids >= 0
    p = params
    if method == "cdpo":
        s = lp_pos.to(_F64).exp()
        chosen = torch.ones_like(s) if p.only_neg else s
        w = torch.where(mu > 0, chosen, 1 - s)
    else:
        c, s = contrastive_score(lp_pos, lp_neg, mu, p)
        if method == "exp_clamp":
            w = p.k * torch.exp(mu.to(_F64) * c.clamp(p.lower, p.upper))
        elif method == "threshold_and_scale":
            w = p.w_min + (s.clamp(p.clip_lower, p.clip_upper) - p.clip_lower) \
                / (p.clip_upper - p.clip_lower) * (p.w_max - p.w_min)
        elif method == "threshold":
            w = s.clamp(p.clip_lower, p.clip_upper)
        elif method == "origin":
            w = s
        elif method in ("rank_based", "binary"):
            w = per_sequence_weights(s, seq_ids, method, p)
        else:
            raise ValueError(f"unknown weight method {method!r}")
    return torch.where(valid, w, 0.0).to(out_dtype)
