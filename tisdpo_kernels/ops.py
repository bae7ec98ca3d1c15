"""Public ops: validate, pick the backend, reshape, dispatch.

Backends receive canonical, validated inputs and return canonical outputs:

- head ops: hidden [N, D] (2-D, may be a strided view), weight [V, D], targets [N] int64;
  options as a frozen dataclass (``HeadOptions`` / ``KLOptions``).
- token_weights: flat [N] float tensors, ``mu`` [N] (+1 chosen, −1 rejected), ``seq_ids``
  [N] int64 (−1 = outside every sequence), ``num_seqs`` an upper bound on sequence ids.
- linear_preference_loss: hidden [N, D], targets [N], per-token tensors [N], and the pairs as
  host row ranges (``PairHeadOptions.pair_rows``).
- preference_loss: the packed form (flat [N] tensors, ``seq_ids``, pair index tensors
  ``chosen_seq``/``rejected_seq`` [P], ``num_seqs``); the padded form is converted here.
"""
from __future__ import annotations

import torch

from tisdpo_kernels import validate as V
from tisdpo_kernels._common import normalizer_tensor
from tisdpo_kernels._impl import Impl, resolve_impl
from tisdpo_kernels.config import (
    WEIGHT_METHODS, HeadOptions, KLOptions, PairHeadOptions, PreferenceConfig, WeightParams,
)
from tisdpo_kernels.strategy import one_sweep_unsupported

__all__ = ["linear_logprobs", "linear_token_kl", "contrastive_logscores", "token_weights",
           "preference_loss", "linear_preference_loss"]


def linear_logprobs(hidden, weight, targets, *, bias=None, ignore_index=-100, softcap=None,
                    return_lse=False, filter_eps=None, impl="auto"):
    """Per-token log-probabilities of ``targets`` under the LM head, without logits.

    hidden [..., D], weight [V, D], targets [...] (already shifted: target i is predicted
    from hidden i), optional bias [V] and logit softcap (``softcap·tanh(z/softcap)``).
    Returns logp with the shape of targets (float32; float64 for float64 inputs), 0 where
    ``targets == ignore_index``; with ``return_lse`` also the per-token logsumexp (0 where
    ignored). Differentiable in hidden, weight and bias.

        logp_t = z_t[y_t] − logsumexp(z_t),  z_t = softcap(W h_t + b)

    filter_eps: None (default: exact gradients) or ε ∈ (0, 1), opt-in gradient filtering:
    per chunk of rows the backward leaves out of its gradient GEMMs every vocabulary column
    that no row of the chunk targets and whose probability is below ε in every row of the
    chunk. Each dropped term is below ε·|∂loss/∂lse_t − ∂loss/∂logp_t| (docs/FILTERING.md).
    The forward is exact either way.

    impl: "auto" (triton on CUDA, torch on CPU), "triton", "torch" or "reference" (the exact
    oracle: it refuses filter_eps).
    """
    V.check_linear_inputs(hidden, weight, targets, bias)
    ignore_index = V.check_int("ignore_index", ignore_index)
    softcap = V.check_softcap(softcap)
    filter_eps = V.check_filter_eps(filter_eps)
    which = resolve_impl(impl, hidden.device, op="linear_logprobs")
    V.check_targets("targets", targets, weight.shape[0], ignore_index)
    V.require(filter_eps is None or which is not Impl.REFERENCE,
              f"linear_logprobs: filter_eps={filter_eps!r} needs impl 'torch' or 'triton'; "
              f"impl='reference' is the exact oracle")
    if which is Impl.REFERENCE:
        from tisdpo_kernels import reference
        return reference.linear_logprobs(hidden, weight, targets, bias=bias,
                                         ignore_index=ignore_index, softcap=softcap,
                                         return_lse=return_lse)
    shape = targets.shape
    opts = HeadOptions(ignore_index=ignore_index, softcap=softcap, return_lse=return_lse,
                       filter_eps=None if filter_eps is None else float(filter_eps))
    if which is Impl.TRITON:
        from tisdpo_kernels._triton.linear_logprobs import linear_logprobs as run
    else:
        from tisdpo_kernels._torch.linear_logprobs import linear_logprobs as run
    logp, lse = run(hidden.reshape(-1, hidden.shape[-1]), weight,
                    _saveable(targets.reshape(-1).long()), bias, opts)
    logp = logp.view(shape)
    return (logp, lse.view(shape)) if return_lse else logp


