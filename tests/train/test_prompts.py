"""Records without a prompt field: the prompt is the start chosen and rejected share, as TRL
reads them; pairs with no such start are refused naming the record."""
import json

import datasets
import pytest

from tisdpo.train.data import TokenizeConfig, load_preference_dataset, tokenize_pairs
from tisdpo.train.prompts import NoSharedPrompt, split_shared_prompt, with_prompts
from tisdpo.train.synthetic import load_tokenizer


def _chat(*turns):
    return [{"role": role, "content": text} for role, text in turns]


HH = {"chosen": "\n\nHuman: Can cats swim?\n\nAssistant: Yes, most can.",
      "rejected": "\n\nHuman: Can cats swim?\n\nAssistant: No."}
SAME_WORD = {"chosen": "Q: why?\nA: I think so", "rejected": "Q: why?\nA: I doubt it"}
CHAT = {"chosen": _chat(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!")),
        "rejected": _chat(("system", "Be brief."), ("user", "Hi"), ("assistant", "Go away."))}
MULTI_TURN = {"chosen": _chat(("user", "a"), ("assistant", "b"), ("user", "c"),
                              ("assistant", "good")),
              "rejected": _chat(("user", "a"), ("assistant", "b"), ("user", "c"),
                                ("assistant", "bad"))}
IMPLICIT = [HH, SAME_WORD, CHAT, MULTI_TURN]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def test_the_shared_start_is_the_prompt():
    assert split_shared_prompt(HH["chosen"], HH["rejected"]) == (
        "\n\nHuman: Can cats swim?\n\nAssistant:", " Yes, most can.", " No.")
    # a shared first word goes to the prompt, the space before the first difference does not
    assert split_shared_prompt(SAME_WORD["chosen"], SAME_WORD["rejected"]) == (
        "Q: why?\nA: I", " think so", " doubt it")
    prompt, chosen, rejected = split_shared_prompt(CHAT["chosen"], CHAT["rejected"])
    assert (prompt, chosen, rejected) == (CHAT["chosen"][:2], CHAT["chosen"][2:],
                                          CHAT["rejected"][2:])
    assert split_shared_prompt(MULTI_TURN["chosen"], MULTI_TURN["rejected"])[0] == \
        MULTI_TURN["chosen"][:3]


@pytest.mark.parametrize("rec", IMPLICIT, ids=["hh", "same_word", "chat", "multi_turn"])
def test_as_trl_extracts_the_prompt(rec):
    trl_data = pytest.importorskip("trl.data_utils")
    assert dict(zip(("prompt", "chosen", "rejected"),
                    split_shared_prompt(rec["chosen"], rec["rejected"]))) == \
        trl_data.extract_prompt(rec)


@pytest.mark.parametrize("chosen, rejected, field, problem", [
    ("same text", "same text", "chosen", "equal to rejected"),
    ("a start", "a start and more", "chosen", "the start of rejected"),
    ("a start and more", "a start", "chosen", "longer than rejected, which is its start"),
    ("yes", "no", "chosen", "differs from rejected from the first character on"),
    (" yes", " no", "chosen", "differs from rejected from the first character on"),
    (_chat(("user", "a")), _chat(("user", "b")), "chosen",
     "differs from rejected from the first message on"),
    ("text", _chat(("user", "b")), "rejected", "a message list, but chosen is a string"),
    (3, "text", "rejected", "a string, but chosen is a int"),
])
def test_pairs_without_a_shared_prompt_are_refused(chosen, rejected, field, problem):
    with pytest.raises(NoSharedPrompt) as info:
        split_shared_prompt(chosen, rejected)
    assert (info.value.field, info.value.problem.split(" (")[0]) == (field, problem)
    assert "with no 'prompt' field the prompt is the start chosen and rejected share" in \
        str(info.value)


def _explicit(rec):
    return dict(zip(("prompt", "chosen", "rejected"),
                    split_shared_prompt(rec["chosen"], rec["rejected"])))


@pytest.mark.parametrize("recs", [[HH, SAME_WORD], [CHAT, MULTI_TURN]], ids=["text", "chat"])
def test_implicit_records_tokenise_as_their_explicit_form(tmp_path, tok, recs):
    explicit = tokenize_pairs(datasets.Dataset.from_list([_explicit(r) for r in recs]), tok,
                              TokenizeConfig())[0]
    implicit = tokenize_pairs(datasets.Dataset.from_list(recs), tok, TokenizeConfig())[0]
    assert implicit.to_list() == explicit.to_list()
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    loaded = load_preference_dataset(path)
    assert [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in loaded] == \
        [_explicit(r) for r in recs]
    assert tokenize_pairs(loaded, tok, TokenizeConfig())[0].to_list() == explicit.to_list()
    as_parquet = tmp_path / "pairs.parquet"
    datasets.Dataset.from_list(recs).to_parquet(str(as_parquet))
    assert load_preference_dataset(as_parquet).to_list() == loaded.to_list()


def test_per_token_columns_follow_the_split_off_completion(tok):
    n_chosen, n_rejected = (len(tok(t, add_special_tokens=False)["input_ids"])
                            for t in (" Yes, most can.", " No."))
    rec = {**HH, "chosen_weight": [0.5] * n_chosen, "rejected_weight": [2.0] * n_rejected}
    row = tokenize_pairs(datasets.Dataset.from_list([rec]), tok,
                         TokenizeConfig(add_eos=False))[0][0]
    assert row["chosen_weight"] == [0.5] * n_chosen
    rec["chosen_weight"] = [0.5] * (n_chosen + 1)
    with pytest.raises(ValueError, match=rf"^record 0, field 'chosen_weight': {n_chosen + 1} "
                                         rf"values for {n_chosen} completion tokens$"):
        tokenize_pairs(datasets.Dataset.from_list([rec]), tok, TokenizeConfig(add_eos=False))


def test_bad_implicit_records_are_named_by_file_line_and_field(tmp_path, tok):
    path = tmp_path / "pairs.jsonl"
    bad = {"chosen": "no shared start", "rejected": "different"}
    path.write_text(json.dumps(HH) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(ValueError, match=rf"^{path} line 2 \(record 1\), field 'chosen': differs "
                                         r"from rejected from the first character on \(with no "
                                         r"'prompt' field"):
        load_preference_dataset(path)
    # unchecked, the record loads without a prompt and tokenising drops it as such
    loaded = load_preference_dataset(path, check_records=False, source_prefix="data.train ")
    assert loaded[1]["prompt"] is None
    out, report = tokenize_pairs(loaded, tok, TokenizeConfig(skip_invalid=True))
    assert len(out) == 1 and report.reasons == [
        f"data.train {path} line 2 (record 1), field 'prompt': missing"]
    with pytest.raises(ValueError, match=r"^record 1, field 'chosen': differs from rejected"):
        tokenize_pairs(datasets.Dataset.from_list([HH, bad]), tok, TokenizeConfig())


def test_unchecked_records_without_any_shared_prompt_load(tmp_path, tok):
    """More than a writer batch (1000) of records without a shared prompt, unchecked: they
    load with a typed, empty prompt column and tokenising drops them."""
    path = tmp_path / "pairs.jsonl"
    bad = {"chosen": "Yes, I can.", "rejected": "No."}
    path.write_text("".join(json.dumps(bad) + "\n" for _ in range(1001))
                    + json.dumps(HH) + "\n")
    loaded = load_preference_dataset(path, check_records=False)
    assert loaded["prompt"][:1001] == [None] * 1001 and loaded[1001]["prompt"]
    out, report = tokenize_pairs(loaded, tok, TokenizeConfig(skip_invalid=True))
    assert (len(out), report.n_skipped) == (1, 1001)


def test_the_files_of_a_split_hold_records_with_a_prompt_or_without_one(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    first, second = folder / "train-00000-of-00002.jsonl", folder / "train-00001-of-00002.jsonl"
    first.write_text(json.dumps({"prompt": "Q", "chosen": " a", "rejected": " b"}) + "\n")
    second.write_text(json.dumps(HH) + "\n")
    with pytest.raises(ValueError, match=rf"^{second} line 1 \(record 0\), field 'prompt': "
                                         rf"missing$"):
        load_preference_dataset(folder)
    first.write_text(json.dumps(HH) + "\n")
    second.write_text(json.dumps({"prompt": "Q", "chosen": " a", "rejected": " b"}) + "\n")
    with pytest.raises(ValueError, match=rf"^{second} line 1 \(record 0\), field 'prompt': "
                                         rf"given, but the record in {first} line 1"):
        load_preference_dataset(folder)


def test_a_file_holds_records_with_a_prompt_or_without_one(tmp_path):
    path = tmp_path / "pairs.jsonl"
    explicit = {"prompt": "Q", "chosen": " a", "rejected": " b"}
    path.write_text(json.dumps(HH) + "\n" + json.dumps(explicit) + "\n")
    with pytest.raises(ValueError, match=rf"^{path} line 2 \(record 1\), field 'prompt': given, "
                                         r"but the record in line 1 \(record 0\) has none"):
        load_preference_dataset(path)
    path.write_text(json.dumps(explicit) + "\n" + json.dumps(HH) + "\n")
    with pytest.raises(ValueError, match=rf"^{path} line 2 \(record 1\), field 'prompt': "
                                         r"missing$"):
        load_preference_dataset(path)


def test_a_dataset_with_a_prompt_column_is_left_as_it_is():
    ds = datasets.Dataset.from_list([{"prompt": "Q:", **HH}])
    assert with_prompts(ds) is ds
    with pytest.raises(ValueError, match=r"^record 0, field 'chosen': missing"):
        tokenize_pairs(datasets.Dataset.from_list([{"chosen": None, "rejected": "x"}]),
                       load_tokenizer(), TokenizeConfig())
