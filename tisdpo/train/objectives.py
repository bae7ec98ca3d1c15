"""What a stage optimises: an objective maps (model, batch, normaliser) to (loss, metrics) and
says how much of the normaliser a batch holds (``count``).

:class:`PreferenceObjective` runs a :class:`tisdpo.loss.TISDPOLoss` on the policy's hidden
states (the reference from precomputed log-probs or a reference model), :class:`SFTObjective`
the token-mean NLL of one side's completions; :func:`forward_hidden` gives both the hidden
states before the head and the head itself, packed rows attending per sequence.
"""
from __future__ import annotations

import torch

from tisdpo.train.collate import packed_attention_kwargs
from tisdpo.train.model import autocast, head, hidden_states
from tisdpo_kernels import linear_logprobs

__all__ = ["PreferenceObjective", "SFTObjective", "forward_hidden"]


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

    def __init__(self, loss_fn, *, model_cfg, device, ref_model=None, use_weights=False):
        self.loss_fn, self.model_cfg, self.device = loss_fn, model_cfg, device
        self.ref_model, self.use_weights = ref_model, use_weights
        cfg = loss_fn.config
        self.reference_free, self.needs_ref_hidden = cfg.reference_free, cfg.uses_kl

    def count(self, batch: dict) -> float:
        """Pairs in the batch (the loss is a mean over pairs)."""
        return float(batch["pairs"].shape[0] if _is_packed(batch)
                     else batch["input_ids"].shape[0] // 2)

    def __call__(self, model, batch: dict, *, normalizer: float):
        hidden, weight, bias = forward_hidden(model, batch, self.model_cfg, self.device)
        kwargs: dict = {}
        if not self.reference_free:
            if self.needs_ref_hidden or batch.get("ref_logps") is None:
                if self.ref_model is None:
                    raise ValueError("this loss needs a reference model (no precomputed "
                                     "ref_logps in the data, or a KL term)")
                with torch.no_grad():
                    ref_hidden, ref_weight, ref_bias = forward_hidden(
                        self.ref_model, batch, self.model_cfg, self.device, grad=False)
                kwargs.update(ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias)
            else:
                kwargs["ref_logps"] = batch["ref_logps"]
        if self.use_weights and batch.get("weights") is not None:
            kwargs["weights"] = batch["weights"]
        if _is_packed(batch):
            kwargs.update(seq_offsets=batch["seq_offsets"], pairs=batch["pairs"])
        return self.loss_fn(weight, hidden, batch["labels"], bias=bias, normalizer=normalizer,
                            **kwargs)


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
        logp = linear_logprobs(hidden, weight, labels, bias=bias, softcap=self.softcap,
                               impl=self.impl)
        total = logp.sum()
        tokens = (labels != -100).sum().clamp(min=1)
        return -total / normalizer, {"nll": (-total / tokens).detach()}
