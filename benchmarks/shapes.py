"""LM-head shape presets named after real models (gpt-fast style ``from_name``).

A preset fixes the head (hidden size D, vocabulary V, logit softcap); the token count N is
the x-axis of a benchmark and is given separately (``--tokens``), with per-preset defaults.
``<preset>-peaked`` is the same head with logits shaped like a trained model's (``logits``,
see ``benchmarks/ops.py``): its rows carry that name, so they never mix with uniform ones.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

__all__ = ["HeadShape", "PRESETS", "DEFAULT_GPU_TOKENS", "parse_tokens"]

DEFAULT_GPU_TOKENS = (4096, 8192, 16384, 32768, 65536)
PEAKED = "-peaked"


@dataclass(frozen=True)
class HeadShape:
    """An LM head: ``hidden`` D, ``vocab`` V, optional ``softcap``; ``tokens`` are the defaults."""

    name: str
    hidden: int
    vocab: int
    softcap: float | None = None
    tokens: tuple[int, ...] = field(default=DEFAULT_GPU_TOKENS)
    toy: bool = False
    logits: str = "uniform"     # "uniform" or "peaked" (benchmarks/ops.py make_inputs)

    def __post_init__(self):
        if self.hidden < 1 or self.vocab < 2:
            raise ValueError(f"shape {self.name!r}: need hidden >= 1 and vocab >= 2, "
                             f"got hidden={self.hidden}, vocab={self.vocab}")
        if self.softcap is not None and not self.softcap > 0:
            raise ValueError(f"shape {self.name!r}: softcap must be > 0, got {self.softcap}")

    @classmethod
    def from_name(cls, name: str) -> HeadShape:
        key = name.strip().lower()
        if key.endswith(PEAKED) and key[:-len(PEAKED)] in PRESETS:
            return replace(PRESETS[key[:-len(PEAKED)]], name=key, logits="peaked")
        if key not in PRESETS:
            raise ValueError(f"unknown shape preset {name!r}; valid presets are "
                             f"{', '.join(sorted(PRESETS))} (each also as <preset>{PEAKED})")
        return PRESETS[key]

    def flops_unit(self, tokens: int) -> int:
        """N·D·V: the unit that flop counts are multiples of (forward logits = 2·N·D·V)."""
        return tokens * self.hidden * self.vocab


PRESETS: dict[str, HeadShape] = {s.name: s for s in (
    HeadShape("llama3-8b", hidden=4096, vocab=128256),
    HeadShape("llama3.2-1b", hidden=2048, vocab=128256),
    HeadShape("qwen2.5-7b", hidden=3584, vocab=152064),
    HeadShape("gemma2-2b", hidden=2304, vocab=256000, softcap=30.0),
    # CPU smoke sizes: V not a multiple of any block, D small; tokens small.
    HeadShape("toy", hidden=64, vocab=1000, tokens=(128, 256), toy=True),
    HeadShape("toy-softcap", hidden=48, vocab=777, softcap=30.0, tokens=(96,), toy=True),
)}


def parse_tokens(text: str) -> tuple[int, ...]:
    """``"4k,8192,64k"`` → (4096, 8192, 65536). Raises ValueError naming the bad item."""
    out = []
    for item in text.split(","):
        raw = item.strip().lower()
        if not raw:
            continue
        mult = 1
        if raw.endswith("k"):
            raw, mult = raw[:-1], 1024
        try:
            value = int(raw) * mult
        except ValueError:
            raise ValueError(f"--tokens: {item.strip()!r} is not a token count "
                             f"(use e.g. 4096 or 4k)") from None
        if value < 1:
            raise ValueError(f"--tokens: {item.strip()!r} must be >= 1")
        out.append(value)
    if not out:
        raise ValueError(f"--tokens: no token counts in {text!r}")
    return tuple(out)
