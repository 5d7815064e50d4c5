"""The collectives in the compiled training steps on a mesh of simulated CPU devices: what a pod would move.

    python benchmarks/collectives.py --config=configs/celebahq.py:tiny --devices=8 --fsdp=1
    python benchmarks/collectives.py --config=configs/celebahq.py:tiny --devices=8 --fsdp=4 --stage=ldm

Compiles the MIDMs stage's warm-up and interleaved steps (or the LDM stage's step) for ``--devices`` CPU
devices (a (data, fsdp) mesh, global batch ``per_device_batch x devices``) from abstract shapes, nothing run,
and prints per step a JSON line with the count of each collective in the optimised program. A data-parallel
step needs only reductions (gradients, metrics) and, with ``--fsdp``, parameter all-gathers; a
collective-permute or all-to-all moves activations between devices and is a bug (``layers.join_batches``,
``sharding.whole_parameters``). ``--list`` prints each collective other than a reduction with its shape.
"""

import os
import sys

_DEVICES_FLAG = "--devices="
_devices = next((a[len(_DEVICES_FLAG) :] for a in sys.argv if a.startswith(_DEVICES_FLAG)), "8")
# The simulated devices, before JAX starts its backends.
os.environ["XLA_FLAGS"] = (
    f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={_devices}"
)
os.environ["JAX_PLATFORMS"] = "cpu"

import json  # pylint: disable=wrong-import-position

from absl import app, flags  # pylint: disable=wrong-import-position
from ml_collections import config_flags  # pylint: disable=wrong-import-position

import random_inputs  # benchmarks/random_inputs.py  # pylint: disable=wrong-import-position
from collective_census import activation_moves, collective_census  # pylint: disable=wrong-import-position
from progress import progress  # benchmarks/progress.py  # pylint: disable=wrong-import-position
from midms_jax import ldm, platform_tuning, sharding, train_step  # pylint: disable=wrong-import-position
from midms_jax.midms.model import MIDMs  # pylint: disable=wrong-import-position

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/celebahq.py:tiny", "model and training config"
)
flags.DEFINE_integer("devices", 8, "simulated CPU devices (read before JAX starts)")
_FSDP = flags.DEFINE_integer("fsdp", 1, "devices sharing each parameter (config.train.fsdp)")
_PER_DEVICE = flags.DEFINE_integer("per_device_batch", 2, "examples per device")
_STAGE = flags.DEFINE_enum("stage", "midms", ["midms", "ldm"], "which training stage's steps")
_LIST = flags.DEFINE_bool(
    "list", False, "print each collective-permute / all-to-all / all-gather with its shape"
)


def midms_steps(model: MIDMs, config, mesh) -> dict[str, tuple]:
  """{phase: (jitted step, abstract arguments)} of the MIDMs stage."""
  state, frozen, batch = random_inputs.abstract_step_inputs(config, config.train.batch_size)
  steps = train_step.make_train_steps(
      model,
      config,
      steps_per_epoch=1000,
      mesh=mesh,
      state_sharding=train_step.state_shardings(state, mesh),
  )
  return {phase: (getattr(steps, phase), (state, frozen, batch)) for phase in ("warmup", "main")}


def ldm_steps(model: MIDMs, config, mesh) -> dict[str, tuple]:
  """{"ldm": (jitted step, abstract arguments)} of the LDM stage, encoding its images."""
  state, frozen, batch = random_inputs.abstract_ldm_step_inputs(config, config.train.batch_size)
  step = ldm.make_step(model, config, mesh, state_sharding=ldm.state_shardings(state, mesh))
  return {"ldm": (step, (state, frozen, batch))}


def main(argv):
  del argv
  config = _CONFIG.value
  mesh = sharding.data_mesh(fsdp=_FSDP.value)
  config.train.batch_size = _PER_DEVICE.value * mesh.size
  model = MIDMs.from_config(config)
  steps = (midms_steps if _STAGE.value == "midms" else ldm_steps)(model, config, mesh)
  for phase, (step, args) in steps.items():
    progress(f"{phase}: compiling for {mesh.size} devices ({dict(mesh.shape)})")
    counts, moving = collective_census(step.lower(*args).compile().as_text())
    print(
        json.dumps(
            dict(
                config=config.data.name,
                phase=phase,
                devices=mesh.size,
                fsdp=_FSDP.value,
                global_batch=config.train.batch_size,
                collectives=counts,
                activation_moves=activation_moves(counts),
            )
        ),
        flush=True,
    )
    if _LIST.value:
      print("\n".join(f"  {m}" for m in moving))


if __name__ == "__main__":
  platform_tuning.set_xla_flags()
  app.run(main)
