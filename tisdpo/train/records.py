"""Preference records on disk → a ``datasets.Dataset``, checked before anything else sees them.

Every data file is read once by this module first (JSON with Python's ``json``, line by
line for JSON Lines; Parquet with pyarrow), so that an empty file, a truncated or invalid
JSON line or bytes that are not UTF-8 raise one line naming the file and the line, and not
an Arrow traceback from deep inside ``datasets``. With ``check_records`` every record is
also checked for what needs no tokenizer (the text fields present and of the right type,
chat messages well formed, responses not empty, per-token lists of finite numbers, one
record format per file), and the error names the file, the line as an editor shows it
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
import math
from pathlib import Path

__all__ = ["TEXT_FIELDS", "PER_TOKEN_COLUMNS", "PER_TOKEN_FIELDS", "DATA_EXTS", "SOURCE_COLUMN",
           "load_preference_dataset", "record_problem", "messages_problem"]

TEXT_FIELDS = ("prompt", "chosen", "rejected")
#: Per-token list columns, per side: (chosen column, rejected column).
PER_TOKEN_COLUMNS = {
    "weight": ("chosen_weight", "rejected_weight"),
    "ref_logps": ("ref_chosen_logps", "ref_rejected_logps"),
}
PER_TOKEN_FIELDS = tuple(c for pair in PER_TOKEN_COLUMNS.values() for c in pair)
DATA_EXTS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
#: The column ``load_preference_dataset(source_prefix=...)`` adds: each record's position in
#: its file ("data.train pairs.jsonl line 5 (record 4)"), which ``tokenize_pairs`` names in
#: its errors in place of "record N" (and drops from its output).
SOURCE_COLUMN = "_record_source"


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
    when there is none. The rules (and words) are those of ``tokenize_pairs``."""
    for f in TEXT_FIELDS:
        if rec.get(f) is None:
            return f, "missing"
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
        for k, v in enumerate(value):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                return col, f"value {k} is {v!r}, not a finite number"
    return None


class _Checker:
    """Checks the records of one file in order; remembers each text field's format."""

    def __init__(self, where: str):
        self.where, self.kinds = where, {}

    def __call__(self, rec, at: str) -> None:
        if not isinstance(rec, dict):
            raise ValueError(f"{self.where} {at}: expected a JSON object (one record), got "
                             f"{type(rec).__name__}")
        problem = record_problem(rec)
        if problem:
            raise ValueError(f"{self.where} {at}, field {problem[0]!r}: {problem[1]}")
        for f in TEXT_FIELDS:
            kind = "string" if isinstance(rec[f], str) else "chat message list"
            first, first_at = self.kinds.setdefault(f, (kind, at))
            if kind != first:
                raise ValueError(f"{self.where} {at}, field {f!r}: a {kind}, but a {first} in "
                                 f"{first_at} (one file holds plain-text or chat records, not "
                                 f"both)")


# --------------------------------------------------------------------------- file scans

def _json_error(where: str, line: int, err: json.JSONDecodeError) -> ValueError:
    cut = err.pos >= len(err.doc.rstrip()) or err.msg.startswith("Unterminated string")
    at = "" if err.msg.endswith(" at") else " at"
    return ValueError(f"{where} line {line}: invalid JSON{', cut short' if cut else ''} "
                      f"({err.msg}{at} column {err.colno})")


def _utf8_error(where: str, line: int, err: UnicodeDecodeError) -> ValueError:
    return ValueError(f"{where} line {line}: not UTF-8 text ({err.reason}, byte "
                      f"{err.object[err.start:err.start + 1]!r})")


def _scan_json_array(where: str, data: bytes, check) -> list[str]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _utf8_error(where, data.count(b"\n", 0, err.start) + 1, err) from None
    try:
        records = json.loads(text)
    except json.JSONDecodeError as err:
        raise _json_error(where, err.lineno, err) from None
    ats = [f"record {i}" for i in range(len(records))]
    if check:
        for rec, at in zip(records, ats):
            check(rec, at)
    return ats


def _scan_json_lines(where: str, fh, check) -> tuple[list[str], ValueError | None]:
    """(each record's position, None) of a JSON Lines file; ([], the error) when its first
    record is not valid JSON on one line (the file may instead be one multi-line JSON
    document)."""
    ats = []
    for line_no, raw in enumerate(fh, start=1):
        if line_no == 1:
            raw = raw.removeprefix(b"\xef\xbb\xbf")
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise _utf8_error(where, line_no, err) from None
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            if not ats:
                return [], _json_error(where, line_no, err)
            raise _json_error(where, line_no, err) from None
        at = f"line {line_no} (record {len(ats)})"
        if check:
            check(rec, at)
        ats.append(at)
    return ats, None


