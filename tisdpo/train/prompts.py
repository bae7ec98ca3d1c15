"""Implicit prompts: records whose ``chosen`` and ``rejected`` hold the whole conversation.

Some preference data has no ``prompt`` field: each of ``chosen`` and ``rejected`` is the
full text (Anthropic HH's "\\n\\nHuman: … \\n\\nAssistant: …" strings) or the full chat
(a list of messages ending with the assistant's reply). TRL's DPOTrainer reads such records
by taking the prompt to be the start the two share, and so do we, by the same rule, so that
a record means the same thing here and in TRL:

- chat messages: the prompt is the longest run of leading messages that are equal in both;
  ``chosen`` and ``rejected`` are the messages after it;
- plain text: the prompt is the longest common prefix of the two strings, less a final
  space (``"…Assistant: Yes"`` against ``"…Assistant: No"`` gives the prompt
  ``"…Assistant:"`` and the responses ``" Yes"`` and ``" No"``). Responses that begin with
  the same characters give those characters to the prompt (TRL does the same): a DPO-style
  loss is unchanged by text both sides share, and per-token weights and reference
  log-probs refer to the completion tokens that remain.

Two records have no such prompt and are refused (TRL would cut them somewhere arbitrary):
chosen equal to rejected or the start of it (or the reverse), and two that differ from their
first character or message on. The files of a split hold records with a ``prompt`` field
or records without one, not both.
"""
from __future__ import annotations

__all__ = ["IMPLICIT", "NoSharedPrompt", "split_shared_prompt", "with_shared_prompt",
           "with_prompts"]

#: how errors say where a record's prompt came from
IMPLICIT = "with no 'prompt' field the prompt is the start chosen and rejected share"


class NoSharedPrompt(ValueError):
    """A record without a ``prompt`` field whose chosen and rejected share no prompt;
    ``field`` and ``problem`` as record errors name them."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"field {field!r}: {problem}")
        self.field, self.problem = field, problem


def split_shared_prompt(chosen, rejected):
    """(prompt, chosen, rejected) of an implicit-prompt record; :class:`NoSharedPrompt` when
    the pair has none (see the module docstring). ``chosen`` and ``rejected`` are both
    strings or both message lists."""
    text = isinstance(chosen, str)
    if text != isinstance(rejected, str) or not text and not (
            isinstance(chosen, (list, tuple)) and isinstance(rejected, (list, tuple))):
        raise NoSharedPrompt("rejected", f"a {_kind(rejected)}, but chosen is a "
                             f"{_kind(chosen)} ({IMPLICIT}: both strings or both message "
                             f"lists)")
    n = min(len(chosen), len(rejected))
    at = next((i for i in range(n) if chosen[i] != rejected[i]), None)
    unit = "character" if text else "message"
    if at is None:
        what = "equal to rejected" if len(chosen) == len(rejected) else \
            "the start of rejected" if len(chosen) < len(rejected) else \
            "longer than rejected, which is its start"
        raise NoSharedPrompt("chosen", f"{what} ({IMPLICIT}, and they must differ after it)")
    if text and at > 0 and chosen[at - 1] == " ":
        at -= 1                                     # the space goes with the responses
    if at == 0:
        raise NoSharedPrompt("chosen", f"differs from rejected from the first {unit} on "
                             f"({IMPLICIT}, and they share none)")
    return chosen[:at], chosen[at:], rejected[at:]


def with_shared_prompt(rec: dict) -> dict:
    """``rec`` (a record without a ``prompt``) with the prompt its chosen and rejected share
    split off into ``prompt``; :class:`NoSharedPrompt` when they share none."""
    return {**rec, **dict(zip(("prompt", "chosen", "rejected"),
                              split_shared_prompt(rec["chosen"], rec["rejected"])))}


def _kind(value) -> str:
    return "string" if isinstance(value, str) else \
        "message list" if isinstance(value, (list, tuple)) else type(value).__name__


def with_prompts(dataset):
    """``dataset`` with its prompts made explicit: a dataset that has a ``prompt`` column is
    returned as it is; else each record's prompt is split off ``chosen`` and ``rejected``
    (:func:`split_shared_prompt`) into a new ``prompt`` column. A record without a shared
    prompt gets ``prompt`` None and keeps its fields, so that tokenising names it (and
    ``skip_invalid`` drops it) as a record whose prompt is missing."""
    if "prompt" in dataset.column_names or not {"chosen", "rejected"} <= set(
            dataset.column_names):
        return dataset

    def fn(batch):
        out = {"prompt": [], "chosen": [], "rejected": []}
        for c, r in zip(batch["chosen"], batch["rejected"]):
            try:
                rec = with_shared_prompt({"chosen": c, "rejected": r})
            except NoSharedPrompt:
                rec = {"prompt": None, "chosen": c, "rejected": r}
            for k in out:
                out[k].append(rec[k])
        return out

    features = dataset.features.copy()
    features["prompt"] = features["chosen"]     # typed, also when every prompt is None
    return dataset.map(fn, batched=True, features=features, desc="shared prompts")
