"""The oracle: plain PyTorch that materialises logits and defines the math.

Works in any dtype (float64 included) on any device and supports autograd. Written for
clarity, not speed: per-sequence loops are fine here. Fused code never imports this file.

Dtype convention (shared by every backend): logits are formed in the input dtype (as an
eager ``hidden @ weight.T`` would), then every softmax statistic is computed in float32
(float64 for float64 inputs). Per-token outputs are float32 (float64 for float64 inputs).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tisdpo_kernels._common import stat_dtype
from tisdpo_kernels.config import PreferenceConfig, WeightParams

__all__ = [
    "linear_logprobs", "linear_token_kl", "contrastive_logscores", "token_weights",
    "preference_loss", "linear_preference_loss", "stat_dtype",
]


def _logits(hidden, weight, bias, softcap, valid):
    """softcap(hidden @ weight.T + bias), from hidden with the ignored rows set to 0: their
    logits are never used, and a NaN/inf there must not reach another row through a GEMM
    kernel that reads past a row's end (some CPU bfloat16 kernels do)."""
    hidden = torch.where(valid[..., None], hidden, torch.zeros((), dtype=hidden.dtype,
                                                               device=hidden.device))
    z = hidden @ weight.T
    if bias is not None:
        z = z + bias
    z = z.to(stat_dtype(hidden.dtype))
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def linear_logprobs(hidden, weight, targets, *, bias=None, ignore_index=-100, softcap=None,
                    return_lse=False):
    """log p(target) per token: ``log_softmax(softcap(hidden @ weight.T + bias))[target]``.

    hidden [..., D], weight [V, D], targets [...] (already shifted). Ignored tokens give 0 for
    logp and lse, and no gradient.
    """
    valid = targets != ignore_index
    z = _logits(hidden, weight, bias, softcap, valid)
    lse = torch.logsumexp(z, dim=-1)
    safe = torch.where(valid, targets, 0).long()
    logp = z.gather(-1, safe.unsqueeze(-1)).squeeze(-1) - lse
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    logp = torch.where(valid, logp, zero)
    lse = torch.where(valid, lse, zero)
    return (logp, lse) if return_lse else logp


def linear_token_kl(hidden, weight, ref_hidden, ref_weight, targets, *, bias=None, ref_bias=None,
                    direction="policy_ref", ignore_index=-100, softcap=None):
    """Per-token full-vocabulary KL between the policy head and the reference head.

    direction "policy_ref": Σ_v p_v (log p_v − log q_v) (TIS-DPO's η); "ref_policy":
    Σ_v q_v (log q_v − log p_v) (TDPO). p is the policy softmax, q the reference softmax;
    ``softcap`` applies to both heads. Returns (kl, logp, ref_logp), each 0 where ignored;
    gradients reach the policy inputs only.
    """
    valid = targets != ignore_index
    logp_all = torch.log_softmax(_logits(hidden, weight, bias, softcap, valid), dim=-1)
    with torch.no_grad():
        logq_all = torch.log_softmax(
            _logits(ref_hidden, ref_weight, ref_bias, softcap, valid), dim=-1).to(logp_all.dtype)
    if direction == "policy_ref":
        kl = (logp_all.exp() * (logp_all - logq_all)).sum(-1)
    elif direction == "ref_policy":
        kl = (logq_all.exp() * (logq_all - logp_all)).sum(-1)
    else:
        raise ValueError(f"direction must be 'policy_ref' or 'ref_policy', got {direction!r}")
    safe = torch.where(valid, targets, 0).long().unsqueeze(-1)
    logp = logp_all.gather(-1, safe).squeeze(-1)
    ref_logp = logq_all.gather(-1, safe).squeeze(-1)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    return tuple(torch.where(valid, x, zero) for x in (kl, logp, ref_logp))


def contrastive_logscores(hidden_pos, weight_pos, hidden_neg, weight_neg, targets, *, b=1.0,
                          bias_pos=None, bias_neg=None, ignore_index=-100, softcap=None):
    """cDPO's log s_t = log_softmax((1+b)·z⁺ − b·z⁻)[target] (docs/ALGORITHMS.md §6.2), z±
    each model's own (softcapped) logits."""
    valid = targets != ignore_index
    z = (1 + b) * _logits(hidden_pos, weight_pos, bias_pos, softcap, valid) \
        - b * _logits(hidden_neg, weight_neg, bias_neg, softcap, valid)
    safe = torch.where(valid, targets, 0).long().unsqueeze(-1)
    out = torch.log_softmax(z, dim=-1).gather(-1, safe).squeeze(-1)
    return torch.where(valid, out, torch.zeros((), dtype=out.dtype, device=out.device))


