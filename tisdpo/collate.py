"""Collators: tokenised pairs → model-ready batches, padded or packed (padding-free).

Both take a list of examples as :func:`tisdpo.data.tokenize_pairs` produces them (dicts with
``prompt_ids``, ``chosen_ids``, ``rejected_ids`` and optionally ``chosen_weight``,
``rejected_weight``, ``ref_chosen_logps``, ``ref_rejected_logps``; lists or tensors).

Each sequence is ``prompt_ids + completion_ids``. Labels are ALREADY SHIFTED: ``labels[i]``
is the token predicted from position i, i.e. ``input_ids[i+1]`` when that token is a
completion token, else −100 (prompt targets, padding and each sequence's last position).
``weights`` and ``ref_logps`` are shifted with the labels (the value of the completion token
that ``labels[i]`` names sits at i) and are 0 wherever the label is ignored. Without weight
columns the completion tokens get weight 1.0 (including an EOS when the data was tokenised
with ``add_eos``; see the EOS rule in :mod:`tisdpo.data`). So the per-token log-probs are
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

__all__ = ["PaddedPairCollator", "PackedPairCollator", "packed_attention_kwargs",
           "block_causal_mask"]


class PaddedPairCollator:
    """Pad B pairs into a [2B, T] batch (chosen rows first), labels shifted.

    pad_id: the input id used for padding (attention_mask 0 there, labels −100).
    pad_to_multiple_of: round T up to a multiple of this (None: the longest sequence).
    """

    def __init__(self, pad_id: int, *, pad_to_multiple_of: int | None = None):
        raise NotImplementedError

    def __call__(self, examples):
        raise NotImplementedError


class PackedPairCollator:
    """Concatenate the 2P sequences of P pairs into one padding-free row [1, N].

    No arguments are required; pad_to_multiple_of (optional) appends one extra dummy
    sequence of pad_id tokens (all labels ignored, not part of any pair) so N is a multiple
    of it — useful for shape-stable compilation.
    """

    def __init__(self, pad_id: int = 0, *, pad_to_multiple_of: int | None = None):
        raise NotImplementedError

    def __call__(self, examples):
        raise NotImplementedError


def block_causal_mask(seq_offsets, n: int, *, dtype=None, device=None):
    """The [1, 1, N, N] block-diagonal causal mask of a packed row.

    dtype None or torch.bool: True where attention is allowed (for SDPA); a float dtype: an
    additive mask, 0 where allowed and the dtype's minimum elsewhere (for eager attention).
    """
    raise NotImplementedError


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
    raise NotImplementedError
