"""Which TRL options ``TISDPOTrainer`` accepts, and the ``TISDPOLoss`` they select.

Needs no TRL import: it reads the fields of a ``DPOConfig`` (``TISDPOConfig``) by name.

``loss_type`` maps to a preset where TRL 1.16's ``DPOTrainer`` loss and a tisdpo preset are
the same function: ``sigmoid`` → ``dpo``, ``ipo`` → ``ipo`` (per-token means, as TRL),
``hinge`` → ``hinge``, ``robust`` → ``robust`` (ε = ``label_smoothing``). ``method=`` picks
any preset instead (then ``loss_type`` must stay ``sigmoid``, its default). Every other TRL
loss option changes the loss in a way no preset computes and is refused in one line naming
the option: the other loss types, loss combinations, f-divergences, WPO weighting, LD-DPO.

``label_smoothing`` keeps TRL's meaning: the flip rate ε of ``robust``, the conservative ε
of SimPO as TRL's ``CPOTrainer`` uses it, the ε of ``conservative``. TRL 1.16 ignores it for
``sigmoid``, ``ipo`` and ``hinge``; a non-zero value there, or with any preset whose loss
would change with it, is refused rather than given a different meaning.
"""
from __future__ import annotations

from tisdpo.loss import TISDPOLoss
from tisdpo_kernels.config import PRESETS, get_preset

__all__ = ["TRL_LOSS_PRESETS", "REFUSED_LOSS_TYPES", "SMOOTHED_METHODS", "resolve_method",
           "build_loss", "check_reference", "weight_columns", "needs_weights", "WEIGHT_COLUMNS"]

#: TRL 1.16 ``DPOConfig.loss_type`` → the preset computing the same loss.
TRL_LOSS_PRESETS = {"sigmoid": "dpo", "ipo": "ipo", "hinge": "hinge", "robust": "robust"}
#: TRL 1.16 loss types with no preset (each refused by name).
REFUSED_LOSS_TYPES = ("exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
                      "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
#: Presets whose loss takes ``label_smoothing`` as TRL means it (else it must be 0).
SMOOTHED_METHODS = ("robust", "conservative", "simpo")
#: The per-token weight columns read by default (``token_weights="auto"``).
WEIGHT_COLUMNS = ("chosen_weight", "rejected_weight")


def _refuse(option: str, why: str) -> None:
    raise ValueError(f"TISDPOConfig {option}: {why}")


def resolve_method(args) -> str:
    """The preset ``args`` select (``method``, else from ``loss_type``); refuses every TRL
    loss option no preset computes."""
    loss_types = args.loss_type if isinstance(args.loss_type, (list, tuple)) \
        else [args.loss_type]
    if len(loss_types) != 1:
        _refuse(f"loss_type={list(loss_types)}", "combines several losses; TISDPOTrainer "
                "trains one preset (use one loss_type or method=)")
    loss_type = loss_types[0]
    weights = getattr(args, "loss_weights", None)
    if weights is not None and list(weights) != [1.0]:
        _refuse(f"loss_weights={list(weights)}", "weights a loss combination, which "
                "TISDPOTrainer does not run; leave it unset")
    if loss_type not in TRL_LOSS_PRESETS:
        known = loss_type in REFUSED_LOSS_TYPES
        _refuse(f"loss_type={loss_type!r}", ("has no tisdpo preset" if known else
                "is not a TRL 1.16 loss type") + f"; supported: {sorted(TRL_LOSS_PRESETS)}, "
                f"or method= one of {sorted(PRESETS)}")
    method = getattr(args, "method", None)
    if method is None:
        method = TRL_LOSS_PRESETS[loss_type]
    else:
        if method not in PRESETS:
            _refuse(f"method={method!r}", f"unknown preset; valid: {sorted(PRESETS)}")
        if loss_type != "sigmoid":
            _refuse(f"method={method!r} with loss_type={loss_type!r}",
                    "set one of them (loss_type keeps its default 'sigmoid' with method=)")
    if getattr(args, "f_divergence_type", "reverse_kl") != "reverse_kl":
        _refuse(f"f_divergence_type={args.f_divergence_type!r}", "f-divergence "
                "regularisers have no tisdpo preset; use the default 'reverse_kl'")
    if getattr(args, "use_weighting", False):
        _refuse("use_weighting=True", "WPO pair weighting has no tisdpo preset")
    if getattr(args, "ld_alpha", None) is not None:
        _refuse(f"ld_alpha={args.ld_alpha!r}", "LD-DPO length weighting has no tisdpo preset")
    return method


def _smoothing(args, method: str, from_loss_type: bool) -> float | None:
    """``label_smoothing`` as the loss's ε, None for the preset's default; refuses a value
    TRL would ignore or that would mean something else here."""
    ls = float(getattr(args, "label_smoothing", 0.0) or 0.0)
    if method in SMOOTHED_METHODS:
        if from_loss_type:                     # loss_type='robust': TRL's ε, 0 included
            return ls
        return ls if ls > 0 else None          # method=: 0 (TRL's default) keeps the preset's
    if ls != 0:
        _refuse(f"label_smoothing={ls!r}", f"method {method!r} has no label smoothing in TRL "
                f"1.16 (its DPOTrainer ignores it for sigmoid, ipo and hinge); use "
                f"method='conservative' or loss_type='robust', or set it to 0")
    return None


def build_loss(args, *, softcap: float | None = None) -> TISDPOLoss:
    """The ``TISDPOLoss`` that ``args`` (a ``TISDPOConfig``) select."""
    method = resolve_method(args)
    eps = _smoothing(args, method, getattr(args, "method", None) is None)
    return TISDPOLoss(method, beta=args.beta, label_smoothing=eps,
                      alpha=getattr(args, "alpha", None),
                      gamma_beta_ratio=getattr(args, "gamma_beta_ratio", None),
                      softcap=softcap, impl=getattr(args, "impl", "auto"),
                      strategy=getattr(args, "strategy", "auto"),
                      filter_eps=getattr(args, "filter_eps", None))


def check_reference(args, loss: TISDPOLoss, method: str) -> None:
    """Refuses ``precompute_ref_log_probs`` for presets whose KL needs reference hidden states."""
    if loss.config.uses_kl and getattr(args, "precompute_ref_log_probs", False):
        _refuse("precompute_ref_log_probs=True", f"method {method!r} needs the reference "
                f"model's hidden states (a full-vocabulary KL), not stored log-probs")


def weight_columns(args, method: str) -> tuple[str, str] | None:
    """The (chosen, rejected) weight columns ``token_weights`` names: ``"auto"`` →
    ``chosen_weight``/``rejected_weight`` for a weighted preset (which requires them), None
    (unit weights, as TRL's DPOTrainer: columns ignored) for any other; ``"none"`` → None;
    ``"<chosen>,<rejected>"`` → those, for any preset (used when present)."""
    spec = getattr(args, "token_weights", "auto")
    if spec in (None, "none"):
        return None
    if spec == "auto":
        return WEIGHT_COLUMNS if needs_weights(method) else None
    parts = [p.strip() for p in str(spec).split(",")]
    if len(parts) != 2 or not all(parts):
        _refuse(f"token_weights={spec!r}", "must be 'auto', 'none' or "
                "'<chosen column>,<rejected column>'")
    return parts[0], parts[1]


def needs_weights(method: str) -> bool:
    """Whether the preset weights tokens (its loss without weights would be plain DPO)."""
    return get_preset(method).weight_method is not None
