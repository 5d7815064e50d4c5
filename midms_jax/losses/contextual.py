"""MIDMs' variant of the contextual loss (``models/ContextualLoss.py:ContextualLoss_forward``).

It differs from CoCosNet's: both feature sets are centred on the exemplar's per-pixel channel mean,
the winner-take-all affinity is taken over exemplar positions, only affinities >= ``threshold``
are kept, and their mean is taken over the whole batch (one scalar), ``loss = -log(mean)``, or 0
when nothing is kept.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

_FLOAT_EPS = 2.220446049250313e-16  # sys.float_info.epsilon, as the official normalisation
_HIGHEST = jax.lax.Precision.HIGHEST


class ContextualTerms(NamedTuple):
  affinity: jax.Array  # (B, N_x, N_y)
  wta: jax.Array  # (B, N_x) max over exemplar positions
  kept: jax.Array  # (B, N_x) bool, wta >= threshold
  loss: jax.Array  # () scalar


def _normalize(f: jax.Array) -> jax.Array:
  return f / (jnp.linalg.norm(f, axis=-1, keepdims=True) + _FLOAT_EPS)


def contextual_terms(
    x: jax.Array, y: jax.Array, h: float = 0.1, threshold: float = 0.3
) -> ContextualTerms:
  """Contextual loss of features ``x`` (output) against ``y`` (exemplar), NHWC, with its
  intermediates."""
  x = x.astype(jnp.float32)
  y = y.astype(jnp.float32)
  y_mean = jnp.mean(y, axis=-1, keepdims=True)
  b, c = x.shape[0], x.shape[-1]
  xn = _normalize(x - y_mean).reshape(b, -1, c)
  yn = _normalize(y - y_mean).reshape(b, -1, c)
  distance = 1 - jnp.einsum("bic,bjc->bij", xn, yn, precision=_HIGHEST)
  relative = distance / (jnp.min(distance, axis=-1, keepdims=True) + 1e-3)
  affinity = jax.nn.softmax((1 - relative) / h, axis=-1)
  wta = jnp.max(affinity, axis=-1)
  kept = wta >= threshold
  count = jnp.sum(kept)
  mean = jnp.sum(jnp.where(kept, wta, 0.0)) / jnp.maximum(count, 1)
  loss = jnp.where(count > 0, -jnp.log(jnp.where(count > 0, mean, 1.0)), 0.0)
  return ContextualTerms(affinity, wta, kept, loss)


def contextual_loss(
    x: jax.Array, y: jax.Array, h: float = 0.1, threshold: float = 0.3
) -> jax.Array:
  return contextual_terms(x, y, h, threshold).loss
