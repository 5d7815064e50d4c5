"""FID: zero for a set against itself, growing with added noise, the closed form for Gaussians, an
independent trace computation, and the statistics cache (features of 64 dimensions: a 2048-d sqrtm
is slow on CPU).
"""

import numpy as np
import pytest

from midms_jax.errors import CheckpointError
from midms_jax.metrics import fid


def features(count: int = 400, dim: int = 64, seed: int = 0) -> np.ndarray:
  """Correlated, non-centred features (a random linear map of Gaussian draws, plus an offset)."""
  rng = np.random.default_rng(seed)
  return rng.normal(size=(count, dim)) @ rng.normal(size=(dim, dim)) / np.sqrt(dim) + rng.normal(
      size=dim
  )


@pytest.mark.parametrize("count", [400, 20], ids=["full-rank", "rank-deficient"])
def test_a_set_against_itself_is_zero(count):
  stats = fid.statistics(features(count))
  assert abs(fid.frechet_distance(stats, stats)) < 1e-3


def test_grows_monotonically_with_added_noise():
  clean = features()
  noise = np.random.default_rng(1).normal(size=clean.shape)
  reference = fid.statistics(clean)
  distances = [
      fid.frechet_distance(reference, fid.statistics(clean + sigma * noise))
      for sigma in (0.0, 0.1, 0.2, 0.4, 0.8, 1.6)
  ]
  assert abs(distances[0]) < 1e-3 and all(
      a < b for a, b in zip(distances, distances[1:])
  ), distances


def test_closed_form_of_two_gaussians():
  dim, mu = 16, np.arange(16) / 4.0
  a = fid.Statistics(np.zeros(dim), np.eye(dim), 100)
  b = fid.Statistics(mu, 4 * np.eye(dim), 100)
  # |mu|^2 + tr(I) + tr(4 I) - 2 tr(sqrt(4 I)) = |mu|^2 + dim
  assert fid.frechet_distance(a, b) == pytest.approx(mu @ mu + dim, rel=1e-10)


def test_trace_term_matches_eigenvalues_of_the_product():
  a, b = fid.statistics(features(seed=2)), fid.statistics(features(seed=3) * 1.5)
  # tr sqrtm(S1 S2) = sum of the square roots of the (real, non-negative) eigenvalues of S1 S2
  trace = np.sum(np.sqrt(np.clip(np.linalg.eigvals(a.sigma @ b.sigma).real, 0, None)))
  expected = np.sum((a.mu - b.mu) ** 2) + np.trace(a.sigma) + np.trace(b.sigma) - 2 * trace
  assert fid.frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)
  assert fid.frechet_distance(a, b) == pytest.approx(fid.frechet_distance(b, a), rel=1e-8)


def test_statistics_are_float64_and_checked():
  stats = fid.statistics(features(10, 4).astype(np.float32))
  assert (
      stats.mu.dtype == stats.sigma.dtype == np.float64
      and stats.sigma.shape == (4, 4)
      and stats.count == 10
  )
  np.testing.assert_allclose(
      stats.sigma, np.cov(features(10, 4).astype(np.float32).astype(np.float64).T)
  )
  with pytest.raises(ValueError, match="N >= 2"):
    fid.statistics(features(1, 4))
  with pytest.raises(ValueError, match="different dimensions"):
    fid.frechet_distance(stats, fid.statistics(features(10, 5)))


def test_cache_round_trip_staleness_and_damage(tmp_path):
  stats = fid.statistics(features(50, 8))
  path = tmp_path / "stats" / "celebahq-validation-sources-jpg-256px-2000.npz"
  description = dict(set="sources", format="jpg", count=50)
  assert fid.load_statistics(path, description) is None
  fid.save_statistics(path, stats, description)
  loaded = fid.load_statistics(path, dict(description))
  assert (
      loaded.count == 50
      and np.array_equal(loaded.mu, stats.mu)
      and np.array_equal(loaded.sigma, stats.sigma)
  )
  # another format: recomputed
  assert fid.load_statistics(path, dict(description, format="png")) is None
  assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary file left
  path.write_bytes(b"not an npz")
  with pytest.raises(CheckpointError, match="unreadable FID statistics.*delete it"):
    fid.load_statistics(path, description)
