"""Reading JSON and JSON Lines record files line by line, before ``datasets`` does: one-line
errors naming the file and line for invalid JSON, bytes that are not UTF-8, lone surrogate
escapes and keys given twice (:mod:`tisdpo.train.records` checks the records themselves)."""
from __future__ import annotations

import json
import re
from pathlib import Path

__all__ = ["scan_json", "objects_only"]

_BOM = b"\xef\xbb\xbf"
# a JSON \u escape of a UTF-16 surrogate: json accepts one without its pair, pyarrow does not
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_JSON_SPACE = " \t\r\n"                 # JSON's whitespace (str.strip() takes more)


def _json_error(where: str, line: int, err: json.JSONDecodeError) -> ValueError:
    cut = err.pos >= len(err.doc.rstrip()) or err.msg.startswith("Unterminated string")
    at = "" if err.msg.endswith(" at") else " at"
    return ValueError(f"{where} line {line}: invalid JSON{', cut short' if cut else ''} "
                      f"({err.msg}{at} column {err.colno})")


def _utf8_error(where: str, line: int, err: UnicodeDecodeError) -> ValueError:
    return ValueError(f"{where} line {line}: not UTF-8 text ({err.reason}, byte "
                      f"{err.object[err.start:err.start + 1]!r})")


def _lone_surrogate(rec) -> bool:
    """Whether a decoded record holds a lone UTF-16 surrogate (not text: pyarrow refuses it)."""
    if isinstance(rec, str):
        try:
            rec.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(rec, dict):
        return any(_lone_surrogate(k) or _lone_surrogate(v) for k, v in rec.items())
    return isinstance(rec, list) and any(_lone_surrogate(v) for v in rec)


def _check_text(where: str, at: str, escapes: bool, rec) -> None:
    """``escapes``: whether the record's bytes (or its file's) hold a surrogate escape."""
    if escapes and _lone_surrogate(rec):
        raise ValueError(f"{where} {at}: a \\u escape of a lone UTF-16 surrogate "
                         f"(\\ud800-\\udfff without its pair), which is not text")


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
    escapes = _SURROGATE_ESCAPE.search(data) is not None    # once: per record, O(file) each
    for rec, at in zip(records, ats):
        _check_text(where, at, escapes, rec)
        check(rec, at)
    return ats


class _RepeatedKey(Exception):
    pass


def _unique_keys(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) < len(keys):
        raise _RepeatedKey(next(k for k in keys if keys.count(k) > 1))
    return dict(pairs)


def _scan_json_lines(where: str, fh, check) -> tuple[list[str], ValueError | None]:
    """(each record's position, None) of a JSON Lines file; ([], the error) when its first
    record is not valid JSON on one line (the file may instead be one multi-line JSON
    document)."""
    ats = []
    for line_no, raw in enumerate(fh, start=1):
        if line_no == 1:
            raw = raw.removeprefix(_BOM)
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise _utf8_error(where, line_no, err) from None
        if not line.strip(_JSON_SPACE):
            continue
        if not line.strip():
            odd = next(c for c in line if c not in _JSON_SPACE)
            raise ValueError(f"{where} line {line_no}: a blank line holding {odd!r}, which "
                             f"JSON does not take as whitespace (only space, tab, CR, LF)")
        at = f"line {line_no} (record {len(ats)})"
        try:
            rec = json.loads(line, object_pairs_hook=_unique_keys)
        except json.JSONDecodeError as err:
            if not ats:
                return [], _json_error(where, line_no, err)
            raise _json_error(where, line_no, err) from None
        except _RepeatedKey as err:      # Python keeps the last, datasets' reader refuses it
            raise ValueError(f"{where} {at}: key {err.args[0]!r} given twice") from None
        _check_text(where, at, _SURROGATE_ESCAPE.search(raw) is not None, rec)
        check(rec, at)
        ats.append(at)
    return ats, None


def _is_array(path: str) -> bool:
    """A JSON file holding one array of records (a .jsonl file is always read as lines)."""
    if path.lower().endswith(".jsonl"):
        return False
    with open(path, "rb") as fh:
        return fh.read(4096).removeprefix(_BOM).lstrip().startswith(b"[")


def scan_json(path: str, checker, check: bool) -> tuple[list[str], list[tuple[str, str]]]:
    """(each record's position in the JSON file ``path``, each record given to
    ``checker(rec, position)``; with ``check`` off, also the (position, type) of those that
    are not JSON objects, which ``checker`` then collects)."""
    with open(path, "rb") as fh:
        if _is_array(path):
            ats, first = _scan_json_array(path, fh.read().removeprefix(_BOM), checker), None
        else:
            ats, first = _scan_json_lines(path, fh, checker)
    if first is not None:
        # one multi-line JSON object (datasets reads it as one record), else the first
        # line's error
        data = Path(path).read_bytes()
        try:
            doc = json.loads(data.decode("utf-8-sig"))
        except ValueError:                      # JSONDecodeError, UnicodeDecodeError
            doc = None
        if not isinstance(doc, dict):
            raise first
        _check_text(path, "record 0", _SURROGATE_ESCAPE.search(data) is not None, doc)
        checker(doc, "record 0")
        return ["record 0"], []
    if not ats:
        raise ValueError(f"{path}: no records (an empty file)")
    odd = [] if check else list(checker)
    if len(odd) == len(ats):
        raise ValueError(f"{path}: no JSON object among its records ({odd[0][0]}: {odd[0][1]})")
    return ats, odd


def objects_only(src: str, dst: str) -> str:
    """``dst``: the JSON or JSON Lines file ``src`` as JSON Lines, each record that is not a
    JSON object replaced by ``{}`` (a record with no field, in its place)."""
    with open(src, "rb") as fh, open(dst, "wb") as out:
        if _is_array(src):
            for rec in json.loads(fh.read().decode("utf-8-sig")):
                out.write(json.dumps(rec if isinstance(rec, dict) else {}).encode() + b"\n")
        else:
            for raw in fh:
                keep = not raw.strip() or isinstance(json.loads(raw), dict)
                out.write(raw if keep else b"{}\n")
    return dst
