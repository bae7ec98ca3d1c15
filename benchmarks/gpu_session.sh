#!/usr/bin/env bash
# One GPU session (an H100/H200) in at most 9 minutes of wall time, from the repository root:
#
#   bash benchmarks/gpu_session.sh                # on the GPU host
#   bash benchmarks/gpu_session.sh --cpu-smoke    # the same steps at toy sizes on a CPU
#
# Steps, each under `timeout` within the session's own deadline (their limits add up to it),
# each going on past a failure:
# the peer wheels in .whl/ (pip --no-deps into .peers/); environment and versions; the CUDA
# tests; logprobs fwd/bwd/fwdbwd at llama3-8b x 8k tokens for every provider, uniform and
# peaked logits (torch.compile, the slow compile, in a step of its own after them); the loss
# op on one 8k+8k pair (precomputed reference log-probs, then an online reference head); a
# memory sweep 4k-64k for ours vs eager;
# Nsight Compute on the backward kernels when ncu exists. Output: at most 8 files in $OUT
# (default gpu_out/): env.txt, session.log, tests.log, results.csv, bench.log, ncu.txt,
# plots.tgz, status.txt.
# A step at its limit gets SIGINT (pytest then still prints its failures and the test it was
# in; a benchmark keeps every row it appended), SIGKILL 8 s later.
# Commit results.csv and the plots under benchmarks/results/ (the CSV rows carry device and
# versions). Where .git does not travel with the tree, TISDPO_GIT_COMMIT=<sha> names the
# commit in the rows instead of "unknown". GPU_SESSION_ONLY="wheels environment" runs only
# the steps named (the tests of this script use it).
#
# Before (on a machine with PyPI access): put every wheel the peers need in .whl/, which the
# session installs with --no-deps into .peers/. TRL's chunked log-probs import trl.trainer in
# their backward, which needs `datasets`; a host without it takes its pure-Python wheels too
# (for the host's Python version):
#
#   mkdir -p .whl && cp /path/to/peer/wheels/*.whl .whl/    # liger-kernel, cut-cross-entropy, trl
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#       datasets==5.2.0 "dill<0.4.2" "multiprocess<0.70.20"
#
# .whl/ is ignored by git: when the tree is copied to the GPU machine, copy it too.
set -u
cd "$(dirname "$0")/.."

SMOKE=0
[ "${1:-}" = "--cpu-smoke" ] && SMOKE=1
OUT_DIR="${OUT:-gpu_out}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
LOG="$OUT_DIR/session.log"
STATUS="$OUT_DIR/status.txt"
DEADLINE=$(( $(date +%s) + 540 ))          # 9 minutes from now
# every benchmark row of this session carries it: the README tables read the steps as one run
TISDPO_BENCH_SESSION="$(date -u +%Y-%m-%dT%H:%M:%S+00:00)"
export TISDPO_BENCH_SESSION
PY="${PYTHON:-python3}"
# every print reaches the log at once, also from a step that is killed at its limit
export PYTHONUNBUFFERED=1
: > "$LOG"
: > "$STATUS"

# step NAME SECONDS CMD...: run CMD with at most SECONDS (and never past the deadline)
step() {
  local name=$1 budget=$2
  shift 2
  if [ -n "${GPU_SESSION_ONLY:-}" ] && [[ " $GPU_SESSION_ONLY " != *" $name "* ]]; then
    return 0
  fi
  local left=$(( DEADLINE - $(date +%s) - 5 ))
  if [ "$left" -le 5 ]; then
    echo "$name: skipped (deadline)" | tee -a "$STATUS"
    return 0
  fi
  [ "$budget" -gt "$left" ] && budget=$left
  local t0
  t0=$(date +%s)
  echo "=== $name (limit ${budget}s) $(date -u +%H:%M:%S)" >> "$LOG"
  # SIGINT first: Python raises KeyboardInterrupt, so pytest prints the failures so far and
  # the test it was in (SIGTERM loses both); SIGKILL for whatever ignores it
  timeout --signal=INT --kill-after=8 "$budget" "$@" >> "$LOG" 2>&1
  local rc=$?
  echo "$name: rc=$rc $(( $(date +%s) - t0 ))s" | tee -a "$STATUS"
  return 0
}

