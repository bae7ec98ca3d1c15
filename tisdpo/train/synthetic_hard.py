"""The demo's *hard* synthetic task: quality spans several tokens and depends on the prompt.

The easy task (:mod:`tisdpo.train.synthetic`) plants one-token words whose quality never
changes, so token-level scores find them at once (AUC 1.0). Here:

- prompts are ``"Write about <topic> for <audience>:"`` with the audience ``children`` or
  ``experts``;
- the rated words are 2–4 tokens each under the shipped tokenizer (``" playful"`` →
  ``' p' 'l' 'ay' 'ful'``), and their first pieces are shared across classes (``' c'``
  starts ``cute``, ``cosy``, ``concise``, ``crisp`` and ``creepy``), so no single piece says
  which word it is part of;
- *audience words* flip with the prompt: :data:`CHILD_WORDS` are good for children and bad
  for experts, :data:`EXPERT_WORDS` the reverse; a few :data:`ALWAYS_GOOD` /
  :data:`ALWAYS_BAD` words keep their sign; :data:`NEUTRAL_WORDS` (one token each) are 0.

A response has 6–10 words (prompt + response stay within the demo's ``data.max_length`` of 48
tokens for all but ~0.2% of pairs): each an audience word with probability 0.4 (child or
expert, equally), always-good or always-bad with 0.05 each, else neutral. Its balance under the
prompt's audience is (#good − #bad); of two responses to the same prompt the higher balance is
chosen (ties redrawn). :class:`HardSyntheticInfo` labels every completion token (+1/−1/0: the
class of the word it is part of, under the prompt's audience) and rewards any text. Its
methods take the prompt (a string, chat messages, or token ids with the tokenizer);
:meth:`HardSyntheticInfo.reward` also finds it inside ``prompt + completion`` text.
"""
from __future__ import annotations

import random
import re

from tisdpo.train.synthetic_common import WORD_RE, check_sizes, preference_record, word_labels

__all__ = ["AUDIENCES", "CHILD_WORDS", "EXPERT_WORDS", "ALWAYS_GOOD", "ALWAYS_BAD",
           "NEUTRAL_WORDS", "TOPICS", "HardSyntheticInfo", "make_hard_task"]

AUDIENCES = ("children", "experts")
#: good for children, bad for experts (2–4 tokens each with the shipped tokenizer)
CHILD_WORDS = ("playful", "lively", "magical", "jolly", "merry", "happy", "cute", "cosy")
#: good for experts, bad for children
EXPERT_WORDS = ("formal", "dense", "terse", "concise", "sober", "literal", "nerdy", "deep")
ALWAYS_GOOD = ("clever", "neat", "crisp", "witty")
ALWAYS_BAD = ("boring", "bland", "bleak", "creepy")
#: one token each (the easy task's neutral words)
NEUTRAL_WORDS = ("the", "a", "and", "of", "in", "on", "with", "is", "was", "it", "this",
                 "that", "river", "city", "house", "tree", "road", "stone", "light", "water",
                 "day", "night", "people", "story", "place", "time", "world", "small",
                 "old", "near", "under", "over")
TOPICS = ("rivers", "cats", "mountains", "cities", "music", "gardens", "the sea", "winter",
          "books", "friends", "trains", "cooking")

_PROMPT_RE = re.compile(r"Write about ([a-z ]+) for (children|experts):")


