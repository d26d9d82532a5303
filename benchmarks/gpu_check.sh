#!/usr/bin/env bash
# fracture_jax on one GPU in one call of at most 8.5 minutes: the Keras parity tests on the GPU
# (float32 at full precision), and benchmarks/train_speed.py for all three models, full
# fine-tune, frozen backbone and inference in bfloat16, inference in float32, with each step's
# model FLOPs and the model FLOP utilisation against the card's dense bf16 peak.
#
#   python benchmarks/fetch_wheels.py .whl        # once, on a machine with network
#   bash benchmarks/gpu_check.sh [OUT_DIR]         # on the GPU machine, with .whl/ beside it
#   PARTS=loop bash benchmarks/gpu_check.sh        # the training loop instead (below)
#
# PARTS (default parity,speed) picks the parts; "loop" runs benchmarks/loop_overhead.py for
# EfficientNetB2's full fine-tune in bfloat16, batch 64, with half the cores as loader
# workers, one step per call and one call per log interval (at most 500 s; writes loop.jsonl).
#
# Compiling dominates: with XLA's autotuning, on an H200, EfficientNetB2's bfloat16 full step
# took 114 s to compile, ResNet50's and VGG16's about 30 s, the inference programs
# 2-23 s. Compiling in parallel processes did not pay: 8 at once, beside the parity tests,
# compiled 12 of 18 programs in 276 s, and the parity tests did not finish (the cause was not
# isolated; XLA's autotuning times its candidate kernels on the one GPU). So the parts run one
# after the other, each time-boxed (after the install: 180 + 240 + 50 s); each record is
# written as soon as it is measured, and the programs go to a persistent compilation cache, so
# a second call on the same machine skips what the first one compiled. On a fresh H200 the
# parity tests once took 137 s and once more than 150 s; with 270 s for bfloat16, models in
# the order EfficientNetB2, ResNet50, VGG16, VGG16's rows were left out. VGG16 and ResNet50
# (about 80 s together) now come first.
#
# Writes to OUT_DIR ($OUT, else ./gpu_check): gpu_check.log and speed.jsonl.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu_check}}
mkdir -p "$out"
exec > >(tee "$out/gpu_check.log") 2>&1
start=$(date +%s)
elapsed() { echo "$(( $(date +%s) - start )) s"; }
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/fracture_site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/fracture_site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 KERAS_BACKEND=jax
export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/fracture_jax_cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=-1
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
echo "GPU: ${gpu:-none}; $(python3 -c 'import jax; print("jax", jax.__version__, jax.devices())')"

parts=",${PARTS:-parity,speed},"
if [[ $parts == *,loop,* ]]; then
  echo "== loop_overhead: EfficientNetB2 full fine-tune, bfloat16, batch 64"
  # (no preallocation: the loader's worker processes import JAX too)
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 500 python3 benchmarks/loop_overhead.py \
    --cases efficientnetb2_full --dtype bfloat16 \
    --workers $(( $(nproc) / 2 )) --steps 40 --repeats 1 --dispatch 1,log 2>/dev/null \
    | grep --line-buffered '^{' | tee -a "$out/loop.jsonl"
fi

if [[ $parts == *,parity,* ]]; then
echo "== parity with keras.applications on the GPU (JAX_DEFAULT_MATMUL_PRECISION=highest)"
# One pytest worker per case: the cases are compile-bound (114-150+ s with 8 workers on an H200).
XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_DEFAULT_MATMUL_PRECISION=highest timeout 180 \
  python3 -m pytest -q -p no:cacheprovider -n 8 tests/test_backbones_parity.py 2>&1 | tail -3
echo "parity done after $(elapsed)"
fi

[[ $parts == *,speed,* ]] && for run in "bfloat16 full,frozen,infer 240" "float32 infer 50"; do
  set -- $run
  echo "== speed, $1: $2"
  timeout "$3" python3 benchmarks/train_speed.py --models vgg16,resnet50,efficientnetb2 \
    --modes "$2" --size 260 --batch 64 --vgg-train-batch 64 --steps 20 --dtype "$1" \
    2>/dev/null | grep --line-buffered '^{' | tee -a "$out/speed.jsonl"
done

case "$gpu" in  # dense bf16 tensor-core peak, TFLOP/s (vendor figures)
  *H100*|*H200*|*GH200*) peak=989.4 ;;
  *A100*) peak=312 ;;
  *L4*) peak=121 ;;
  *) peak=0 ;;
esac
python3 - "$out" "$peak" <<'PY'
import json, sys
from pathlib import Path
out, peak = Path(sys.argv[1]), float(sys.argv[2])
records = out / "speed.jsonl"
for r in map(json.loads, records.read_text().splitlines() if records.exists() else []):
    tf = r.get("achieved_tflop_s") or 0.0
    mfu = f"{100 * tf / peak:.1f}% of {peak:g}" if peak and tf else "n/a"
    print(f"{r['model']:15s} {r['mode']:6s} {r['dtype']:8s} {r['img_per_s_median']:9.1f} img/s"
          f"  {tf:7.1f} TFLOP/s  MFU {mfu}  compile {r['compile_s']:5.1f} s")
PY
echo "total $(elapsed)"
