#!/usr/bin/env bash
# One accelerator session: full CelebA-HQ config, training step and translation, bf16 and fp32, then the
# parity tests on the device. Each line of results is a JSON object (see benchmarks/train_step.py).
#
#   bash benchmarks/accelerator.sh [results.jsonl]
#
# Every run has its own time limit so that one slow compile cannot eat the others' time; a run that
# fails (e.g. out of memory) is reported and the next one starts.
set -u
out="${1:-/dev/null}"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
cfg=configs/celebahq.py
train=(python3 benchmarks/train_step.py "--config=$cfg" --phase=main --iters=5 --matmul_precision=default)

run() {  # run <seconds> <command...>: results to stdout and $out
  local limit=$1; shift
  echo "### $*"
  timeout "$limit" "$@" 2>&1 | grep -v "^W0000\|^I0000\|WARNING: All log messages" | tee -a "$out" | grep -E '^\{|Error|error' || echo "### exit ${PIPESTATUS[0]}"
}

python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
run 200 "${train[@]}" --config.dtype=bfloat16 --per_device_batch=4
run 150 "${train[@]}" --per_device_batch=1
run 150 python3 benchmarks/translate.py "--config=$cfg" --config.dtype=bfloat16 --batch_size=8 --matmul_precision=default
