"""The fused head inside the model's own forward, for ``TISDPOTrainer``.

:func:`attach_head` gives a causal LM's forward one more keyword, ``tisdpo=``: a step
object that runs the decoder body to its last hidden state and then the fused ops, all
inside the forward the trainer calls — so DDP and FSDP see the LM head used (and sync or
reduce-scatter its gradient), and accelerate's autocast wraps it. Without the keyword the
forward is the one it replaced (TRL's own fused head, generation, ...). It is the mechanism
TRL 1.16 uses for its fused head (``trl.trainer.utils.add_fused_lm_head``), applied to the
model instance; no TRL code is changed.

- :class:`PolicyStep`: the ``TISDPOLoss`` (with per-pair metrics) and, optionally, the
  per-token statistics behind TRL's ``entropy``, ``logits/*`` and ``mean_token_accuracy``
  (one more LM-head pass over the completion tokens without gradient, through TRL's own
  ``trl.kernels.ChunkedLogProbFunction``, so they are TRL's numbers).
- :class:`ReferenceStep`: the reference's per-token log-probs without gradient (and its
  hidden states and head for KL presets).

Under autocast the head runs in the autocast dtype, as ``F.linear`` would (the last hidden
state of a pre-norm decoder is float32 even under bf16 autocast).
"""
from __future__ import annotations

import functools
import types

import torch

from tisdpo.train.headcheck import decoder, head
from tisdpo_kernels import linear_logprobs

__all__ = ["attach_head", "lm_of", "PolicyStep", "ReferenceStep", "HEAD_OUTPUTS"]

_MARK = "tisdpo_head_attached"
#: TRL's per-token outputs behind entropy, logits/* and mean_token_accuracy.
HEAD_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")
_VOCAB_CHUNK = 32768            # vocabulary columns per tile of the metrics pass (as TRL's)
_DROP = ("labels", "shift_labels", "num_items_in_batch", "return_dict")


def lm_of(model):
    """The causal LM whose forward gets the head: a PEFT model's base model (adapters are
    injected into its modules, so disabling them changes what its decoder computes)."""
    if hasattr(model, "peft_config") and callable(getattr(model, "get_base_model", None)):
        return model.get_base_model()
    return model


def attach_head(model) -> None:
    """Add the ``tisdpo=`` keyword to the forward of ``model`` (idempotent)."""
    lm = lm_of(model)
    if getattr(lm, _MARK, False):
        return
    inner = lm.forward

    @functools.wraps(type(lm).forward)     # keeps the signature generate() validates against
    def forward(self, *args, tisdpo=None, **kwargs):
        if tisdpo is None:
            return inner(*args, **kwargs)
        return tisdpo(self, args, kwargs)

    lm.forward = types.MethodType(forward, lm)
    setattr(lm, _MARK, True)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    dev = t.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else t.dtype


def _hidden_and_head(lm, args, kwargs, n_labels: int):
    """Hidden states predicting the shifted labels [rows, n_labels, D] and (weight, bias,
    softcap), cast to the compute dtype."""
    for k in _DROP:
        kwargs.pop(k, None)
    kwargs["use_cache"] = False
    out = decoder(lm)(*args, **kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    spec = head(lm)
    # prompt-learning PEFT prepends virtual tokens: keep the positions of the real ones
    hidden = hidden[:, -(n_labels + 1):-1]
    if spec.scale != 1.0:
        hidden = hidden * spec.scale
    dtype = _compute_dtype(hidden)
    weight, bias = spec.weight, spec.bias
    if hasattr(weight, "full_tensor"):     # a DTensor head FSDP did not gather: gather it
        weight = weight.full_tensor()
        bias = bias.full_tensor() if hasattr(bias, "full_tensor") else bias
    weight = weight if weight.dtype == dtype else weight.to(dtype)
    bias = bias if bias is None or bias.dtype == dtype else bias.to(dtype)
    return hidden.to(dtype), weight, bias, spec.softcap


class PolicyStep:
    """The policy's forward: ``TISDPOLoss`` on the last hidden states.

    ``reference``: keyword arguments of the reference for the loss (``ref_logps`` or
    ``ref_hidden``/``ref_weight``/``ref_bias``; empty for reference-free presets).
    ``normalizer``: the pairs of the micro-batch (TRL's mean over pairs).
    Returns ``{"loss", "pairs": per-pair metrics, "weights": mean-weight metrics,
    "head": TRL's per-token statistics or None}``.
    """

    def __init__(self, loss_fn, labels, *, reference: dict, weights, normalizer: float,
                 head_metrics: bool):
        self.loss_fn, self.labels, self.reference = loss_fn, labels, reference
        self.weights, self.normalizer, self.head_metrics = weights, normalizer, head_metrics

    def __call__(self, lm, args, kwargs):
        labels = self.labels
        hidden, weight, bias, softcap = _hidden_and_head(lm, args, kwargs, labels.shape[1])
        # a reference head in the same dtype (accelerate may have upcast its outputs)
        reference = {k: v.to(hidden.dtype) if k != "ref_logps" and v is not None else v
                     for k, v in self.reference.items()}
        loss, metrics = self.loss_fn(weight, hidden, labels, bias=bias, weights=self.weights,
                                     normalizer=self.normalizer, pair_metrics=True,
                                     **reference)
        pairs = {k: v for k, v in metrics.items() if v.dim() == 1}
        means = {k: v for k, v in metrics.items() if v.dim() == 0}
        stats = head_statistics(hidden, weight, bias, labels, softcap) \
            if self.head_metrics else None
        return {"loss": loss, "pairs": pairs, "weights": means, "head": stats}


class ReferenceStep:
    """The reference's forward, without gradient: per-token log-probs [rows, T] (0 off the
    completions) and, with ``keep_hidden`` (KL presets), its hidden states and head."""

    def __init__(self, labels, *, impl: str, keep_hidden: bool = False):
        self.labels, self.impl, self.keep_hidden = labels, impl, keep_hidden

    @torch.no_grad()
    def __call__(self, lm, args, kwargs):
        labels = self.labels
        hidden, weight, bias, softcap = _hidden_and_head(lm, args, kwargs, labels.shape[1])
        out = {"logps": linear_logprobs(hidden, weight, labels, bias=bias, softcap=softcap,
                                        impl=self.impl)}
        if self.keep_hidden:
            out.update(hidden=hidden, weight=weight, bias=bias)
        return out


@torch.no_grad()
def head_statistics(hidden, weight, bias, labels, softcap) -> dict[str, torch.Tensor]:
    """TRL's per-token ``entropy``, ``mean_logits``, ``is_top1`` (and ``log_probs``) at the
    completion tokens, [rows, T] (0 / False elsewhere), from TRL's own chunked kernel."""
    from trl.kernels import ChunkedLogProbFunction

    mask = labels != -100
    per_token = ChunkedLogProbFunction.apply(
        hidden[mask].detach(), weight.detach(), None if bias is None else bias.detach(),
        labels[mask], 1.0, _VOCAB_CHUNK, softcap, 1.0, HEAD_OUTPUTS)
    names = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
    return {n: x.new_zeros(mask.shape).masked_scatter(mask, x)
            for n, x in zip(names, per_token) if x is not None}
