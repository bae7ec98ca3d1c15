"""tisdpo_kernels: fused token-weighted preference-loss ops (math only, no models, no data).

Public ops, each with ``impl="auto" | "triton" | "torch" | "reference"``:

- :func:`linear_logprobs` — per-token log p(target) from hidden states and the LM head.
- :func:`linear_token_kl` — per-token full-vocabulary KL between policy and reference heads.
- :func:`contrastive_logscores` — cDPO's contrastive token scores.
- :func:`token_weights` — TIS-DPO / cDPO token weights from contrastive log-probs.
- :func:`preference_loss` — the unified weighted DPO-family loss and TRL-named metrics.
- :func:`linear_preference_loss` — that loss straight from hidden states, every head gradient
  formed in one forward sweep (the one-sweep preference head; ``strategy.py`` says when).
"""
from tisdpo_kernels._impl import Impl
from tisdpo_kernels.config import (
    PRESETS, HeadOptions, KLOptions, LossPreset, PreferenceConfig, WeightParams, get_preset,
)
from tisdpo_kernels.ops import (
    contrastive_logscores, linear_logprobs, linear_preference_loss, linear_token_kl,
    preference_loss, token_weights,
)

__all__ = [
    "Impl", "PRESETS", "HeadOptions", "KLOptions", "LossPreset", "PreferenceConfig",
    "WeightParams", "get_preset", "contrastive_logscores", "linear_logprobs",
    "linear_token_kl", "preference_loss", "token_weights", "linear_preference_loss",
]
