"""The demo's synthetic preference task with planted token-level quality, and its tokenizer.

The task: prompts "Write about <topic>:"; responses of 8–20 words drawn from three word
classes — *good*, *bad* and *neutral*. A response's balance is (#good − #bad); of two
responses to the same prompt the one with the higher balance is chosen. Both responses are
drawn from the same mix, so chosen responses contain some bad words and rejected ones some
good words: a sequence-level label with token-level causes, which TIS-DPO's weights should
find. :class:`SyntheticInfo` labels every completion token (+1 good, −1 bad, 0 otherwise)
for the AUC of estimated weights, and scores any generated text (the task reward).

The tokenizer: a byte-level BPE trained (``tokenizers``) on a corpus of the task's words so
each word is one or a few tokens, 512 entries, with special tokens ``<|pad|>``, ``<|bos|>``,
``<|eos|>``, ``<|system|>``, ``<|user|>``, ``<|assistant|>`` and a chat template whose
assistant turns are ``{% generation %}`` blocks ending in ``<|eos|>``. It is committed under
``tisdpo/assets/`` (``tokenizer.json`` written by :func:`save_tokenizer_assets`;
:func:`load_tokenizer` wraps it offline exactly as :func:`build_tokenizer` does). Regenerate with
``python -c "from tisdpo.train.synthetic import save_tokenizer_assets; save_tokenizer_assets()"``.
"""
from __future__ import annotations

import random
from pathlib import Path

from tisdpo.train.synthetic_common import WORD_RE, check_sizes, preference_record, word_labels

__all__ = ["GOOD_WORDS", "BAD_WORDS", "NEUTRAL_WORDS", "TOPICS", "CHAT_TEMPLATE",
           "SPECIAL_TOKENS", "SyntheticInfo", "make_synthetic_task", "build_tokenizer",
           "load_tokenizer", "save_tokenizer_assets", "ASSETS_DIR", "SYNTHETIC_TASKS",
           "synthetic_info"]

ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"

GOOD_WORDS = ("bright", "clear", "kind", "honest", "helpful", "precise", "warm", "gentle",
              "vivid", "calm", "wise", "fair", "brave", "lovely", "careful", "joyful")
BAD_WORDS = ("rude", "vague", "wrong", "harmful", "lazy", "false", "cruel", "sloppy",
             "dull", "bitter", "nasty", "broken", "toxic", "angry", "messy", "awful")
NEUTRAL_WORDS = ("the", "a", "and", "of", "in", "on", "with", "is", "was", "it", "this",
                 "that", "river", "city", "house", "tree", "road", "stone", "light", "water",
                 "day", "night", "people", "story", "place", "time", "world", "small",
                 "old", "near", "under", "over")
TOPICS = ("rivers", "cats", "mountains", "cities", "music", "gardens", "the sea", "winter",
          "books", "friends", "trains", "cooking")

SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>")
#: Chat template: BOS, then turns "<|role|>content"; assistant turns are generation blocks
#: that end with <|eos|> (so the completion mask covers the content and its EOS).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "<|assistant|>{% generation %}{{ message['content'] }}<|eos|>{% endgeneration %}"
    "{% elif message['role'] in ['system', 'user'] %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}"
    "{% else %}{{ raise_exception('unknown chat role: ' + message['role']) }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
#: The built-in tasks: "easy" (this module) and "hard" (:mod:`tisdpo.train.synthetic_hard`:
#: multi-token words whose quality depends on the prompt).
SYNTHETIC_TASKS = ("easy", "hard")


class SyntheticInfo:
    """What the demo needs to evaluate the task (returned by :func:`make_synthetic_task`).

    Attributes: good_words, bad_words, neutral_words, topics (tuples of str).
    Methods:
    - ``word_class(word) -> int``: +1 good, −1 bad, 0 neutral/unknown.
    - ``balance(text) -> int``: #good − #bad words in ``text``.
    - ``reward(text) -> float``: the task reward of any (generated) text,
      (#good − #bad) / max(#words, 1), in [−1, 1].
    - ``token_labels(ids, tokenizer) -> list[int]``: +1/−1/0 per token id of a completion
      (the planted quality of the word the token belongs to; special tokens such as EOS 0),
      aligned 1:1 with ``ids`` — e.g. with ``chosen_ids`` from ``tokenize_pairs``.

    ``reward`` and ``token_labels`` also take a ``prompt`` (and ``reward`` a ``tokenizer`` for
    prompt ids), ignored here — this task's quality does not depend on the prompt — so code
    can call either task's info (:func:`synthetic_info`) alike.
    """

    task = "easy"

    def __init__(self, good_words=GOOD_WORDS, bad_words=BAD_WORDS,
                 neutral_words=NEUTRAL_WORDS, topics=TOPICS):
        self.good_words, self.bad_words = tuple(good_words), tuple(bad_words)
        self.neutral_words, self.topics = tuple(neutral_words), tuple(topics)
        self._cls = {w: 1 for w in self.good_words}
        self._cls.update({w: -1 for w in self.bad_words})

    def word_class(self, word: str) -> int:
        return self._cls.get(word.lower(), 0)

    def balance(self, text: str) -> int:
        return sum(self.word_class(w) for w in WORD_RE.findall(text))

    def reward(self, text: str, prompt=None, tokenizer=None) -> float:
        words = WORD_RE.findall(text)
        return sum(self.word_class(w) for w in words) / max(len(words), 1)

    def token_labels(self, ids, tokenizer, prompt=None) -> list[int]:
        """+1/−1/0 per token of ``ids`` (a completion), from the word each token is part of."""
        return word_labels(ids, tokenizer, self.word_class)


