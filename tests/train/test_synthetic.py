"""The synthetic preference task (planted token quality) and the shipped tokenizer."""
import re

import datasets
import pytest

from tisdpo.train.data import TokenizeConfig, tokenize_pairs
from tisdpo.train.synthetic import (
    ASSETS_DIR, BAD_WORDS, GOOD_WORDS, NEUTRAL_WORDS, TOPICS, SyntheticInfo, build_tokenizer,
    load_tokenizer, make_synthetic_task,
)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def task():
    return make_synthetic_task(300, 100, seed=0)


def test_task_shape_and_determinism(task):
    train, test, info = task
    assert len(train) == 300 and len(test) == 100 and isinstance(info, SyntheticInfo)
    again = make_synthetic_task(300, 100, seed=0)
    assert again[0] == train and again[1] == test
    assert make_synthetic_task(300, 0, seed=1)[0] != train
    assert train[:5] != test[:5]
    for r in train + test:
        assert re.fullmatch(r"Write about [a-z ]+:", r["prompt"])
        for side in ("chosen", "rejected"):
            assert r[side].startswith(" ")
            assert 8 <= len(r[side].split()) <= 20
    with pytest.raises(ValueError, match="n_train"):
        make_synthetic_task(-1, 0)


def test_preference_follows_balance_with_token_level_noise(task):
    train, test, info = task
    recs = train + test
    for r in recs:
        assert info.balance(r["chosen"]) == r["chosen_balance"]
        assert r["chosen_balance"] > r["rejected_balance"] == info.balance(r["rejected"])
    words = lambda t: set(t.split())  # noqa: E731
    # the sequence label does not say which tokens caused it: chosen responses contain bad
    # words, rejected ones good words, often
    chosen_with_bad = sum(bool(words(r["chosen"]) & set(BAD_WORDS)) for r in recs)
    rejected_with_good = sum(bool(words(r["rejected"]) & set(GOOD_WORDS)) for r in recs)
    assert chosen_with_bad > 0.5 * len(recs) and rejected_with_good > 0.5 * len(recs)


def test_info_scoring():
    info = SyntheticInfo()
    assert info.word_class("kind") == 1 and info.word_class("Rude") == -1
    assert info.word_class("river") == 0 and info.word_class("zebra") == 0
    assert info.balance(" kind kind rude river") == 1
    assert info.reward(" kind kind rude river") == pytest.approx(0.25)
    assert info.reward("") == 0.0 and info.reward(" kind") == 1.0 and info.reward(" rude") == -1
    assert set(info.topics) == set(TOPICS)


@pytest.mark.parametrize("add_eos", [True, False])
def test_token_labels_align_with_tokenized_completions(tok, task, add_eos):
    train, _, info = task
    out, _ = tokenize_pairs(datasets.Dataset.from_list(train[:20]), tok,
                            TokenizeConfig(add_eos=add_eos))
    for row in out:
        rec = train[row["record_index"]]
        for side in ("chosen", "rejected"):
            ids = row[f"{side}_ids"]
            labels = info.token_labels(ids, tok)
            assert len(labels) == len(ids)
            # every task word is one token, so the labels are the words' classes (+ EOS 0)
            expected = [info.word_class(w) for w in rec[side].split()] + [0] * add_eos
            assert labels == expected
    # a word split over several tokens labels each of its tokens; special tokens are 0
    multi = SyntheticInfo(good_words=("kindness",), bad_words=("rude",))
    ids = tok(" river kindness rude", add_special_tokens=False)["input_ids"]
    assert len(ids) > 3                                  # "kindness" is several tokens
    labels = multi.token_labels(ids + [tok.eos_token_id], tok)
    assert labels == [0] + [1] * (len(ids) - 2) + [-1, 0]
    assert info.token_labels([], tok) == []


def test_tokenizer_committed_matches_builder(tok):
    built = build_tokenizer()
    assert tok.get_vocab() == built.get_vocab()
    assert (ASSETS_DIR / "tokenizer.json").stat().st_size < 100_000
    assert len(tok) <= 512
    specials = {tok.pad_token_id, tok.bos_token_id, tok.eos_token_id}
    assert len(specials) == 3 and None not in specials
    assert tok.convert_ids_to_tokens([tok.pad_token_id, tok.bos_token_id, tok.eos_token_id]) \
        == ["<|pad|>", "<|bos|>", "<|eos|>"]


def test_tokenizer_round_trip(tok):
    for word in GOOD_WORDS + BAD_WORDS + NEUTRAL_WORDS:
        assert len(tok(" " + word, add_special_tokens=False)["input_ids"]) == 1, word
    for text in ("Write about the sea: kind river, rude stone!", " Héllo wörld 123\n\tok",
                 "<|user|>hi<|assistant|> kind<|eos|>"):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    assert tok("plain", add_special_tokens=True)["input_ids"] == \
        tok("plain", add_special_tokens=False)["input_ids"]


def test_chat_template_completion_mask(tok):
    msgs = [{"role": "system", "content": "Be kind."},
            {"role": "user", "content": "Write about cats:"},
            {"role": "assistant", "content": " kind rude cat"}]
    out = tok.apply_chat_template(msgs, tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True)
    ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    completion = [i for i, m in zip(ids, mask) if m]
    assert completion == tok(" kind rude cat", add_special_tokens=False)["input_ids"] + \
        [tok.eos_token_id]
    assert mask == [0] * (len(ids) - len(completion)) + [1] * len(completion)
    text = tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)
    assert text == "<|bos|><|system|>Be kind.<|user|>Write about cats:<|assistant|>"
    chat, _, _ = make_synthetic_task(2, 0, seed=0, chat=True)
    assert chat[0]["prompt"][0]["role"] == "user"
    assert chat[0]["chosen"][0]["role"] == "assistant"
