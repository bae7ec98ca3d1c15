"""Preference records on disk → a ``datasets.Dataset``, checked before anything else sees them.

Every data file is read once by this module first (JSON with Python's ``json``, line by
line for JSON Lines; Parquet with pyarrow), so that an empty file, a truncated or invalid
JSON line or bytes that are not UTF-8 raise one line naming the file and the line, and not
an Arrow traceback from deep inside ``datasets``. With ``check_records`` every record is
also checked for what needs no tokenizer (the text fields present and of the right type,
chat messages well formed, responses not empty, per-token lists of numbers: finite, or
NaN/null, which tokenisation refuses only where it keeps the token; one record format per
file), and the error names the file, the line as an editor shows it
(JSON Lines) or the record's index in the file, and the field:

    pairs.jsonl line 5 (record 4), field 'chosen': missing

The loaded dataset keeps the files' order, so these positions are the records' own, before
any split or shuffle. What needs the tokenizer (the EOS rule, per-token list lengths, chat
templates) is checked by :func:`tisdpo.train.data.tokenize_pairs`; so that its errors name
these positions too, whatever split or shuffle comes between, ``source_prefix`` stores each
record's position in the column ``SOURCE_COLUMN``.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
from pathlib import Path

from tisdpo.train.json_records import objects_only, scan_json
from tisdpo.train.prompts import IMPLICIT, NoSharedPrompt, with_prompts, with_shared_prompt

__all__ = ["TEXT_FIELDS", "PER_TOKEN_COLUMNS", "PER_TOKEN_FIELDS", "DATA_EXTS", "SOURCE_COLUMN",
           "TEMPLATE_FIELDS", "load_preference_dataset", "record_problem", "messages_problem",
           "non_finite", "template_kwargs", "negative_values", "NEGATIVE_WEIGHTS"]

TEXT_FIELDS = ("prompt", "chosen", "rejected")
#: Per-token list columns, per side: (chosen column, rejected column).
PER_TOKEN_COLUMNS = {
    "weight": ("chosen_weight", "rejected_weight"),
    "ref_logps": ("ref_chosen_logps", "ref_rejected_logps"),
}
PER_TOKEN_FIELDS = tuple(c for pair in PER_TOKEN_COLUMNS.values() for c in pair)
#: Per-record options of a chat template, as TRL's DPOTrainer reads them.
TEMPLATE_FIELDS = ("tools", "chat_template_kwargs")
DATA_EXTS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
#: The column ``load_preference_dataset(source_prefix=...)`` adds: each record's position in
#: its file ("data.train pairs.jsonl line 5 (record 4)"), which ``tokenize_pairs`` names in
#: its errors in place of "record N" (and drops from its output).
SOURCE_COLUMN = "_record_source"
_SHARD = re.compile(r"-\d{5}-of-\d{5}$")          # the Hub's split-00000-of-00002 files

log = logging.getLogger("tisdpo")


# ------------------------------------------------------------------------- record checks

def messages_problem(value, *, allow_string: bool) -> str | None:
    """Why ``value`` is not a non-empty list of ``{"role", "content"}`` string dicts (or a
    string, with ``allow_string``); None when it is."""
    if isinstance(value, str) and allow_string:
        return None
    if not isinstance(value, (list, tuple)) or not value:
        return ("expected a non-empty list of chat messages" + (" or a string" if allow_string
                                                                  else "")
                + f", got {type(value).__name__}")
    for k, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) \
                or not isinstance(m.get("content"), str):
            return f"message {k} must be a dict with string 'role' and 'content', got {m!r}"[:300]
    return None


def record_problem(rec: dict) -> tuple[str, str] | None:
    """(field, problem) of the first fault of a raw record that needs no tokenizer; None
    when there is none. The rules (and words) are those of ``tokenize_pairs``; a record
    without a ``prompt`` key has the prompt chosen and rejected share
    (:mod:`tisdpo.train.prompts`)."""
    for f in ("chosen", "rejected") if "prompt" not in rec else TEXT_FIELDS:
        if rec.get(f) is None:
            return f, "missing"
    if "prompt" not in rec:
        try:
            rec = with_shared_prompt(rec)
        except NoSharedPrompt as err:
            return err.field, err.problem
    chat = not isinstance(rec["prompt"], str)
    if chat:
        problem = messages_problem(rec["prompt"], allow_string=False)
        if problem:
            return "prompt", problem
    for side in ("chosen", "rejected"):
        value = rec[side]
        if chat:
            problem = messages_problem(value, allow_string=True)
            if problem:
                return side, problem
            msgs = [{"role": "assistant", "content": value}] if isinstance(value, str) else value
            replies = [m["content"] for m in msgs if m["role"] == "assistant"]
            if not replies:
                return side, "no assistant message"
            if not "".join(replies).strip():
                return side, "empty response"
        elif not isinstance(value, str):
            return side, f"expected a string (the prompt is a string), got {type(value).__name__}"
        elif not value.strip():
            return side, "empty response"
    for col in PER_TOKEN_FIELDS:
        value = rec.get(col)
        if value is None:
            continue
        if not isinstance(value, (list, tuple)):
            return col, f"expected a list of floats, got {type(value).__name__}"
        problem = non_finite(value, unscored=True)
        if problem:
            return col, problem
    return None


def template_kwargs(rec: dict) -> tuple[dict, tuple[str, str] | None]:
    """The keyword arguments a chat record's template is rendered with, as TRL's DPOTrainer
    renders it: ``tools`` (a list, or its JSON text) and the ``chat_template_kwargs`` dict
    (both optional); and (field, problem) of a malformed one, else None."""
    tools = rec.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except ValueError as e:
            return {}, ("tools", f"not valid JSON ({e})")
    if tools is not None and not isinstance(tools, (list, tuple)):
        return {}, ("tools", f"expected a list of tool schemas, got {type(tools).__name__}")
    extra = rec.get("chat_template_kwargs") or {}
    if not isinstance(extra, dict):
        return {}, ("chat_template_kwargs", f"expected a dict, got {type(extra).__name__}")
    return {"tools": tools, **extra}, None


def negative_values(dataset, columns) -> tuple[int, int]:
    """(values below 0, values) over the per-token list ``columns`` of ``dataset``."""
    import pyarrow.compute as pc

    neg = total = 0
    for col in columns:
        flat = pc.list_flatten(dataset.select_columns([col]).with_format("arrow")[:].column(0))
        total += len(flat)
        neg += int(pc.sum(pc.less(flat, 0)).as_py() or 0)
    return neg, total


NEGATIVE_WEIGHTS = ("%d of %d token weights in %s are negative: used as given (a negative weight "
                    "reverses its token's gradient; the weight rules origin and threshold make "
                    "such weights). Files of TIS-DPO's official code hold sign-flipped raw "
                    "scores under these names, not weights: transform them first "
                    "(docs/ALGORITHMS.md §2.2)")


def non_finite(values, *, unscored: bool = False) -> str | None:
    """``"value k is v, not a finite number"`` for the first entry of ``values`` that is not
    a finite number (a bool is not one); None when every entry is. ``unscored``: NaN and None
    pass (the weights stage's padding of the tokens its data.max_length cut: tokenisation,
    which knows the tokens it keeps, refuses one it would read)."""
    for k, v in enumerate(values):
        if unscored and (v is None or isinstance(v, float) and math.isnan(v)):
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return f"value {k} is {v!r}, not a finite number"
    return None


class _Checker:
    """Checks the records of one file in order; remembers each text field's format, and in
    ``prompts`` (shared by the files of one split) whether records have a prompt."""

    def __init__(self, where: str, prompts: dict | None = None):
        self.where, self.kinds = where, {}
        self.prompts = {} if prompts is None else prompts

    def __call__(self, rec, at: str) -> None:
        if not isinstance(rec, dict):
            raise ValueError(f"{self.where} {at}: expected a JSON object (one record), got "
                             f"{type(rec).__name__}")
        implicit = "prompt" not in rec
        first_implicit, where, first_at = self.prompts.setdefault("implicit",
                                                                  (implicit, self.where, at))
        if implicit != first_implicit:
            first_at = first_at if where == self.where else f"{where} {first_at}"
            problem = "missing" if implicit else (
                f"given, but the record in {first_at} has none (the files of a split hold "
                f"records with a prompt or records without one, and {IMPLICIT}; not both)")
            raise ValueError(f"{self.where} {at}, field 'prompt': {problem}")
        problem = record_problem(rec)
        if problem:
            raise ValueError(f"{self.where} {at}, field {problem[0]!r}: {problem[1]}")
        for f in TEXT_FIELDS[1:] if implicit else TEXT_FIELDS:
            kind = "string" if isinstance(rec[f], str) else "chat message list"
            first, first_at = self.kinds.setdefault(f, (kind, at))
            if kind != first:
                raise ValueError(f"{self.where} {at}, field {f!r}: a {kind}, but a {first} in "
                                 f"{first_at} (one file holds plain-text or chat records, not "
                                 f"both)")


class _NonObjects(list):
    """With the checks off: (position, type) of each record that is not a JSON object."""

    def __call__(self, rec, at: str) -> None:
        if not isinstance(rec, dict):
            self.append((at, type(rec).__name__))


# --------------------------------------------------------------------------- file scans

def _scan_json(path: str, check: bool, prompts: dict) -> tuple[list[str], list[tuple[str, str]]]:
    """(each record's position in the JSON file ``path``, checking them if ``check``; else
    the (position, type) of those that are not JSON objects); ``prompts``: see _Checker."""
    return scan_json(path, _Checker(path, prompts) if check else _NonObjects(), check)


def _scan_parquet(path: str, check: bool, prompts: dict) -> tuple[list[str], list]:
    """Each record's position in the Parquet file ``path`` (checking them if ``check``)."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as err:                    # pyarrow's errors name no common base
        raise ValueError(f"{path}: not a readable Parquet file ({err})".splitlines()[0]) \
            from None
    if pf.metadata.num_rows == 0:
        raise ValueError(f"{path}: no records (an empty table)")
    if check:
        _check_batches(path, (b.to_pylist() for b in pf.iter_batches(
            batch_size=1024, columns=_present(pf.schema_arrow.names))), prompts)
    return [f"record {i}" for i in range(pf.metadata.num_rows)], []


