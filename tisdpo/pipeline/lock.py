"""One process per run directory: an exclusive lock on ``<run_dir>/.lock``.

``with run_lock(run_dir):`` holds an advisory ``flock`` for the block (every ``tisdpo``
command but ``inspect`` and ``compare``, which only read a run, runs inside one). The
operating system drops the lock when the process ends, however it ends, so a killed run
leaves no stale lock. The file holds the holder's pid, which a refused second process names.
Nested blocks on the same directory in one process share the lock. Several processes
(``run_lock(run_dir, par)`` with a distributed :class:`~tisdpo.train.parallel.Parallel`, its
process group made first): rank 0 holds the lock for the job and tells every rank whether it
got it, so a refused job ends on every rank at once (RunLocked everywhere; RankFailed on the
others when rank 0 failed otherwise). Under torchrun without one, only rank 0 takes it and
the others skip it.
"""
from __future__ import annotations

import contextlib
import os

from tisdpo.train.parallel import torchrun_env

__all__ = ["RankFailed", "RunLocked", "run_lock"]

_HELD: dict[str, list] = {}        # lock path -> [open file holding the lock, depth]
_FAILED = -2.0                     # rank 0's outcome when it failed other than by RunLocked


class RunLocked(RuntimeError):
    """Another process is using the run directory (``holder``: its pid, or "unknown")."""

    def __init__(self, run_dir: str, path: str, holder: str):
        super().__init__(f"run_dir {run_dir} is in use by process {holder} (lock {path}); "
                         f"wait for it to finish or use another --run_dir")
        self.holder = holder


class RankFailed(RuntimeError):
    """Another rank failed (its own error says why); this one stopped where they meet."""


def _lock_path(run_dir: str) -> str:
    return os.path.realpath(os.path.join(run_dir, ".lock"))


def _acquire(run_dir: str, path: str):
    import fcntl

    fh = open(path, "a+", encoding="utf-8")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "unknown"
        fh.close()
        raise RunLocked(run_dir, path, holder) from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"{os.getpid()}\n")
    fh.flush()
    return fh


def _enter(run_dir: str) -> str:
    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError as err:            # a file there, a read-only place: say it is run_dir
        why = "it is a file" if os.path.isfile(run_dir) else (err.strerror or str(err)).lower()
        raise ValueError(f"run_dir {run_dir}: cannot be the run folder ({why})") from None
    path = _lock_path(run_dir)
    if path in _HELD:
        _HELD[path][1] += 1
    else:
        _HELD[path] = [_acquire(run_dir, path), 1]
    return path


def _leave(path: str) -> None:
    _HELD[path][1] -= 1
    if _HELD[path][1] == 0:
        _HELD.pop(path)[0].close()      # closing the file releases the flock


def _outcome(err: BaseException) -> float:
    """Rank 0's failure as one number for the other ranks: the holder's pid, -1, or -2."""
    if isinstance(err, RunLocked):
        return float(err.holder) if err.holder.isdigit() else -1.0
    return _FAILED


def _agree(run_dir: str, par) -> str | None:
    """Rank 0 takes the lock and every rank learns the outcome (one host all-reduce)."""
    if not par.is_main:
        code = par.sum_host([0.0])[0]
        if code == _FAILED:
            raise RankFailed("another rank failed (see its error above); this rank stopped "
                             "at the run lock")
        if code:
            raise RunLocked(run_dir, _lock_path(run_dir),
                            str(int(code)) if code > 0 else "unknown")
        return None
    try:
        path = _enter(run_dir)
    except BaseException as err:
        par.sum_host([_outcome(err)])
        raise
    try:
        par.sum_host([0.0])
    except BaseException:
        _leave(path)
        raise
    return path


@contextlib.contextmanager
def run_lock(run_dir: str, par=None):
    """Hold ``run_dir``'s lock for the block; RunLocked when another process has it.

    ``par``: this process's :class:`~tisdpo.train.parallel.Parallel` when it is one rank of
    several (every rank must call this with it, the process group already made).
    """
    try:
        import fcntl  # noqa: F401
    except ImportError:                  # no flock on this platform: nothing to enforce
        yield
        return
    if par is not None and par.distributed and par.world_size > 1:
        path = _agree(run_dir, par)
    elif (torchrun_env() or (0,))[0] != 0:
        path = None
    else:
        path = _enter(run_dir)
    try:
        yield
    finally:
        if path is not None:
            _leave(path)
