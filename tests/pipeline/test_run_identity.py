"""Two runs never mix: input files and folders recorded by content, earlier stages made from
other data or options, stored weights with other weights.* options, the run's seed beside the
policy's, options a run would ignore, and a base model always with its options."""
import json
import os
import shutil

import datasets
import pytest

from test_stage_faults import DPO
from test_stages import tiny_cfg
from tisdpo import cli
from tisdpo.pipeline import context, fingerprint, stages, weights
from tisdpo.pipeline.fingerprint import StageOptionsChanged, stage_digest
from tisdpo.train.checkpoint import checkpoints, stage_done
from tisdpo.train.synthetic import make_synthetic_task


def _write_pairs(path, seed: int, n: int = 16):
    train, _, _ = make_synthetic_task(n, 0, seed=seed)
    with open(path, "w") as fh:
        for rec in train:
            fh.write(json.dumps({k: rec[k] for k in ("prompt", "chosen", "rejected")}) + "\n")
    return str(path)


def _cli(args, capsys):
    code = cli.main(args)
    return code, capsys.readouterr().err


def _options(stage_dir):
    return json.load(open(os.path.join(stage_dir, "options.json")))


# ------------------------------------------------------------------ inputs by content

def test_data_file_changed_in_place_is_refused_on_resume_and_when_done(tmp_path, capsys):
    cur, other = tmp_path / "cur.jsonl", tmp_path / "other.jsonl"
    _write_pairs(cur, seed=1)
    _write_pairs(other, seed=2)
    kept = cur.read_bytes()
    run = ["--run_dir", str(tmp_path / "run"), "--data.train", str(cur)]
    assert _cli(DPO + run + ["--policy.stop_after", "2"], capsys)[0] == 0
    shutil.copy(other, cur)                                  # another dataset, the same path
    code, err = _cli(DPO + run, capsys)
    assert code == 1 and err.count("\n") == 1, err
    assert f"data.train {cur}: its content has changed (sha256:" in err
    assert len(checkpoints(str(tmp_path / "run" / "policy"))) == 1      # nothing touched
    cur.write_bytes(kept)                                    # the same content resumes
    assert _cli(DPO + run, capsys)[0] == 0
    assert stage_done(str(tmp_path / "run" / "policy"))
    shutil.copy(other, cur)                                  # and is never "already done"
    code, err = _cli(DPO + run, capsys)
    assert code == 1 and "data.train" in err and "content has changed" in err


def test_model_folder_changed_in_place_is_refused(tmp_path):
    model = tmp_path / "model"
    shutil.copytree(context.base_model_path(context.make_context(tiny_cfg(tmp_path / "a"))),
                    model)
    cfg = tiny_cfg(tmp_path / "run", **{"model.path": str(model), "policy.method": "dpo",
                                        "policy.stop_after": 1})
    with pytest.raises(context.StageStopped):
        stages.run_policy(context.make_context(cfg))
    other = context.base_model_path(context.make_context(tiny_cfg(tmp_path / "b", seed=1)))
    for name in os.listdir(other):                           # other weights, the same folder
        shutil.copy(os.path.join(other, name), model / name)
    with pytest.raises(StageOptionsChanged, match=f"model.path {model}: its content has "
                                                  f"changed \\(folder:"):
        stages.run_policy(context.make_context(cfg))


def test_input_identity_of_data_and_model_folders(tmp_path):
    def ident(**options):
        return fingerprint.input_identity(tiny_cfg(tmp_path / "run", **options))

    saved = tmp_path / "saved"
    datasets.Dataset.from_list([{"prompt": "p", "chosen": "a", "rejected": "b"}]) \
        .save_to_disk(str(saved))
    first = ident(**{"data.train": str(saved)})["data.train"]
    (saved / "cache-0123.arrow").write_bytes(b"x")          # what datasets writes beside it
    assert ident(**{"data.train": str(saved)})["data.train"] == first
    shutil.rmtree(saved)
    datasets.Dataset.from_list([{"prompt": "p", "chosen": "a", "rejected": "c"}]) \
        .save_to_disk(str(saved))
    assert ident(**{"data.train": str(saved)})["data.train"] != first

    files = tmp_path / "files"
    files.mkdir()
    _write_pairs(files / "train.jsonl", seed=1)
    first = ident(**{"data.train": str(files)})["data.train"]
    (files / "notes.txt").write_text("not data")
    assert ident(**{"data.train": str(files)})["data.train"] == first
    _write_pairs(files / "train.jsonl", seed=2)
    assert ident(**{"data.train": str(files)})["data.train"] != first

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    blob = bytearray(os.urandom(3 << 20))                    # sampled: size, first, last MiB
    (model / "model.safetensors").write_bytes(blob)
    first = ident(**{"model.path": str(model)})["model.path"]
    (model / "model.safetensors").write_bytes(blob)           # rewritten, the same bytes
    assert ident(**{"model.path": str(model)})["model.path"] == first
    blob[-1] ^= 1
    (model / "model.safetensors").write_bytes(blob)
    changed = ident(**{"model.path": str(model)})["model.path"]
    assert changed != first
    (model / "config.json").write_text('{"x": 1}')
    assert ident(**{"model.path": str(model)})["model.path"] not in (first, changed)
    assert ident() == {} and ident(**{"data.train": str(tmp_path / "missing")}) == {}