# ----------------------------------------------------------------------------- token weights

def _as_sequences(x, seq_ids, mask):
    """Yield (flat index tensor) per sequence, for 1-D x with seq_ids or 2-D x with a mask."""
    if x.dim() == 2:
        m = torch.ones_like(x, dtype=torch.bool) if mask is None else mask.bool()
        for row in range(x.shape[0]):
            yield row * x.shape[1] + torch.nonzero(m[row]).flatten()
        return
    if seq_ids is None:
        idx = torch.arange(x.numel(), device=x.device)
        yield idx if mask is None else idx[mask.flatten().bool()]
        return
    keep = torch.ones_like(seq_ids, dtype=torch.bool) if mask is None else mask.bool()
    for s in torch.unique(seq_ids[seq_ids >= 0]).tolist():
        # a masked-out token is outside its sequence: it takes no part in ranks/thresholds
        yield torch.nonzero((seq_ids == s) & keep).flatten()


def _side_sign(side, shape, device):
    if isinstance(side, str):
        if side not in ("chosen", "rejected"):
            raise ValueError(f"side must be 'chosen', 'rejected' or a bool tensor, got {side!r}")
        return torch.full(shape, 1.0 if side == "chosen" else -1.0, device=device,
                          dtype=torch.float64)
    return torch.where(side.bool(), 1.0, -1.0).to(torch.float64).expand(shape)


def token_weights(logp_pos, logp_neg=None, *, side, method="exp_clamp", params=None,
                  seq_ids=None, mask=None):
    """Per-token weights from contrastive log-probs (docs/ALGORITHMS.md §2, §6.2).

    logp_pos, logp_neg: log π⁺(y_t) and log π⁻(y_t), [N] packed (with ``seq_ids`` [N], −1 for
    tokens outside any response) or [B, T] padded (each row one sequence, with ``mask``).
    For method "cdpo", logp_pos is cDPO's log-score log s_t and logp_neg is unused.
    side: "chosen" (μ = +1), "rejected" (μ = −1), or a bool tensor (True = chosen) per token.
    Tokens outside every sequence (mask False / seq_id −1) get weight 0.
    """
    p = params or WeightParams()
    out_dtype = stat_dtype(logp_pos.dtype)
    lp = logp_pos.to(torch.float64)
    mu = _side_sign(side, lp.shape, lp.device)
    valid = torch.ones_like(lp, dtype=torch.bool)
    if mask is not None:
        valid &= mask.bool()
    if seq_ids is not None:
        valid &= seq_ids >= 0

    if method == "cdpo":
        s = lp.exp()
        w = torch.where(mu > 0, torch.ones_like(s) if p.only_neg else s, 1 - s)
        return torch.where(valid, w, 0.0).to(out_dtype)

    c = lp - logp_neg.to(torch.float64)
    if p.round_decimals is not None:
        c = torch.round(c, decimals=p.round_decimals)
    s = mu * c
    if method == "exp_clamp":
        w = p.k * torch.exp(mu * c.clamp(p.lower, p.upper))
    elif method == "threshold_and_scale":
        w = p.w_min + (s.clamp(p.clip_lower, p.clip_upper) - p.clip_lower) \
            / (p.clip_upper - p.clip_lower) * (p.w_max - p.w_min)
    elif method == "threshold":
        w = s.clamp(p.clip_lower, p.clip_upper)
    elif method == "origin":
        w = s.clone()
    elif method in ("rank_based", "binary"):
        w = torch.zeros_like(s)
        flat_s, flat_w = s.reshape(-1), w.view(-1)
        for idx in _as_sequences(s, seq_ids, mask):
            vals = flat_s[idx].tolist()
            n = len(vals)
            if n == 0:
                continue
            if method == "rank_based":
                # stable sort: among ties the earlier position gets the lower rank
                order = sorted(range(n), key=lambda i: vals[i])
                for rank, i in enumerate(order):
                    frac = 0.5 if n == 1 else rank / (n - 1)
                    flat_w[idx[i]] = p.w_min + frac * (p.w_max - p.w_min)
            else:
                k = max(1, math.ceil(n * p.top_percent / 100.0))
                threshold = sorted(vals, reverse=True)[k - 1]
                for i in range(n):
                    flat_w[idx[i]] = 1.0 if vals[i] >= threshold else 0.0
    else:
        raise ValueError(f"unknown weight method {method!r}")
    return torch.where(valid, w, 0.0).to(out_dtype)


