"""The load-time check that a model keeps packed sequences apart (``data.packing``).

Packing puts several sequences in one row and keeps attention inside each of them
(:func:`tisdpo.train.collate.packed_attention_kwargs`). That is all a pure-attention model
needs; a layer that carries state along the row (Mamba, RWKV, xLSTM and the hybrids that mix
such layers with attention: Falcon-H1, Jamba, Qwen3-Next, RecurrentGemma, ...) lets one
sequence change the next one's log-probabilities, and a model whose attention ignores the
packed mask does the same. Some cannot run packed rows at all (ALiBi models that build their
own bias from a 2-D mask, ...).

The check packs two short sequences, the second the same in two probes and the first
different, and compares the second sequence's hidden states between the probes. In a model
that keeps them apart they are equal bit for bit: the shapes, and hence the kernels and
their summation orders, are the same in both probes, and masked attention weights are
exactly zero. The slack: two roundings of the largest value, plus eight times the
difference between two runs of the same probe, for kernels that are not deterministic run
to run (atomic adds in some mixture-of-experts paths on a GPU).
"""
from __future__ import annotations

import contextlib

import torch

from tisdpo.train.collate import packed_attention_kwargs
from tisdpo.train.headcheck import hidden_states, model_type

__all__ = ["check_packing"]

#: the probe: the first sequence's and the second's lengths
_LENGTHS = (6, 5)


def check_packing(model, *, autocast=None, seed: int = 0) -> float:
    """Raise a one-line ``ValueError`` naming ``data.packing`` when ``model`` lets one packed
    sequence change another's hidden states, or cannot run a packed row; else return the
    largest difference measured (0 for a model that keeps them apart). No grad, eval mode
    (restored after); ``autocast``: a context manager to run the forwards under."""
    kind = model_type(model)
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().weight.shape[0]
    vocab = min(vocab, getattr(model.config, "vocab_size", None) or vocab)
    gen = torch.Generator().manual_seed(seed)
    first, second = _LENGTHS
    ids = torch.randint(0, vocab, (2, first + second), generator=gen)
    ids[1, first:] = ids[0, first:]                 # the same second sequence, other first
    offsets = torch.tensor([0, first, first + second])
    positions = torch.cat([torch.arange(first), torch.arange(second)])[None]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast if autocast is not None else contextlib.nullcontext():
            hidden = [_packed_hidden(model, row[None].to(device), positions.to(device),
                                     offsets.to(device), kind)[0, first:]
                      for row in (ids[0], ids[1], ids[0])]
    finally:
        model.train(was_training)
    eps = torch.finfo(hidden[0].dtype).eps
    a, b, again = (h.float() for h in hidden)
    diff = (a - b).abs().max().item()
    noise = (a - again).abs().max().item()          # the same probe, run again
    scale = a.abs().max().item()
    slack = eps * scale + 8 * noise
    if not diff <= slack:
        raise ValueError(f"data.packing: {kind} lets one packed sequence change the next one's "
                         f"hidden states (by up to {diff:.3g}, largest {scale:.3g}): a layer "
                         f"carries state along the row or attends across sequences; set "
                         f"data.packing false")
    return diff


def _packed_hidden(model, ids, positions, offsets, kind: str) -> torch.Tensor:
    batch = {"input_ids": ids, "position_ids": positions, "seq_offsets": offsets,
             "max_seqlen": max(_LENGTHS)}
    try:
        attention = packed_attention_kwargs(batch, model)
    except ValueError as exc:                       # an attention implementation it lacks
        raise ValueError(f"data.packing: {exc}") from None
    try:
        return hidden_states(model, batch, attention=attention)
    except Exception as exc:        # noqa: BLE001 — the model's own forward on a packed row
        raise ValueError(f"data.packing: {kind} cannot run packed rows ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}); set data.packing "
                         f"false") from None
