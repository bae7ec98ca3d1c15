"""What a stage optimises: an objective maps (model, batch, normaliser) to (loss, metrics) and
says how much of the normaliser a batch holds (``count``).

:class:`PreferenceObjective` runs a :class:`tisdpo.loss.TISDPOLoss` on the policy's hidden
states (the reference from precomputed log-probs or a reference model), :class:`SFTObjective`
the token-mean NLL of one side's completions; :func:`forward_hidden` gives both the hidden
states before the head and the head itself, packed rows attending per sequence.

Evaluation (a call without gradients, as in ``Trainer.evaluate``) adds metrics that compare
across methods (:func:`comparable_metrics`): ``rewards/accuracies_unweighted``, the DPO
implicit reward β·Σ_t(log π − log π_ref) with unit token weights on each response's tokens,
whatever weights, link or reference the method trains with; and the likelihood displacement
``logps/chosen_delta`` / ``logps/rejected_delta``, the per-token mean of log π − log π_ref
of each response, averaged over pairs. They need reference log-probs: the method's own, or
for a reference-free method the batch's stored ``ref_logps`` or the ``ref_model`` when given;
without any they are left out. :func:`displacement_warning` flags a stage whose chosen and
rejected log-probs both fell.
"""
from __future__ import annotations

import logging

import torch

from tisdpo.train.collate import packed_attention_kwargs
from tisdpo.train.model import autocast, head, hidden_states
from tisdpo_kernels import linear_logprobs

__all__ = ["PreferenceObjective", "SFTObjective", "forward_hidden", "comparable_metrics",
           "displacement_warning", "COLLAPSE_THRESHOLD"]

log = logging.getLogger("tisdpo")

#: nats per token: a chosen ``logps/chosen_delta`` below minus this (with the rejected one
#: falling too) is reported as likelihood displacement by :func:`displacement_warning`.
COLLAPSE_THRESHOLD = 0.5


def _is_packed(batch: dict) -> bool:
    return "seq_offsets" in batch


def forward_hidden(model, batch: dict, model_cfg, device, *, grad: bool = True):
    """Hidden states before the head and the head spec; packed rows attend per sequence."""
    attention = packed_attention_kwargs(batch, model) if _is_packed(batch) else None
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()), autocast(model_cfg, device):
        hidden = hidden_states(model, batch, attention=attention)
    spec = head(model)
    weight = spec.weight if spec.weight.dtype == hidden.dtype else spec.weight.to(hidden.dtype)
    bias = spec.bias if spec.bias is None or spec.bias.dtype == hidden.dtype \
        else spec.bias.to(hidden.dtype)
    return hidden, weight, bias


