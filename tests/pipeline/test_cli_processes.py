"""`tisdpo` run as 2 gloo processes launched by hand (RANK/WORLD_SIZE/MASTER_* as srun sets
them): startup on a fresh run_dir, a refused run lock, one rank's error.

Each rank is a fresh `python` running cli.main with the stage itself replaced by a few
collectives (the real stages are covered by tests/train/test_distributed.py), under a hard
timeout so that a hang fails the test instead of blocking it.
"""
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from tisdpo.pipeline.lock import run_lock

LIMIT = 30                  # seconds a spawned rank may take (about 5 when nothing hangs)

# argv[1]: what the stage does on this rank; argv[2]: seconds to wait before main();
# the rest: tisdpo's command line. os._exit skips interpreter teardown (see spawned_workers)
WORKER = textwrap.dedent("""
    import os, sys, time
    import torch
    from tisdpo import cli
    from tisdpo.train.parallel import setup

    torch.set_num_threads(1)
    job, delay, argv = sys.argv[1], float(sys.argv[2]), sys.argv[3:]

    def stage(args, cfg):
        par = setup(cfg.distributed, "cpu")            # as make_context does
        par.barrier()
        if job.startswith("ddp_"):                     # both ranks wrap a model in DDP
            net = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 4))
            par.barrier()
            if job == "ddp_raise":
                raise ValueError("injected bad record on this rank")
            time.sleep(0.5)
            net(torch.ones(2, 4)).sum().backward()     # DDP's all-reduce: the peer is gone
        if job == "raise":
            raise ValueError("injected bad record on this rank")
        if job == "slow":
            time.sleep(0.5)                            # finish after rank 0
        elif job == "wait":
            time.sleep(0.5)
            par.barrier()                              # the other rank is gone by now
        return 0

    cli._run = stage
    time.sleep(delay)
    rc = cli.main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)
""")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ROOT = str(Path(__file__).resolve().parents[2])


def _launch(tmp_path, ranks):
    """Run one process per (job, delay, argv) of ``ranks``; [(exit status, stderr)] by rank."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = str(_free_port())
    procs = []
    for rank, (job, delay, argv) in enumerate(ranks):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(len(ranks)),
                   LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                   OMP_NUM_THREADS="1")
        # the checkout first, installed or not (the worker script lives in tmp_path)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
        procs.append(subprocess.Popen([sys.executable, str(script), job, str(delay), *argv],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    out = []
    try:
        for p in procs:
            _, err = p.communicate(timeout=LIMIT)
            out.append((p.returncode, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


def _argv(run_dir, *extra):
    return ["sft", "--run_dir", str(run_dir), "--device", "cpu", "--distributed.mode", "ddp",
            "--distributed.timeout_minutes", "1", "--log.tensorboard", "false", *extra]


def test_only_rank_0_writes_config_on_a_fresh_run_dir(tmp_path):
    run_dir = tmp_path / "run"                  # does not exist: rank 1 starts first
    (rc0, err0), (rc1, err1) = _launch(tmp_path, [
        ("ok", 1.0, _argv(run_dir, "--seed", "3")),
        ("slow", 0.0, _argv(run_dir, "--seed", "7"))])
    assert (rc0, rc1) == (0, 0), err0 + err1
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["seed"] == 3                   # rank 1's options never reach the file


def test_a_refused_run_lock_ends_every_rank_at_once(tmp_path):
    run_dir = tmp_path / "run"
    with run_lock(str(run_dir)):                # this process holds the run
        (rc0, err0), (rc1, err1) = _launch(tmp_path, [("ok", 0.0, _argv(run_dir)),
                                                      ("ok", 0.0, _argv(run_dir))])
    for rc, err in ((rc0, err0), (rc1, err1)):
        assert rc == 1, err
        assert f"is in use by process {os.getpid()}" in err, err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (run_dir / "config.yaml").exists()


@pytest.mark.parametrize("jobs", [("wait", "raise"), ("ddp_backward", "ddp_raise")],
                         ids=["barrier", "ddp_backward"])
def test_one_ranks_error_is_one_line_on_the_others(tmp_path, jobs):
    """Also when the surviving rank is in DDP's backward: DDP all-reduces gradients inside
    autograd's engine, so that collective fails from torch/autograd, not torch/distributed."""
    run_dir = tmp_path / "run"
    (rc0, err0), (rc1, err1) = _launch(tmp_path, [(jobs[0], 0.0, _argv(run_dir)),
                                                  (jobs[1], 0.0, _argv(run_dir))])
    assert rc1 == 1 and "error: injected bad record on this rank" in err1, err1
    assert rc0 == 1, err0
    assert "error: another rank failed (see its error above); this rank stopped at a " \
           "collective" in err0, err0
    assert "Traceback" not in err0, err0
    if jobs[0] != "wait":
        return
    (rc0, err0), _ = _launch(tmp_path, [("wait", 0.0, _argv(run_dir, "--debug")),
                                        ("raise", 0.0, _argv(run_dir, "--debug"))])
    assert rc0 != 0 and "Traceback" in err0, err0      # --debug: torch's own error


@pytest.mark.parametrize("where,message,peer", [
    ("torch/distributed/distributed_c10d.py",
     "[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer", True),
    ("torch/distributed/fsdp/_fully_shard/_fsdp_param.py",
     "FSDP expects uniform shard sizes on dim 0", False),
    ("torch/autograd/graph.py",
     "[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Read error", True),
    ("mine/model.py",
     "[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer", False),
])
def test_only_the_communication_librarys_error_is_a_peers_failure(monkeypatch, where, message,
                                                                   peer):
    """A RuntimeError from torch.distributed's own Python code (FSDP2 refusing a shape) is
    this rank's error, with its traceback; gloo's, from C++, is a peer gone."""
    import torch.distributed as dist

    from tisdpo.cli import _collective_failure

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 2)
    path = os.path.join(os.sep, "site-packages", *where.split("/"))
    try:
        exec(compile(f"raise RuntimeError({message!r})", path, "exec"))
    except RuntimeError as err:
        assert _collective_failure(err) is peer
    # raised a few frames below torch.distributed (FSDP2's state dict, through torch._ops)
    ops = os.path.join(os.sep, "site-packages", "torch", "_ops.py")
    below = compile(f"raise RuntimeError({message!r})", ops, "exec")
    try:
        exec(compile("exec(below)", path, "exec"), {"below": below})
    except RuntimeError as err:
        assert _collective_failure(err) is (peer and "distributed" in where)
