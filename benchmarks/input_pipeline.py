"""Input pipeline benchmark: training examples/s of one host, on fake data sets at the real sizes.

    python benchmarks/input_pipeline.py                                     # all three, 0 and 2 workers
    python benchmarks/input_pipeline.py --datasets=celebahq --workers=4 --step_time_s=1.9 --global_batch=8

For each data set, ``midms_jax.data.fake_layouts`` writes ``--examples`` training photos in the official
layout at the real sizes (CelebA-HQ 1024 px JPEGs with 512 px part masks, DeepFashion 256 x 176 with pose
files, LSUN church 256 x 341 with label maps; a real photo blended in, so JPEG decoding costs what it
does on real photos) into a temporary folder, and the real builder prepares it (``prepare.prepare``).
Then ``pipeline.make_dataset`` with the data section of ``configs/<name>.py`` (load 286 / crop 256 for
CelebA-HQ and LSUN church, 256 / 256 for DeepFashion) yields training batches of ``--batch_size``, with
``worker_count`` 0 and ``--workers``. After a warm-up (one batch per worker, so every worker runs),
each timed round takes one batch per worker; examples/s is the median over ``--rounds`` rounds.

Prints one JSON line per data set and worker count. With ``--step_time_s`` and ``--global_batch`` (and
``--hosts``) it adds what one host must deliver to keep up with training, ``global_batch / hosts /
step_time_s`` examples/s, and the ratio: above 1, the pipeline outruns the training step.
"""

import importlib
import json
import os
import pathlib
import statistics
import tempfile
import time

from absl import app, flags

from midms_jax import platform_tuning
from midms_jax.data import fake_layouts, pipeline, prepare, sources

_DATASETS = flags.DEFINE_list("datasets", list(sources.NAMES), "data sets to measure")
_EXAMPLES = flags.DEFINE_integer("examples", 64, "training photos of each fake data set")
_WORKERS = flags.DEFINE_integer("workers", 2, "grain worker processes, measured besides 0")
_BATCH = flags.DEFINE_integer("batch_size", 8, "examples per batch on this host")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "timed rounds (one batch per worker each)")
_TEXTURE = flags.DEFINE_float(
    "texture", 0.5, "share of a real photo in the fake photos (fake_layouts)"
)
_STEP = flags.DEFINE_float(
    "step_time_s", None, "seconds per training step (benchmarks/train_step.py)"
)
_GLOBAL_BATCH = flags.DEFINE_integer(
    "global_batch", None, "examples per training step over all hosts"
)
_HOSTS = flags.DEFINE_integer("hosts", 1, "hosts sharing the global batch")

VALIDATION_EXAMPLES = 2  # the builder needs a validation split; the benchmark does not read it
WRITERS = {  # the real photo sizes
    "celebahq": lambda root, n, texture: fake_layouts.write_celebahq(
        root, n, VALIDATION_EXAMPLES, image_size=1024, mask_size=512, texture=texture
    ),
    "deepfashion": lambda root, n, texture: fake_layouts.write_deepfashion(
        root, n, VALIDATION_EXAMPLES, image_shape=(256, 176), texture=texture
    ),
    "lsun_church": lambda root, n, texture: fake_layouts.write_lsun_church(
        root, n, VALIDATION_EXAMPLES, image_shape=(256, 341), texture=texture
    ),
}


def examples_per_s(data_cfg, batch_size: int, workers: int, rounds: int) -> float:
  """Median examples/s over ``rounds`` rounds of one batch per worker, after one such warm-up
  round."""
  per_round = max(1, workers)
  batches = pipeline.make_dataset(
      data_cfg,
      "train",
      seed=0,
      batch_size=batch_size,
      shard_index=0,
      shard_count=1,
      train=True,
      worker_count=workers,
  )
  with iter(batches) as iterator:
    for _ in range(per_round):
      next(iterator)
    times = []
    for _ in range(rounds):
      start = time.perf_counter()
      for _ in range(per_round):
        next(iterator)
      times.append(time.perf_counter() - start)
  return per_round * batch_size / statistics.median(times)


def needed_per_host() -> float | None:
  """Examples/s one host feeds a training step of ``--global_batch`` every ``--step_time_s`` (None:
  not given)."""
  if _STEP.value is None or _GLOBAL_BATCH.value is None:
    return None
  return _GLOBAL_BATCH.value / _HOSTS.value / _STEP.value


def measure(name: str, workdir: pathlib.Path) -> None:
  """Writes and prepares data set ``name`` in ``workdir``, then prints a JSON line per worker
  count."""
  start = time.perf_counter()
  fake = WRITERS[name](workdir / name, _EXAMPLES.value, _TEXTURE.value)
  prepare.prepare(name, fake.root, workdir / "tfds")
  prepare_s = time.perf_counter() - start
  data_cfg = importlib.import_module(f"configs.{name}").get_config().data
  data_cfg.data_dir = str(workdir / "tfds")
  need = needed_per_host()
  for workers in sorted({0, _WORKERS.value}):
    rate = examples_per_s(data_cfg, _BATCH.value, workers, _ROUNDS.value)
    line = dict(
        dataset=name,
        workers=workers,
        batch_size=_BATCH.value,
        examples_per_s=round(rate, 2),
        photo="x".join(map(str, fake.image_shape)),
        load_size=data_cfg.load_size,
        crop_size=data_cfg.crop_size,
        examples=_EXAMPLES.value,
        cpus=len(os.sched_getaffinity(0)),
        write_and_prepare_s=round(prepare_s, 1),
    )
    if need is not None:
      line.update(step_examples_per_s_per_host=round(need, 2), ratio=round(rate / need, 2))
    print(json.dumps(line), flush=True)


def main(argv):
  del argv
  unknown = sorted(set(_DATASETS.value) - set(sources.NAMES))
  if unknown:
    raise app.UsageError(
        f"--datasets: unknown {', '.join(unknown)} (known: {', '.join(sources.NAMES)})"
    )
  if (_STEP.value is None) != (_GLOBAL_BATCH.value is None):
    raise app.UsageError("--step_time_s and --global_batch go together")
  with tempfile.TemporaryDirectory(prefix="midms-input-benchmark-") as workdir:
    for name in _DATASETS.value:
      measure(name, pathlib.Path(workdir))


if __name__ == "__main__":
  platform_tuning.set_xla_flags()
  app.run(main)
