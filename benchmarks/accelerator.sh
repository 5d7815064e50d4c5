#!/usr/bin/env bash
# One accelerator session (about 9 minutes), each run cut off by its own limit so a slow one cannot eat the
# rest: (1) the step's parts timed one by one (benchmarks/components.py) on the small config, which compiles
# in seconds, then (2) on the full CelebA-HQ config in bfloat16 (a part far below the others' FLOP rate is
# the thing to fix), then (3) the whole full-config training step in bfloat16 with both chunk options.
# Each result line is a JSON object; timestamped progress (lowering, XLA compile) goes to the log so that
# a run cut off by its limit still says where it was.
#
#   bash benchmarks/accelerator.sh [results.jsonl] [log.txt]
#
# The step's FLOPs are not counted on the device (--nocount_flops): they do not depend on it, so count them
# on any machine with the same flags and divide (docs/benchmarks.md). A persistent compilation cache lets
# later runs reuse earlier compiles.
set -u
out="${1:-/dev/null}"
log="${2:-/dev/null}"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-/tmp/midms_jax_cache}"
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=1
parts=(python3 benchmarks/components.py --matmul_precision=default --iters=5)
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
run 100 "${parts[@]}" --config=configs/celebahq.py:cpu_small --per_device_batch=8 --config.dtype=bfloat16
run 200 "${parts[@]}" --config=configs/celebahq.py --per_device_batch=4 --config.dtype=bfloat16
XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=0" run 200 "${train[@]}" --per_device_batch=4 \
  --config.attention_chunk=1024 --config.midms.warp_chunk=1024
