"""Option validation: every bad value is refused when the configuration is built (so
``--print-config`` already exits 2) with one line naming the option, the value and what is
allowed; the defaults of every command and the edges of each range still pass; model and
tokenizer folders are checked before transformers reads them."""
import json

import pytest
import torch
import yaml

from tisdpo import cli
from tisdpo.pipeline.demo import demo_config
from tisdpo.train.config import ModelConfig, RunConfig, build_config, validate
from tisdpo.train.model import load_model, load_tokenizer, resolve_device
from tisdpo_kernels.config import WEIGHT_METHODS

TRAIN_SECTIONS = ("sft", "contrastive", "policy")

#: (option, bad value) for each section sharing TrainConfig
_TRAIN_BAD = [
    ("lr", "0"), ("lr", "-0.00001"), ("lr", "inf"), ("lr", "nan"), ("weight_decay", "-0.1"),
    ("adam_beta1", "2"), ("adam_beta1", "-0.1"), ("adam_beta2", "1"), ("eps", "-1"),
    ("eps", "0"), ("warmup_steps", "-1"), ("batch_size", "0"), ("grad_accum", "0"),
    ("epochs", "0"), ("epochs", "-1"), ("max_steps", "-1"), ("max_grad_norm", "0"),
    ("eval_every", "-1"), ("eval_batch_size", "0"), ("eval_max_pairs", "0"),
    ("eval_max_pairs", "-3"), ("save_every", "-1"), ("keep_checkpoints", "0"),
    ("stop_after", "-1"), ("optimizer", "sgd"), ("schedule", "step"),
]

BAD = [("pipeline", f"--{s}.{o}", v) for s in TRAIN_SECTIONS for o, v in _TRAIN_BAD] + [
    ("pipeline", "--seed", "-5"), ("pipeline", "--seed", str(2**32)),
    ("pipeline", "--device", "tpu"), ("pipeline", "--device", "cuda:x"),
    ("pipeline", "--device", "gpu"), ("pipeline", "--threads", "0"),
    ("pipeline", "--run_dir", " "),
    ("pipeline", "--model.tiny_heads", "3"), ("pipeline", "--model.tiny_heads", "64"),
    ("pipeline", "--model.tiny_heads", "0"), ("pipeline", "--model.tiny_kv_heads", "3"),
    ("pipeline", "--model.tiny_hidden_size", "0"), ("pipeline", "--model.tiny_layers", "0"),
    ("pipeline", "--model.tiny_intermediate_size", "0"),
    ("pipeline", "--model.tiny_max_positions", "1"), ("pipeline", "--model.dtype", "fp16"),
    ("pipeline", "--data.max_length", "100000"), ("pipeline", "--data.max_length", "1"),
    ("pipeline", "--data.max_length", "0"), ("pipeline", "--data.max_prompt_length", "0"),
    ("pipeline", "--data.eval_fraction", "1"), ("pipeline", "--data.eval_fraction", "0"),
    ("pipeline", "--data.synthetic_train", "0"), ("pipeline", "--data.synthetic_eval", "0"),
    ("pipeline", "--data.max_records", "0"), ("pipeline", "--data.pad_to_multiple_of", "0"),
    ("pipeline", "--data.truncation", "middle"),
    ("pipeline", "--policy.beta", "0"), ("pipeline", "--policy.beta", "-0.1"),
    ("pipeline", "--contrastive.beta", "0"), ("pipeline", "--contrastive.beta", "-1"),
    ("pipeline", "--policy.method", "foo"), ("pipeline", "--contrastive.method", "foo"),
    ("pipeline", "--policy.token_weights", "some"), ("pipeline", "--contrastive.variant", "x"),
    ("pipeline", "--weights.method", "foo"), ("pipeline", "--weights.top_percent", "200"),
    ("pipeline", "--weights.top_percent", "0"), ("pipeline", "--weights.k", "0"),
    ("pipeline", "--weights.lower", "2"), ("pipeline", "--weights.clip_lower", "1.5"),
    ("pipeline", "--weights.w_min", "2"), ("pipeline", "--weights.round_decimals", "9"),
    ("pipeline", "--weights.round_decimals", "-1"), ("pipeline", "--weights.batch_size", "0"),
    ("pipeline", "--log.every", "0"), ("pipeline", "--distributed.timeout_minutes", "0"),
    ("train", "--policy.beta", "-0.1"), ("train", "--log.every", "-2"),
    ("contrastive", "--contrastive.beta", "0"), ("sft", "--sft.keep_checkpoints", "0"),
    ("weights", "--weights.method", "foo"),
    ("demo", "--demo.policy_seeds", "0"), ("demo", "--demo.sample_prompts", "0"),
    ("demo", "--demo.samples_per_prompt", "0"), ("demo", "--demo.max_new_tokens", "0"),
    ("demo", "--demo.temperature", "0"), ("demo", "--policy.eval_max_pairs", "0"),
    ("train", "--policy.strategy", "fast"), ("train", "--policy.filter_eps", "0"),
    ("train", "--distributed.mixed_precision", "bf16"),        # without distributed.mode fsdp2
    ("train", "--policy.filter_eps", "1"),
]