# ----------------------------------------------------------------------------- preference loss

def _link(z, cfg: PreferenceConfig):
    b, e = cfg.beta, cfg.epsilon
    if cfg.link == "sigmoid":
        return -F.logsigmoid(b * z)
    if cfg.link == "conservative":
        return -(1 - e) * F.logsigmoid(b * z) - e * F.logsigmoid(-b * z)
    if cfg.link == "robust":
        return (-(1 - e) * F.logsigmoid(b * z) + e * F.logsigmoid(-b * z)) / (1 - 2 * e)
    if cfg.link == "ipo":
        return (z - 1 / (2 * b)) ** 2
    if cfg.link == "hinge":
        return torch.relu(1 - b * z)
    raise ValueError(f"unknown link {cfg.link!r}")


def preference_loss(logp, ref_logp=None, weights=None, *, config: PreferenceConfig, mask=None,
                    seq_ids=None, chosen_seq=None, rejected_seq=None, kl=None, normalizer=None):
    """The unified weighted preference loss (docs/ALGORITHMS.md §8) and per-pair metrics.

    Padded layout: logp [2B, T] with chosen rows first, ``mask`` [2B, T] (response tokens),
    pair b = (row b, row b + B). Packed layout: logp [N], ``seq_ids`` [N] (−1 outside every
    response), pairs (``chosen_seq[b]``, ``rejected_seq[b]``). ref_logp, weights (ω, default 1)
    and kl (per-token KL k_t, needed when config.uses_kl) have logp's shape.
    Returns (loss, metrics): loss = Σ_b ℓ_b / normalizer, where normalizer defaults to the
    number of pairs with at least one response token (at least 1, so an all-ignored batch
    gives 0). metrics hold per-pair tensors under TRL's names.
    """
    cfg = config
    sd = stat_dtype(logp.dtype)
    lp = logp.to(sd)
    lr = torch.zeros_like(lp) if (cfg.reference_free or ref_logp is None) else ref_logp.to(sd)
    if not cfg.reference_free and ref_logp is None:
        raise ValueError("ref_logp is required unless config.reference_free")
    w = torch.ones_like(lp) if weights is None else weights.to(sd)

    if cfg.granularity == "pos":
        half = lp.shape[0] // 2
        m = mask.bool()
        # masked slots read as 0 before any product, so not even their gradient sees them
        lp, lr, w = (torch.where(m, x, 0.0) for x in (lp, lr, w))
        delta = w * (lp - lr)
        z = delta[:half] - delta[half:]
        loss_bt = _link(z, cfg)
        loss = loss_bt.mean() if normalizer is None else loss_bt.sum() / normalizer
        return loss, _pair_metrics(cfg, (delta[:half].sum(-1), delta[half:].sum(-1)),
                                   (lp[:half].sum(-1), lp[half:].sum(-1)), None)

    if lp.dim() == 2:
        rows, _ = lp.shape
        half = rows // 2
        m = torch.ones_like(lp, dtype=torch.bool) if mask is None else mask.bool()
        seq_ids = torch.where(m, torch.arange(rows, device=lp.device).unsqueeze(1), -1)
        chosen_seq = torch.arange(half, device=lp.device)
        rejected_seq = torch.arange(half, rows, device=lp.device)
        lp, lr, w = lp.flatten(), lr.flatten(), w.flatten()
        kl = None if kl is None else kl.flatten()
        seq_ids = seq_ids.flatten()

    def side(seq):
        sel = seq_ids == seq
        n = sel.sum().to(sd)
        norm = n.clamp(min=1) if cfg.reduction == "mean" else torch.ones((), dtype=sd, device=lp.device)
        a = (w[sel] * (lp[sel] - lr[sel])).sum() / norm
        logps = lp[sel].sum() / norm
        k = torch.zeros((), dtype=sd, device=lp.device)
        if cfg.uses_kl:
            nu = w[sel] if cfg.kl_token_weighted else torch.ones_like(w[sel])
            k = (nu * kl.to(sd)[sel]).sum()
        return a, k, logps, n

    z_all, loss_all, valid_all, parts = [], [], [], []
    for cs, rs in zip(chosen_seq.tolist(), rejected_seq.tolist()):
        aw, kw, lw, nw = side(cs)
        al, kl_, ll, nl = side(rs)
        kw_hat = kw.detach() if cfg.kl_stop_grad_chosen else kw
        z = aw - al + cfg.kl_chosen_coef * kw_hat + cfg.kl_rejected_coef * kl_ - cfg.margin
        z_all.append(z)
        loss_all.append(_link(z, cfg))
        valid_all.append((nw + nl) > 0)
        parts.append((aw + cfg.kl_chosen_coef * kw, al - cfg.kl_rejected_coef * kl_, lw, ll,
                      kw, kl_))
    def stack(xs):      # no pairs: an empty per-pair tensor, still in lp's graph (loss 0)
        return torch.stack(xs) if xs else (lp.to(sd) * 0).sum().reshape(1)[:0]

    losses = stack(loss_all)
    valid = stack(valid_all).bool()
    losses = torch.where(valid, losses, torch.zeros((), dtype=sd, device=losses.device))
    if normalizer is None:
        normalizer = valid.sum().clamp(min=1)
    loss = losses.sum() / normalizer
    cols = [stack([p[i] for p in parts]) for i in range(6)]
    return loss, _pair_metrics(cfg, (cols[0], cols[1]), (cols[2], cols[3]),
                               (cols[4], cols[5]) if cfg.uses_kl else None)


