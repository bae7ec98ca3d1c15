"""Data layer: loading, plain and chat tokenisation, the EOS rule, truncation alignment,
bad-data errors (record index + field; file, line and field for files), skip_invalid,
reverse_pairs."""
import json
import math

import datasets
import pytest
import torch

from tisdpo.train.data import (
    TokenizeConfig, eos_counted_for_preset, load_preference_dataset, reverse_pairs,
    tokenize_pairs,
)
from tisdpo.train.synthetic import load_tokenizer, make_synthetic_task


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def records():
    train, _, _ = make_synthetic_task(6, 0, seed=3)
    return [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in train]


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _with_weights(tok, recs, add_eos=True, ref=True):
    out = []
    for r in recs:
        r = dict(r)
        nc = len(_ids(tok, r["chosen"])) + add_eos
        nr = len(_ids(tok, r["rejected"])) + add_eos
        r["chosen_weight"] = [1.0 + 0.01 * j for j in range(nc)]
        r["rejected_weight"] = [2.0 + 0.01 * j for j in range(nr)]
        if ref:
            r["ref_chosen_logps"] = [-1.0 - 0.01 * j for j in range(nc)]
            r["ref_rejected_logps"] = [-2.0 - 0.01 * j for j in range(nr)]
        out.append(r)
    return out


# --------------------------------------------------------------------------------- loading

def _as_rows(ds):
    return [{k: row[k] for k in ("prompt", "chosen", "rejected")} for row in ds]


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "disk", "disk_dict", "dir", "list"])
def test_load_formats(tmp_path, records, fmt):
    ds = datasets.Dataset.from_list(records)
    if fmt == "jsonl":
        path = tmp_path / "d.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif fmt == "json":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(records))
    elif fmt == "parquet":
        path = tmp_path / "d.parquet"
        ds.to_parquet(str(path))
    elif fmt == "disk":
        path = tmp_path / "saved"
        ds.save_to_disk(str(path))
    elif fmt == "disk_dict":
        path = tmp_path / "saved_dict"
        datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(path))
    elif fmt == "dir":
        path = tmp_path / "files"
        path.mkdir()
        (path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        (path / "test.jsonl").write_text(json.dumps(records[0]) + "\n")
    else:
        path = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
        path[0].write_text("".join(json.dumps(r) + "\n" for r in records[:2]))
        path[1].write_text("".join(json.dumps(r) + "\n" for r in records[2:]))
    assert _as_rows(load_preference_dataset(path)) == records
    if fmt in ("disk_dict", "dir"):
        assert _as_rows(load_preference_dataset(path, split="test")) == records[:1]
        with pytest.raises(ValueError, match="split='validation' not found"):
            load_preference_dataset(path, split="validation")


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="path_or_dir"):
        load_preference_dataset(tmp_path / "nope.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="path_or_dir"):
        load_preference_dataset(tmp_path / "x.csv")
    with pytest.raises(ValueError, match="no .json/.jsonl/.parquet"):
        load_preference_dataset(tmp_path)


def test_load_chat_and_weights_jsonl(tmp_path, tok):
    train, _, _ = make_synthetic_task(3, 0, seed=1, chat=True)
    recs = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}
            for r in train]
    recs[0]["chosen_weight"], recs[0]["rejected_weight"] = [0.5], [0.25]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    ds = load_preference_dataset(path)
    assert ds[0]["prompt"] == recs[0]["prompt"] and ds[1]["chosen"] == recs[1]["chosen"]
    assert ds[0]["chosen_weight"] == [0.5] and ds[1]["chosen_weight"] is None


# ---------------------------------------------------------------------------- tokenisation

