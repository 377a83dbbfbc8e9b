#!/usr/bin/env bash
# Issue 5: does any Frobenius-regularized critic give digits? Trains the variants below side by
# side for the same wall-clock budget, then scores each (FID etc., 10k samples) and writes its
# layer table (operator norms, stable ranks). Made for one GPU (the variants share it); on a CPU
# set DEVICE=cpu and fewer VARIANTS.
# Usage: bash scripts/frobenius_sweep.sh OUTDIR [SECONDS]
#   env: PYTHON, DEVICE (default cuda), VARIANTS (space-separated names below; default all),
#        TAR (also pack OUTDIR, without checkpoints and weights, into this .tgz after each phase)
# Wall time: SECONDS of training, then at most 150 s of scoring and 150 s of layer tables (each
# phase is cut at that; a fresh machine first computes the test set's reference statistics).
# A first try on the H100 (session 4) gave 390 s and a 580 s limit, lost everything at the limit
# because the results were packed only at the end: hence TAR after every phase.
# Session 5 answered the question on the CPU (docs/results.md, "Frobenius: what made it give
# digits"): WGAN-GP's Adam beta1 0.5 was the cause; the preset now uses beta1 0, and the
# w32-b05 variant below is the old preset.
# Needs MNIST where lipgan finds it ($LIPGAN_DATA or `lipgan data fetch mnist`).
set -uo pipefail
OUT=${1:-frobenius-sweep}
BUDGET=${2:-380}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"

declare -A V=(
  [w64]="--width 64"
  [w32]="--width 32"
  [w32-b05]="--width 32 --beta1 0.5"
  [w64-lam1]="--width 64 --constraint-option lam=1"
  [w64-lam100]="--width 64 --constraint-option lam=100"
  [w64-rmsprop]="--width 64 --optimizer rmsprop --lr-d 5e-5 --lr-g 5e-5 --beta1 0 --beta2 0.99"
  [w64-ttur]="--width 64 --n-critic 1 --lr-d 4e-4 --lr-g 1e-4"
)
NAMES=${VARIANTS:-"w64 w32 w64-lam1 w64-lam100 w64-rmsprop w64-ttur"}

common=(--method frobenius --model dcgan28 --device "$DEVICE" --precision fp32
  --max-time-s "$BUDGET" --steps 10000000 --quiet --fid-every -1 --sample-every 2000
  --checkpoint-every 1000 --threads 1)
for name in $NAMES; do
  # shellcheck disable=SC2086
  $PY -m lipgan train "${common[@]}" ${V[$name]} --out "$OUT/$name" >"$OUT/$name.train.log" 2>&1 &
done
wait
pack() { if [[ -n ${TAR:-} ]]; then tar czf "$TAR" --exclude=checkpoints --exclude="*.safetensors" "$OUT"; fi; }
pack
for name in $NAMES; do
  OMP_NUM_THREADS=2 timeout 150 $PY -m lipgan eval "$OUT/$name" >"$OUT/$name.eval.txt" 2>&1 &
done
wait
pack
for name in $NAMES; do
  OMP_NUM_THREADS=2 timeout 150 $PY -m lipgan lipschitz "$OUT/$name" --no-lower >"$OUT/$name.lip.txt" 2>&1 &
done
wait
for name in $NAMES; do
  echo "== $name: ${V[$name]}"
  tail -n 3 "$OUT/$name.train.log"
  cat "$OUT/$name.eval.txt" "$OUT/$name.lip.txt"
done | tee "$OUT/summary.txt"
pack
