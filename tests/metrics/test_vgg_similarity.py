"""Style relevance and semantic consistency (CoCosNet): an image against itself scores 1, region
means by hand, shared-region selection, the flattened-map cosine, and the batched uint8 path of
``suite.vgg_scores``.
"""

import jax
import numpy as np
import pytest

from configs import base
from midms_jax.data import images
from midms_jax.models import vgg
from midms_jax.metrics import suite, vgg_similarity
from tests.conftest import FIXTURES, assert_close
from tests.metrics.test_lpips import photo_batch

WIDTHS = base.tiny_vgg_widths()


@pytest.fixture(scope="module")
def variables() -> dict:
  # CoCosNet's layout at 1/8 of the widths
  return vgg.load_vgg19(FIXTURES / "vgg19_small.pth", WIDTHS)


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
  return photo_batch()[:, :32, :32]


def halves(count: int, side: int = 32) -> np.ndarray:
  """Label ids: left half region 0, right half region 2 (region 1 is absent)."""
  ids = np.zeros((count, side, side), np.int32)
  ids[:, :, side // 2 :] = 2
  return ids


@pytest.fixture(scope="module")
def scores(variables):
  return jax.jit(
      lambda *args: vgg_similarity.scores(variables, *args, widths=WIDTHS, num_regions=3)
  )


def test_an_image_against_itself_scores_one(scores, photos):
  ids = halves(len(photos))
  for out in (scores(photos, photos, photos), scores(photos, photos, photos, ids, ids)):
    for name, value in out.items():
      assert_close(value, np.ones(len(photos)), 1e-5, name)


def test_other_images_score_below_one_symmetrically(scores, photos):
  others = np.roll(photos, 1, axis=0)
  forward, backward = scores(photos, others, others), scores(others, photos, photos)
  for name in forward:
    assert np.all((forward[name] > 0) & (forward[name] < 0.999)), (name, forward[name])
    assert_close(forward[name], backward[name], 1e-5, name)


def test_semantic_consistency_is_the_mean_cosine_of_flattened_maps(variables, photos):
  others = np.roll(photos, 1, axis=0)
  features = jax.jit(
      lambda x: vgg.VGG19(WIDTHS).apply(variables, x, vgg_similarity.SEMANTIC_LAYERS)
  )
  both = features(np.concatenate([photos, others]))
  a, b = ({k: v[:4] for k, v in both.items()}, {k: v[4:] for k, v in both.items()})
  flat = lambda x: np.asarray(x, np.float64).reshape(len(x), -1)
  expected = np.mean(
      [
          np.sum(flat(a[k]) * flat(b[k]), 1)
          / np.linalg.norm(flat(a[k]), axis=1)
          / np.linalg.norm(flat(b[k]), axis=1)
          for k in vgg_similarity.SEMANTIC_LAYERS
      ],
      axis=0,
  )
  assert_close(vgg_similarity.semantic_consistency(a, b), expected, 1e-5, "semantic consistency")


def test_region_means_by_hand():
  # pixels (0,1) (2,3) / (4,5) (6,7)
  features = np.arange(2 * 2 * 2 * 1, dtype=np.float32).reshape(1, 2, 2, 2)
  # 4x4 ids -> 2x2 by subsampling
  ids = np.array([[[0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]]])
  means, shares = vgg_similarity.region_means(features, ids, 3)
  # region 1: pixels (2,3) (4,5) (6,7)
  np.testing.assert_allclose(means[0], [[0, 1], [4, 5], [0, 0]])
  np.testing.assert_allclose(shares[0], [0.25, 0.75, 0.0])


def test_only_regions_shared_by_both_images_count():
  rng = np.random.default_rng(0)
  out, ex = rng.uniform(0, 1, (2, 1, 4, 4, 3)).astype(np.float32)
  left = np.zeros((1, 4, 4), np.int32)
  left[:, :, 2:] = 1
  only_zero = np.zeros((1, 4, 4), np.int32)
  cos = lambda a, b: float(np.sum(a * b) / np.linalg.norm(a) / np.linalg.norm(b))
  similarity = jax.jit(lambda *ids: vgg_similarity.region_similarity(out, ex, *ids, 3, 0.01))
  # output has regions 0 and 1, exemplar only 0: the score is region 0's similarity alone
  got = similarity(left, only_zero)
  assert float(got[0]) == pytest.approx(
      cos(out[0, :, :2].mean((0, 1)), ex[0].mean((0, 1))), rel=1e-5
  )
  # no shared region: the whole-image similarity
  got = similarity(left, only_zero + 2)
  assert float(got[0]) == pytest.approx(cos(out[0].mean((0, 1)), ex[0].mean((0, 1))), rel=1e-5)


def test_suite_scores_uint8_batches_like_the_direct_call(variables, scores, photos):
  pixels = images.to_uint8(photos)
  others = np.roll(pixels, 1, axis=0)
  ids = halves(len(pixels)).astype(np.uint8)
  sets = suite.ImageSets(pixels, others, others, ids, ids)
  # 3 + 1 padded
  got = suite.vgg_scores(variables, sets, widths=WIDTHS, num_regions=3, batch_size=3)
  direct = scores(
      images.to_model_range(pixels),
      images.to_model_range(others),
      images.to_model_range(others),
      halves(len(pixels)),
      halves(len(pixels)),
  )
  assert got == pytest.approx(
      {
          "semantic_consistency": float(np.mean(direct["semantic_consistency"])),
          "style_relevance_colour": float(np.mean(direct["style_colour"])),
          "style_relevance_texture": float(np.mean(direct["style_texture"])),
      },
      rel=1e-5,
  )
