"""Faults during training: leftovers of interrupted writes, corrupt checkpoints, a full disk,
a diverging loss and SIGTERM/SIGINT. Each either resumes to the same bits as an uninterrupted
run or stops with a message that names the file, the folder or the step."""
import errno
import logging
import os
import signal
import struct
import subprocess
import sys
import zipfile

import pytest
import torch

from trainer_cases import Poisoned, model, pref_objective, records, trainer
from tisdpo.train import checkpoint
from tisdpo.train.checkpoint import checkpoints, stage_done, write_state
from tisdpo.train.parallel import Parallel
from tisdpo.train.trainer import TrainingDiverged


DATA = records(16)          # 6 steps in 2 epochs with the trainer_cases defaults


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Parameters after the full 6 steps (one thread, as every test here)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t = trainer(model(), pref_objective(), DATA, tmp_path_factory.mktemp("full"))
        t.train()
    finally:
        torch.set_num_threads(n)
    return {k: v.detach().clone() for k, v in t.model.named_parameters()}


def _assert_same(params, m):
    for name, p in m.named_parameters():
        assert torch.equal(params[name], p), f"{name} differs from the uninterrupted run"


def _stopped_run(out, **cfg):
    t = trainer(model(), pref_objective(), DATA, out, **cfg)
    assert t.train()["stopped"]
    return t


def _resume(out):
    m = model(seed=99)                   # another init: everything must come from disk
    t = trainer(m, pref_objective(), DATA, out)
    t.train()
    assert stage_done(str(out)) and t.state.step == 6
    return m


def test_leftover_tmp_folder_is_ignored_and_removed(tmp_path, uninterrupted, caplog):
    _stopped_run(tmp_path, stop_after=4)
    ckpts = tmp_path / "checkpoints"
    for name in ("step-0000005.tmp", "step-0000010.tmp"):       # newer than the real one
        (ckpts / name).mkdir()
        (ckpts / name / "state.pt").write_bytes(b"half a checkpoint")
    assert [os.path.basename(c) for c in checkpoints(str(tmp_path))] == ["step-0000004"]
    with caplog.at_level(logging.WARNING, logger="tisdpo"):
        resumed = _resume(tmp_path)
    _assert_same(uninterrupted, resumed)
    assert not any(n.endswith(".tmp") for n in os.listdir(ckpts))
    assert "step-0000010.tmp" in caplog.text


def _flip_tensor_bytes(path: str) -> None:
    """Flip a byte inside the largest tensor's stored bytes (past its local zip header)."""
    with zipfile.ZipFile(path) as zf:
        info = max((i for i in zf.infolist() if "/data/" in i.filename),
                   key=lambda i: i.file_size)
    with open(path, "r+b") as fh:
        fh.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", fh.read(4))
        at = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
        fh.seek(at)
        byte = fh.read(1)
        fh.seek(at)
        fh.write(bytes([byte[0] ^ 0x40]))


@pytest.mark.parametrize("damage", ["truncated", "random", "empty", "not_a_checkpoint",
                                    "flipped"])
def test_corrupt_newest_checkpoint_falls_back_to_the_older(tmp_path, uninterrupted, caplog,
                                                            damage):
    _stopped_run(tmp_path, stop_after=4, save_every=1, keep_checkpoints=2)
    newest, older = checkpoints(str(tmp_path))
    assert newest.endswith("step-0000004") and older.endswith("step-0000003")
    state = os.path.join(newest, "state.pt")
    blob = open(state, "rb").read()
    if damage == "truncated":
        open(state, "wb").write(blob[: len(blob) // 2])
    elif damage == "random":
        open(state, "wb").write(os.urandom(len(blob)))
    elif damage == "empty":
        open(state, "wb").close()
    elif damage == "flipped":           # torch.load reads it; only the CRC tells
        _flip_tensor_bytes(state)
    else:
        torch.save({"weights": torch.zeros(3)}, state)
    with caplog.at_level(logging.WARNING, logger="tisdpo"):
        resumed = _resume(tmp_path)
    _assert_same(uninterrupted, resumed)
    assert state in caplog.text and "unreadable" in caplog.text


def test_every_checkpoint_corrupt_starts_afresh_and_says_so(tmp_path, uninterrupted, caplog):
    _stopped_run(tmp_path, stop_after=2)
    (only,) = checkpoints(str(tmp_path))
    open(os.path.join(only, "state.pt"), "wb").write(b"\0" * 100)
    fresh = trainer(model(), pref_objective(), DATA, tmp_path)
    with caplog.at_level(logging.WARNING, logger="tisdpo"):
        fresh.train()
    _assert_same(uninterrupted, fresh.model)     # from step 0: the same run
    assert "unreadable" in caplog.text and not os.path.isdir(only)
    assert os.path.isdir(only + ".corrupt")                     # kept for a look, not reused


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"),
                                     RuntimeError("[enforce fail at inline_container.cc:664] "
                                                  ". unexpected pos 192896 vs 192848")])