def test_one_sweep_with_a_per_position_preset_is_refused_before_any_stage(capsys):
    assert cli.main(["train", "--print-config", "--policy.method", "cdpo_code",
                     "--policy.strategy", "one_sweep"]) == 2
    err = capsys.readouterr().err.strip()
    assert "policy.strategy=one_sweep with policy.method=cdpo_code" in err
    assert err.count("\n") == 0
    assert cli.main(["train", "--print-config", "--policy.method", "cdpo_code",
                     "--policy.strategy", "recompute"]) == 0


@pytest.mark.parametrize("section", ["policy", "contrastive"])
@pytest.mark.parametrize("data", [["--data.pad_to_multiple_of", "64"],
                                  ["--data.packing", "true"]])
def test_cdpo_code_refuses_padding_or_packing_that_would_change_its_loss(section, data,
                                                                         capsys):
    """cdpo_code averages over padded position slots: extra padding changes its loss and
    packing has no position slots. Refused in one line before any stage."""
    args = ["pipeline", "--print-config", f"--{section}.method", "cdpo_code"]
    assert cli.main(args + data) == 2
    err = capsys.readouterr().err.strip()
    assert f"{data[0][2:]}=" in err and f"{section}.method=cdpo_code" in err
    assert err.count("\n") == 0
    assert cli.main(args) == 0


@pytest.mark.parametrize("extra,why", [
    (["--policy.method", "tisdpo_paper"], "KL terms"),
    (["--policy.strategy", "one_sweep"], "one_sweep"), (["--policy.impl", "reference"], "oracle")])