@pytest.mark.parametrize("add_eos", [True, False])
def test_plain_records(tok, records, add_eos):
    ds = datasets.Dataset.from_list(_with_weights(tok, records, add_eos))
    out, report = tokenize_pairs(ds, tok, TokenizeConfig(add_eos=add_eos))
    assert report.n_records == report.n_kept == len(records) and report.n_skipped == 0
    assert set(out.column_names) == {"record_index", "prompt_ids", "chosen_ids",
                                     "rejected_ids", "chosen_weight", "rejected_weight",
                                     "ref_chosen_logps", "ref_rejected_logps"}
    eos = [tok.eos_token_id] if add_eos else []
    for i, (row, rec) in enumerate(zip(out, records)):
        assert row["record_index"] == i
        # prompt and completion tokenised separately: the completion tokens are exactly
        # the tokens of the completion text (+ EOS under add_eos)
        assert row["prompt_ids"] == _ids(tok, rec["prompt"])
        assert row["chosen_ids"] == _ids(tok, rec["chosen"]) + eos
        assert row["rejected_ids"] == _ids(tok, rec["rejected"]) + eos
        assert len(row["chosen_weight"]) == len(row["ref_chosen_logps"]) == len(row["chosen_ids"])
        assert row["rejected_weight"][0] == 2.0


def test_add_bos(tok, records):
    out, _ = tokenize_pairs(datasets.Dataset.from_list(records), tok,
                            TokenizeConfig(add_bos=True))
    assert out[0]["prompt_ids"] == [tok.bos_token_id] + _ids(tok, records[0]["prompt"])


@pytest.mark.parametrize("add_eos", [True, False])
def test_chat_records_match_plain(tok, add_eos):
    plain, _, _ = make_synthetic_task(4, 0, seed=5)
    chat, _, _ = make_synthetic_task(4, 0, seed=5, chat=True)
    cfg = TokenizeConfig(add_eos=add_eos)
    out_p, _ = tokenize_pairs(datasets.Dataset.from_list(plain), tok, cfg)
    out_c, _ = tokenize_pairs(datasets.Dataset.from_list(chat), tok, cfg)
    for p, c, rec in zip(out_p, out_c, chat):
        # the template's generation block is the content then <|eos|>: same completion tokens
        assert c["chosen_ids"] == p["chosen_ids"] and c["rejected_ids"] == p["rejected_ids"]
        assert c["prompt_ids"] == tok.apply_chat_template(
            rec["prompt"], tokenize=True, add_generation_prompt=True, return_dict=True
        )["input_ids"]
        assert c["prompt_ids"][-1] == tok.convert_tokens_to_ids("<|assistant|>")


def test_chat_completion_as_string(tok):
    rec = {"prompt": [{"role": "user", "content": "Write about cats:"}],
           "chosen": " kind cat", "rejected": " rude cat"}
    msgs = dict(rec, chosen=[{"role": "assistant", "content": " kind cat"}],
                rejected=[{"role": "assistant", "content": " rude cat"}])
    # a string completion next to a chat prompt is one assistant message
    out, _ = tokenize_pairs(datasets.Dataset.from_list([rec]), tok)
    ref, _ = tokenize_pairs(datasets.Dataset.from_list([msgs]), tok)
    assert out[0] == ref[0]


def _long_record(tok):
    prompt = "Write about" + " rivers" * 14                    # 16 tokens
    chosen = " kind" + " river" * 9                            # 10 tokens
    rejected = " rude" + " stone" * 11                         # 12 tokens
    nc, nr = len(_ids(tok, chosen)) + 1, len(_ids(tok, rejected)) + 1
    assert (len(_ids(tok, prompt)), nc, nr) == (16, 11, 13)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected,
            "chosen_weight": [float(j) for j in range(nc)],
            "rejected_weight": [100.0 + j for j in range(nr)],
            "ref_chosen_logps": [-float(j) for j in range(nc)],
            "ref_rejected_logps": [-100.0 - j for j in range(nr)]}


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_truncation_keeps_alignment(tok, mode):
    rec = _long_record(tok)
    p_ids, c_ids, r_ids = (_ids(tok, rec[k]) for k in ("prompt", "chosen", "rejected"))
    eos = tok.eos_token_id
    # prompt 16 + longer completion 13 > 20: the prompt is cut to 6; 6 + 13 ≤ 20: done
    cfg = TokenizeConfig(max_length=20, max_prompt_length=6, truncation=mode)
    out, report = tokenize_pairs(datasets.Dataset.from_list([rec]), tok, cfg)
    row = out[0]
    assert row["prompt_ids"] == (p_ids[:6] if mode == "keep_start" else p_ids[-6:])
    assert row["chosen_ids"] == c_ids + [eos] and row["rejected_ids"] == r_ids + [eos]
    assert (report.n_prompt_truncated, report.n_completion_truncated) == (1, 0)
    # now completions too: 6 + 13 > 16 → cut to 16 − 6 = 10 tokens, weights with them
    cfg = cfg.replace(max_length=16)
    row = tokenize_pairs(datasets.Dataset.from_list([rec]), tok, cfg)[0][0]
    assert len(row["prompt_ids"]) == 6
    assert row["chosen_ids"] == c_ids[:10] and row["rejected_ids"] == r_ids[:10]
    assert row["chosen_weight"] == [float(j) for j in range(10)]
    assert row["rejected_weight"] == [100.0 + j for j in range(10)]
    assert row["ref_chosen_logps"] == [-float(j) for j in range(10)]
    assert row["ref_rejected_logps"] == [-100.0 - j for j in range(10)]
    assert len(row["prompt_ids"]) + len(row["rejected_ids"]) <= cfg.max_length


