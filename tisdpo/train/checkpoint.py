"""Checkpoint files: the stage's done-marker, the resumable checkpoints and their crash-safe
writing, the RNG states a resumed run continues from, and the conversion between a single
process's optimiser state and the FQN-keyed one that distributed state dicts use (so one
``state.pt`` layout serves any number of processes).

A checkpoint is ``<out_dir>/checkpoints/step-NNNNNNN/state.pt``. It is written into
``step-NNNNNNN.tmp`` and renamed when complete, so a process killed while writing leaves only a
``.tmp`` folder, which readers ignore and the next run removes; a step written again has its
state.pt replaced in one rename, so a finished checkpoint is never deleted first. A checkpoint
that cannot be read (truncated, corrupt) is reported by path and the next older one is used
instead.
"""
from __future__ import annotations

import errno
import json
import math
import os
import random
import re
import shutil
import zipfile

import numpy as np
import torch

__all__ = ["DONE_FILE", "CorruptCheckpoint", "checkpoints", "latest_checkpoint",
           "remove_checkpoints", "remove_partial", "write_state", "read_state", "stage_done",
           "read_done", "read_json", "write_json", "rng_state", "restore_rng_state",
           "optimizer_state_to_indices", "optimizer_state_to_fqns", "fqns_by_group"]

DONE_FILE = "done.json"
STATE_FILE = "state.pt"
_FINISHED = re.compile(r"step-(\d+)$")