if [ "$SMOKE" = 1 ]; then
  export TRITON_INTERPRET=1
  SHAPE=toy; PEAKED=toy-peaked; TOKENS=128; PAIR=128; SWEEP=128,256; DEV=cpu; REPS=2; WARM=1
  TESTS=(tests/kernels/test_common.py)
else
  # PAIR: the loss step's one pair, chosen + rejected (8k + 8k)
  SHAPE=llama3-8b; PEAKED=llama3-8b-peaked; TOKENS=8k; PAIR=16k; SWEEP=4k,8k,16k,32k,64k
  DEV=cuda
  REPS=10; WARM=3
  # every test that needs a GPU, and the kernels' oracle tests compiled for it; the files
  # with the realistic-shape tests first, so that a step cut short loses the least
  FIRST=(tests/kernels/test_linear_logprobs_triton.py tests/kernels/test_linear_token_kl_triton.py
         tests/test_loss.py tests/kernels/test_one_sweep_triton.py tests/kernels/test_head_gemm.py)
  TESTS=("${FIRST[@]}")
  for f in tests/kernels/test_*.py; do
    [[ " ${FIRST[*]} " == *" $f "* ]] || TESTS+=("$f")
  done
  TESTS+=(-k "cuda or matches_oracle or slabs or deterministic or filter or one_sweep_triton \
or tma or head_gemm")
fi
CSV="$OUT_DIR/results.csv"
BENCH=("$PY" -m benchmarks --device "$DEV" --dtype bf16 --reps "$REPS" --warmup "$WARM"
       --out "$CSV")

environment() {
  git log -1 --format='commit %H %cd' 2>/dev/null \
    || echo "commit ${TISDPO_GIT_COMMIT:-unknown (no git repository here)}"
  date -u
  uname -a
  nproc
  command -v nvidia-smi >/dev/null && nvidia-smi
  "$PY" - <<'EOF'
import importlib, importlib.metadata, platform, sys
import torch
print("python", sys.version.split()[0], platform.machine(), sys.executable)
gpu = torch.cuda.is_available()
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu",
      torch.cuda.get_device_name(0) if gpu else None,
      "capability", torch.cuda.get_device_capability(0) if gpu else None)
# the peers and what they import (datasets' own pins: pyarrow>=24, fsspec<=2026.9.0,
# huggingface-hub>=1.31): the version each import found, and where
for mod, dist in (("triton", "triton"), ("numpy", "numpy"), ("transformers", "transformers"),
                  ("liger_kernel", "liger-kernel"), ("cut_cross_entropy", "cut-cross-entropy"),
                  ("trl", "trl"), ("accelerate", "accelerate"), ("datasets", "datasets"),
                  ("dill", "dill"), ("multiprocess", "multiprocess"), ("pyarrow", "pyarrow"),
                  ("fsspec", "fsspec"), ("huggingface_hub", "huggingface-hub"),
                  ("pandas", "pandas"), ("xxhash", "xxhash"), ("matplotlib", "matplotlib"),
                  ("pytest", "pytest")):
    try:
        m = importlib.import_module(mod)
    except Exception as err:       # report and go on: this is an inventory
        print(mod, "missing:", type(err).__name__, str(err)[:200])
        continue
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        version = getattr(m, "__version__", "?")
    print(mod, version, getattr(m, "__file__", "") or "")
try:                               # what trl-chunked's backward imports
    import trl.trainer.utils       # noqa: F401
    print("trl.trainer.utils imports")
except Exception as err:
    print("trl.trainer.utils does not import:", type(err).__name__, str(err)[:200])
EOF
  command -v ncu >/dev/null && ncu --version | tail -1
  return 0
}