def test_short_prompt_not_truncated(tok):
    rec = _long_record(tok)
    rec["prompt"] = "Write about cats:"                          # 4 tokens
    cfg = TokenizeConfig(max_length=12, max_prompt_length=6)
    row = tokenize_pairs(datasets.Dataset.from_list([rec]), tok, cfg)[0][0]
    assert len(row["prompt_ids"]) == 4                           # under the cap: kept whole
    assert len(row["chosen_ids"]) == len(row["rejected_ids"]) == 8 == len(row["chosen_weight"])


# ------------------------------------------------------------------------- bad data errors

def _bad_cases(tok, good):
    """(records, index, field, message regex); the bad record is always index 2."""
    def edit(**changes):
        recs = [dict(r) for r in good]
        recs[2].update(changes)
        return recs
    n = len(_ids(tok, good[2]["chosen"])) + 1
    return [
        (edit(chosen=None), "chosen", "missing"),
        (edit(prompt=None), "prompt", "missing"),
        (edit(rejected=""), "rejected", "empty response"),
        (edit(chosen="   "), "chosen", "empty response"),
        (edit(prompt=""), "prompt", "empty"),
        (edit(chosen_weight=good[2]["chosen_weight"] + [1.0]), "chosen_weight",
         f"{n + 1} values for {n} completion tokens"),
        (edit(ref_rejected_logps=good[2]["ref_rejected_logps"][:-1]), "ref_rejected_logps",
         r"\d+ values for \d+ completion tokens"),
        (edit(chosen_weight=None), "chosen_weight", "missing"),
        (edit(rejected_weight=[float("nan")] * len(good[2]["rejected_weight"])),
         "rejected_weight", "value 0 is nan, not a finite number"),
        (edit(chosen=" kind <|eos|> cat"), "chosen", "contains the EOS token"),
    ]


def test_bad_data_errors_name_record_and_field(tok, records):
    good = _with_weights(tok, records)
    for recs, field, msg in _bad_cases(tok, good):
        ds = datasets.Dataset.from_list(recs)
        with pytest.raises(ValueError, match=rf"^record 2, field '{field}': {msg}"):
            tokenize_pairs(ds, tok)


def test_non_string_and_bad_chat(tok, records):
    ds = datasets.Dataset.from_dict({"prompt": ["a", "b"], "chosen": [1, 2],
                                     "rejected": [" x", " y"]})
    with pytest.raises(ValueError, match=r"^record 0, field 'chosen': expected a string"):
        tokenize_pairs(ds, tok)
    chat = [{"prompt": [{"role": "user", "content": "hi"}],
             "chosen": [{"role": "assistant", "content": " kind"}],
             "rejected": [{"role": "assistant", "content": " rude"}]} for _ in range(3)]
    chat[1]["rejected"] = [{"role": "assistant"}]
    with pytest.raises(ValueError, match=r"^record 1, field 'rejected': message 0 must be"):
        tokenize_pairs(datasets.Dataset.from_list(chat), tok)
    chat[1]["rejected"] = [{"role": "assistant", "content": " "}]
    with pytest.raises(ValueError, match=r"^record 1, field 'rejected': empty response"):
        tokenize_pairs(datasets.Dataset.from_list(chat), tok)
    chat[1]["rejected"] = [{"role": "user", "content": " rude"}]
    with pytest.raises(ValueError, match=r"^record 1, field 'rejected': no assistant message"):
        tokenize_pairs(datasets.Dataset.from_list(chat), tok)
    chat[1]["rejected"] = [{"role": "assistant", "content": " rude"},
                           {"role": "robot", "content": " rude"}]
    with pytest.raises(ValueError, match=r"^record 1, field 'rejected': chat template failed"):
        tokenize_pairs(datasets.Dataset.from_list(chat), tok)


