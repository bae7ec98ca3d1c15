"""Token weights in vectorised torch (algorithms.md §2, §6.2): no loops, no host syncs.

Everything is computed in float64 (as the reference does) and returned in float32 (float64
for float64 inputs). The per-sequence rules (rank_based, binary) sort once by score and once,
stably, by sequence id, so each sequence becomes a contiguous run ordered by score with ties
in position order; run starts, lengths and dense run ids come from cumsum/cummax over the
sorted ids, so sequence ids may be any integers (unsorted, sparse) and nothing depends on
``num_seqs``.
"""
from __future__ import annotations

import torch

from tisdpo_kernels.config import WeightParams

__all__ = ["token_weights", "contrastive_score", "per_sequence_weights"]

_F64 = torch.float64


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    return _F64 if dtype == _F64 else torch.float32


def contrastive_score(lp_pos, lp_neg, mu, params: WeightParams):
    """(c, s): c = log π⁺ − log π⁻ (rounded when ``params.round_decimals``), s = μ·c, float64."""
    c = lp_pos.to(_F64) - lp_neg.to(_F64)
    if params.round_decimals is not None:
        c = torch.round(c, decimals=params.round_decimals)
    return c, mu.to(_F64) * c


def per_sequence_weights(s, seq_ids, method: str, params: WeightParams):
    """rank_based / binary weights of scores ``s`` [N] float64 within each sequence.

    Tokens with seq_ids < 0 form one extra run whose values the caller discards.
    """
    n_tok = s.numel()
    if n_tok == 0:
        return torch.zeros_like(s)
    valid = seq_ids >= 0
    ids = torch.where(valid, seq_ids, -1)
    s = torch.where(valid, s, 0.0)  # garbage (NaN) outside sequences must not disturb the sort
    by_score = torch.argsort(s, stable=True)
    perm = by_score[torch.argsort(ids[by_score], stable=True)]  # sorted slot j -> token
    sid = ids[perm]
    pos = torch.arange(n_tok, device=s.device)
    new_run = torch.ones(n_tok, dtype=torch.bool, device=s.device)
    new_run[1:] = sid[1:] != sid[:-1]
    start = torch.cummax(torch.where(new_run, pos, 0), dim=0).values
    run = torch.cumsum(new_run, dim=0) - 1
    length = torch.zeros(n_tok, dtype=_F64, device=s.device).index_add_(
        0, run, torch.ones(n_tok, dtype=_F64, device=s.device))[run]
    rank = (pos - start).to(_F64)
    if method == "rank_based":
        # stable order: among ties the earlier position gets the lower rank; n = 1 -> middle
        frac = torch.where(length > 1, rank / (length - 1).clamp(min=1), 0.5)
        w_sorted = params.w_min + frac * (params.w_max - params.w_min)
    elif method == "binary":
        # 1 for the top ceil(n·p/100) scores (at least one); ties at the threshold all get 1
        k = torch.ceil(length * params.top_percent / 100.0).clamp(min=1)
        s_sorted = s[perm]
        thresh = s_sorted[start + (length - k).long()]
        w_sorted = (s_sorted >= thresh).to(_F64)
    else:
        raise ValueError(f"method must be rank_based or binary, got {method!r}")
    return torch.empty_like(s).scatter_(0, perm, w_sorted)


def token_weights(lp_pos, lp_neg, mu, seq_ids, num_seqs: int, method: str,
                  params: WeightParams):
    """Weights [N] from log π⁺ (``lp_pos``), log π⁻ (``lp_neg``), μ = ±1 per token.

    seq_ids [N] int64, −1 outside every sequence (weight 0). ``num_seqs`` is part of the
    backend contract but not needed here. For ``cdpo``, lp_pos is the log-score log s_t.
    """
    del num_seqs
    out_dtype = _out_dtype(lp_pos.dtype)
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