def _scan_json(path: str, check: bool) -> list[str]:
    """Each record's position in the JSON file ``path`` (checking them with ``check``)."""
    checker = _Checker(path) if check else None
    with open(path, "rb") as fh:
        head = fh.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()
        fh.seek(0)
        if head.startswith(b"["):
            ats, first = _scan_json_array(path, fh.read().removeprefix(b"\xef\xbb\xbf"),
                                          checker), None
        else:
            ats, first = _scan_json_lines(path, fh, checker)
    if first is not None:
        # one multi-line JSON object (datasets reads it as one record), else the first
        # line's error
        try:
            doc = json.loads(Path(path).read_bytes().decode("utf-8-sig"))
        except ValueError:                      # JSONDecodeError, UnicodeDecodeError
            doc = None
        if not isinstance(doc, dict):
            raise first
        if checker:
            checker(doc, "record 0")
        return ["record 0"]
    if not ats:
        raise ValueError(f"{path}: no records (an empty file)")
    return ats


def _scan_parquet(path: str, check: bool) -> list[str]:
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
            batch_size=1024, columns=_present(pf.schema_arrow.names))))
    return [f"record {i}" for i in range(pf.metadata.num_rows)]


def _present(names) -> list[str]:
    return [c for c in TEXT_FIELDS + PER_TOKEN_FIELDS if c in names]


def _check_batches(where: str, batches) -> None:
    checker, i = _Checker(where), 0
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

def _pick_split(available, split, where):
    available = list(available)
    if split is not None:
        if split not in available:
            raise ValueError(f"split={split!r} not found in {where}; available splits: "
                             f"{available}")
        return split
    if "train" in available:
        return "train"
    if len(available) == 1:
        return available[0]
    raise ValueError(f"{where} has splits {available}: pass split=")


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


def _load_files(files: list[str], check: bool, prefix: str | None):
    import datasets

    kinds = {DATA_EXTS.get(Path(f).suffix.lower()) for f in files}
    if None in kinds or len(kinds) != 1:
        raise ValueError(f"path_or_dir: expected .json, .jsonl or .parquet files of one kind, "
                         f"got {[str(f) for f in files]}")
    kind = kinds.pop()
    sources = []
    for f in files:
        sources += [f"{f} {at}" for at in (_scan_json if kind == "json" else _scan_parquet)(
            f, check)]
    ds = datasets.load_dataset(kind, data_files=files, split="train")
    return _with_sources(ds, sources, prefix)


def load_preference_dataset(path_or_dir, split: str | None = None, *,
                            check_records: bool = True, source_prefix: str | None = None):
    """Load preference records as a ``datasets.Dataset``, in the files' order.

    path_or_dir: a ``.json``/``.jsonl``/``.parquet`` file, a list of such files, a directory
    written by ``Dataset.save_to_disk``/``DatasetDict.save_to_disk``, or a directory of data
    files (``{split}.jsonl`` etc.). split: which split of a DatasetDict or data directory
    (default: "train" if present, else the only one). Nothing is fetched from the network.

    Each file is read first (see the module docstring): an empty file, invalid JSON and bad
    UTF-8 raise a one-line ``ValueError`` naming the file and line. check_records: also check
    each record for what needs no tokenizer, the error naming the file, the line (JSON
    Lines) or record index, and the field; off (``data.skip_invalid``), invalid records load
    and ``tokenize_pairs`` drops them.

    source_prefix: when given, add the string column ``SOURCE_COLUMN`` holding each
    record's position as these errors name it, after the prefix (``source_prefix="data.train
    "`` gives "data.train pairs.jsonl line 5 (record 4)"); ``tokenize_pairs`` then names it
    in its errors instead of the record's row, which a later split or shuffle changes.
    """
    import datasets

    if isinstance(path_or_dir, (list, tuple)):
        files = [str(Path(f)) for f in path_or_dir]
        for f in files:
            if not Path(f).is_file():
                raise FileNotFoundError(f"path_or_dir: no such file {f!r}")
        return _load_files(files, check_records, source_prefix)
    path = Path(path_or_dir)
    if path.is_file():
        return _load_files([str(path)], check_records, source_prefix)
    if not path.is_dir():
        raise FileNotFoundError(f"path_or_dir: no such file or directory {str(path)!r}")
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        ds = datasets.load_from_disk(str(path))
        where = str(path)
        if isinstance(ds, datasets.DatasetDict):
            name = _pick_split(ds.keys(), split, str(path))
            ds, where = ds[name], f"{path} split {name!r}"
        elif split is not None:
            raise ValueError(f"split={split!r} given but {str(path)!r} holds a single Dataset")
        _check_dataset(where, ds, check_records)
        return _with_sources(ds, [f"{where} record {i}" for i in range(len(ds))],
                             source_prefix)
    by_split = {}
    for f in sorted(path.iterdir()):
        if f.is_file() and f.suffix.lower() in DATA_EXTS:
            by_split.setdefault(f.stem, []).append(str(f))
    if not by_split:
        raise ValueError(f"path_or_dir: {str(path)!r} has no .json/.jsonl/.parquet files and "
                         "is not a save_to_disk directory")
    return _load_files(by_split[_pick_split(by_split, split, str(path))], check_records,
                       source_prefix)
