"""Training a model on preference (or SFT) data: configuration, data and collation, models,
objectives, the loop, checkpoints and several processes. Needs the ``[train]`` extra.

Modules: ``config`` (every option of a run), ``data`` (records → tokenised pairs),
``collate`` (padded or packed batches), ``synthetic`` (the built-in task and tokenizer),
``model`` (load / build / save causal LMs, hidden states and the head), ``objectives``
(preference and SFT objectives), ``trainer`` (the loop), ``checkpoint`` (files a run resumes
from), ``parallel`` (torchrun, DDP, FSDP2).
"""