def linear_token_kl(hidden, weight, ref_hidden, ref_weight, targets, *, bias=None,
                    ref_bias=None, direction="policy_ref", ignore_index=-100, softcap=None,
                    impl="auto"):
    """Per-token full-vocabulary KL between a policy head and a reference head, no logits.

    hidden [..., D] with weight [V, D] (policy), ref_hidden [..., D′] with ref_weight [V, D′]
    (reference, treated as constant), targets [...]. direction "policy_ref" gives
    Σ_v p_v(log p_v − log q_v) (TIS-DPO's η); "ref_policy" gives Σ_v q_v(log q_v − log p_v)
    (TDPO). softcap applies to both heads. Returns (kl, logp, ref_logp), each with the shape
    of targets and 0 where ignored; gradients reach hidden, weight and bias only.
    """
    V.check_linear_inputs(hidden, weight, targets, bias)
    V.check_linear_inputs(ref_hidden, ref_weight, targets, ref_bias, prefix="ref_")
    V.require(ref_weight.shape[0] == weight.shape[0],
              f"ref_weight has V={ref_weight.shape[0]} but weight has V={weight.shape[0]}")
    V.require(direction in ("policy_ref", "ref_policy"),
              f"direction must be 'policy_ref' or 'ref_policy', got {direction!r}")
    ignore_index = V.check_int("ignore_index", ignore_index)
    softcap = V.check_softcap(softcap)
    which = resolve_impl(impl, hidden.device, op="linear_token_kl")
    V.check_targets("targets", targets, weight.shape[0], ignore_index)
    if which is Impl.REFERENCE:
        from tisdpo_kernels import reference
        return reference.linear_token_kl(hidden, weight, ref_hidden, ref_weight, targets,
                                         bias=bias, ref_bias=ref_bias, direction=direction,
                                         ignore_index=ignore_index, softcap=softcap)
    shape = targets.shape
    opts = KLOptions(direction=direction, ignore_index=ignore_index, softcap=softcap)
    if which is Impl.TRITON:
        from tisdpo_kernels._triton.linear_token_kl import linear_token_kl as run
    else:
        from tisdpo_kernels._torch.linear_token_kl import linear_token_kl as run
    outs = run(
        hidden.reshape(-1, hidden.shape[-1]), weight,
        _saveable(ref_hidden.reshape(-1, ref_hidden.shape[-1]).detach()),
        _saveable(ref_weight.detach()), _saveable(targets.reshape(-1).long()), bias,
        None if ref_bias is None else _saveable(ref_bias.detach()), opts)
    return tuple(o.view(shape) for o in outs)


