"""What only tokenisation finds (per-token list lengths, EOS in the text) is named by the
record's file, line and record, as the loader names its errors — also after load_records'
shuffled split — and the position column never reaches the weights stage's outputs."""
import json
import os

import datasets
import pytest
import torch

from tisdpo.pipeline import context
from tisdpo.train.data import TokenizeConfig, reverse_pairs, tokenize_pairs
from tisdpo.train.records import SOURCE_COLUMN, load_preference_dataset
from tisdpo.train.synthetic import load_tokenizer, make_synthetic_task


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def records(tok):
    """8 plain-text records with valid text-token (no EOS) weight lists."""
    train, _, _ = make_synthetic_task(8, 0, seed=5)
    out = []
    for r in train:
        r = {k: r[k] for k in ("prompt", "chosen", "rejected")}
        for side in ("chosen", "rejected"):
            n = len(tok(r[side], add_special_tokens=False)["input_ids"])
            r[f"{side}_weight"] = [1.0 + 0.01 * j for j in range(n)]
        out.append(r)
    return out


def _write_jsonl(path, recs, *, blank_first=False):
    path.write_text(("\n" if blank_first else "") + "".join(json.dumps(r) + "\n" for r in recs))
    return path


def _ctx(tok, path, **overrides):
    from tisdpo.train.config import build_config

    cfg = build_config(overrides={"data.train": str(path), "data.eval_fraction": 0.25,
                                  **overrides})
    return context.Context(cfg, torch.device("cpu"), tok)


def _tokenize_error(ctx, raw, method="tisdpo") -> str:
    with pytest.raises(ValueError) as info:
        context.tokenize_records(ctx, raw, method, "train")
    return str(info.value)


def _split_with(ctx, k):
    """load_records' (train, eval) and the one holding record k (never raw row k)."""
    train, test = context.load_records(ctx)
    assert len(train) == 6 and len(test) == 2
    for raw in (train, test):
        srcs = list(raw[SOURCE_COLUMN])
        if any(s.endswith(f"(record {k})") for s in srcs):
            return train, test, raw
    raise AssertionError("record lost")


def test_weight_length_error_names_file_line_and_record_after_the_shuffled_split(
        tmp_path, tok, records):
    recs = [dict(r) for r in records]
    recs[5]["chosen_weight"] = recs[5]["chosen_weight"] + [1.0]
    n = len(records[5]["chosen_weight"])
    path = _write_jsonl(tmp_path / "pairs.jsonl", recs)
    ctx = _ctx(tok, path)
    train, test, raw = _split_with(ctx, 5)
    sources = list(train[SOURCE_COLUMN]) + list(test[SOURCE_COLUMN])
    order = [int(s.rsplit(" ", 1)[1][:-1]) for s in sources]
    assert sorted(order) == list(range(8)) and order != list(range(8))     # shuffled
    other = test if raw is train else train
    context.tokenize_records(ctx, other, "tisdpo", "ok")          # the rest is valid
    assert _tokenize_error(ctx, raw) == (
        f"data.train {path} line 6 (record 5), field 'chosen_weight': {n + 1} values for "
        f"{n} completion tokens")
    # π− (reverse_pairs) keeps the positions: the same record, its side renamed
    assert SOURCE_COLUMN in reverse_pairs(raw).column_names
    assert _tokenize_error(ctx, reverse_pairs(raw)).startswith(
        f"data.train {path} line 6 (record 5), field 'rejected_weight': {n + 1} values")


def test_eos_in_text_and_data_eval_named_by_line(tmp_path, tok, records):
    recs = [dict(r) for r in records]
    recs[2]["rejected"] = recs[2]["rejected"] + tok.eos_token
    good = _write_jsonl(tmp_path / "good.jsonl", records)
    bad = _write_jsonl(tmp_path / "bad.jsonl", recs, blank_first=True)   # line = record + 2
    ctx = _ctx(tok, good, **{"data.eval": str(bad)})
    train, test = context.load_records(ctx)
    assert len(train) == len(test) == 8
    msg = _tokenize_error(ctx, test.shuffle(seed=1))
    assert msg == (f"data.eval {bad} line 4 (record 2), field 'rejected': contains the EOS "
                   f"token (it marks where a response ends: the EOS rule places it)")
    # skip_invalid reports it by its position too, and the output has no position column
    out, report = tokenize_pairs(test, tok, TokenizeConfig(add_eos=False, skip_invalid=True))
    assert report.n_skipped == 1 and len(out) == 7
    assert report.reasons[0].startswith(f"data.eval {bad} line 4 (record 2), field 'rejected'")
    assert SOURCE_COLUMN not in out.column_names