class CorruptCheckpoint(Exception):
    """A checkpoint file that exists but cannot be read."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"checkpoint {path} is unreadable ({reason})")
        self.path, self.reason = path, reason


def checkpoints(out_dir: str) -> list[str]:
    """The finished checkpoints of a stage (folders holding a state.pt), newest first; the
    ``.tmp`` folders of interrupted writes are not checkpoints."""
    root = os.path.join(out_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    found = []
    for d in os.listdir(root):
        m = _FINISHED.match(d)
        if m and os.path.isfile(os.path.join(root, d, STATE_FILE)):
            found.append((int(m.group(1)), os.path.join(root, d)))
    return [path for _, path in sorted(found, reverse=True)]


def latest_checkpoint(out_dir: str) -> str | None:
    found = checkpoints(out_dir)
    return found[0] if found else None


def remove_checkpoints(out_dir: str) -> None:
    """Remove every checkpoint of a stage (finished or not): a stage that starts over."""
    shutil.rmtree(os.path.join(out_dir, "checkpoints"), ignore_errors=True)


def remove_partial(out_dir: str) -> list[str]:
    """Remove the ``.tmp`` leftovers of interrupted checkpoint writes; returns what it removed."""
    root = os.path.join(out_dir, "checkpoints")
    gone = []
    if os.path.isdir(root):
        for d in os.listdir(root):
            if d.startswith("step-") and d.endswith(".tmp"):
                shutil.rmtree(os.path.join(root, d), ignore_errors=True)
                gone.append(os.path.join(root, d))
    return gone


def _disk_full(err: BaseException, folder: str) -> bool:
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return True
    # torch's zip writer reports a short write as "unexpected pos ..."
    if "unexpected pos" in str(err):
        return True
    try:
        return shutil.disk_usage(folder).free == 0
    except OSError:
        return False


def write_state(final: str, state: dict) -> None:
    """Write ``state`` to ``final``/state.pt atomically: into ``final``.tmp, flushed to disk,
    then renamed (the folder, or over an existing ``final``'s state.pt the file). A full disk
    becomes one OSError naming the folder; the .tmp is removed and the older checkpoints stay
    as they were."""
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        path = os.path.join(tmp, STATE_FILE)
        with open(path, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
    except (OSError, RuntimeError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        folder = os.path.dirname(final)
        if _disk_full(err, folder):
            raise OSError(errno.ENOSPC, f"no space left on {folder}: writing the checkpoint "
                          f"{os.path.basename(final)} failed (the earlier checkpoints and "
                          f"stages are intact)") from err
        raise
    if os.path.isdir(final):
        # the same step written again: the file is replaced in one rename, so the folder
        # holds the old or the new state.pt at every moment, never neither
        os.replace(path, os.path.join(final, STATE_FILE))
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, final)


def _check_crcs(path: str) -> None:
    """CorruptCheckpoint when a member of the zip archive torch.save writes fails its CRC:
    torch.load does not check them, so damaged bytes inside a tensor would load silently.
    Reads the file once (at a resume, not at each step)."""
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise CorruptCheckpoint(path, f"{type(err).__name__}: {err}"[:200]) from err
    if bad is not None:
        raise CorruptCheckpoint(path, f"{bad} fails its CRC check (damaged bytes)")


def read_state(folder: str, *, mmap: bool = False) -> dict:
    """The state of checkpoint ``folder``; CorruptCheckpoint when the file cannot be read."""
    path = os.path.join(folder, STATE_FILE)
    _check_crcs(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as err:   # a truncated zip, random bytes, an empty file: anything
        first = str(err).splitlines()[0][:160] if str(err) else ""
        raise CorruptCheckpoint(path, f"{type(err).__name__}: {first}" if first
                                else type(err).__name__) from err
    if not isinstance(state, dict) or not {"model", "optimizer", "state"} <= set(state):
        raise CorruptCheckpoint(path, "not a tisdpo checkpoint")
    return state


def stage_done(out_dir: str) -> bool:
    return os.path.isfile(os.path.join(out_dir, DONE_FILE))


def read_done(out_dir: str) -> dict:
    return read_json(os.path.join(out_dir, DONE_FILE))


def read_json(path: str):
    """The JSON document at ``path``; a damaged one is a ValueError naming the file."""
    with open(path, encoding="utf-8") as fh:
        try:
            return json.load(fh)
        except ValueError as err:               # JSONDecodeError, UnicodeDecodeError
            raise ValueError(f"{path}: not a readable JSON file ({err}); delete its stage's "
                             f"folder to redo that stage") from None


def write_json(path: str, doc, *, indent: int = 2, sort_keys: bool = False) -> None:
    """``doc`` as JSON at ``path``, written beside it and renamed into place when complete: a
    killed writer leaves the old file or none, never half of one."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=indent, sort_keys=sort_keys)
    os.replace(tmp, path)


def jsonable(x):
    """``x`` with every non-finite float None (strict JSON: no NaN, no Infinity)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return x


def rng_state() -> dict:
    """Every RNG a resumed run must continue from: torch (CPU, CUDA), python, numpy."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        # one state per GPU the saving process saw: a host that shows fewer GPUs (another
        # node, a narrower CUDA_VISIBLE_DEVICES) takes those it has, instead of an IndexError
        for i, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, i)
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def optimizer_state_to_indices(osd: dict) -> dict:
    """FQN-keyed optimiser state (get_optimizer_state_dict) → ``optimizer.state_dict()`` layout.

    Parameters are numbered in param-group order, as torch numbers them.
    """
    index, groups = {}, []
    for g in osd["param_groups"]:
        ids = []
        for fqn in g["params"]:
            index.setdefault(fqn, len(index))
            ids.append(index[fqn])
        groups.append({**g, "params": ids})
    return {"state": {index[k]: v for k, v in osd["state"].items()}, "param_groups": groups}


def optimizer_state_to_fqns(sd: dict, fqns_by_group: list[list[str]]) -> dict:
    """The inverse: an ``optimizer.state_dict()`` → FQN-keyed, with the live groups' FQNs."""
    groups = sd["param_groups"]
    if len(groups) != len(fqns_by_group) or any(
            len(g["params"]) != len(f) for g, f in zip(groups, fqns_by_group)):
        raise ValueError(f"checkpoint optimiser has parameter groups of sizes "
                         f"{[len(g['params']) for g in groups]}, this model "
                         f"{[len(f) for f in fqns_by_group]}: not the same model")
    name = {i: f for g, fs in zip(groups, fqns_by_group) for i, f in zip(g["params"], fs)}
    return {"state": {name[i]: v for i, v in sd["state"].items()},
            "param_groups": [{**g, "params": fs} for g, fs in zip(groups, fqns_by_group)]}


def fqns_by_group(model, optimizer) -> list[list[str]]:
    """The parameter FQNs of each of ``optimizer``'s groups (tied parameters: the first name)."""
    names = {}
    for fqn, p in model.named_parameters():
        names.setdefault(id(p), fqn)
    return [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
