"""tisdpo: fused token-weighted preference losses (TIS-DPO, DPO, IPO, SimPO, TDPO, cDPO).

``from tisdpo import TISDPOLoss`` imports torch and ``tisdpo_kernels`` only; the data,
training and pipeline modules (which need transformers / datasets) are imported explicitly.
"""
from tisdpo.loss import TISDPOLoss, presets_markdown

__all__ = ["TISDPOLoss", "presets_markdown"]