def test_positions_of_other_formats_and_plain_datasets(tmp_path, tok, records):
    ds = datasets.Dataset.from_list(records)
    # without the column (or without source_prefix) the messages name the row as before
    assert SOURCE_COLUMN not in load_preference_dataset(
        _write_jsonl(tmp_path / "a.jsonl", records)).column_names
    bad = ds.map(lambda r, i: {"chosen_weight": r["chosen_weight"][:-1] if i == 3
                               else r["chosen_weight"]}, with_indices=True)
    with pytest.raises(ValueError, match=r"^record 3, field 'chosen_weight': "):
        tokenize_pairs(bad, tok, TokenizeConfig(add_eos=False))
    # Parquet, JSON arrays and save_to_disk directories: the record's index in the file
    bad.to_parquet(str(tmp_path / "d.parquet"))
    (tmp_path / "d.json").write_text(json.dumps(bad.to_list()))
    bad.save_to_disk(str(tmp_path / "saved"))
    for p in ("d.parquet", "d.json", "saved"):
        loaded = load_preference_dataset(tmp_path / p, source_prefix="data.train ")
        with pytest.raises(ValueError) as info:
            tokenize_pairs(loaded.shuffle(seed=0), tok, TokenizeConfig(add_eos=False))
        assert str(info.value).startswith(
            f"data.train {tmp_path / p} record 3, field 'chosen_weight': "), str(info.value)
    # a list of files: each record's own file and line
    first = _write_jsonl(tmp_path / "first.jsonl", records[:2])
    second = _write_jsonl(tmp_path / "second.jsonl", bad.to_list())
    loaded = load_preference_dataset([first, second], source_prefix="")
    assert loaded[SOURCE_COLUMN][:3] == [f"{first} line 1 (record 0)",
                                         f"{first} line 2 (record 1)",
                                         f"{second} line 1 (record 0)"]
    with pytest.raises(ValueError, match=rf"^{second} line 4 \(record 3\), field "):
        tokenize_pairs(loaded, tok, TokenizeConfig(add_eos=False))


def _tiny_cfg(root, path):
    from tisdpo.pipeline.demo import demo_config

    cfg = demo_config(fast=True)
    cfg.run_dir, cfg.device = str(root), "cpu"
    m = cfg.model
    m.tiny_hidden_size, m.tiny_layers, m.tiny_heads, m.tiny_kv_heads = 32, 1, 2, 1
    m.tiny_intermediate_size = 48
    cfg.data.train, cfg.data.eval_fraction = str(path), 0.25
    cfg.sft.enabled = False
    for t in (cfg.sft, cfg.contrastive, cfg.policy):
        t.batch_size, t.max_steps, t.lr, t.warmup_steps = 4, 1, 2e-3, 0
    cfg.log.tensorboard, cfg.log.every = False, 1
    cfg.weights.jsonl = True
    return cfg


def test_weights_stage_outputs_have_no_position_column(tmp_path, records):
    from tisdpo.pipeline import stages, weights

    datasets.disable_progress_bars()
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        path = _write_jsonl(tmp_path / "pairs.jsonl",
                            [{k: r[k] for k in ("prompt", "chosen", "rejected")}
                             for r in records])
        ctx = context.make_context(_tiny_cfg(tmp_path / "run", path))
        stages.run_contrastive(ctx)
        wdir = weights.run_weights(ctx)
    finally:
        torch.set_num_threads(n)
    for split, size in (("train", 6), ("eval", 2)):
        saved = datasets.load_from_disk(os.path.join(wdir, split))
        assert len(saved) == size
        assert SOURCE_COLUMN not in saved.column_names
        assert {"prompt", "chosen", "rejected", "chosen_weight"} <= set(saved.column_names)
        with open(os.path.join(wdir, f"{split}.jsonl")) as fh:
            rows = [json.loads(line) for line in fh]
        assert len(rows) == size and all(SOURCE_COLUMN not in r for r in rows)
