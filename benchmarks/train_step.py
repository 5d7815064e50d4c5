"""Training-step benchmark: step time, images/s, compile time and XLA's memory analysis.

    python benchmarks/train_step.py --config=configs/celebahq.py --per_device_batch=1 --phase=main
    python benchmarks/train_step.py --config=configs/celebahq.py --config.dtype=bfloat16 --config.remat=unet_blocks
    python benchmarks/train_step.py --config=configs/synthetic.py --per_device_batch=2 --phase=both

Random weights and a random batch (``random_inputs``; speed does not depend on them), the VGG19 loss
network's too when the config uses it. The step is the one ``train.py`` runs: ``jax.jit`` over a ``data``
mesh of every device, state donated. ``--phase``: ``warmup`` (matching only, U-Net frozen), ``main``
(interleaved, U-Net trained) or ``both``. Prints one JSON line per phase; times are medians.
``flops`` counts matrix-multiply and convolution FLOPs on the step's jaxpr (``midms_jax.flops``: loop
steps included, each re-warp counted where it runs); ``mfu`` divides them by the step time and the
devices' data-sheet peak for ``config.dtype``. ``--compile_only`` reports compile time and memory
without running (e.g. to find the largest batch that fits a device).
"""

import json
import statistics
import time

import jax
from absl import app, flags
from ml_collections import config_flags

import random_inputs  # benchmarks/random_inputs.py: the script's own directory is on sys.path
from progress import progress  # benchmarks/progress.py
from midms_jax import flops, optim, platform_tuning, sharding, train_step
from midms_jax.midms.model import MIDMs

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/celebahq.py", "model and training config"
)
_PER_DEVICE = flags.DEFINE_integer(
    "per_device_batch", 1, "examples per device (global batch = this x devices)"
)
_ITERS = flags.DEFINE_integer("iters", 5, "timed steps after the first (compiling) one")
_PHASE = flags.DEFINE_enum(
    "phase", "both", ["warmup", "main", "both"], "which compiled step to time"
)
_COMPILE_ONLY = flags.DEFINE_bool("compile_only", False, "compile and report memory, do not run")
_COUNT_FLOPS = flags.DEFINE_bool(
    "count_flops", True, "trace the step once more to count its FLOPs (for MFU)"
)
_PRECISION = flags.DEFINE_enum(
    "matmul_precision", "default", ["default", "high", "highest"], "jax_default_matmul_precision"
)


def step_inputs(config, mesh, global_batch: int, abstract: bool):
  """(state, frozen variables, batch) of random values on the devices (``random_inputs``: drawn on
  the host from the shapes, since Flax's init compiles the whole forward pass); with ``abstract``
  only their shapes, which is all lowering, compiling and FLOP counting need."""
  if abstract:
    return random_inputs.abstract_step_inputs(config, global_batch)
  tx = optim.make_optimizer(config.train, freeze_unet=True)
  batch = random_inputs.random_batch(config, global_batch)
  variables, vgg_variables = random_inputs.random_variables(config)
  state = jax.jit(lambda v: train_step.create_train_state(v, tx))(variables)
  frozen = train_step.frozen_variables(variables, vgg_variables)
  return (
      sharding.replicate(state, mesh),
      sharding.replicate(frozen, mesh),
      sharding.global_batch(mesh, batch),
  )


def _memory(compiled) -> dict[str, int] | None:
  analysis = compiled.memory_analysis()
  if analysis is None:
    return None
  fields = (
      "argument_size_in_bytes",
      "output_size_in_bytes",
      "temp_size_in_bytes",
      "alias_size_in_bytes",
  )
  return {f.replace("_size_in_bytes", "_mb"): round(getattr(analysis, f) / 2**20) for f in fields}


def time_phase(step, state, frozen, batch, iters: int) -> tuple[dict, object]:
  start = time.perf_counter()
  lowered = step.lower(state, frozen, batch)
  lower_s = time.perf_counter() - start
  progress(f"lowered in {lower_s:.1f} s; compiling")
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  progress(f"compiled in {compile_s - lower_s:.1f} s")
  if _COMPILE_ONLY.value:
    return (
        dict(compile_s=round(compile_s, 1), lower_s=round(lower_s, 1), memory=_memory(compiled)),
        state,
    )
  times = []
  for i in range(iters + 1):
    start = time.perf_counter()
    state, metrics = compiled(state, frozen, batch)
    jax.block_until_ready(metrics["loss_total"])
    times.append(time.perf_counter() - start)
    progress(
        f"step {i} took {times[-1]:.3f} s"
        + (" (first: includes transfers and warm-up)" if i == 0 else "")
    )
  step_s = statistics.median(times[1:]) if iters else times[0]
  return (
      dict(
          compile_s=round(compile_s, 1),
          lower_s=round(lower_s, 1),
          step_s=round(step_s, 4),
          memory=_memory(compiled),
      ),
      state,
  )


def main(argv):
  del argv
  progress(f"devices: {jax.devices()}")
  jax.config.update("jax_default_matmul_precision", _PRECISION.value)
  config = _CONFIG.value
  mesh = sharding.data_mesh()
  global_batch = _PER_DEVICE.value * mesh.size
  config.train.batch_size = global_batch
  model = MIDMs.from_config(config)
  state, frozen, batch = step_inputs(config, mesh, global_batch, abstract=_COMPILE_ONLY.value)
  progress(
      "state and batch shapes (--compile_only)"
      if _COMPILE_ONLY.value
      else "state and batch on the devices"
  )
  steps = train_step.make_train_steps(model, config, steps_per_epoch=1000, mesh=mesh)
  phases = ("warmup", "main") if _PHASE.value == "both" else (_PHASE.value,)
  device = jax.devices()[0].device_kind
  peak = flops.peak_flops(device, config.dtype)
  rewarp_fraction = len(config.midms.rewarp_steps) / config.midms.interleave_steps
  for phase in phases:
    step = getattr(steps, phase)
    step_flops = None
    if _COUNT_FLOPS.value:
      step_flops = flops.count_flops(step, state, frozen, batch, cond_fraction=rewarp_fraction)
      progress(f"{phase}: counted {step_flops / 1e12:.2f} TFLOP per step")
    result, state = time_phase(step, state, frozen, batch, _ITERS.value)
    if "step_s" in result:
      result["images_per_s"] = round(global_batch / result["step_s"], 2)
      result["mfu"] = (
          round(step_flops / result["step_s"] / (peak * mesh.size), 4)
          if peak and step_flops
          else None
      )
    print(
        json.dumps(
            dict(
                config=config.data.name,
                phase=phase,
                dtype=config.dtype,
                remat=config.remat,
                devices=mesh.size,
                device=device,
                global_batch=global_batch,
                tflops_per_step=step_flops and round(step_flops / 1e12, 3),
                **result,
            )
        ),
        flush=True,
    )


if __name__ == "__main__":
  platform_tuning.set_xla_flags()
  app.run(main)
