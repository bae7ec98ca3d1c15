"""``TISDPOLoss``: the drop-in token-weighted preference loss (docs/ALGORITHMS.md §2, §3, §6, §8).

Takes the policy's last hidden states and its LM-head weight instead of logits, so the
tokens × vocab logits are never materialised. Built only from the public ops of
``tisdpo_kernels`` (``linear_logprobs``, ``linear_token_kl``, ``token_weights``,
``preference_loss``); ``impl=`` picks their backend.
"""
from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from tisdpo_kernels import (
    Impl, linear_logprobs, linear_preference_loss, linear_token_kl, preference_loss,
    token_weights,
)
from tisdpo_kernels import validate as V
from tisdpo_kernels.config import PRESETS, WeightParams, resolve_preset
from tisdpo_kernels.strategy import STRATEGIES, choose_strategy, one_sweep_unsupported
from tisdpo_kernels.validate import check_not_sharded

__all__ = ["TISDPOLoss", "presets_markdown"]


class TISDPOLoss(nn.Module):
    """Token-weighted DPO-family loss from hidden states and the LM-head weight.

    ``method`` is any name of ``tisdpo_kernels.PRESETS`` (see :func:`presets_markdown`).
    ``"tisdpo"`` is the official code's default objective, the weighted log-ratio sums
    ``−log σ(β(Σ ω_w Δ_w − Σ ω_l Δ_l))`` without η; the paper's η term (a token-weighted
    KL(π‖ref)) is opt-in via ``"tisdpo_paper"`` or ``"tisdpo_token_level"``.

    Hyperparameters (None = the preset's default, docs/ALGORITHMS.md names):
      beta: β > 0 (0.1; SimPO 2.0).
      epsilon / label_smoothing (aliases): ε ∈ [0, 0.5) for conservative / robust (0.1);
        with a sigmoid-link method ε > 0 gives the conservative (label-smoothed) form.
      alpha: α > 0 on the KL terms of tdpo2 and tisdpo_token_level (0.5).
      gamma_beta_ratio: γ/β ≥ 0 of simpo (0.25).
      weight_method: override the preset's rule for weights computed on the fly (one of
        ``tisdpo_kernels.config.WEIGHT_METHODS``); weight_params: its ``WeightParams``
        (L, U, k, ranges; defaults of docs/ALGORITHMS.md §2).
      ignore_index (-100), softcap (logit softcap, both heads), impl ("auto" | "triton" |
        "torch" | "reference", passed to every op).
      strategy: "recompute" (per-token log-probs, logits recomputed in the backward),
        "one_sweep" (``linear_preference_loss``: every head gradient formed in the forward,
        6·N·D·V flops instead of 8, the backward only scales them; not for cdpo_code, whose
        loss is no sum of per-pair terms) or "auto" (default: one_sweep only on CUDA, for pairs
        that fit one chunk of its sweep or reach ``TISDPO_ONE_SWEEP_MIN_TOKENS`` tokens, when
        memory allows; see ``tisdpo_kernels.strategy.choose_strategy``).
      filter_eps: None (exact) or ε ∈ (0, 1): opt-in gradient filtering of the policy's
        log-prob head (``tisdpo_kernels.linear_logprobs``, docs/FILTERING.md); recompute
        strategy only (auto then picks it), not for methods with KL terms.

    Call (padded layout, as TRL and Liger batch it)::

        loss, metrics = loss_fn(lm_head_weight, hidden, labels, *, bias=None,
                                ref_hidden=None, ref_weight=None, ref_bias=None,
                                ref_logps=None, weights=None, pos_logps=None,
                                neg_logps=None, normalizer=None)

    hidden [2B, T, D], labels [2B, T] (already shifted: labels[i, t] is predicted from
    hidden[i, t]); rows 0..B−1 are the chosen responses, rows B..2B−1 the rejected ones,
    pair b = (row b, row b + B); ``ignore_index`` on prompt and padding tokens.

    Packed layout (padding-free): add ``seq_offsets`` [S+1] (cu_seqlens-style, sequence s
    is tokens offsets[s]..offsets[s+1]−1; tokens past the last offset belong to no sequence)
    and ``pairs`` [P, 2] (chosen sequence, rejected sequence); hidden [N, D] with labels and
    every per-token tensor [N], or hidden [1, N, D] with them [N] or [1, N].

    Reference (one of): ``ref_hidden`` [same tokens, D′] with ``ref_weight`` [V, D′]
    (default: ``lm_head_weight``) and ``ref_bias`` (default: ``bias`` when ref_weight is
    not given), evaluated under no_grad; or precomputed ``ref_logps`` (per token); or none
    for reference-free methods (simpo). KL methods (tisdpo_paper, tisdpo_token_level,
    tdpo1, tdpo2) need ``ref_hidden``: the full-vocabulary KL cannot come from ref_logps.

    Token weights ω (one of): ``weights`` per token, used exactly as given (only response
    tokens count; no gradient flows into them); or ``pos_logps``/``neg_logps`` (log π⁺(y_t),
    log π⁻(y_t); for cdpo ``pos_logps`` is the log-score log s_t) turned into weights by the
    method's rule; or none: unit weights — for ``"tisdpo"`` that is exactly DPO on the same
    tokens.

    Ignored positions (``ignore_index`` labels: prompts, padding) may hold anything, NaN
    included, in every per-token input: they change neither the loss nor any gradient. At
    response tokens, a non-finite ``weights``, ``pos_logps`` or ``neg_logps`` is a ValueError
    naming it (an asynchronous device assertion on CUDA); a non-finite ``ref_logps`` gives a
    NaN loss. Neither becomes a finite number.

    normalizer: divide the summed pair losses by this; default: the pairs that have a
    response token (``cdpo_code``, a mean over positions: all of its B×T position slots).
    Under gradient accumulation pass the sum of :meth:`normalizer_count` over the step's
    micro-batches: the step's loss is then the one big batch's when every pair has a response
    token (counted from shapes, ``normalizer_count`` also counts a pair without one, as TRL's
    mean over pairs does; the default normalizer does not); for ``cdpo_code`` only when every
    micro-batch is padded to the big batch's length (its slots count the padding).

    pair_metrics: True gives the rewards/*, logps/* (and kl/*) metrics per pair ([P]
    tensors, pair order) instead of their batch means; weights/* stay batch means.

    Returns ``loss`` (scalar) and ``metrics``: detached 0-d tensors, batch means over pairs —
    rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies, logps/chosen,
    logps/rejected (TRL's names and meaning: token sums, as DPOTrainer logs them — for ipo too,
    whose per-token means, what its loss uses, come as rewards_per_token/* and
    logps_per_token/*; per-token means for simpo, as CPOTrainer logs them; the rewards of a
    weighted method are its weighted implicit reward β·Σ ω·(log π − log π_ref), and with KL
    terms each side's share of β·z: docs/ALGORITHMS.md §3),
    weights/chosen and weights/rejected (mean token weight over response tokens), and
    kl/chosen, kl/rejected for KL methods. No host synchronisation.
    """

    def __init__(self, method: str = "tisdpo", beta: float | None = None, *,
                 epsilon: float | None = None, label_smoothing: float | None = None,
                 alpha: float | None = None, gamma_beta_ratio: float | None = None,
                 weight_method: str | None = None, weight_params: WeightParams | None = None,
                 ignore_index: int = -100, softcap: float | None = None, impl: str = "auto",
                 strategy: str = "auto", filter_eps: float | None = None):
        super().__init__()
        cfg, rule, params = resolve_preset(
            method, beta=beta, epsilon=epsilon, label_smoothing=label_smoothing, alpha=alpha,
            gamma_beta_ratio=gamma_beta_ratio, weight_method=weight_method,
            weight_params=weight_params)
        ignore_index = V.check_int("ignore_index", ignore_index)
        softcap = V.check_softcap(softcap)
        try:
            Impl(impl)
        except ValueError:
            raise ValueError(f"unknown impl={impl!r}; valid choices are "
                             f"{[i.value for i in Impl]}") from None
        V.require(strategy in STRATEGIES,
                  f"unknown strategy={strategy!r}; valid choices are {list(STRATEGIES)}")
        why = one_sweep_unsupported(cfg) if strategy == "one_sweep" else None
        V.require(why is None, f"strategy='one_sweep' cannot compute method {method!r}: {why}; "
                  f"use strategy='recompute' or 'auto'")
        filter_eps = V.check_filter_eps(filter_eps)
        V.check_env()      # the TISDPO_* variables (each is read again where it is used)
        if filter_eps is not None:
            V.require(not cfg.uses_kl, f"filter_eps={filter_eps!r}: method {method!r} computes "
                      f"KL terms over the whole vocabulary, whose head has no filtering; use "
                      f"filter_eps=None")
            V.require(strategy != "one_sweep", f"filter_eps={filter_eps!r} filters the recompute "
                      f"strategy's backward; strategy='one_sweep' has none (use 'recompute' or "
                      f"'auto')")
            V.require(impl != "reference", f"filter_eps={filter_eps!r} needs impl 'auto', "
                      f"'torch' or 'triton'; impl='reference' is the exact oracle")
        self.filter_eps = filter_eps
        self.method = method
        self.strategy = strategy
        self.config = cfg
        self.weight_method, self.weight_params = rule, params
        self.ignore_index = ignore_index
        self.softcap = softcap
        self.impl = impl

    def normalizer_count(self, labels: torch.Tensor, pairs: torch.Tensor | None = None) -> int:
        """How much of the normalizer one batch holds, from shapes alone (no host sync): its
        pairs (``pairs``' rows when packed, else half of ``labels``' rows), or for a preset
        that averages over positions (``cdpo_code``) its B×T slots, padding included."""
        if self.config.granularity == "pos":
            return labels.shape[0] // 2 * labels.shape[-1]
        return pairs.shape[0] if pairs is not None else labels.shape[0] // 2

    def extra_repr(self) -> str:
        c = self.config
        return (f"method={self.method!r}, beta={c.beta}, link={c.link!r}, "
                f"weight_method={self.weight_method!r}, impl={self.impl!r}, "
                f"strategy={self.strategy!r}"
                + ("" if self.filter_eps is None else f", filter_eps={self.filter_eps}"))

    # ------------------------------------------------------------------------------ forward

    def forward(self, lm_head_weight, hidden, labels, *, bias=None, ref_hidden=None,
                ref_weight=None, ref_bias=None, ref_logps=None, weights=None, pos_logps=None,
                neg_logps=None, seq_offsets=None, pairs=None, normalizer=None,
                pair_metrics=False):
        cfg = self.config
        V.require(isinstance(pair_metrics, bool),
                  f"pair_metrics must be True or False, got {pair_metrics!r}")
        check_not_sharded(lm_head_weight, "lm_head_weight")   # an FSDP2 shard: see the error
        check_not_sharded(ref_weight, "ref_weight")
        V.check_float("lm_head_weight", lm_head_weight)
        V.check_float("hidden", hidden)
        V.check_index("labels", labels)
        V.require(hidden.dtype == lm_head_weight.dtype,
                  f"hidden dtype {hidden.dtype} differs from lm_head_weight dtype "
                  f"{lm_head_weight.dtype}; pass lm_head_weight.to(hidden.dtype) (differentiable; "
                  f"under autocast F.linear casts the same way)")
        if seq_offsets is not None or pairs is not None:
            hidden, labels, ref_hidden, tok, layout = self._packed(
                hidden, labels, ref_hidden, seq_offsets, pairs,
                ref_logps=ref_logps, weights=weights, pos_logps=pos_logps, neg_logps=neg_logps)
            ref_logps, weights, pos_logps, neg_logps = tok
        else:
            layout = self._padded(hidden, labels)
        mask = labels != self.ignore_index
        side, rejected = layout.pop("side"), layout.pop("rejected")   # per token, bool
        self._check_reference(ref_hidden, ref_weight, ref_bias, ref_logps)
        for name, t in (("ref_logps", ref_logps), ("weights", weights),
                        ("pos_logps", pos_logps), ("neg_logps", neg_logps)):
            if t is not None:
                V.check_float(name, t)
                V.require(tuple(t.shape) == tuple(labels.shape),
                          f"{name} shape {tuple(t.shape)} must equal labels shape "
                          f"{tuple(labels.shape)}")
        V.check_same_device(hidden=hidden, ref_logps=ref_logps, weights=weights,
                            pos_logps=pos_logps, neg_logps=neg_logps)
        V.check_linear_inputs(hidden, lm_head_weight, labels, bias,
                              names={"weight": "lm_head_weight", "targets": "labels"})
        V.check_targets("labels", labels, lm_head_weight.shape[0], self.ignore_index)
        if ref_hidden is not None:
            self._check_ref_head(hidden, lm_head_weight, labels, ref_hidden, ref_weight,
                                 ref_bias, bias)
        if ref_hidden is not None and ref_weight is None:
            ref_weight = lm_head_weight
            ref_bias = bias if ref_bias is None else ref_bias
        head = dict(ignore_index=self.ignore_index, softcap=self.softcap, impl=self.impl)

        kl = ref_logp = None
        strategy = "recompute" if self.filter_eps is not None else self.strategy
        one_sweep = choose_strategy(strategy, cfg, hidden=hidden, weight=lm_head_weight,
                                    bias=bias, impl=self.impl, seq_offsets=seq_offsets,
                                    pairs=pairs, ref_hidden=ref_hidden) == "one_sweep"
        if one_sweep:   # the loss and every head gradient in this forward (docs/ONE_SWEEP.md)
            sd = torch.float64 if hidden.dtype == torch.float64 else torch.float32
            w = self._weights(sd, mask, side, rejected, layout, weights, pos_logps, neg_logps)
            ref_in = None if ref_logps is None else \
                torch.where(mask, ref_logps.detach().to(sd), 0.0)
            loss, logp, ref_logp, kl = linear_preference_loss(
                hidden, lm_head_weight, labels, config=cfg, bias=bias, ref_hidden=ref_hidden,
                ref_weight=ref_weight, ref_bias=ref_bias, ref_logp=ref_in, weights=w,
                seq_offsets=seq_offsets, pairs=pairs, normalizer=normalizer, **head)
        elif cfg.uses_kl:
            kl, logp, ref_logp = linear_token_kl(
                hidden, lm_head_weight, ref_hidden, ref_weight, labels, bias=bias,
                ref_bias=ref_bias, direction=cfg.kl, **head)
        else:
            logp = linear_logprobs(hidden, lm_head_weight, labels, bias=bias,
                                   filter_eps=self.filter_eps, **head)
            if ref_hidden is not None:
                with torch.no_grad():
                    ref_logp = linear_logprobs(ref_hidden.detach(), ref_weight.detach(), labels,
                                               bias=None if ref_bias is None
                                               else ref_bias.detach(), **head)
            elif ref_logps is not None:
                ref_logp = torch.where(mask, ref_logps.detach().to(logp.dtype), 0.0)
        if not one_sweep:
            w = self._weights(logp.dtype, mask, side, rejected, layout, weights, pos_logps,
                              neg_logps)

        pair_loss, per_pair = preference_loss(logp, ref_logp, w, config=cfg, kl=kl,
                                              normalizer=normalizer, impl=self.impl, **layout)
        if not one_sweep:     # (one_sweep: the loss came with its gradients; these are metrics)
            loss = pair_loss
        if cfg.reduction == "mean" and not cfg.reference_free:
            per_pair = self._token_sum_metrics(per_pair, logp, ref_logp, w, kl, layout)
        metrics = dict(per_pair) if pair_metrics else {k: v.mean() for k, v in per_pair.items()}
        unit = torch.ones_like(logp) if w is None else w
        for name, sel in (("weights/chosen", mask & side),
                          ("weights/rejected", mask & rejected)):
            metrics[name] = ((unit * sel).sum() / sel.sum().clamp(min=1)).detach()
        return loss, metrics

    # ------------------------------------------------------------------------------ helpers

    def _token_sum_metrics(self, per_pair, logp, ref_logp, w, kl, layout):
        """IPO's link sees per-token means, but TRL's DPOTrainer logs ``rewards/*`` and
        ``logps/*`` as token sums: those names keep TRL's meaning (sums), and the means the
        loss used move to ``rewards_per_token/*`` and ``logps_per_token/*``."""
        out = {k: v for k, v in per_pair.items() if not k.startswith(("rewards/", "logps/"))}
        for k, v in per_pair.items():
            head, _, tail = k.partition("/")
            if head in ("rewards", "logps"):
                out[f"{head}_per_token/{tail}"] = v
        with torch.no_grad():
            _, sums = preference_loss(logp.detach(), ref_logp, w,
                                      config=replace(self.config, reduction="sum"),
                                      kl=None if kl is None else kl.detach(), impl=self.impl,
                                      **layout)
        out.update({k: v for k, v in sums.items() if k.startswith(("rewards/", "logps/"))})
        return out

    def _padded(self, hidden, labels):
        V.require(hidden.dim() == 3,
                  f"hidden must be [2B, T, D] (padded) or [N, D] with seq_offsets and pairs "
                  f"(packed), got shape {tuple(hidden.shape)}")
        V.require(labels.dim() == 2 and tuple(labels.shape) == tuple(hidden.shape[:2]),
                  f"labels shape {tuple(labels.shape)} must be hidden's [2B, T] = "
                  f"{tuple(hidden.shape[:2])}")
        V.require(hidden.shape[0] % 2 == 0 and hidden.shape[0] > 0,
                  f"hidden must have 2B rows (chosen rows first, then rejected), got "
                  f"{hidden.shape[0]}")
        rows = torch.arange(labels.shape[0], device=labels.device)
        side = (rows < labels.shape[0] // 2).unsqueeze(1).expand_as(labels)
        return {"mask": labels != self.ignore_index, "side": side, "rejected": ~side}

    def _packed(self, hidden, labels, ref_hidden, seq_offsets, pairs, **tok):
        V.require(seq_offsets is not None and pairs is not None,
                  "the packed layout needs both seq_offsets [S+1] and pairs [P, 2]")
        V.require(self.config.granularity == "seq",
                  f"method {self.method!r} pairs positions of padded rows; it needs the padded "
                  f"layout (no seq_offsets/pairs)")
        if hidden.dim() == 3:
            V.require(hidden.shape[0] == 1,
                      f"packed hidden must be [N, D] or [1, N, D], got {tuple(hidden.shape)}")
            hidden = hidden[0]
            labels = labels[0] if labels.dim() == 2 else labels
            ref_hidden = ref_hidden[0] if ref_hidden is not None and ref_hidden.dim() == 3 \
                else ref_hidden
            tok = {k: (t[0] if t is not None and t.dim() == 2 else t) for k, t in tok.items()}
        V.require(hidden.dim() == 2,
                  f"packed hidden must be [N, D] or [1, N, D], got {tuple(hidden.shape)}")
        V.require(labels.dim() == 1 and labels.shape[0] == hidden.shape[0],
                  f"packed labels must be [N] = [{hidden.shape[0]}], got {tuple(labels.shape)}")
        V.check_index("seq_offsets", seq_offsets)
        V.check_index("pairs", pairs)
        V.require(seq_offsets.dim() == 1 and seq_offsets.shape[0] >= 2,
                  f"seq_offsets must be [S+1] with S >= 1, got {tuple(seq_offsets.shape)}")
        V.require(pairs.dim() == 2 and pairs.shape[1] == 2 and pairs.shape[0] >= 1,
                  f"pairs must be [P, 2] (chosen, rejected) with P >= 1, got "
                  f"{tuple(pairs.shape)}")
        n, s = hidden.shape[0], seq_offsets.shape[0] - 1
        off = seq_offsets.to(device=hidden.device, dtype=torch.long)
        pairs = pairs.to(device=hidden.device, dtype=torch.long)
        value_check((off[1:] < off[:-1]).any() | (off[0] < 0) | (off[-1] > n),
                     f"seq_offsets must be non-decreasing within [0, N={n}]")
        value_check(((pairs < 0) | (pairs >= s)).any(),
                     f"pairs must hold sequence indices in [0, S={s})")
        V.value_check(pairs[:, 0] == pairs[:, 1], lambda b: (
            "pairs must pair two different sequences; a pair names one sequence as both chosen "
            "and rejected" if b is None else f"pairs[{int(torch.nonzero(b)[0])}] = "
            f"{pairs[b][0].tolist()} names one sequence as both chosen and rejected"))
        pos = torch.arange(n, device=hidden.device)
        seq = torch.searchsorted(off[1:], pos, right=True)        # offsets[s] <= t < offsets[s+1]
        seq = torch.where(pos >= off[0], seq, s)                  # s: outside every sequence
        role = torch.zeros(2, s + 1, dtype=torch.bool, device=hidden.device)
        role[0, pairs[:, 0].clamp(0, s)] = True                   # a chosen sequence
        role[1, pairs[:, 1].clamp(0, s)] = True                   # a rejected sequence
        role[:, s] = False
        role = role[:, seq.clamp(max=s)]                          # per token; False outside
        # tokens outside every sequence, or of a sequence no pair names, count nowhere,
        # whatever their label says
        labels = torch.where(role[0] | role[1], labels, self.ignore_index)
        seq_ids = torch.where(labels != self.ignore_index, seq, -1)
        layout = {"seq_ids": seq_ids, "chosen_seq": pairs[:, 0], "rejected_seq": pairs[:, 1],
                  "num_seqs": s,
                  "side": role[0], "rejected": role[1]}
        keys = ("ref_logps", "weights", "pos_logps", "neg_logps")
        return hidden, labels, ref_hidden, tuple(tok[k] for k in keys), layout

    @staticmethod
    def _check_ref_head(hidden, lm_head_weight, labels, ref_hidden, ref_weight, ref_bias, bias):
        """The reference head's shapes and dtypes; errors name ref_hidden / ref_weight /
        ref_bias, or the policy tensor that stands in for an omitted one."""
        V.check_float("ref_hidden", ref_hidden)
        V.require(ref_hidden.dim() == hidden.dim()
                  and tuple(ref_hidden.shape[:-1]) == tuple(hidden.shape[:-1]),
                  f"ref_hidden shape {tuple(ref_hidden.shape)} must cover hidden's tokens: "
                  f"{tuple(hidden.shape[:-1])} + (D',), as hidden is {tuple(hidden.shape)}")
        names = {"hidden": "ref_hidden", "targets": "labels", "weight": "ref_weight",
                 "bias": "ref_bias"}
        if ref_weight is None:
            ref_weight, names["weight"] = lm_head_weight, "lm_head_weight (the default ref_weight)"
            if ref_bias is None:
                ref_bias, names["bias"] = bias, "bias (the default ref_bias)"
        V.check_linear_inputs(ref_hidden, ref_weight, labels, ref_bias, names=names)
        V.require(ref_weight.shape[0] == lm_head_weight.shape[0],
                  f"{names['weight']} has V={ref_weight.shape[0]} vocabulary rows but "
                  f"lm_head_weight has V={lm_head_weight.shape[0]}; both heads score the same "
                  f"labels")

    def _check_reference(self, ref_hidden, ref_weight, ref_bias, ref_logps):
        cfg, method = self.config, self.method
        if ref_hidden is None:
            V.require(ref_weight is None and ref_bias is None,
                      "ref_weight/ref_bias given without ref_hidden")
        if cfg.reference_free:
            V.require(ref_hidden is None and ref_logps is None,
                      f"method {method!r} is reference-free; do not pass ref_hidden or ref_logps")
            return
        V.require(ref_hidden is None or ref_logps is None,
                  "pass either ref_hidden (+ ref_weight) or ref_logps, not both")
        if cfg.uses_kl:
            V.require(ref_hidden is not None,
                      f"method {method!r} uses the full-vocabulary KL ({cfg.kl}), which needs "
                      f"ref_hidden (+ ref_weight); ref_logps alone cannot give it")
        V.require(ref_hidden is not None or ref_logps is not None,
                  f"method {method!r} needs a reference: pass ref_hidden (+ ref_weight) or "
                  f"ref_logps")

    def _weights(self, dtype, mask, side, rejected, layout, weights, pos_logps, neg_logps):
        V.require(weights is None or (pos_logps is None and neg_logps is None),
                  "pass either weights or pos_logps/neg_logps, not both")
        if weights is not None:
            return torch.where(mask, weights.detach().to(dtype), 0.0)
        if pos_logps is None and neg_logps is None:
            return None
        rule = self.weight_method
        V.require(rule is not None,
                  f"method {self.method!r} has no weight rule; pass weights=, or "
                  f"weight_method= to compute weights from pos_logps/neg_logps")
        V.require(pos_logps is not None, "neg_logps given without pos_logps")
        V.require(rule == "cdpo" or neg_logps is not None,
                  f"weight rule {rule!r} needs both pos_logps and neg_logps")
        V.require(rule != "cdpo" or neg_logps is None,
                  "weight rule 'cdpo' reads only pos_logps (the log-score log s_t); do not "
                  "pass neg_logps")
        # a NaN score would become a finite weight: name the argument the caller passed
        V.check_finite_at("pos_logps", pos_logps.detach(), mask)
        if rule != "cdpo":
            V.check_finite_at("neg_logps", neg_logps.detach(), mask)
        # every rule depends on the side, and a token has one weight: a packed sequence that is
        # chosen in one pair and rejected in another would need two
        V.value_check(side & rejected & mask, lambda b: (
            "pos_logps/neg_logps: weights computed from them depend on the side, but "
            + ("a sequence" if b is None else
               f"sequence {int(layout['seq_ids'][torch.nonzero(b)[0, 0]])}")
            + " is chosen in one pair and rejected in another; pass weights= (one per token) "
            "or give each pair its own copy of the sequence"))
        seg = {"mask": mask} if "mask" in layout else {"seq_ids": layout["seq_ids"]}
        w = token_weights(pos_logps.detach(), None if rule == "cdpo" else neg_logps.detach(),
                          side=side, method=rule, params=self.weight_params, impl=self.impl,
                          **seg)
        return torch.where(mask, w.to(dtype), 0.0)


def value_check(bad: torch.Tensor, msg: str) -> None:
    """ValueError on CPU; an asynchronous device assertion on CUDA (no host sync)."""
    V.value_check(bad, lambda _: msg)


def presets_markdown() -> str:
    """The README table of methods, derived from ``tisdpo_kernels.PRESETS``."""
    rows = ["| method | token weights | link | β | sequence score | reference | KL term | "
            "formula |", "|---|---|---|---|---|---|---|---|"]
    for name, p in PRESETS.items():
        c = p.config
        link = c.link + (f" ε={c.epsilon}" if c.link in ("conservative", "robust") else "")
        score = "per-position pairs" if c.granularity == "pos" else (
            "token mean" if c.reduction == "mean" else "token sum")
        kl = "–"
        if c.uses_kl:
            d = "KL(π‖ref)" if c.kl == "policy_ref" else "KL(ref‖π)"
            kl = (f"{d}, c_w={c.kl_chosen_coef:+g}, c_l={c.kl_rejected_coef:+g}"
                  + (", sg(K_w)" if c.kl_stop_grad_chosen else "")
                  + (", ν=ω" if c.kl_token_weighted else ""))
        ref = "none" if c.reference_free else "yes"
        if c.margin:
            ref += f", γ/β={c.margin:g}"
        rows.append(f"| `{name}` | {p.weight_method or 'unit'} | {link} | {c.beta:g} | {score} | "
                    f"{ref} | {kl} | {p.description} |")
    return "\n".join(rows)
