"""A TorchDispatchMode that watches every aten op: what ran, and how big its outputs were.

Used to prove memory bounds (no tensor of tokens × vocab is ever created) and the absence
of host synchronisation (no ``.item()``/``bool()``/``nonzero``) without a GPU.
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# Ops that copy a value to the host or give an output whose shape depends on data.
SYNC_OPS = frozenset({"_local_scalar_dense", "item", "is_nonzero", "nonzero", "masked_select",
                      "_unique2", "unique_dim", "unique_consecutive"})


class OpProbe(TorchDispatchMode):
    """Records op names, the largest storage any op output refers to (bytes), and the peak of
    the bytes held live by freshly allocated op outputs (those not aliasing an input)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []
        self.out_shapes: list[tuple[str, tuple[int, ...]]] = []
        self.max_bytes = 0
        self.max_op = None
        self._live: dict[int, tuple[weakref.ref, int]] = {}
        self.peak_live_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        self.ops.append(name)
        in_ptrs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                   if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            self.out_shapes.append((name, tuple(t.shape)))
            storage = t.untyped_storage()
            nbytes = storage.nbytes()
            if nbytes > self.max_bytes:
                self.max_bytes, self.max_op = nbytes, (name, tuple(t.shape), t.dtype)
            ptr = storage.data_ptr()
            if ptr not in in_ptrs and ptr not in self._live:
                self._live[ptr] = (weakref.ref(t), nbytes)
        self._live = {p: (r, n) for p, (r, n) in self._live.items() if r() is not None}
        self.peak_live_bytes = max(self.peak_live_bytes, sum(n for _, n in self._live.values()))
        return out

    def sync_ops(self) -> set[str]:
        return set(self.ops) & SYNC_OPS
