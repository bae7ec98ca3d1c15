"""weights.span=word keeps combining marks (Unicode category M) in their word: Devanagari
vowel signs and viramas, and accents written as e + U+0301."""
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from tisdpo.pipeline.spans import word_span_ids


@pytest.fixture(scope="module")
def tok():
    """A byte-level BPE tokenizer with whole Devanagari and accent tokens (as Llama-3, Gemma
    and Qwen have)."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    corpus = ["नमस्ते दुनिया हिन्दी भाषा", "café naïve résumé", "e\u0301cole"] * 50
    tk.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<eos>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>")


@pytest.mark.parametrize("text,words", [
    (" नमस्ते दुनिया", [" नमस्ते", " दुनिया"]),
    (" e\u0301cole naïve", [" e\u0301cole", " naïve"]),
    (" e\u0301cole, don't", [" e\u0301cole", ",", " don", "'", "t"]),
])
def test_combining_marks_stay_in_their_word(tok, text, words):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    spans = word_span_ids(ids, tok)
    assert spans == sorted(spans)
    assert [tok.decode([i for i, s in zip(ids, spans) if s == w])
            for w in sorted(set(spans))] == words