def test_full_disk_names_the_folder_and_keeps_older_checkpoints(tmp_path, monkeypatch,
                                                                 failure):
    _stopped_run(tmp_path, stop_after=2)
    before = checkpoints(str(tmp_path))
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        real_save(obj, f, *a, **k)               # a partial file is left behind...
        raise failure                            # ...then the write fails

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    t = trainer(model(), pref_objective(), DATA, tmp_path, stop_after=4)
    with pytest.raises(OSError, match="no space left on .*checkpoints") as info:
        t.train()
    assert info.value.errno == errno.ENOSPC and "\n" not in str(info.value)
    assert checkpoints(str(tmp_path)) == before
    assert not any(n.endswith(".tmp") for n in os.listdir(tmp_path / "checkpoints"))


def test_kill_during_checkpoint_write_leaves_only_a_tmp_folder(tmp_path):
    """A process killed (SIGKILL) in the middle of writing: no finished checkpoint appears."""
    code = (
        "import os, signal, torch\n"
        "from tisdpo.train import checkpoint\n"
        "real = torch.save\n"
        "def dying(obj, f, *a, **k):\n"
        "    f.write(b'PK partial'); f.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
        "checkpoint.torch.save = dying\n"
        f"checkpoint.write_state({str(tmp_path / 'checkpoints' / 'step-0000003')!r},"
        " {'model': {}, 'optimizer': {}, 'state': {}})\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert os.listdir(tmp_path / "checkpoints") == ["step-0000003.tmp"]
    assert checkpoints(str(tmp_path)) == []


def test_write_state_replaces_and_reads_back(tmp_path):
    final = str(tmp_path / "checkpoints" / "step-0000001")
    write_state(final, {"model": {"w": torch.arange(3)}, "optimizer": {}, "state": {}})
    write_state(final, {"model": {"w": torch.arange(4)}, "optimizer": {}, "state": {}})
    assert torch.equal(checkpoint.read_state(final)["model"]["w"], torch.arange(4))
    assert os.listdir(tmp_path / "checkpoints") == ["step-0000001"]


def test_non_finite_loss_stops_before_the_update_and_is_not_done(tmp_path):
    # grad_accum 2: calls 5 and 6 form step 3; the poisoned gradient never reaches the weights
    t = trainer(model(), Poisoned(pref_objective(), at=5), DATA, tmp_path, save_every=1)
    with pytest.raises(TrainingDiverged, match="non-finite at step 3") as info:
        t.train()
    assert "\n" not in str(info.value)
    assert t.state.step == 2 and not stage_done(str(tmp_path))
    assert all(torch.isfinite(p).all() for p in t.model.parameters())
    assert os.path.basename(checkpoints(str(tmp_path))[0]) == "step-0000002"


def test_huge_learning_rate_diverges_loudly(tmp_path):
    t = trainer(model(), pref_objective(), DATA, tmp_path, lr=1e30, max_grad_norm=None,
                epochs=20.0)
    with pytest.raises(TrainingDiverged, match="non-finite at step"):
        t.train()
    assert not stage_done(str(tmp_path))


@pytest.mark.parametrize("at,save_every", [(3, 1), (6, 0)], ids=["mid-run", "last-step"])
def test_an_update_that_leaves_a_weight_non_finite_is_never_saved(tmp_path, at, save_every):
    """A finite loss and gradient whose update overflows a weight (a huge lr, say): the
    stage stops at that step's checkpoint, which is not written, and is not marked done."""
    t = trainer(model(), pref_objective(), DATA, tmp_path, save_every=save_every)

    def overflow(optimizer, args, kwargs):
        if t.state.step + 1 == at:          # after the update of step ``at``
            with torch.no_grad():
                next(t.model.parameters())[0] = float("inf")
    t.optimizer.register_step_post_hook(overflow)
    with pytest.raises(TrainingDiverged, match=rf"the update of step {at} left 1 weight "
                                               r"tensor\(s\) non-finite; stopped before") as e:
        t.train()
    assert "\n" not in str(e.value) and not stage_done(str(tmp_path))
    assert [os.path.basename(c) for c in checkpoints(str(tmp_path))][:1] == \
        ([f"step-{at - 1:07d}"] if save_every else [])


class _TwoReplicas(Parallel):
    """A single process standing for 2 DDP ranks: each holds the same weights, so a host
    sum over ranks doubles every value."""

    def sum_host(self, values):
        return [2 * v for v in values]


def test_a_non_finite_weight_is_counted_once_however_many_ranks_hold_it(tmp_path):
    t = trainer(model(), pref_objective(), DATA, tmp_path)
    t.par = _TwoReplicas()
    with torch.no_grad():
        next(t.model.parameters())[0] = float("nan")
    with pytest.raises(TrainingDiverged, match=r"left 1 weight tensor\(s\) non-finite"):
        t._check_weights()


def test_a_checkpoint_of_another_optimizer_layout_is_refused_in_one_line(tmp_path):
    """A checkpoint whose optimizer has one parameter group (no weight decay, or written
    before biases and norms were left out of it) resumed by a run with weight decay: one
    line naming the checkpoint and the way out, not torch's message."""
    _stopped_run(tmp_path, weight_decay=0.0, stop_after=2)
    t = trainer(model(), pref_objective(), DATA, tmp_path, weight_decay=0.01)
    with pytest.raises(ValueError, match=r"^test: checkpoint .*step-0000002 holds 1 optimizer "
                                         r"parameter group\(s\) but this run's optimizer has 2 "
                                         r".* with --pipeline.resume false$") as err:
        t.train()
    assert "\n" not in str(err.value)


class _Signalling:
    """The objective, sending ``sig`` to this process during call ``at``."""

    def __init__(self, inner, at, sig):
        self.inner, self.at, self.sig, self.calls = inner, at, sig, 0

    def count(self, batch):
        return self.inner.count(batch)

    def __call__(self, model, batch, *, normalizer):
        self.calls += 1
        if self.calls == self.at:
            os.kill(os.getpid(), self.sig)
        return self.inner(model, batch, normalizer=normalizer)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_checkpoints_after_the_step_then_resumes_exactly(tmp_path, uninterrupted, sig):
    before = signal.getsignal(sig)
    t = trainer(model(), _Signalling(pref_objective(), at=5, sig=sig), DATA, tmp_path)
    out = t.train()                                   # the signal arrives inside step 3
    assert out == {"stopped": True, "step": 3, "signal": signal.Signals(sig).name}
    assert signal.getsignal(sig) is before            # the handlers are restored
    assert not stage_done(str(tmp_path))
    assert os.path.basename(checkpoints(str(tmp_path))[0]) == "step-0000003"
    _assert_same(uninterrupted, _resume(tmp_path))


def test_cuda_rng_states_of_more_gpus_than_this_host_shows(monkeypatch):
    """A checkpoint holds one CUDA RNG state per GPU its writer saw; resuming where fewer are
    visible restores those (torch's set_rng_state_all raised IndexError)."""
    state = checkpoint.rng_state()
    state["cuda"] = [torch.tensor([k], dtype=torch.uint8) for k in range(4)]   # 4 GPUs saw it
    seen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, i: seen.append((int(s[0]), i)))
    checkpoint.restore_rng_state(state)
    assert seen == [(0, 0), (1, 1)]
