"""Record files as people have them: a big JSON array (read in linear time), a held-out
split given as data.eval, a .jsonl whose first line is not an object, a key given twice, and
the Hub's sharded split files."""
import json
import re

import datasets
import pytest

from tisdpo.train import json_records
from tisdpo.train.records import load_preference_dataset


def _rec(i):
    return {"prompt": f"p{i}", "chosen": f" a{i}", "rejected": f" b{i}"}


def test_a_json_array_is_searched_for_surrogate_escapes_once(tmp_path, monkeypatch):
    """Each record searched the whole file's bytes: 16k records took 67 s (quadratic)."""
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([_rec(i) for i in range(50)]))
    calls = []

    class Counting:
        def search(self, data):
            calls.append(len(data))
            return re.compile(rb"\\u[dD][89a-fA-F]").search(data)
    monkeypatch.setattr(json_records, "_SURROGATE_ESCAPE", Counting())
    assert len(load_preference_dataset(str(path))) == 50
    assert len(calls) == 1


@pytest.mark.parametrize("layout", ["dataset_dict", "folder"])
def test_data_eval_takes_the_held_out_split(tmp_path, layout):
    """data.eval pointing at a DatasetDict or a {train,test} folder is its test split (it was
    the train split: evaluation on the training records)."""
    train, test = [_rec(i) for i in range(6)], [_rec(100 + i) for i in range(3)]
    path = tmp_path / "d"
    if layout == "dataset_dict":
        datasets.DatasetDict({"train": datasets.Dataset.from_list(train),
                              "test": datasets.Dataset.from_list(test)}).save_to_disk(str(path))
    else:
        path.mkdir()
        for name, recs in (("train", train), ("test", test)):
            (path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert load_preference_dataset(str(path))["prompt"] == [r["prompt"] for r in train]
    assert load_preference_dataset(str(path), held_out=True)["prompt"] == \
        [r["prompt"] for r in test]


def test_a_jsonl_file_is_read_as_lines_even_when_line_1_is_a_list(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("[1, 2]\n" + "".join(json.dumps(_rec(i)) + "\n" for i in range(3)))
    with pytest.raises(ValueError, match=r"pairs.jsonl line 1 \(record 0\): expected a JSON "
                                         r"object \(one record\), got list"):
        load_preference_dataset(str(path))
    assert len(load_preference_dataset(str(path), check_records=False)) == 4


def test_a_key_given_twice_on_a_line_is_named(tmp_path):
    """Python keeps the last value, datasets' reader refuses the file with an unrelated
    message: one line naming the line and the key instead."""
    path = tmp_path / "pairs.jsonl"
    lines = [json.dumps(_rec(i)) for i in range(3)]
    lines.append('{"prompt": "p", "chosen": " a", "rejected": " b", "rejected": " c"}')
    path.write_text("\n".join(lines) + "\n")
    for check in (True, False):
        with pytest.raises(ValueError, match=r"line 4 \(record 3\): key 'rejected' given "
                                             r"twice") as err:
            load_preference_dataset(str(path), check_records=check)
        assert "\n" not in str(err.value)


def test_hub_shards_of_a_split_load_together(tmp_path):
    for k in range(2):
        datasets.Dataset.from_list([_rec(4 * k + i) for i in range(4)]).to_parquet(
            str(tmp_path / f"train-0000{k}-of-00002.parquet"))
    ds = load_preference_dataset(str(tmp_path))
    assert sorted(ds["prompt"]) == sorted(f"p{i}" for i in range(8))


def test_load_records_reads_data_eval_as_the_held_out_split(tmp_path):
    from types import SimpleNamespace

    from tisdpo.pipeline.context import load_records
    from tisdpo.train.config import RunConfig
    from tisdpo.train.synthetic import load_tokenizer

    path = str(tmp_path / "d")
    datasets.DatasetDict({"train": datasets.Dataset.from_list([_rec(i) for i in range(6)]),
                          "test": datasets.Dataset.from_list([_rec(100), _rec(101)])}
                         ).save_to_disk(path)
    cfg = RunConfig()
    cfg.data.train = cfg.data.eval = path
    train, held = load_records(SimpleNamespace(cfg=cfg, tokenizer=load_tokenizer()))
    assert len(train) == 6 and held["prompt"] == ["p100", "p101"]