def _present(names) -> list[str]:
    return [c for c in TEXT_FIELDS + PER_TOKEN_FIELDS if c in names]


def _check_batches(where: str, batches, prompts: dict | None = None) -> None:
    checker, i = _Checker(where, prompts), 0
    for rows in batches:
        for rec in rows:
            checker(rec, f"record {i}")
            i += 1


def _check_dataset(where: str, ds, check: bool) -> None:
    if len(ds) == 0:
        raise ValueError(f"{where}: no records (an empty dataset)")
    if not check:
        return
    cols = _present(ds.column_names)
    sub = ds.select_columns(cols)

    def batches():
        for i in range(0, len(ds), 1024):
            batch, n = sub[i:i + 1024], min(1024, len(ds) - i)
            yield [{c: batch[c][j] for c in cols} for j in range(n)]

    _check_batches(where, batches())


# ------------------------------------------------------------------------------- loading

def _pick_split(available, split, where, path_of, held_out=False):
    """The split to load (by default "train", or with ``held_out`` the first of "test",
    "validation", "eval"); ``path_of(split)``: a path that loads that split alone."""
    available = list(available)
    if split is not None:
        if split not in available:
            raise ValueError(f"split={split!r} not found in {where}; available splits: "
                             f"{available}")
        return split
    for name in ("test", "validation", "eval") if held_out else ("train",):
        if name in available:
            return name
    if len(available) == 1:
        return available[0]
    shown = ", ".join(str(path_of(name)) for name in available[:3])
    wanted = "'test', 'validation' or 'eval'" if held_out else "'train'"
    raise ValueError(f"{where} holds several splits {available}, none named {wanted}: give the "
                     f"path of the one to load ({shown}{', ...' if len(available) > 3 else ''})")


