"""SWD: zero for identical sets, a direct numpy computation of Karras et al.'s definition on a small
case (scipy convolutions with mirrored borders, NCHW as the reference code), independence of the
batching, ordering.
"""

import jax
import numpy as np
import pytest
import scipy.ndimage

from midms_jax.metrics import swd
from tests.conftest import assert_close

SMALL = swd.Settings(
    nhood_size=7, nhoods_per_image=16, dir_repeats=2, dirs_per_repeat=8, min_resolution=16
)
KEY = jax.random.PRNGKey(7)


def photos(count: int = 6, side: int = 32, seed: int = 0) -> np.ndarray:
  """Smooth random colour fields with some texture, uint8."""
  rng = np.random.default_rng(seed)
  coarse = rng.uniform(0, 255, (count, side // 8, side // 8, 3))
  smooth = np.repeat(np.repeat(coarse, 8, axis=1), 8, axis=2)
  return np.clip(smooth + rng.normal(0, 20, smooth.shape), 0, 255).astype(np.uint8)


def numpy_laplacian_pyramid(images: np.ndarray, levels: int) -> list[np.ndarray]:
  """NCHW float64 pyramid as the progressive-GAN code builds it (5x5 binomial kernel, scipy
  'mirror')."""
  taps = np.array([1, 4, 6, 4, 1], np.float64) / 16
  kernel = np.outer(taps, taps)[None, None]
  down = lambda x: scipy.ndimage.convolve(x, kernel, mode="mirror")[:, :, ::2, ::2]

  def up(x):
    zeros = np.zeros(x.shape[:2] + (x.shape[2] * 2, x.shape[3] * 2))
    zeros[:, :, ::2, ::2] = x
    return scipy.ndimage.convolve(zeros, kernel * 4, mode="mirror")

  pyramid = [images.astype(np.float64)]
  for _ in range(1, levels):
    pyramid.append(down(pyramid[-1]))
    pyramid[-2] = pyramid[-2] - up(pyramid[-1])
  return pyramid


def numpy_swd(a: np.ndarray, b: np.ndarray, settings: swd.Settings, key) -> list[float]:
  """Per-level SWD x1e3 by the definition, with the library's centres and directions (its random
  draws)."""
  sides = swd.level_sides(a.shape[1], settings.min_resolution)
  half = settings.nhood_size // 2
  indices = np.arange(len(a))
  descriptors = []
  for images in (a, b):
    pyramid = numpy_laplacian_pyramid(np.transpose(images, (0, 3, 1, 2)), len(sides))
    per_level = []
    for level, (band, side) in enumerate(zip(pyramid, sides)):
      centres = np.asarray(swd.centres(jax.random.split(key)[0], indices, level, side, settings))
      patches = [
          band[i, :, y - half : y + half + 1, x - half : x + half + 1]
          for i in indices
          for y, x in centres[i]
      ]
      desc = np.stack(patches)  # (N, C, n, n)
      desc = (desc - desc.mean(axis=(0, 2, 3), keepdims=True)) / desc.std(
          axis=(0, 2, 3), keepdims=True
      )
      # (row, column, channel) order
      per_level.append(np.transpose(desc, (0, 2, 3, 1)).reshape(len(desc), -1))
    descriptors.append(per_level)
  distances = []
  for level, (da, db) in enumerate(zip(*descriptors)):
    dirs = np.asarray(swd.directions(key, level, da.shape[1], settings), np.float64)
    repeats = [np.mean(np.abs(np.sort(da @ d, axis=0) - np.sort(db @ d, axis=0))) for d in dirs]
    distances.append(1e3 * np.mean(repeats))
  return distances


def test_identical_sets_are_at_zero():
  images = photos()
  result = swd.swd(images, images.copy(), KEY, SMALL, batch_size=4)
  assert result["swd"] == 0.0 and result["levels"] == [0.0, 0.0]


def test_matches_a_direct_numpy_computation():
  a, b = photos(seed=0), photos(seed=1)
  result = swd.swd(a, b, KEY, SMALL, batch_size=4)
  expected = numpy_swd(a, b, SMALL, KEY)
  assert len(result["levels"]) == 2 and min(expected) > 10
  assert_close(result["levels"], expected, 1e-4 * max(expected), "swd levels vs numpy")
  assert result["swd"] == pytest.approx(np.mean(expected), rel=1e-5)


def test_batching_and_set_order_of_draws():
  a, b = photos(seed=0), photos(seed=2)
  one = swd.swd(a, b, KEY, SMALL, batch_size=6)
  split = swd.swd(a, b, KEY, SMALL, batch_size=4)  # 4 + 2 (padded): the same draws per image index
  assert_close(split["levels"], one["levels"], 1e-3, "swd batching")
  noisy = lambda s: np.clip(a + np.random.default_rng(3).normal(0, s, a.shape), 0, 255).astype(
      np.uint8
  )
  slight, strong = swd.swd(a, noisy(5), KEY, SMALL)["swd"], swd.swd(a, noisy(40), KEY, SMALL)["swd"]
  assert 0 < slight < strong


def test_shapes_are_checked():
  with pytest.raises(ValueError, match="differ in shape"):
    swd.swd(photos(4), photos(6), KEY, SMALL)
  with pytest.raises(ValueError, match="square RGB"):
    swd.swd(photos()[:, :, :16], photos()[:, :, :16], KEY, SMALL)
  with pytest.raises(ValueError, match="halve exactly"):
    swd.swd(photos(side=8), photos(side=8), KEY, SMALL)
  assert swd.level_sides(256, 16) == (256, 128, 64, 32, 16)
