"""Shared pieces of the TRL integration tests: a tiny Llama built from a config, the shipped
tokenizer, in-memory preference data, one runner for stock TRL and TISDPOTrainer, and the
comparison of their logs and parameters."""
import copy
import math
import warnings

import torch

#: metric → its "magnitude summed": a reward is β·(Σ log π − Σ log π_ref) over ~10-20 tokens
#: of ~ −6 nats, so both TRL's float32 sums and ours round at ~1e-5 of Σ log π, not of the
#: (much smaller) reward; the comparison is relative to that.
SUMMED = {f"{p}rewards/{k}" for p in ("", "tisdpo/") for k in ("chosen", "rejected", "margins")}
RTOL = 1e-5


def tokenizer():
    from tisdpo.train.synthetic import load_tokenizer

    return load_tokenizer()


def tiny_model(tok, *, seed=0, init=0.02, tie=False):
    """A 2-layer Llama (hidden 32) over the shipped tokenizer's vocabulary; ``init``: the
    weights' std (larger → larger logits, where bf16 rounding shows)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    conf = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48,
                       num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                       max_position_embeddings=128, tie_word_embeddings=tie,
                       initializer_range=init, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                       attn_implementation="sdpa")
    g = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(conf)
    torch.random.set_rng_state(g)
    return model


def records(n, seed=0, bos=""):
    """``n`` plain-text preference records of the built-in synthetic task."""
    from tisdpo.train.synthetic import make_synthetic_task

    train, _, _ = make_synthetic_task(n, 0, seed=seed)
    return [{"prompt": bos + r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}
            for r in train]


def dataset(n, seed=0, **kw):
    from datasets import Dataset

    return Dataset.from_list(records(n, seed, **kw))


def config(cls, out_dir, **overrides):
    """Trainer arguments of every comparison: CPU, fp32, 3 optimizer steps of 2 × 2 pairs."""
    base = dict(output_dir=str(out_dir), per_device_train_batch_size=2,
                per_device_eval_batch_size=4, gradient_accumulation_steps=2, max_steps=3,
                logging_steps=1, learning_rate=1e-3, bf16=False, use_cpu=True, report_to=[],
                gradient_checkpointing=False, save_strategy="no", seed=0, disable_tqdm=True,
                dataloader_num_workers=0)
    base.update(overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(**base)


def run(trainer_cls, args, *, tok, train, evaluation=None, with_ref=True, model=None,
        **trainer_kw):
    """Train ``trainer_cls`` on a fresh tiny model (reference: a copy); returns
    (per-step logs, eval metrics or None, final parameters, initial parameters, trainer)."""
    model = tiny_model(tok) if model is None else model
    init = {k: v.detach().clone() for k, v in model.named_parameters()}
    if with_ref:
        trainer_kw.setdefault("ref_model", copy.deepcopy(model))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trainer_cls(model=model, args=args, train_dataset=train,
                              processing_class=tok, eval_dataset=evaluation, **trainer_kw)
        trainer.train()
        metrics = trainer.evaluate() if evaluation is not None else None
    logs = [h for h in trainer.state.log_history if "loss" in h and "train_loss" not in h]
    final = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    return logs, metrics, final, init, trainer


def _magnitude(logs: dict, key: str, beta: float) -> float:
    prefix = "eval_" if key.startswith("eval_") else ""
    if key.removeprefix(prefix) in SUMMED:
        return beta * max(abs(logs.get(f"{prefix}logps/chosen", 0.0)),
                          abs(logs.get(f"{prefix}logps/rejected", 0.0)))
    return 0.0


def assert_logs_match(ref: dict, got: dict, *, beta: float, keys=None, rtol=RTOL, what=""):
    """Every metric of ``ref`` (or ``keys``) in ``got`` within ``rtol`` of max(|value|, the
    magnitude summed to get it)."""
    keys = [k for k in ref if k not in ("epoch", "step")] if keys is None else keys
    missing = [k for k in keys if k not in got]
    assert not missing, f"{what}: metrics missing: {missing}"
    for k in keys:
        a, b = float(ref[k]), float(got[k])
        bound = rtol * max(abs(a), _magnitude(ref, k, beta), 1e-30)
        assert math.isfinite(b) and abs(a - b) <= bound, \
            f"{what}: {k}: TRL {a!r} vs tisdpo {b!r} (|Δ| {abs(a - b):.3g} > {bound:.3g})"


def assert_params_match(ref: dict, got: dict, init: dict, *, rtol=RTOL):
    """Same final parameters: per tensor ‖Δ‖ ≤ rtol·‖p‖, and the training moved every tensor
    that differs by at least 100× more than the two runs differ."""
    for name, p in ref.items():
        diff = (p - got[name]).norm().item()
        assert diff <= rtol * p.norm().item(), \
            f"{name}: parameters differ by {diff:.3g} (‖p‖ {p.norm().item():.3g})"
        if name not in init:
            continue
        moved = (p - init[name]).norm().item()
        assert diff == 0 or diff * 100 <= moved, f"{name}: runs differ by {diff:.3g} of a " \
                                                 f"{moved:.3g} update"