def _with_sources(ds, sources: list[str], prefix: str | None):
    """``ds`` plus the SOURCE_COLUMN ``prefix + source`` (when a prefix is given and every
    record has its position: else ``ds`` as it is, never a wrong position)."""
    if prefix is None:
        return ds
    if SOURCE_COLUMN in ds.column_names:
        ds = ds.remove_columns(SOURCE_COLUMN)
    if len(sources) != len(ds):
        return ds
    return ds.add_column(SOURCE_COLUMN, [prefix + s for s in sources])


def _load_files(files: list[str], check: bool, prefix: str | None) -> tuple:
    """(the records of ``files``, each record's position); ``prefix``: of the positions
    named in a warning."""
    import datasets

    kinds = {DATA_EXTS.get(Path(f).suffix.lower()) for f in files}
    if None in kinds or len(kinds) != 1:
        raise ValueError(f"path_or_dir: expected .json, .jsonl or .parquet files of one kind, "
                         f"got {[str(f) for f in files]}")
    kind = kinds.pop()
    sources, odd, prompts = [], {}, {}
    for f in files:
        ats, odd[f] = (_scan_json if kind == "json" else _scan_parquet)(f, check, prompts)
        sources += [f"{f} {at}" for at in ats]
    if not any(odd.values()):
        return _read(lambda: datasets.load_dataset(kind, data_files=files, split="train"),
                     files), sources
    n = sum(len(v) for v in odd.values())
    f, (at, what) = next((f, v[0]) for f, v in odd.items() if v)
    log.warning("%s%s %s: expected a JSON object (one record), got %s (%d such record%s); "
                "each loads as a record without fields, which is invalid", prefix or "", f, at,
                what, n, "" if n == 1 else "s")
    # datasets reads no such line: a copy of those files with {} in their place
    with tempfile.TemporaryDirectory(prefix="tisdpo-records-") as tmp:
        paths = [objects_only(f, os.path.join(tmp, f"{i}.jsonl")) if odd[f] else f
                 for i, f in enumerate(files)]
        ds = _read(lambda: datasets.load_dataset(
            "json", data_files=paths, split="train", cache_dir=os.path.join(tmp, "cache"),
            keep_in_memory=True), files)
    return ds, sources


