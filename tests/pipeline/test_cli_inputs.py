"""Bad input on the command line: a config file that is missing, not YAML or not a mapping of
sections; records that are not JSON objects under data.skip_invalid; float options past
float32; a folder of several splits; inspect's --pairs and --start; a device this machine
lacks. Each is one line naming what is wrong (exit status 2 for an option, before any stage
runs), and pairs whose chosen equals rejected are counted in a warning."""
import json
import logging

import datasets
import pytest
import torch

from tisdpo import cli
from tisdpo.train.config import ModelConfig, build_config
from tisdpo.train.data import TokenizeConfig, load_preference_dataset, tokenize_pairs
from tisdpo.train.model import load_tokenizer

TINY = ["--model.tiny_hidden_size", "32", "--model.tiny_layers", "1", "--model.tiny_heads", "2",
        "--model.tiny_kv_heads", "1", "--model.tiny_intermediate_size", "48",
        "--data.synthetic_train", "16", "--data.synthetic_eval", "4", "--device", "cpu",
        "--threads", "1", "--log.progress", "false", "--log.tensorboard", "false"]
DPO = ["train", "--policy.method", "dpo", "--policy.max_steps", "1", "--policy.batch_size", "4",
       "--policy.warmup_steps", "0"]


def _pair(i: int) -> dict:
    return {"prompt": f"write about cats {i}", "chosen": "good nice kind",
            "rejected": "bad awful mean"}


def _jsonl(path, lines) -> str:
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def _one_line(err: str, start: str) -> str:
    err = err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith(start), err
    return err


# ------------------------------------------------------------------------ --config files

@pytest.mark.parametrize("print_config", [False, True], ids=["run", "print-config"])
def test_a_missing_config_file_is_one_line_naming_it(tmp_path, capsys, print_config):
    path = tmp_path / "nope.yaml"
    argv = ["train", "--config", str(path), "--run_dir", str(tmp_path / "run")]
    assert cli.main(argv + ["--print-config"] * print_config) == 2
    captured = capsys.readouterr()
    err = _one_line(captured.err, f"tisdpo train: --config {path}: ")
    assert "no such file" in err and captured.out == ""
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text, message", [
    (b"policy: {lr: [1\n", "invalid YAML at line 2, column 1: expected ',' or ']'"),
    (b"policy:\n  lr: 1\n lr: 2\n", "invalid YAML at line 3"),
    (b"policy:\n  lr: 1\n  beta: 0.2\n  lr: 2\n",
     "invalid YAML at line 4, column 3: the key 'lr' again (first on line 2, column 3)"),
    (b"policy: {lr: 1}\nsft: {}\npolicy: {beta: 0.2}\n",
     "invalid YAML at line 3, column 1: the key 'policy' again (first on line 1, column 1)"),
    (b"policy: {lr: 1.0e-3, beta: 0.2, lr: 2.0e-3}\n",      # twice within one line
     "invalid YAML at line 1, column 33: the key 'lr' again (first on line 1, column 10)"),
    (b'{"seed": 1, "seed": 2}\n',
     "invalid YAML at line 1, column 13: the key 'seed' again (first on line 1, column 2)"),
    (b"policy: {lr: \xff}\n", "not UTF-8 text"),
    (b"policy: 5\n", "config section policy must be a mapping of its options"),
    (b"data: [1, 2]\n", "config section data must be a mapping of its options"),
    (b"policy: {lr: fast}\n", "config option policy.lr expects float, got 'fast'"),
    (b"policy: {lrr: 1}\n", "unknown config option 'policy.lrr'"),
])
@pytest.mark.parametrize("print_config", [False, True], ids=["run", "print-config"])
def test_a_bad_config_file_is_one_line_naming_it_and_the_problem(tmp_path, capsys, text,
                                                                 message, print_config):
    path = tmp_path / "run.yaml"
    path.write_bytes(text)
    argv = ["train", "--config", str(path), "--run_dir", str(tmp_path / "run")]
    assert cli.main(argv + ["--print-config"] * print_config) == 2
    err = _one_line(capsys.readouterr().err, f"tisdpo train: --config {path}: ")
    assert message in err


def test_a_config_file_error_names_the_file_in_python_too(tmp_path):
    from tisdpo.train.config import ConfigFileError

    with pytest.raises(ConfigFileError, match=r"^config file .*nope\.yaml: no such file") as e:
        build_config(str(tmp_path / "nope.yaml"))
    assert e.value.path == str(tmp_path / "nope.yaml")


