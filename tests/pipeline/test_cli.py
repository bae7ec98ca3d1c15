"""The `tisdpo` command line: --help, YAML parsing, precedence, errors, resume in a new process."""
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from tisdpo import cli
from tisdpo.train.config import RunConfig, build_config, coerce, field_specs

SUBCOMMANDS = ("sft", "contrastive", "weights", "train", "pipeline", "inspect", "demo")
TINY = ["--model.tiny_hidden_size", "32", "--model.tiny_layers", "1", "--model.tiny_heads", "2",
        "--model.tiny_kv_heads", "1", "--model.tiny_intermediate_size", "48",
        "--data.synthetic_train", "16", "--data.synthetic_eval", "4", "--device", "cpu",
        "--log.progress", "false", "--log.tensorboard", "false", "--log.every", "1"]


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_explains_every_option_of_each_subcommand(command, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--config" in out and "--seed" in out and "--run_dir" in out
    sections = cli.COMMANDS[command][1]
    for spec in field_specs():
        if spec.name.split(".")[0] in sections:
            assert f"--{spec.name}" in out, f"{command} --help lacks --{spec.name}"
    assert all(spec.help for spec in field_specs()), "every option needs a help text"


def test_top_level_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert all(c in out for c in SUBCOMMANDS)


def _resolved(argv, capsys):
    assert cli.main(argv + ["--print-config"]) == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_yaml_then_flags_precedence(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({
        "seed": 3, "run_dir": "runs/from-yaml",
        "policy": {"lr": 1.0e-4, "method": "tisdpo_paper", "max_grad_norm": None},
        "sft": {"enabled": True}, "data": {"max_length": 128, "max_prompt_length": 64}}))
    got = _resolved(["train", "--config", str(path), "--policy.lr", "3e-4", "--data.eos",
                     "count"], capsys)
    assert got["policy"]["lr"] == 3e-4                     # flag beats YAML
    assert got["policy"]["method"] == "tisdpo_paper"       # YAML beats default
    assert got["policy"]["max_grad_norm"] is None          # YAML null on an optional
    assert got["sft"]["enabled"] is True and got["seed"] == 3
    assert got["data"] == {**got["data"], "max_length": 128, "eos": "count"}
    assert got["contrastive"]["lr"] == RunConfig().contrastive.lr    # untouched default


def test_bool_flags_and_optional_values(capsys):
    got = _resolved(["pipeline", "--sft.enabled", "--weights.round_decimals", "2",
                     "--model.path", "none"], capsys)
    assert got["sft"]["enabled"] is True and got["model"]["path"] is None
    cfg = build_config(overrides={"log.progress": "false", "weights.round_decimals": "null"})
    assert cfg.log.progress is False and cfg.weights.round_decimals is None


def test_demo_defaults_sit_below_yaml_and_flags(capsys):
    got = _resolved(["demo", "--policy.lr", "0.01"], capsys)
    assert got["policy"]["lr"] == 0.01 and got["sft"]["enabled"] is True
    assert got["run_dir"] == "runs/demo" and got["demo"]["fast"] is False
    assert _resolved(["demo", "--fast"], capsys)["data"]["synthetic_train"] < 100


@pytest.mark.parametrize("bad, message", [
    ({"policy": {"lrr": 1}}, "unknown config option 'policy.lrr'"),
    ({"policy": {"lr": "fast"}}, "policy.lr expects float"),
    ({"policy": {"optimizer": "sgd"}}, "policy.optimizer must be one of"),
    ({"sft": {"enabled": "maybe"}}, "sft.enabled expects bool"),
    ({"lr": 1}, "did you mean"),
    ({"data": {"max_length": 40}}, "data.max_prompt_length must be in [1, data.max_length=40)"),
    ({"policy": {"grad_accum": 0}}, "policy.grad_accum must be >= 1"),
    ([1, 2], "expected a mapping"),
])
def test_bad_yaml_names_the_option(tmp_path, capsys, bad, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    assert cli.main(["train", "--config", str(path)]) == 2
    assert message in capsys.readouterr().err


def test_coerce_rejects_empty_required_values():
    with pytest.raises(ValueError, match="may not be empty"):
        coerce("policy.lr", None)
    with pytest.raises(ValueError, match="expects int"):
        coerce("policy.batch_size", 2.5)


def test_train_stopped_then_resumed_in_a_new_process_matches_uninterrupted(tmp_path):
    # `tisdpo train` (DPO, no weights stage needed) for 4 steps: once straight through, once
    # stopped after step 2 in this process and finished by a fresh `python -m tisdpo.cli`.
    common = ["train", "--policy.method", "dpo", "--policy.max_steps", "4",
              "--policy.batch_size", "4", "--policy.lr", "1e-3", "--policy.warmup_steps", "1",
              "--policy.optimizer", "adamw"] + TINY
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                  # same thread count as the subprocess below
    try:
        assert cli.main(common + ["--run_dir", full]) == 0
        assert cli.main(common + ["--run_dir", cut, "--policy.stop_after", "2"]) == 0
    finally:
        torch.set_num_threads(threads)
    # the run's record leaves stop_after out: a command given it would stop again
    saved = yaml.safe_load(open(os.path.join(cut, "config.yaml")))
    assert saved["policy"]["stop_after"] is None and saved["policy"]["max_steps"] == 4
    assert not os.path.isfile(os.path.join(cut, "policy", "done.json"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "tisdpo.cli"] + common + ["--run_dir", cut],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.load(open(os.path.join(cut, "policy", "done.json")))["steps"] == 4
    from safetensors.torch import load_file

    a = load_file(os.path.join(full, "policy", "final", "model.safetensors"))
    b = load_file(os.path.join(cut, "policy", "final", "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resuming in a new process"
    assert os.path.isfile(os.path.join(cut, "config.yaml"))


def test_pipeline_command_from_a_yaml_file(tmp_path, capsys):
    conf = {
        "run_dir": str(tmp_path / "run"), "device": "cpu", "threads": 1,
        "model": {"tiny_hidden_size": 32, "tiny_layers": 1, "tiny_heads": 2, "tiny_kv_heads": 1,
                  "tiny_intermediate_size": 48},
        "data": {"synthetic_train": 12, "synthetic_eval": 4, "max_length": 40,
                 "max_prompt_length": 16},
        "sft": {"enabled": True, "max_steps": 1, "batch_size": 4},
        "contrastive": {"max_steps": 1, "batch_size": 4, "warmup_steps": 0},
        "policy": {"max_steps": 2, "batch_size": 4, "warmup_steps": 0, "lr": 1e-3},
        "log": {"progress": False, "tensorboard": False},
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(conf))
    assert cli.main(["pipeline", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    for stage in ("sft", "contrastive", "weights", "policy"):
        assert f"{stage}: " in out
    run = tmp_path / "run"
    assert json.load(open(run / "policy" / "done.json"))["init"].endswith("sft/final")
    assert yaml.safe_load(open(run / "config.yaml"))["policy"]["max_steps"] == 2


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
@pytest.mark.parametrize("stop", [False, True], ids=["finished", "stopped"])
def test_a_distributed_command_ends_its_process_group(mode, stop, tmp_path):
    """A command in a distributed mode (here a one-process group, as without torchrun)
    destroys the process group it made, whether it finished or stopped at an agreed step."""
    import torch.distributed as dist
    argv = ["train", "--policy.method", "dpo", "--policy.max_steps", "2",
            "--policy.batch_size", "4", "--run_dir", str(tmp_path / "run"),
            "--distributed.mode", mode] + TINY + (["--policy.stop_after", "1"] if stop else [])
    assert cli.main(argv) == 0
    assert os.path.isfile(tmp_path / "run" / "policy" / "done.json") != stop
    assert not dist.is_initialized()


@pytest.mark.parametrize("argv,message", [
    (["train", "--policy.warmup", "3"], "unrecognized arguments: --policy.warmup 3"),
    (["train", "--policy.lrr", "1e-3"], "unrecognized arguments: --policy.lrr"),
    (["train", "--policy.method", "dpo", "--policy.beta"], "--policy.beta: expected one"),
])
def test_abbreviated_or_unknown_options_are_one_line(argv, message, capsys):
    """No prefix matching (--policy.warmup was taken for warmup_steps); argparse's errors
    name the command in one line. (A flag given twice takes its last value, as argparse
    does, so that a command line can override an earlier part of itself.)"""
    with pytest.raises(SystemExit) as exc:
        code = cli.main(argv + ["--print-config"])
        raise SystemExit(code)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and message in err and err.startswith("tisdpo train")
    assert "\n" not in err


def test_demo_fast_and_task_from_the_config_file_pick_the_demos_defaults(tmp_path, capsys):
    """demo.fast / data.synthetic_task in --config choose the demo's sizes, run folder and
    weight span as the flags do (in a file they were read after the defaults were chosen)."""
    path = tmp_path / "demo.yaml"
    for text, flags in (("demo: {fast: true}\n", ["--fast"]),
                        ("data: {synthetic_task: hard}\n", ["--task", "hard"])):
        path.write_text(text)
        from_file = _resolved(["demo", "--config", str(path)], capsys)
        from_flags = _resolved(["demo", *flags], capsys)
        assert from_file == from_flags
    assert from_file["run_dir"] == "runs/demo-hard" and from_file["weights"]["span"] == "word"


def test_bad_environment_variable_stops_every_stage_command(monkeypatch, capsys):
    monkeypatch.setenv("TISDPO_DZ_MB", "x")
    for command in ("sft", "weights", "train"):
        assert cli.main([command, "--print-config"]) == 2
        assert "TISDPO_DZ_MB='x'" in capsys.readouterr().err
