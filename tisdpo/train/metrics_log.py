"""A stage's metric log: ``metrics.jsonl`` (one JSON object per line), TensorBoard when
installed, and the progress bar.

On resume the log is cut back to what it held when the checkpoint was written (the rows
after it are redone by the resumed run), so an interrupted and resumed stage ends with the
same rows as an uninterrupted one. A last line left incomplete by a killed process or a full
disk is dropped with a warning; any other line that is not a JSON object is an error naming
the file and the line. The cut-back file is written beside the log and renamed over it.
"""
from __future__ import annotations

import json
import logging
import os
import shutil

__all__ = ["MetricSink", "NoSink", "progress_bar"]

log = logging.getLogger("tisdpo")


def _read_rows(path: str, desc: str) -> list[tuple[dict, str]]:
    """The rows of ``path``: (the row, its line ending in a newline)."""
    with open(path, "rb") as fh:
        lines = fh.read().split(b"\n")
    last = max((n for n, raw in enumerate(lines, 1) if raw.strip()), default=0)
    keep = []
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
            if not isinstance(row, dict):
                raise ValueError(f"a {type(row).__name__}, not an object")
        except ValueError as err:
            if n == last:                   # the last line: an append cut short
                log.warning("%s: dropped the incomplete last line %d of %s", desc, n, path)
                break
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ValueError(f"{path} line {n} is not a JSON object ({first}); delete the line "
                             f"or the file to resume") from None
        keep.append((row, raw.decode("utf-8") + "\n"))
    return keep


class MetricSink:
    """metrics.jsonl (+ TensorBoard when installed); ``rows`` counts the file's rows.

    ``resume``: None starts afresh (an old log is removed); otherwise ``(step, rows)`` of the
    checkpoint resumed from, where ``rows`` is the log's length then (None for a checkpoint
    that did not record it: the rows up to ``step`` are kept).
    """

    def __init__(self, out_dir: str, tensorboard: bool,
                 resume: tuple[int, int | None] | None, desc: str = "train"):
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.rows, keep = 0, []
        if resume is not None and os.path.isfile(self.path):
            step, rows = resume
            keep = _read_rows(self.path, desc)
            keep = keep[:rows] if rows is not None else [
                (row, line) for row, line in keep if row.get("step", 0) <= step]
            tmp = self.path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.writelines(line for _, line in keep)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
            self.rows = len(keep)
        elif resume is None and os.path.isfile(self.path):
            os.remove(self.path)
        tb_dir = os.path.join(out_dir, "tensorboard")
        if resume is None:                  # afresh: no events of an earlier run
            shutil.rmtree(tb_dir, ignore_errors=True)
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                SummaryWriter = None
            if SummaryWriter is not None:
                # resumed: what was logged after the checkpoint is redone, so the writer
                # purges it (as the log above is cut back). TensorBoard purges by step, and
                # the checkpoint's own step may have more events after it (the final
                # evaluation): its step goes too, and its kept rows are logged again.
                self.tb = SummaryWriter(tb_dir, purge_step=None if resume is None
                                        else resume[0])
                for row, _ in keep:
                    if row.get("step") == resume[0]:
                        self._add(row)

    def write(self, step: int, values: dict) -> None:
        row = {"step": step, **values}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        self.rows += 1
        if self.tb is not None:
            self._add(row)

    def _add(self, row: dict) -> None:
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)):
                self.tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class NoSink:
    """The sink of a process that logs nothing (ranks other than 0)."""

    rows = 0

    def write(self, step, values): pass
    def close(self): pass


class _NoBar:
    def update(self, n): pass
    def set_postfix(self, **kw): pass
    def close(self): pass


def progress_bar(enabled: bool, total: int, initial: int, desc: str):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=False)
