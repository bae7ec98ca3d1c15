"""Torch backend: token-chunked PyTorch with recompute in backward, no host syncs; runs anywhere.

One module per op, named after it (``linear_logprobs``, ``linear_token_kl``, ``token_weights``,
``preference_loss``, ``linear_preference_loss``); ``tisdpo_kernels.ops`` imports each where it
dispatches.
"""
