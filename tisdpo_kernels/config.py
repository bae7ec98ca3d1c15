"""Frozen option dataclasses for the O(tokens) ops and the named loss presets.

The unified formulation (docs/ALGORITHMS.md §8), per pair b and side s ∈ {w, l}:

    A_s = (1/N_s) Σ_t m_t ω_t (lp_t − ρ·lr_t)         N_s = 1 ("sum") or Σ_t m_t ("mean")
    K_s = Σ_t m_t ν_t k_t                              ν = ω ("kl_token_weighted") or 1
    z   = A_w − A_l + c_w·K̂_w + c_l·K_l − γ₀           K̂_w = sg(K_w) when kl_stop_grad_chosen
    ℓ   = link_β,ε(z)                                   loss = Σ_b ℓ_b / #pairs with tokens
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from tisdpo_kernels.validate import check_scalar, require

Link = Literal["sigmoid", "conservative", "robust", "ipo", "hinge"]
KLDirection = Literal["policy_ref", "ref_policy"]
WeightMethod = Literal[
    "exp_clamp", "rank_based", "threshold_and_scale", "threshold", "binary", "origin", "cdpo"
]
LINKS = ("sigmoid", "conservative", "robust", "ipo", "hinge")
KL_DIRECTIONS = ("policy_ref", "ref_policy")
WEIGHT_METHODS = (
    "exp_clamp", "rank_based", "threshold_and_scale", "threshold", "binary", "origin", "cdpo"
)


def _floats(obj, **bounds) -> None:
    """Check each named field of a frozen dataclass as a finite number within its bounds
    (``check_scalar``) and store it as a Python float (numpy scalars too)."""
    for name, kw in bounds.items():
        object.__setattr__(obj, name, check_scalar(name, getattr(obj, name), **kw))


def _bools(obj, *names) -> None:
    """Each named field is a bool: a string such as "false" would read as true."""
    for name in names:
        value = getattr(obj, name)
        require(isinstance(value, bool), f"{name} must be a bool, got {value!r}")


@dataclass(frozen=True)
class PreferenceConfig:
    """Options of ``preference_loss`` (docs/ALGORITHMS.md §8).

    link: sigmoid | conservative | robust | ipo | hinge.  beta: β > 0.
    epsilon: label-smoothing ε ∈ [0, 0.5) for conservative / robust.
    margin: γ₀ subtracted from z before the link (SimPO's gamma_beta_ratio).
    reduction: "sum" (N_s = 1) or "mean" (N_s = response tokens of the sequence).
    reference_free: ρ = 0 (SimPO); reference log-probs are then not needed.
    kl: None, "policy_ref" (KL(π‖ref), TIS-DPO's η) or "ref_policy" (KL(ref‖π), TDPO).
    kl_chosen_coef, kl_rejected_coef: c_w and c_l.  kl_stop_grad_chosen: K̂_w = sg(K_w).
    kl_token_weighted: ν_t = ω_t (TIS-DPO) instead of 1 (TDPO).
    granularity: "seq" (everything above) or "pos" (cDPO's released code: pairs position t of
    the chosen row with position t of the rejected row, mean over all B×T slots; padded only).
    """

    link: Link = "sigmoid"
    beta: float = 0.1
    epsilon: float = 0.0
    margin: float = 0.0
    reduction: Literal["sum", "mean"] = "sum"
    reference_free: bool = False
    kl: KLDirection | None = None
    kl_chosen_coef: float = 0.0
    kl_rejected_coef: float = 0.0
    kl_stop_grad_chosen: bool = False
    kl_token_weighted: bool = False
    granularity: Literal["seq", "pos"] = "seq"

    def __post_init__(self):
        require(self.link in LINKS, f"link must be one of {LINKS}, got {self.link!r}")
        _floats(self, beta=dict(low=0.0, low_open=True),
                epsilon=dict(low=0.0, high=0.5, high_open=True), margin={},
                kl_chosen_coef={}, kl_rejected_coef={})
        _bools(self, "reference_free", "kl_stop_grad_chosen", "kl_token_weighted")
        require(self.reduction in ("sum", "mean"),
                f"reduction must be 'sum' or 'mean', got {self.reduction!r}")
        require(self.kl is None or self.kl in KL_DIRECTIONS,
                f"kl must be None or one of {KL_DIRECTIONS}, got {self.kl!r}")
        require(self.epsilon == 0 or self.link in ("conservative", "robust"),
                f"epsilon={self.epsilon} is the label smoothing of the conservative and robust "
                f"links; link {self.link!r} has none (it would be ignored)")
        require(self.kl is not None or not (self.kl_chosen_coef or self.kl_rejected_coef
                                            or self.kl_stop_grad_chosen or self.kl_token_weighted),
                "kl_chosen_coef, kl_rejected_coef, kl_stop_grad_chosen and kl_token_weighted "
                "need kl='policy_ref' or 'ref_policy' (with kl=None they would be ignored)")
        require(self.granularity in ("seq", "pos"),
                f"granularity must be 'seq' or 'pos', got {self.granularity!r}")
        require(not (self.granularity == "pos" and self.kl is not None),
                "granularity='pos' does not support KL terms")
        require(not (self.granularity == "pos" and (self.margin != 0 or self.reduction != "sum")),
                f"granularity='pos' (per-position pairs) has no margin and no length "
                f"normalisation: margin must be 0 and reduction 'sum', got margin={self.margin} "
                f"and reduction={self.reduction!r}")

    @property
    def uses_kl(self) -> bool:
        return self.kl is not None and (self.kl_chosen_coef != 0 or self.kl_rejected_coef != 0)

    def replace(self, **changes) -> PreferenceConfig:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class WeightParams:
    """Parameters of ``token_weights`` (docs/ALGORITHMS.md §2, §6.2).

    exp_clamp (paper): w = k·exp(μ·clamp(c, lower, upper)), μ = +1 chosen / −1 rejected.
    threshold_and_scale: clip(s, clip_lower, clip_upper) mapped linearly onto [w_min, w_max].
    threshold: clip(s, clip_lower, clip_upper) (may be negative).  origin: s.
    rank_based: rank of s within its sequence mapped linearly onto [w_min, w_max]; a
    length-1 sequence gets (w_min + w_max) / 2.  binary: 1 for the top ``top_percent``% of
    s within the sequence, else 0.  cdpo: chosen 1 (``only_neg``) or s, rejected 1 − s, where
    s = exp(log-score) is cDPO's contrastive probability.
    round_decimals: round c to this many decimals first (the official code stores 2).
    """

    k: float = 1.0
    lower: float = -0.5
    upper: float = 1.5
    clip_lower: float = -1.5
    clip_upper: float = 1.5
    w_min: float = 0.7
    w_max: float = 1.3
    top_percent: float = 100.0
    only_neg: bool = True
    round_decimals: int | None = None

    def __post_init__(self):
        _floats(self, k=dict(low=0.0, low_open=True), lower={}, upper={}, clip_lower={},
                clip_upper={}, w_min={}, w_max={},
                top_percent=dict(low=0.0, high=100.0, low_open=True))
        require(self.lower <= self.upper,
                f"lower (L={self.lower}) must not exceed upper (U={self.upper})")
        require(self.clip_lower < self.clip_upper,
                f"clip_lower ({self.clip_lower}) must be below clip_upper ({self.clip_upper})")
        require(self.w_min <= self.w_max,
                f"w_min ({self.w_min}) must not exceed w_max ({self.w_max})")
        _bools(self, "only_neg")
        require(self.round_decimals is None or
                (isinstance(self.round_decimals, int) and not isinstance(self.round_decimals, bool)
                 and 0 <= self.round_decimals <= 8),
                f"round_decimals must be None or an int in [0, 8], got {self.round_decimals!r}")

    def replace(self, **changes) -> WeightParams:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class LossPreset:
    """A named method: the loss options plus the weight rule used when weights are estimated."""

    name: str
    config: PreferenceConfig
    weight_method: WeightMethod | None
    description: str


def _p(name, weight_method, description, **cfg) -> LossPreset:
    return LossPreset(name, PreferenceConfig(**cfg), weight_method, description)


PRESETS: dict[str, LossPreset] = {p.name: p for p in (
    _p("dpo", None, "−log σ(β(M_w − M_l))"),
    _p("conservative", None, "label-smoothed DPO, ε = 0.1", link="conservative", epsilon=0.1),
    _p("robust", None, "robust DPO (Chowdhury et al.), ε = 0.1", link="robust", epsilon=0.1),
    _p("ipo", None, "(h − 1/(2β))², h on per-token means (TRL)", link="ipo", reduction="mean"),
    _p("ipo_sum", None, "(h − 1/(2β))², h on token sums (DPO reference code)", link="ipo"),
    _p("hinge", None, "max(0, 1 − β(M_w − M_l))", link="hinge"),
    _p("simpo", None, "−log σ(β(ā_w − ā_l) − γ), no reference; β=2, γ/β=0.25",
       beta=2.0, margin=0.25, reduction="mean", reference_free=True),
    _p("tdpo1", None, "z = M_w − M_l − (K_l − K_w), K = Σ KL(ref‖π)",
       kl="ref_policy", kl_chosen_coef=1.0, kl_rejected_coef=-1.0),
    _p("tdpo2", None, "z = M_w − M_l − α(K_l − sg(K_w)), α = 0.5",
       kl="ref_policy", kl_chosen_coef=0.5, kl_rejected_coef=-0.5, kl_stop_grad_chosen=True),
    _p("cdpo", "cdpo", "DPO with rejected tokens weighted 1 − s_t (critical tokens)"),
    _p("cdpo_code", "cdpo", "cDPO released code: per-position pairs, mean over B×T",
       granularity="pos"),
    _p("tisdpo", "rank_based",
       "official code default: −log σ(β(Σ ω_w Δ_w − Σ ω_l Δ_l)), rank-based weights"),
    _p("tisdpo_paper", "exp_clamp",
       "paper with η: z = Σ ω_w Δ_w − Σ ω_l Δ_l − (Σ ω_w KL_w − Σ ω_l KL_l), KL(π‖ref)",
       kl="policy_ref", kl_chosen_coef=-1.0, kl_rejected_coef=1.0, kl_token_weighted=True),
    _p("tisdpo_paper_no_eta", "exp_clamp", "paper w.o. η: exp-clamp weights, no KL"),
    _p("tisdpo_token_level", "rank_based",
       "official code token_level: z = Σ ω_w Δ_w − Σ ω_l Δ_l − α(K_w − K_l), α = 0.5",
       kl="policy_ref", kl_chosen_coef=-0.5, kl_rejected_coef=0.5, kl_token_weighted=True),
    _p("tisdpo_threshold_and_scale", "threshold_and_scale",
       "official code: weights 1 + 0.2·clip(s, −1.5, 1.5)"),
    _p("tisdpo_binary", "binary", "official code: weight 1 on the top p% tokens, else 0"),
)}


def get_preset(name: str) -> LossPreset:
    if name not in PRESETS:
        raise ValueError(f"unknown method {name!r}; valid methods are {sorted(PRESETS)}")
    return PRESETS[name]


# Presets whose KL coefficients are ±α (docs/ALGORITHMS.md §3.2 token_level, §6.1 TDPO2).
ALPHA_METHODS = ("tdpo2", "tisdpo_token_level")


def resolve_preset(method: str, *, beta: float | None = None, epsilon: float | None = None,
                   label_smoothing: float | None = None, alpha: float | None = None,
                   gamma_beta_ratio: float | None = None, weight_method: str | None = None,
                   weight_params: "WeightParams | None" = None):
    """A preset with the user's hyperparameters applied (None = the preset's default):
    returns (PreferenceConfig, weight rule or None, WeightParams).

    beta > 0; epsilon / label_smoothing (aliases) in [0, 0.5), which turn a sigmoid link into
    the conservative one and are refused by ipo and hinge; alpha > 0 scales the KL terms of
    ``ALPHA_METHODS`` (keeping their signs); gamma_beta_ratio ≥ 0 is simpo's margin;
    weight_method overrides the preset's rule for weights computed from contrastive
    log-probs, weight_params its parameters (only with a rule).
    """
    preset = get_preset(method)
    cfg = preset.config
    changes = {}
    if beta is not None:
        check_scalar("beta", beta, low=0.0, low_open=True)
        changes["beta"] = float(beta)
    if epsilon is not None and label_smoothing is not None:
        raise ValueError(f"pass epsilon or its alias label_smoothing, not both (got "
                         f"epsilon={epsilon!r}, label_smoothing={label_smoothing!r})")
    eps_name = "epsilon" if epsilon is not None else "label_smoothing"
    eps = epsilon if epsilon is not None else label_smoothing
    if eps is not None:
        check_scalar(eps_name, eps, low=0.0, high=0.5, high_open=True)
        if cfg.link in ("ipo", "hinge") and eps != 0:
            raise ValueError(f"{eps_name}={eps!r}: method {method!r} uses the {cfg.link} "
                             f"link, which has no label smoothing")
        changes["epsilon"] = float(eps)
        if cfg.link == "sigmoid" and eps != 0:
            changes["link"] = "conservative"
    if alpha is not None:
        require(method in ALPHA_METHODS,
                f"alpha={alpha!r}: alpha scales the KL terms of {ALPHA_METHODS} only, "
                f"not of method {method!r}")
        check_scalar("alpha", alpha, low=0.0, low_open=True)
        changes["kl_chosen_coef"] = float(alpha) * (1 if cfg.kl_chosen_coef > 0 else -1)
        changes["kl_rejected_coef"] = float(alpha) * (1 if cfg.kl_rejected_coef > 0 else -1)
    if gamma_beta_ratio is not None:
        require(method == "simpo",
                f"gamma_beta_ratio={gamma_beta_ratio!r} applies to method 'simpo' only, "
                f"not {method!r}")
        check_scalar("gamma_beta_ratio", gamma_beta_ratio, low=0.0)
        changes["margin"] = float(gamma_beta_ratio)
    if weight_method is not None:
        require(weight_method in WEIGHT_METHODS,
                f"weight_method must be one of {WEIGHT_METHODS}, got {weight_method!r}")
    if weight_params is not None:
        require(isinstance(weight_params, WeightParams),
                f"weight_params must be a tisdpo_kernels.WeightParams, got "
                f"{type(weight_params).__name__}")
        require(weight_method is not None or preset.weight_method is not None,
                f"weight_params given but method {method!r} has no weight rule; pass "
                f"weight_method= to compute weights on the fly")
    return (cfg.replace(**changes), weight_method or preset.weight_method,
            weight_params or WeightParams())


@dataclass(frozen=True)
class HeadOptions:
    """Non-tensor options of the fused LM-head ops, crossing the autograd boundary as one.

    filter_eps: None (exact) or ε ∈ (0, 1): the backward drops, per chunk of rows, every
    vocabulary column that no row of the chunk targets and whose softmax probability is below
    ε in every row of the chunk (docs/FILTERING.md).
    """

    ignore_index: int = -100
    softcap: float | None = None
    return_lse: bool = False
    filter_eps: float | None = None


@dataclass(frozen=True)
class KLOptions:
    """Non-tensor options of ``linear_token_kl``."""

    direction: KLDirection = "policy_ref"
    ignore_index: int = -100
    softcap: float | None = None


@dataclass(frozen=True)
class PairHeadOptions:
    """Non-tensor options of ``linear_preference_loss`` (the one-sweep preference head).

    pair_rows: per pair, (chosen row ranges, rejected row ranges) of the flat token
    dimension, each range a (start, end) pair of ints known on the host; every token row
    belongs to at most one pair. needs: which of (hidden, weight, bias) want a gradient.
    """

    config: PreferenceConfig
    pair_rows: tuple
    needs: tuple[bool, bool, bool] = (True, True, True)
    ignore_index: int = -100
    softcap: float | None = None
