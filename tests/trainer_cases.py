"""Tiny trainers for the loop's tests: a one-layer model, random preference records (token
weights and reference log-probs included) and a Trainer with small defaults."""
import torch

from tisdpo.loss import TISDPOLoss
from tisdpo.train.collate import PaddedPairCollator
from tisdpo.train.config import LogConfig, ModelConfig, TrainConfig
from tisdpo.train.model import build_tiny_model
from tisdpo.train.objectives import PreferenceObjective
from tisdpo.train.trainer import Trainer

MCFG = ModelConfig(tiny_hidden_size=32, tiny_layers=1, tiny_heads=2, tiny_kv_heads=1,
                   tiny_intermediate_size=48)
VOCAB = 61
CPU = torch.device("cpu")
QUIET = LogConfig(every=1, tensorboard=False, progress=False)


def records(n, seed=0, ref=True, weights=True):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        rec = {"prompt_ids": torch.randint(3, VOCAB, (int(torch.randint(2, 6, (1,), generator=g)),),
                                           generator=g).tolist()}
        for side in ("chosen", "rejected"):
            k = int(torch.randint(1, 9, (1,), generator=g))
            rec[f"{side}_ids"] = torch.randint(3, VOCAB, (k,), generator=g).tolist()
            if weights:
                rec[f"{side}_weight"] = (0.7 + 0.6 * torch.rand(k, generator=g)).tolist()
            if ref:
                rec[f"ref_{side}_logps"] = (-4 - torch.rand(k, generator=g)).tolist()
        out.append(rec)
    return out


def model(seed=0, dtype=torch.float32):
    return build_tiny_model(MCFG, VOCAB, seed=seed).to(dtype).train()


def pref_objective(impl="torch", method="tisdpo"):
    return PreferenceObjective(TISDPOLoss(method=method, impl=impl), model_cfg=MCFG, device=CPU,
                               use_weights=True)


def trainer(model, objective, data, out_dir, *, collate=None, **cfg):
    base = dict(optimizer="adamw", lr=3e-3, warmup_steps=2, schedule="cosine", batch_size=3,
                grad_accum=2, epochs=2.0, max_grad_norm=1.0, weight_decay=0.01)
    base.update(cfg)
    return Trainer(model=model, objective=objective, train_data=data,
                   collate_fn=collate or PaddedPairCollator(0), cfg=TrainConfig(**base),
                   out_dir=str(out_dir), device=CPU, seed=7, log=QUIET, desc="test")


class Poisoned:
    """``inner``, non-finite from its ``at``-th call on: a NaN loss, or with ``gradient``
    a finite loss whose gradient is NaN (value 0, gradient 0 / 0 through the untaken branch)."""

    def __init__(self, inner, at, *, gradient=False):
        self.inner, self.at, self.gradient, self.calls = inner, at, gradient, 0

    def count(self, batch):
        return self.inner.count(batch)

    def __call__(self, model, batch, *, normalizer):
        self.calls += 1
        loss, metrics = self.inner(model, batch, normalizer=normalizer)
        if self.calls < self.at:
            return loss, metrics
        if self.gradient:
            p = next(model.parameters())
            return loss + torch.where(torch.tensor(True), torch.zeros(()), p.sum() / 0.0), metrics
        return loss * float("nan"), metrics


class DyingFile:
    """A file opened for writing whose process is killed after its first line."""

    def __init__(self, fh):
        self.fh = fh

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()

    def _die(self, text):
        self.fh.write(text[: max(text.find("\n") + 1, 1)])
        self.fh.flush()
        raise SystemExit("killed")

    def write(self, text):
        self._die(text)

    def writelines(self, lines):
        self._die("".join(lines))

    def __getattr__(self, name):
        return getattr(self.fh, name)


def die_writing(monkeypatch, name_start: str) -> None:
    """Every file opened for writing whose name starts with ``name_start`` is a DyingFile."""
    import builtins
    import os

    real_open = builtins.open

    def dying_open(path, mode="r", *a, **k):
        fh = real_open(path, mode, *a, **k)
        if "w" in mode and os.path.basename(str(path)).startswith(name_start):
            return DyingFile(fh)
        return fh
    monkeypatch.setattr(builtins, "open", dying_open)
