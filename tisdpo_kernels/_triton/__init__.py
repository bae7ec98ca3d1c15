"""Triton backend: fused kernels, compiled on CUDA, interpreted on CPU under TRITON_INTERPRET=1.

One module per op, named after it (``linear_logprobs``, ``linear_token_kl``, ``token_weights``,
``preference_loss``, ``linear_preference_loss``: the one-sweep head's chunk epilogue), plus
``common`` (shared @triton.jit helpers and launch helpers) and ``configs`` (every kernel's
launch configuration). ``tisdpo_kernels.ops`` imports each op's
module where it dispatches, so importing ``tisdpo_kernels`` never imports triton.
"""
