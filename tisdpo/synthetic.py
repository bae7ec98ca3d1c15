"""The demo's synthetic preference task with planted token-level quality, and its tokenizer.

The task: prompts "Write about <topic>:"; responses of 8–20 words drawn from three word
classes — *good*, *bad* and *neutral*. A response's balance is (#good − #bad); of two
responses to the same prompt the one with the higher balance is chosen. Both responses are
drawn from the same mix, so chosen responses contain some bad words and rejected ones some
good words: a sequence-level label with token-level causes, which TIS-DPO's weights should
find. :class:`SyntheticInfo` labels every completion token (+1 good, −1 bad, 0 otherwise)
for the AUC of estimated weights, and scores any generated text (the task reward).

The tokenizer: a byte-level BPE trained (``tokenizers``) on a corpus of the task's words so
each word is one or a few tokens, ~512 entries, with special tokens ``<|pad|>``, ``<|bos|>``,
``<|eos|>``, ``<|system|>``, ``<|user|>``, ``<|assistant|>`` and a chat template whose
assistant turns are ``{% generation %}`` blocks ending in ``<|eos|>``. It is committed under
``tisdpo/assets/`` (built by :func:`build_tokenizer`, loaded offline by
:func:`load_tokenizer`).
"""
from __future__ import annotations

__all__ = ["GOOD_WORDS", "BAD_WORDS", "NEUTRAL_WORDS", "TOPICS", "CHAT_TEMPLATE",
           "SyntheticInfo", "make_synthetic_task", "build_tokenizer", "load_tokenizer",
           "save_tokenizer_assets", "ASSETS_DIR"]


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
    """

    def __init__(self, good_words, bad_words, neutral_words, topics):
        raise NotImplementedError


def make_synthetic_task(n_train: int, n_test: int, seed: int = 0, *, chat: bool = False):
    """(train_records, test_records, info): plain-text (or chat, with ``chat``) records.

    Records: ``prompt`` ("Write about rivers:"), ``chosen`` and ``rejected`` (" word word …",
    a leading space so prompt + completion reads naturally and every word tokenises as in
    running text), plus ``chosen_balance``/``rejected_balance`` (ints, for inspection).
    Deterministic in ``seed``; train and test prompts/responses are drawn independently.
    """
    raise NotImplementedError


def build_tokenizer(vocab_size: int = 512):
    """Train the byte-level BPE on the task corpus; a ``PreTrainedTokenizerFast`` with the
    special tokens and :data:`CHAT_TEMPLATE`. Deterministic; no network."""
    raise NotImplementedError


def load_tokenizer():
    """The committed tokenizer from ``tisdpo/assets/`` (local files only, no network)."""
    raise NotImplementedError
