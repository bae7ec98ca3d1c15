"""Collators: shapes, the label shift, masks, weight/ref alignment, and packed == padded."""
import pytest
import torch

from dispatch_probe import OpProbe
from numerics import assert_oracle
from tisdpo.train.collate import (
    PackedPairCollator, PaddedPairCollator, block_causal_mask, packed_attention_kwargs,
)
from tisdpo_kernels import linear_logprobs


def _examples(weights=True, ref=True):
    exs = [
        {"prompt_ids": [5, 6], "chosen_ids": [7, 8, 2], "rejected_ids": [9, 2]},
        {"prompt_ids": [10], "chosen_ids": [11], "rejected_ids": [12, 13, 14, 2]},
        {"prompt_ids": [20, 21, 22], "chosen_ids": [23, 24], "rejected_ids": [25]},
    ]
    for k, ex in enumerate(exs):
        if weights:
            ex["chosen_weight"] = [10 * k + 1.0 + j for j in range(len(ex["chosen_ids"]))]
            ex["rejected_weight"] = [10 * k + 5.0 + j for j in range(len(ex["rejected_ids"]))]
        if ref:
            ex["ref_chosen_logps"] = [-(10 * k + 1.0 + j) for j in range(len(ex["chosen_ids"]))]
            ex["ref_rejected_logps"] = [-(10 * k + 5.0 + j)
                                        for j in range(len(ex["rejected_ids"]))]
    return exs


def _sequences(exs):
    """(prompt, completion, weights, ref) in collator order: chosen rows, then rejected."""
    out = []
    for side, w, r in (("chosen_ids", "chosen_weight", "ref_chosen_logps"),
                       ("rejected_ids", "rejected_weight", "ref_rejected_logps")):
        for ex in exs:
            out.append((ex["prompt_ids"], ex[side], ex.get(w), ex.get(r)))
    return out


def _check_row(ids, labels, weights, ref, prompt, comp, w, r):
    """One sequence, given its own slice of the batch tensors (starting at its first token)."""
    n_p, n = len(prompt), len(prompt) + len(comp)
    assert ids[:n].tolist() == prompt + comp
    for i in range(len(labels)):
        if n_p - 1 <= i < n - 1:                       # predicts completion token i+1
            j = i + 1 - n_p
            assert labels[i].item() == comp[j] == ids[i + 1].item()
            assert weights[i].item() == (1.0 if w is None else w[j])
            if r is not None:
                assert ref[i].item() == r[j]
        else:                                          # prompt target, last position, padding
            assert labels[i].item() == -100
            assert weights[i].item() == 0.0
            if r is not None:
                assert ref[i].item() == 0.0


@pytest.mark.parametrize("weights,ref", [(True, True), (False, False), (True, False)])
def test_padded_layout(weights, ref):
    exs = _examples(weights, ref)
    batch = PaddedPairCollator(pad_id=0, pad_to_multiple_of=4)(exs)
    t = 8  # longest is 1 + 4 = 5 tokens (prompt 10, rejected 12 13 14 2), rounded up to 8
    assert batch["input_ids"].shape == (6, t) and batch["labels"].shape == (6, t)
    assert batch["weights"].dtype == torch.float32 and batch["weights"].shape == (6, t)
    assert ("ref_logps" in batch) == ref
    for row, (p, c, w, r) in enumerate(_sequences(exs)):
        n = len(p) + len(c)
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (t - n)
        assert batch["input_ids"][row, n:].eq(0).all()
        assert batch["position_ids"][row, :n].tolist() == list(range(n))
        _check_row(batch["input_ids"][row], batch["labels"][row], batch["weights"][row],
                   batch.get("ref_logps", [None] * 6)[row], p, c, w, r)


@pytest.mark.parametrize("multiple", [None, 16])
def test_packed_layout(multiple):
    exs = _examples()
    batch = PackedPairCollator(pad_id=0, pad_to_multiple_of=multiple)(exs)
    seqs = _sequences(exs)
    lens = [len(p) + len(c) for p, c, _, _ in seqs]
    total = sum(lens)
    n = total if multiple is None else 32
    assert batch["input_ids"].shape == (1, n) and batch["position_ids"].shape == (1, n)
    assert batch["labels"].shape == (n,) and batch["weights"].shape == (n,)
    offsets = batch["seq_offsets"].tolist()
    assert offsets[:len(seqs) + 1] == [sum(lens[:k]) for k in range(len(seqs) + 1)]
    assert offsets[-1] == n and batch["seq_offsets"].dtype == torch.int32
    assert batch["max_seqlen"] == max(lens + ([n - total] if n > total else []))
    assert batch["pairs"].tolist() == [[0, 3], [1, 4], [2, 5]]
    for s, (p, c, w, r) in enumerate(seqs):
        lo, hi = offsets[s], offsets[s + 1]
        assert batch["position_ids"][0, lo:hi].tolist() == list(range(hi - lo))
        _check_row(batch["input_ids"][0, lo:], batch["labels"][lo:hi], batch["weights"][lo:hi],
                   batch["ref_logps"][lo:hi], p, c, w, r)
        valid = batch["labels"][lo:hi] != -100
        assert batch["seq_ids"][lo:hi][valid].eq(s).all()
        assert batch["seq_ids"][lo:hi][~valid].eq(-1).all()
    assert batch["labels"][total:].eq(-100).all() and batch["seq_ids"][total:].eq(-1).all()