def test_options_recorded_before_inputs_are_accepted_and_completed(tmp_path):
    data = _write_pairs(tmp_path / "pairs.jsonl", seed=1)
    cfg = tiny_cfg(tmp_path / "run", **{"data.train": data})
    ctx = context.make_context(cfg)
    stages.run_sft(ctx)
    sft = ctx.path("sft")
    old = _options(sft)
    legacy = {"options": old["options"], "upstream": old["upstream"]}
    with open(os.path.join(sft, "options.json"), "w") as fh:
        json.dump(legacy, fh, indent=1, sort_keys=True)
    digest = stage_digest(sft)
    stages.run_sft(ctx)                                       # already done: accepted
    assert _options(sft)["inputs"] == old["inputs"] and "data.train" in old["inputs"]
    assert stage_digest(sft) == digest                        # later stages still match it


# ------------------------------------------------------------------ earlier stages

@pytest.fixture
def weighted(tmp_path):
    """contrastive (prompt variant) -> weights on a data file."""
    data = _write_pairs(tmp_path / "a.jsonl", seed=1)
    overrides = {"contrastive.variant": "prompt", "data.train": data}
    ctx = context.make_context(tiny_cfg(tmp_path / "run", **overrides))
    stages.run_contrastive(ctx)
    weights.run_weights(ctx)
    return tmp_path, overrides


def test_policy_on_other_data_than_the_weights_stage_is_refused(weighted):
    root, overrides = weighted
    other = _write_pairs(root / "b.jsonl", seed=2)
    for change, match in (({"data.train": other}, f"data.train='{root / 'a.jsonl'}' then, "
                                                   f"'{other}' now"),
                          ({"seed": 1}, "seed=0 then, 1 now"),
                          ({"data.max_records": 8}, "data.max_records=None then, 8 now")):
        cfg = tiny_cfg(root / "run", **{**overrides, **change})
        with pytest.raises(StageOptionsChanged, match=f"^weights .*{match}"):
            stages.run_policy(context.make_context(cfg))
    shutil.copy(other, root / "a.jsonl")                      # the same path, other content
    with pytest.raises(StageOptionsChanged, match="data.train .*a.jsonl: its content has"):
        stages.run_policy(context.make_context(tiny_cfg(root / "run", **overrides)))
    assert not os.path.exists(root / "run" / "policy")        # nothing recorded, nothing run


def test_stored_weights_with_other_weights_options_are_refused(weighted):
    import dataclasses

    root, overrides = weighted

    def data(mode="auto", **weight_options):
        ctx = context.make_context(tiny_cfg(root / "run", **overrides, **{
            f"weights.{k}": v for k, v in weight_options.items()}))
        return stages._policy_data(ctx, dataclasses.replace(ctx.cfg.policy, method="tisdpo",
                                                            token_weights=mode))

    with pytest.raises(StageOptionsChanged, match="weights.k=1.0 then, 2.0 now; policy.token_"
                                                  "weights=recompute applies"):
        data(k=2.0)
    with pytest.raises(StageOptionsChanged, match="weights.method=None then, 'exp_clamp' now"):
        data(method="exp_clamp")
    with pytest.raises(StageOptionsChanged, match="weights.cdpo_b=1.0 then, 2.0 now"):
        data("recompute", cdpo_b=2.0)                         # made by the weights stage only
    assert data(method="rank_based")[2]                       # the rule they were made with
    assert data("recompute", method="exp_clamp", k=2.0)[2]    # applied to the stored scores
    assert not data("equal", k=2.0)[2]                        # not used at all
    cfg = tiny_cfg(root / "run", **overrides, **{"weights.k": 2.0})
    with pytest.raises(StageOptionsChanged, match="weights.k"):
        stages.run_policy(context.make_context(cfg))
    assert not stage_done(str(root / "run" / "policy"))


