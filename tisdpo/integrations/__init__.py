"""Integrations with other training libraries (each needs its library installed).

- :mod:`tisdpo.integrations.trl`: ``TISDPOTrainer`` / ``TISDPOConfig``, drop-in
  replacements for TRL's ``DPOTrainer`` / ``DPOConfig`` (the ``trl`` extra).

Nothing is imported here, so ``import tisdpo`` never needs TRL.
"""
