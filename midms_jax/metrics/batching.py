"""Batched, device-sharded application of a jitted function to host arrays (the metrics' feature
extraction).

``map_batches(fn, arrays, batch_size=...)`` cuts the arrays' leading axis into batches of one size
(a multiple of the device count, the last batch padded by repeating its last row, so one compilation
serves all), places each batch split over every device of the mesh (``sharding.data_mesh``: all
devices of this host), calls ``fn(*constants, *batch)`` and returns the outputs' leading rows
concatenated on the host. ``constants`` (model variables) should be placed once with ``replicate``.
Single host: the batches are host arrays.
"""

from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from midms_jax import sharding


def default_mesh() -> Mesh:
  """Every device, one data-parallel axis (the training mesh with ``fsdp=1``)."""
  return sharding.data_mesh()


def replicate(tree: Any, mesh: Mesh | None = None) -> Any:
  """``tree`` placed whole on every device of ``mesh`` (default: ``default_mesh()``)."""
  return sharding.replicate(tree, mesh or default_mesh())


def rows_per_batch(batch_size: int, count: int, devices: int) -> int:
  """At most ``batch_size`` rows (never more than ``count`` needs), rounded up to a multiple of
  ``devices``."""
  rows = max(1, min(batch_size, count))
  return -(-rows // devices) * devices


def map_batches(
    fn: Callable[..., Any],
    arrays: Sequence[np.ndarray],
    *,
    batch_size: int,
    constants: Sequence[Any] = (),
    mesh: Mesh | None = None,
) -> Any:
  """``fn(*constants, *batch)`` over the leading axis of ``arrays`` (one length), outputs
  concatenated (a pytree of numpy arrays with that leading axis). ``fn`` should be jitted once by
  the caller."""
  count = len(arrays[0])
  if count == 0 or any(len(a) != count for a in arrays):
    raise ValueError(
        f"map_batches: need arrays of one non-zero length, got {[len(a) for a in arrays]}"
    )
  mesh = mesh or default_mesh()
  batch_sharding = sharding.batch_sharding(mesh)
  rows = rows_per_batch(batch_size, count, mesh.size)
  outputs = []
  for start in range(0, count, rows):
    chunk = [np.asarray(a[start : start + rows]) for a in arrays]
    real = len(chunk[0])
    chunk = [
        np.concatenate([c, np.repeat(c[-1:], rows - real, axis=0)]) if real < rows else c
        for c in chunk
    ]
    out = fn(*constants, *(jax.device_put(c, batch_sharding) for c in chunk))
    outputs.append(jax.tree_util.tree_map(lambda o, n=real: np.asarray(o)[:n], out))
  return jax.tree_util.tree_map(lambda *parts: np.concatenate(parts), *outputs)