def contrastive_logscores(hidden_pos, weight_pos, hidden_neg, weight_neg, targets, *, b=1.0,
                          bias_pos=None, bias_neg=None, ignore_index=-100, softcap=None,
                          impl="auto"):
    """cDPO's per-token log s_t = log_softmax((1+b)·z⁺ − b·z⁻)[y_t], without logits, where
    z± = softcap(W±h± + b±) are each model's own logits (``softcap`` as both models apply it).

    Without a softcap, (1+b)·W⁺h⁺ − b·W⁻h⁻ = [W⁺ W⁻]·[(1+b)h⁺; −b·h⁻]: this is
    ``linear_logprobs`` on the concatenated heads (a [V, D⁺+D⁻] copy of the weights; meant for
    offline passes), on any backend. With one, the cap bends each head's logits before they
    are combined: the torch backend's chunked forward computes both (``impl`` "auto" or
    "torch"; no Triton kernel), without a gradient (the scores are offline weights).
    """
    V.check_linear_inputs(hidden_pos, weight_pos, targets, bias_pos, suffix="_pos")
    V.check_linear_inputs(hidden_neg, weight_neg, targets, bias_neg, suffix="_neg")
    V.require(weight_neg.shape[0] == weight_pos.shape[0],
              f"weight_neg has V={weight_neg.shape[0]} but weight_pos has "
              f"V={weight_pos.shape[0]}: the two models must share one vocabulary")
    ignore_index = V.check_int("ignore_index", ignore_index)
    b = V.check_scalar("b", b)
    softcap = V.check_softcap(softcap)
    if softcap is not None:
        return _capped_contrastive_logscores(hidden_pos, weight_pos, hidden_neg, weight_neg,
                                             targets, b, bias_pos, bias_neg, ignore_index,
                                             softcap, impl)
    hidden = torch.cat([(1 + b) * hidden_pos, -b * hidden_neg], dim=-1)
    weight = torch.cat([weight_pos, weight_neg.to(weight_pos.dtype)], dim=-1)
    bias = None
    if bias_pos is not None or bias_neg is not None:
        zeros = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
        bias = (1 + b) * (zeros if bias_pos is None else bias_pos) \
            - b * (zeros if bias_neg is None else bias_neg)
    return linear_logprobs(hidden.to(weight.dtype), weight, targets, bias=bias,
                           ignore_index=ignore_index, impl=impl)


def _capped_contrastive_logscores(hidden_pos, weight_pos, hidden_neg, weight_neg, targets, b,
                                  bias_pos, bias_neg, ignore_index, softcap, impl):
    which = resolve_impl(impl, hidden_pos.device, op="contrastive_logscores")
    if which is Impl.REFERENCE:
        from tisdpo_kernels import reference
        return reference.contrastive_logscores(hidden_pos, weight_pos, hidden_neg, weight_neg,
                                               targets, b=b, bias_pos=bias_pos,
                                               bias_neg=bias_neg, ignore_index=ignore_index,
                                               softcap=softcap)
    V.require(which is Impl.TORCH or impl == "auto",
              f"contrastive_logscores with a softcap has no Triton kernel: use impl='torch' "
              f"or 'auto', got impl={impl!r}")
    from tisdpo_kernels._common import chunk_size
    from tisdpo_kernels._torch.contrastive_logscores import contrastive_logscores as run

    d_pos, d_neg = hidden_pos.shape[-1], hidden_neg.shape[-1]
    out = run(hidden_pos.reshape(-1, d_pos), weight_pos, hidden_neg.reshape(-1, d_neg),
              weight_neg, targets.reshape(-1).long(), bias_pos, bias_neg, b, softcap,
              ignore_index, chunk_size(None, weight_pos.shape[0]))
    return out.view(targets.shape)


def _segments_from(x, seq_ids, mask, *, name, num_seqs=None):
    """(flat seq_ids [N], num_seqs bound) for a [N] packed or [B, T] padded input; a packed
    input's bound is ``num_seqs`` when given (sequences may be empty), else N."""
    if x.dim() == 2:
        V.require(seq_ids is None, f"seq_ids is for a packed [N] {name}; a padded [B, T] one "
                  f"takes mask (each row one sequence)")
        if mask is not None:
            V.require(tuple(mask.shape) == tuple(x.shape),
                      f"mask shape {tuple(mask.shape)} must equal {name} shape {tuple(x.shape)}")
        rows = torch.arange(x.shape[0], device=x.device).unsqueeze(1).expand_as(x)
        ids = rows if mask is None else torch.where(mask.bool(), rows, -1)
        return ids.reshape(-1), x.shape[0]
    V.require(x.dim() == 1, f"{name} must be [N] (packed) or [B, T] (padded), got shape "
              f"{tuple(x.shape)}")
    if seq_ids is None:
        ids = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        if mask is not None:
            V.require(tuple(mask.shape) == tuple(x.shape),
                      f"mask shape {tuple(mask.shape)} must equal {name} shape {tuple(x.shape)}")
            ids = torch.where(mask.bool(), ids, -1)
        return ids, 1
    V.check_index("seq_ids", seq_ids)
    V.require(tuple(seq_ids.shape) == tuple(x.shape),
              f"seq_ids shape {tuple(seq_ids.shape)} must equal {name} shape {tuple(x.shape)} "
              f"(one sequence id per packed token)")
    ids = seq_ids.long()
    if mask is not None:
        ids = torch.where(mask.bool(), ids, -1)
    return ids, max(x.shape[0], 1) if num_seqs is None else num_seqs


