"""The parameter-free first stage: PyTorch's pixel_unshuffle layout, exact round trip, clear
errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from midms_jax.models import build, pixel_shuffle
from midms_jax.midms.model import MIDMs
from tests.conftest import nchw_to_nhwc, nhwc_to_nchw


def _images(shape=(2, 8, 12, 3), seed=0):
  return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, shape), jnp.float32)


@pytest.mark.parametrize("factor", [2, 4])
def test_unshuffle_matches_torch_and_shuffle_inverts_it(factor):
  torch = pytest.importorskip("torch")
  images = _images()
  ours = pixel_shuffle.pixel_unshuffle(images, factor)
  theirs = torch.nn.functional.pixel_unshuffle(
      torch.from_numpy(np.array(nhwc_to_nchw(images))), factor
  ).numpy()
  np.testing.assert_array_equal(ours, nchw_to_nhwc(theirs))
  np.testing.assert_array_equal(pixel_shuffle.pixel_shuffle(ours, factor), images)


def test_first_stage_module_round_trip_and_latent_shape():
  cfg = dict(
      type="pixel_shuffle",
      embed_dim=12,
      ch_mult=(1, 1),
      in_channels=3,
      resolution=8,
      scale_factor=1.0,
  )
  stage = build.build_first_stage(cfg)
  images = _images((2, 8, 8, 3))
  assert stage.init(jax.random.PRNGKey(0), images) == {}
  latents = stage.apply({}, images, method=stage.encode)
  assert latents.shape == (2, 4, 4, 12) and build.latent_size(cfg) == 4
  np.testing.assert_array_equal(stage.apply({}, latents, method=stage.decode), images)


def test_midms_encodes_and_decodes_exactly_with_it():
  from configs import synthetic  # pylint: disable=import-outside-toplevel

  config = synthetic.get_config()
  model = MIDMs.from_config(config)
  images = _images((2, 32, 32, 3))
  latents = model.encode({"first_stage": {}}, images)
  assert latents.shape == model.latent_shape(images.shape) == (2, 16, 16, 12)
  np.testing.assert_array_equal(model.decode({"first_stage": {}}, latents), images)


def test_bad_settings_and_inputs_are_named():
  stage = pixel_shuffle.PixelShuffleFirstStage(embed_dim=3, ch_mult=(1, 1))
  with pytest.raises(
      ValueError, match=r"embed_dim must be in_channels \* factor\^2 = 12 \(factor 2\), got 3"
  ):
    stage.init(jax.random.PRNGKey(0), _images((1, 8, 8, 3)))
  good = pixel_shuffle.PixelShuffleFirstStage()
  with pytest.raises(ValueError, match=r"images have 1 channels, expected in_channels=3"):
    good.apply({}, _images((1, 8, 8, 1)), method=good.encode)
  with pytest.raises(ValueError, match=r"image size 7x8 is not a multiple of the factor 2"):
    pixel_shuffle.pixel_unshuffle(_images((1, 7, 8, 3)), 2)
