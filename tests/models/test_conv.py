"""The convolution with a CPU-friendly backward pass: same values and gradients as lax, canonical
layouts."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from midms_jax.models import conv

CASES = [  # input shape, kernel size, output channels, stride, padding
    ((2, 9, 9, 3), 3, 4, 1, "SAME"),
    ((2, 9, 9, 3), 3, 4, 2, ((1, 1), (1, 1))),
    ((2, 8, 8, 3), 3, 4, 2, ((0, 1), (0, 1))),
    ((2, 10, 7, 3), 4, 5, 3, ((2, 0), (1, 2))),
    ((1, 6, 6, 5), 1, 2, 1, "VALID"),
    ((2, 13, 6), 1, 5, 1, "VALID"),
    ((2, 13, 6), 3, 5, 2, "SAME"),
]


def _inputs(shape, kernel, features, seed=0):
  rng = np.random.default_rng(seed)
  n = len(shape) - 2
  return (
      jnp.asarray(rng.normal(size=shape), jnp.float32),
      jnp.asarray(rng.normal(size=(kernel,) * n + (shape[-1], features)), jnp.float32),
  )


def _numbers(ndim):
  return ("NHWC", "HWIO", "NHWC") if ndim == 4 else ("NWC", "WIO", "NWC")


def _loss(fn, stride, padding):
  def loss(x, w):
    n = x.ndim - 2
    return jnp.sum(jnp.sin(fn(x, w, (stride,) * n, padding, dimension_numbers=_numbers(x.ndim))))

  return loss


@pytest.mark.parametrize("shape,kernel,features,stride,padding", CASES)
def test_values_and_gradients_equal_lax(shape, kernel, features, stride, padding):
  x, w = _inputs(shape, kernel, features)
  n = x.ndim - 2
  np.testing.assert_array_equal(
      conv.conv_general_dilated(x, w, (stride,) * n, padding, dimension_numbers=_numbers(x.ndim)),
      lax.conv_general_dilated(x, w, (stride,) * n, padding, dimension_numbers=_numbers(x.ndim)),
  )
  want = jax.grad(_loss(lax.conv_general_dilated, stride, padding), (0, 1))(x, w)
  got = jax.jit(jax.grad(_loss(conv.conv_general_dilated, stride, padding), (0, 1)))(x, w)
  for g, e in zip(got, want):
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(e))))


@pytest.mark.parametrize("shape,kernel,features,stride,padding", CASES)
def test_the_canonical_backward_equals_lax(shape, kernel, features, stride, padding):
  """The backward pass called directly, with and without each gradient."""
  x, w = _inputs(shape, kernel, features)
  n = x.ndim - 2
  pads = conv._explicit_padding(padding, x.shape, w.shape, (stride,) * n)  # pylint: disable=protected-access
  out, vjp = jax.vjp(
      lambda a, b: lax.conv_general_dilated(
          a, b, (stride,) * n, pads, dimension_numbers=_numbers(x.ndim)
      ),
      x,
      w,
  )
  grad = jnp.asarray(np.random.default_rng(1).normal(size=out.shape), jnp.float32)
  want = vjp(grad)
  for keep_input, keep_kernel in ((True, True), (True, False), (False, True)):
    # pylint: disable-next=protected-access
    residuals = conv._Residuals(
        x if keep_input else None, w if keep_kernel else None, x.shape, w.shape
    )
    got_input, got_kernel = conv._canonical_backward((stride,) * n, pads, residuals, grad)  # pylint: disable=protected-access
    for g, e, kept in ((got_input, want[0], keep_kernel), (got_kernel, want[1], keep_input)):
      if kept:
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(e))))
      else:
        assert g is None


def _conv_count(fn, *args):
  text = jax.jit(fn).lower(*args).as_text()
  return text.count("stablehlo.convolution")


def test_no_gradient_is_built_for_a_frozen_kernel_or_a_detached_input():
  """A frozen network's kernel (closed over, not differentiated) gets no kernel gradient, a detached
  input no input gradient: one forward and one backward convolution each, not two backward ones."""
  x, w = _inputs((2, 8, 8, 4), 3, 6)
  forward = lambda a, b: conv.conv_general_dilated(
      a, b, (1, 1), "SAME", dimension_numbers=_numbers(4)
  )
  loss = lambda a, b: jnp.sum(jnp.sin(forward(a, b)))
  assert _conv_count(jax.grad(loss, (0, 1)), x, w) == 3
  assert _conv_count(jax.grad(loss, 0), x, w) == 2
  assert _conv_count(jax.grad(loss, 1), x, w) == 2
  assert _conv_count(jax.grad(lambda a, b: loss(jax.lax.stop_gradient(a), b), (0, 1)), x, w) == 2
  want_input = jax.grad(
      lambda a: jnp.sum(
          jnp.sin(lax.conv_general_dilated(a, w, (1, 1), "SAME", dimension_numbers=_numbers(4)))
      )
  )(x)
  np.testing.assert_allclose(jax.grad(loss, 0)(x, w), want_input, rtol=1e-5, atol=1e-5)


def test_backward_inside_scan_compiles_to_canonical_convolutions_on_cpu():
  """Inside a loop body XLA:CPU keeps non-canonical convolutions on a slow naive path: every
  convolution of the compiled gradient must be batch-first / features-last with an (in, out)
  kernel."""
  x, w = _inputs((2, 8, 8, 4), 3, 6)

  def loss(fn):
    def total(kernel):
      def body(carry, _):
        return (
            carry
            + jnp.sum(fn(x * carry, kernel, (1, 1), "SAME", dimension_numbers=_numbers(4)) ** 2),
            None,
        )

      return lax.scan(body, jnp.float32(1.0), None, length=2)[0]

    return total

  def labels(fn):
    text = jax.jit(jax.grad(loss(fn))).lower(w).compile().as_text()
    return set(re.findall(r"convolution\(.*?dim_labels=([\w>-]+)", text))

  assert labels(conv.conv_general_dilated) == {"b01f_01io->b01f"}
  # the layouts this module exists to avoid
  assert labels(lax.conv_general_dilated) - {"b01f_01io->b01f"}


def test_other_convolutions_go_to_lax_unchanged():
  x, w = _inputs((2, 8, 8, 4), 3, 6)
  grouped = jnp.asarray(np.random.default_rng(2).normal(size=(3, 3, 2, 6)), jnp.float32)
  for kwargs, kernel in (
      (dict(feature_group_count=2), grouped),
      (dict(rhs_dilation=(2, 2)), w),
      (dict(dimension_numbers=("NCHW", "OIHW", "NCHW")), jnp.transpose(w, (3, 2, 0, 1))),
  ):
    inputs = jnp.transpose(x, (0, 3, 1, 2)) if "dimension_numbers" in kwargs else x
    kwargs.setdefault("dimension_numbers", _numbers(4))
    jaxpr = jax.make_jaxpr(
        lambda a, b, kw=kwargs: conv.conv_general_dilated(a, b, (1, 1), "SAME", **kw)
    )(inputs, kernel)
    assert [e.primitive.name for e in jaxpr.eqns] == ["conv_general_dilated"], kwargs


def test_off_cpu_it_is_lax_itself(monkeypatch):
  """The tuning applies only where platform_tuning says it helps: elsewhere JAX's own convolution
  and backward pass (no custom_vjp in the program)."""
  x, w = _inputs((2, 8, 8, 4), 3, 6)
  call = lambda a, b: conv.conv_general_dilated(a, b, (1, 1), "SAME", dimension_numbers=_numbers(4))
  assert "custom_vjp_call" in str(jax.make_jaxpr(call)(x, w))
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  elsewhere = lambda a, b: conv.conv_general_dilated(
      a, b, (1, 1), "SAME", dimension_numbers=_numbers(4)
  )
  assert [e.primitive.name for e in jax.make_jaxpr(elsewhere)(x, w).eqns] == [
      "conv_general_dilated"
  ]
