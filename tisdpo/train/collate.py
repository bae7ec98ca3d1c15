"""Collators: tokenised pairs → model-ready batches, padded or packed (padding-free).

Both take a list of examples as :func:`tisdpo.train.data.tokenize_pairs` produces them (dicts with
``prompt_ids``, ``chosen_ids``, ``rejected_ids`` and optionally ``chosen_weight``,
``rejected_weight``, ``ref_chosen_logps``, ``ref_rejected_logps``; lists or tensors).

Each sequence is ``prompt_ids + completion_ids``. Labels are ALREADY SHIFTED: ``labels[i]``
is the token predicted from position i, i.e. ``input_ids[i+1]`` when that token is a
completion token, else −100 (prompt targets, padding and each sequence's last position).
``weights`` and ``ref_logps`` are shifted with the labels (the value of the completion token
that ``labels[i]`` names sits at i) and are 0 wherever the label is ignored. Without weight
columns the completion tokens get weight 1.0 (including an EOS when the data was tokenised
with ``add_eos``; see the EOS rule in :mod:`tisdpo.train.data`). So the per-token log-probs are
``linear_logprobs(hidden, lm_head.weight, labels)`` with hidden taken before the head.

Padded (:class:`PaddedPairCollator`), B pairs, chosen rows first, rejected rows second:
    input_ids [2B, T], attention_mask [2B, T], position_ids [2B, T], labels [2B, T],
    weights [2B, T] float32, ref_logps [2B, T] float32 (only when the data has them).
    Right padding; row b and row b+B are pair b.

Packed (:class:`PackedPairCollator`), padding-free, S = 2P sequences (the P chosen first,
then the P rejected) concatenated into one row of N tokens:
    input_ids [1, N], position_ids [1, N] (restarting at 0 per sequence), seq_offsets [S+1]
    int32 (cu_seqlens), max_seqlen (int), labels [N] (shifted within each sequence),
    weights [N], ref_logps [N] (when present), seq_ids [N] int64 (the sequence of each label,
    −1 where the label is ignored — what ``preference_loss``'s packed form takes),
    pairs [P, 2] int64 (chosen sequence index, rejected sequence index).
    The model must attend block-diagonally: pass ``packed_attention_kwargs(batch, model)``.
"""
from __future__ import annotations

import torch

__all__ = ["PaddedPairCollator", "PackedPairCollator", "packed_attention_kwargs",
           "block_causal_mask"]


_SIDES = (("chosen_ids", "chosen_weight", "ref_chosen_logps"),
          ("rejected_ids", "rejected_weight", "ref_rejected_logps"))


def _as_list(x):
    return x.tolist() if isinstance(x, torch.Tensor) else list(x)


def _sequences(examples):
    """[(prompt, completion, weights | None, ref | None)]: the P chosen, then the P rejected."""
    if not examples:
        raise ValueError("examples: empty batch")
    has_w = "chosen_weight" in examples[0]
    has_ref = "ref_chosen_logps" in examples[0]
    seqs = []
    for ids_col, w_col, ref_col in _SIDES:
        for k, ex in enumerate(examples):
            prompt, comp = _as_list(ex["prompt_ids"]), _as_list(ex[ids_col])
            if not prompt or not comp:
                raise ValueError(f"examples[{k}]: prompt_ids and {ids_col} must be non-empty")
            w = _as_list(ex[w_col]) if has_w else None
            ref = _as_list(ex[ref_col]) if has_ref else None
            for name, vals in ((w_col, w), (ref_col, ref)):
                if vals is not None and len(vals) != len(comp):
                    raise ValueError(f"examples[{k}], field {name!r}: {len(vals)} values for "
                                     f"{len(comp)} completion tokens")
            seqs.append((prompt, comp, w, ref))
    return seqs, has_ref