def linear_preference_loss(hidden, weight, targets, *, config: PreferenceConfig, bias=None,
                           ref_hidden=None, ref_weight=None, ref_bias=None, ref_logp=None,
                           weights=None, pair_rows, normalizer=None, ignore_index=-100,
                           softcap=None):
    """The preference loss from hidden states, composed from the materialising ops above:
    (loss, logp, ref_logp, kl), the last three detached. ``pair_rows``: per pair, the
    (chosen, rejected) row ranges of the flattened tokens (``ops._pair_rows``); tokens in no
    pair count nowhere."""
    d = hidden.shape[-1]
    shape = targets.shape
    y = targets.reshape(-1)
    seq_ids = torch.full_like(y, -1)
    chosen, rejected = [], []
    for b, (ch, rj) in enumerate(pair_rows):
        chosen.append(2 * b)
        rejected.append(2 * b + 1)
        for sid, side in ((2 * b, ch), (2 * b + 1, rj)):
            for start, end in side:
                seq_ids[start:end] = sid
    y = torch.where((seq_ids >= 0) & (y != ignore_index), y, ignore_index)
    seq_ids = torch.where(y != ignore_index, seq_ids, -1)
    h = hidden.reshape(-1, d)
    kl = lr = None
    if config.uses_kl:
        kl, lp, lr = linear_token_kl(h, weight, ref_hidden.reshape(-1, ref_hidden.shape[-1]),
                                     ref_weight, y, bias=bias, ref_bias=ref_bias,
                                     direction=config.kl, ignore_index=ignore_index,
                                     softcap=softcap)
    else:
        lp = linear_logprobs(h, weight, y, bias=bias, ignore_index=ignore_index, softcap=softcap)
        if ref_hidden is not None:
            with torch.no_grad():
                lr = linear_logprobs(ref_hidden.reshape(-1, ref_hidden.shape[-1]), ref_weight, y,
                                     bias=ref_bias, ignore_index=ignore_index, softcap=softcap)
        elif ref_logp is not None:
            lr = torch.where(y != ignore_index, ref_logp.reshape(-1).to(lp.dtype), 0.0)
    w = None if weights is None else torch.where(y != ignore_index,
                                                 weights.reshape(-1).to(lp.dtype), 0.0)
    dev = lp.device
    loss, _ = preference_loss(lp, lr, w, config=config, seq_ids=seq_ids,
                              chosen_seq=torch.tensor(chosen, dtype=torch.long, device=dev),
                              rejected_seq=torch.tensor(rejected, dtype=torch.long, device=dev),
                              kl=kl, normalizer=normalizer)
    out = [None if t is None else t.detach().view(shape) for t in (lp, lr, kl)]
    return (loss, *out)


def _pair_metrics(cfg, scores, logps, kls):
    chosen = (cfg.beta * scores[0]).detach()
    rejected = (cfg.beta * scores[1]).detach()
    out = {
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/margins": chosen - rejected,
        "rewards/accuracies": (chosen > rejected).to(chosen.dtype),
        "logps/chosen": logps[0].detach(),
        "logps/rejected": logps[1].detach(),
    }
    if kls is not None:
        out["kl/chosen"] = kls[0].detach()
        out["kl/rejected"] = kls[1].detach()
    return out
