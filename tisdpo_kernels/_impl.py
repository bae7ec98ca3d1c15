"""Backend selection: the op name fixes the math, ``impl=`` picks who computes it.

Nothing falls back silently: an unknown impl, or one that cannot run on the given
device, raises with the valid choices.
"""
from __future__ import annotations

from enum import Enum

import torch

from tisdpo_kernels import _env


class Impl(str, Enum):
    AUTO = "auto"
    TRITON = "triton"
    TORCH = "torch"
    REFERENCE = "reference"


_CHOICES = ", ".join(repr(i.value) for i in Impl)


def triton_available() -> bool:
    """True when the ``triton`` package imports (it does not say a GPU exists)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_impl(impl: str | Impl, device: torch.device, *, op: str) -> Impl:
    """Turn ``impl`` into a concrete backend for tensors on ``device``.

    ``auto`` is triton on CUDA and torch on CPU. ``triton`` on a CPU tensor needs
    ``TRITON_INTERPRET=1`` (set before import); otherwise it raises.
    """
    try:
        choice = Impl(impl)
    except ValueError:
        raise ValueError(f"{op}: unknown impl={impl!r}; valid choices are {_CHOICES}") from None
    if choice is Impl.AUTO:
        return Impl.TRITON if (device.type == "cuda" and triton_available()) else Impl.TORCH
    if choice is Impl.TRITON:
        if not triton_available():
            raise ValueError(
                f"{op}: impl='triton' needs the triton package, which is not installed; "
                f"valid choices here are 'torch' and 'reference'"
            )
        if device.type != "cuda" and not _env.triton_interpret():
            raise ValueError(
                f"{op}: impl='triton' got tensors on {device.type!r}; Triton runs on CUDA, or on "
                f"the CPU only under TRITON_INTERPRET=1 set before import. Use impl='torch' on CPU."
            )
    return choice
