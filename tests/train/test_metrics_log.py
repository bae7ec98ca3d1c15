"""The TensorBoard side of a stage's metric log: a fresh start leaves no events of an earlier
run; a resumed one purges the events from its checkpoint's step on, as metrics.jsonl is cut
back, and logs that step's kept rows again (the redone steps are logged again)."""
import json
import sys
import types

from tisdpo.train.metrics_log import MetricSink


class _Writer:
    made = []

    def __init__(self, log_dir, purge_step=None):
        self.log_dir, self.purge_step = log_dir, purge_step
        _Writer.made.append(self)

    def add_scalar(self, *a):
        pass

    def close(self):
        pass


def test_tensorboard_afresh_and_resumed(tmp_path, monkeypatch):
    _Writer.made.clear()
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard",
                        types.SimpleNamespace(SummaryWriter=_Writer))
    old = tmp_path / "tensorboard" / "events.out.tfevents.old"
    old.parent.mkdir()
    old.write_bytes(b"an earlier run's events")
    resumed = MetricSink(str(tmp_path), True, (4, None))
    assert old.exists() and resumed.tb.purge_step == 4
    assert resumed.tb.log_dir == str(tmp_path / "tensorboard")
    fresh = MetricSink(str(tmp_path), True, None)
    assert not old.exists() and fresh.tb.purge_step is None
    off = MetricSink(str(tmp_path), False, None)
    assert off.tb is None and len(_Writer.made) == 2


class _Events:
    """TensorBoard as far as a resume sees it: events by (tag, step) in one folder, across
    writers; a writer made with ``purge_step`` discards the events from that step on."""
    store: list = []

    def __init__(self, log_dir, purge_step=None):
        if purge_step is not None:
            _Events.store = [e for e in _Events.store if e[2] < purge_step]

    def add_scalar(self, tag, value, step):
        _Events.store.append((tag, value, step))

    def close(self):
        pass


def test_a_stage_killed_after_its_last_checkpoint_logs_each_event_once(tmp_path, monkeypatch):
    """The last checkpoint is written before the final evaluation, at the same step: a kill
    in between (during the final save, say) and a resume must not log that evaluation twice,
    nor lose the step's training row."""
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard",
                        types.SimpleNamespace(SummaryWriter=_Events))

    def run(sink, steps):
        for step in steps:
            sink.write(step, {"loss": 1.0 / step})
    for name in ("full", "cut"):
        (tmp_path / name).mkdir()
    _Events.store = []
    full = MetricSink(str(tmp_path / "full"), True, None)
    run(full, range(1, 4))
    full.write(3, {"eval/loss": 0.5})
    uninterrupted = sorted(_Events.store)

    _Events.store = []
    killed = MetricSink(str(tmp_path / "cut"), True, None)
    run(killed, range(1, 4))
    rows_at_checkpoint = killed.rows               # checkpoint of step 3, then the final eval
    killed.write(3, {"eval/loss": 0.5})            # ... and the kill before done.json
    resumed = MetricSink(str(tmp_path / "cut"), True, (3, rows_at_checkpoint))
    resumed.write(3, {"eval/loss": 0.5})           # the resumed stage redoes the evaluation
    assert sorted(_Events.store) == uninterrupted
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == [
        json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
