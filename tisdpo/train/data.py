"""Preference records → tokenised pairs (docs/DESIGN.md §6, docs/ALGORITHMS.md §2.3, §5, §7).

Record format (one row per preference pair):

- ``prompt``, ``chosen``, ``rejected``: plain strings, or chat messages (lists of
  ``{"role", "content"}``; ``prompt`` the conversation so far, ``chosen``/``rejected`` the
  assistant turn(s) that follow, or a plain string taken as one assistant message).
- or, without a ``prompt`` field, ``chosen`` and ``rejected`` holding the whole text or chat:
  the prompt is the start they share, split off as TRL does (:mod:`tisdpo.train.prompts`);
- optional ``chosen_weight`` / ``rejected_weight``: per completion-token float lists (TIS-DPO
  token weights, as the offline pass writes them);
- optional ``ref_chosen_logps`` / ``ref_rejected_logps``: per completion-token reference
  log-probs (precomputed so the reference model need not be loaded during training).

Files are read by :func:`tisdpo.train.records.load_preference_dataset` (re-exported here),
which checks them before any split: errors name the file, the line or record and the field.

Every per-token list has exactly one value per *completion token* as :func:`tokenize_pairs`
produces it under the same :class:`TokenizeConfig`: the response's text tokens, plus the
appended EOS when ``add_eos`` is on. The official TIS-DPO files store weights for the text
tokens only (no EOS) — load them with ``add_eos=False``, which is how TIS-DPO treats EOS
anyway (weight 0, i.e. not counted).

Plain-text records are tokenised as *prompt and completion separately* (no special tokens;
BOS in front of the prompt only with ``add_bos``) and concatenated, so the completion tokens
are exactly ``tokenizer(completion, add_special_tokens=False)`` — the tokens the weights
refer to — whatever a joint tokenisation would merge across the boundary. (TRL tokenises
prompt + completion jointly. With SentencePiece tokenizers that mark a word start on the
first piece, Llama-2's or Mistral's, a completion tokenised alone starts a new word: "The"
after a prompt ending in a newline is scored as " The", and " Yes" as a lone word-start
piece then " Yes".) Chat records are rendered with the tokenizer's chat template (and, as
TRL renders them, the record's ``tools`` and ``chat_template_kwargs``): the prompt
with ``add_generation_prompt=True``, the completion being what the full conversation adds
after it, restricted to the template's ``{% generation %}`` block(s) when it has them, and
ending at its last EOS token when it has one (trailing template tokens, e.g. ChatML's
newline after the end-of-turn token, are dropped, inside a generation block too). The EOS is
the tokenizer's ``eos_token``: a template that ends turns with another token (a base model's
tokenizer under a chat template) keeps that token and what follows it as response, and
``add_eos`` appends ``eos_token`` after them; give such a model the tokenizer whose
``eos_token`` is its end-of-turn token. An assistant message containing the EOS token's text
is refused, as a plain-text response containing EOS is.

EOS rule (``TokenizeConfig.add_eos``): when on, the completion ends with the tokenizer's EOS
(appended for plain text; kept, or appended if the template did not emit it, for chat) and
that EOS is a completion token like any other — labelled, counted and weighted (1.0 when the
dataset has no weights). When off, no EOS is a completion token (a chat template's trailing
EOS is dropped). The official TIS-DPO code appends EOS but gives it weight 0, which for its
sum-reduced loss equals not counting it: the ``tisdpo*`` presets use ``add_eos=False``; every
other preset (DPO, IPO, SimPO, TDPO, cDPO, ...) counts EOS as the DPO reference code does
(``add_eos=True``). :meth:`TokenizeConfig.for_preset` applies this rule.

Truncation (as the official code, ``tokenize_batch_element``): if prompt + the longer
completion exceed ``max_length``, the prompt is cut to ``max_prompt_length`` (its start kept
with ``truncation="keep_start"``, its end with ``"keep_end"``, behind the BOS when the prompt
starts with one, so a cut prompt keeps the BOS a short one has); if still too long, both
completions are cut to ``max_length − len(prompt)`` tokens, keeping their start — the
per-token columns are cut together with them, so they stay aligned (a cut completion loses
its EOS); a value they cut may be NaN or null (the weights stage's padding of the tokens its
own ``max_length`` cut), one they keep may not. Deliberate differences from the official
code: it cuts completions to ``max_length − max_prompt_length`` (≤ ours) even when the
prompt is shorter than its cap, and it zeroes the last kept token's weight; we do neither;
and ``keep_end`` keeps a leading BOS (the official code has none to keep).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Literal

from tisdpo.train.prompts import NoSharedPrompt, with_shared_prompt
from tisdpo.train.records import (
    PER_TOKEN_COLUMNS, SOURCE_COLUMN, TEMPLATE_FIELDS, TEXT_FIELDS, load_preference_dataset,
    messages_problem, template_kwargs,
)
from tisdpo.train.token_lists import RecordError as _RecordError
from tisdpo.train.token_lists import per_token_floats

__all__ = [
    "PER_TOKEN_COLUMNS", "TokenizeConfig", "TokenizeReport", "load_preference_dataset",
    "tokenize_pairs", "reverse_pairs", "eos_counted_for_preset", "per_token_floats",
]

_TEXT_FIELDS = TEXT_FIELDS


def eos_counted_for_preset(preset: str) -> bool:
    """Whether EOS is a counted completion token under a loss preset (the EOS rule).

    ``tisdpo*`` presets: False (the official TIS-DPO code gives EOS weight 0). All others:
    True (the DPO reference code counts EOS).
    """
    if not isinstance(preset, str):
        raise ValueError(f"preset must be a preset name, got {preset!r}")
    return not preset.startswith("tisdpo")


@dataclass(frozen=True)
class TokenizeConfig:
    """How :func:`tokenize_pairs` tokenises, truncates and validates.

    max_length: prompt + completion tokens at most (per side), ≥ 2.
    max_prompt_length: the prompt's cap when truncation is needed, < max_length (default
        max_length // 2: the official 512 / 256).
    truncation: "keep_start" or "keep_end" — which part of an over-long prompt is kept
        (completions always keep their start).
    add_eos: whether EOS ends each completion and counts as a completion token (see the
        module docstring's EOS rule; ``for_preset`` picks it per loss preset).
    add_bos: prepend the tokenizer's BOS to plain-text prompts (chat templates add their own).
    skip_invalid: drop invalid records (counted in the report) instead of raising.
    """

    max_length: int = 512
    max_prompt_length: int | None = None
    truncation: Literal["keep_start", "keep_end"] = "keep_start"
    add_eos: bool = True
    add_bos: bool = False
    skip_invalid: bool = False

    def __post_init__(self):
        if not isinstance(self.max_length, int) or self.max_length < 2:
            raise ValueError(f"max_length must be an int >= 2, got {self.max_length!r}")
        if self.max_prompt_length is None:
            object.__setattr__(self, "max_prompt_length", self.max_length // 2)
        if not isinstance(self.max_prompt_length, int) or not \
                1 <= self.max_prompt_length < self.max_length:
            raise ValueError(f"max_prompt_length must be an int in [1, max_length="
                             f"{self.max_length}), got {self.max_prompt_length!r}")
        if self.truncation not in ("keep_start", "keep_end"):
            raise ValueError(f"truncation must be 'keep_start' or 'keep_end', "
                             f"got {self.truncation!r}")
        for name in ("add_eos", "add_bos", "skip_invalid"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")

    @classmethod
    def for_preset(cls, preset: str, **kwargs) -> TokenizeConfig:
        """A config whose ``add_eos`` follows the preset's EOS rule (overridable)."""
        kwargs.setdefault("add_eos", eos_counted_for_preset(preset))
        return cls(**kwargs)

    def replace(self, **changes) -> TokenizeConfig:
        return dataclasses.replace(self, **changes)


@dataclass
class TokenizeReport:
    """What :func:`tokenize_pairs` did.

    n_records: input records; n_kept: output pairs; n_skipped: invalid records dropped
    (only with skip_invalid); reasons: the first few skip reasons ("record i, field 'f': …", or
    the record's SOURCE_COLUMN in place of "record i");
    n_prompt_truncated / n_completion_truncated: pairs whose prompt / completions were cut;
    n_identical_after_truncation: pairs whose completions the cut made identical (kept; a
    DPO-style loss learns nothing from them), the first named by ``first_identical``.
    """

    n_records: int = 0
    n_kept: int = 0
    n_skipped: int = 0
    reasons: list[str] = field(default_factory=list)
    n_prompt_truncated: int = 0
    n_completion_truncated: int = 0
    n_identical_after_truncation: int = 0
    first_identical: str = ""

    def summary(self) -> str:
        s = (f"{self.n_kept}/{self.n_records} pairs kept, {self.n_skipped} invalid skipped, "
             f"{self.n_prompt_truncated} prompts and {self.n_completion_truncated} "
             f"completions truncated")
        if self.n_identical_after_truncation:
            s += (f", {self.n_identical_after_truncation} of them to identical chosen and "
                  f"rejected (first: {self.first_identical})")
        if self.reasons:
            s += "; first reasons: " + "; ".join(self.reasons)
        return s


# ----------------------------------------------------------------------------- tokenisation

_GENERATION_RE = re.compile(r"\{%-?\s*generation\s*-?%\}")


def _ids(out):
    """input_ids from whatever apply_chat_template returned (dict-like or list)."""
    if isinstance(out, dict) or hasattr(out, "keys"):
        return list(out["input_ids"])
    return list(out)


def _check_messages(value, where, name, *, allow_string):
    if isinstance(value, str) and allow_string:
        return [{"role": "assistant", "content": value}]
    problem = messages_problem(value, allow_string=allow_string)
    if problem:
        raise _RecordError(where, name, problem)
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _plain_ids(tokenizer, text, where, name, eos_id, cache):
    ids = cache.get(text)
    if ids is None:
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if eos_id is not None and eos_id in ids:
        raise _RecordError(where, name, "contains the EOS token (it marks where a response "
                           "ends: the EOS rule places it)")
    return ids


def _chat_completion(tokenizer, prompt_msgs, prompt_ids, messages, where, name, has_gen,
                     eos_id, template):
    try:
        out = tokenizer.apply_chat_template(
            prompt_msgs + messages, tokenize=True, return_dict=True,
            return_assistant_tokens_mask=has_gen, **template)
    except Exception as e:  # jinja errors, unknown roles, ...
        raise _RecordError(where, name, f"chat template failed: {e}") from None
    full = list(out["input_ids"])
    n = len(prompt_ids)
    if full[:n] != prompt_ids:
        raise _RecordError(where, name, "the chat template does not render the prompt (with "
                           "add_generation_prompt) as a prefix of prompt + completion")
    comp = full[n:]
    if has_gen:
        mask = list(out["assistant_masks"])[n:]
        keep = 0
        while keep < len(mask) and mask[keep]:
            keep += 1
        if any(mask[keep:]) or keep == 0:
            raise _RecordError(where, name, "the completion's tokens must be one generation "
                               "block followed only by template tokens (multi-turn or "
                               "header-in-completion templates are not supported)")
        comp = comp[:keep]
    if eos_id is not None and eos_id in comp:
        # the turn ends at its last EOS; what the template adds after it (ChatML's newline,
        # also inside a generation block such as "content + '<|im_end|>\n'") is template
        # text, not response
        comp = comp[:len(comp) - comp[::-1].index(eos_id)]
    return comp


def _truncate(prompt, comps, cfg, bos_id=None):
    """The official truncation (the per-token lists are cut with their completion after it).
    ``keep_end`` keeps a leading BOS (``add_bos``'s, or a chat template's) in front of the
    kept end."""
    longer = max(len(c) for c in comps)
    prompt_cut = comp_cut = False
    if len(prompt) + longer > cfg.max_length and len(prompt) > cfg.max_prompt_length:
        keep = cfg.max_prompt_length
        if cfg.truncation == "keep_start":
            prompt = prompt[:keep]
        elif bos_id is not None and prompt[0] == bos_id and keep >= 2:
            prompt = prompt[:1] + prompt[len(prompt) - keep + 1:]
        else:
            prompt = prompt[-keep:]
        prompt_cut = True
    if len(prompt) + longer > cfg.max_length:
        keep = cfg.max_length - len(prompt)
        comp_cut = True
        comps = [c[:keep] for c in comps]
    return prompt, comps, prompt_cut, comp_cut


def _shared_prompt(rec: dict) -> dict:
    """``rec`` with the prompt its chosen and rejected share split off when it has no
    ``prompt`` (:mod:`tisdpo.train.prompts`); as it is when it has one, or none is shared
    (``_tokenize_record`` then says why)."""
    if "prompt" in rec:
        return rec
    try:
        return with_shared_prompt(rec)
    except NoSharedPrompt:
        return rec


def _tokenize_record(rec, index, where, tokenizer, cfg, list_cols, has_gen, cache):
    eos_id = tokenizer.eos_token_id
    for f in _TEXT_FIELDS if "prompt" in rec else _TEXT_FIELDS[1:]:
        if rec[f] is None:
            raise _RecordError(where, f, "missing")
    if "prompt" not in rec:                         # _shared_prompt found none: say why
        try:
            with_shared_prompt(rec)
        except NoSharedPrompt as err:
            raise _RecordError(where, err.field, err.problem) from None
    chat = not isinstance(rec["prompt"], str)
    if chat:
        prompt_msgs = _check_messages(rec["prompt"], where, "prompt", allow_string=False)
        template, problem = template_kwargs(rec)       # tools, chat_template_kwargs
        if problem:
            raise _RecordError(where, *problem)
        try:
            prompt_ids = _ids(tokenizer.apply_chat_template(
                prompt_msgs, tokenize=True, add_generation_prompt=True, return_dict=True,
                **template))
        except Exception as e:
            raise _RecordError(where, "prompt", f"chat template failed: {e}") from None
    else:
        prompt_ids = _plain_ids(tokenizer, rec["prompt"], where, "prompt", eos_id, cache)
        if cfg.add_bos and tokenizer.bos_token_id is not None:
            prompt_ids = [tokenizer.bos_token_id] + prompt_ids
    if not prompt_ids:
        raise _RecordError(where, "prompt", "empty: no position predicts the first completion "
                           "token (give a prompt or add_bos=True)")
    comps = []
    for side in ("chosen", "rejected"):
        value = rec[side]
        if chat:
            msgs = _check_messages(value, where, side, allow_string=True)
            replies = [m["content"] for m in msgs if m["role"] == "assistant"]
            if not replies:
                raise _RecordError(where, side, "no assistant message")
            if not "".join(replies).strip():
                raise _RecordError(where, side, "empty response")
            eos_text = tokenizer.eos_token
            if eos_text and any(eos_text in r for r in replies):
                raise _RecordError(where, side, f"an assistant message contains the EOS token "
                                   f"{eos_text!r} (it marks where a response ends)")
            comp = _chat_completion(tokenizer, prompt_msgs, prompt_ids, msgs, where, side,
                                    has_gen, eos_id, template)
            if not cfg.add_eos and comp and comp[-1] == eos_id:
                comp = comp[:-1]
        else:
            if not isinstance(value, str):
                raise _RecordError(where, side, f"expected a string (the prompt is a string), "
                                   f"got {type(value).__name__}")
            if not value.strip():
                raise _RecordError(where, side, "empty response")
            comp = _plain_ids(tokenizer, value, where, side, eos_id, cache)
        if cfg.add_eos and (not comp or comp[-1] != eos_id):
            comp = comp + [eos_id]
        if not comp:
            raise _RecordError(where, side, "empty response (no completion tokens)")
        comps.append(comp)
    whole = [len(c) for c in comps]
    prompt_ids, comps, p_cut, c_cut = _truncate(prompt_ids, comps, cfg, tokenizer.bos_token_id)
    lists = {}                          # each cut with its completion: only what is kept read
    for pair in list_cols:
        for s, col in enumerate(pair):
            n = len(comps[s])
            lists[col] = per_token_floats(rec[col], where, col, whole[s], n)[:n]
    row = {"record_index": index, "prompt_ids": prompt_ids, "chosen_ids": comps[0],
           "rejected_ids": comps[1], **lists}
    return row, p_cut, c_cut


def _features(list_cols):
    import datasets

    seq = getattr(datasets, "List", None) or datasets.Sequence
    feats = {"record_index": datasets.Value("int64"),
             "prompt_ids": seq(datasets.Value("int32")),
             "chosen_ids": seq(datasets.Value("int32")),
             "rejected_ids": seq(datasets.Value("int32"))}
    for pair in list_cols:
        for col in pair:
            feats[col] = seq(datasets.Value("float32"))
    feats.update({"_error": datasets.Value("string"), "_prompt_cut": datasets.Value("bool"),
                  "_comp_cut": datasets.Value("bool"), "_same_cut": datasets.Value("string")})
    return datasets.Features(feats)


def tokenize_pairs(dataset, tokenizer, cfg: TokenizeConfig | None = None):
    """Tokenise preference records into pairs of completion token ids; returns (dataset, report).

    Output columns: ``record_index`` (row in the input), ``prompt_ids``, ``chosen_ids``,
    ``rejected_ids`` (completion token ids), and, when the input has them, ``chosen_weight``,
    ``rejected_weight``, ``ref_chosen_logps``, ``ref_rejected_logps`` (float32 lists aligned
    1:1 with ``chosen_ids``/``rejected_ids`` after truncation). Other input columns are
    dropped. See the module docstring for plain vs chat records, the EOS rule and truncation.

    Invalid records raise ``ValueError("record 17, field 'chosen_weight': 12 values for 11
    completion tokens")``: a missing field, a non-string (or malformed chat) value, an empty
    response, a per-token list whose length differs from the completion's token count, a
    non-finite value among the tokens truncation keeps. When the dataset has the string
    column ``SOURCE_COLUMN`` (records loaded with ``load_preference_dataset(source_prefix=
    ...)``), a record with a non-empty value there is named by it instead of by its row
    ("data.train pairs.jsonl line 18 (record 17), field 'chosen_weight': …", right after any
    split or shuffle); the column is not in the output. With ``cfg.skip_invalid`` invalid
    records are dropped instead and counted in the report (a column missing from every
    record still raises).
    """
    cfg = TokenizeConfig() if cfg is None else cfg
    if not isinstance(cfg, TokenizeConfig):
        raise ValueError(f"cfg must be a TokenizeConfig, got {type(cfg).__name__}")
    cols = list(dataset.column_names)
    texts = _TEXT_FIELDS if "prompt" in cols else _TEXT_FIELDS[1:]   # else shared prompts
    for f in texts:
        if f not in cols:
            raise ValueError(f"record 0, field {f!r}: missing (no record has it; columns: "
                             f"{cols})")
    list_cols = []
    for c_col, r_col in PER_TOKEN_COLUMNS.values():
        if (c_col in cols) != (r_col in cols):
            have, lack = (c_col, r_col) if c_col in cols else (r_col, c_col)
            raise ValueError(f"record 0, field {lack!r}: missing (the dataset has {have!r} "
                             f"but no record has {lack!r})")
        if c_col in cols:
            list_cols.append((c_col, r_col))
    if cfg.add_eos and tokenizer.eos_token_id is None:
        raise ValueError("add_eos=True but the tokenizer has no eos_token")
    if cfg.add_bos and tokenizer.bos_token_id is None and len(dataset) and \
            isinstance(dataset[0]["prompt" if "prompt" in cols else "chosen"], str):
        raise ValueError("add_bos=True but the tokenizer has no bos_token (plain-text prompts "
                         "would get none)")
    template = getattr(tokenizer, "chat_template", None)
    has_gen = isinstance(template, str) and bool(_GENERATION_RE.search(template))
    needed = list(texts) + [c for pair in list_cols for c in pair] + \
        [c for c in TEMPLATE_FIELDS if c in cols]
    named = SOURCE_COLUMN in cols
    features = _features(list_cols)

    def fn(batch, indices):
        out = {k: [] for k in features}
        # plain texts of the batch in one tokenizer call (fast path; same ids as one by one)
        recs = [_shared_prompt({k: batch[k][j] for k in needed}) for j in range(len(indices))]
        strings = list({r[f] for r in recs for f in _TEXT_FIELDS if isinstance(r.get(f), str)})
        cache = dict(zip(strings, tokenizer(strings, add_special_tokens=False)["input_ids"])) \
            if strings else {}
        sources = batch[SOURCE_COLUMN] if named else [None] * len(indices)
        for rec, index, source in zip(recs, indices, sources):
            where = source if isinstance(source, str) and source else f"record {index}"
            try:
                row, p_cut, c_cut = _tokenize_record(rec, index, where, tokenizer, cfg,
                                                     list_cols, has_gen, cache)
                error = ""
            except _RecordError as e:
                if not cfg.skip_invalid:
                    raise ValueError(str(e)) from None
                row = {k: [] for k in features if not k.startswith("_")}
                row["record_index"], error, p_cut, c_cut = index, str(e), False, False
            for k in row:
                out[k].append(row[k])
            out["_error"].append(error)
            out["_prompt_cut"].append(p_cut)
            out["_comp_cut"].append(c_cut)
            # a cut that leaves chosen equal to rejected (not equal as given): named, as the
            # pair learns nothing
            same = c_cut and row["chosen_ids"] == row["rejected_ids"] \
                and rec["chosen"] != rec["rejected"]
            out["_same_cut"].append(where if same else "")
        return out

    tok = dataset.map(fn, batched=True, with_indices=True, remove_columns=cols,
                      features=features, desc="tokenize_pairs")
    # read the bookkeeping columns from Arrow in one go (a Column iterates row by row)
    errors, p_cut, c_cut, same = (tok.data.column(c).to_pylist()
                                  for c in ("_error", "_prompt_cut", "_comp_cut", "_same_cut"))
    bad = [e for e in errors if e]
    report = TokenizeReport(n_records=len(errors), n_kept=len(errors) - len(bad),
                            n_skipped=len(bad), reasons=bad[:5])
    report.n_prompt_truncated = sum(1 for e, x in zip(errors, p_cut) if x and not e)
    report.n_completion_truncated = sum(1 for e, x in zip(errors, c_cut) if x and not e)
    same = [w for w in same if w]
    report.n_identical_after_truncation = len(same)
    report.first_identical = same[0] if same else ""
    if bad:
        tok = tok.filter(lambda e: e == "", input_columns="_error", desc="skip_invalid")
    return tok.remove_columns(["_error", "_prompt_cut", "_comp_cut", "_same_cut"]), report


def reverse_pairs(dataset):
    """Swap chosen and rejected (and their weight/ref columns): the data for π⁻.

    Every column whose name contains "chosen" is swapped with the column named the same
    with "rejected" (when both exist), so it works on raw records and on
    :func:`tokenize_pairs` output alike.
    """
    mapping = {}
    for col in dataset.column_names:
        if "chosen" in col and col.replace("chosen", "rejected") in dataset.column_names:
            other = col.replace("chosen", "rejected")
            mapping[col], mapping[other] = other, col
    if not mapping:
        raise ValueError(f"dataset has no chosen/rejected column pairs (columns: "
                         f"{dataset.column_names})")
    return dataset.rename_columns(mapping)
