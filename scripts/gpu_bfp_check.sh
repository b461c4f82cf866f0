#!/usr/bin/env bash
# One prepared GPU run for issue 17 (the BFP's cost on a GPU), sized to fit in about 8 minutes
# on an H200: which SDPA kernel the non-local block runs and its memory, fused against the
# explicit attention at 800x1333's P4, and `libra bench --preset paper --device cuda --amp`
# (model part, trimmed rounds) for the baseline / BFP / all-three ratios and peak CUDA memory.
#
#   bash scripts/gpu_bfp_check.sh                      # on the GPU machine, from the repo root
#   DEVICE=cpu SMOKE=1 bash scripts/gpu_bfp_check.sh   # the same steps, tiny, on the CPU (a test)
#
# Writes into $OUT (the device runner's folder) or results/bench: gpu-bfp-check.log,
# bfp-fused-<device>-micro.md and the bench's <name>.md/.csv. Copy them to results/bench and
# quote them in README's Benchmarks section with the machine named in the log.
set -euo pipefail
DEVICE="${DEVICE:-cuda}"
OUTDIR="${OUT:-results/bench}"
PY="${PYTHON:-python}"
export PYTHONPATH="${PYTHONPATH:-$PWD}"
mkdir -p "$OUTDIR"
LOG="$OUTDIR/gpu-bfp-check.log"
exec > >(tee "$LOG") 2>&1

echo "== $(date -u +%FT%TZ) host $(hostname), device $DEVICE"
if [ "$DEVICE" = cuda ]; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true; fi
"$PY" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.version.cuda)"

if [ "${SMOKE:-0}" = 1 ]; then
  SIZE=8x12 CH=16 BATCH=2 SIZES=quickstart ROUNDS=2 MINTIME=0.02
  BENCH_ARGS=(--backbone tiny --image-size 128x128 --min-size 128 --max-size 128 --batch 1 --iters 2 --warmup 1 --memory off)
  AMP=()
  NAME="gpu-bfp-check-smoke-$DEVICE"
else
  SIZE=50x84 CH=256 BATCH=2 SIZES=paper ROUNDS=5 MINTIME=0.1
  BENCH_ARGS=(--preset paper --iters 20 --warmup 3)
  AMP=(--amp)
  NAME="paper-cuda-amp-bfp-fused"
fi

echo "== 1. SDPA kernel and memory of the non-local block (fp32, then AMP)"
timeout 90 "$PY" scripts/sdpa_backend.py --device "$DEVICE" --size "$SIZE" --channels "$CH" --batch "$BATCH"
if [ "${#AMP[@]}" -gt 0 ]; then
  timeout 90 "$PY" scripts/sdpa_backend.py --device "$DEVICE" --size "$SIZE" --channels "$CH" --batch "$BATCH" --amp
fi

echo "== 2. fused against explicit, interleaved (non-local block and whole neck, fp32)"
timeout 120 "$PY" scripts/bench_bfp.py --device "$DEVICE" --sizes "$SIZES" --rounds "$ROUNDS" \
  --min-time "$MINTIME" --out "$OUTDIR/bfp-fused-$DEVICE-micro.md"

echo "== 3. libra bench, model part (baseline, each component, all three; peak CUDA memory)"
timeout 300 "$PY" -m harness.cli bench --device "$DEVICE" "${AMP[@]}" --what model "${BENCH_ARGS[@]}" \
  --out "$OUTDIR" --name "$NAME"
echo "== done $(date -u +%FT%TZ)"