def test_yaml_merge_keys_may_be_overridden(tmp_path):
    """``<<:`` merges a mapping whose keys the section may set again: not a key given twice."""
    path = tmp_path / "run.yaml"
    path.write_text("sft: &base {lr: 0.001, epochs: 2}\npolicy:\n  <<: *base\n  lr: 0.002\n")
    cfg = build_config(str(path))
    assert (cfg.sft.lr, cfg.policy.lr, cfg.policy.epochs) == (0.001, 0.002, 2)


def test_a_section_left_empty_sets_nothing(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("policy:\nsft:\n  lr: 0.001\n")
    cfg = build_config(str(path))
    assert cfg.policy == build_config().policy and cfg.sft.lr == 0.001
    assert cli.main(["train", "--config", str(path), "--print-config"]) == 0


# ------------------------------------------------------------ records that are not objects

@pytest.mark.parametrize("layout", ["jsonl", "json array"])
def test_skip_invalid_counts_records_that_are_not_json_objects(tmp_path, caplog, layout):
    records = [_pair(0), [1, 2], _pair(1), 5, _pair(2), "text", None, _pair(3)]
    if layout == "jsonl":
        path = _jsonl(tmp_path / "pairs.jsonl", [json.dumps(r) for r in records])
        first = "line 2 (record 1)"
    else:
        path = tmp_path / "pairs.json"
        path.write_text(json.dumps(records, indent=1))
        path, first = str(path), "record 1"
    with caplog.at_level(logging.WARNING, logger="tisdpo"):
        raw = load_preference_dataset(path, check_records=False, source_prefix="data.train ")
    assert len(raw) == len(records)                     # each in its place, positions kept
    assert f"data.train {path} {first}: expected a JSON object (one record), got list " \
           f"(4 such records)" in caplog.text
    tok, report = tokenize_pairs(raw, load_tokenizer(ModelConfig()),
                                 TokenizeConfig(skip_invalid=True))
    assert (report.n_records, report.n_kept, report.n_skipped) == (8, 4, 4)
    assert report.reasons[0].startswith(f"data.train {path} {first}, field 'prompt'")
    assert sorted(tok["record_index"]) == [0, 2, 4, 7]
    with pytest.raises(ValueError) as err:
        load_preference_dataset(path)                   # checked: still the first one named
    assert str(err.value) == f"{path} {first}: expected a JSON object (one record), got list"


def test_a_file_of_no_json_object_is_one_line(tmp_path):
    path = _jsonl(tmp_path / "numbers.jsonl", ["5", '"text"', "null"])
    with pytest.raises(ValueError, match=r"numbers\.jsonl: no JSON object among its records "
                                         r"\(line 1 \(record 0\): int\)$"):
        load_preference_dataset(path, check_records=False)


def test_train_with_skip_invalid_skips_a_list_line(tmp_path, capsys, caplog):
    train = _jsonl(tmp_path / "train.jsonl", [json.dumps(_pair(i)) for i in range(3)]
                   + ["[1, 2]"] + [json.dumps(_pair(i)) for i in range(3, 8)])
    held = _jsonl(tmp_path / "eval.jsonl", [json.dumps(_pair(i)) for i in range(4)])
    argv = DPO + TINY + ["--run_dir", str(tmp_path / "run"), "--data.train", train,
                         "--data.eval", held, "--data.skip_invalid"]
    with caplog.at_level(logging.INFO, logger="tisdpo"):
        assert cli.main(argv) == 0, capsys.readouterr().err
    assert "policy train: 8/9 pairs kept, 1 invalid skipped" in caplog.text
    assert f"{train} line 4 (record 3): expected a JSON object" in caplog.text


# ----------------------------------------------------------------- float32 and the optimiser

@pytest.mark.parametrize("command, option, value", [
    ("train", "policy.lr", "1e39"), ("train", "policy.lr", "2e30"),
    ("sft", "sft.weight_decay", "1e39"), ("contrastive", "contrastive.eps", "1e39"),
    ("train", "policy.max_grad_norm", "1e39"), ("train", "policy.beta", "1e39"),
    ("contrastive", "contrastive.beta", "1e35"), ("weights", "weights.k", "1e39"),
    ("weights", "weights.w_max", "1e39"), ("weights", "weights.clip_lower", "-1e39"),
    ("demo", "demo.temperature", "1e39"),
])
def test_float_options_past_float32_are_refused(command, option, value, capsys):
    assert cli.main([command, "--print-config", f"--{option}={value}"]) == 2
    err = _one_line(capsys.readouterr().err, f"tisdpo {command}: {option} must be ")
    assert "float32" in err and err.endswith(f"got {float(value)!r}")


def test_the_float32_bound_leaves_huge_values_to_diverge(capsys):
    # 1e30 still trains (and diverges, a one-line error of its own)
    assert cli.main(["contrastive", "--print-config", "--contrastive.lr", "1e30",
                     "--contrastive.max_grad_norm", "1e30", "--contrastive.beta", "1e30"]) == 0


def test_a_learning_rate_past_float32_stops_before_the_run(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(DPO + TINY + ["--run_dir", str(run), "--policy.lr", "1e39"]) == 2
    _one_line(capsys.readouterr().err, "tisdpo train: policy.lr must be at most 1e+30")
    assert not run.exists()


# --------------------------------------------------------------- several splits in a folder

def test_a_folder_of_several_files_says_which_path_to_give(tmp_path, capsys):
    folder = tmp_path / "pairs"
    folder.mkdir()
    for name in ("a", "b"):
        _jsonl(folder / f"{name}.jsonl", [json.dumps(_pair(i)) for i in range(4)])
    argv = DPO + TINY + ["--run_dir", str(tmp_path / "run"), "--data.train", str(folder)]
    assert cli.main(argv) == 1
    err = _one_line(capsys.readouterr().err, f"tisdpo train: error: data.train {folder} ")
    assert f"give the path of the one to load ({folder / 'a.jsonl'}, {folder / 'b.jsonl'})" \
        in err and "split=" not in err


def test_a_dataset_dict_of_several_splits_says_which_folder_to_give(tmp_path):
    ds = datasets.Dataset.from_list([_pair(i) for i in range(3)])
    datasets.DatasetDict({"x": ds, "y": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match=r"holds several splits \['x', 'y'\], none named "
                                         r"'train': give the path of the one to load") as e:
        load_preference_dataset(str(tmp_path / "dd"))
    assert str(tmp_path / "dd" / "x") in str(e.value) and "split=" not in str(e.value)
    assert len(load_preference_dataset(str(tmp_path / "dd" / "y"))) == 3


# ------------------------------------------------------------------ inspect's own options

@pytest.mark.parametrize("option, value, rule", [
    ("--pairs", "0", ">= 1"), ("--pairs", "-3", ">= 1"), ("--start", "-1", ">= 0")])
def test_inspect_refuses_a_count_that_shows_nothing(tmp_path, capsys, option, value, rule):
    out = tmp_path / "page"
    assert cli.main(["inspect", "--run_dir", str(tmp_path), "--out", str(out), option,
                     value]) == 2
    err = _one_line(capsys.readouterr().err, "tisdpo inspect: ")
    assert err == f"tisdpo inspect: {option} must be {rule}, got {value}"
    assert not out.exists()


# ------------------------------------------------------------------------------- device

@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_a_device_this_machine_lacks_exits_2_before_any_stage(tmp_path, capsys, monkeypatch,
                                                             device):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    run = tmp_path / "run"
    argv = DPO + TINY + ["--run_dir", str(run), "--device", device]
    assert cli.main(argv) == 2
    err = _one_line(capsys.readouterr().err, f"tisdpo train: device={device!r}: ")
    assert "CUDA is not available here" in err
    assert not run.exists()                      # no stage ran, no config.yaml written
    assert cli.main(argv + ["--print-config"]) == 0     # a config for another machine


# ------------------------------------------------------------------- identical responses

@pytest.mark.parametrize("chat", [False, True], ids=["text", "chat"])
def test_pairs_whose_chosen_equals_rejected_are_counted_in_a_warning(tmp_path, caplog, chat):
    def rec(i, same):
        r = _pair(i)
        if chat:
            r["prompt"] = [{"role": "user", "content": r["prompt"]}]
            r["chosen"] = [{"role": "assistant", "content": r["chosen"]}]
            r["rejected"] = [{"role": "assistant", "content": r["rejected"]}]
        if same:
            r["rejected"] = r["chosen"]
        return json.dumps(r)

    path = _jsonl(tmp_path / "pairs.jsonl", [rec(i, i in (2, 4)) for i in range(6)])
    with caplog.at_level(logging.WARNING, logger="tisdpo"):
        raw = load_preference_dataset(path, source_prefix="data.train ")
    assert len(raw) == 6                                           # kept: they are legal
    assert f"data.train {path}: 2 records have chosen identical to rejected (first: {path} " \
           f"line 3 (record 2)); kept" in caplog.text
    caplog.clear()
    path = _jsonl(tmp_path / "distinct.jsonl", [rec(i, False) for i in range(3)])
    with caplog.at_level(logging.WARNING, logger="tisdpo"):
        load_preference_dataset(path, source_prefix="data.train ")
    assert "identical" not in caplog.text


def test_pairs_truncation_makes_identical_are_counted_in_a_warning(tmp_path, caplog):
    from tisdpo.pipeline.context import Context, tokenize_records

    recs = [{"prompt": "write", "chosen": " good nice kind", "rejected": " good nice mean"},
            {"prompt": "write", "chosen": " kind", "rejected": " mean"},
            # identical as given (the load warns): not counted again when cut
            {"prompt": "write", "chosen": " good nice same", "rejected": " good nice same"}]
    path = _jsonl(tmp_path / "pairs.jsonl", [json.dumps(r) for r in recs])
    raw = load_preference_dataset(path, source_prefix="data.train ")
    cfg = build_config(overrides={"data.train": path})
    tok = load_tokenizer(cfg.model)
    ctx = Context(cfg, torch.device("cpu"), tok)
    n_prompt, n_shared = (len(tok(t, add_special_tokens=False)["input_ids"])
                          for t in ("write", " good nice"))
    tok_cfg = TokenizeConfig(max_length=n_prompt + n_shared, max_prompt_length=n_prompt,
                             add_bos=False)
    with caplog.at_level(logging.WARNING, logger="tisdpo"):
        rows = tokenize_records(ctx, raw, "dpo", "policy train", tok_cfg)
    assert len(rows) == 3 and rows[0]["chosen_ids"] == rows[0]["rejected_ids"]
    assert f"policy train: truncation left 1 pair with chosen identical to rejected (first: " \
           f"data.train {path} line 1 (record 0)); kept" in caplog.text
    caplog.clear()
    tok_cfg = tok_cfg.replace(max_length=n_prompt + n_shared + 1)
    with caplog.at_level(logging.WARNING, logger="tisdpo"):
        tokenize_records(ctx, raw, "dpo", "policy train", tok_cfg)
    assert "identical" not in caplog.text


@pytest.mark.parametrize("pairs", [0, -3])
def test_load_pairs_refuses_a_count_that_shows_nothing(tmp_path, pairs):
    """The Python entry behind inspect: no silent one-pair page for pairs < 1."""
    import json

    from tisdpo.pipeline.demo import demo_config
    from tisdpo.pipeline.heatmap import load_pairs

    data = tmp_path / "w.jsonl"
    data.write_text(json.dumps({"prompt": "p", "chosen": " a", "rejected": " b",
                                "chosen_weight": [1.0], "rejected_weight": [1.0]}) + "\n")
    cfg = demo_config(fast=True)
    cfg.run_dir = str(tmp_path)
    with pytest.raises(ValueError, match=f"pairs={pairs}: show at least 1 pair"):
        load_pairs(cfg, data=str(data), pairs=pairs)


@pytest.mark.parametrize("command", [["demo", "--fast"], ["compare"], ["inspect"]])
def test_a_one_process_command_under_torchrun_says_so(tmp_path, capsys, monkeypatch, command):
    """demo, compare and inspect take no distributed option: under torchrun with several
    processes the error says to launch them without it (not to set an option they lack)."""
    for name, value in (("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(name, value)
    assert cli.main(command + ["--run_dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"tisdpo {command[0]}: {command[0]} runs as one process; launch it without "
                   f"torchrun (WORLD_SIZE=2)"), err
    assert not (tmp_path / "run").exists()


def test_demo_options_are_checked_against_the_demos_own_defaults(capsys):
    """--data.max_length 100 is valid beside the demo's max_prompt_length 16 (the general
    default 256 would refuse it); --help shows the values the demo uses."""
    assert cli.main(["demo", "--data.max_length", "100", "--print-config"]) == 0
    assert "max_length: 100\n  max_prompt_length: 16\n" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option, default in (("--policy.lr FLOAT peak learning rate", "0.0005"),
                            ("--data.max_length INT max prompt+response tokens per sequence",
                             "48")):
        assert f"{option} (default: {default})" in text


@pytest.mark.parametrize("argv,message", [
    (["--task", "hard", "--data.synthetic_task", "easy"],
     "--task and --data.synthetic_task both given; give one"),
    (["--fast", "--demo.fast", "false"], "--fast and --demo.fast both given; give one"),
])
def test_a_demo_shortcut_and_its_option_together_are_refused(argv, message, capsys):
    assert cli.main(["demo", *argv, "--print-config"]) == 2
    assert capsys.readouterr().err.strip() == f"tisdpo demo: {message}"


@pytest.mark.parametrize("inside", [False, True], ids=["a-file", "under-a-file"])
def test_a_run_dir_that_cannot_be_a_folder_is_named(tmp_path, capsys, inside):
    run = tmp_path / "run"
    run.write_text("not a folder")
    where = run / "sub" if inside else run
    assert cli.main([*DPO, *TINY, "--run_dir", str(where)]) == 1
    err = _one_line(capsys.readouterr().err, f"tisdpo train: error: run_dir {where}: cannot "
                                             f"be the run folder (")
    assert ("it is a file" if not inside else "not a directory") in err
