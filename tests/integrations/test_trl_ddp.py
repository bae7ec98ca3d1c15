"""TISDPOTrainer under DDP: two gloo processes (CPU) against one process on the global batch.

Both run 3 optimizer steps of 2 accumulated micro-batches; each rank takes 2 pairs per
micro-batch, the single process 4 (the same pairs: accelerate shards each global batch
over the ranks). The fused head runs inside the DDP-wrapped forward, so its gradient is
all-reduced with the others: the logged loss and metrics per step and the final parameters
agree within 1e-5 relative.
"""
import faulthandler
import json
import os
import socket
import traceback

import pytest
import torch

pytest.importorskip("trl", reason="the TRL integration needs trl (pip install 'tisdpo[trl]')")

import trl_cases as C  # noqa: E402
from spawned_workers import exit_without_teardown  # noqa: E402

WORLD = 2
TIMEOUT_S = 240         # a worker still running after this dumps its stack and exits


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(out_dir, batch_size):
    from tisdpo.integrations.trl import TISDPOConfig, TISDPOTrainer

    tok = C.tokenizer()
    args = C.config(TISDPOConfig, out_dir, per_device_train_batch_size=batch_size,
                    learning_rate=1e-3)
    logs, _, final, init, trainer = C.run(TISDPOTrainer, args, tok=tok, train=C.dataset(12))
    return logs, final, init, trainer


def _worker(rank, port, root):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    hang = open(os.path.join(root, f"hang{rank}.txt"), "w")      # a stuck rank says where
    faulthandler.dump_traceback_later(TIMEOUT_S, exit=True, file=hang)
    try:
        logs, final, _, trainer = _train(os.path.join(root, f"rank{rank}"), 2)
        assert trainer.accelerator.num_processes == WORLD
        assert type(trainer.model_wrapped).__name__ == "DistributedDataParallel"
        if rank == 0:
            torch.save({"logs": logs, "final": final}, os.path.join(root, "ddp.pt"))
        trainer.accelerator.wait_for_everyone()        # both ranks done before teardown
    except Exception:                       # noqa: BLE001 - reported by the parent
        with open(os.path.join(root, f"error{rank}.txt"), "w") as fh:
            fh.write(traceback.format_exc())
        raise
    exit_without_teardown()                 # the results are on disk


def test_two_gloo_processes_equal_one_on_the_global_batch(tmp_path):
    import torch.multiprocessing as mp

    torch.set_num_threads(1)
    logs, final, init, _ = _train(tmp_path / "single", 2 * WORLD)
    try:
        mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    except Exception:
        errors = [p.read_text() for pat in ("error*.txt", "hang*.txt")
                  for p in tmp_path.glob(pat)]
        pytest.fail("DDP workers failed:\n" + "\n".join(errors))
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=False)
    assert len(ddp["logs"]) == len(logs) == 3
    for step, (a, b) in enumerate(zip(logs, ddp["logs"]), 1):
        C.assert_logs_match(a, b, beta=0.1, what=f"DDP step {step}",
                            keys=[k for k in a if k not in ("epoch", "step")])
    C.assert_params_match(final, ddp["final"], init)
    json.dumps(ddp["logs"])                 # plain numbers, as TRL logs them
