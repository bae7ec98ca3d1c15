"""DDP and FSDP2 on CPU: gloo, 2 processes spawned once for the whole file.

One spawn runs every distributed scenario (training, resume across world sizes, the fused
loss on a sharded head, the split weight-estimation stage) and saves what it saw; the
tests compare that with single-process runs made here, through the oracle of
tests/numerics.py: truth = a single process in float64, ref = a single process at the test
dtype, actual = the distributed run. The single-process runs use batch_size × 2 so that
both see the same global micro-batches.

Not covered here (no GPU): NCCL, ``cpu:gloo,cuda:nccl`` counts, one device per rank.
"""
import json
import os
import socket
import traceback
from collections import Counter

import pytest
import torch

from magnitudes import trained_metrics
from numerics import assert_oracle
from spawned_workers import exit_without_teardown, quiet_worker
from tisdpo.train.collate import PackedPairCollator, PaddedPairCollator
from tisdpo.train.config import DistributedConfig, LogConfig, ModelConfig, TrainConfig
from tisdpo.train.checkpoint import (
    latest_checkpoint, optimizer_state_to_fqns, optimizer_state_to_indices,
)
from tisdpo.train.objectives import PreferenceObjective, SFTObjective
from tisdpo.train.parallel import Parallel, PolicyWithLoss, check_not_sharded, shard_positions
from tisdpo.loss import TISDPOLoss
from tisdpo.train.model import build_tiny_model, enable_activation_checkpointing
from tisdpo.train.trainer import Trainer

WORLD = 2
VOCAB = 128
CPU = torch.device("cpu")
QUIET = LogConfig(every=1, tensorboard=False, progress=False)
N_TRAIN, N_EVAL = 9, 5      # global micro-batch 4: 4, 4, 1 -> the last one pads rank 1
MICRO = 6                   # training micro-batches: 3 per epoch, 2 epochs (then eval ones)
BS = 2                      # per process; single-process references use BS * WORLD
WEIGHT_MAX = 1.3            # stored token weights lie in [0.7, 1.3]


def _mcfg(tie=True):
    return ModelConfig(tiny_hidden_size=32, tiny_layers=2, tiny_heads=2, tiny_kv_heads=1,
                       tiny_intermediate_size=48, tiny_tie_embeddings=tie)