def test_missing_columns(tok, records):
    ds = datasets.Dataset.from_list(records).remove_columns(["rejected"])
    with pytest.raises(ValueError, match=r"^record 0, field 'rejected': missing"):
        tokenize_pairs(ds, tok, TokenizeConfig(skip_invalid=True))
    ds = datasets.Dataset.from_list(_with_weights(tok, records, ref=False))
    with pytest.raises(ValueError, match=r"^record 0, field 'rejected_weight': missing"):
        tokenize_pairs(ds.remove_columns(["rejected_weight"]), tok)


def test_skip_invalid_counts_and_reports(tok, records):
    good = _with_weights(tok, records)
    recs = [dict(r) for r in good]
    recs[1]["chosen"] = ""
    recs[4]["rejected_weight"] = recs[4]["rejected_weight"][:-2]
    out, report = tokenize_pairs(datasets.Dataset.from_list(recs), tok,
                                 TokenizeConfig(skip_invalid=True))
    assert (report.n_records, report.n_kept, report.n_skipped) == (6, 4, 2)
    assert out["record_index"] == [0, 2, 3, 5]
    assert report.reasons[0].startswith("record 1, field 'chosen': empty response")
    assert report.reasons[1].startswith("record 4, field 'rejected_weight':")
    assert "2 invalid skipped" in report.summary()
    full, _ = tokenize_pairs(datasets.Dataset.from_list(good), tok)
    assert out[1] == full[2]


def test_config_validation():
    with pytest.raises(ValueError, match="max_prompt_length"):
        TokenizeConfig(max_length=8, max_prompt_length=8)
    with pytest.raises(ValueError, match="truncation"):
        TokenizeConfig(truncation="middle")
    with pytest.raises(ValueError, match="add_eos"):
        TokenizeConfig(add_eos=1)
    with pytest.raises(ValueError, match="cfg must be a TokenizeConfig"):
        tokenize_pairs(datasets.Dataset.from_list([{"prompt": "a"}]), None, cfg={})


def test_eos_rule_per_preset():
    assert not eos_counted_for_preset("tisdpo") and not eos_counted_for_preset("tisdpo_paper")
    assert eos_counted_for_preset("dpo") and eos_counted_for_preset("simpo")
    assert TokenizeConfig.for_preset("tisdpo", max_length=64).add_eos is False
    assert TokenizeConfig.for_preset("dpo").add_eos is True
    assert TokenizeConfig.for_preset("tisdpo", add_eos=True).add_eos is True


# --------------------------------------------------------------------------- reverse_pairs

def test_reverse_pairs(tok, records):
    raw = datasets.Dataset.from_list(_with_weights(tok, records))
    rev = reverse_pairs(raw)
    for a, b in zip(raw, rev):
        assert (b["chosen"], b["rejected"]) == (a["rejected"], a["chosen"])
        assert (b["chosen_weight"], b["rejected_weight"]) == (a["rejected_weight"],
                                                              a["chosen_weight"])
        assert b["ref_chosen_logps"] == a["ref_rejected_logps"]
    tok_ds, _ = tokenize_pairs(raw, tok)
    tok_rev = reverse_pairs(tok_ds)
    assert tok_rev["chosen_ids"] == tok_ds["rejected_ids"]
    assert tok_rev["rejected_weight"] == tok_ds["chosen_weight"]
    assert tok_rev["prompt_ids"] == tok_ds["prompt_ids"]
    assert reverse_pairs(tok_rev)[:] == tok_ds[:]
    with pytest.raises(ValueError, match="no chosen/rejected"):
        reverse_pairs(datasets.Dataset.from_list([{"a": 1}]))


