"""A training stage's options.json records its global micro-batch (``batch_size`` × processes,
what the trainer's checkpoints record and check), not the per-process ``batch_size``: a stage
made on one process is reused or resumed on two with half the batch size and the other way
round, another global batch is refused by name, and options.json files written before (the
per-process ``<section>.batch_size``) are still accepted for a one-process run."""
import json
import os

import pytest
import torch.distributed as dist

from test_stages import tiny_cfg
from tisdpo.pipeline import context, fingerprint, stages
from tisdpo.pipeline.fingerprint import (
    StageOptionsChanged, check_options, stage_digest, stage_options,
)
from tisdpo.train.checkpoint import DONE_FILE, stage_done

SECTIONS = ("sft", "contrastive", "policy")


def _fake_world(monkeypatch, world: int) -> None:
    """The default process group as ``world`` processes (what torchrun's ranks see)."""
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: world)


def _opts(monkeypatch, root, world: int, batch_size: int, sections=SECTIONS) -> dict:
    _fake_world(monkeypatch, world)
    cfg = tiny_cfg(root)
    for s in SECTIONS:
        getattr(cfg, s).batch_size = batch_size
    return stage_options(cfg, sections)


def _record(out_dir, options) -> None:
    check_options(str(out_dir), options, desc="sft", resume=False, reusable=False)


def _resume(out_dir, options) -> None:
    check_options(str(out_dir), options, desc="sft", resume=True, reusable=True)


def _read(out_dir) -> dict:
    with open(os.path.join(out_dir, fingerprint.OPTIONS_FILE)) as fh:
        return json.load(fh)


# ------------------------------------------------------------------ unit: stage_options

def test_one_and_two_processes_with_the_same_global_batch_record_the_same(tmp_path,
                                                                         monkeypatch):
    two = _opts(monkeypatch, tmp_path, world=2, batch_size=2)
    one = _opts(monkeypatch, tmp_path, world=1, batch_size=4)
    assert two == one
    for s in SECTIONS:
        assert one["options"][f"{s}.global_batch_size"] == 4
        assert f"{s}.batch_size" not in one["options"]
        assert f"{s}.grad_accum" in one["options"]          # recorded as it was
    # without a process group (distributed.mode none): one process
    monkeypatch.undo()
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    cfg = tiny_cfg(tmp_path)
    cfg.sft.batch_size = 3
    assert stage_options(cfg, ("sft",))["options"]["sft.global_batch_size"] == 3


def test_another_process_count_resumes_and_another_global_batch_is_refused(tmp_path,
                                                                          monkeypatch):
    out = tmp_path / "sft"
    _record(out, _opts(monkeypatch, tmp_path, world=2, batch_size=2, sections=("sft",)))
    _resume(out, _opts(monkeypatch, tmp_path, world=1, batch_size=4, sections=("sft",)))
    _resume(out, _opts(monkeypatch, tmp_path, world=4, batch_size=1, sections=("sft",)))
    for world, bs, now in ((1, 2, 2), (2, 4, 8)):
        with pytest.raises(StageOptionsChanged, match=f"sft: {out} was made with other "
                                                      f"options: sft.global_batch_size=4 then, "
                                                      f"{now} now"):
            _resume(out, _opts(monkeypatch, tmp_path, world=world, batch_size=bs,
                               sections=("sft",)))
    assert _read(out)["options"]["sft.global_batch_size"] == 4


def test_options_json_from_before_accepted_for_one_process_and_keeps_its_digest(tmp_path,
                                                                               monkeypatch):
    """An options.json with the per-process ``<section>.batch_size``: of a one-process run
    that is its global batch, accepted and rewritten under the new name with the same digest
    (later stages recorded it); of a several-process run it is refused, naming the option."""
    new = _opts(monkeypatch, tmp_path, world=1, batch_size=4)
    legacy = {"options": {k.replace(".global_batch_size", ".batch_size"): v
                          for k, v in new["options"].items()}, "upstream": {}}
    assert legacy["options"]["sft.batch_size"] == 4 and "sft.global_batch_size" not in \
        legacy["options"]
    out = tmp_path / "stage"
    out.mkdir()
    (out / DONE_FILE).write_text('{"stage": "sft"}')
    with open(out / fingerprint.OPTIONS_FILE, "w") as fh:
        json.dump(legacy, fh)
    digest = stage_digest(str(out))
    _resume(out, _opts(monkeypatch, tmp_path, world=2, batch_size=2))   # the same global
    rec = _read(out)["options"]
    assert rec["sft.global_batch_size"] == rec["policy.global_batch_size"] == 4
    assert "sft.batch_size" not in rec and "inputs" in _read(out)
    assert stage_digest(str(out)) == digest
    # a several-process run's options.json: its per-process value is not the global batch
    with open(out / fingerprint.OPTIONS_FILE, "w") as fh:
        json.dump({**legacy, "options": {**legacy["options"], "sft.batch_size": 2}}, fh)
    with pytest.raises(StageOptionsChanged, match=r"sft.global_batch_size=2 then \(recorded "
                                                  r"as sft.batch_size\), 4 now"):
        _resume(out, _opts(monkeypatch, tmp_path, world=2, batch_size=2))