def _read(load, files: list[str]):
    """``load()``, with what datasets' reader refuses in a file the scan above let through as
    one line naming the files and the reader's own reason."""
    from datasets.exceptions import DatasetGenerationError

    try:
        return load()
    except DatasetGenerationError as err:
        cause = err
        while cause.__cause__ is not None or cause.__context__ is not None:
            cause = cause.__cause__ or cause.__context__
        why = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        raise ValueError(f"{', '.join(map(str, files))}: datasets could not read it ({why})") \
            from None


#: data whose identical pairs were reported in this process (each stage loads its records)
_REPORTED: set = set()


def _report_identical(ds, sources: list[str], label: str) -> None:
    """Warn (once per ``label``) how many records have chosen identical to rejected: legal,
    but a DPO-style loss learns nothing from such a pair."""
    import datasets
    import pyarrow.compute as pc

    if label in _REPORTED or not {"chosen", "rejected"} <= set(ds.column_names):
        return
    _REPORTED.add(label)
    plain = all(ds.features[c] == datasets.Value("string") for c in ("chosen", "rejected"))
    sub = ds.select_columns(["chosen", "rejected"]).with_format("arrow" if plain else None)
    count, first = 0, None
    for i in range(0, len(sub), 4096):
        b = sub[i:i + 4096]
        same = pc.fill_null(pc.equal(b["chosen"], b["rejected"]), False).to_pylist() if plain \
            else [c is not None and c == r for c, r in zip(b["chosen"], b["rejected"])]
        if first is None and any(same):
            first = i + same.index(True)
        count += sum(same)
    if count:
        where = sources[first] if len(sources) == len(ds) else f"row {first}"
        log.warning("%s: %d record%s chosen identical to rejected (first: %s); kept, though a "
                    "DPO-style loss learns nothing from such a pair", label, count,
                    " has" if count == 1 else "s have", where)