def _response(rng: random.Random, info: SyntheticInfo, p_good=0.2, p_bad=0.2) -> str:
    words = []
    for _ in range(rng.randint(8, 20)):
        u = rng.random()
        pool = info.good_words if u < p_good else \
            info.bad_words if u < p_good + p_bad else info.neutral_words
        words.append(rng.choice(pool))
    return " " + " ".join(words)


def _pairs(n: int, rng: random.Random, info: SyntheticInfo, chat: bool) -> list[dict]:
    records = []
    while len(records) < n:
        topic = rng.choice(info.topics)
        a, b = _response(rng, info), _response(rng, info)
        rec = preference_record(f"Write about {topic}:", a, b, info.balance, chat)
        if rec is not None:
            records.append(rec)
    return records


def make_synthetic_task(n_train: int, n_test: int, seed: int = 0, *, chat: bool = False,
                        task: str = "easy"):
    """(train_records, test_records, info): plain-text (or chat, with ``chat``) records.

    ``task="hard"``: the task of :mod:`tisdpo.train.synthetic_hard` (multi-token words whose
    quality flips with the prompt's audience; its info is a ``HardSyntheticInfo``). The
    rest of this docstring is the easy task (the default).

    Records: ``prompt`` ("Write about rivers:"), ``chosen`` and ``rejected`` (" word word …",
    a leading space so prompt + completion reads naturally and every word tokenises as in
    running text), plus ``chosen_balance``/``rejected_balance`` (ints, for inspection).
    With ``chat`` the three fields are chat messages (a user turn; one assistant turn each).
    Each response has 8–20 words, each good or bad with probability 0.2, else neutral;
    pairs with equal balance are redrawn. Deterministic in ``seed``; train and test are
    drawn independently from the same distribution.
    """
    if task not in SYNTHETIC_TASKS:
        raise ValueError(f"task must be one of {list(SYNTHETIC_TASKS)}, got {task!r}")
    if task == "hard":
        from tisdpo.train.synthetic_hard import make_hard_task

        return make_hard_task(n_train, n_test, seed, chat=chat)
    check_sizes(n_train, n_test)
    info = SyntheticInfo()
    train = _pairs(n_train, random.Random(f"train-{seed}"), info, chat)
    test = _pairs(n_test, random.Random(f"test-{seed}"), info, chat)
    return train, test, info


def synthetic_info(task: str = "easy"):
    """The evaluation object of a built-in task: :class:`SyntheticInfo` ("easy") or
    ``HardSyntheticInfo`` ("hard"), with the same methods (``reward(text, prompt)``,
    ``token_labels(ids, tokenizer, prompt)``)."""
    if task not in SYNTHETIC_TASKS:
        raise ValueError(f"task must be one of {list(SYNTHETIC_TASKS)}, got {task!r}")
    if task == "hard":
        from tisdpo.train.synthetic_hard import HardSyntheticInfo

        return HardSyntheticInfo()
    return SyntheticInfo()


def _corpus(n_lines: int = 3000) -> list[str]:
    """Task-like text (prompts, responses, chat role words) for training the BPE."""
    rng = random.Random("tokenizer-corpus")
    info = SyntheticInfo()
    lines = [f"Write about {t}:" for t in info.topics] * 20
    all_words = info.good_words + info.bad_words + info.neutral_words
    lines += [" ".join(all_words)] * 30
    for _ in range(n_lines):
        lines.append(f"Write about {rng.choice(info.topics)}:" + _response(rng, info))
    return lines


def _train_bpe(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok


def _wrap(**source):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        **source, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
        chat_template=CHAT_TEMPLATE, model_max_length=4096)


def build_tokenizer(vocab_size: int = 512):
    """Train the byte-level BPE on the task corpus; a ``PreTrainedTokenizerFast`` with the
    special tokens (pad 0, bos 1, eos 2) and :data:`CHAT_TEMPLATE`. Deterministic; no
    network. The BPE runs out of merges before 512: the vocabulary has 499 entries, and
    every task word is a single token (with its leading space)."""
    return _wrap(tokenizer_object=_train_bpe(vocab_size))


def save_tokenizer_assets(directory=None):
    """Train the BPE and write its ``tokenizer.json`` (default: the package's assets).

    Only tokenizer.json is stored; the special-token roles and the chat template live in
    this module, so :func:`load_tokenizer` works with any transformers version.
    """
    directory = Path(directory) if directory is not None else ASSETS_DIR
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "tokenizer.json"
    _train_bpe(512).save(str(path), pretty=True)
    return path


def load_tokenizer():
    """The committed tokenizer (``tisdpo/assets/tokenizer.json``), wrapped as
    :func:`build_tokenizer` wraps it — local file only, no network."""
    path = ASSETS_DIR / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer.json in {ASSETS_DIR}: regenerate it with "
                                "tisdpo.train.synthetic.save_tokenizer_assets()")
    return _wrap(tokenizer_file=str(path))
