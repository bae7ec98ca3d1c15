"""The hard synthetic task: multi-token words whose quality depends on the prompt."""
import hashlib
import json
import re

import datasets
import pytest
import torch

from tisdpo import cli
from tisdpo.pipeline.context import Context, load_records
from tisdpo.pipeline.demo import demo_config
from tisdpo.train.config import RunConfig, validate
from tisdpo.train.data import TokenizeConfig, tokenize_pairs
from tisdpo.train.synthetic import (
    SYNTHETIC_TASKS, SyntheticInfo, load_tokenizer, make_synthetic_task, synthetic_info,
)
from tisdpo.train.synthetic_hard import (
    ALWAYS_BAD, ALWAYS_GOOD, CHILD_WORDS, EXPERT_WORDS, NEUTRAL_WORDS, HardSyntheticInfo,
)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def task():
    return make_synthetic_task(200, 50, seed=0, task="hard")


def _pieces(tok, word):
    return tok(" " + word, add_special_tokens=False)["input_ids"]


def test_easy_task_is_unchanged():
    # digests of the records the easy task made before the hard task existed
    for chat, digest in ((False, "471c3e650db46f2719db493461da0993242854c6ea5ddc67618e6afe"
                                 "abc2d561"),
                         (True, "6ad74e072a60effa47cf519493da66393d8e454892e567485b7bbaaa"
                                "1791aef0")):
        recs = make_synthetic_task(50, 10, seed=3, chat=chat)
        assert make_synthetic_task(50, 10, seed=3, chat=chat, task="easy")[:2] == recs[:2]
        got = hashlib.sha256(json.dumps(recs[:2], sort_keys=True).encode()).hexdigest()
        assert got == digest
    assert SYNTHETIC_TASKS == ("easy", "hard")
    assert isinstance(synthetic_info("easy"), SyntheticInfo)
    assert isinstance(synthetic_info("hard"), HardSyntheticInfo)
    with pytest.raises(ValueError, match="task must be one of"):
        make_synthetic_task(2, 0, task="medium")


def test_deterministic_by_seed_and_shaped(task):
    train, test, info = task
    assert isinstance(info, HardSyntheticInfo) and len(train) == 200 and len(test) == 50
    again = make_synthetic_task(200, 50, seed=0, task="hard")
    assert again[0] == train and again[1] == test
    assert make_synthetic_task(200, 0, seed=1, task="hard")[0] != train
    assert train[:5] != test[:5]
    for r in train + test:
        m = re.fullmatch(r"Write about [a-z ]+ for (children|experts):", r["prompt"])
        assert m and m.group(1) == r["audience"]
        for side in ("chosen", "rejected"):
            assert r[side].startswith(" ") and 6 <= len(r[side].split()) <= 10
            assert info.balance(r[side], r["prompt"]) == r[f"{side}_balance"]
        assert r["chosen_balance"] > r["rejected_balance"]
    assert {r["audience"] for r in train} == {"children", "experts"}
    chat = make_synthetic_task(3, 0, seed=0, task="hard", chat=True)[0]
    assert chat[0]["prompt"] == [{"role": "user", "content": train[0]["prompt"]}]
    assert chat[0]["chosen"] == [{"role": "assistant", "content": train[0]["chosen"]}]


def test_rated_words_span_several_tokens(tok):
    for w in CHILD_WORDS + EXPERT_WORDS + ALWAYS_GOOD + ALWAYS_BAD:
        assert 2 <= len(_pieces(tok, w)) <= 4, w
    for w in NEUTRAL_WORDS:
        assert len(_pieces(tok, w)) == 1, w
    # first pieces are shared across classes: no single piece names the word
    firsts = {}
    for cls, words in (("child", CHILD_WORDS), ("expert", EXPERT_WORDS),
                       ("good", ALWAYS_GOOD), ("bad", ALWAYS_BAD)):
        for w in words:
            firsts.setdefault(_pieces(tok, w)[0], set()).add(cls)
    assert max(len(v) for v in firsts.values()) >= 3


