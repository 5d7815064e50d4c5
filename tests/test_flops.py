"""FLOP counting on jaxprs: known matmul / convolution counts, scan trip counts, cond weighting."""

import jax
import jax.numpy as jnp
import pytest

from midms_jax import flops
from midms_jax.models import conv as models_conv

A = jax.ShapeDtypeStruct((8, 16), jnp.float32)
B = jax.ShapeDtypeStruct((16, 32), jnp.float32)


def test_matmul_and_batched_einsum():
  assert flops.count_flops(jnp.matmul, A, B) == 2 * 8 * 16 * 32
  q = jax.ShapeDtypeStruct((2, 5, 7, 3), jnp.float32)
  assert (
      flops.count_flops(lambda q, k: jnp.einsum("bihc,bjhc->bhij", q, k), q, q)
      == 2 * 2 * 7 * 5 * 5 * 3
  )


def test_convolution_and_its_gradient():
  x = jax.ShapeDtypeStruct((2, 10, 10, 4), jnp.float32)
  w = jax.ShapeDtypeStruct((3, 3, 4, 6), jnp.float32)
  conv = lambda x, w: jax.lax.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  forward = 2 * (2 * 10 * 10 * 6) * 4 * 9
  assert flops.count_flops(conv, x, w) == forward
  # Backward: one convolution for the input gradient and one for the kernel gradient, each as
  # costly.
  grads = jax.grad(lambda x, w: jnp.sum(conv(x, w)), argnums=(0, 1))
  assert flops.count_flops(grads, x, w) == pytest.approx(3 * forward, rel=0.05)


def test_scan_counts_its_body_per_step_and_jit_is_transparent():
  body = lambda c, _: (c @ c, None)
  square = jax.ShapeDtypeStruct((16, 16), jnp.float32)
  for length in (1, 4):
    fn = jax.jit(lambda c, n=length: jax.lax.scan(body, c, None, length=n)[0])
    assert flops.count_flops(fn, square) == length * 2 * 16**3


def test_cond_is_weighted_between_its_branches():
  square = jax.ShapeDtypeStruct((16, 16), jnp.float32)
  fn = lambda p, c: jax.lax.cond(p, lambda c: c @ c @ c, lambda c: c, c)
  pred = jax.ShapeDtypeStruct((), jnp.bool_)
  two_matmuls = 2 * 2 * 16**3
  assert flops.count_flops(fn, pred, square, cond_fraction=1.0) == two_matmuls
  assert flops.count_flops(fn, pred, square, cond_fraction=0.5) == two_matmuls / 2
  assert flops.count_flops(fn, pred, square, cond_fraction=0.0) == 0


def test_convolution_gradient_counts_as_lax_does():
  """``models.conv``'s CPU backward pass (canonical-layout convolutions) does the work lax's
  gradient does."""
  x = jax.ShapeDtypeStruct((2, 8, 8, 4), jnp.float32)
  w = jax.ShapeDtypeStruct((3, 3, 4, 6), jnp.float32)
  numbers = ("NHWC", "HWIO", "NHWC")
  grads = lambda fn: jax.grad(
      lambda x, w: jnp.sum(fn(x, w, (2, 2), "SAME", dimension_numbers=numbers)), (0, 1)
  )
  assert flops.count_flops(grads(models_conv.conv_general_dilated), x, w) == flops.count_flops(
      grads(jax.lax.conv_general_dilated), x, w
  )
