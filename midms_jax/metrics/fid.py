"""Fréchet Inception Distance from pool features, as pytorch-fid computes it, and a statistics
cache.

``statistics``: mean and covariance (``np.cov``, N - 1 denominator) of ``(N, D)`` features in
float64. ``frechet_distance``: ``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrtm(S1 S2))`` with
``scipy.linalg.sqrtm``; when the square root is not finite (a singular product) both covariances get
``eps`` on the diagonal, and an imaginary part of the root's diagonal beyond 1e-3 is an error
(numerical trouble), else it is dropped. Features come from ``inception.pool_features``.
"""

import json
import pathlib
from typing import Any, Mapping, NamedTuple

import numpy as np
import scipy.linalg

from midms_jax.errors import CheckpointError, first_line

IMAGINARY_TOLERANCE = 1e-3


class Statistics(NamedTuple):
  """Mean ``(D,)`` and covariance ``(D, D)`` of a set's features (float64) and the set's size."""

  mu: np.ndarray
  sigma: np.ndarray
  count: int


def statistics(features: np.ndarray) -> Statistics:
  """``Statistics`` of ``(N, D)`` features (N >= 2)."""
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or len(features) < 2:
    raise ValueError(f"FID statistics need (N >= 2, D) features, got shape {features.shape}")
  return Statistics(np.mean(features, axis=0), np.cov(features, rowvar=False), len(features))


def _sqrtm_product(sigma1: np.ndarray, sigma2: np.ndarray) -> np.ndarray:
  return np.asarray(scipy.linalg.sqrtm(sigma1 @ sigma2))


def frechet_distance(a: Statistics, b: Statistics, eps: float = 1e-6) -> float:
  """The Fréchet distance between the Gaussians of two feature sets (pytorch-fid's recipe, module
  doc)."""
  if a.mu.shape != b.mu.shape or a.sigma.shape != b.sigma.shape:
    raise ValueError(f"FID: statistics of different dimensions: {a.mu.shape} vs {b.mu.shape}")
  root = _sqrtm_product(a.sigma, b.sigma)
  if not np.isfinite(root).all():
    offset = np.eye(len(a.mu)) * eps
    root = _sqrtm_product(a.sigma + offset, b.sigma + offset)
  if np.iscomplexobj(root):
    imaginary = float(np.max(np.abs(np.diagonal(root).imag)))
    if imaginary > IMAGINARY_TOLERANCE:
      raise ValueError(f"FID: the covariance square root has an imaginary part of {imaginary:.3g}")
    root = root.real
  diff = a.mu - b.mu
  return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * np.trace(root))


def save_statistics(
    path: str | pathlib.Path, stats: Statistics, description: Mapping[str, Any]
) -> None:
  """Writes ``stats`` with a JSON ``description`` of what they are of (atomically: temporary file,
  rename)."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp.npz")
  np.savez(
      tmp,
      mu=stats.mu,
      sigma=stats.sigma,
      count=np.int64(stats.count),
      description=np.array(json.dumps(dict(description), sort_keys=True)),
  )
  tmp.replace(path)


def load_statistics(path: str | pathlib.Path, description: Mapping[str, Any]) -> Statistics | None:
  """Cached ``Statistics`` at ``path`` if they were saved with this ``description``, else None
  (stale or absent); an unreadable file is a ``CheckpointError``."""
  path = pathlib.Path(path)
  if not path.is_file():
    return None
  try:
    with np.load(path, allow_pickle=False) as data:
      if str(data["description"]) != json.dumps(dict(description), sort_keys=True):
        return None
      return Statistics(data["mu"], data["sigma"], int(data["count"]))
  except (OSError, KeyError, ValueError) as e:
    raise CheckpointError(
        f"{path}: unreadable FID statistics ({first_line(e)}); delete it to recompute"
    ) from None