def token_weights(logp_pos, logp_neg=None, *, side, method="exp_clamp", params=None,
                  seq_ids=None, mask=None, impl="auto"):
    """Per-token importance weights from contrastive log-probs (docs/ALGORITHMS.md §2, §6.2).

    logp_pos / logp_neg: log π⁺(y_t) and log π⁻(y_t), either [N] packed with ``seq_ids`` [N]
    (−1 outside every response; without it the [N] tokens are one sequence, which the
    per-sequence methods rank_based and binary then rank as a whole) or
    [B, T] padded with ``mask`` [B, T] (each row one sequence). side: "chosen" (μ = +1),
    "rejected" (μ = −1) or a bool tensor of logp's shape (True = chosen). method: exp_clamp
    (paper), rank_based, threshold_and_scale, threshold, binary, origin (official code), or
    cdpo (logp_pos is cDPO's log-score, logp_neg unused). Returns weights of logp's shape
    (0 outside every sequence); constants, no gradient.

    Every kept score (logp_pos, and logp_neg unless cdpo, inside a sequence) must be finite:
    a NaN would otherwise rank or clamp to a finite, meaningless weight. A non-finite one is
    a ValueError naming the argument (on CUDA an asynchronous device assertion, no host sync;
    ``TISDPO_CHECKS`` as for every value check). Values outside every sequence are not read.
    """
    V.check_float("logp_pos", logp_pos)
    V.require(method in WEIGHT_METHODS, f"method must be one of {WEIGHT_METHODS}, got {method!r}")
    params = WeightParams() if params is None else params
    V.require(isinstance(params, WeightParams),
              f"params must be a WeightParams, got {type(params).__name__}")
    if method != "cdpo":
        V.require(logp_neg is not None, f"method={method!r} needs logp_neg")
        V.check_float("logp_neg", logp_neg)
        V.require(tuple(logp_neg.shape) == tuple(logp_pos.shape),
                  f"logp_neg shape {tuple(logp_neg.shape)} must equal logp_pos shape "
                  f"{tuple(logp_pos.shape)}")
    if isinstance(side, str):
        V.require(side in ("chosen", "rejected"),
                  f"side must be 'chosen', 'rejected' or a bool tensor, got {side!r}")
    else:
        V.require(isinstance(side, torch.Tensor) and side.dtype == torch.bool
                  and tuple(side.shape) == tuple(logp_pos.shape),
                  f"side as a tensor must be bool (True = chosen) with logp_pos's shape "
                  f"{tuple(logp_pos.shape)}, got " + (f"{side.dtype} {tuple(side.shape)}"
                                                      if isinstance(side, torch.Tensor)
                                                      else type(side).__name__))
    V.check_same_device(logp_pos=logp_pos, logp_neg=logp_neg, seq_ids=seq_ids, mask=mask,
                        side=side if isinstance(side, torch.Tensor) else None)
    which = resolve_impl(impl, logp_pos.device, op="token_weights")
    ids, num_seqs = _segments_from(logp_pos, seq_ids, mask, name="logp_pos")
    kept = (ids >= 0).view(logp_pos.shape)
    V.check_finite_at("logp_pos", logp_pos.detach(), kept)
    if method != "cdpo":
        V.check_finite_at("logp_neg", logp_neg.detach(), kept)
    if which is Impl.REFERENCE:
        from tisdpo_kernels import reference
        return reference.token_weights(logp_pos, logp_neg, side=side, method=method,
                                       params=params, seq_ids=seq_ids, mask=mask)
    if isinstance(side, str):
        mu = torch.full((logp_pos.numel(),), 1.0 if side == "chosen" else -1.0,
                        device=logp_pos.device)
    else:
        mu = torch.where(side.reshape(-1).bool(), 1.0, -1.0)
    neg = None if logp_neg is None else logp_neg.reshape(-1).detach()
    if which is Impl.TRITON:
        from tisdpo_kernels._triton.token_weights import token_weights as run
    else:
        from tisdpo_kernels._torch.token_weights import token_weights as run
    w = run(logp_pos.reshape(-1).detach(), neg, mu, ids, num_seqs, method, params)
    return w.view(logp_pos.shape)


