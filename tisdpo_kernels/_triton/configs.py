"""Launch configurations of every Triton kernel, in one table.

``CONFIGS[kernel][device_class]`` is the one tuned config used by default; device classes are
``"sm90"`` (Hopper and newer), ``"sm80"`` (Ampere/Ada), ``"interpret"`` (CPU tensors under
``TRITON_INTERPRET=1``: one large-block config, since the interpreter's cost is per program and
per tile, not per flop) and ``"default"`` (anything else; falls back to it when a class is
missing). ``TISDPO_AUTOTUNE=1`` (``_env.autotune()``) makes launchers search
``AUTOTUNE[kernel]`` instead, on a GPU only.

Adding a kernel = one ``CONFIGS`` entry (and optionally an ``AUTOTUNE`` list):

    CONFIGS["my_kernel"] = {
        "sm90": KernelConfig({"BLOCK_N": 128, "BLOCK_V": 128}, num_warps=8, num_stages=3),
        "default": KernelConfig({"BLOCK_N": 64, "BLOCK_V": 128}, num_warps=4, num_stages=2),
        "interpret": KernelConfig({"BLOCK_N": 128, "BLOCK_V": 512}),
    }

and in the launcher ``cfg = configs.get("my_kernel", tensor)``, then
``kernel[grid](..., **cfg.meta, **cfg.launch_kwargs(tensor))``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from tisdpo_kernels import _env


@dataclass(frozen=True)
class KernelConfig:
    """meta: the kernel's tuning constexprs (block sizes, group size); num_warps/num_stages:
    Triton launch options; host: launcher-side knobs that are not kernel arguments (e.g. the
    minimum number of vocabulary splits)."""

    meta: dict = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 2
    host: dict = field(default_factory=dict)

    def launch_kwargs(self, t: torch.Tensor) -> dict:
        """num_warps / num_stages for a GPU launch (the interpreter takes neither)."""
        if t.device.type != "cuda":
            return {}
        return {"num_warps": self.num_warps, "num_stages": self.num_stages}

    def triton_config(self, pre_hook=None):
        import triton
        return triton.Config(dict(self.meta), num_warps=self.num_warps,
                             num_stages=self.num_stages, pre_hook=pre_hook)


def _c(num_warps=4, num_stages=2, host=None, **meta) -> KernelConfig:
    return KernelConfig(meta, num_warps, num_stages, host or {})


CONFIGS: dict[str, dict[str, KernelConfig]] = {
    # linear_logprobs.py forward: one program = a token block × one vocabulary split; a GEMM with an
    # online-logsumexp epilogue. min_splits ≥ 16 on GPUs so that the programs running at once
    # share hidden strips (same token block, different splits) and weight tiles (same split,
    # different token blocks) in L2; more splits when the token blocks cannot fill the GPU.
    "linear_logprobs_fwd": {
        "sm90": _c(8, 4, {"min_splits": 16}, BLOCK_N=128, BLOCK_V=128, BLOCK_D=64),
        "sm80": _c(8, 3, {"min_splits": 16}, BLOCK_N=128, BLOCK_V=128, BLOCK_D=32),
        "default": _c(4, 2, {"min_splits": 16}, BLOCK_N=64, BLOCK_V=128, BLOCK_D=32),
        "interpret": _c(host={"min_splits": 1}, BLOCK_N=128, BLOCK_V=512, BLOCK_D=128),
    },
    "linear_logprobs_fwd_combine": {
        "default": _c(4, 1, BLOCK_N=1024),
        "interpret": _c(BLOCK_N=1024),
    },
    # linear_logprobs.py backward: one program = one (token block, vocab block) tile, grouped by
    # GROUP_N token blocks for L2 reuse; recompute the logits into a dz slab (then GEMMs).
    # In bf16 on sm_90 (`python tests/aot.py`): 128×128 compiles without spills (145 registers
    # with TMA, 166 without, no bias or softcap); 128×256 and 256×128 at 8 warps too, but
    # only without a softcap: with one, every tile above 128×128 spills 0.4–1.4 KB per thread.
    # (Triton 3.8. Under 3.6, 128×128 is 149/172 registers and 128×256 spills 96 B with TMA;
    # 256×128 is spill-free under both, so it is the large tile the autotuner tries.)
    "linear_logprobs_bwd": {
        "sm90": _c(8, 3, BLOCK_N=128, BLOCK_V=128, BLOCK_D=64, GROUP_N=8),
        "sm80": _c(8, 3, BLOCK_N=128, BLOCK_V=128, BLOCK_D=32, GROUP_N=8),
        "default": _c(4, 2, BLOCK_N=64, BLOCK_V=128, BLOCK_D=32, GROUP_N=8),
        "interpret": _c(BLOCK_N=128, BLOCK_V=256, BLOCK_D=128, GROUP_N=1),
    },
    # The same two kernels reading logits a GEMM wrote (TISDPO_HEAD_LOGITS=gemm): no dot, a
    # pass over a [C, V] matrix in the input dtype, memory-bound; BLOCK_D is unused. 32
    # elements per thread: in bf16 on sm_90 at most 128 registers with a bias and softcap (two
    # 8-warp programs per SM), no spills; 64 per thread takes 170–254. Not timed.
    "linear_logprobs_fwd_z": {
        "sm90": _c(8, 2, BLOCK_N=32, BLOCK_V=256, BLOCK_D=16),
        "sm80": _c(8, 2, BLOCK_N=32, BLOCK_V=256, BLOCK_D=16),
        "default": _c(4, 2, BLOCK_N=16, BLOCK_V=256, BLOCK_D=16),
        "interpret": _c(BLOCK_N=128, BLOCK_V=512, BLOCK_D=16),
    },
    "linear_logprobs_bwd_z": {
        "sm90": _c(8, 2, BLOCK_N=32, BLOCK_V=256, BLOCK_D=16, GROUP_N=1),
        "sm80": _c(8, 2, BLOCK_N=32, BLOCK_V=256, BLOCK_D=16, GROUP_N=1),
        "default": _c(4, 2, BLOCK_N=16, BLOCK_V=256, BLOCK_D=16, GROUP_N=1),
        "interpret": _c(BLOCK_N=128, BLOCK_V=256, BLOCK_D=16, GROUP_N=1),
    },
}

# Searched only with TISDPO_AUTOTUNE=1 on a GPU (several configs cannot run interpreted).
AUTOTUNE: dict[str, list[KernelConfig]] = {
    # every entry compiles for sm_90 in bf16 without register spills for a head without bias
    # or softcap, as it launches there: the weight by TMA (tests/kernels AOT test). The larger
    # tiles only with FLATTEN: 128×256 and 256×128 spill 56–552 B without it. With FLATTEN
    # and TMA, 128×256 is spill-free with a bias and softcap too; 256×128 then spills
    # 136–184 B, and with the weight through pointers (TISDPO_TMA=0) the larger tiles spill
    # up to 232 B: the autotuner times that cost like any other (`python tests/aot.py`).
    "linear_logprobs_fwd": [
        _c(w, s, BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd, FLATTEN=f)
        for bn, bv, bd, w, s, f in [(128, 128, 64, 8, 4, False), (128, 128, 64, 8, 3, False),
                                    (64, 128, 64, 4, 4, False), (128, 128, 32, 8, 4, False),
                                    (128, 64, 64, 4, 4, False), (128, 128, 64, 8, 4, True),
                                    (128, 128, 128, 8, 3, True), (256, 128, 64, 16, 3, True),
                                    (128, 256, 32, 8, 4, True), (128, 256, 64, 8, 3, True)]
    ],
    "linear_logprobs_bwd": [
        _c(w, s, BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd, GROUP_N=g)
        for bn, bv, bd, w, s, g in [(128, 128, 64, 8, 3, 8), (128, 128, 32, 8, 4, 8),
                                    (64, 128, 64, 4, 3, 8), (128, 64, 64, 4, 3, 8),
                                    (128, 128, 64, 8, 3, 16), (256, 128, 64, 8, 3, 8)]
    ],
    "linear_logprobs_fwd_z": [
        _c(w, s, BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=16)
        for bn, bv, w, s in [(32, 256, 8, 2), (16, 512, 8, 2), (64, 128, 8, 2),
                             (16, 256, 4, 2), (32, 256, 8, 3), (64, 256, 8, 2)]
    ],
    "linear_logprobs_bwd_z": [
        _c(w, s, BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=16, GROUP_N=1)
        for bn, bv, w, s in [(32, 256, 8, 2), (16, 512, 8, 2), (64, 128, 8, 2),
                             (16, 256, 4, 2), (64, 256, 8, 2)]
    ],
}

_OVERRIDES: dict[str, KernelConfig] = {}


def device_class(t: torch.Tensor) -> str:
    """The row of ``CONFIGS`` for kernels launched on ``t``'s device."""
    if t.device.type != "cuda":
        return "interpret"
    major, _ = torch.cuda.get_device_capability(t.device)
    if major >= 9:
        return "sm90"
    if major == 8:
        return "sm80"
    return "default"


