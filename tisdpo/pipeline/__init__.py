"""The TIS-DPO(D) method as resumable stages under one run directory: contrastive models,
offline token weights, policy training; the demo and the token-weight heat map.

Modules: ``context`` (what every stage shares), ``stages`` (SFT, contrastive, policy, the
whole pipeline), ``weights`` (the offline weights pass and the weight rules), ``demo``,
``heatmap``.
"""