def preference_loss(logp, ref_logp=None, weights=None, *, config, mask=None, seq_ids=None,
                    chosen_seq=None, rejected_seq=None, kl=None, normalizer=None,
                    num_seqs=None, impl="auto"):
    """The unified weighted preference loss (docs/ALGORITHMS.md §8) and per-pair metrics.

    Padded: logp [2B, T], chosen rows first, ``mask`` [2B, T] marks response tokens; pair b is
    (row b, row b+B). Packed: logp [N], ``seq_ids`` [N] (−1 outside every response),
    ``chosen_seq``/``rejected_seq`` [P] sequence ids of each pair. ref_logp (required unless
    ``config.reference_free``), weights ω (default 1) and kl (required when config.uses_kl)
    have logp's shape. normalizer: divide the summed pair losses by this (e.g. the pairs of
    the whole accumulated batch); default: pairs with at least one response token, ≥ 1
    (``granularity="pos"``, as cdpo_code: all B×T position slots). num_seqs (packed): the
    number of sequences, which bounds the ids (default N; give it when sequences can be empty).
    Values outside every response (mask false, seq_ids −1) are not read.

    Returns (loss, metrics): a scalar, and per-pair detached tensors of what the link compares
    (per-token means under reduction "mean": TISDPOLoss logs IPO's as TRL's sums) as rewards/*,
    logps/chosen, logps/rejected (TRL's names); kl/chosen, kl/rejected with KL terms.
    """
    V.require(isinstance(config, PreferenceConfig),
              f"config must be a PreferenceConfig, got {type(config).__name__}")
    V.check_float("logp", logp)
    for name, t in (("ref_logp", ref_logp), ("weights", weights), ("kl", kl)):
        if t is not None:
            V.check_float(name, t)
            V.require(tuple(t.shape) == tuple(logp.shape),
                      f"{name} shape {tuple(t.shape)} must equal logp shape {tuple(logp.shape)}")
    V.require(config.reference_free or ref_logp is not None,
              "ref_logp is required unless config.reference_free is set")
    V.require(not config.uses_kl or kl is not None,
              f"config uses KL terms ({config.kl}) but kl was not given")
    if logp.dim() == 2:
        V.require(logp.shape[0] % 2 == 0 and logp.shape[0] > 0,
                  f"padded logp must have 2B rows (chosen then rejected), got {logp.shape[0]}")
        V.require(mask is not None, "padded layout needs mask [2B, T] of response tokens")
        V.require(tuple(mask.shape) == tuple(logp.shape),
                  f"mask shape {tuple(mask.shape)} must equal logp shape {tuple(logp.shape)}")
        V.require(seq_ids is None and chosen_seq is None and rejected_seq is None
                  and num_seqs is None, "padded layout takes mask only; seq_ids/chosen_seq/"
                  "rejected_seq/num_seqs are packed")
    else:
        V.require(config.granularity == "seq", "granularity='pos' needs the padded layout")
        V.require(logp.dim() == 1, f"logp must be [2B, T] or [N], got {tuple(logp.shape)}")
        V.require(seq_ids is not None and chosen_seq is not None and rejected_seq is not None,
                  "packed layout needs seq_ids, chosen_seq and rejected_seq")
        V.check_index("chosen_seq", chosen_seq)
        V.check_index("rejected_seq", rejected_seq)
        V.require(chosen_seq.shape == rejected_seq.shape and chosen_seq.dim() == 1,
                  f"chosen_seq {tuple(chosen_seq.shape)} and rejected_seq "
                  f"{tuple(rejected_seq.shape)} must be 1-D of equal length")
        if num_seqs is not None:
            num_seqs = V.check_int("num_seqs", num_seqs, low=1)
        ids, num_seqs = _segments_from(logp, seq_ids, None, name="logp", num_seqs=num_seqs)
        V.check_same_device(logp=logp, seq_ids=seq_ids, chosen_seq=chosen_seq,
                            rejected_seq=rejected_seq)
        V.check_packed_pairs(ids, chosen_seq, rejected_seq, num_seqs)
    V.check_same_device(logp=logp, ref_logp=ref_logp, weights=weights, kl=kl, mask=mask)
    if weights is not None:
        kept = mask.bool() if logp.dim() == 2 else ids >= 0
        V.check_finite_at("weights", weights.detach(), kept)
    which = resolve_impl(impl, logp.device, op="preference_loss")
    logp, ref_logp, weights, kl, mask = (None if t is None else _saveable(t)
                                         for t in (logp, ref_logp, weights, kl, mask))
    if which is Impl.REFERENCE:
        from tisdpo_kernels import reference
        normalizer_tensor(normalizer, logp.device)   # > 0 and finite, as the backends check
        return reference.preference_loss(
            logp, ref_logp, weights, config=config, mask=mask, seq_ids=seq_ids,
            chosen_seq=chosen_seq, rejected_seq=rejected_seq, kl=kl, normalizer=normalizer)
    if config.granularity == "pos":   # cDPO's per-slot links: one implementation, in torch
        from tisdpo_kernels._torch.preference_loss import preference_loss_pos
        return preference_loss_pos(logp, ref_logp, weights, mask, config, normalizer)
    if which is Impl.TRITON:
        from tisdpo_kernels._triton.preference_loss import preference_loss as run
    else:
        from tisdpo_kernels._torch.preference_loss import preference_loss as run
    if logp.dim() == 2:
        half = logp.shape[0] // 2
        ids, num_seqs = _segments_from(logp, None, mask, name="logp")
        chosen_seq = torch.arange(half, device=logp.device)
        rejected_seq = torch.arange(half, 2 * half, device=logp.device)
    flat = [None if t is None else t.reshape(-1) for t in (logp, ref_logp, weights, kl)]
    return run(*flat, _saveable(ids), chosen_seq.long(), rejected_seq.long(), num_seqs, config,
               normalizer)