def get(kernel: str, t: torch.Tensor) -> KernelConfig:
    """The config for ``kernel`` on ``t``'s device (an active :func:`override` wins)."""
    if kernel in _OVERRIDES:
        return _OVERRIDES[kernel]
    table = CONFIGS[kernel]
    return table.get(device_class(t), table["default"] if "default" in table
                     else next(iter(table.values())))


def autotuning(t: torch.Tensor) -> bool:
    """Search configs: TISDPO_AUTOTUNE=1, a GPU tensor, and no override in force."""
    return t.device.type == "cuda" and _env.autotune() and not _OVERRIDES


@contextlib.contextmanager
def override(**configs: KernelConfig):
    """Temporarily force configs by kernel name (tests use it to reach GPU-like block sizes
    under the interpreter). Not thread-safe; not for production use."""
    saved = dict(_OVERRIDES)
    _OVERRIDES.update(configs)
    try:
        yield
    finally:
        _OVERRIDES.clear()
        _OVERRIDES.update(saved)


# token_weights.py / preference_loss.py: O(tokens) elementwise and segmented-sum kernels (grid over
# token blocks) and the per-pair kernels (one program looping over pairs in forward, a grid of
# pair blocks in backward). Memory-bound and tiny next to the head: large blocks, 4 warps.
CONFIGS["token_weights_fwd"] = {
    "default": _c(4, 1, BLOCK=1024),
    "interpret": _c(BLOCK=1024),
}
CONFIGS["preference_loss_tokens"] = {  # preference_loss_fwd_kernel and preference_loss_bwd_kernel
    "default": _c(4, 1, BLOCK=1024),
    "interpret": _c(BLOCK=1024),
}
CONFIGS["preference_loss_pairs"] = {  # preference_loss_pair_fwd_kernel and preference_loss_pair_bwd_kernel
    "default": _c(4, 1, BLOCK_P=256),
    "interpret": _c(BLOCK_P=256),
}

