"""The weighted preference loss in vectorised torch (docs/ALGORITHMS.md §8): no loops, no host syncs.

Per-token terms are reduced per sequence with one ``index_add`` into a [num_seqs + 1, C]
float64 buffer (the extra row collects tokens outside every sequence), gathered per pair,
and passed through the link; gradients come from autograd. All arithmetic is float64 (cheap:
O(tokens)); the loss and the metrics are returned in float32 (float64 for float64 inputs).
"""
from __future__ import annotations

import torch

from tisdpo_kernels._common import link_loss, normalizer_tensor, stat_dtype
from tisdpo_kernels.config import PreferenceConfig

__all__ = ["preference_loss", "preference_loss_pos", "link_loss", "pair_metrics"]

_F64 = torch.float64


def pair_metrics(cfg: PreferenceConfig, score_w, score_l, logps_w, logps_l, kl_w, kl_l, out_dtype):
    """TRL-named per-pair metrics (detached), computed in float64 and cast to ``out_dtype``."""
    chosen = (cfg.beta * score_w).detach()
    rejected = (cfg.beta * score_l).detach()
    out = {
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/margins": chosen - rejected,
        "rewards/accuracies": (chosen > rejected).to(chosen.dtype),
        "logps/chosen": logps_w.detach(),
        "logps/rejected": logps_l.detach(),
    }
    if kl_w is not None:
        out["kl/chosen"] = kl_w.detach()
        out["kl/rejected"] = kl_l.detach()
    return {k: v.to(out_dtype) for k, v in out.items()}


def preference_loss(lp, lr, w, kl, seq_ids, chosen_seq, rejected_seq, num_seqs: int,
                    cfg: PreferenceConfig, normalizer):
    """Packed: lp/lr/w/kl [N], seq_ids [N] (−1 = no sequence), pairs [P] -> (loss, metrics)."""
    out_dtype = stat_dtype(lp.dtype)
    device = lp.device
    norm = normalizer_tensor(normalizer, device)
    valid = seq_ids >= 0
    bucket = torch.where(valid, seq_ids, num_seqs)

    def f64(t):  # garbage outside sequences (even NaN) neither reaches the sums nor the grads
        return torch.where(valid, t.to(_F64), 0.0)

    lp64 = f64(lp)
    delta = lp64 if (cfg.reference_free or lr is None) else lp64 - f64(lr)
    w64 = None if w is None else f64(w)
    cols = [delta if w64 is None else w64 * delta, lp64, valid.to(_F64)]
    if cfg.uses_kl:
        k64 = f64(kl)
        cols.append(w64 * k64 if (cfg.kl_token_weighted and w64 is not None) else k64)
    seg = torch.zeros(num_seqs + 1, len(cols), dtype=_F64, device=device).index_add(
        0, bucket, torch.stack(cols, dim=1))
    sw, sl = seg[chosen_seq], seg[rejected_seq]
    n_w, n_l = sw[:, 2], sl[:, 2]
    if cfg.reduction == "mean":
        norm_w, norm_l = n_w.clamp(min=1), n_l.clamp(min=1)
    else:
        norm_w = norm_l = torch.ones((), dtype=_F64, device=device)
    a_w, a_l = sw[:, 0] / norm_w, sl[:, 0] / norm_l
    if cfg.uses_kl:
        k_w, k_l = sw[:, 3], sl[:, 3]
    else:
        k_w = k_l = torch.zeros_like(a_w)
    k_w_hat = k_w.detach() if cfg.kl_stop_grad_chosen else k_w
    z = a_w - a_l + cfg.kl_chosen_coef * k_w_hat + cfg.kl_rejected_coef * k_l - cfg.margin
    pair_valid = (n_w + n_l) > 0
    losses = torch.where(pair_valid, link_loss(z, cfg), 0.0)
    if norm is None:
        norm = pair_valid.sum().clamp(min=1).to(_F64)
    loss = (losses.sum() / norm).to(out_dtype)
    metrics = pair_metrics(cfg, a_w + cfg.kl_chosen_coef * k_w, a_l - cfg.kl_rejected_coef * k_l,
                           sw[:, 1] / norm_w, sl[:, 1] / norm_l,
                           k_w if cfg.uses_kl else None, k_l if cfg.uses_kl else None, out_dtype)
    return loss, metrics


def preference_loss_pos(logp, ref, w, mask, cfg: PreferenceConfig, normalizer):
    """cDPO's released-code granularity (docs/ALGORITHMS.md §6.2, §8 ``pos``), padded [2B, T].

    z_{b,t} = m^w ω^w Δ^w − m^l ω^l Δ^l, link per slot, mean over all B×T slots (or
    Σ / normalizer). No margin and no length normalisation, as in the reference.
    """
    out_dtype = stat_dtype(logp.dtype)
    norm = normalizer_tensor(normalizer, logp.device)
    m = mask.bool()

    def f64(t):
        return torch.where(m, t.to(_F64), 0.0)

    lp64 = f64(logp)
    delta = lp64 if (cfg.reference_free or ref is None) else lp64 - f64(ref)
    if w is not None:
        delta = f64(w) * delta
    half = logp.shape[0] // 2
    z = delta[:half] - delta[half:]
    loss_bt = link_loss(z, cfg)
    if norm is None:
        norm = torch.full((), float(max(loss_bt.numel(), 1)), dtype=_F64, device=logp.device)
    loss = (loss_bt.sum() / norm).to(out_dtype)
    scores = delta.sum(-1)
    logps = lp64.sum(-1)
    metrics = pair_metrics(cfg, scores[:half], scores[half:], logps[:half], logps[half:],
                           None, None, out_dtype)
    return loss, metrics
