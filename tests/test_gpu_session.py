"""The prepared GPU session (benchmarks/gpu_session.sh) and what it relies on, checked on a CPU.

A GPU session is rare (one try of at most 15 minutes of device time): these tests catch, on
the CPU, what would otherwise waste it — a probe failure that ends a whole benchmark step, a
wheel that blocks every peer, step limits that overrun the device's command limit, rows that
do not say which peers and which commit they measured. The full dry run of the script is
``tests/test_benchmarks.py::test_gpu_session_dry_run_on_cpu``.
"""
import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("benchmarks") is None:   # pytest run from outside the repo root
    sys.path.insert(0, str(ROOT))

from benchmarks import providers  # noqa: E402
from benchmarks import results as R  # noqa: E402
from benchmarks.runner import RunConfig, run  # noqa: E402
from benchmarks.shapes import HeadShape  # noqa: E402

SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"
CPU = torch.device("cpu")
TINY = HeadShape("tiny", hidden=32, vocab=200, tokens=(32,), toy=True)
DEVICE_COMMAND_LIMIT_S = 600     # the device machine's limit on one command


# ----------------------------------------------------------------------------- the runner

class _FakeCompilationError(Exception):
    """Stands for triton.compiler.errors.CompilationError: an Exception, not one of the
    "unavailable" types (ImportError, NotImplementedError) the probe turns into a skip."""


@pytest.fixture
def fresh_probes():
    providers._cached_probe.cache_clear()
    yield
    providers._cached_probe.cache_clear()


@pytest.mark.parametrize("error", [_FakeCompilationError, TypeError, ValueError,
                                   AttributeError])
def test_a_probe_that_fails_gives_error_rows_and_the_run_goes_on(error, monkeypatch,
                                                                fresh_probes):
    """Our loss providers are probed at a tiny size before they run; on a GPU that probe is
    the first compile of the Triton kernels. A compile or CUDA error there, or a bug in our
    loss (a TypeError, a ValueError), must become the provider's error rows: not a skip that
    leaves it out of the tables, and not the end of the step with every peer after it
    unmeasured."""
    real = providers.make_loss

    def make_loss(name, beta, softcap):
        if name == "ours-one-sweep":
            raise error("at 12:4: cannot compile")
        return real(name, beta, softcap)

    monkeypatch.setattr(providers, "make_loss", make_loss)
    cfg = RunConfig(ops=["loss"], modes=["fwdbwd"], shapes=[TINY], tokens=(32,),
                    providers=["ours-one-sweep", "eager"], device=CPU, reps=1, warmup=0,
                    check=False, ceiling=False)
    rows = run(cfg, R.environment(CPU, ["--test"]))
    sweep = [r for r in rows if r["provider"] == "ours-one-sweep"]
    assert sweep and all(r["status"] == "error" for r in sweep), sweep
    assert "cannot compile" in sweep[0]["extra"] and "probe" in sweep[0]["extra"]
    assert [r for r in rows if r["provider"] == "eager" and r["metric"] == "time"
            and r["status"] == "ok"]


# ----------------------------------------------------------------------------- the rows

def test_rows_name_every_peer_they_may_have_run(monkeypatch):
    """trl-chunked runs trl's kernel: its version belongs in the peers column with Liger's
    and Cut Cross-Entropy's."""
    monkeypatch.setattr(R, "_version", lambda dist: "9.9")
    peers = R.environment(CPU, [])["peers"]
    assert {"liger-kernel=9.9", "cut-cross-entropy=9.9", "trl=9.9"} <= set(peers.split(";"))


def test_commit_comes_from_the_environment_where_git_cannot_say(monkeypatch):
    """On the GPU host the tree arrives as a copy without .git (or without git): the rows
    then carry TISDPO_GIT_COMMIT instead of "unknown"."""
    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(R.subprocess, "run", no_git)
    monkeypatch.delenv("TISDPO_GIT_COMMIT", raising=False)
    assert R._git_commit() == "unknown"
    monkeypatch.setenv("TISDPO_GIT_COMMIT", "0123456789ab")
    assert R._git_commit() == "0123456789ab"
    assert R.environment(CPU, [])["git_commit"] == "0123456789ab"


# ----------------------------------------------------------------------------- the script

def _script() -> str:
    return SCRIPT.read_text()


def _step_limits(text: str) -> dict[str, int]:
    return {m.group(1): int(m.group(2))
            for m in re.finditer(r"^\s*step (\w+) (\d+) ", text, flags=re.M)}


def test_step_limits_fit_the_deadline_and_the_device_command_limit():
    text = _script()
    (deadline,) = [int(x) for x in re.findall(r"DEADLINE=\$\(\( \$\(date \+%s\) \+ (\d+) \)\)",
                                              text)]
    (kill_after,) = [int(x) for x in re.findall(r"timeout --signal=\w+ --kill-after=(\d+)",
                                                text)]
    limits = _step_limits(text)
    assert {"wheels", "environment", "tests", "logprobs", "loss_given", "loss",
            "memory_sweep", "ncu", "plots"} <= set(limits), limits
    assert sum(limits.values()) <= deadline, limits
    # the last step may start just inside the deadline and take its kill-after on top; the
    # rest (machine start, transfers) is outside the command's limit but inside the lease
    assert deadline + kill_after + 30 <= DEVICE_COMMAND_LIMIT_S


def test_steps_are_interrupted_before_they_are_killed_and_print_unbuffered():
    """SIGINT lets pytest print the failures so far and the test it was in (SIGTERM loses
    both); PYTHONUNBUFFERED keeps every line a killed step printed."""
    text = _script()
    assert re.search(r"timeout --signal=INT --kill-after=\d+ ", text)
    assert re.search(r"^export PYTHONUNBUFFERED=1$", text, flags=re.M)


