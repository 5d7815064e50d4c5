#!/usr/bin/env bash
# One accelerator session (about 9 minutes): the full CelebA-HQ config's training step in bfloat16 at two
# batch sizes. Each result line is a JSON object (see benchmarks/train_step.py); timestamped progress
# (init, lowering, XLA compile) goes to the log so that a run cut off by its limit still says where it was.
#
#   bash benchmarks/accelerator.sh [results.jsonl] [log.txt]
#
# FLOPs are not counted here (--nocount_flops): they do not depend on the device, so count them on any
# machine with the same flags and divide (docs/benchmarks.md). A persistent compilation cache lets the
# second run reuse the first one's compiled initialisers.
set -u
out="${1:-/dev/null}"
log="${2:-/dev/null}"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-/tmp/midms_jax_cache}"
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=1
train=(python3 benchmarks/train_step.py --config=configs/celebahq.py --phase=main --iters=5
       --matmul_precision=default --nocount_flops --config.dtype=bfloat16)

run() {  # run <seconds> <command...>: results to stdout and $out, everything to $log
  local limit=$1; shift
  echo "### $*" | tee -a "$log"
  timeout "$limit" "$@" 2>&1 | grep -v "^W0000\|^I0000\|WARNING: All log messages" | tee -a "$log" \
    | tee >(grep '^{' >>"$out") | grep -E '^\{|^\[|Error|error'
  echo "### exit ${PIPESTATUS[0]}" | tee -a "$log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
run 300 "${train[@]}" --per_device_batch=4
run 200 "${train[@]}" --per_device_batch=8 --config.remat=unet_blocks
