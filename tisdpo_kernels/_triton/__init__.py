"""Triton backend: fused kernels (compiled on CUDA, interpreted on CPU under TRITON_INTERPRET=1).

One module per op, each exposing a function named after the op; imported on first use so
that importing tisdpo_kernels never imports triton.
"""
from __future__ import annotations

import importlib

_MODULES = {
    "linear_logprobs": "lm_head",
    "linear_token_kl": "token_kl",
    "token_weights": "token_weights",
    "preference_loss": "preference",
}


def __getattr__(op: str):
    if op not in _MODULES:
        raise AttributeError(op)
    name = f"{__name__}.{_MODULES[op]}"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name != name:
            raise
        raise NotImplementedError(
            f"impl='triton' has no kernel for {op} yet; use impl='torch' or impl='reference'"
        ) from None