def test_quality_depends_on_the_prompt(tok, task):
    info = HardSyntheticInfo()
    kids, experts = "Write about cats for children:", "Write about cats for experts:"
    ids = tok(" playful day concise boring", add_special_tokens=False)["input_ids"]
    ids = ids + [tok.eos_token_id]
    n_play, n_conc, n_bore = (len(_pieces(tok, w)) for w in ("playful", "concise", "boring"))
    want_kids = [1] * n_play + [0] + [-1] * n_conc + [-1] * n_bore + [0]
    want_experts = [-1] * n_play + [0] + [1] * n_conc + [-1] * n_bore + [0]
    assert info.token_labels(ids, tok, kids) == want_kids
    assert info.token_labels(ids, tok, experts) == want_experts
    prompt_ids = tok(experts, add_special_tokens=False)["input_ids"]     # ids work too
    assert info.token_labels(ids, tok, prompt_ids) == want_experts
    assert info.token_labels(ids, tok, [{"role": "user", "content": kids}]) == want_kids
    with pytest.raises(ValueError, match="depend on the prompt"):
        info.token_labels(ids, tok)
    # in the data: the same word is in chosen responses as good and as bad
    train, _, _ = task
    seen = {}
    for r in train:
        for w in r["chosen"].split():
            seen.setdefault(w, set()).add(info.word_class(w, r["audience"]))
    assert any(seen.get(w) == {1, -1} for w in CHILD_WORDS)
    assert any(seen.get(w) == {1, -1} for w in EXPERT_WORDS)


def test_labels_align_with_tokenised_completions(tok, task):
    train, _, info = task
    out, _ = tokenize_pairs(datasets.Dataset.from_list(train[:40]), tok,
                            TokenizeConfig(add_eos=True))
    for rec in out:
        r = train[rec["record_index"]]
        for side in ("chosen", "rejected"):
            ids = rec[f"{side}_ids"]
            labels = info.token_labels(ids, tok, rec["prompt_ids"])
            assert len(labels) == len(ids) and labels[-1] == 0            # EOS
            # word by word: each word's pieces all carry its class
            pos = 0
            for w in r[side].split():
                n = len(_pieces(tok, w))
                assert labels[pos:pos + n] == [info.word_class(w, r["audience"])] * n
                pos += n
            assert pos == len(ids) - 1
            assert sum(labels[k] for k in range(len(ids))
                       if k == 0 or tok.decode([ids[k]]).startswith(" ")) == \
                r[f"{side}_balance"]


def test_reward():
    info = HardSyntheticInfo()
    kids, experts = "Write about music for children:", "Write about music for experts:"
    text = " playful jolly terse river"
    assert info.reward(text, kids) == pytest.approx((2 - 1) / 4)
    assert info.reward(text, experts) == pytest.approx((1 - 2) / 4)
    assert info.reward(kids + text) == pytest.approx(0.25)       # prompt found in the text
    tok = load_tokenizer()
    expert_ids = tok(experts)["input_ids"]                        # prompt ids + tokenizer
    assert info.reward(text, expert_ids, tok) == pytest.approx(-0.25)
    assert SyntheticInfo().reward(" kind", expert_ids, tok) == 1.0
    assert info.reward("", kids) == 0.0 and info.reward(" clever", experts) == 1.0
    assert info.reward(" bleak", kids) == -1.0
    with pytest.raises(ValueError, match="must contain the prompt"):
        info.reward(text)
    with pytest.raises(ValueError, match="audience must be one of"):
        info.word_class("playful", "adults")
    easy = SyntheticInfo()                       # the easy info takes (and ignores) a prompt
    assert easy.reward(" kind rude kind", "Write about cats:") == easy.reward(" kind rude kind")


def test_config_cli_and_load_records(tok):
    cfg = RunConfig()
    assert cfg.data.synthetic_task == "easy"
    cfg.data.synthetic_task = "medium"
    with pytest.raises(ValueError, match=r"^data\.synthetic_task must be one of"):
        validate(cfg)
    args = cli.build_parser().parse_args(["demo", "--task", "hard", "--fast"])
    got = cli.resolve(args, demo_config(fast=True))
    assert got.data.synthetic_task == "hard" and got.demo.fast
    plain = cli.resolve(cli.build_parser().parse_args(["demo"]), demo_config())
    assert plain.data.synthetic_task == "easy"
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["demo", "--task", "medium"])
    cfg = RunConfig()
    cfg.data.synthetic_train, cfg.data.synthetic_eval, cfg.seed = 6, 2, 4
    cfg.data.synthetic_task = "hard"
    train, test = load_records(Context(cfg, torch.device("cpu"), tok))
    want = make_synthetic_task(6, 2, seed=4, task="hard")
    assert train.to_list() == want[0] and test.to_list() == want[1]