def test_ncu_leaves_the_clocks_alone():
    """The device's rules: never change the card's clocks; ncu locks them to base unless
    told --clock-control none."""
    text = _script()
    call = text[text.index("ncu_bwd() {"):]
    assert "--clock-control none" in call[:call.index("<<'EOF'")]


def test_the_slow_compile_does_not_hold_back_the_peaked_rows():
    """torch.compile's cold compile runs in a step of its own, after the step with the
    peaked shape (where the filtering comparisons are)."""
    text = _script()
    steps = {m.group(1): text[m.start():text.find("\nstep ", m.start() + 1)]
             for m in re.finditer(r"^step (\w+) ", text, flags=re.M)}
    assert "$PEAKED" in steps["logprobs"] and "torch-compile" not in steps["logprobs"]
    assert "torch-compile" in steps["logprobs_compile"]


def _wheel(folder: Path, name: str, version: str) -> Path:
    """A minimal pure-Python wheel with one module, ``name``."""
    dist = f"{name}-{version}.dist-info"
    path = folder / f"{name}-{version}-py3-none-any.whl"
    files = {
        f"{name}/__init__.py": f"__version__ = {version!r}\n",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist}/WHEEL": ("Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                          "Tag: py3-none-any\n"),
    }
    record = "".join(f"{f},,\n" for f in files) + f"{dist}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for f, body in files.items():
            z.writestr(f, body)
        z.writestr(f"{dist}/RECORD", record)
    return path


@pytest.mark.slow
def test_wheels_and_environment_steps_in_a_tree_without_git(tmp_path):
    """The first two steps as on the GPU host: a copy of the tree without .git, wheels in
    .whl/ with one package given twice (which makes pip refuse them all together). Every
    other wheel still installs, the environment step succeeds and says which commit, and
    $OUT holds at most 8 files with plain names."""
    # asked of the metadata: find_spec("pip") would make setuptools' distutils shim hand
    # out the standard library's distutils for the rest of the process (inductor then fails)
    try:
        importlib.metadata.version("pip")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("needs pip")
    tree = tmp_path / "tree"
    (tree / "benchmarks").mkdir(parents=True)
    (tree / "benchmarks" / "gpu_session.sh").write_text(_script())
    whl = tree / ".whl"
    whl.mkdir()
    _wheel(whl, "fakepeer_a", "1.0")
    _wheel(whl, "fakepeer_a", "2.0")
    _wheel(whl, "fakepeer_b", "1.0")
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable,
           "GPU_SESSION_ONLY": "wheels environment", "TISDPO_GIT_COMMIT": "0123456789ab",
           "GIT_CEILING_DIRECTORIES": str(tmp_path)}
    proc = subprocess.run(["bash", str(tree / "benchmarks" / "gpu_session.sh"), "--cpu-smoke"],
                          cwd=tree, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    status = (out / "status.txt").read_text()
    assert "wheels: rc=0" in status and "environment: rc=0" in status, status
    assert "tests:" not in status and "logprobs:" not in status, status
    assert (tree / ".peers" / "fakepeer_b" / "__init__.py").exists()
    assert (tree / ".peers" / "fakepeer_a" / "__init__.py").exists()
    envtxt = (out / "env.txt").read_text()
    assert "commit 0123456789ab" in envtxt
    assert re.search(r"^torch \S+ cuda", envtxt, flags=re.M), envtxt
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8, files
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", p.name) for p in files), files


def test_gpu_session_dry_run_on_cpu(tmp_path):
    """benchmarks/gpu_session.sh --cpu-smoke: every step runs (toy sizes, interpreter), within
    its deadline, and the output is at most 8 files with results rows for ours and eager."""
    import csv
    import json
    root = ROOT
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(root / "benchmarks" / "gpu_session.sh"), "--cpu-smoke"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-2000:]
    status = (tmp_path / "status.txt").read_text()
    for name in ("environment", "wheels", "tests", "logprobs", "logprobs_compile",
                 "loss_given", "loss", "memory_sweep", "ncu", "plots"):
        assert f"{name}: rc=0" in status, status
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) <= 8 and "results.csv" in files and "plots.tgz" in files, files
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    shapes = {r["shape"] for r in rows}
    assert {"toy", "toy-peaked"} <= shapes
    assert {"ours-triton", "ours-torch", "eager"} <= {r["provider"] for r in rows}
    assert any(json.loads(r["extra"] or "{}").get("ref_logps") == "precomputed" for r in rows)
    # a step exits 0 whatever its providers did: every one that can run on a CPU timed and
    # passed its check (an adapter broken by a typo would be error rows here, not on a GPU)
    import importlib.util
    peers = ["trl-chunked"] if importlib.util.find_spec("trl") else []
    peers += ["torch-lce"] if hasattr(torch.nn, "LinearCrossEntropyOptions") else []
    want = {("logprobs", p, m) for p in ["ours-triton", "ours-gemm", "ours-no-tma",
                                         "ours-filtered", "ours-torch", "eager",
                                         "torch-compile", *peers]
            for m in ("fwd", "bwd", "fwdbwd", "check")}
    want |= {("loss", p, m) for p in ["ours-one-sweep", "ours-one-sweep-torch", "ours-triton",
                                      "ours-torch", "eager", *peers]
             for m in ("fwdbwd", "check")}
    ok = {(r["op"], r["provider"], r["mode"]) for r in rows if r["status"] == "ok"}
    assert want <= ok, sorted(want - ok)
    assert not [r for r in rows if r["status"] == "error"]