# linear_token_kl.py: the fused KL of two heads. Same grid shapes as linear_logprobs_*, but a program holds
# two logit tiles at once (policy and reference; plus dz in backward), so smaller tiles than the
# LM head. Not timed (no GPU yet): chosen as the largest bf16 tiles that ptxas compiles without
# register spills for sm_90 / sm_80 (cuobjdump resource usage, all flags on); fp32 inputs
# (FMA dots) spill whatever the tile.
CONFIGS["linear_token_kl_fwd"] = {
    "sm90": _c(8, 3, {"min_splits": 16}, BLOCK_N=64, BLOCK_V=64, BLOCK_D=64),
    "sm80": _c(8, 3, {"min_splits": 16}, BLOCK_N=64, BLOCK_V=64, BLOCK_D=32),
    "default": _c(8, 2, {"min_splits": 16}, BLOCK_N=64, BLOCK_V=64, BLOCK_D=32),
    "interpret": _c(host={"min_splits": 1}, BLOCK_N=128, BLOCK_V=256, BLOCK_D=64),
}
CONFIGS["linear_token_kl_fwd_combine"] = {
    "default": _c(4, 1, BLOCK_N=1024),
    "interpret": _c(BLOCK_N=1024),
}
CONFIGS["linear_token_kl_bwd"] = {
    "sm90": _c(8, 3, BLOCK_N=64, BLOCK_V=128, BLOCK_D=32, GROUP_N=8),
    "sm80": _c(8, 3, BLOCK_N=64, BLOCK_V=128, BLOCK_D=32, GROUP_N=8),
    "default": _c(8, 2, BLOCK_N=64, BLOCK_V=64, BLOCK_D=32, GROUP_N=8),
    "interpret": _c(BLOCK_N=128, BLOCK_V=256, BLOCK_D=64, GROUP_N=1),
}
# With TISDPO_HEAD_LOGITS=gemm both logit tiles are read from GEMM outputs (Z_GIVEN), no dot:
# a memory-bound pass, so 16×128 tiles at 8 warps, 8 elements per thread (16-byte bf16
# vectors). In bf16 on sm_90 with policy_ref (`python tests/aot.py`): 59–74 registers forward,
# 39–48 backward under Triton 3.8 (56–64 and 39–64 under 3.6); 16 elements per thread takes
# 94–128. No spills for either direction on sm_90 and sm_80 under 3.8 (the AOT test in
# tests/kernels/test_head_gemm.py) or 3.6. No weight tiles to share, so no minimum of splits
# (as linear_logprobs_fwd_z). Not timed.
CONFIGS["linear_token_kl_fwd_z"] = {
    "sm90": _c(8, 2, BLOCK_N=16, BLOCK_V=128, BLOCK_D=16),
    "sm80": _c(8, 2, BLOCK_N=16, BLOCK_V=128, BLOCK_D=16),
    "default": _c(8, 2, BLOCK_N=16, BLOCK_V=128, BLOCK_D=16),
    "interpret": _c(BLOCK_N=128, BLOCK_V=256, BLOCK_D=16),
}
CONFIGS["linear_token_kl_bwd_z"] = {
    "sm90": _c(8, 2, BLOCK_N=16, BLOCK_V=128, BLOCK_D=16, GROUP_N=1),
    "sm80": _c(8, 2, BLOCK_N=16, BLOCK_V=128, BLOCK_D=16, GROUP_N=1),
    "default": _c(8, 2, BLOCK_N=16, BLOCK_V=128, BLOCK_D=16, GROUP_N=1),
    "interpret": _c(BLOCK_N=128, BLOCK_V=256, BLOCK_D=16, GROUP_N=1),
}
AUTOTUNE["linear_token_kl_fwd_z"] = [
    _c(w, s, BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=16)
    for bn, bv, w, s in [(16, 128, 8, 2), (16, 256, 8, 2), (32, 256, 16, 2), (32, 128, 8, 2),
                         (16, 64, 4, 2), (16, 128, 4, 2)]
]
AUTOTUNE["linear_token_kl_bwd_z"] = [
    _c(w, s, BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=16, GROUP_N=1)
    for bn, bv, w, s in [(16, 128, 8, 2), (16, 256, 8, 2), (32, 256, 16, 2), (32, 128, 8, 2),
                         (16, 64, 4, 2)]
]
AUTOTUNE["linear_token_kl_fwd"] = [
    _c(w, s, BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd)
    for bn, bv, bd, w, s in [(64, 64, 64, 8, 3), (64, 128, 32, 8, 3), (64, 128, 32, 8, 4),
                             (64, 64, 32, 8, 3), (128, 64, 32, 8, 3), (64, 128, 64, 8, 3)]
]
AUTOTUNE["linear_token_kl_bwd"] = [
    _c(w, s, BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd, GROUP_N=g)
    for bn, bv, bd, w, s, g in [(64, 128, 32, 8, 3, 8), (64, 64, 64, 8, 3, 8),
                                (128, 64, 32, 8, 3, 8), (64, 128, 32, 8, 4, 8),
                                (64, 128, 64, 8, 3, 8), (64, 128, 32, 8, 3, 16)]
]

