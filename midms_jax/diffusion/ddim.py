"""Forward noising and the DDIM update, with the official operation order (float32).

The coefficients are arrays (not Python floats) so that a ``lax.scan`` can carry them per step.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp


class DDIMUpdate(NamedTuple):
  """One ``p_sample_ddim`` result: ``x_prev``, ``pred_x0`` and the official ``ddim_param`` pair
  ``(sqrt(a_prev), dir_xt)`` that re-noises a (re-warped) x0 to the next level deterministically."""

  x_prev: jax.Array
  pred_x0: jax.Array
  sqrt_a_prev: jax.Array
  dir_xt: jax.Array


def q_sample(
    x0: jax.Array,
    sqrt_alpha_cumprod: jax.Array,
    sqrt_one_minus_alpha_cumprod: jax.Array,
    noise: jax.Array,
) -> jax.Array:
  """``sqrt(ā_t) x0 + sqrt(1 - ā_t) noise`` with LDM's stored ``sqrt`` buffers (not sqrt of ā in
  float32)."""
  return sqrt_alpha_cumprod * x0 + sqrt_one_minus_alpha_cumprod * noise


def predict_x0(
    x: jax.Array,
    eps: jax.Array,
    sqrt_alpha_cumprod: jax.Array,
    sqrt_one_minus_alpha_cumprod: jax.Array,
) -> jax.Array:
  """``(x - sqrt(1 - ā) ε) / sqrt(ā)``: the clean sample the predicted noise implies."""
  return (x - sqrt_one_minus_alpha_cumprod * eps) / sqrt_alpha_cumprod


def ddim_update(
    x: jax.Array,
    eps: jax.Array,
    a_t: jax.Array,
    a_prev: jax.Array,
    sigma: jax.Array,
    sqrt_one_minus_a_t: jax.Array,
    noise: jax.Array | None = None,
) -> DDIMUpdate:
  """DDIM step from ε (LDM ``p_sample_ddim``, no clipping): x0 = (x - sqrt(1-a) ε)/sqrt(a),
  dir = sqrt(1 - a_prev - σ²) ε, x_prev = sqrt(a_prev) x0 + dir + σ noise."""
  x = x.astype(jnp.float32)
  eps = eps.astype(jnp.float32)
  pred_x0 = predict_x0(x, eps, jnp.sqrt(a_t), sqrt_one_minus_a_t)
  dir_xt = jnp.sqrt(1.0 - a_prev - sigma**2) * eps
  sqrt_a_prev = jnp.sqrt(a_prev)
  x_prev = sqrt_a_prev * pred_x0 + dir_xt
  if noise is not None:
    x_prev = x_prev + sigma * noise
  return DDIMUpdate(
      x_prev, pred_x0, jnp.broadcast_to(sqrt_a_prev, x.shape[:1] + (1,) * (x.ndim - 1)), dir_xt
  )