def _pair_rows(targets, seq_offsets, pairs):
    """The pairs' row ranges of the flat token dimension, on the host: ((chosen ranges),
    (rejected ranges)) per pair. Padded [2B, T]: pair b is rows b and b + B. Packed: sequence
    s is tokens offsets[s]..offsets[s+1]−1; no sequence may be in two pairs."""
    if seq_offsets is None:
        rows, t = targets.shape
        half = rows // 2
        return tuple((((b * t, (b + 1) * t),), (((b + half) * t, (b + half + 1) * t),))
                     for b in range(half))
    n = targets.shape[0]
    off = seq_offsets.tolist()                 # host metadata (one copy if on a device)
    prs = pairs.tolist()
    s = len(off) - 1
    V.require(s >= 1 and off[0] >= 0 and off[-1] <= n
              and all(a <= b for a, b in zip(off, off[1:])),
              f"seq_offsets must be non-decreasing within [0, N={n}] with S >= 1 sequences")
    seen = {}
    for i, (c, r) in enumerate(prs):
        V.require(0 <= c < s and 0 <= r < s, f"pairs must hold sequence indices in [0, S={s})")
        V.require(c != r, f"pairs[{i}] = {[c, r]} names one sequence as both chosen and rejected")
        for q in (c, r):
            V.require(q not in seen,
                      f"sequence {q} is in pairs {seen.get(q)} and {i}: its tokens' gradient is "
                      f"a sum over pairs, not one pair's scalar; the one-sweep head needs each "
                      f"sequence in at most one pair (use strategy='recompute')")
            seen[q] = i
    return tuple((((off[c], off[c + 1]),), ((off[r], off[r + 1]),)) for c, r in prs)


