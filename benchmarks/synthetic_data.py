"""Synthetic data throughput: samples/s of ``midms_jax.data.synthetic`` on one CPU core (numpy only).

    python benchmarks/synthetic_data.py --image_size=32 --count=2000

Each sample renders the ground truth and the exemplar (two images and two condition maps).
Prints one JSON line: samples per wall-clock second and per CPU second of this process (the
latter is the fairer number on a shared machine).
"""

import json
import time

from absl import app, flags

from midms_jax import platform_tuning
from midms_jax.data import synthetic

_SIZE = flags.DEFINE_integer("image_size", 32, "image side")
_COUNT = flags.DEFINE_integer("count", 2000, "samples to generate")
_MAX_OBJECTS = flags.DEFINE_integer("max_objects", 4, "objects per scene, at most")


def main(argv):
  del argv
  config = synthetic.SyntheticConfig(image_size=_SIZE.value, max_objects=_MAX_OBJECTS.value)
  source = synthetic.SyntheticSource(config)
  source[0]  # warm-up
  wall, cpu = time.perf_counter(), time.process_time()
  for index in range(_COUNT.value):
    source[index]
  wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
  print(
      json.dumps(
          dict(
              image_size=_SIZE.value,
              max_objects=_MAX_OBJECTS.value,
              samples=_COUNT.value,
              samples_per_s=round(_COUNT.value / wall, 1),
              samples_per_cpu_s=round(_COUNT.value / cpu, 1),
          )
      )
  )


if __name__ == "__main__":
  platform_tuning.set_xla_flags()
  app.run(main)