class PreferenceObjective:
    """A DPO-family loss (:class:`tisdpo.loss.TISDPOLoss`) on the policy's hidden states.

    The reference comes from the batch's precomputed ``ref_logps`` when present (and the
    loss has no KL term), else from ``ref_model``'s hidden states under no_grad. Token
    weights come from the batch's ``weights`` when ``use_weights``, else unit weights.
    """

    def __init__(self, loss_fn, *, model_cfg, device, ref_model=None, use_weights=False,
                 eos_token_id: int | None = None):
        self.loss_fn, self.model_cfg, self.device = loss_fn, model_cfg, device
        self.ref_model, self.use_weights = ref_model, use_weights
        # the comparable metrics leave out an appended EOS, which some presets count and
        # others do not (responses never contain the EOS token: the data checks refuse it)
        self.eos_token_id = eos_token_id
        cfg = loss_fn.config
        self.reference_free, self.needs_ref_hidden = cfg.reference_free, cfg.uses_kl

    def count(self, batch: dict) -> float:
        """The batch's share of the normaliser: its pairs (the loss is a mean over pairs), or
        its position slots for a loss that averages over positions (``normalizer_count``)."""
        return float(self.loss_fn.normalizer_count(
            batch["labels"], batch["pairs"] if _is_packed(batch) else None))

    def metric_weight(self, batch: dict) -> float:
        """Pairs in the batch: what its metrics are means over (``count`` is the
        normaliser's share, position slots for cdpo_code)."""
        return float(batch["pairs"].shape[0] if _is_packed(batch)
                     else batch["labels"].shape[0] // 2)

    def metric_counts(self, batch: dict) -> dict[str, float]:
        """The metrics that are means over something other than pairs: ``weights/chosen`` and
        ``weights/rejected`` average over that side's response tokens, so micro-batches and
        ranks are combined by those counts (a batch on the host: no device sync)."""
        kept = batch["labels"] != self.loss_fn.ignore_index
        _, counts = _sequence_sums(kept, kept, batch.get("seq_offsets"), batch.get("pairs"))
        chosen, rejected = counts.sum(0).tolist()
        return {"weights/chosen": chosen, "weights/rejected": rejected}

    def _ref_head(self, batch: dict) -> dict:
        with torch.no_grad():
            ref_hidden, ref_weight, ref_bias = forward_hidden(
                self.ref_model, batch, self.model_cfg, self.device, grad=False)
        return dict(ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias)

    def __call__(self, model, batch: dict, *, normalizer: float):
        hidden, weight, bias = forward_hidden(model, batch, self.model_cfg, self.device)
        kwargs: dict = {}
        if not self.reference_free:
            if self.needs_ref_hidden or batch.get("ref_logps") is None:
                if self.ref_model is None:
                    raise ValueError("this loss needs a reference model (no precomputed "
                                     "ref_logps in the data, or a KL term)")
                kwargs.update(self._ref_head(batch))
            else:
                kwargs["ref_logps"] = batch["ref_logps"]
        if self.use_weights and batch.get("weights") is not None:
            kwargs["weights"] = batch["weights"]
        if _is_packed(batch):
            kwargs.update(seq_offsets=batch["seq_offsets"], pairs=batch["pairs"])
        loss, metrics = self.loss_fn(weight, hidden, batch["labels"], bias=bias,
                                     normalizer=normalizer, **kwargs)
        if not torch.is_grad_enabled():          # evaluation: the cross-method yardsticks
            metrics = {**metrics, **self._comparable(batch, hidden, weight, bias, kwargs)}
        return loss, metrics

    def _comparable(self, batch, hidden, weight, bias, kwargs) -> dict:
        """:func:`comparable_metrics` of this batch (one more head pass; an empty dict when
        no reference log-probs are available)."""
        labels = batch["labels"]
        ref = {k: kwargs[k] for k in ("ref_hidden", "ref_weight", "ref_bias") if k in kwargs}
        ref_logps = kwargs.get("ref_logps")
        if not ref and ref_logps is None:        # reference-free: a stored or given reference
            ref_logps = batch.get("ref_logps")
            if ref_logps is None and self.ref_model is not None:
                ref = self._ref_head(batch)
            elif ref_logps is None:
                return {}
        fn = self.loss_fn
        head = dict(ignore_index=fn.ignore_index, softcap=fn.softcap, impl=fn.impl)
        flat = (lambda t: t.reshape(-1, t.shape[-1])) if _is_packed(batch) else (lambda t: t)
        lab = labels.reshape(-1) if _is_packed(batch) else labels
        logp = linear_logprobs(flat(hidden), weight, lab, bias=bias, **head)
        if ref:
            ref_logp = linear_logprobs(flat(ref["ref_hidden"]), ref["ref_weight"], lab,
                                       bias=ref["ref_bias"], **head)
        else:
            ref_logp = ref_logps.reshape(lab.shape).to(logp.dtype)
        if self.eos_token_id is not None:      # the text tokens only, for every method
            lab = torch.where(lab == self.eos_token_id, fn.ignore_index, lab)
        return comparable_metrics(logp, ref_logp, lab, beta=fn.config.beta,
                                  ignore_index=fn.ignore_index,
                                  seq_offsets=batch.get("seq_offsets"), pairs=batch.get("pairs"))


def _sequence_sums(values: torch.Tensor, mask: torch.Tensor, seq_offsets=None, pairs=None):
    """[P, 2] sums of ``values`` over each pair's (chosen, rejected) tokens where ``mask``,
    and the [P, 2] token counts; padded rows (chosen first) or a packed layout."""
    v = torch.where(mask, values.double(), 0.0)
    m = mask.double()
    if seq_offsets is None:
        b = v.shape[0] // 2
        sums, counts = v.sum(-1), m.sum(-1)
        return (torch.stack([sums[:b], sums[b:2 * b]], 1),
                torch.stack([counts[:b], counts[b:2 * b]], 1))
    v, m = v.reshape(-1), m.reshape(-1)
    off = seq_offsets.to(device=v.device, dtype=torch.long)
    s = off.shape[0] - 1
    pos = torch.arange(v.shape[0], device=v.device)
    seq = torch.searchsorted(off[1:], pos, right=True)
    seq = torch.where(pos >= off[0], seq, s).clamp(max=s)      # s: outside every sequence
    sums = torch.zeros(s + 1, dtype=v.dtype, device=v.device).index_add_(0, seq, v)
    counts = torch.zeros(s + 1, dtype=v.dtype, device=v.device).index_add_(0, seq, m)
    idx = pairs.to(device=v.device, dtype=torch.long)
    return sums[idx], counts[idx]


def comparable_metrics(logp: torch.Tensor, ref_logp: torch.Tensor, labels: torch.Tensor, *,
                       beta: float, ignore_index: int = -100, seq_offsets=None,
                       pairs=None) -> dict[str, torch.Tensor]:
    """Metrics that mean the same for every method, from per-token log-probs of the policy
    (``logp``) and the reference (``ref_logp``) at the response tokens (labels not
    ``ignore_index``); padded [2B, T] rows (chosen rows first) or packed [N] tokens with
    ``seq_offsets`` and ``pairs``. Batch means over pairs (0-d tensors, no host sync):

    - ``rewards/accuracies_unweighted``: the fraction of pairs whose DPO implicit reward
      r = β·Σ_t (log π(y_t) − log π_ref(y_t)), unit weights, is strictly higher for the
      chosen response;
    - ``logps/chosen_delta``, ``logps/rejected_delta``: the mean over the response's tokens
      of log π(y_t) − log π_ref(y_t) (likelihood displacement: negative = the policy made
      that response less likely than the reference did, per token).
    """
    mask = labels != ignore_index
    delta = (logp.detach().double() - ref_logp.detach().double())
    sums, counts = _sequence_sums(delta, mask, seq_offsets, pairs)
    reward = beta * sums
    per_token = sums / counts.clamp(min=1)
    dtype = logp.dtype
    return {"rewards/accuracies_unweighted": (reward[:, 0] > reward[:, 1]).to(dtype).mean(),
            "logps/chosen_delta": per_token[:, 0].mean().to(dtype),
            "logps/rejected_delta": per_token[:, 1].mean().to(dtype)}


def displacement_warning(metrics: dict, desc: str, *, threshold: float | None = None,
                         prefix: str = "eval/") -> str | None:
    """Log (and return) a warning when the chosen responses' per-token log-probs fell by more
    than ``threshold`` nats against the reference while the rejected ones fell too: the
    likelihood displacement that precedes degenerate samples even when the loss and
    preference accuracy look excellent (``threshold`` default: :data:`COLLAPSE_THRESHOLD`,
    read at call time). None when there is nothing to report."""
    threshold = COLLAPSE_THRESHOLD if threshold is None else threshold
    chosen = metrics.get(f"{prefix}logps/chosen_delta")
    rejected = metrics.get(f"{prefix}logps/rejected_delta")
    if chosen is None or rejected is None or not (chosen < -threshold and rejected < 0):
        return None
    msg = (f"{desc}: likelihood displacement: on held-out pairs the policy's per-token "
           f"log-probs fell against the reference for the chosen responses "
           f"({chosen:+.3f} nats/token) and the rejected ones ({rejected:+.3f}); a falling "
           f"chosen likelihood often means degenerate samples even when the loss and the "
           f"preference accuracy look excellent: sample from the policy, or lower the lr "
           f"or the steps")
    log.warning("%s", msg)
    return msg


class SFTObjective:
    """Token-mean negative log-likelihood of one side's completions (chosen or rejected).

    Padded batches forward only that side's rows; packed batches mask the other side's
    labels. The normaliser is the completion tokens of the whole accumulated batch.
    """

    def __init__(self, *, model_cfg, device, side: str = "chosen", impl: str = "auto",
                 softcap: float | None = None):
        if side not in ("chosen", "rejected"):
            raise ValueError(f"side must be 'chosen' or 'rejected', got {side!r}")
        self.model_cfg, self.device, self.side = model_cfg, device, side
        self.impl, self.softcap = impl, softcap

    def _select(self, batch: dict) -> tuple[dict, torch.Tensor]:
        if _is_packed(batch):
            ids, pairs = batch["seq_ids"], batch["pairs"]
            keep = torch.isin(ids, pairs[:, 0 if self.side == "chosen" else 1]) & (ids >= 0)
            return batch, torch.where(keep.view(batch["labels"].shape), batch["labels"], -100)
        half = batch["input_ids"].shape[0] // 2
        rows = slice(0, half) if self.side == "chosen" else slice(half, 2 * half)
        sub = {k: (v[rows] if isinstance(v, torch.Tensor) and v.dim() >= 1
                   and v.shape[0] == 2 * half else v) for k, v in batch.items()}
        return sub, sub["labels"]

    def count(self, batch: dict) -> float:
        _, labels = self._select(batch)
        return float((labels != -100).sum())

    def __call__(self, model, batch: dict, *, normalizer: float):
        sub, labels = self._select(batch)
        hidden, weight, bias = forward_hidden(model, sub, self.model_cfg, self.device)
        # padded [B, T, D] / [B, T] or packed [1, N, D] / [N]: the same tokens, flattened
        logp = linear_logprobs(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1),
                               bias=bias, softcap=self.softcap, impl=self.impl)
        total = logp.sum()
        tokens = (labels != -100).sum().clamp(min=1)
        return -total / normalizer, {"nll": (-total / tokens).detach()}
