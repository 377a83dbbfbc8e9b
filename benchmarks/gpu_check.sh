#!/usr/bin/env bash
# The GPU check of issue 9, as one script that runs well inside 10 minutes on one H100/H200:
#   1. the CUDA smoke tests (every method, fp32 and bf16 autocast, resume);
#   2. generator steps per second of wgan-gp and sn (dcgan28, width 64, batch 64), fp32 and bf16;
#   3. (PART=all) the method comparison on the GPU, for the README's results and grids.
# Usage: bash benchmarks/gpu_check.sh OUTDIR
#   env: PYTHON (python with CUDA torch), PART=smoke|speed|compare|all (default smoke+speed),
#        BUDGET (per compare run, default 20s), SEEDS (default 2), METHODS, DEVICE (default cuda).
# Needs MNIST in $LIPGAN_DATA (e.g. copied there by `lipgan data fetch mnist` beforehand).
set -uo pipefail
OUT=${1:-gpu-check}
PY=${PYTHON:-python3}
PART=${PART:-smoke,speed}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
case "$PART" in *all*) PART=smoke,speed,compare ;; esac

{ command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
  torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"; } | tee "$OUT/device.txt"

if [[ $PART == *smoke* ]]; then
  echo "== CUDA smoke tests"
  t0=$SECONDS
  timeout 240 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -20 | tee "$OUT/smoke.txt"
  echo "smoke wall ${SECONDS}-${t0} = $((SECONDS - t0)) s" | tee -a "$OUT/smoke.txt"
fi

if [[ $PART == *speed* ]]; then
  echo "== generator steps per second (dcgan28, width 64, batch 64)"
  timeout 240 $PY benchmarks/gpu_speed.py --device "$DEVICE" 2>&1 | tee "$OUT/speed.txt"
fi

if [[ $PART == *compare* ]]; then
  echo "== method comparison"
  t0=$SECONDS
  timeout 540 $PY -m lipgan compare --methods "${METHODS:-wgan-clip,wgan-gp,wgan-lp,sn,snr,frobenius,gan}" \
    --seeds "${SEEDS:-2}" --budget "${BUDGET:-20s}" --device "$DEVICE" --quiet --out "$OUT/compare" \
    2>&1 | tail -40 | tee "$OUT/compare.txt"
  echo "compare wall $((SECONDS - t0)) s" | tee -a "$OUT/compare.txt"
fi
