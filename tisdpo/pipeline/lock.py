"""One process per run directory: an exclusive lock on ``<run_dir>/.lock``.

``with run_lock(run_dir):`` holds an advisory ``flock`` for the block (every ``tisdpo``
command but ``inspect`` runs inside one). The operating system drops the lock when the
process ends, however it ends, so a killed run leaves no stale lock. The file holds the
holder's pid, which a refused second process names. Under torchrun the rank-0 process holds
it for the job. Nested blocks on the same directory in one process share the lock.
"""
from __future__ import annotations

import contextlib
import os

from tisdpo.train.parallel import torchrun_env

__all__ = ["RunLocked", "run_lock"]

_HELD: dict[str, list] = {}        # lock path -> [open file holding the lock, depth]


class RunLocked(RuntimeError):
    """Another process is using the run directory."""


def _acquire(run_dir: str, path: str):
    import fcntl

    fh = open(path, "a+", encoding="utf-8")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "unknown"
        fh.close()
        raise RunLocked(f"run_dir {run_dir} is in use by process {holder} (lock {path}); wait "
                        f"for it to finish or use another --run_dir") from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"{os.getpid()}\n")
    fh.flush()
    return fh


@contextlib.contextmanager
def run_lock(run_dir: str):
    """Hold ``run_dir``'s lock for the block; RunLocked when another process has it."""
    try:
        import fcntl  # noqa: F401
    except ImportError:                  # no flock on this platform: nothing to enforce
        yield
        return
    if (torchrun_env() or (0,))[0] != 0:
        yield
        return
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.realpath(os.path.join(run_dir, ".lock"))
    if path in _HELD:
        _HELD[path][1] += 1
    else:
        _HELD[path] = [_acquire(run_dir, path), 1]
    try:
        yield
    finally:
        _HELD[path][1] -= 1
        if _HELD[path][1] == 0:
            _HELD.pop(path)[0].close()      # closing the file releases the flock