# linear_preference_loss.py: the one-sweep head's chunk epilogue over cuBLAS logits. One program
# = ROWS rows looping over the vocabulary in BLOCK_V tiles (1–3 passes): memory-bound, no dot,
# so ROWS is not held to tl.dot's 16 (the launcher checks BLOCK_* only) and stays small enough
# that a chunk of a few hundred rows fills the GPU. Not timed yet. One row × 2048 at 8 warps
# (8 elements per thread, 16-byte bf16 loads) is the entry that compiles without spills for
# sm_90 and sm_80 under Triton 3.6 and 3.8 for every launch the sweep makes, with every flag
# (at most 48 registers; the AOT test in tests/kernels/test_one_sweep_triton.py, the table
# `python tests/aot.py` prints). The other entries below each spill 8–20 B in some launch
# under one of the two releases, except one row × 2048 at 4 warps (72 registers).
CONFIGS["linear_preference_loss_fwd"] = {
    "sm90": _c(8, 2, ROWS=1, BLOCK_V=2048),
    "sm80": _c(8, 2, ROWS=1, BLOCK_V=2048),
    "default": _c(4, 2, ROWS=2, BLOCK_V=1024),
    "interpret": _c(ROWS=64, BLOCK_V=512),
}
AUTOTUNE["linear_preference_loss_fwd"] = [
    _c(w, s, ROWS=r, BLOCK_V=bv)
    for r, bv, w, s in [(1, 2048, 8, 2), (2, 2048, 8, 2), (1, 4096, 8, 2), (4, 1024, 8, 2),
                        (2, 1024, 4, 2), (4, 2048, 16, 2), (1, 2048, 4, 3)]
]
