#!/usr/bin/env bash
# The CUDA checks and the GPU benchmarks in one run: tests/test_cuda.py, then the benchmark
# scripts with --device cuda at the sizes of the issues' targets (the swing-ups in their own
# step, not solver_speed.py's second table). Each step has a time limit (at most 9.5 minutes in
# all; on an H200 mpc.pytorch's B = 256, T = 50 solves take 2-33 s each, so
# it gets one or two repetitions there); a step that fails or runs out is reported and the next
# one runs.
#
# Usage: bash benchmarks/gpu.sh [OUTDIR]        (default gpu-results/)
# Needs a python3 (or $PYTHON) whose torch has CUDA, with pytest, numpy and scipy, and diffmpc
# importable (pip install -e . or PYTHONPATH=.); mpc.pytorch (the `mpc` package, installed with
# --no-deps or on PYTHONPATH) for the reference columns. No Gymnasium or pybullet needed.
# DEVICE=cpu QUICK=1 bash benchmarks/gpu.sh runs the same steps on tiny sizes on the CPU.
# STEPS="test_cuda solver" runs only the steps named (default: all of them).
set -u
OUT=${1:-gpu-results}
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -n "${QUICK:-}" ]; then
    LQR=4x10 NL=2x20 ITERS=1,4 REPS=1
else
    LQR=256x50,1024x50 NL=1x20,256x20,256x50 ITERS=1,4,16,64 REPS=3
fi
status=0
STEPS=${STEPS:-test_cuda solver solver_sequential launches nonlinear implicit}
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to OUTDIR/NAME.log
    local name=$1 limit=$2
    case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
    shift 2
    echo "== $name: $*"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || { echo "== $name failed (exit $rc)"; status=1; }
}
{ nvidia-smi -L 2>/dev/null || true
  $PY -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__,
'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
} | tee "$OUT/device.log"
step test_cuda 60 env DIFFMPC_TEST_DEVICE="$DEVICE" $PY -m pytest -q -p no:cacheprovider \
    tests/test_cuda.py
step solver 120 $PY benchmarks/solver_speed.py --device "$DEVICE" --sizes "$LQR" --no-cvxpy \
    --ref-budget 10 --no-swing-ups --out "$OUT/solver.md"
# the same LQ solves with the sequential recursions instead of the CUDA default's scans over time
step solver_sequential 45 $PY benchmarks/solver_speed.py --device "$DEVICE" --sizes "$LQR" \
    --no-reference --no-cvxpy --option time_parallel=false --no-swing-ups \
    --out "$OUT/solver_sequential.md"
step launches 45 $PY benchmarks/launches.py --device "$DEVICE" --sizes "$LQR" --out "$OUT/launches.md"
step nonlinear 200 $PY benchmarks/nonlinear_speed.py --device "$DEVICE" --sizes "$NL" \
    --reps "$REPS" --ref-budget 10 --out "$OUT/nonlinear.md"
step implicit 90 $PY benchmarks/implicit_vs_unroll.py --device "$DEVICE" --iters "$ITERS" \
    --reps 1 --out "$OUT/implicit.md"
exit $status
