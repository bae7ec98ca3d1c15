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


def _version(v: str) -> tuple[int, int]:
    major, minor = (v.split("+")[0].split(".") + ["0"])[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def interpreter_blocker() -> str | None:
    """Why Triton's CPU interpreter cannot run the kernels with the installed versions, or None.

    triton 3.6's interpreter turns every scalar (a size-1 array) into a Python int with
    ``int()``, which numpy 2.4 refuses for arrays that are not 0-d; triton 3.7 fixed it.
    """
    import numpy
    import triton

    if _version(triton.__version__) < (3, 7) and _version(numpy.__version__) >= (2, 4):
        return (f"triton {triton.__version__}'s interpreter cannot run with numpy "
                f"{numpy.__version__}; install triton>=3.7 or numpy<2.4")
    return None


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
        why = None if device.type == "cuda" else interpreter_blocker()
        if why:
            raise ValueError(f"{op}: impl='triton' on the CPU runs Triton's interpreter, but "
                             f"{why} (or use impl='torch')")
    return choice
