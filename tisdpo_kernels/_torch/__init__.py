"""Torch backend: token-chunked PyTorch, recompute in backward, no host syncs.

One module per op, each exposing a function named after the op; imported on first use.
"""
from __future__ import annotations

import importlib

_MODULES = {
    "linear_logprobs": "linear_logprobs",
    "linear_token_kl": "token_kl",
    "token_weights": "token_weights",
    "preference_loss": "preference",
}


def __getattr__(op: str):
    if op not in _MODULES:
        raise AttributeError(op)
    return importlib.import_module(f"{__name__}.{_MODULES[op]}")