# ------------------------------------------------------------------ a stage, end to end

def test_finished_stage_is_reused_with_the_same_global_batch_on_two_processes(tmp_path,
                                                                             monkeypatch):
    """SFT finished on one process with batch_size 4 is reused by a two-process run with
    batch_size 2 (skipped as done), refused with batch_size 3 (6 pairs), and an options.json
    from before (``sft.batch_size``) is accepted, rewritten, and keeps its digest."""
    cfg = tiny_cfg(tmp_path / "run", **{"sft.enabled": True})
    ctx = context.make_context(cfg)
    stages.run_sft(ctx)
    sft = ctx.path("sft")
    assert stage_done(sft) and _read(sft)["options"]["sft.global_batch_size"] == 4
    mtime = os.path.getmtime(os.path.join(sft, DONE_FILE))
    monkeypatch.setattr(fingerprint, "_world_size", lambda: 2)
    two = tiny_cfg(tmp_path / "run", **{"sft.enabled": True})
    two.sft.batch_size = 2
    stages.run_sft(context.make_context(two))                  # already done: reused
    assert os.path.getmtime(os.path.join(sft, DONE_FILE)) == mtime
    two.sft.batch_size = 3
    with pytest.raises(StageOptionsChanged, match="sft.global_batch_size=4 then, 6 now"):
        stages.run_sft(context.make_context(two))
    monkeypatch.undo()
    old = _read(sft)
    old["options"]["sft.batch_size"] = old["options"].pop("sft.global_batch_size")
    with open(os.path.join(sft, fingerprint.OPTIONS_FILE), "w") as fh:
        json.dump(old, fh)
    digest = stage_digest(sft)
    stages.run_sft(ctx)
    assert _read(sft)["options"]["sft.global_batch_size"] == 4
    assert "sft.batch_size" not in _read(sft)["options"] and stage_digest(sft) == digest


def test_cdpo_code_records_the_batch_sizes_that_set_its_padding(tmp_path, monkeypatch):
    """cdpo_code's loss is a mean over padded slots, so the per-process and evaluation batch
    sizes (which set each micro-batch's padding) are options of its result; other presets
    record only the global batch."""
    _fake_world(monkeypatch, 1)
    cfg = tiny_cfg(tmp_path)
    plain = stage_options(cfg, ("policy",))["options"]
    assert "policy.process_batch_size" not in plain and "policy.eval_batch_size" not in plain
    cfg.policy.method = "cdpo_code"
    opts = stage_options(cfg, ("policy",))["options"]
    assert opts["policy.process_batch_size"] == cfg.policy.batch_size
    assert opts["policy.eval_batch_size"] == cfg.policy.eval_batch_size
    cfg.policy.eval_batch_size += 1
    assert stage_options(cfg, ("policy",))["options"] != opts


def test_fsdp2_bf16_compute_is_an_option_and_the_head_check_is_not(tmp_path, monkeypatch):
    """FSDP2's bf16 compute over float32 weights changes results as model.dtype does: it is
    recorded (only then); model.check_head, a load-time probe, is not, and an options.json
    that recorded it still matches."""
    _fake_world(monkeypatch, 1)
    cfg = tiny_cfg(tmp_path)
    plain = stage_options(cfg, ("policy",))
    assert "distributed.compute_dtype" not in plain["options"]
    assert "model.check_head" not in plain["options"]
    cfg.distributed.mode, cfg.distributed.mixed_precision = "fsdp2", "bf16"
    assert stage_options(cfg, ("policy",))["options"]["distributed.compute_dtype"] == "bfloat16"
    out = tmp_path / "stage"
    old = {**plain, "options": {**plain["options"], "model.check_head": True}}
    _record(out, old)
    _resume(out, plain)                                         # no difference
    with pytest.raises(StageOptionsChanged, match="distributed.compute_dtype"):
        _resume(out, stage_options(cfg, ("policy",)))
