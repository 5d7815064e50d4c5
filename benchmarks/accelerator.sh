#!/usr/bin/env bash
# One accelerator session's measurements in one command, under one wall-clock budget (ACCELERATOR_BUDGET_S,
# default 540 s, so that a 570 s device limit leaves room for the start):
#   (1) the full-config CelebA-HQ step's parts in bfloat16, batch 4, timed one by one (benchmarks/components.py),
#       cheapest first: each compiles alone and prints its figure as soon as it has one, a part far below the
#       others' FLOP rate is the thing to fix, and when all ran, their weighted sum estimates the step
#       (`step_estimate`: images/s and MFU). Their convolutions are the step's, so the autotuning results they
#       leave in the cache spare the step's compile most of its autotuning;
#   (2) the whole step (the figure that matters: images/s; MFU from FLOPs counted on any machine);
#   (3) the parts on the small config, which compiles in seconds, if time is left.
# Each run gets what is left of the budget minus a reserve for the later ones. Result lines (JSON) go to
# results.jsonl, everything with timestamped progress to log.txt, so a run cut off still says where it was.
#
#   bash benchmarks/accelerator.sh [results.jsonl] [log.txt] [cache_out_dir]
#
# XLA must autotune on GPUs: with --xla_gpu_autotune_level=0 it takes the first cuDNN configuration that
# compiles, and the convolutions ran at ~0.5 TFLOP/s on an H200 (docs/benchmarks.md). Autotuning is most of
# the compile time, so it is kept cheap (level 1: no buffer initialisation or result checks; cuBLAS instead
# of Triton GEMM tilings; no fusion-emitter autotuning) and cached: XLA's per-instruction autotuning results
# and JAX's compiled executables go to a cache folder. With cache_out_dir the script packs them there
# (autotune.tgz, jax.tgz.partNN of 15 MiB), and a later session that carries them back as .gpu_cache/
# starts from them: the same code on the same jaxlib and GPU skips the compile entirely, other code skips
# the autotuning of every convolution and GEMM it shares.
set -u
out="${1:-/dev/null}"
log="${2:-/dev/null}"
cache_out="${3:-}"
deadline=$((SECONDS + ${ACCELERATOR_BUDGET_S:-540}))
cache=/tmp/midms_gpu_cache
mkdir -p "$cache/jax" "$cache/autotune"
if ls .gpu_cache/autotune.tgz >/dev/null 2>&1; then tar xzf .gpu_cache/autotune.tgz -C "$cache"; fi
if ls .gpu_cache/jax.tgz.part* >/dev/null 2>&1; then cat .gpu_cache/jax.tgz.part* | tar xzf - -C "$cache"; fi
echo "cache: $(find "$cache" -type f | wc -l) files carried in" | tee -a "$log"

export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
export JAX_COMPILATION_CACHE_DIR="$cache/jax" JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=1
XLA_FLAGS="${XLA_FLAGS:-} $(python3 benchmarks/known_xla_flags.py --xla_gpu_autotune_level=1 \
  --xla_gpu_enable_triton_gemm=false --xla_gpu_experimental_enable_fusion_autotuner=false \
  --xla_gpu_per_fusion_autotune_cache_dir="$cache/autotune")"
export XLA_FLAGS
echo "XLA_FLAGS=$XLA_FLAGS" | tee -a "$log"
parts=(python3 benchmarks/components.py --matmul_precision=default --iters=5)
train=(python3 benchmarks/train_step.py --config=configs/celebahq.py --phase=main --iters=5
       --matmul_precision=default --nocount_flops --config.dtype=bfloat16)

run() {  # run <seconds to leave for later runs> <command...>: results to stdout and $out, everything to $log
  local limit=$((deadline - SECONDS - $1)); shift
  echo "### $* (limit ${limit} s)" | tee -a "$log"
  if [ "$limit" -lt 30 ]; then echo "### skipped: budget spent" | tee -a "$log"; return; fi
  timeout "$limit" "$@" 2>&1 | grep -v "^W0000\|^I0000\|WARNING: All log messages" | tee -a "$log" \
    | tee >(grep '^{' >>"$out") | grep -E '^\{|^\[|Error|error'
  echo "### exit ${PIPESTATUS[0]}" | tee -a "$log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
run 300 "${parts[@]}" --config=configs/celebahq.py --per_device_batch=4 --config.dtype=bfloat16 \
  --parts=encode,decode,losses,unet,initial_matching,interleaved_loop
run 15 "${train[@]}" --per_device_batch=4 --config.attention_chunk=1024 --config.midms.warp_chunk=1024
run 10 "${parts[@]}" --config=configs/celebahq.py:cpu_small --per_device_batch=8 --config.dtype=bfloat16

if [ -n "$cache_out" ]; then  # the executables only when they fit what a session brings back (64 MiB in all)
  tar czf "$cache_out/autotune.tgz" -C "$cache" autotune
  tar czf /tmp/jax.tgz -C "$cache" jax
  if [ "$(stat -c %s /tmp/jax.tgz)" -le $((45 << 20)) ]; then split -b 15m -d /tmp/jax.tgz "$cache_out/jax.tgz.part"; fi
  echo "cache: autotune.tgz $(du -h "$cache_out/autotune.tgz" | cut -f1), executables $(du -h /tmp/jax.tgz | cut -f1)" \
       "($(ls "$cache_out" | grep -c jax.tgz.part) parts out)" | tee -a "$log"
fi