# into .peers/ (ignored by git), first on PYTHONPATH for every later step: nothing is written
# into the host's own environment, which may be read-only
wheels() {
  if ls .whl/*.whl >/dev/null 2>&1; then
    local pip=("$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir
               --upgrade --target .peers)
    ls -l .whl/*.whl
    # all at once; where that fails (two versions of one package refuse to install together,
    # one bad wheel), one by one, so that one bad wheel costs its peer only
    "${pip[@]}" .whl/*.whl && return 0
    echo "installing the wheels together failed: one by one"
    local w rc=0
    for w in .whl/*.whl; do
      "${pip[@]}" "$w" || { echo "FAILED: $w"; rc=1; }
    done
    return $rc
  else
    echo "no .whl/ folder: the peers that need a wheel will be skipped with their reason"
  fi
}

ncu_bwd() {
  local ncu
  ncu=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null \
        | head -n 1)
  if [ -z "$ncu" ]; then
    echo "ncu not found: no kernel profile"
    return 0
  fi
  # --clock-control none: the card's clocks are left as they are (ncu would lock them to base)
  "$ncu" --clock-control none --target-processes all --kernel-name regex:"bwd_kernel" \
      --launch-count 2 \
      --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
      "$PY" - <<'EOF'
import torch
import tisdpo_kernels as tk
g = torch.Generator(device="cuda").manual_seed(0)
n, d, v = 8192, 4096, 128256
h = torch.randn(n, d, device="cuda", generator=g).bfloat16().requires_grad_()
w = (torch.randn(v, d, device="cuda", generator=g) * (2 / d ** 0.5)).bfloat16().requires_grad_()
y = torch.randint(0, v, (n,), device="cuda", generator=g)
tk.linear_logprobs(h, w, y, impl="triton").backward(torch.randn(n, device="cuda"))
torch.cuda.synchronize()
EOF
}

export PY
export -f environment wheels ncu_bwd          # run under `timeout` through bash -c
step wheels 20 bash -c wheels
export PYTHONPATH="$PWD/.peers${PYTHONPATH:+:$PYTHONPATH}"
step environment 25 bash -c environment        # the versions the steps below run with
cp "$LOG" "$OUT_DIR/env.txt"
# -v: each test's name as it ends, so a step cut at its limit still says how far it got
step tests 140 "$PY" -m pytest -v --tb=short -p no:cacheprovider \
     -o faulthandler_timeout=120 "${TESTS[@]}"
sed -n '/=== tests/,/^=== /p' "$LOG" > "$OUT_DIR/tests.log"
# every logprobs provider but torch.compile, uniform then peaked logits (the filtering
# comparisons), the head target's comparisons first; rows are appended as each one finishes
step logprobs 120 "${BENCH[@]}" --op logprobs --mode fwd,bwd,fwdbwd \
     --shapes "$SHAPE,$PEAKED" --tokens "$TOKENS" \
     --providers ours-triton,ours-gemm,eager,trl-chunked,torch-lce,cce_exact,liger-flce,cce,\
ours-filtered,ours-no-tma,ours-torch
# torch.compile's cold compile (tens of seconds) apart, so that it never holds back the
# peaked rows above; uniform logits only
step logprobs_compile 35 "${BENCH[@]}" --op logprobs --mode fwd,bwd,fwdbwd --shapes "$SHAPE" \
     --tokens "$TOKENS" --providers torch-compile
# the providers the loss targets compare first (rows are appended as each one finishes)
step loss_given 35 "${BENCH[@]}" --op loss --mode fwdbwd --shapes "$SHAPE" --tokens "$PAIR" \
     --reference precomputed --providers ours-one-sweep,ours-triton,liger-dpo
step loss 55 "${BENCH[@]}" --op loss --mode fwdbwd --shapes "$SHAPE" --tokens "$PAIR" \
     --providers ours-one-sweep,ours-triton,eager,trl-chunked,torch-lce,cce_exact,ours-torch,\
ours-one-sweep-torch,liger-dpo
# peak memory is one call per row: 5 timed repetitions are enough here, so 64k is reached
step memory_sweep 60 "${BENCH[@]}" --op logprobs --mode fwdbwd --shapes "$SHAPE" \
     --tokens "$SWEEP" --providers ours-triton,eager --no-check --reps 5 --warmup 1
step ncu 30 bash -c ncu_bwd
sed -n '/=== ncu/,$p' "$LOG" > "$OUT_DIR/ncu.txt"
grep -v "^=== \|^\[" "$LOG" | grep -E "ms|TFLOP|skipped|OOM|ERROR" > "$OUT_DIR/bench.log" || true
if [ -f "$CSV" ]; then
  step plots 20 "$PY" -m benchmarks.plot "$CSV"
  [ -d "$OUT_DIR/plots" ] && tar -czf "$OUT_DIR/plots.tgz" -C "$OUT_DIR" plots \
    && rm -rf "$OUT_DIR/plots"
fi
echo "done in $(( $(date +%s) - DEADLINE + 540 ))s" | tee -a "$STATUS"
