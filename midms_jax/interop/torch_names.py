"""Mechanical mapping between Flax variables and PyTorch state-dict entries.

Flax modules in ``midms_jax.models`` are named exactly like the official PyTorch modules, so a
variable's path joined with ``.`` is its PyTorch key once the leaf is renamed:

=================  ==============  ===============================================
Flax leaf          PyTorch leaf    layout change (Flax -> PyTorch)
=================  ==============  ===============================================
``kernel`` (4-D)   ``weight``      HWIO -> OIHW (Conv2d)
``kernel`` (3-D)   ``weight``      WIO -> OIW (Conv1d)
``kernel`` (2-D)   ``weight``      (in, out) -> (out, in) (Linear)
``weight_orig``    ``weight_orig`` as ``kernel`` (spectral-norm convs)
``scale``          ``weight``      none (GroupNorm)
``embedding``      ``weight``      none (codebook)
anything else      same name       none (biases, PReLU slope, spectral ``weight_u``/``weight_v``)
=================  ==============  ===============================================

Every collection (``params``, ``spectral``) maps the same way. This module knows nothing about
particular architectures: that keeps import and export symmetric and exhaustive.
"""

from typing import Any, Iterable, Mapping

import numpy as np
from flax import traverse_util

from midms_jax.errors import CheckpointError

_RENAMED = {"kernel": "weight", "scale": "weight", "embedding": "weight"}
_TRANSPOSED = ("kernel", "weight_orig")


def torch_key(path: tuple[str, ...]) -> str:
  """PyTorch state-dict key (without prefix) of the Flax variable at ``path`` (collection
  dropped)."""
  *modules, leaf = path
  return ".".join([*modules, _RENAMED.get(leaf, leaf)])


def _permutation(leaf: str, ndim: int) -> tuple[int, ...] | None:
  if leaf not in _TRANSPOSED or ndim < 2:
    return None
  # Flax (*spatial, in, out) -> PyTorch (out, in, *spatial).
  return (ndim - 1, ndim - 2, *range(ndim - 2))


def to_torch_layout(leaf: str, array: np.ndarray) -> np.ndarray:
  perm = _permutation(leaf, array.ndim)
  return array if perm is None else np.transpose(array, perm)


def from_torch_layout(leaf: str, array: np.ndarray) -> np.ndarray:
  perm = _permutation(leaf, array.ndim)
  return array if perm is None else np.transpose(array, np.argsort(perm))


def torch_shape(leaf: str, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
  perm = _permutation(leaf, len(flax_shape))
  return tuple(flax_shape) if perm is None else tuple(flax_shape[i] for i in perm)


def _flat_variables(variables: Mapping[str, Any]) -> dict[tuple[str, ...], Any]:
  """{(collection, *path): leaf} for every variable."""
  return traverse_util.flatten_dict(dict(variables))


def expected_torch_keys(
    abstract_variables: Mapping[str, Any], prefix: str = ""
) -> dict[str, tuple[int, ...]]:
  """{PyTorch key: PyTorch shape} that a state dict must hold for these (abstract) variables."""
  return {
      prefix + torch_key(path[1:]): torch_shape(path[-1], leaf.shape)
      for path, leaf in _flat_variables(abstract_variables).items()
  }


def _list(keys: Iterable[str], limit: int = 8) -> str:
  keys = sorted(keys)
  shown = ", ".join(keys[:limit])
  return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def variables_from_state_dict(
    state_dict: Mapping[str, np.ndarray],
    abstract_variables: Mapping[str, Any],
    *,
    prefix: str = "",
    source: str = "state dict",
) -> tuple[dict, set[str]]:
  """Fills ``abstract_variables`` (e.g. from ``jax.eval_shape(model.init, ...)``) from a state dict.

  Reads ``prefix + torch_key(path)`` for every variable, converting layouts. Raises
  ``CheckpointError`` naming ``source`` when keys are missing or mis-shaped. Returns the
  variables (numpy, float32 unless the abstract dtype says otherwise) and the set of consumed
  keys, so that the caller can reject unexpected keys.
  """
  flat = _flat_variables(abstract_variables)
  missing, mismatched, filled = [], [], {}
  for path, leaf in flat.items():
    key = prefix + torch_key(path[1:])
    want = torch_shape(path[-1], leaf.shape)
    if key not in state_dict:
      missing.append(key)
      continue
    value = np.asarray(state_dict[key])
    if tuple(value.shape) != want:
      mismatched.append(f"{key} has shape {tuple(value.shape)}, model expects {want}")
      continue
    filled[path] = from_torch_layout(path[-1], value).astype(leaf.dtype, copy=False)
  if missing:
    raise CheckpointError(
        f"{source}: {len(missing)} key(s) missing for this config: {_list(missing)}"
    )
  if mismatched:
    mismatched.sort()
    raise CheckpointError(
        f"{source}: {len(mismatched)} key(s) do not match the config's shapes "
        f"(checkpoint for another config?): {'; '.join(mismatched[:4])}"
        + (f"; ... ({len(mismatched) - 4} more)" if len(mismatched) > 4 else "")
    )
  consumed = {prefix + torch_key(path[1:]) for path in flat}
  return traverse_util.unflatten_dict(filled), consumed


def state_dict_from_variables(
    variables: Mapping[str, Any], prefix: str = ""
) -> dict[str, np.ndarray]:
  """Inverse of ``variables_from_state_dict``: PyTorch-layout numpy arrays keyed like the official
  code."""
  return {
      prefix + torch_key(path[1:]): to_torch_layout(path[-1], np.asarray(leaf))
      for path, leaf in _flat_variables(variables).items()
  }


def reject_unexpected(
    state_dict_keys: Iterable[str], consumed: set[str], ignorable: Iterable[str], *, source: str
) -> None:
  """Raises ``CheckpointError`` for keys neither consumed nor under one of the ``ignorable``
  prefixes."""
  ignorable = tuple(ignorable)
  unexpected = [k for k in state_dict_keys if k not in consumed and not k.startswith(ignorable)]
  if unexpected:
    raise CheckpointError(
        f"{source}: {len(unexpected)} unexpected key(s) for this config: {_list(unexpected)}"
    )
