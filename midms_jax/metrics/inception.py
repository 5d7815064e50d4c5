"""The FID Inception-v3 (pool features) in Flax, with the weights pytorch-fid users have.

FID's network is TensorFlow's 2015-12-05 Inception-v3 graph as pytorch-fid ports it
(``pt_inception-2015-12-05-6726825d.pth``): torchvision's ``Inception3`` layout whose blocks
``Mixed_5b``..``Mixed_5d`` (A), ``Mixed_6b``..``Mixed_6e`` (C) and ``Mixed_7b`` (E) average-pool
their pool branch without counting the zero padding, and whose last block ``Mixed_7c`` max-pools it
instead. Every convolution is ``BasicConv2d``: a bias-free conv, BatchNorm (eps 1e-3, running
statistics) and ReLU. The features are the 2048 channels after the global average pool.

Input convention (pytorch-fid's): images are resized to 299 x 299 bilinearly with half-pixel
centres, no anti-aliasing (``F.interpolate(mode="bilinear", align_corners=False)``,
``resize_bilinear`` here, exact for both up- and down-sampling), in [-1, 1].

Weights: the state dict is read with ``torch`` (its keys follow from the Flax module names exactly
as ``midms_jax.interop.torch_names`` maps them: ``Mixed_5b.branch1x1.conv.weight``,
``...bn.running_var``); every conv and BatchNorm entry must be present with its shape, the unused
classifier (``fc.*``) and BatchNorm ``num_batches_tracked`` counters are ignored, and anything else
is an error.
"""

import pathlib
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from midms_jax.errors import CheckpointError

INPUT_SIZE = 299
FEATURES = 2048
BN_EPS = 1e-3
WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = (
    f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_NAME}"
)
IGNORED_PREFIXES = ("fc.",)  # the 1008-way classifier: FID uses the pool features
IGNORED_SUFFIX = ".num_batches_tracked"

Padding = tuple[int, int]


def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """``(out_size, in_size)`` weights of PyTorch's bilinear resampling along one axis
  (``align_corners=False``, no anti-aliasing): source ``(o + 0.5) in / out - 0.5``, clamped at 0,
  between two neighbours."""
  # PyTorch computes positions in float32: so do we, to its last bit
  scale = np.float32(in_size / out_size)
  source = np.maximum(
      (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5),
      np.float32(0),
  )
  low = np.floor(source).astype(np.int64)
  high = np.minimum(low + 1, in_size - 1)
  frac = (source - low).astype(np.float32)
  matrix = np.zeros((out_size, in_size), np.float32)
  np.add.at(matrix, (np.arange(out_size), low), 1 - frac)
  np.add.at(matrix, (np.arange(out_size), high), frac)
  return matrix


def resize_bilinear(images: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
  """NHWC images resized to ``size`` x ``size`` exactly as pytorch-fid's ``F.interpolate`` does."""
  rows = jnp.asarray(bilinear_matrix(images.shape[1], size))
  cols = jnp.asarray(bilinear_matrix(images.shape[2], size))
  x = jnp.einsum("oh,bhwc->bowc", rows, images, precision=jax.lax.Precision.HIGHEST)
  return jnp.einsum("pw,bowc->bopc", cols, x, precision=jax.lax.Precision.HIGHEST)


class FrozenBatchNorm(nn.Module):
  """Inference BatchNorm with PyTorch's parameter names (``weight`` is ``scale``, ``running_*``
  statistics)."""

  eps: float = BN_EPS

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,))
    bias = self.param("bias", nn.initializers.zeros, (features,))
    mean = self.variable("batch_stats", "running_mean", jnp.zeros, (features,)).value
    var = self.variable("batch_stats", "running_var", jnp.ones, (features,)).value
    return (x - mean) * (scale * jax.lax.rsqrt(var + self.eps)) + bias


class BasicConv(nn.Module):
  """torchvision's ``BasicConv2d``: bias-free conv (``conv``), BatchNorm (``bn``), ReLU."""

  features: int
  kernel: tuple[int, int]
  strides: int = 1
  padding: Padding = (0, 0)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    pad = tuple((p, p) for p in self.padding)
    x = nn.Conv(
        self.features, self.kernel, strides=self.strides, padding=pad, use_bias=False, name="conv"
    )(x)
    return nn.relu(FrozenBatchNorm(name="bn")(x))


def _avg_pool(x: jax.Array) -> jax.Array:
  """3x3, stride 1, padding 1, zeros not counted (TensorFlow's average pool, pytorch-fid's
  patch)."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool(x: jax.Array, stride: int = 2, padding: int = 0) -> jax.Array:
  return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=((padding, padding),) * 2)


class InceptionA(nn.Module):
  """``FIDInceptionA``: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avg pool-1x1 (``pool_features``)."""

  pool_features: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b1 = BasicConv(64, (1, 1), name="branch1x1")(x)
    b5 = BasicConv(48, (1, 1), name="branch5x5_1")(x)
    b5 = BasicConv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    pool = BasicConv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool(x))
    return jnp.concatenate([b1, b5, b3, pool], axis=-1)


class InceptionB(nn.Module):
  """torchvision's ``InceptionB`` (grid reduction 35 -> 17): 3x3/2 | 1x1-3x3-3x3/2 | max pool/2."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = BasicConv(384, (3, 3), strides=2, name="branch3x3")(x)
    bd = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = BasicConv(96, (3, 3), strides=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool(x)], axis=-1)


