"""TRL's metrics, with TRL 1.16's meaning and aggregation, from a ``TISDPOTrainer`` step.

Reference-based presets log what ``DPOTrainer`` logs: ``rewards/chosen`` = β·Σ_t(log π −
log π_ref) over the response's tokens (token sums for IPO too, unweighted for the weighted
presets), ``rewards/accuracies``, ``rewards/margins``, ``logps/*`` = Σ_t log π. SimPO (no
reference) logs what TRL's ``CPOTrainer`` logs for it: ``logps/*`` = the per-token mean and
``rewards/*`` = β times it. Per-pair values are gathered over processes and averaged; the
per-token ones (``entropy``, ``logits/*``, ``mean_token_accuracy``) are token-weighted over
processes; ``num_tokens`` counts attention-mask tokens — each as DPOTrainer does it. The
loss's own metrics follow under ``tisdpo/``.
"""
from __future__ import annotations

import torch

__all__ = ["record_metrics"]


def _token_mean(acc, values, mask) -> float:
    total = acc.gather_for_metrics((values * mask).sum()).sum()
    count = acc.gather_for_metrics(mask.sum()).sum()
    return (total / count).item() if count > 0 else 0.0


def record_metrics(trainer, mode: str, out: dict, labels, ref_logps, attention_mask) -> None:
    """Append this micro-batch's metrics to ``trainer._metrics[mode]`` (TRL's store)."""
    acc = trainer.accelerator
    m = trainer._metrics[mode]
    mask = labels != -100
    stats = out["head"]
    if stats is not None:
        m["entropy"].append(_token_mean(acc, stats["entropy"], mask))
    if mode == "train":
        n = acc.gather_for_metrics(attention_mask.sum()).sum().item()
        trainer._total_train_tokens += n // trainer._tp_size
    m["num_tokens"] = [trainer._total_train_tokens]
    if stats is not None:
        (c_mask, r_mask), (c_logit, r_logit) = mask.chunk(2), stats["mean_logits"].chunk(2)
        m["logits/chosen"].append(_token_mean(acc, c_logit, c_mask))
        m["logits/rejected"].append(_token_mean(acc, r_logit, r_mask))
        top1 = stats["is_top1"].chunk(2)[0] & c_mask
        m["mean_token_accuracy"].append(_token_mean(acc, top1, c_mask))

    cfg = trainer._tisdpo_loss.config
    pairs = out["pairs"]
    lp_c, lp_r = pairs["logps/chosen"], pairs["logps/rejected"]
    if cfg.reference_free:                    # SimPO: CPOTrainer's per-token means
        chosen, rejected = cfg.beta * lp_c, cfg.beta * lp_r
    else:                                     # logps/* are token sums (ipo included)
        # the same float64 summation as the loss's own sums, so equal log-probs tie exactly
        ref_c, ref_r = torch.where(mask, ref_logps.double(), 0.0).sum(-1).to(lp_c.dtype) \
            .chunk(2)
        chosen, rejected = cfg.beta * (lp_c - ref_c), cfg.beta * (lp_r - ref_r)
    m["rewards/chosen"].append(acc.gather(chosen).mean().item())
    m["rewards/rejected"].append(acc.gather(rejected).mean().item())
    m["rewards/accuracies"].append(acc.gather((chosen > rejected).float()).mean().item())
    m["rewards/margins"].append(acc.gather(chosen - rejected).mean().item())
    m["logps/chosen"].append(acc.gather(lp_c).mean().item())
    m["logps/rejected"].append(acc.gather(lp_r).mean().item())
    for name, value in pairs.items():
        m[f"tisdpo/{name}"].append(acc.gather(value).mean().item())
    for name, value in out["weights"].items():
        m[f"tisdpo/{name}"].append(acc.gather(value.reshape(1)).mean().item())