def test_weights_stage_checks_the_contrastive_options_like_the_pipeline(tmp_path):
    run = tmp_path / "run"
    stages.run_contrastive(context.make_context(tiny_cfg(run, **{"contrastive.max_steps": 1})))
    for change, match in (({"contrastive.lr": 1e-3}, "^contrastive\\+: .*contrastive.lr=0.002 "
                                                     "then, 0.001 now"),
                          ({"contrastive.variant": "prompt"},
                           "contrastive.variant='dpo' then, 'prompt' now"),
                          ({"data.synthetic_train": 12},
                           "data.synthetic_train=20 then, 12 now")):
        cfg = tiny_cfg(run, **{"contrastive.max_steps": 1, **change})
        with pytest.raises(StageOptionsChanged, match=match):
            weights.run_weights(context.make_context(cfg))
        assert not stage_done(str(run / "weights"))
    weights.run_weights(context.make_context(tiny_cfg(run, **{"contrastive.max_steps": 1})))
    assert stage_done(str(run / "weights"))
    # redoing the pass (pipeline.resume off) with mismatched models refuses before it deletes
    cfg = tiny_cfg(run, **{"contrastive.max_steps": 1, "contrastive.variant": "prompt",
                           "pipeline.resume": False})
    with pytest.raises(StageOptionsChanged, match="contrastive.variant='dpo' then"):
        weights.run_weights(context.make_context(cfg))
    assert stage_done(str(run / "weights"))


# ------------------------------------------------------------------ seeds, ignored options

def test_run_seed_is_recorded_beside_the_policy_seed(tmp_path):
    model = context.base_model_path(context.make_context(tiny_cfg(tmp_path / "m")))
    overrides = {"model.path": model, "data.train": _write_pairs(tmp_path / "a.jsonl", 1),
                 "policy.method": "dpo", "policy.seed": 5, "policy.stop_after": 1}
    cfg = tiny_cfg(tmp_path / "run", **overrides)
    with pytest.raises(context.StageStopped):
        stages.run_policy(context.make_context(cfg))
    policy = str(tmp_path / "run" / "policy")
    other = tiny_cfg(tmp_path / "run", **overrides, seed=1)   # another train/eval split
    with pytest.raises(StageOptionsChanged, match="seed=0 then, 1 now"):
        stages.run_policy(context.make_context(other))
    opts = _options(policy)["options"]
    assert opts["seed"] == 0 and opts["policy.seed"] == 5
    # options.json from before: the resolved policy seed as "seed", no inputs; still resumes
    old = _options(policy)
    old["options"]["seed"] = old["options"].pop("policy.seed")
    with open(os.path.join(policy, "options.json"), "w") as fh:
        json.dump({"options": old["options"], "upstream": old["upstream"]}, fh)
    cfg.policy.stop_after = None
    stages.run_policy(context.make_context(cfg))
    opts = _options(policy)["options"]
    assert stage_done(policy) and opts["seed"] == 0 and opts["policy.seed"] == 5


def test_data_eval_without_data_train_is_refused(tmp_path, capsys):
    data = _write_pairs(tmp_path / "eval.jsonl", seed=1)
    code, err = _cli(DPO + ["--run_dir", str(tmp_path / "run"), "--data.eval", data], capsys)
    assert code == 1 and err.count("\n") == 1, err
    assert f"data.eval {data}: given without data.train" in err
    assert not os.path.exists(tmp_path / "run" / "policy")


# ------------------------------------------------------------------ the base model

def test_base_model_is_never_in_place_without_its_options(tmp_path, monkeypatch):
    real = os.replace

    def killed_after_base(src, dst):
        real(src, dst)
        if str(dst).endswith(os.sep + "base"):
            raise KeyboardInterrupt
    monkeypatch.setattr(os, "replace", killed_after_base)
    with pytest.raises(KeyboardInterrupt):
        context.base_model_path(context.make_context(tiny_cfg(tmp_path)))
    monkeypatch.setattr(os, "replace", real)
    with pytest.raises(StageOptionsChanged, match="model.tiny_layers=1 then, 2 now"):
        context.base_model_path(context.make_context(tiny_cfg(tmp_path, **{
            "model.tiny_layers": 2})))
    # a base from before options were recorded: accepted, and checked from then on
    os.remove(tmp_path / "base" / fingerprint.OPTIONS_FILE)
    context.base_model_path(context.make_context(tiny_cfg(tmp_path)))
    with pytest.raises(StageOptionsChanged, match="model.tiny_layers=1 then, 2 now"):
        context.base_model_path(context.make_context(tiny_cfg(tmp_path, **{
            "model.tiny_layers": 2})))