def test_tokenized_weights_reach_collated_labels(tok, records):
    """End to end: the weight of completion token j sits where the label is that token."""
    from tisdpo.train.collate import PaddedPairCollator

    from torch.utils.data import DataLoader

    out, _ = tokenize_pairs(datasets.Dataset.from_list(_with_weights(tok, records)), tok)
    b = len(records)
    loader = DataLoader(out, batch_size=b, collate_fn=PaddedPairCollator(tok.pad_token_id))
    batch = next(iter(loader))
    for row in range(2 * b):
        ex = out[row % b]
        side = "chosen" if row < b else "rejected"
        valid = batch["labels"][row] != -100
        assert batch["labels"][row][valid].tolist() == ex[f"{side}_ids"]
        got = batch["weights"][row][valid].tolist()
        assert all(math.isclose(g, w, rel_tol=1e-6) for g, w in zip(got, ex[f"{side}_weight"]))


# ------------------------------------------------------------- file errors name file and line

def _write_jsonl(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def _load_error(path, **kwargs) -> str:
    with pytest.raises(ValueError) as info:
        load_preference_dataset(path, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg, msg                                # one line
    return msg


def _run_records(path, **overrides):
    """``load_records`` of a run whose data.train is ``path`` (no eval file: a split)."""
    from tisdpo.pipeline.context import Context, load_records
    from tisdpo.train.config import build_config

    cfg = build_config(overrides={"data.train": str(path), "data.eval_fraction": 0.25,
                                  **overrides})
    return load_records(Context(cfg, torch.device("cpu"), None))


def test_missing_field_named_by_file_line_and_record_before_the_split(tmp_path, records):
    recs = [dict(records[k % len(records)]) for k in range(20)]
    del recs[4]["chosen"]
    path = _write_jsonl(tmp_path / "pairs.jsonl", recs)
    with pytest.raises(ValueError) as info:
        _run_records(path)
    assert str(info.value) == f"data.train {path} line 5 (record 4), field 'chosen': missing"
    # with skip_invalid the file loads whole; tokenisation drops the record later
    train, test = _run_records(path, **{"data.skip_invalid": True})
    assert len(train) + len(test) == 20 and len(test) == 5
    # data.eval is named as such
    good = _write_jsonl(tmp_path / "good.jsonl", records)
    with pytest.raises(ValueError, match=rf"^data.eval {path} line 5 \(record 4\), field "):
        _run_records(good, **{"data.eval": str(path)})


def test_blank_lines_count_as_lines_not_records(tmp_path, records):
    recs = [dict(r) for r in records[:3]]
    recs[2]["rejected"] = 7
    path = tmp_path / "gaps.jsonl"
    path.write_text("\ufeff" + json.dumps(recs[0]) + "\n\n" + json.dumps(recs[1]) + "\n  \n"
                    + json.dumps(recs[2]) + "\n")
    assert _load_error(path) == (f"{path} line 5 (record 2), field 'rejected': expected a "
                                 f"string (the prompt is a string), got int")
    recs[2]["rejected"] = " fine"
    path.write_text("\ufeff" + "\n\n".join(json.dumps(r) for r in recs) + "\n")
    assert _as_rows(load_preference_dataset(path)) == recs        # BOM and gaps load


@pytest.mark.parametrize("content", ["", "\n\n  \n", "[]", "[\n]\n"])
def test_empty_file_is_one_line_naming_it(tmp_path, content):
    path = tmp_path / ("empty.json" if content.startswith("[") else "empty.jsonl")
    path.write_text(content)
    assert _load_error(path) == f"{path}: no records (an empty file)"
    with pytest.raises(ValueError, match=rf"^data.train {path}: no records"):
        _run_records(path)


@pytest.mark.parametrize("cut", [2, 15, 20])
def test_truncated_last_line(tmp_path, records, cut):
    path = tmp_path / "cut.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records)[:-cut])
    msg = _load_error(path)
    assert msg.startswith(f"{path} line {len(records)}: invalid JSON, cut short (")


def test_invalid_json_in_the_middle(tmp_path, records):
    lines = [json.dumps(r) for r in records]
    lines[2] = lines[2][:-1] + ",}"
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    assert _load_error(path).startswith(f"{path} line 3: invalid JSON (Expecting property name")
    lines[2] = "{'prompt': 'single quotes'}"
    path.write_text("\n".join(lines) + "\n")
    assert _load_error(path).startswith(f"{path} line 3: invalid JSON (")
    # a JSON list: the line of the error in the document
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(records, indent=1).replace('"chosen"', '"chosen" "x"', 1))
    assert _load_error(path).startswith(f"{path} line 4: invalid JSON (")


def test_bad_utf8_bytes(tmp_path, records):
    path = tmp_path / "bytes.jsonl"
    body = "".join(json.dumps(r) + "\n" for r in records[:3]).encode()
    path.write_bytes(body + b'{"prompt": "caf\xe9", "chosen": " a", "rejected": " b"}\n')
    assert _load_error(path).startswith(f"{path} line 4: not UTF-8 text (")
    with pytest.raises(ValueError, match=rf"^data.train {path} line 4: not UTF-8"):
        _run_records(path, **{"data.skip_invalid": True})       # never skippable


def test_record_errors_in_json_parquet_and_saved_datasets(tmp_path, records):
    recs = [dict(r) for r in records]
    recs[4]["prompt"] = None
    as_json = tmp_path / "pairs.json"
    as_json.write_text(json.dumps(recs, indent=2))
    assert _load_error(as_json) == f"{as_json} record 4, field 'prompt': missing"
    as_parquet = tmp_path / "pairs.parquet"
    datasets.Dataset.from_list(recs).to_parquet(str(as_parquet))
    assert _load_error(as_parquet) == f"{as_parquet} record 4, field 'prompt': missing"
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(recs).save_to_disk(str(saved))
    assert _load_error(saved) == f"{saved} record 4, field 'prompt': missing"
    # in a list of files, the position is the record's in its own file
    first = _write_jsonl(tmp_path / "a.jsonl", records)
    second = _write_jsonl(tmp_path / "b.jsonl", recs)
    assert _load_error([first, second]).startswith(f"{second} line 5 (record 4), field ")
    assert len(load_preference_dataset([first, second], check_records=False)) == 12
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    assert _load_error(tmp_path / "broken.parquet").startswith(
        f"{tmp_path / 'broken.parquet'}: not a readable Parquet file")


@pytest.mark.parametrize("change, field, message", [
    ({"chosen": "  "}, "chosen", "empty response"),
    ({"chosen_weight": "heavy", "rejected_weight": [1.0]}, "chosen_weight",
     "expected a list of floats, got str"),
    ({"chosen_weight": [1.0, "x"], "rejected_weight": [1.0]}, "chosen_weight",
     "value 1 is 'x', not a finite number"),
    ({"chosen_weight": [1.0, float("inf")], "rejected_weight": [1.0]}, "chosen_weight",
     "value 1 is inf, not a finite number"),
    ({"prompt": [{"role": "user", "content": "hi"}]}, "prompt",
     "a chat message list, but a string in line 1 (record 0) (one file holds plain-text or "
     "chat records, not both)"),
    ({"prompt": [{"role": "user"}]}, "prompt", "message 0 must be a dict"),
    ({"prompt": {"role": "user", "content": "hi"}}, "prompt",
     "expected a non-empty list of chat messages, got dict"),
])
def test_record_checks_match_tokenize_pairs(tmp_path, records, change, field, message):
    recs = [dict(r) for r in records]
    recs[3].update(change)
    path = tmp_path / "x.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    msg = _load_error(path)
    assert msg.startswith(f"{path} line 4 (record 3), field '{field}': {message}"), msg


def test_chat_file_record_check(tmp_path):
    chat, _, _ = make_synthetic_task(3, 0, seed=1, chat=True)
    chat = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in chat]
    chat[2]["chosen"] = [{"role": "user", "content": "no reply"}]
    path = _write_jsonl(tmp_path / "chat.jsonl", chat)
    assert _load_error(path) == f"{path} line 3 (record 2), field 'chosen': no assistant message"