def _round_up(n, multiple):
    return n if not multiple else -(-n // multiple) * multiple


def _check_multiple(value):
    if value is not None and (not isinstance(value, int) or value < 1):
        raise ValueError(f"pad_to_multiple_of must be None or a positive int, got {value!r}")


def _fill(seq, ids, labels, weights, ref, start):
    """Write one sequence at offset ``start`` of the flat/row buffers (labels shifted)."""
    prompt, comp, w, r = seq
    n_p, n = len(prompt), len(prompt) + len(comp)
    ids[start:start + n] = torch.tensor(prompt + comp)
    # label i = token i+1: completion token j (at n_p + j) is predicted from n_p + j − 1.
    lo, hi = start + n_p - 1, start + n - 1
    labels[lo:hi] = torch.tensor(comp)
    weights[lo:hi] = 1.0 if w is None else torch.tensor(w, dtype=torch.float32)
    if ref is not None:
        ref[lo:hi] = torch.tensor(r, dtype=torch.float32)
    return n


class _PairCollator:
    """Shared set-up of the pair collators: the padding id and the length multiple."""

    def __init__(self, pad_id: int = 0, *, pad_to_multiple_of: int | None = None):
        if not isinstance(pad_id, int) or pad_id < 0:
            raise ValueError(f"pad_id must be a non-negative int, got {pad_id!r}")
        _check_multiple(pad_to_multiple_of)
        self.pad_id, self.pad_to_multiple_of = pad_id, pad_to_multiple_of


class PaddedPairCollator(_PairCollator):
    """Pad B pairs into a [2B, T] batch (chosen rows first), labels shifted.

    pad_id: the input id used for padding (attention_mask 0 there, labels −100).
    pad_to_multiple_of: round T up to a multiple of this (None: the longest sequence).
    """

    def __call__(self, examples):
        seqs, has_ref = _sequences(examples)
        rows = len(seqs)
        t = _round_up(max(len(p) + len(c) for p, c, _, _ in seqs), self.pad_to_multiple_of)
        ids = torch.full((rows, t), self.pad_id, dtype=torch.long)
        labels = torch.full((rows, t), -100, dtype=torch.long)
        weights = torch.zeros((rows, t), dtype=torch.float32)
        ref = torch.zeros((rows, t), dtype=torch.float32) if has_ref else None
        attn = torch.zeros((rows, t), dtype=torch.long)
        for i, seq in enumerate(seqs):
            n = _fill(seq, ids[i], labels[i], weights[i], None if ref is None else ref[i], 0)
            attn[i, :n] = 1
        batch = {"input_ids": ids, "attention_mask": attn,
                 "position_ids": torch.arange(t).expand(rows, t).clone(),
                 "labels": labels, "weights": weights}
        if ref is not None:
            batch["ref_logps"] = ref
        return batch


class PackedPairCollator(_PairCollator):
    """Concatenate the 2P sequences of P pairs into one padding-free row [1, N].

    pad_id, pad_to_multiple_of (optional): append one extra dummy sequence of ``pad_id``
    tokens (its labels ignored, in no pair, counted in seq_offsets) so N is a multiple of
    ``pad_to_multiple_of`` — for shape-stable compilation.
    """

    def __call__(self, examples):
        seqs, has_ref = _sequences(examples)
        lens = [len(p) + len(c) for p, c, _, _ in seqs]
        total = sum(lens)
        n = _round_up(total, self.pad_to_multiple_of)
        if n > total:
            lens.append(n - total)
        ids = torch.full((n,), self.pad_id, dtype=torch.long)
        labels = torch.full((n,), -100, dtype=torch.long)
        weights = torch.zeros(n, dtype=torch.float32)
        ref = torch.zeros(n, dtype=torch.float32) if has_ref else None
        seq_ids = torch.full((n,), -1, dtype=torch.long)
        lengths = torch.tensor(lens, dtype=torch.long)
        offsets = torch.zeros(len(lens) + 1, dtype=torch.int32)
        offsets[1:] = torch.cumsum(lengths, 0)
        positions = torch.arange(n) - torch.repeat_interleave(offsets[:-1].long(), lengths)
        start = 0
        for s, seq in enumerate(seqs):
            start += _fill(seq, ids, labels, weights, ref, start)
        sequence_of = torch.repeat_interleave(torch.arange(len(lens)), lengths)
        seq_ids = torch.where(labels != -100, sequence_of, seq_ids)
        p = len(examples)
        batch = {"input_ids": ids.unsqueeze(0), "position_ids": positions.unsqueeze(0),
                 "seq_offsets": offsets, "max_seqlen": max(lens), "labels": labels,
                 "weights": weights, "seq_ids": seq_ids,
                 "pairs": torch.stack([torch.arange(p), torch.arange(p, 2 * p)], dim=1)}
        if ref is not None:
            batch["ref_logps"] = ref
        return batch


def _doc_ids(seq_offsets, n, device):
    offsets = seq_offsets.to(device=device, dtype=torch.long)
    return torch.repeat_interleave(torch.arange(offsets.numel() - 1, device=device),
                                   offsets.diff(), output_size=n)


def block_causal_mask(seq_offsets, n: int, *, dtype=None, device=None):
    """The [1, 1, N, N] block-diagonal causal mask of a packed row.

    dtype None or torch.bool: True where attention is allowed (for SDPA); a float dtype: an
    additive mask, 0 where allowed and the dtype's minimum elsewhere (for eager attention).
    """
    device = seq_offsets.device if device is None else device
    doc = _doc_ids(seq_offsets, n, device)
    pos = torch.arange(n, device=device)
    allowed = (doc[:, None] == doc[None, :]) & (pos[None, :] <= pos[:, None])
    allowed = allowed[None, None]
    if dtype is None or dtype == torch.bool:
        return allowed
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def _flex_block_mask(seq_offsets, n, device):
    from torch.nn.attention.flex_attention import create_block_mask

    doc = _doc_ids(seq_offsets, n, device)

    def document_causal(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (kv_idx <= q_idx)

    return create_block_mask(document_causal, 1, None, n, n, device=device)


def packed_attention_kwargs(batch, model=None, *, attn_implementation: str | None = None):
    """Keyword arguments that make a Hugging Face causal LM attend within sequences only.

    Use as ``model.model(input_ids=batch["input_ids"], **packed_attention_kwargs(batch,
    model))``. By the model's attention implementation (``model.config._attn_implementation``
    or ``attn_implementation``):

    - flash_attention_2/3 (flash-attn installed): ``position_ids`` plus the varlen kwargs
      ``cu_seq_lens_q/k`` and ``max_length_q/k`` — no mask is built;
    - flex_attention: a document ``BlockMask`` (memory O(N²/128²));
    - sdpa (the default) : a [1, 1, N, N] boolean block-diagonal causal mask;
    - eager: the same mask as an additive float mask in the model's dtype.

    The dense masks cost N² elements: for long packed rows prefer flash-attn or flex.
    """
    impl = attn_implementation
    if impl is None:
        if model is None:
            raise ValueError("packed_attention_kwargs needs model or attn_implementation")
        impl = getattr(model.config, "_attn_implementation", None) or "sdpa"
    ids, pos, offsets = batch["input_ids"], batch["position_ids"], batch["seq_offsets"]
    n, device = ids.shape[-1], ids.device
    kwargs = {"position_ids": pos}
    if impl.startswith("flash_attention") or "flash" in impl:
        cu = offsets.to(device=device, dtype=torch.int32)
        kwargs.update(attention_mask=None, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                      max_length_q=int(batch["max_seqlen"]),
                      max_length_k=int(batch["max_seqlen"]))
    elif impl == "flex_attention":
        kwargs["attention_mask"] = _flex_block_mask(offsets, n, device)
    elif impl == "sdpa":
        kwargs["attention_mask"] = block_causal_mask(offsets, n, device=device)
    elif impl == "eager":
        dtype = next(model.parameters()).dtype if model is not None else torch.float32
        kwargs["attention_mask"] = block_causal_mask(offsets, n, dtype=dtype, device=device)
    else:
        raise ValueError(f"attn_implementation {impl!r} is not supported for packed batches; "
                         "use sdpa, eager, flex_attention or flash_attention_2/3")
    return kwargs
