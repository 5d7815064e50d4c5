"""Where arrays live: the (``data``, ``fsdp``) device mesh, the shardings of batches and training
states, and the one jitted-step helper both training stages (MIDMs and LDM) use.

The mesh spans every device of every host; a batch is split over both axes (every device takes its
rows). With ``fsdp`` = 1 parameters and optimiser state are replicated and GSPMD inserts the
gradient all-reduce: plain data parallelism. With ``fsdp`` = k > 1 (``config.train.fsdp``) each
parameter and its optimiser moments are split k ways along their largest dimension divisible by k
(``split_shardings``), so a large model's state takes 1/k of the memory per device; a step gathers
the parameters whole (``whole_parameters``) and GSPMD reduce-scatters their gradients (ZeRO-3
style).
"""

from typing import Any, Callable, Mapping

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)  # the batch is split over every device
# smaller leaves (biases, norms) stay replicated: splitting them saves nothing
MIN_FSDP_ELEMENTS = 2**14


def data_mesh(devices=None, fsdp: int = 1) -> Mesh:
  """The (``data``, ``fsdp``) mesh over every device of every process (or the given ones): ``fsdp``
  devices share each parameter, ``devices / fsdp`` groups of them run data parallel."""
  devices = list(jax.devices() if devices is None else np.asarray(devices).reshape(-1))
  if fsdp < 1 or len(devices) % fsdp:
    raise ValueError(f"fsdp={fsdp} must divide the {len(devices)} devices")
  return jax.make_mesh(
      (len(devices) // fsdp, fsdp), BATCH_AXES, (AxisType.Auto,) * 2, devices=devices
  )


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def fsdp_spec(shape: tuple[int, ...], fsdp: int) -> PartitionSpec:
  """Splits the largest dimension divisible by ``fsdp`` over the ``fsdp`` axis; leaves below
  ``MIN_FSDP_ELEMENTS`` or without such a dimension stay replicated."""
  if fsdp == 1 or int(np.prod(shape)) < MIN_FSDP_ELEMENTS:
    return PartitionSpec()
  divisible = [axis for axis, size in enumerate(shape) if size % fsdp == 0]
  if not divisible:
    return PartitionSpec()
  axis = max(divisible, key=lambda a: shape[a])
  return PartitionSpec(*(FSDP_AXIS if a == axis else None for a in range(len(shape))))


def split_shardings(tree: Any, mesh: Mesh) -> Any:
  """Per-leaf ``NamedSharding`` of a (possibly abstract) tree of parameters or optimiser moments:
  ``fsdp_spec`` over the mesh's ``fsdp`` axis."""
  fsdp = mesh.shape[FSDP_AXIS]
  return jax.tree_util.tree_map(
      lambda leaf: NamedSharding(mesh, fsdp_spec(np.shape(leaf), fsdp)), tree
  )


def whole_parameters(params: Any, mesh: Mesh | None) -> Any:
  """``params`` gathered whole on every device of ``mesh`` (unchanged without one), for a step's
  forward and backward pass: with ``fsdp`` split parameters, XLA would otherwise split layers along
  the parameters' split axis and move activations between devices (all-to-all); the gradients are
  reduce-scattered back.
  """
  return params if mesh is None else jax.lax.with_sharding_constraint(params, replicated(mesh))


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places a pytree on every device of the mesh, as the steps' outputs are: the first call then
  hits the same compiled step as every later one (an unplaced input would compile a second
  variant)."""
  return jax.device_put(tree, replicated(mesh))


def global_batch(mesh: Mesh, local_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
  """Assembles the global batch from this host's part
  (``jax.make_array_from_process_local_data``)."""
  sharding = batch_sharding(mesh)
  return {
      k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
      for k, v in local_batch.items()
  }


def jit_step(step: Callable, mesh: Mesh | None, state_sharding: Any = None) -> Callable:
  """``step(state, frozen, batch) -> (state, metrics)`` jitted with the state donated. With a
  ``mesh``: the batch split over all its devices, ``frozen`` and the metrics replicated, the state
  placed as ``state_sharding`` (None: replicated); without one, plain ``jax.jit``."""
  if mesh is None:
    return jax.jit(step, donate_argnums=0)
  state = replicated(mesh) if state_sharding is None else state_sharding
  return jax.jit(
      step,
      in_shardings=(state, replicated(mesh), batch_sharding(mesh)),
      out_shardings=(state, replicated(mesh)),
      donate_argnums=0,
  )
