"""Inference benchmark: images/s, compile time and XLA's peak-memory estimate of the translation every tool runs
(``inference.compiled``: each pair on its own, with its own key, in the inference loop).

    python benchmarks/translate.py --config=configs/celebahq.py --batch_size=4 --iters=5
    python benchmarks/translate.py --config=configs/celebahq.py:tiny --batch_size=2 --no_refine

Random weights (``random_inputs``: speed does not depend on them). Runs the whole jitted translation: encode, initial
matching, the 4-step interleaved loop (ref path only), the 20-step refinement unless --no_refine,
decode. The official code also runs the src path and the original-loss sample and decodes 6 more
images at inference (5 of its 29 U-Net calls and 6 of 7 decodes do not reach the output): compare
with its timings knowing that this skips them. Prints one JSON line; timings are medians.
``--config.dtype=bfloat16`` for mixed precision; ``flops`` / ``mfu`` as in benchmarks/train_step.py.
"""

import json
import statistics
import time

import jax
from absl import app, flags
from ml_collections import config_flags

import random_inputs  # benchmarks/random_inputs.py: the script's own directory is on sys.path
from midms_jax import flops, inference, platform_tuning
from midms_jax.models import build

_CONFIG = config_flags.DEFINE_config_file("config", "configs/celebahq.py", "model config")
_BATCH = flags.DEFINE_integer("batch_size", 1, "images per call")
_ITERS = flags.DEFINE_integer("iters", 5, "timed calls after the first (compiling) one")
_NO_REFINE = flags.DEFINE_bool("no_refine", False, "skip the eta=1 refinement")
_PRECISION = flags.DEFINE_enum(
    "matmul_precision",
    "highest",
    ["default", "high", "highest"],
    "jax_default_matmul_precision (parity needs highest)",
)


def main(argv):
  del argv
  jax.config.update("jax_default_matmul_precision", _PRECISION.value)
  config = _CONFIG.value
  model, translate = inference.compiled(config, refine=not _NO_REFINE.value)
  variables, _ = jax.device_put(random_inputs.random_variables(config))
  res, channels = config.model.first_stage.resolution, config.model.correspondence.label_channels
  batch = _BATCH.value
  condition = jax.random.uniform(jax.random.PRNGKey(1), (batch, res, res, channels))
  exemplar = jax.random.uniform(jax.random.PRNGKey(2), (batch, res, res, 3), minval=-1, maxval=1)
  keys = lambda seed: inference.pair_keys(seed, 0, batch)

  call_flops = flops.count_flops(
      translate,
      variables,
      condition,
      exemplar,
      condition,
      keys(3),
      cond_fraction=len(model.settings.rewarp_steps) / len(model.loop.t),
  )
  start = time.perf_counter()
  lowered = translate.lower(variables, condition, exemplar, condition, keys(3))
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  times = []
  for i in range(_ITERS.value + 1):
    start = time.perf_counter()
    jax.block_until_ready(compiled(variables, condition, exemplar, condition, keys(4 + i)))
    times.append(time.perf_counter() - start)
  step_s = statistics.median(times[1:]) if len(times) > 1 else times[0]
  peak = None
  if memory is not None:
    peak = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        + memory.temp_size_in_bytes
        - memory.alias_size_in_bytes
    )
  device = str(jax.devices()[0].device_kind)
  peak_flops = flops.peak_flops(device, config.dtype)
  print(
      json.dumps(
          dict(
              device=device,
              backend=jax.default_backend(),
              dtype=config.dtype,
              batch_size=batch,
              resolution=res,
              refine=not _NO_REFINE.value,
              compile_s=round(compile_s, 2),
              first_call_s=round(times[0], 3),
              median_call_s=round(step_s, 4),
              images_per_s=round(batch / step_s, 3),
              tflops_per_call=round(call_flops / 1e12, 3),
              mfu=round(call_flops / step_s / peak_flops, 4) if peak_flops else None,
              xla_peak_bytes=peak,
              xla_temp_bytes=None if memory is None else memory.temp_size_in_bytes,
              params=sum(build.count_params(v) for v in variables.values()),
          )
      )
  )


if __name__ == "__main__":
  platform_tuning.set_xla_flags()
  app.run(main)