class InceptionC(nn.Module):
  """``FIDInceptionC``: 1x1 | factorised 7x7 | double factorised 7x7 | avg pool-1x1;
  ``channels_7x7`` inside."""

  channels_7x7: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.channels_7x7
    row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
    b1 = BasicConv(192, (1, 1), name="branch1x1")(x)
    b7 = BasicConv(c, (1, 1), name="branch7x7_1")(x)
    b7 = BasicConv(c, name="branch7x7_2", **row)(b7)
    b7 = BasicConv(192, name="branch7x7_3", **col)(b7)
    bd = BasicConv(c, (1, 1), name="branch7x7dbl_1")(x)
    for i, (features, shape) in enumerate(((c, col), (c, row), (c, col), (192, row)), start=2):
      bd = BasicConv(features, name=f"branch7x7dbl_{i}", **shape)(bd)
    pool = BasicConv(192, (1, 1), name="branch_pool")(_avg_pool(x))
    return jnp.concatenate([b1, b7, bd, pool], axis=-1)


class InceptionD(nn.Module):
  """torchvision's ``InceptionD`` (grid reduction 17 -> 8): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | max
  pool/2."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = BasicConv(192, (1, 1), name="branch3x3_1")(x)
    b3 = BasicConv(320, (3, 3), strides=2, name="branch3x3_2")(b3)
    b7 = BasicConv(192, (1, 1), name="branch7x7x3_1")(x)
    b7 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = BasicConv(192, (3, 3), strides=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool(x)], axis=-1)


class InceptionE(nn.Module):
  """``FIDInceptionE_1`` (``max_pool=False``: average pool) or ``FIDInceptionE_2`` (max pool) with
  split 1x3 / 3x1 branches."""

  max_pool: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
    b1 = BasicConv(320, (1, 1), name="branch1x1")(x)
    b3 = BasicConv(384, (1, 1), name="branch3x3_1")(x)
    b3 = jnp.concatenate(
        [
            BasicConv(384, name="branch3x3_2a", **row)(b3),
            BasicConv(384, name="branch3x3_2b", **col)(b3),
        ],
        axis=-1,
    )
    bd = BasicConv(448, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate(
        [
            BasicConv(384, name="branch3x3dbl_3a", **row)(bd),
            BasicConv(384, name="branch3x3dbl_3b", **col)(bd),
        ],
        axis=-1,
    )
    pooled = _max_pool(x, stride=1, padding=1) if self.max_pool else _avg_pool(x)
    pool = BasicConv(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, pool], axis=-1)


class InceptionV3(nn.Module):
  """The FID Inception-v3 trunk: ``(B, H, W, 3)`` in [-1, 1] (H, W >= 75) -> ``(B, 2048)`` pool
  features."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = BasicConv(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x)
    x = BasicConv(32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = BasicConv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = _max_pool(x)
    x = BasicConv(80, (1, 1), name="Conv2d_3b_1x1")(x)
    x = BasicConv(192, (3, 3), name="Conv2d_4a_3x3")(x)
    x = _max_pool(x)
    for name, pool_features in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
      x = InceptionA(pool_features, name=name)(x)
    x = InceptionB(name="Mixed_6a")(x)
    for name, channels in (
        ("Mixed_6b", 128),
        ("Mixed_6c", 160),
        ("Mixed_6d", 160),
        ("Mixed_6e", 192),
    ):
      x = InceptionC(channels, name=name)(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE(max_pool=False, name="Mixed_7b")(x)
    x = InceptionE(max_pool=True, name="Mixed_7c")(x)
    return jnp.mean(x, axis=(1, 2))


def pool_features(variables, images: jax.Array) -> jax.Array:
  """``(B, 2048)`` FID features of [-1, 1] NHWC images of any size (resized to 299 as pytorch-fid
  does)."""
  return InceptionV3().apply(variables, resize_bilinear(images.astype(jnp.float32)))


def abstract_variables(
    module: nn.Module = InceptionV3(), shape: Sequence[int] = (1, INPUT_SIZE, INPUT_SIZE, 3)
):
  """Variable shapes of ``module`` (default: the whole network) for an input of ``shape``."""
  return jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.zeros(shape, jnp.float32)))


def missing_weights_message(path: str | pathlib.Path | None) -> str:
  """Why FID cannot be computed: no (or no such) pytorch-fid weight file."""
  where = f"{path}: no such file" if path else "config.evaluate.inception_checkpoint is not set"
  return f"{where} (FID needs pytorch-fid's Inception weights {WEIGHTS_NAME}, from {WEIGHTS_URL})"


def load_state_dict(
    state: dict[str, np.ndarray],
    source: str,
    module: nn.Module = InceptionV3(),
    shape: Sequence[int] = (1, INPUT_SIZE, INPUT_SIZE, 3),
) -> dict:
  """Variables of ``module`` from a pytorch-fid-layout state dict: every conv / BatchNorm key with
  its shape; ``fc.*`` and ``*.num_batches_tracked`` ignored; any other key is a ``CheckpointError``
  naming ``source``.
  """
  from midms_jax.interop import torch_names  # pylint: disable=import-outside-toplevel

  state = {k: v for k, v in state.items() if not k.endswith(IGNORED_SUFFIX)}
  variables, used = torch_names.variables_from_state_dict(
      state, abstract_variables(module, shape), source=source
  )
  torch_names.reject_unexpected(state, used, IGNORED_PREFIXES, source=source)
  return jax.tree_util.tree_map(np.asarray, variables)


def load_inception(path: str | pathlib.Path) -> dict:
  """``InceptionV3`` variables from pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (needs
  torch)."""
  from midms_jax.interop import torch_import  # pylint: disable=import-outside-toplevel

  path = pathlib.Path(path).expanduser()
  if not path.is_file():
    raise CheckpointError(missing_weights_message(path))
  return load_state_dict(
      torch_import.state_dict_of(torch_import.read_checkpoint(path), path), str(path)
  )