def linear_preference_loss(hidden, weight, targets, *, config, bias=None, ref_hidden=None,
                           ref_weight=None, ref_bias=None, ref_logp=None, weights=None,
                           seq_offsets=None, pairs=None, normalizer=None, ignore_index=-100,
                           softcap=None, impl="auto"):
    """The one-sweep preference head: the loss of ``preference_loss`` straight from hidden
    states, every head gradient formed in the forward (docs/ONE_SWEEP.md).

    Padded: hidden [2B, T, D], targets [2B, T], chosen rows first, pair b = (row b, row b+B).
    Packed: hidden [N, D], targets [N], ``seq_offsets`` [S+1] (sequence s = tokens
    offsets[s]..offsets[s+1]−1) and ``pairs`` [P, 2] (chosen, rejected sequence); tokens in
    no pair count nowhere; each sequence in at most one pair. ``seq_offsets`` and ``pairs``
    are read on the host (free for CPU tensors, one small copy otherwise). Reference (as
    ``config`` needs): ``ref_hidden`` [..., D′] with ``ref_weight`` [V, D′] and ``ref_bias``
    (constants; required for KL terms), or precomputed ``ref_logp`` (targets' shape).
    weights: ω per token (targets' shape; default 1). normalizer: as in ``preference_loss``.

        loss = Σ_b ℓ(z_b) / normalizer,  z_b = Σ_t c_t (lp_t − ρ lr_t) + Σ_t κ_t KL_t − γ₀

    Only presets whose loss is a sum of per-pair terms (granularity "seq"). Returns
    (loss, logp, ref_logp, kl): loss differentiable in hidden, weight and bias; the rest
    detached with targets' shape (0 where ignored; ref_logp None without a reference, kl None
    without KL terms). impl: "auto" (triton on CUDA, torch on CPU), "triton" (cuBLAS GEMMs
    and a Triton epilogue per chunk: softmax statistics, KL and the per-logit gradient in a
    few passes; on the CPU under TRITON_INTERPRET=1; float32/bfloat16/float16 only), "torch"
    (cuBLAS GEMMs and torch elementwise ops per chunk, any device and float dtype) or
    "reference" (the materialised oracle). The backward only scales the stored gradients.
    """
    V.require(isinstance(config, PreferenceConfig),
              f"config must be a PreferenceConfig, got {type(config).__name__}")
    why = one_sweep_unsupported(config)
    V.require(why is None, f"linear_preference_loss cannot compute this loss: {why}")
    V.check_linear_inputs(hidden, weight, targets, bias)
    ignore_index = V.check_int("ignore_index", ignore_index)
    softcap = V.check_softcap(softcap)
    if config.uses_kl:
        V.require(ref_hidden is not None, f"config uses KL terms ({config.kl}); they need "
                  f"ref_hidden and ref_weight")
    if config.reference_free:
        V.require(ref_hidden is None and ref_logp is None,
                  "config.reference_free is set; do not pass ref_hidden or ref_logp")
    else:
        V.require((ref_hidden is None) != (ref_logp is None),
                  "pass exactly one of ref_hidden (+ ref_weight) and ref_logp")
    V.require(ref_hidden is not None or (ref_weight is None and ref_bias is None),
              "ref_weight/ref_bias given without ref_hidden (they would be ignored)")
    if ref_hidden is not None:
        V.require(ref_weight is not None, "ref_hidden needs ref_weight")
        V.check_linear_inputs(ref_hidden, ref_weight, targets, ref_bias, prefix="ref_")
        V.require(ref_weight.shape[0] == weight.shape[0],
                  f"ref_weight has V={ref_weight.shape[0]} but weight has V={weight.shape[0]}")
    for name, t in (("ref_logp", ref_logp), ("weights", weights)):
        if t is not None:
            V.check_float(name, t)
            V.require(tuple(t.shape) == tuple(targets.shape),
                      f"{name} shape {tuple(t.shape)} must equal targets shape "
                      f"{tuple(targets.shape)}")
    V.check_same_device(hidden=hidden, ref_logp=ref_logp, weights=weights)
    if seq_offsets is not None or pairs is not None:
        V.require(seq_offsets is not None and pairs is not None,
                  "the packed layout needs both seq_offsets [S+1] and pairs [P, 2]")
        V.check_index("seq_offsets", seq_offsets)
        V.check_index("pairs", pairs)
        V.require(hidden.dim() == 2 and seq_offsets.dim() == 1 and pairs.dim() == 2
                  and pairs.shape[1] == 2,
                  f"packed: hidden [N, D], seq_offsets [S+1], pairs [P, 2]; got "
                  f"{tuple(hidden.shape)}, {tuple(seq_offsets.shape)}, {tuple(pairs.shape)}")
    else:
        V.require(hidden.dim() == 3 and hidden.shape[0] % 2 == 0 and hidden.shape[0] > 0,
                  f"padded hidden must be [2B, T, D] (chosen rows first), got "
                  f"{tuple(hidden.shape)}")
    which = resolve_impl(impl, hidden.device, op="linear_preference_loss")
    V.check_targets("targets", targets, weight.shape[0], ignore_index)
    valid = targets != ignore_index
    if weights is not None:
        weights = torch.where(valid, weights.detach(), 0.0)
        V.check_finite("weights", weights)
    ref_hidden = None if ref_hidden is None else ref_hidden.detach()
    ref_weight = None if ref_weight is None else ref_weight.detach()
    ref_bias = None if ref_bias is None else ref_bias.detach()
    ref_logp = None if ref_logp is None else ref_logp.detach()
    rows = _pair_rows(targets, seq_offsets, pairs)
    if which is Impl.REFERENCE:
        from tisdpo_kernels import reference
        normalizer_tensor(normalizer, hidden.device)   # > 0 and finite, as the backends check
        return reference.linear_preference_loss(
            hidden, weight, targets, config=config, bias=bias, ref_hidden=ref_hidden,
            ref_weight=ref_weight, ref_bias=ref_bias, ref_logp=ref_logp, weights=weights,
            pair_rows=rows, normalizer=normalizer, ignore_index=ignore_index, softcap=softcap)
    if which is Impl.TRITON:
        from tisdpo_kernels._triton.linear_preference_loss import linear_preference_loss as run
    else:
        from tisdpo_kernels._torch.linear_preference_loss import linear_preference_loss as run
    grad = torch.is_grad_enabled()
    needs = tuple(bool(grad and t is not None and t.requires_grad) for t in (hidden, weight, bias))
    opts = PairHeadOptions(config=config, pair_rows=rows, needs=needs,
                           ignore_index=ignore_index, softcap=softcap)
    d = hidden.shape[-1]
    flat = [None if t is None else t.reshape(-1) for t in (ref_logp, weights)]
    loss, logp, ref_out, kl = run(
        hidden.reshape(-1, d), weight, targets.reshape(-1).long(), bias,
        None if ref_hidden is None else ref_hidden.reshape(-1, ref_hidden.shape[-1]),
        ref_weight, ref_bias, *flat, normalizer_tensor(normalizer, hidden.device), opts)
    shape = targets.shape
    return (loss, logp.view(shape), None if ref_out is None else ref_out.view(shape),
            None if kl is None else kl.view(shape))


def _saveable(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a copy of it where autograd would refuse to save it for the backward: a
    tensor made under ``torch.inference_mode()`` (a frozen reference's hidden states, labels
    collated there) while gradients are being recorded."""
    if torch.compiler.is_compiling() or not torch.is_grad_enabled():   # dynamo cannot ask
        return t
    return t.clone() if t.is_inference() else t
