"""Random inputs for the benchmarks: model variables made on the host from their shapes, and
batches.

``build.init_variables`` runs each network's Flax ``init``: it traces and compiles the whole forward
pass, which takes minutes for the full configs on XLA:CPU and ~2 minutes on a GPU (a tenth of a
device session). Speed does not depend on the values, only on their scale staying sane (no overflow,
no denormals), so the benchmarks fill the abstract shapes (``jax.eval_shape``) with NumPy draws
instead: weight tensors get ``N(0, 1/fan_in)`` (fan-in: all but the last axis, Flax's kernel
layout), vectors named ``scale`` ones, ``bias`` zeros, other vectors (spectral-norm ``u``/``v``)
unit-norm draws, scalars and integers zeros.
"""

from typing import Any

import jax
import numpy as np

from midms_jax import ldm, optim, train_step
from midms_jax.losses import vgg
from midms_jax.models import vgg as trunks
from midms_jax.models import build


def _fill(path, leaf: jax.ShapeDtypeStruct, rng: np.random.Generator) -> np.ndarray:
  shape, dtype = tuple(leaf.shape), np.dtype(leaf.dtype)
  name = str(getattr(path[-1], "key", path[-1])) if path else ""
  if not np.issubdtype(dtype, np.floating) or len(shape) == 0:
    return np.zeros(shape, dtype)
  if len(shape) == 1:
    if name == "scale":
      return np.ones(shape, dtype)
    if name == "bias":
      return np.zeros(shape, dtype)
    draw = rng.standard_normal(shape)
    return (draw / np.linalg.norm(draw)).astype(dtype)
  fan_in = int(np.prod(shape[:-1]))
  return (rng.standard_normal(shape, dtype=np.float32) / np.sqrt(fan_in)).astype(dtype)


def random_like(abstract: Any, seed: int = 0) -> Any:
  """A pytree of NumPy arrays with the shapes and dtypes of ``abstract`` (``jax.ShapeDtypeStruct``
  leaves)."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(lambda path, leaf: _fill(path, leaf, rng), abstract)


def abstract_variables(config) -> tuple[dict, dict]:
  """(model variables, loss-network variables or {} without one) of ``config``, as shapes."""
  net = vgg.loss_network(config.loss)
  # all 16 convolutions, as the loaded file has
  every_layer = (("r54",),) if isinstance(net, trunks.VGG19) else ()
  loss_variables = (
      {}
      if net is None
      else jax.eval_shape(
          lambda x: net.init(jax.random.PRNGKey(0), x, *every_layer),
          jax.ShapeDtypeStruct((1, 32, 32, 3), np.float32),
      )
  )
  return build.abstract_variables(config.model), loss_variables


def random_variables(config, seed: int = 0) -> tuple[dict, dict]:
  """``abstract_variables(config)`` filled by ``random_like`` (NumPy arrays)."""
  return random_like(abstract_variables(config), seed)


def random_batch(config, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
  """A batch of the shapes the pipeline yields: images in [-1, 1], conditions in [0, 1]."""
  rng = np.random.default_rng(seed)
  size, channels = config.data.crop_size, config.model.correspondence.label_channels
  image = lambda: rng.uniform(-1, 1, (batch_size, size, size, 3)).astype(np.float32)
  label = lambda: rng.uniform(0, 1, (batch_size, size, size, channels)).astype(np.float32)
  return dict(image=image(), ref=image(), label=label(), label_ref=label())


def abstract_step_inputs(config, global_batch: int) -> tuple[Any, dict, dict]:
  """(train state, frozen variables, batch) of a MIDMs training step as shapes: all that lowering,
  compiling and FLOP counting need."""
  tx = optim.make_optimizer(config.train, freeze_unet=True)
  variables, vgg_variables = abstract_variables(config)
  state = jax.eval_shape(lambda v: train_step.create_train_state(v, tx), variables)
  batch = {
      k: jax.ShapeDtypeStruct(v.shape, v.dtype)
      for k, v in random_batch(config, global_batch).items()
  }
  return state, train_step.frozen_variables(variables, vgg_variables), batch


def abstract_ldm_step_inputs(config, global_batch: int) -> tuple[Any, dict, dict]:
  """(LDM train state, frozen first stage, image batch) of an LDM-stage step (``ldm.make_step``) as
  shapes."""
  variables, _ = abstract_variables(config)
  state = jax.eval_shape(
      lambda p: ldm.create_state(p, ldm.make_optimizer(config.ldm)), variables["unet"]["params"]
  )
  image = random_batch(config, global_batch)["image"]
  return (
      state,
      {"first_stage": variables["first_stage"]},
      {"image": jax.ShapeDtypeStruct(image.shape, image.dtype)},
  )
