"""TRL training steps: stock ``trl.DPOTrainer`` against ``tisdpo.integrations.trl.DPOTrainer``.

The same model (a small Llama body under a large vocabulary, random weights), the same pairs
(the built-in synthetic task's words, repeated to ``--tokens`` per response), the same
``DPOConfig`` (sigmoid loss, a reference model initialised apart from the policy, no gradient
checkpointing); each trainer runs in
its own subprocess, so that one's allocations never count against the other. Recorded per
trainer: the median wall time of an optimizer step (after ``--warmup`` steps), the peak
memory — CUDA: ``torch.cuda.max_memory_allocated``; CPU: the process's peak resident set
(``ru_maxrss``), of which the model, reference and optimizer state are a shared floor — and
the first step's loss (the two must agree).

    python -m benchmarks.trl_step --vocab 32000 --hidden 256 --tokens 1024 --pairs 2
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings

import torch

TRAINERS = ("trl", "tisdpo")


def _model(vocab: int, hidden: int, layers: int, tokens: int, tok, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    conf = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=layers, num_attention_heads=max(hidden // 64, 1),
                       num_key_value_heads=max(hidden // 128, 1),
                       max_position_embeddings=4 * tokens + 64, tie_word_embeddings=False,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, attn_implementation="sdpa")
    torch.manual_seed(seed)
    return LlamaForCausalLM(conf)


def _records(n: int, tokens: int, tok) -> list[dict]:
    """``n`` synthetic pairs whose responses are repeated to about ``tokens`` tokens."""
    from tisdpo.train.synthetic import make_synthetic_task

    train, _, _ = make_synthetic_task(n, 0, seed=0)
    out = []
    for r in train:
        rec = {"prompt": r["prompt"]}
        for side in ("chosen", "rejected"):
            text, piece = "", r[side]
            while len(tok.encode(text + piece, add_special_tokens=False)) <= tokens:
                text += piece
            rec[side] = text or piece
        out.append(rec)
    return out


def _child(args) -> dict:
    from datasets import Dataset

    from tisdpo.train.synthetic import load_tokenizer

    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available() and not args.cpu
    tok = load_tokenizer()
    model = _model(args.vocab, args.hidden, args.layers, args.tokens, tok)
    ref = _model(args.vocab, args.hidden, args.layers, args.tokens, tok, seed=1)  # ≠ policy
    steps = args.warmup + args.steps
    data = Dataset.from_list(_records(args.pairs * steps, args.tokens, tok))
    if args.trainer == "trl":
        from trl import DPOConfig, DPOTrainer
    else:
        from tisdpo.integrations.trl import DPOConfig, DPOTrainer
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self):
            self.times, self.t0 = [], None

        def on_step_begin(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.t0)

    clock = Clock()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = DPOConfig(output_dir=args.out_dir, per_device_train_batch_size=args.pairs,
                        max_steps=steps, logging_steps=1, learning_rate=1e-5,
                        bf16=cuda, use_cpu=not cuda, report_to=[], save_strategy="no",
                        max_length=2 * args.tokens + 64, disable_tqdm=True, seed=0,
                        gradient_checkpointing=False, dataloader_num_workers=0)
        trainer = DPOTrainer(model=model, ref_model=ref, args=cfg, train_dataset=data,
                             processing_class=tok, callbacks=[clock])
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h and "train_loss" not in h]
    peak = (torch.cuda.max_memory_allocated() if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"trainer": args.trainer, "device": torch.cuda.get_device_name() if cuda
            else f"CPU ({args.threads} threads)", "peak_mib": peak / 2**20,
            "peak_kind": "max_memory_allocated" if cuda else "peak RSS",
            "step_s": statistics.median(clock.times[args.warmup:]),
            "first_loss": logs[0]["loss"] if logs else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.trl_step",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=1024, help="tokens per response (about)")
    ap.add_argument("--pairs", type=int, default=2, help="pairs per step")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cpu", action="store_true", help="CPU even when CUDA is there")
    ap.add_argument("--trainers", default=",".join(TRAINERS))
    ap.add_argument("--trainer", default=None, help=argparse.SUPPRESS)    # the child
    ap.add_argument("--out-dir", default="/tmp/trl_step", help="trainer output_dir")
    args = ap.parse_args(argv)
    if args.trainer:
        print(json.dumps(_child(args)))
        return 0
    rows = []
    for name in args.trainers.split(","):
        cmd = [sys.executable, "-m", "benchmarks.trl_step", *(argv or sys.argv[1:]),
               "--trainer", name]
        res = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        if res.returncode:
            print(f"{name}: failed\n{res.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    import torch as _t
    import transformers
    import trl

    print(f"| trainer | step (s) | peak memory (MiB) | first loss |  "
          f"vocab {args.vocab}, hidden {args.hidden}, {args.layers} layers, ~{args.tokens} "
          f"tokens per response, {args.pairs} pairs per step; torch {_t.__version__}, "
          f"transformers {transformers.__version__}, trl {trl.__version__}")
    for r in rows:
        print(f"| {r['trainer']} | {r['step_s']:.2f} | {r['peak_mib']:.0f} ({r['peak_kind']}, "
              f"{r['device']}) | {r['first_loss']:.6f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
