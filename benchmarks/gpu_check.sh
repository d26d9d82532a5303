#!/usr/bin/env bash
# fracture_jax on one GPU in one call of about 7 minutes: the Keras parity tests on the GPU
# (float32 at full precision), and benchmarks/train_speed.py for all three models, full
# fine-tune, frozen backbone and inference, in bfloat16 and float32, with each step's model
# FLOPs and the model FLOP utilisation against the card's dense bf16 peak.
#
#   python benchmarks/fetch_wheels.py .whl        # once, on a machine with network
#   bash benchmarks/gpu_check.sh [OUT_DIR]         # on the GPU machine, with .whl/ beside it
#
# Compiling dominates (with XLA's autotuning, on an H200, EfficientNetB2's bfloat16 full step
# alone took 114 s), and it runs on the host's cores. So the first phase compiles every timed
# program in parallel processes (one warm-up step each) into a persistent compilation cache,
# while the parity tests run beside them; the second phase times the programs one process at a
# time, loading them from that cache. Every part is time-boxed, and each record is written as
# soon as it is measured, so a cut run keeps what it had.
#
# Writes to OUT_DIR ($OUT, else ./gpu_check): gpu_check.log, parity.log, compile.jsonl (the
# first phase: compile times under that contention) and speed.jsonl (the timed records).
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
speed() {  # batch 64 for every model and mode
  python3 benchmarks/train_speed.py --size 260 --batch 64 --vgg-train-batch 64 "$@"
}

echo "== phase 1: parity tests (JAX_DEFAULT_MATMUL_PRECISION=highest) and compiling, in parallel"
(XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_DEFAULT_MATMUL_PRECISION=highest timeout 270 \
   python3 -m pytest -q -p no:cacheprovider -n 6 tests/test_backbones_parity.py \
   >"$out/parity.log" 2>&1
 echo "parity rc=$? after $(elapsed): $(tail -1 "$out/parity.log")") &
parity=$!
# Longest compiles first; eight at a time, each with the GPU memory it asks for.
for mode in full frozen infer; do
  for model in efficientnetb2 resnet50 vgg16; do
    for dtype in bfloat16 float32; do echo "$model $mode $dtype"; done
  done
done | XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 270 xargs -P 8 -L 1 bash -c \
  "$(declare -f speed); speed --models \$0 --modes \$1 --dtype \$2 --steps 1 \
     2>/dev/null | grep --line-buffered '^{' >>'$out/compile.jsonl'"
echo "compiled $(wc -l <"$out/compile.jsonl") programs after $(elapsed)"
wait "$parity"  # (a bare wait would also wait for the log's tee)
echo "phase 1 done after $(elapsed)"

echo "== phase 2: timing, one process at a time, programs from the cache"
for dtype in bfloat16 float32; do
  timeout 150 bash -c "$(declare -f speed); speed --dtype $dtype --steps 20" 2>/dev/null \
    | grep --line-buffered '^{' | tee -a "$out/speed.jsonl"
done
echo "phase 2 done after $(elapsed)"

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
read = lambda name: [json.loads(l) for l in (out / name).read_text().splitlines()] \
    if (out / name).exists() else []
key = lambda r: (r["model"], r["mode"], r["dtype"])
compiled = {key(r): r["compile_s"] for r in read("compile.jsonl")}
for r in read("speed.jsonl"):
    tf = r.get("achieved_tflop_s") or 0.0
    mfu = f"{100 * tf / peak:.1f}% of {peak:g}" if peak and tf else "n/a"
    print(f"{r['model']:15s} {r['mode']:6s} {r['dtype']:8s} {r['img_per_s_median']:9.1f} img/s"
          f"  {tf:7.1f} TFLOP/s  MFU {mfu}  compile {compiled.get(key(r), float('nan')):5.1f} s"
          f" (phase 1)")
PY
echo "total $(elapsed)"