def test_filter_eps_with_an_option_it_cannot_serve_is_refused_in_one_line(extra, why, capsys):
    assert cli.main(["train", "--print-config", "--policy.filter_eps", "0.001", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert "policy.filter_eps=0.001" in err and why in err and err.count("\n") == 0
    assert cli.main(["train", "--print-config", "--policy.filter_eps", "0.001"]) == 0


@pytest.mark.parametrize("command, option, value", BAD)
def test_bad_option_exits_2_naming_it(command, option, value, capsys):
    assert cli.main([command, "--print-config", option, value]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert captured.out == ""                           # nothing printed as the config
    assert "\n" not in err, err                         # one line
    assert err.startswith(f"tisdpo {command}: ")
    assert option[2:] in err, err                       # the option as typed, sans dashes
    assert "got " in err, err                           # the value given


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_defaults_of_every_command_pass(command, capsys):
    assert cli.main([command, "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["seed"] == 0


@pytest.mark.parametrize("option, value", [
    ("--policy.stop_after", "0"), ("--policy.save_every", "0"), ("--sft.keep_checkpoints", "1"),
    ("--weights.top_percent", "100"), ("--weights.top_percent", "0.5"),
    ("--policy.adam_beta1", "0"), ("--contrastive.adam_beta2", "0.9999"),
    ("--policy.eval_max_pairs", "1"), ("--policy.eval_max_pairs", "none"),
    ("--policy.beta", "none"), ("--policy.beta", "0.01"), ("--device", "cuda:1"),
    ("--device", "mps"), ("--device", "cpu"), ("--model.tiny_heads", "8"),
    ("--data.max_length", "512"), ("--log.every", "1"), ("--seed", "0"),
    ("--weights.method", "binary"), ("--policy.method", "simpo"),
    ("--policy.max_steps", "3"),
])
def test_edges_of_the_ranges_pass(option, value, capsys):
    assert cli.main(["pipeline", "--print-config", option, value]) == 0, \
        capsys.readouterr().err


def test_every_weight_method_and_preset_of_the_kernels_is_accepted(capsys):
    from tisdpo_kernels import PRESETS

    for rule in WEIGHT_METHODS:
        assert cli.main(["pipeline", "--print-config", "--weights.method", rule]) == 0
    for preset in PRESETS:
        assert cli.main(["pipeline", "--print-config", "--policy.method", preset,
                         "--contrastive.method", preset]) == 0, capsys.readouterr().err


def test_the_message_names_value_and_rule(capsys):
    assert cli.main(["train", "--print-config", "--policy.beta", "-0.1"]) == 2
    assert "policy.beta must be > 0 or empty, got -0.1" in capsys.readouterr().err
    assert cli.main(["train", "--print-config", "--device", "tpu"]) == 2
    err = capsys.readouterr().err
    assert "device must be one of auto, cpu, cuda, cuda:N" in err and "'tpu'" in err
    assert cli.main(["train", "--print-config", "--model.tiny_heads", "3"]) == 2
    err = capsys.readouterr().err
    assert "model.tiny_heads must be a divisor of model.tiny_hidden_size=64" in err
    assert err.rstrip().endswith("got 3")
    assert cli.main(["train", "--print-config", "--policy.batch_size", "2.5"]) == 2
    assert "policy.batch_size expects int" in capsys.readouterr().err


def test_validate_checks_configs_built_in_code():
    validate(RunConfig())
    validate(demo_config()), validate(demo_config(fast=True))
    for section, attr, bad in [("policy", "optimizer", "sgd"), ("policy", "lr", float("nan")),
                               ("contrastive", "beta", -1.0), ("policy", "batch_size", 2.5),
                               ("data", "max_prompt_length", 600)]:
        cfg = RunConfig()
        setattr(getattr(cfg, section), attr, bad)
        with pytest.raises(ValueError, match=rf"^{section}\.{attr} must be"):
            validate(cfg)


def test_distributed_mode_allows_only_auto_cuda_cpu(capsys):
    assert cli.main(["train", "--print-config", "--distributed.mode", "ddp", "--device",
                     "cuda:1"]) == 2
    assert "device must be auto, cuda or cpu under distributed.mode=ddp" in \
        capsys.readouterr().err


# ------------------------------------------------------------------ model and tokenizer

@pytest.mark.parametrize("key", ["max_position_embeddings", "n_positions"])
def test_max_length_bounded_by_the_models_positions(tmp_path, key, capsys):
    (tmp_path / "config.json").write_text(json.dumps({key: 64}))
    base = ["train", "--print-config", "--model.path", str(tmp_path),
            "--data.max_prompt_length", "16"]
    assert cli.main(base + ["--data.max_length", "65"]) == 2
    err = capsys.readouterr().err
    assert f"data.max_length must be <= 64, the {key} of model.path {tmp_path}, got 65" in err
    assert cli.main(base + ["--data.max_length", "64"]) == 0


def test_max_length_bounded_by_the_tiny_models_positions(capsys):
    assert cli.main(["train", "--print-config", "--data.max_length", "600"]) == 2
    assert "model.tiny_max_positions=512" in capsys.readouterr().err
    assert cli.main(["train", "--print-config", "--data.max_length", "600",
                     "--model.tiny_max_positions", "600"]) == 0


def test_model_folder_without_config_json(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    msg = rf"^model.path {tmp_path}: no config.json, not a Hugging Face model folder$"
    cfg = ModelConfig(path=str(tmp_path))
    with pytest.raises(ValueError, match=msg):
        load_tokenizer(cfg)
    with pytest.raises(ValueError, match=msg):
        load_model(cfg, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="model.path .* is not a local directory"):
        load_tokenizer(ModelConfig(path=str(tmp_path / "nope")))
    with pytest.raises(ValueError, match=rf"^model.tokenizer {tmp_path}: none of "):
        load_tokenizer(ModelConfig(tokenizer=str(tmp_path)))


@pytest.mark.parametrize("name, message", [
    ("tpu", "device must be one of auto, cpu, cuda, cuda:N"),
    ("cuda:x", "device must be one of"),
])
def test_resolve_device_names_the_allowed_forms(name, message):
    with pytest.raises(ValueError, match=message):
        resolve_device(name)
    assert resolve_device("cpu") == torch.device("cpu")


def test_a_runs_record_leaves_out_the_options_of_one_command():
    """config.yaml keeps what defines the run; resume and stop_after steer one command: read
    back by the next, ``pipeline.resume false`` would redo every finished stage again."""
    from tisdpo.train.config import as_recorded

    cfg = build_config(overrides={"pipeline.resume": "false", "sft.stop_after": "3",
                                  "contrastive.stop_after": "4", "policy.stop_after": "5",
                                  "policy.lr": "0.001"})
    kept = as_recorded(cfg)
    assert kept.pipeline.resume is True
    assert (kept.sft.stop_after, kept.contrastive.stop_after, kept.policy.stop_after) == \
        (None, None, None)
    assert kept.policy.lr == 0.001 and cfg.pipeline.resume is False     # cfg as it was


def test_a_config_file_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """A write cut short (a full disk, a kill) leaves the previous file, not half of one that
    still parses with options lost."""
    from trainer_cases import die_writing

    from tisdpo.train.config import dump_yaml

    path = tmp_path / "config.yaml"
    dump_yaml(build_config(overrides={"policy.lr": "0.001"}), str(path))
    before = path.read_text()
    die_writing(monkeypatch, "config.yaml")
    with pytest.raises(SystemExit, match="killed"):
        dump_yaml(build_config(overrides={"policy.lr": "0.002"}), str(path))
    monkeypatch.undo()
    assert path.read_text() == before
