"""The TensorBoard side of a stage's metric log: a fresh start leaves no events of an earlier
run; a resumed one purges the events after its checkpoint's step, as metrics.jsonl is cut
back (the redone steps are logged again)."""
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
    assert old.exists() and resumed.tb.purge_step == 5
    assert resumed.tb.log_dir == str(tmp_path / "tensorboard")
    fresh = MetricSink(str(tmp_path), True, None)
    assert not old.exists() and fresh.tb.purge_step is None
    off = MetricSink(str(tmp_path), False, None)
    assert off.tb is None and len(_Writer.made) == 2
