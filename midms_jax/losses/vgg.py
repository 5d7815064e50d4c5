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
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
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