def test_collator_errors():
    exs = _examples()
    exs[1]["rejected_weight"] = exs[1]["rejected_weight"][:-1]
    with pytest.raises(ValueError, match=r"examples\[1\], field 'rejected_weight': 3 values "
                                         r"for 4 completion tokens"):
        PaddedPairCollator(0)(exs)
    with pytest.raises(ValueError, match="pad_id"):
        PackedPairCollator(pad_id=-1)
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        PaddedPairCollator(0, pad_to_multiple_of=0)
    with pytest.raises(ValueError, match="empty batch"):
        PackedPairCollator()([])


def test_block_causal_mask():
    offsets = torch.tensor([0, 2, 5], dtype=torch.int32)
    m = block_causal_mask(offsets, 5)
    expected = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0],
                             [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]], dtype=torch.bool)
    assert m.shape == (1, 1, 5, 5) and torch.equal(m[0, 0], expected)
    add = block_causal_mask(offsets, 5, dtype=torch.float32)
    assert torch.equal(add[0, 0] == 0, expected)
    assert (add[0, 0][~expected] == torch.finfo(torch.float32).min).all()
    with pytest.raises(ValueError, match="attn_implementation 'nope'"):
        packed_attention_kwargs({"input_ids": torch.zeros(1, 5, dtype=torch.long),
                                 "position_ids": torch.zeros(1, 5, dtype=torch.long),
                                 "seq_offsets": offsets}, attn_implementation="nope")


def test_attention_kwargs_without_host_sync():
    """Building the mask inside a training step must not synchronise with the host."""
    batch = PackedPairCollator(0)(_examples())
    n = batch["input_ids"].shape[1]
    with OpProbe() as probe:
        sdpa = packed_attention_kwargs(batch, attn_implementation="sdpa")
        flash = packed_attention_kwargs(batch, attn_implementation="flash_attention_2")
    assert not probe.sync_ops(), probe.sync_ops()
    assert sdpa["attention_mask"].shape == (1, 1, n, n)
    assert flash["attention_mask"] is None and flash["max_length_q"] == batch["max_seqlen"]
    assert torch.equal(flash["cu_seq_lens_q"], batch["seq_offsets"])


# ------------------------------------------------------------------ packed == padded, on a model

def _tiny_llama(attn):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64)
    cfg._attn_implementation = attn
    return LlamaForCausalLM(cfg).eval()


def _random_examples(n_pairs=3, seed=1):
    g = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        n = int(torch.randint(lo, hi, (1,), generator=g))
        return torch.randint(3, 128, (n,), generator=g).tolist()

    return [{"prompt_ids": ids(2, 7), "chosen_ids": ids(1, 9), "rejected_ids": ids(1, 9)}
            for _ in range(n_pairs)]


def _padded_logps(model, batch):
    hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         position_ids=batch["position_ids"]).last_hidden_state
    logp = linear_logprobs(hidden, model.lm_head.weight, batch["labels"], impl="reference")
    return logp[batch["labels"] != -100]


def _packed_logps(model, batch, **kwargs):
    kwargs = kwargs or packed_attention_kwargs(batch, model)
    hidden = model.model(input_ids=batch["input_ids"], **kwargs).last_hidden_state[0]
    logp = linear_logprobs(hidden, model.lm_head.weight, batch["labels"], impl="reference")
    return logp[batch["labels"] != -100]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_equals_padded_logprobs(attn, dtype):
    exs = _random_examples()
    padded, packed = PaddedPairCollator(0)(exs), PackedPairCollator(0)(exs)
    model = _tiny_llama(attn)
    with torch.no_grad():
        truth = _padded_logps(model.to(torch.float64), padded)
        model = model.to(dtype)
        ref = _padded_logps(model, padded)
        actual = _packed_logps(model, packed)
    assert actual.shape == truth.shape == (int((padded["labels"] != -100).sum()),)
    assert_oracle(actual, ref, truth, dtype=dtype, name=f"packed logp ({attn})")


@pytest.mark.slow
def test_packed_equals_padded_flex_attention():
    """flex_attention with the document BlockMask (compiled on first use: ~20 s on CPU)."""
    exs = _random_examples()
    padded, packed = PaddedPairCollator(0)(exs), PackedPairCollator(0)(exs)
    model = _tiny_llama("flex_attention")
    with torch.no_grad():
        truth = _padded_logps(_tiny_llama("sdpa").to(torch.float64), padded)
        ref = _padded_logps(_tiny_llama("sdpa"), padded)
        actual = _packed_logps(model, packed)
    assert_oracle(actual, ref, truth, dtype=torch.float32, name="packed logp (flex)")


def test_packed_without_block_mask_differs():
    """The equality above is not vacuous: plain causal attention over the packed row leaks
    across sequences and changes the log-probs."""
    exs = _random_examples()
    padded, packed = PaddedPairCollator(0)(exs), PackedPairCollator(0)(exs)
    model = _tiny_llama("sdpa").to(torch.float64)
    n = packed["input_ids"].shape[1]
    leaky = {"position_ids": torch.arange(n)[None],
             "attention_mask": torch.ones(1, n, dtype=torch.long)}
    with torch.no_grad():
        diff = (_packed_logps(model, packed, **leaky) - _padded_logps(model, padded)).abs()
    assert diff.max() > 1e-3