def load_preference_dataset(path_or_dir, split: str | None = None, *,
                            check_records: bool = True, source_prefix: str | None = None,
                            held_out: bool = False):
    """Load preference records as a ``datasets.Dataset``, in the files' order.

    path_or_dir: a ``.json``/``.jsonl``/``.parquet`` file, a list of such files, a directory
    written by ``Dataset.save_to_disk``/``DatasetDict.save_to_disk``, or a directory of data
    files (``{split}.jsonl`` etc.; the Hub's ``{split}-00000-of-00002.parquet`` shards load
    together). split: which split of a DatasetDict or data directory (default: "train" if
    present, or with ``held_out`` the first of "test", "validation", "eval"; else the only
    one). Nothing is fetched from the network.

    Each file is read first (see the module docstring): an empty file, invalid JSON and bad
    UTF-8 raise a one-line ``ValueError`` naming the file and line. check_records: also check
    each record for what needs no tokenizer, the error naming the file, the line (JSON
    Lines) or record index, and the field; off (``data.skip_invalid``), invalid records load
    and ``tokenize_pairs`` drops them (one that is not a JSON object loads, with a warning,
    as a record without fields). Records whose chosen equals their rejected are legal and
    kept; a warning counts them (once per ``source_prefix`` and path in a process).

    Records without a ``prompt`` field get the prompt their chosen and rejected share
    (:mod:`tisdpo.train.prompts`): the loaded dataset has a ``prompt`` column either way.

    source_prefix: when given, add the string column ``SOURCE_COLUMN`` holding each
    record's position as these errors name it, after the prefix (``source_prefix="data.train
    "`` gives "data.train pairs.jsonl line 5 (record 4)"); ``tokenize_pairs`` then names it
    in its errors instead of the record's row, which a later split or shuffle changes.
    """
    ds, sources = _load(path_or_dir, split, check_records, source_prefix, held_out)
    ds = with_prompts(ds)
    _report_identical(ds, sources, f"{source_prefix or ''}{path_or_dir}")
    return _with_sources(ds, sources, source_prefix)


def _load(path_or_dir, split: str | None, check: bool, prefix: str | None,
          held_out: bool) -> tuple:
    """(the records, each record's position) of :func:`load_preference_dataset`."""
    import datasets

    if isinstance(path_or_dir, (list, tuple)):
        files = [str(Path(f)) for f in path_or_dir]
        for f in files:
            if not Path(f).is_file():
                raise FileNotFoundError(f"path_or_dir: no such file {f!r}")
        return _load_files(files, check, prefix)
    path = Path(path_or_dir)
    if path.is_file():
        return _load_files([str(path)], check, prefix)
    if not path.is_dir():
        raise FileNotFoundError(f"path_or_dir: no such file or directory {str(path)!r}")
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        ds = datasets.load_from_disk(str(path))
        where = str(path)
        if isinstance(ds, datasets.DatasetDict):
            name = _pick_split(ds.keys(), split, str(path), lambda n: path / n, held_out)
            ds, where = ds[name], f"{path} split {name!r}"
        elif split is not None:
            raise ValueError(f"split={split!r} given but {str(path)!r} holds a single Dataset")
        _check_dataset(where, ds, check)
        return ds, [f"{where} record {i}" for i in range(len(ds))]
    by_split = {}
    for f in sorted(path.iterdir()):
        if f.is_file() and f.suffix.lower() in DATA_EXTS:
            by_split.setdefault(_SHARD.sub("", f.stem), []).append(str(f))
    if not by_split:
        raise ValueError(f"path_or_dir: {str(path)!r} has no .json/.jsonl/.parquet files and "
                         "is not a save_to_disk directory")
    return _load_files(by_split[_pick_split(by_split, split, str(path),
                                            lambda n: by_split[n][0], held_out)], check, prefix)
