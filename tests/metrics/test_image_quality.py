"""PSNR: hand-computed values, skimage's peak_signal_noise_ratio on float and on uint8 images."""

import jax
import numpy as np
import pytest
from skimage import data, metrics, transform

from midms_jax.data import images
from midms_jax.metrics import image_quality
from tests.conftest import assert_close


def photos(size: int = 32) -> np.ndarray:
  """Two skimage sample photos resized to ``size`` x ``size``, float32 [-1, 1]."""
  return np.stack(
      [
          transform.resize(getattr(data, name)()[:, :, :3], (size, size), anti_aliasing=True) * 2
          - 1
          for name in ("astronaut", "coffee")
      ]
  ).astype(np.float32)


def test_psnr_of_known_errors():
  x = np.zeros((2, 4, 4, 3), np.float32)
  y = np.stack(
      [
          np.full((4, 4, 3), 0.2),
          np.where(np.arange(4)[:, None, None] < 1, 0.2, 0.0) * np.ones((4, 4, 3)),
      ]
  )
  # MSE 0.04 and 0.01 over a range of 2: 10 log10(4 / 0.04) = 20 dB, 10 log10(4 / 0.01) = 26.0206
  # dB.
  assert_close(
      image_quality.psnr(x, y.astype(np.float32)),
      [20.0, 10 * np.log10(400.0)],
      1e-5,
      "psnr by hand",
  )
  assert_close(
      image_quality.psnr(x + 1, y.astype(np.float32) + 1, data_range=1.0),
      [10 * np.log10(25.0), 20.0],
      1e-5,
      "range 1",
  )


def test_psnr_matches_skimage_on_zero_one_images():
  x = photos()
  y = np.clip(x + np.random.default_rng(0).normal(0, 0.05, x.shape), -1, 1).astype(np.float32)
  expected = [
      metrics.peak_signal_noise_ratio((a + 1) / 2, (b + 1) / 2, data_range=1.0)
      for a, b in zip(x, y)
  ]
  ours = jax.jit(image_quality.psnr)(x, y)
  assert ours.shape == (2,) and np.all(np.asarray(ours) > 25)
  assert_close(ours, expected, 1e-4, "psnr vs skimage float")


def test_psnr_of_saved_uint8_images_matches_skimage():
  x = photos()
  y = np.clip(x + np.random.default_rng(1).normal(0, 0.02, x.shape), -1, 1).astype(np.float32)
  pixels_x, pixels_y = images.to_uint8(x), images.to_uint8(y)
  # uint8: range 255
  expected = [metrics.peak_signal_noise_ratio(a, b) for a, b in zip(pixels_x, pixels_y)]
  assert_close(
      image_quality.psnr(pixels_x, pixels_y, data_range=255.0),
      expected,
      1e-4,
      "psnr vs skimage uint8",
  )
  float_psnr = np.asarray(image_quality.psnr(x, y))
  assert np.all(
      np.abs(float_psnr - np.asarray(expected)) > 1e-3
  ), "uint8 rounding should change the value"


def test_psnr_of_identical_images_is_infinite_and_shapes_are_checked():
  x = photos()
  assert np.all(np.isposinf(np.asarray(image_quality.psnr(x, x))))
  with pytest.raises(ValueError, match="NHWC"):
    image_quality.psnr(x, x[:, :16])
  with pytest.raises(ValueError, match="NHWC"):
    image_quality.psnr(x[0], x[0])