def _records(n, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        rec = {"uid": i, "prompt_ids": torch.randint(3, VOCAB, (int(torch.randint(2, 6, (1,),
                                                                        generator=g)),),
                                                     generator=g).tolist()}
        for side in ("chosen", "rejected"):
            k = int(torch.randint(1, 8, (1,), generator=g))
            rec[f"{side}_ids"] = torch.randint(3, VOCAB, (k,), generator=g).tolist()
            rec[f"{side}_weight"] = (0.7 + (WEIGHT_MAX - 0.7) * torch.rand(k, generator=g)).tolist()
            rec[f"ref_{side}_logps"] = (-4 - torch.rand(k, generator=g)).tolist()
        out.append(rec)
    return out


TRAIN, EVAL = _records(N_TRAIN, 1), _records(N_EVAL, 2)


class _Recording:
    """The padded collator, remembering the uids of every training batch it built."""

    def __init__(self, packed=False):
        self.inner = PackedPairCollator(0) if packed else PaddedPairCollator(0)
        self.uids = []

    def __call__(self, examples):
        self.uids.append([ex["uid"] for ex in examples])
        return self.inner(examples)


def _objective(kind, mcfg, dtype):
    """tisdpo with stored weights and ref log-probs; a KL loss with a reference model; SFT."""
    if kind == "sft":
        return SFTObjective(model_cfg=mcfg, device=CPU, side="rejected", impl="torch")
    if kind == "kl":
        ref = build_tiny_model(mcfg, VOCAB, seed=1).to(dtype).eval().requires_grad_(False)
        return PreferenceObjective(TISDPOLoss("tisdpo_paper", impl="torch"), model_cfg=mcfg,
                                   device=CPU, ref_model=ref, use_weights=True)
    return PreferenceObjective(TISDPOLoss("tisdpo", impl="torch"), model_cfg=mcfg, device=CPU,
                               use_weights=True)


def _trainer(out_dir, *, bs, par=None, dtype=torch.float32, model_dtype="float32",
             kind="pref", **overrides):
    # Adam's eps 1e-3, not 1e-6: with 1e-6 near-zero gradients amplify rounding ~1e6x and two
    # correct summation orders end 5x apart (layer-0 o_proj); with 1e-3 they agree within a few %
    cfg = dict(optimizer="adamw", lr=2e-3, eps=1e-3, warmup_steps=1, schedule="cosine",
               batch_size=bs, grad_accum=2, epochs=2.0, max_grad_norm=1.0, weight_decay=0.01,
               eval_batch_size=bs)
    cfg.update(overrides)
    mcfg = _mcfg()
    mcfg.dtype = model_dtype
    model = build_tiny_model(mcfg, VOCAB, seed=0).to(dtype).train()
    if kind == "sft":                    # with activation checkpointing (exact recompute)
        enable_activation_checkpointing(model)
    objective = _objective(kind, mcfg, dtype)
    return Trainer(model=model, objective=objective, train_data=TRAIN, eval_data=EVAL,
                   collate_fn=_Recording(packed=kind == "packed"), cfg=TrainConfig(**cfg),
                   out_dir=str(out_dir), device=CPU, seed=3, log=QUIET, desc="dist", parallel=par)


def _head_batch():
    return PaddedPairCollator(0)(_records(3, 5))


def _head_loss(model, batch):
    """PolicyWithLoss on a plain (single-process) model: loss and every gradient."""
    policy = PolicyWithLoss(model, TISDPOLoss("tisdpo", impl="torch"))
    loss, _ = policy(batch["input_ids"], batch["labels"], attention_mask=batch["attention_mask"],
                     position_ids=batch["position_ids"], ref_logps=batch["ref_logps"],
                     weights=batch["weights"])
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _stage_cfg(root, mode="none", **extra):
    from tisdpo.pipeline.demo import demo_config

    cfg = demo_config(fast=True)
    cfg.run_dir, cfg.device, cfg.threads = str(root), "cpu", 1
    m = cfg.model
    m.tiny_hidden_size, m.tiny_layers, m.tiny_heads, m.tiny_kv_heads = 32, 1, 2, 1
    m.tiny_intermediate_size = 48
    cfg.data.synthetic_train, cfg.data.synthetic_eval = 11, 3
    cfg.sft.enabled = False
    cfg.contrastive.variant = "prompt"           # pi+ / pi- without training
    cfg.weights.batch_size = 2
    cfg.policy.batch_size, cfg.policy.max_steps, cfg.policy.lr = 2, 2, 1e-3
    cfg.policy.warmup_steps, cfg.policy.eval_batch_size = 0, 2
    cfg.log.tensorboard, cfg.log.every, cfg.log.progress = False, 1, False
    cfg.distributed.mode = mode
    for k, v in extra.items():
        setattr(cfg.policy, k, v)
    return cfg


# ------------------------------------------------------------------------ the 2 processes

SCENARIOS = (("ddp", "ddp", "none", "pref"), ("fsdp2", "fsdp2", "none", "pref"),
             ("fsdp2_bf16", "fsdp2", "bf16", "pref"), ("ddp_kl", "ddp", "none", "kl"),
             ("fsdp2_kl", "fsdp2", "none", "kl"), ("fsdp2_sft", "fsdp2", "none", "sft"),
             ("fsdp2_packed", "fsdp2", "none", "packed"))


def _worker(rank, port, root):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    quiet_worker()
    import torch.distributed as dist

    from tisdpo.train.parallel import setup

    def par(mode, mp="none"):
        return setup(DistributedConfig(mode=mode, mixed_precision=mp, timeout_minutes=2), "cpu")

    out = {}
    try:
        for name, mode, mp, kind in SCENARIOS:
            t = _trainer(os.path.join(root, name), bs=BS, par=par(mode, mp), kind=kind)
            out[name] = {"result": t.train(), "uids": t.collate_fn.uids}
        # 1 -> 2: a single process ran 2 steps here before the spawn; finish with 2 ranks
        _trainer(os.path.join(root, "resume12"), bs=BS, par=par("fsdp2")).train()
        # 2 -> 1: run 2 steps with 2 ranks; a single process finishes after the spawn
        out["resume21"] = _trainer(os.path.join(root, "resume21"), bs=BS, par=par("fsdp2"),
                                   stop_after=2).train()
        out["head"] = _sharded_head(par("fsdp2"))
        out["stages"] = _stages(root)
        out["pad_positions"] = shard_positions(1, WORLD, rank)
    except BaseException:
        out["error"] = traceback.format_exc()
        torch.save(out, os.path.join(root, f"rank{rank}.pt"))
        raise
    torch.save(out, os.path.join(root, f"rank{rank}.pt"))
    dist.barrier()                          # both ranks' results are on disk
    dist.destroy_process_group()
    exit_without_teardown()


def _sharded_head(par):
    from tisdpo.train.parallel import fully_shard_model

    res = {}
    batch = _head_batch()
    for tie in (True, False):
        model = build_tiny_model(_mcfg(tie), VOCAB, seed=0).train()
        policy = fully_shard_model(PolicyWithLoss(model, TISDPOLoss("tisdpo", impl="torch")))
        loss, _ = policy(batch["input_ids"], batch["labels"],
                         attention_mask=batch["attention_mask"],
                         position_ids=batch["position_ids"], ref_logps=batch["ref_logps"],
                         weights=batch["weights"])
        loss.backward()
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
        weight = model.lm_head.weight                       # resharded after forward
        try:
            TISDPOLoss("tisdpo", impl="torch")(weight, torch.zeros(2, 3, 32),
                                                torch.zeros(2, 3, dtype=torch.long),
                                                ref_logps=torch.zeros(2, 3))
            err = None
        except ValueError as e:
            err = str(e)
        res[tie] = {"loss": loss.detach(), "grads": grads, "error": err,
                    "local_rows": weight.to_local().shape[0]}
    return res


def _stages(root):
    from tisdpo.pipeline import context, stages, weights

    weights.SHARD = 4                 # 11 train pairs -> 3 shards, round-robin over 2 ranks
    ctx = context.make_context(_stage_cfg(os.path.join(root, "stages"), "fsdp2"))
    stages.run_contrastive(ctx)
    weights.run_weights(ctx)
    stages.run_policy(ctx)
    return {"device": str(ctx.device), "world": ctx.par.world_size}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _params(out_dir):
    ckpt = torch.load(os.path.join(latest_checkpoint(str(out_dir)), "state.pt"),
                      weights_only=False)
    return ckpt["model"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Single-process references, the 2-process spawn, and the 2 -> 1 continuation."""
    import torch.multiprocessing as mp

    n_threads = torch.get_num_threads()
    quiet_worker()
    root = tmp_path_factory.mktemp("dist")
    single = {}
    for kind in ("pref", "kl", "sft"):
        for name, kw in (("f32", {}), ("f64", {"dtype": torch.float64})):
            key = name if kind == "pref" else f"{kind}_{name}"
            t = _trainer(root / f"single_{key}", bs=BS * WORLD, kind=kind, **kw)
            single[key] = {"result": t.train(), "uids": t.collate_fn.uids,
                           "params": _params(root / f"single_{key}")}
    r = _trainer(root / "resume12", bs=BS * WORLD, stop_after=2).train()
    assert r == {"stopped": True, "step": 2}
    mp.spawn(_worker, args=(_free_port(), str(root)), nprocs=WORLD, join=True)
    ranks = [torch.load(root / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    resumed = _trainer(root / "resume21", bs=BS * WORLD)
    resumed.train()
    torch.set_num_threads(n_threads)
    return {"root": root, "single": single, "ranks": ranks}


def _assert_params(actual: dict, runs, dtype=torch.float32, ref="f32", truth="f64"):
    """Parameter updates (final − initial) of a run against the single-process ones (``ref``:
    a key of the single-process runs, or their parameters)."""
    init = build_tiny_model(_mcfg(), VOCAB, seed=0).state_dict()
    s = runs["single"]
    ref_params = s[ref]["params"] if isinstance(ref, str) else ref
    assert set(actual) == set(init)
    for name in actual:
        delta = lambda sd: sd[name].double() - init[name].double()  # noqa: E731
        assert_oracle(delta(actual), delta(ref_params), delta(s[truth]["params"]),
                      dtype=dtype, name=name, metric="rms")


# ------------------------------------------------------------------------ training

@pytest.mark.parametrize("name", ["ddp", "fsdp2", "ddp_kl", "fsdp2_kl", "fsdp2_sft",
                                  "fsdp2_packed"])
def test_training_equals_single_process_on_the_global_batch(runs, name):
    """tisdpo (stored weights/ref log-probs), tisdpo_paper (KL: a reference model), SFT
    (with activation checkpointing), and tisdpo on packed rows against padded ones."""
    kind = name.partition("_")[2]
    pre = f"{kind}_" if kind in ("kl", "sft") else ""
    _assert_params(_params(runs["root"] / name), runs, ref=f"{pre}f32", truth=f"{pre}f64")
    # metrics reduced over ranks, eval ones included (5 pairs: rank 1 pads once)
    s = runs["single"]
    got = [r[name]["result"] for r in runs["ranks"]]
    truth = s[f"{pre}f64"]["result"]
    keys = ("eval/loss", "loss", "nll", "eval/nll") if kind == "sft" else \
        ("eval/loss", "eval/rewards/margins", "loss", "rewards/accuracies", "weights/chosen",
         "eval/weights/rejected")
    mags = {}
    if kind != "sft":      # the preference metrics' magnitudes (nll and accuracies: their own)
        cfg = TISDPOLoss("tisdpo_paper" if kind == "kl" else "tisdpo").config
        for prefix in ("", "eval/"):
            mags.update(trained_metrics(truth, beta=cfg.beta, weight_max=WEIGHT_MAX,
                                        kl_coefs=(cfg.kl_chosen_coef, cfg.kl_rejected_coef),
                                        prefix=prefix))
    for key in keys:
        assert got[0][key] == got[1][key]
        assert_oracle(torch.tensor(got[0][key]), torch.tensor(s[f"{pre}f32"]["result"][key]),
                      torch.tensor(truth[key]), dtype=torch.float32, name=key,
                      magnitude=mags.get(key))


def test_fsdp2_bf16_mixed_precision_matches_one_process(runs, tmp_path):
    """FSDP2 bf16 parameters/compute with fp32 reduction and master weights, on 2 ranks
    against the same mixed precision in one process (a one-process group: the same bf16
    roundings, another summation order) and the float64 single process."""
    import torch.distributed as dist

    from tisdpo.train.parallel import setup

    par = setup(DistributedConfig(mode="fsdp2", mixed_precision="bf16"), "cpu")
    try:
        _trainer(tmp_path / "one_bf16", bs=BS * WORLD, par=par).train()
    finally:
        dist.destroy_process_group()
    _assert_params(_params(runs["root"] / "fsdp2_bf16"), runs, dtype=torch.bfloat16,
                   ref=_params(tmp_path / "one_bf16"))


def test_every_pair_once_per_epoch_and_the_pad_rule(runs):
    single = runs["single"]["f32"]["uids"][:MICRO]       # global micro-batches, in order
    per_rank = [r["ddp"]["uids"][:MICRO] for r in runs["ranks"]]
    assert len(per_rank[0]) == len(per_rank[1]) == len(single)
    for g, b0, b1 in zip(single, *per_rank):
        if len(g) >= WORLD:
            assert sorted(b0 + b1) == sorted(g) and abs(len(b0) - len(b1)) <= 1
        else:                                            # rank 1 re-runs the pair, weight 0
            assert b0 == g and b1 == g[:1]
    for epoch in (single[:3], single[3:]):
        assert Counter(u for b in epoch for u in b) == Counter(range(N_TRAIN))
    assert runs["ranks"][1]["pad_positions"] == ([0], True)


def test_shard_positions_cover_each_item_once():
    for n in range(1, 12):
        for w in (1, 2, 3, 8):
            shares = [shard_positions(n, w, r) for r in range(w)]
            real = [p for pos, pad in shares if not pad for p in pos]
            assert sorted(real) == list(range(n))
            assert sum(pad for _, pad in shares) == max(w - n, 0)
    with pytest.raises(ValueError, match="n must be positive"):
        shard_positions(0, 2, 0)


# ------------------------------------------------------------------------ resume

def test_resume_one_to_two_processes(runs):
    _assert_params(_params(runs["root"] / "resume12"), runs)


def test_resume_two_to_one_process(runs):
    assert runs["ranks"][0]["resume21"] == {"stopped": True, "step": 2}
    _assert_params(_params(runs["root"] / "resume21"), runs)


def test_resume_refuses_another_global_batch(runs, tmp_path):
    import shutil

    shutil.copytree(runs["root"] / "resume21", tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "final", ignore_errors=True)
    os.remove(tmp_path / "run" / "done.json")
    with pytest.raises(ValueError, match="keep batch_size x processes the same"):
        _trainer(tmp_path / "run", bs=BS).train()


# ------------------------------------------------------------------------ sharded LM head

@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_loss_on_sharded_head_equals_unsharded(runs, tie):
    batch = _head_batch()
    ref_loss, ref_grads = _head_loss(build_tiny_model(_mcfg(tie), VOCAB, seed=0).train(),
                                     batch)
    truth_loss, truth_grads = _head_loss(
        build_tiny_model(_mcfg(tie), VOCAB, seed=0).double().train(), batch)
    for rank in runs["ranks"]:
        got = rank["head"][tie]
        assert got["local_rows"] == VOCAB // WORLD       # the head really was sharded
        assert_oracle(got["loss"], ref_loss, truth_loss, dtype=torch.float32, name="loss")
        assert set(got["grads"]) == set(ref_grads)
        for name, g in got["grads"].items():
            assert_oracle(g, ref_grads[name], truth_grads[name], dtype=torch.float32,
                          name=f"grad {name}")


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_loss_refuses_a_sharded_head_weight(runs, tie):
    msg = runs["ranks"][0]["head"][tie]["error"]
    assert msg is not None and "sharded DTensor" in msg and "PolicyWithLoss" in msg


def test_check_not_sharded_passes_plain_tensors():
    check_not_sharded(torch.zeros(3, 2))
    check_not_sharded(None)


# ------------------------------------------------------------------------ checkpoints

def test_optimizer_state_layout_round_trip():
    model = build_tiny_model(_mcfg(), VOCAB, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.model(input_ids=torch.tensor([[3, 4, 5]])).last_hidden_state.sum().backward()
    opt.step()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_optimizer_state_dict,
    )

    fqn_sd = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
    plain = opt.state_dict()
    as_indices = optimizer_state_to_indices(fqn_sd)
    assert as_indices["param_groups"] == plain["param_groups"]
    assert set(as_indices["state"]) == set(plain["state"])
    for i, st in plain["state"].items():
        for k, v in st.items():
            assert torch.equal(as_indices["state"][i][k], v)
    fqns = [[n for n, _ in model.named_parameters()]]
    back = optimizer_state_to_fqns(plain, fqns)
    assert list(back["state"]) == list(fqn_sd["state"])
    with pytest.raises(ValueError, match="not the same model"):
        optimizer_state_to_fqns(plain, [fqns[0][:-1]])


def test_parallel_rejects_bad_settings(monkeypatch):
    from tisdpo.train.parallel import setup

    with pytest.raises(ValueError, match="distributed.mode must be one of"):
        Parallel("zero3")
    with pytest.raises(ValueError, match="needs distributed.mode='fsdp2'"):
        Parallel("ddp", mixed_precision=torch.bfloat16)
    with pytest.raises(ValueError, match="needs distributed.mode=fsdp2"):
        setup(DistributedConfig(mode="ddp", mixed_precision="bf16"))
    assert setup(DistributedConfig()).world_size == 1          # not under torchrun
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ValueError, match="each would train alone"):
        setup(DistributedConfig(mode="none"))
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="RANK=2 must be < WORLD_SIZE=2"):
        setup(DistributedConfig(mode="none"))
    assert not torch.distributed.is_initialized()            # nothing was set up


def test_fsdp2_without_torchrun_is_a_one_process_group(runs, tmp_path):
    import torch.distributed as dist

    from tisdpo.train.parallel import setup

    par = setup(DistributedConfig(mode="fsdp2", mixed_precision="none"), "cpu")
    try:
        assert (par.world_size, par.rank, par.mode) == (1, 0, "fsdp2")
        t = _trainer(tmp_path / "one", bs=BS * WORLD, par=par)
        t.train()
        _assert_params(_params(tmp_path / "one"), runs)
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------ pipeline stages

def test_stages_under_two_processes_match_one(runs, tmp_path):
    """contrastive (prompt) -> weights split over ranks -> policy with FSDP2."""
    import datasets

    from tisdpo.pipeline import context, stages, weights

    info = [r["stages"] for r in runs["ranks"]]
    assert info == [{"device": "cpu", "world": WORLD}] * WORLD
    dist_dir = runs["root"] / "stages"
    old, weights.SHARD = weights.SHARD, 4
    try:
        ctx = context.make_context(_stage_cfg(tmp_path, "none"))
        stages.run_contrastive(ctx)
        weights.run_weights(ctx)
    finally:
        weights.SHARD = old
    for split in ("train", "eval"):
        a = datasets.load_from_disk(str(dist_dir / "weights" / split))
        b = datasets.load_from_disk(str(tmp_path / "weights" / split))
        assert a.column_names == b.column_names and len(a) == len(b)
        assert a.to_list() == b.to_list()          # same records, same order, same numbers
    assert not (dist_dir / "weights" / "_shards").exists()
    # policy trained by 2 ranks: written once, 2 logged steps, loadable
    done = json.loads((dist_dir / "policy" / "done.json").read_text())
    assert done["steps"] == 2
    lines = (dist_dir / "policy" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["step"] for ln in lines if "loss" in json.loads(ln)] == [1, 2]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(dist_dir / "policy" / "final"))
    assert model.get_output_embeddings().weight.shape[0] == len(ctx.tokenizer)
    from safetensors import safe_open           # a tied head stored once, as by one process

    assert model.config.tie_word_embeddings
    for final in (dist_dir / "policy" / "final", dist_dir / "base"):
        with safe_open(str(final / "model.safetensors"), "pt") as f:
            assert "lm_head.weight" not in f.keys(), final