class HardSyntheticInfo:
    """Evaluation of the hard task (returned by ``make_synthetic_task(..., task="hard")``).

    ``prompt`` arguments: the record's prompt string, its chat messages, or its token ids
    (decoded with ``tokenizer``); the audience is read from it.

    - ``word_class(word, audience) -> int``: +1 good, −1 bad, 0 neutral/unknown.
    - ``audience(prompt, tokenizer=None) -> str``.
    - ``balance(text, prompt) -> int``: #good − #bad words of ``text`` for the audience.
    - ``reward(text, prompt=None, tokenizer=None) -> float``: (#good − #bad) /
      max(#words, 1) of a completion, in [−1, 1]; without ``prompt``, ``text`` must contain
      the prompt (``"Write about cats for experts: ..."``), and only what follows it counts.
    - ``token_labels(ids, tokenizer, prompt) -> list[int]``: +1/−1/0 per completion token id
      (special tokens 0), aligned 1:1 with ``ids``; every piece of a word gets its class.
    """

    task = "hard"

    def __init__(self):
        self.audiences, self.topics = AUDIENCES, TOPICS
        self.child_words, self.expert_words = CHILD_WORDS, EXPERT_WORDS
        self.always_good, self.always_bad = ALWAYS_GOOD, ALWAYS_BAD
        self.neutral_words = NEUTRAL_WORDS
        base = {w: 1 for w in ALWAYS_GOOD} | {w: -1 for w in ALWAYS_BAD}
        self._cls = {
            "children": base | {w: 1 for w in CHILD_WORDS} | {w: -1 for w in EXPERT_WORDS},
            "experts": base | {w: -1 for w in CHILD_WORDS} | {w: 1 for w in EXPERT_WORDS}}

    def word_class(self, word: str, audience: str) -> int:
        if audience not in self._cls:
            raise ValueError(f"audience must be one of {list(AUDIENCES)}, got {audience!r}")
        return self._cls[audience].get(word.lower(), 0)

    def audience(self, prompt, tokenizer=None) -> str:
        if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], dict):
            prompt = " ".join(str(m.get("content", "")) for m in prompt)
        elif not isinstance(prompt, str):
            if tokenizer is None:
                raise ValueError("prompt token ids need the tokenizer to be read")
            prompt = tokenizer.decode([int(i) for i in prompt], skip_special_tokens=True)
        m = _PROMPT_RE.search(prompt)
        if m is None:
            raise ValueError(f"no 'Write about <topic> for <audience>:' prompt in {prompt!r}")
        return m.group(2)

    def balance(self, text: str, prompt) -> int:
        aud = self.audience(prompt)
        return sum(self.word_class(w, aud) for w in WORD_RE.findall(text))

    def reward(self, text: str, prompt=None, tokenizer=None) -> float:
        if prompt is None:
            m = _PROMPT_RE.search(text)
            if m is None:
                raise ValueError("reward without prompt: the text must contain the prompt "
                                 "('Write about <topic> for <audience>:')")
            aud, text = m.group(2), text[m.end():]
        else:
            aud = self.audience(prompt, tokenizer)
        words = WORD_RE.findall(text)
        return sum(self.word_class(w, aud) for w in words) / max(len(words), 1)

    def token_labels(self, ids, tokenizer, prompt=None) -> list[int]:
        """+1/−1/0 per token of ``ids`` (a completion), from the word each token is part of."""
        if prompt is None:
            raise ValueError("the hard task's token labels depend on the prompt: pass prompt=")
        aud = self.audience(prompt, tokenizer)
        return word_labels(ids, tokenizer, lambda w: self.word_class(w, aud))


def _response(rng: random.Random) -> str:
    words = []
    for _ in range(rng.randint(6, 10)):
        u = rng.random()
        pool = CHILD_WORDS if u < 0.2 else EXPERT_WORDS if u < 0.4 else \
            ALWAYS_GOOD if u < 0.45 else ALWAYS_BAD if u < 0.5 else NEUTRAL_WORDS
        words.append(rng.choice(pool))
    return " " + " ".join(words)


def _pairs(n: int, rng: random.Random, info: HardSyntheticInfo, chat: bool) -> list[dict]:
    records = []
    while len(records) < n:
        topic, audience = rng.choice(TOPICS), rng.choice(AUDIENCES)
        prompt = f"Write about {topic} for {audience}:"
        a, b = _response(rng), _response(rng)
        rec = preference_record(prompt, a, b, lambda text: info.balance(text, prompt), chat)
        if rec is not None:
            rec["audience"] = audience
            records.append(rec)
    return records


def make_hard_task(n_train: int, n_test: int, seed: int = 0, *, chat: bool = False):
    """(train_records, test_records, info) of the hard task; see the module docstring.

    Records: ``prompt`` ("Write about rivers for children:"), ``chosen``/``rejected``
    (" word word …", a leading space), ``chosen_balance``/``rejected_balance`` (ints, under
    the prompt's audience) and ``audience``. With ``chat`` the three text fields are chat
    messages. Deterministic in ``seed``; train and test are drawn independently.
    """
    check_sizes(n_train, n_test)
    info = HardSyntheticInfo()
    train = _pairs(n_train, random.Random(f"hard-train-{seed}"), info, chat)
    test = _pairs(n_test, random.Random(f"hard-test-{seed}"), info, chat)
    return train, test, info
